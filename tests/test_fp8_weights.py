"""FP8-resident weights (nanoseek.model.fp8_weights): projections and routed experts kept in E4M3 with
DeepSeek-V3's 128x128 block scales, dequantised at use on a CPU; logits against the dequantised model,
resident bytes, the engine, and the serving cost model's decode bound."""

import json
import subprocess
import sys

import pytest
import torch

from nanoseek import Engine, SamplingParams, Transformer, get_preset
from nanoseek.checkpoint import from_pretrained, save_pretrained
from nanoseek.fp8 import FP8
from nanoseek.model.fp8_weights import Fp8Weight, cast_except_fp8, make_fp8_resident, resident_bytes


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("fp8") / "model"
    save_pretrained(Transformer(get_preset("tiny")), out, fp8=True)  # DeepSeek-V3's FP8 format
    return out


def test_fp8_resident_logits_equal_the_dequantised_models(fp8_dir, tmp_path):
    """The dequantising path multiplies by exactly the dequantised weights: equal up to the order of fp32
    sums (the experts run one by one), so within 1e-5 of logits of order 1. The same from a higher-precision
    checkpoint quantised on load."""
    dense = from_pretrained(fp8_dir, dtype=torch.float32, weights="fp32")
    resident = from_pretrained(fp8_dir, dtype=torch.float32, weights="auto")  # an FP8 checkpoint stays FP8
    attn, experts = resident.layers[1].self_attn, resident.layers[1].mlp.experts
    assert isinstance(attn.kv_b_proj, Fp8Weight) and attn.kv_b_proj.weight.dtype == FP8
    assert experts.gate_up_proj.dtype == FP8 and experts.gate_up_proj_scale_inv.dtype == torch.float32
    assert resident.lm_head.weight.dtype == torch.float32 == resident.embed_tokens.weight.dtype  # as DeepSeek ships
    assert not isinstance(resident.mtp[0].eh_proj, Fp8Weight)
    ids = torch.randint(0, dense.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = dense(ids)
        torch.testing.assert_close(resident(ids), want, rtol=0, atol=1e-5)
    save_pretrained(dense, tmp_path / "dense")  # fp32 files holding the FP8 values: quantised on load
    requantised = from_pretrained(tmp_path / "dense", dtype=torch.float32, weights="fp8")
    with torch.no_grad():
        torch.testing.assert_close(requantised(ids), want, rtol=0, atol=1e-5)


def test_an_fp8_resident_engine_decodes_as_the_dequantised_one(fp8_dir):
    prompts = [list(range(3, 40)), [5] * 20]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    dense = Engine(fp8_dir, device="cpu", dtype=torch.float32, weights="fp32", enforce_eager=True)
    dense = dense.generate(prompts, params)
    resident = Engine(fp8_dir, device="cpu", dtype=torch.float32, weights="fp8")
    assert isinstance(resident.model.layers[0].self_attn.o_proj, Fp8Weight)
    assert resident.runner.captured  # batch-1 steps dequantise inside the captured graph's reductions
    assert [o.token_ids for o in resident.generate(prompts, params)] == [o.token_ids for o in dense]


def _bytes(preset: str, fp8: bool) -> int:
    with torch.device("meta"):  # no memory: shapes and dtypes only
        model = Transformer(get_preset(preset))
    if fp8:
        make_fp8_resident(model)
    return resident_bytes(cast_except_fp8(model, torch.bfloat16))


def test_resident_bytes_are_about_one_per_projection_parameter(fp8_dir):
    """E4M3 projections plus one fp32 scale per 128x128 block; embedding, head, router and norms in the
    compute dtype. DeepSeek-V3: 0.51x its bf16 bytes (its embedding and head are 1.4% of it). The `small`
    preset: 0.61x, as its 16k x 512 embedding and head are 21% of its parameters and stay bf16."""
    assert _bytes("v3-671b", fp8=True) <= 0.52 * _bytes("v3-671b", fp8=False)
    small = _bytes("small", fp8=True) / _bytes("small", fp8=False)
    assert 0.55 < small <= 0.62
    loaded = from_pretrained(fp8_dir, dtype=torch.bfloat16, weights="fp8")
    # The meta estimate is what a load holds (but the router's bias, which stays fp32 once on a device).
    assert resident_bytes(loaded) == pytest.approx(_bytes("tiny", fp8=True), rel=1e-4)


def test_cost_reports_weights_per_gpu_kv_tokens_and_a_decode_bound():
    flags = "--preset v3-671b --gpu h200 --gpus-per-node 8 --weights fp8 --context-len 4096 --json"
    cmd = [sys.executable, "-m", "nanoseek", "cost", *flags.split()]
    serving = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)["inference"]
    assert serving["weight_bytes_per_gpu"] == pytest.approx(serving["weight_bytes"] / 8)
    assert 680e9 < serving["weight_bytes"] < 690e9 and serving["kv_tokens_per_node"] > 6e6
    bounds = serving["decode_bound"]
    rates = [b["tokens_per_s"] for b in bounds]
    assert rates == sorted(rates) and bounds[0]["batch"] == 1
    # Batch 1 reads the activated weights once: about 37B parameters (plus MTP-free head) in FP8.
    assert 30e9 < bounds[0]["bytes_per_step"] < 45e9
    assert serving["deepseek_decode_tokens_per_h800_node"] == 14.8e3


def test_kv_a_proj_with_mqa_is_saved_loaded_and_kept_in_fp8_as_deepseek_ships_it(tmp_path):
    """DeepSeek-V3's FP8 checkpoint has kv_a_proj_with_mqa in F8_E4M3 with a [ceil(576/128), ceil(in/128)]
    scale: V3's 576 rows (512 latent + 64 RoPE) leave a partial last block of scales."""
    from safetensors import safe_open

    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(kv_lora_rank=512, qk_rope_head_dim=64)  # V3's 576 latent + RoPE rows
    model = Transformer(cfg)
    save_pretrained(model, tmp_path, fp8=True)
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    with safe_open(str(next(tmp_path.glob("*.safetensors"))), "pt") as f:
        weight, scale = f.get_tensor(key), f.get_tensor(key + "_scale_inv")
    assert weight.dtype == torch.float8_e4m3fn and tuple(weight.shape) == (576, cfg.hidden_size)
    assert tuple(scale.shape) == (5, 1)
    resident = from_pretrained(tmp_path, dtype=torch.float32, weights="auto")
    assert isinstance(resident.layers[0].self_attn.kv_a_proj_with_mqa, Fp8Weight)
    dense = from_pretrained(tmp_path, dtype=torch.float32, weights="fp32")
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(resident(ids), dense(ids), rtol=1e-4, atol=1e-4)
