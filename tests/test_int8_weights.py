"""Weight-only int8 (nanoseek.model.int8_weights, `--weights int8`): the rounding bound, logits against the plain
model holding the dequantised weights, the engine's captured steps (fused and dequantised products) against its
eager ones, and what the weights hold."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from nanoseek import Engine, SamplingParams, Transformer, get_preset
from nanoseek.checkpoint import from_pretrained, save_pretrained
from nanoseek.model.fp8_weights import resident_bytes
from nanoseek.model.int8_weights import FUSED_ROWS, Int8Linear, dequantize_rows, fused_product, quantize_rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("int8") / "model"
    save_pretrained(Transformer(get_preset("tiny")), out)
    return out


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 70), seed=st.integers(0, 2**16), zero_row=st.booleans())
def test_a_quantised_weight_is_within_half_its_rows_scale(rows, cols, seed, zero_row):
    """Round to nearest on a grid of absmax / 127: every weight within half a step, each row's largest weight
    exact, an all-zero row zero (not NaN)."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 10 ** (seed % 5 - 2)
    if zero_row:
        w[0] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (rows,) and q.abs().max() <= 127
    back = dequantize_rows(q, scale)
    assert ((back - w).abs() <= scale[:, None] / 2 * (1 + 1e-6) + 1e-30).all()
    largest = w.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(back.gather(1, largest).abs(), w.gather(1, largest).abs(), rtol=1e-6, atol=0)
    assert torch.isfinite(back).all()


def test_the_fused_product_is_the_product_with_the_dequantised_weight():
    """The multiply-and-sum a captured step compiles computes x @ (q * scale).T (here eagerly, and compiled)."""
    g = torch.Generator().manual_seed(0)
    q, scale = quantize_rows(torch.randn(96, 64, generator=g))
    for x in (torch.randn(1, 64, generator=g), torch.randn(2, 3, 64, generator=g)):
        want = x @ dequantize_rows(q, scale).T
        torch.testing.assert_close(fused_product(x, q, scale), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.compile(fused_product)(x, q, scale), want, rtol=1e-5, atol=1e-5)


def test_int8_logits_equal_the_plain_model_holding_the_dequantised_weights(model_dir):
    """Every projection, the head, MTP's eh_proj and the routed experts int8; the model computes with exactly the
    dequantised values (logits within 1e-5); the router and embeddings untouched; a quarter of the bytes."""
    int8 = from_pretrained(model_dir, dtype=torch.float32, weights="int8")
    plain = from_pretrained(model_dir, dtype=torch.float32, weights="fp32")
    attn, experts = int8.layers[1].self_attn, int8.layers[1].mlp.experts
    assert all(isinstance(m, Int8Linear) for m in (attn.kv_b_proj, attn.o_proj, int8.lm_head, int8.mtp[0].eh_proj))
    assert experts.gate_up_proj.dtype == torch.int8 and experts.down_proj_scale.dtype == torch.float32
    assert int8.layers[1].mlp.gate.weight.dtype == torch.float32 == int8.embed_tokens.weight.dtype
    with torch.no_grad():  # the plain model given the dequantised values
        for name, module in int8.named_modules():
            if isinstance(module, Int8Linear):
                plain.get_submodule(name).weight.copy_(module.dequantized(torch.float32))
            elif getattr(module, "quantized", None) == "int8":
                gate_up, down = module.expert_weights(slice(None), torch.float32)
                plain.get_submodule(name).gate_up_proj.copy_(gate_up)
                plain.get_submodule(name).down_proj.copy_(down)
    ids = torch.randint(0, plain.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(int8(ids), plain(ids), rtol=0, atol=1e-5)
    embeddings = plain.embed_tokens.weight.nbytes
    assert resident_bytes(int8) - embeddings < (resident_bytes(plain) - embeddings) / 3.5


def test_an_int8_engine_decodes_the_tokens_of_its_eager_self_at_batch_one_and_many(model_dir):
    """Captured: one row and a few fuse the int8 conversion into the products; more rows than FUSED_ROWS take
    the dequantised matrices; the greedy tokens of the eager engine at every batch."""
    prompts = [list(range(3 + i, 30 + i)) for i in range(FUSED_ROWS + 2)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    eager = Engine(model_dir, device="cpu", dtype=torch.float32, weights="int8", enforce_eager=True)
    captured = Engine(model_dir, device="cpu", dtype=torch.float32, weights="int8")
    assert captured.runner.captured and not captured.packed
    for batch in (prompts[:1], prompts[:3], prompts):
        want = [o.token_ids for o in eager.generate(batch, params)]
        assert [o.token_ids for o in captured.generate(batch, params)] == want
