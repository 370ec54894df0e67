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
    train = [NANOSEEK, "train", "--preset", "tiny", "--steps", "12", "--batch-size", "4", "--seq-len", "128",
             "--eval-every", "6", "--save-every", "6", "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    result = subprocess.run(train, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 12 and metrics[-1]["lm_loss"] < metrics[0]["lm_loss"]
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())
    gen = [NANOSEEK, "generate", "--model", str(tmp_path / "run" / "model"), "--prompt", "def ",
           "--max-tokens", "16", "--seed", "0"]  # fmt: skip
    result = subprocess.run(gen, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]
