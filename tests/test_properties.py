"""Properties every causal MoE language model must have, checked over many random cases."""

from functools import cache

import torch
from hf_reference import perturb_
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek import Transformer, get_preset
from nanoseek.model.moe import grouped_mm, route

CFG = get_preset("tiny").replace(vocab_size=97, num_hidden_layers=2)


@cache
def model() -> Transformer:
    m = perturb_(Transformer(CFG), seed=11).eval()
    for layer in m.layers[CFG.first_k_dense_replace :]:
        layer.mlp.gate.e_score_correction_bias.mul_(0.1)
    return m


def tokens(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), length=st.integers(2, 40), data=st.data())
def test_later_tokens_never_change_earlier_logits(seed, length, data):
    prefix = data.draw(st.integers(1, length - 1))
    x = tokens(seed, (1, length))
    y = x.clone()
    y[:, prefix:] = tokens(seed + 1, (1, length - prefix))  # rewrite the future
    with torch.no_grad():
        a, b = model()(x), model()(y)
    torch.testing.assert_close(a[:, :prefix], b[:, :prefix], rtol=0, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(2, 4), length=st.integers(1, 24))
def test_batch_rows_are_independent(seed, batch, length):
    x = tokens(seed, (batch, length))
    with torch.no_grad():
        together = model()(x)
        alone = torch.cat([model()(row[None]) for row in x])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n_tokens=st.integers(1, 16), norm=st.booleans())
def test_bias_changes_which_experts_but_not_their_weights(seed, n_tokens, norm):
    cfg = CFG.replace(norm_topk_prob=norm)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_tokens, cfg.n_routed_experts, generator=g)
    bias = torch.randn(cfg.n_routed_experts, generator=g)
    favourite = int(torch.randint(cfg.n_routed_experts, (1,), generator=g))
    bias[favourite] = 10.0  # large enough to win its group and the top-k for every token

    weights, indices = route(logits, bias, cfg)
    assert (indices == favourite).any(dim=1).all()
    # The weights are the *unbiased* sigmoid scores of the chosen experts, as if the bias never existed.
    chosen = logits.sigmoid().gather(1, indices)
    expected = chosen / chosen.sum(dim=1, keepdim=True) if norm else chosen
    torch.testing.assert_close(weights, expected * cfg.routed_scaling_factor)
    # Without the bias, the same experts would get exactly the same weights (selection aside).
    unbiased_weights, unbiased_indices = route(logits, None, cfg)
    same = (unbiased_indices.sort(1).values == indices.sort(1).values).all(1)
    torch.testing.assert_close(unbiased_weights.sort(1).values[same], weights.sort(1).values[same])


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=6))
def test_grouped_mm_matches_a_loop_over_groups_with_gradients(counts):
    counts_t = torch.tensor(counts)
    x = torch.randn(int(counts_t.sum()), 5, requires_grad=True)
    w = torch.randn(len(counts), 3, 5, requires_grad=True)
    got = grouped_mm(x, w, counts_t)
    expected = torch.cat([rows @ w[g].T for g, rows in enumerate(x.split(counts))])
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    (gx, gw), (ex, ew) = (torch.autograd.grad(out, (x, w), grad) for out in (got, expected))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)


def test_group_limited_routing_only_picks_from_the_best_groups():
    cfg = CFG  # 8 experts in 4 groups of 2, keep 2 groups, pick 2 experts
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0, 3.0, 3.0, 9.0, -9.0]])
    # group scores (sum of top-2 sigmoids): g0 ~1.97, g1 1.0, g2 ~1.90, g3 ~1.0 -> keep g0 and g2
    _, indices = route(logits, None, cfg)
    assert set(indices[0].tolist()) == {0, 1}  # expert 6 scores highest but its group loses (9 + -9)


def test_softmax_gate_weights_are_softmax_probabilities_of_the_chosen():
    cfg = CFG.replace(scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5, -1.0, 4.0, 0.0]])
    weights, indices = route(logits, None, cfg)
    assert indices[0].tolist() == [6, 3]
    torch.testing.assert_close(weights, logits.softmax(-1)[:, [6, 3]])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12))
def test_the_decode_paths_over_experts_match_the_sorted_path(seed, n):
    """The eager loop over chosen experts, and the two paths of a captured step (gathered weights per pair,
    every expert on every token), against the sorted grouped path that training runs."""
    experts = model().layers[CFG.first_k_dense_replace].mlp.experts
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CFG.hidden_size, generator=g)
    scores = torch.rand(n, experts.n_experts, generator=g)
    weights, indices = scores.topk(CFG.num_experts_per_tok, dim=-1)  # distinct experts per token
    with torch.enable_grad():  # gradients on: the sorted grouped path
        sorted_path = experts(x, weights, indices).detach()
    with torch.no_grad():
        for path in (experts._few_tokens, experts._gathered, experts._every_expert):
            torch.testing.assert_close(path(x, weights, indices), sorted_path, rtol=1e-5, atol=1e-5)  # fp32 sum orders
