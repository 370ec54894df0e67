"""FP8 with DeepSeek-V3's fine-grained scaling: quantisation bounds, the three GEMMs, memory, checkpoints.

Error bounds used below. E4M3 keeps 3 mantissa bits, so rounding a normal value costs at most
u = 2^-4 of it; below the smallest normal the spacing is 2^-9, so at most 2^-10 absolute. A tile or block
is first divided by s = amax / 448, so each element v comes back with |v' - v| <= u|v| + 2^-10 s.
A product of two such operands then errs by at most e_a|b| + |a|e_b + e_a e_b, summed over K (FP32
accumulation adds ~K * 2^-24 relative, negligible here). Wgrad re-quantizes the saved (already 1x128
quantized) activation in 128x1 tiles, so its error is the second rounding on top of the first.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoseek
from nanoseek import Transformer, get_preset, save_pretrained
from nanoseek.fp8 import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    convert_to_fp8,
    dequantize_blocks,
    dequantize_tiles,
    fake_quantize_group_tiles,
    fake_quantize_tiles,
    fp8_linear,
    quantize_blocks,
    quantize_tiles,
)

U, SUB = 2.0**-4, 2.0**-10


def tile_bound(x: torch.Tensor) -> torch.Tensor:
    """Per-element error bound of 1x128-tile quantisation along the last dim."""
    k = x.shape[-1]
    pad = (-k) % 128
    amax = torch.nn.functional.pad(x.abs(), (0, pad)).unflatten(-1, (-1, 128)).amax(-1)
    s = (amax / FP8_MAX).repeat_interleave(128, dim=-1)[..., :k]
    return U * x.abs() + SUB * s


def block_bound(w: torch.Tensor) -> torch.Tensor:
    _, s = quantize_blocks(w)
    s = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
    return U * w.abs() + SUB * s


def product_bound(ea, a, eb, b):
    """Bound on |a'b'^T - ab^T| given elementwise bounds ea on a' - a, eb on b' - b."""
    return ea @ b.abs().T + a.abs() @ eb.T + ea @ eb.T


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 300), log_scale=st.floats(-8, 8))
def test_tile_quantisation_error_is_within_the_e4m3_bound(rows, cols, log_scale):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols)) * 10**log_scale
    q, s = quantize_tiles(x)
    assert q.dtype == FP8 and q.shape == (rows, -(-cols // 128) * 128) and s.shape == (rows, -(-cols // 128))
    err = (dequantize_tiles(q, s, cols) - x).abs()
    assert (err <= tile_bound(x) * (1 + 1e-6)).all()


@pytest.mark.parametrize(("n", "k"), [(128, 128), (130, 200), (1, 1), (257, 129)])
def test_block_scales_have_deepseek_shapes_for_ragged_dims(n, k):
    w = torch.randn(n, k)
    q, s = quantize_blocks(w)
    assert q.shape == (n, k) and s.shape == (-(-n // 128), -(-k // 128)) and s.dtype == torch.float32
    assert ((dequantize_blocks(q, s) - w).abs() <= block_bound(w) * (1 + 1e-6)).all()


def test_values_saturate_at_448_instead_of_overflowing():
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1] = 1e30, 1.0
    q, s = quantize_tiles(x)
    assert q.float().abs().max() == FP8_MAX and torch.isfinite(q.float()).all()
    back = dequantize_tiles(q, s)
    assert back[0, 0] == pytest.approx(1e30, rel=U) and torch.isfinite(back).all()


def test_fp8_linear_forward_and_gradients_stay_within_derived_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(67, 200, generator=g, requires_grad=True)
    w = torch.randn(130, 200, generator=g, requires_grad=True)
    grad = torch.randn(67, 130, generator=g)
    y = fp8_linear(x, w)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    xd, wd = x.detach(), w.detach()

    # Fprop: x in 1x128 tiles, W in 128x128 blocks
    assert ((y - xd @ wd.T).abs() <= product_bound(tile_bound(xd), xd, block_bound(wd), wd) * 1.001 + 1e-6).all()
    # Dgrad: dy in 1x128 tiles along N, the same W blocks
    bound = product_bound(tile_bound(grad), grad, block_bound(wd).T, wd.T)
    assert ((gx - grad @ wd).abs() <= bound * 1.001 + 1e-6).all()
    # Wgrad: dy^T and x re-quantized in 128x1 tiles along the tokens
    x1 = dequantize_tiles(*quantize_tiles(xd), 200)
    e_x = tile_bound(xd) + tile_bound(x1.T).T
    bound = product_bound(tile_bound(grad.T), grad.T, e_x.T, xd.T)
    assert ((gw - grad.T @ xd).abs() <= bound * 1.001 + 1e-6).all()
    # ... and the bounds are not vacuous: the typical relative error is a few percent
    assert 0.005 < ((gw - grad.T @ xd).norm() / (grad.T @ xd).norm()).item() < 0.1


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_saved_activations_take_half_the_memory_of_bf16():
    linear = torch.nn.Linear(512, 256, bias=False)
    x = torch.randn(64, 512, dtype=torch.bfloat16, requires_grad=True)
    bf16 = _saved_bytes(lambda: torch.nn.functional.linear(x, linear.weight.bfloat16()))
    fp8 = _saved_bytes(lambda: Fp8Linear.from_linear(linear)(x))
    assert bf16 >= 64 * 512 * 2
    assert fp8 <= 0.52 * (64 * 512 * 2)  # 1 byte per value + one fp32 scale per 128


def test_convert_to_fp8_keeps_parameters_and_skips_head_gate_and_embedding():
    model = Transformer(get_preset("tiny"))
    before = {n: p for n, p in model.named_parameters()}
    convert_to_fp8(model)
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert all(p is before[n] for n, p in model.named_parameters())  # shared, not copied
    assert isinstance(model.layers[0].self_attn.kv_b_proj, Fp8Linear)
    assert isinstance(model.layers[1].mlp.shared_experts.down_proj, Fp8Linear)
    assert model.layers[1].mlp.experts.fp8
    assert type(model.lm_head) is torch.nn.Linear


def test_fp8_model_trains_with_gradients_close_to_bf16_math():
    cfg = get_preset("tiny").replace(vocab_size=300, num_hidden_layers=2, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    fp8 = convert_to_fp8(Transformer(cfg))
    fp8.load_state_dict(ref.state_dict())
    x = torch.randint(0, 300, (2, 64))
    grads = []
    for m in (ref, fp8):
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.99


def test_fp8_checkpoint_round_trip_is_deepseek_format_and_close_to_bf16(tmp_path):
    from safetensors import safe_open

    model = Transformer(get_preset("tiny").replace(vocab_size=300)).to(torch.bfloat16)
    save_pretrained(model, str(tmp_path / "bf16"))
    save_pretrained(model, str(tmp_path / "fp8"), fp8=True)
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight")
        s = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight_scale_inv")
        assert w.dtype == FP8 and s.shape == (1, 1) and s.dtype == torch.float32
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    import json

    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["fmt"] == "e4m3"
    x = torch.randint(0, 300, (2, 32))
    a = nanoseek.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    b = nanoseek.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    with torch.no_grad():
        la, lb = a(x), b(x)
    # Each matrix comes back within ~3% (relative L2, see the bound above); through 4 blocks of random,
    # untrained weights the logits drift by ~10%, in the same direction.
    assert (la - lb).norm() < 0.15 * la.norm()
    assert torch.nn.functional.cosine_similarity(la.flatten(), lb.flatten(), dim=0) > 0.99
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("bf16", "fp8")}
    assert size["fp8"] < 0.8 * size["bf16"]


def test_fp8_checkpoint_with_a_wrong_scale_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_pretrained(Transformer(get_preset("tiny").replace(vocab_size=300)), str(tmp_path), fp8=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(2, 2)
    del tensors["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(nanoseek.CheckpointError) as e:
        nanoseek.from_pretrained(tmp_path)
    assert "o_proj.weight_scale_inv: checkpoint shape (2, 2)" in str(e.value)
    assert "missing tensor model.layers.0.mlp.up_proj.weight_scale_inv" in str(e.value)


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="this torch has no _scaled_mm")
def test_the_scaled_mm_path_agrees_with_the_emulation():
    """The CUDA path (one FP8 _scaled_mm per 128-wide K block, FP32 promotion), run through torch's CPU kernel."""
    from nanoseek.fp8 import _scaled_mm_blockwise, fp8_gemm

    g = torch.Generator().manual_seed(0)
    aq, a_scale = quantize_tiles(torch.randn(37, 300, generator=g))  # M not a multiple of 16, K padded
    bq, b_scale = quantize_tiles(torch.randn(48, 300, generator=g))
    try:
        fast = _scaled_mm_blockwise(aq, a_scale, bq, b_scale)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no FP8 _scaled_mm on this CPU: {e}")
    torch.testing.assert_close(fast, fp8_gemm(aq, a_scale, bq, b_scale), rtol=1e-5, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_group_tiles_quantize_each_groups_tokens_as_a_call_per_group_would(sizes, seed):
    """The grouped Wgrad's 128x1 tiles along each expert's tokens, for every expert at once."""
    x = torch.randn(sum(sizes), 6, generator=torch.Generator().manual_seed(seed)) * 10
    per_group = [fake_quantize_tiles(rows.t()).t() for rows in x.split(sizes)]
    torch.testing.assert_close(fake_quantize_group_tiles(x, sizes), torch.cat(per_group), rtol=0, atol=0)
