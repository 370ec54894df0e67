"""End to end on the embedded default corpus, as a newcomer runs it (slow: `pytest -m slow`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NANOSEEK = str(Path(sys.executable).parent / "nanoseek")


@pytest.mark.slow
def test_train_on_the_stdlib_then_generate(tmp_path):
    env = {**os.environ, "NANOSEEK_CACHE": str(tmp_path / "cache")}  # builds tokenizer and shards afresh
    flags = "--preset tiny --steps 12 --batch-size 4 --seq-len 128 --eval-every 6 --save-every 6 --no-progress"
    train = [NANOSEEK, "train", *flags.split(), "--out", str(tmp_path / "run")]
    result = subprocess.run(train, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 12 and metrics[-1]["lm_loss"] < metrics[0]["lm_loss"]
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())
    gen = [NANOSEEK, "generate", "--model", str(tmp_path / "run" / "model"), "--prompt", "def "]
    gen += ["--max-tokens", "16", "--seed", "0"]
    result = subprocess.run(gen, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]


@pytest.mark.slow
def test_a_shortened_speedrun_writes_the_report_card_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "speedrun"
    cmd = [NANOSEEK, "speedrun", "--plan", "quick", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    stages = ("data", "pretrain", "fp8", "sft", "distill", "grpo", "inference", "report")
    assert all(report["stages"][s]["seconds"] >= 0 for s in stages)
    grpo = report["stages"]["grpo"]
    assert 0 <= grpo["pass_at_1_before"] <= 1 and 0 <= grpo["pass_at_1_after"] <= 1
    assert report["model_card"]["params_active"] < report["model_card"]["params_total"]
    assert report["cost"]["gpu_hours"] > 0 and len(report["plots"]) == 6
    assert all((out / p).is_file() for p in report["plots"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "<table>" in html  # self-contained
    assert "held-out pass@1" in (out / "report.md").read_text()
    inference = report["stages"]["inference"]  # decode against the CPU's read bandwidth
    assert inference["read_gb_per_s"] > 0 and all(0 < f < 1 for f in inference["roofline_fraction"].values())
    assert "GB/s roofline" in (out / "report.md").read_text()
    assert "expert load max/mean at the end layers.1" in (out / "report.md").read_text()
    header = report["header"]  # reproducible: the commit, the machine, the software, the command
    assert header["command"].endswith("speedrun --plan quick --out " + str(out)) and header["torch"]
    assert f"Commit `{header['commit'][:12]}`" in (out / "report.md").read_text()
    # A killed GRPO stage: its result goes, its checkpoints stay; a rerun redoes only that stage, resuming.
    finished = {s: (out / s / "result.json").stat().st_mtime for s in stages[:-1]}
    (out / "grpo" / "result.json").unlink()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    again = {s: (out / s / "result.json").stat().st_mtime for s in stages[:-1]}
    assert [s for s in stages[:-1] if again[s] != finished.get(s)] == ["grpo"]
    assert json.loads((out / "report.json").read_text())["stages"]["grpo"]["pass_at_1_after"] == grpo["pass_at_1_after"]
