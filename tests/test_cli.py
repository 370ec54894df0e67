"""The `nanoseek` console script, run as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek import Transformer, get_preset, model_stats, save_pretrained

pytestmark = pytest.mark.auto_dtype  # CI runs this module again with the other CPU kind's auto dtype

NANOSEEK = str(Path(sys.executable).parent / "nanoseek")  # the console script installed beside this Python


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NANOSEEK, *args], capture_output=True, text=True, timeout=120)


def test_info_json_for_v3_reports_the_paper_figures():
    result = run("info", "--preset", "v3-671b", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert {"params_total", "params_active", "params_mtp", "kv_bytes_per_token"} <= info.keys()
    assert round(info["params_total"] / 1e9) == 671 and round(info["params_active"] / 1e9) in (37, 38)


def test_info_reads_a_model_folder(tmp_path):
    save_pretrained(Transformer(get_preset("tiny")), str(tmp_path))
    result = run("info", "--model", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"{model_stats(get_preset('tiny')).params_total:,}" in result.stdout
    assert "MLA" in result.stdout and "MHA" in result.stdout


def test_info_on_a_missing_folder_is_a_clear_error(tmp_path):
    result = run("info", "--model", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "no config.json" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["info", "--help"]])
def test_help_explains_the_commands(args):
    result = run(*args)
    assert result.returncode == 0
    assert "usage: nanoseek" in result.stdout and ("--preset" in result.stdout or "info" in result.stdout)


def test_convert_to_fp8_and_back(tmp_path):
    import torch

    save_pretrained(Transformer(get_preset("tiny").replace(vocab_size=300)).to(torch.bfloat16), str(tmp_path / "bf16"))
    for source, to, target in (("bf16", "fp8", "fp8"), ("fp8", "bf16", "back")):
        result = run("convert", "--model", str(tmp_path / source), "--to", to, "--out", str(tmp_path / target))
        assert result.returncode == 0, result.stderr
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("bf16", "fp8", "back")}
    assert size["fp8"] < 0.75 * size["bf16"] and size["back"] == size["bf16"]
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())


def test_generate_and_chat_run_on_a_model_folder(tmp_path, tokenizer):
    save_pretrained(Transformer(get_preset("tiny").replace(vocab_size=tokenizer.vocab_size)), str(tmp_path))
    tokenizer.save(tmp_path)
    args = ["--model", str(tmp_path), "--max-tokens", "6", "--temperature", "0"]
    result = run("generate", *args, "--prompt", "def add(a, b):", "--no-stream")  # captured, the default
    assert result.returncode == 0, result.stderr
    assert "captured in" in result.stderr  # the compile time, said once
    streamed = run("generate", *args, "--prompt", "def add(a, b):", "--enforce-eager")
    assert streamed.stdout == result.stdout
    chat = subprocess.run(
        [NANOSEEK, "chat", *args, "--enforce-eager"],
        input="hello\nhow are you?\n\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant> ") == 2


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        (["serve"], "--cache-dir"),
        (["sft"], "--data"),
        (["distill"], "--teacher"),
        (["grpo"], "--epsilon-high"),
        (["eval"], "pass@k"),
        (["cost"], "--v3-report"),
        (["speedrun"], "--serve"),
        (["task", "write"], "--solutions"),
        (["ledger"], "--csv"),
    ],
)
def test_every_command_has_help(command, mentions, capsys):
    from nanoseek.cli import main

    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0 and mentions in capsys.readouterr().out


@pytest.mark.parametrize(
    "command", [["info"], ["--help"], ["serve", "--help"], ["train", "--help"], ["grpo", "--help"]]
)
def test_info_and_help_import_no_server_trainer_or_grpo(command):
    """Building the CLI reads the settings from light modules: `nanoseek info` and any --help stay quick."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nanoseek", *command], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"fastapi", "uvicorn", "nanoseek.train.trainer", "nanoseek.rl.grpo", "nanoseek.serve.api"}
