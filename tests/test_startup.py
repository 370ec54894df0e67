"""`nanoseek serve --model DIR` with a broken folder: a message that names what is wrong and a non-zero exit,
never a traceback or a process that grows until the machine kills it."""

import json
import os
import re
import resource
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from serving import free_port, make_model_dir

from nanoseek.tokenizer import load_tokenizer

NOT_TOKENIZERS = ["{not json", "[]", '{"model": 3}', "\xff\xfe"]


@pytest.mark.parametrize("text", NOT_TOKENIZERS)
def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path, text):
    (tmp_path / "tokenizer.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a tokenizer .*nanoseek tokenizer train"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", r"tokenizer_config\.json is not a JSON object"),
        ("{not json", r"tokenizer_config\.json is not a JSON object"),
        ('{"bos_token": 5}', r"tokenizer_config\.json: bos_token must be a string"),
    ],
)
def test_a_broken_tokenizer_config_is_named(tmp_path, tokenizer, text, message):
    tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_tokenizer(tmp_path)


def test_a_tokenizer_without_its_special_tokens_names_the_file(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: the tokenizer has no eos token '<\|nope\|>'"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, tokenizer):
    return make_model_dir(tmp_path_factory.mktemp("healthy") / "model", tokenizer)


def _copy(healthy, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    for f in healthy.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _edit_config(out, **changes):
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | changes))


def _edit_weight(out, key, change):
    tensors = load_file(out / "model.safetensors")
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def _nan(t):
    t.view(-1)[0] = float("nan")
    return t


def _limit_memory():
    """A failing start must not take the test machine with it (as 10**6 layers once grew without end)."""
    resource.setrlimit(resource.RLIMIT_AS, (16 * 2**30, 16 * 2**30))


BROKEN = {
    "too many layers": (
        lambda out: _edit_config(out, num_hidden_layers=10**6),
        r"need about [\d,.]+ GiB .* GiB available: check config\.json \(hidden_size 128, 1,000,000 layers",
    ),
    "float hidden_size": (
        lambda out: _edit_config(out, hidden_size=128.5),
        r"config\.json: hidden_size must be an integer, got 128\.5 \(a number\)",
    ),
    "string hidden_size": (
        lambda out: _edit_config(out, hidden_size="128"),
        r'config\.json: hidden_size must be an integer, got "128" \(a string\)',
    ),
    "garbage tokenizer": (
        lambda out: (out / "tokenizer.json").write_text("{not json"),
        r"tokenizer\.json is not a tokenizer .*nanoseek tokenizer train",
    ),
    "NaN weight": (
        lambda out: _edit_weight(out, "model.norm.weight", _nan),
        r"the checkpoint is corrupt \(1 tensors\):\n  model\.norm\.weight: 1 NaN value",
    ),
    "int32 weight": (
        lambda out: _edit_weight(out, "model.embed_tokens.weight", lambda t: t.to(torch.int32)),
        r"model\.embed_tokens\.weight: stored as I32",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_serve_refuses_a_broken_model_folder_with_a_message(healthy, tmp_path, case):
    breaks, message = BROKEN[case]
    out = _copy(healthy, tmp_path)
    breaks(out)
    cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(out), "--port", str(free_port())]
    # On the CPU: the checks do not depend on the device, and CUDA cannot start under an address-space limit.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "XDG_DATA_HOME": str(tmp_path)}
    done = subprocess.run(
        [*cmd, "--enforce-eager"], capture_output=True, text=True, timeout=120, env=env, preexec_fn=_limit_memory
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.startswith("nanoseek serve: error: "), done.stderr[-3000:]
    assert re.search(message, done.stderr), done.stderr[-3000:]
