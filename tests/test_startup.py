"""`nanoseek serve --model DIR` with a broken folder: a message that names what is wrong and a non-zero exit,
never a traceback or a process that grows until the machine kills it."""

import ctypes
import errno
import json
import os
import re
import resource
import sqlite3
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


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE = 24, 1


def _as_an_ordinary_user():
    """Root writes into read-only files and folders (CAP_DAC_OVERRIDE): the child drops that power before it
    execs, so that a read-only ledger is read-only to it as to any other user (nothing to drop for them)."""
    if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "cannot drop CAP_DAC_OVERRIDE")


def _read_only_file(ledger):
    ledger.chmod(0o444)


def _read_only_folder(ledger):
    ledger.parent.chmod(0o555)  # the file is writable, but SQLite cannot create its -wal and -shm beside it


def _read_only_empty_folder(ledger):
    for f in ledger.parent.iterdir():
        f.unlink()
    ledger.parent.chmod(0o555)  # no ledger yet, and none can be created


READ_ONLY = {"read-only file": _read_only_file, "read-only folder": _read_only_folder}
READ_ONLY_SERVE = READ_ONLY | {"read-only empty folder": _read_only_empty_folder}


@pytest.fixture
def read_only_ledger(tmp_path):
    """A ledger (written by a server before) in a folder of its own, which a case makes read-only."""
    from nanoseek.serve.ledger import Ledger

    ledger = tmp_path / "billing" / "ledger.db"
    Ledger(ledger).close()
    db = sqlite3.connect(ledger)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row in the file: its -wal and -shm can go
    db.close()
    for name in ("ledger.db-wal", "ledger.db-shm"):
        ledger.with_name(name).unlink(missing_ok=True)
    if os.geteuid() == 0:  # can this root give up its power over file modes?
        ledger.chmod(0o444)
        append = [sys.executable, "-c", "import sys; open(sys.argv[1], 'a')", str(ledger)]
        try:
            wrote = subprocess.run(append, capture_output=True, preexec_fn=_as_an_ordinary_user).returncode == 0
        except subprocess.SubprocessError:  # no CAP_SETPCAP to drop it with
            wrote = True
        ledger.chmod(0o600)
        if wrote:
            pytest.skip("this root cannot give up writing into read-only files")
    yield ledger
    ledger.parent.chmod(0o755)


def _refused(done: subprocess.CompletedProcess, command: str, ledger) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.startswith(f"nanoseek {command}: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert str(ledger) in done.stderr and "not a nanoseek ledger" not in done.stderr, done.stderr
    assert re.search(r"cannot be written .* make it and its folder writable .* --ledger", done.stderr), done.stderr
    return done.stderr


@pytest.mark.parametrize("case", list(READ_ONLY_SERVE))
def test_serve_refuses_a_read_only_ledger_naming_the_file_and_what_to_do(healthy, read_only_ledger, case):
    READ_ONLY_SERVE[case](read_only_ledger)
    cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(healthy), "--port", str(free_port())]
    cmd += ["--ledger", str(read_only_ledger), "--enforce-eager"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, preexec_fn=_as_an_ordinary_user)
    _refused(done, "serve", read_only_ledger)


@pytest.mark.parametrize("case", list(READ_ONLY))
def test_the_ledger_command_refuses_a_read_only_ledger_naming_the_file_and_what_to_do(read_only_ledger, case):
    READ_ONLY[case](read_only_ledger)
    cmd = [sys.executable, "-m", "nanoseek", "ledger", "--ledger", str(read_only_ledger)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=_as_an_ordinary_user)
    _refused(done, "ledger", read_only_ledger)


def test_a_ledger_on_a_read_only_file_system_is_named(tmp_path, monkeypatch, capsys):
    """EROFS (a disk mounted read-only), which no test can mount: os.open says so, as the kernel would."""
    from nanoseek.cli import main
    from nanoseek.serve.ledger import Ledger

    ledger = tmp_path / "ledger.db"
    Ledger(ledger).close()
    real_open = os.open

    def read_only_disk(path, flags, *args, **kwargs):
        if str(path) == str(ledger) and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_disk)
    assert main(["ledger", "--ledger", str(ledger)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek ledger: error: ") and str(ledger) in err and "Read-only file system" in err, err
