"""Save/load round trips and the errors a wrong checkpoint gives."""

import json
import os

import pytest
import torch
from hf_reference import make_hf_model, perturb_
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import CheckpointError, Transformer, checkpoint, get_preset, save_pretrained
from nanoseek.checkpoint import FINGERPRINT_FILE, weights_fingerprint
from nanoseek.model.fp8_weights import cast_except_fp8, make_fp8_resident, resident_bytes


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


def test_a_config_too_big_for_the_machine_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """A typo'd num_hidden_layers is refused from the config's arithmetic alone: building even a meta-device
    model of 10**6 layers grows memory for minutes, and a loop over 10**12 layers never ends."""
    save_pretrained(_tiny_model(), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps(config | {"num_hidden_layers": 10**12, "num_nextn_predict_layers": 0})
    )

    def build(cfg):
        raise AssertionError("the model was built before the memory check")

    monkeypatch.setattr(checkpoint, "Transformer", build)
    message = r"need about [\d,.]+ GiB in torch.float32 and cpu has [\d,.]+ GiB available: check config\.json"
    with pytest.raises(CheckpointError, match=message) as e:
        nanoseek.from_pretrained(tmp_path)
    assert "1,000,000,000,000 layers" in str(e.value) and "--weights fp8" in str(e.value)


def test_the_estimate_is_a_lower_bound_on_the_weights_bytes():
    for cfg, experts_only in [(get_preset("tiny"), False), (get_preset("small"), True), (_tiny_model().cfg, False)]:
        for dtype, fp8 in [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]:
            with torch.device("meta"):
                model = Transformer(cfg)
            if fp8:
                make_fp8_resident(model)
            cast_except_fp8(model, dtype)
            held = [m for m in model.modules() if hasattr(m, "keep_experts")] if experts_only else [model]
            exact = sum(resident_bytes(m) for m in held)
            estimate = checkpoint.estimate_weight_bytes(cfg, dtype, fp8=fp8, experts_only=experts_only)
            assert 0.7 * exact < estimate <= exact, (cfg.hidden_size, dtype, fp8, experts_only)


def test_the_fingerprint_changes_when_bytes_change_and_the_mtime_is_restored(tmp_path):
    """The red team's case: bytes flipped in place (same size, same inode), then os.utime puts the old
    atime and mtime back. Only ctime, which no user call can set, tells."""
    save_pretrained(_tiny_model(), str(tmp_path))
    weights = tmp_path / "model.safetensors"
    healthy = weights_fingerprint(tmp_path)
    before = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(before.st_size - 5)
        byte = f.read(1)
        f.seek(before.st_size - 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert weights_fingerprint(tmp_path) != healthy


def test_a_remembered_fingerprint_is_used_only_for_files_older_than_it(tmp_path, monkeypatch):
    """A file changed within the filesystem clock's tick of its last change keeps its ctime: the fingerprint
    file trusts only files changed well before it was written (git's "racily clean" rule)."""
    save_pretrained(_tiny_model(), str(tmp_path))
    first = weights_fingerprint(tmp_path)
    newest = max(f.stat().st_ctime_ns for f in tmp_path.iterdir() if f.name != FINGERPRINT_FILE)
    hashed = []
    real = checkpoint._hash_files
    monkeypatch.setattr(checkpoint, "_hash_files", lambda files: hashed.append(1) or real(files))
    for age_s, trusted in [(0.001, False), (10.0, True)]:  # remembered 1 ms / 10 s after the newest change
        saved = json.loads((tmp_path / FINGERPRINT_FILE).read_text())
        (tmp_path / FINGERPRINT_FILE).write_text(json.dumps(saved | {"written_ns": newest + int(age_s * 1e9)}))
        hashed.clear()
        assert weights_fingerprint(tmp_path) == first
        assert bool(hashed) != trusted, age_s


def _corrupt(tmp_path, **values):
    """A saved tiny model whose named tensors are replaced: key suffix -> a function of the old tensor."""
    save_pretrained(_tiny_model(), str(tmp_path))

    def edit(tensors):
        for key in tensors:
            for suffix, change in values.items():
                if key == suffix.replace("__", "."):
                    tensors[key] = change(tensors[key])

    _rewrite(tmp_path, edit)


def _with(value):
    def change(t):
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t

    return change


def test_non_finite_weights_are_refused_by_name(tmp_path):
    _corrupt(
        tmp_path,
        model__norm__weight=_with(float("nan")),
        model__layers__1__mlp__experts__3__down_proj__weight=_with(float("-inf")),
    )
    with pytest.raises(CheckpointError, match="corrupt") as e:
        nanoseek.from_pretrained(tmp_path)
    assert "model.norm.weight: 1 NaN value" in str(e.value)
    assert "model.layers.1.mlp.experts.3.down_proj.weight: 1 infinite value" in str(e.value)


def test_integer_weights_are_refused_by_name(tmp_path):
    _corrupt(tmp_path, model__layers__0__self_attn__o_proj__weight=lambda t: t.to(torch.int32))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight: stored as I32"):
        nanoseek.from_pretrained(tmp_path)


@pytest.mark.parametrize("weights", [None, "fp8"])
def test_nan_in_fp8_weights_or_scales_is_refused(tmp_path, weights):
    save_pretrained(_tiny_model(), str(tmp_path), fp8=True)
    weight = "model.layers.0.self_attn.o_proj.weight"

    def edit(tensors):
        tensors[weight] = tensors[weight].clone()
        tensors[weight].view(torch.uint8).view(-1)[7] = 0x7F  # E4M3's NaN
        scale = tensors[weight + "_scale_inv"] = tensors[weight + "_scale_inv"].clone()
        scale.view(-1)[0] = float("inf")

    _rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError, match="corrupt") as e:
        nanoseek.from_pretrained(tmp_path, weights=weights)
    assert f"{weight}: 1 NaN value" in str(e.value) and f"{weight}_scale_inv: 1 infinite value" in str(e.value)


def test_an_fp8_block_scale_is_refused(tmp_path):
    save_pretrained(_tiny_model(), str(tmp_path), fp8=True)
    key = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    _rewrite(tmp_path, lambda t: t.update({key: t[key].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match=rf"{key}: stored as F8_E4M3"):
        nanoseek.from_pretrained(tmp_path)
