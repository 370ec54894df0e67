"""The fused, chunked head + cross-entropy equals torch's linear + cross_entropy: the loss and both gradients,
with masked targets, across chunk boundaries, in bf16, and inside the model for every MTP depth."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek import Transformer, get_preset
from nanoseek.config import IGNORE
from nanoseek.model.loss import linear_cross_entropy


def reference(hidden, weight, targets, dtype=torch.float32):
    logits = F.linear(hidden.to(dtype), weight.to(dtype)).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def loss_and_grads(fn, hidden, weight, targets, **kwargs):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, targets, **kwargs)
    (loss * 0.5).backward()  # a scale on the output reaches both gradients
    return loss.detach(), hidden.grad, weight.grad


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 70),
    vocab=st.integers(2, 40),
    masked=st.floats(0, 1),
    rows=st.integers(1, 32),
    seed=st.integers(0, 2**16),
)
def test_equals_torch_cross_entropy(n, vocab, masked, rows, seed):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, 8, generator=g), torch.randn(vocab, 8, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < masked] = IGNORE
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets, rows=rows)  # chunks cross rows
    ref = loss_and_grads(reference, hidden, weight, targets)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_matmuls_match_bf16_autocast_within_its_rounding():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(300, 64, generator=g), torch.randn(500, 64, generator=g) * 0.1
    targets = torch.randint(0, 500, (300,), generator=g)
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets, dtype=torch.bfloat16)
    ref = loss_and_grads(reference, hidden, weight, targets, dtype=torch.bfloat16)
    assert ours[1].dtype == ours[2].dtype == torch.float32  # gradients come back in the inputs' dtype
    for a, b in zip(ours, ref, strict=True):
        # Both round the same bf16 products; only the sum order differs (2^-8 relative per rounding).
        torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * b.abs().max().item())


def test_nothing_to_learn_is_zero_and_still_backpropagates():
    hidden = torch.randn(5, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(7, 4), torch.full((5,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None and not hidden.grad.any()


def test_without_grad_it_only_scores(monkeypatch):
    hidden, weight, targets = torch.randn(20, 4), torch.randn(9, 4, requires_grad=True), torch.randint(0, 9, (20,))
    products = []
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: products.append(1) or torch.matmul(a, b))
    with torch.no_grad():  # evaluation: a parameter that requires grad, but no gradient is wanted
        loss = linear_cross_entropy(hidden, weight, targets, rows=8)
    torch.testing.assert_close(loss, reference(hidden, weight.detach(), targets))
    assert len(products) == 3  # one matmul per chunk (the logits), none for gradients


def test_a_frozen_head_gets_no_gradient_and_costs_none():
    hidden = torch.randn(20, 4, requires_grad=True)
    weight, targets = torch.randn(9, 4), torch.randint(0, 9, (20,))
    linear_cross_entropy(hidden, weight, targets).backward()
    expected = torch.autograd.grad(reference(hidden, weight, targets), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected)


def test_model_losses_equal_cross_entropy_of_its_logits_for_every_mtp_depth():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(num_hidden_layers=2, num_nextn_predict_layers=2))
    inputs = torch.randint(0, model.cfg.vocab_size, (3, 24))
    targets = torch.randint(0, model.cfg.vocab_size, (3, 24))
    targets[0, :10] = IGNORE  # a masked prompt
    logits, mtp_logits = model(inputs, mtp=True)
    expected = torch.stack(
        [
            F.cross_entropy(lg.flatten(0, 1), targets[:, k:].reshape(-1), ignore_index=IGNORE, reduction="sum")
            for k, lg in enumerate([logits, *mtp_logits])
        ]
    )
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sums = model(inputs, mtp=True, targets=targets)
    sums.sum().backward()
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        if name in expected_grads:
            torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)
