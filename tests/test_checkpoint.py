"""Save/load round trips and the errors a wrong checkpoint gives."""

import json

import pytest
import torch
from hf_reference import make_hf_model, perturb_
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import CheckpointError, Transformer, get_preset, save_pretrained
from nanoseek.checkpoint import FINGERPRINT_FILE, weights_fingerprint


def _tiny_model(**changes) -> Transformer:
    cfg = get_preset("tiny").replace(vocab_size=300, num_hidden_layers=2, num_nextn_predict_layers=2, **changes)
    return perturb_(Transformer(cfg), seed=5).eval()


def test_round_trip_keeps_logits_and_mtp_logits(tmp_path):
    model = _tiny_model()
    save_pretrained(model, str(tmp_path))
    loaded = nanoseek.from_pretrained(tmp_path)
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        (a, mtp_a), (b, mtp_b) = model(x, mtp=True), loaded(x, mtp=True)
    assert torch.equal(a, b)
    assert len(mtp_b) == 2 and all(torch.equal(p, q) for p, q in zip(mtp_a, mtp_b, strict=True))
    assert loaded.embed_tokens.weight.dtype == torch.float32


def test_checkpoint_uses_deepseek_layout(tmp_path):
    model = _tiny_model()
    save_pretrained(model, str(tmp_path))
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    # MTP depth k lives at layer index num_hidden_layers + k - 1, with DeepSeek-V3's copies of embed and head
    for k in (2, 3):
        names = ("eh_proj.weight", "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.0.up_proj.weight")
        assert {f"model.layers.{k}.{name}" for name in names} <= keys
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == 2


def test_bf16_load_keeps_gate_bias_fp32(tmp_path):
    save_pretrained(_tiny_model(), str(tmp_path))
    model = nanoseek.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert model(torch.randint(0, 300, (1, 8))).dtype == torch.bfloat16


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    save_pretrained(_tiny_model(), str(tmp_path))
    _rewrite(tmp_path, lambda t: t.pop("model.layers.0.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.0\.self_attn\.kv_b_proj\.weight"):
        nanoseek.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    save_pretrained(_tiny_model(), str(tmp_path))
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mystery\.weight"):
        nanoseek.from_pretrained(tmp_path)


def test_misshaped_tensor_names_both_shapes(tmp_path):
    save_pretrained(_tiny_model(), str(tmp_path))
    _rewrite(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    expected = r"model\.norm\.weight: checkpoint shape \(7,\) but the model expects \(128,\)"
    with pytest.raises(CheckpointError, match=expected):
        nanoseek.from_pretrained(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    save_pretrained(_tiny_model(), str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        nanoseek.from_pretrained(tmp_path)


def test_missing_shard_is_reported(tmp_path):
    save_pretrained(_tiny_model(), str(tmp_path), max_shard_bytes=200_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        nanoseek.from_pretrained(tmp_path)


def test_transformers_checkpoint_without_mtp_weights_loads_without_mtp(tmp_path):
    make_hf_model(tmp_path, num_nextn_predict_layers=1)  # transformers saves no MTP layer
    with pytest.warns(UserWarning, match="no MTP weights"):
        model = nanoseek.from_pretrained(tmp_path)
    assert model.cfg.num_nextn_predict_layers == 0 and len(model.mtp) == 0


def test_not_a_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="Hugging Face model folder"):
        nanoseek.from_pretrained(tmp_path / "nope")


def test_a_truncated_weight_file_names_the_file_and_what_is_wrong(tmp_path):
    save_pretrained(_tiny_model(), str(tmp_path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        nanoseek.from_pretrained(tmp_path)


def test_the_fingerprint_covers_every_weight_byte_and_is_remembered(tmp_path):
    save_pretrained(_tiny_model(), str(tmp_path))
    healthy = weights_fingerprint(tmp_path)
    assert (tmp_path / FINGERPRINT_FILE).is_file() and weights_fingerprint(tmp_path) == healthy
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one weight byte, far past any strided sample
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(tmp_path) != healthy


def test_a_config_too_big_for_the_machine_is_refused_before_allocating(tmp_path):
    save_pretrained(_tiny_model(), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"hidden_size": 10**9}))
    with pytest.raises(CheckpointError, match=r"need about [\d,.]+ GiB .* GiB available: check config\.json"):
        nanoseek.from_pretrained(tmp_path)
