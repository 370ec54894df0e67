"""End to end on the embedded default corpus, as a newcomer runs it (slow: `pytest -m slow`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serving import Server

from nanoseek.rl import calculator
from nanoseek.rl.tasks import get_task

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
    stages = ("data", "pretrain", "fp8", "sft", "distill", "grpo", "tools", "inference", "report")
    assert all(report["stages"][s]["seconds"] >= 0 for s in stages)
    grpo = report["stages"]["grpo"]
    assert 0 <= grpo["pass_at_1_before"] <= 1 and 0 <= grpo["pass_at_1_after"] <= 1
    assert report["model_card"]["params_active"] < report["model_card"]["params_total"]
    assert report["cost"]["gpu_hours"] > 0 and len(report["plots"]) == 7
    assert all((out / p).is_file() for p in report["plots"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7 and "<table>" in html  # self-contained
    tools = report["stages"]["tools"]  # agentic RL: pass@1 with the calculator and without, on the same problems
    for key in ("pass_at_1_with_tools", "pass_at_1_without_tools", "pass_at_1_sft_with_tools"):
        assert 0 <= tools[key] <= 1
    rollouts = [json.loads(x) for x in (out / "tools" / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 4 * 8 and {"calls", "transcript", "reward"} <= set(rollouts[0])
    assert "with a calculator" in (out / "report.md").read_text()
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


@pytest.fixture(scope="module")
def speedrun_dir(tmp_path_factory) -> Path:
    """A finished tiny speedrun: NANOSEEK_SPEEDRUN=DIR reuses one, else one is run (about 12 minutes here)."""
    if given := os.environ.get("NANOSEEK_SPEEDRUN"):
        return Path(given)
    out = tmp_path_factory.mktemp("speedrun") / "run"
    result = subprocess.run([NANOSEEK, "speedrun", "--out", str(out)], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_tool_trained_model_answers_a_real_openai_clients_tool_loop(speedrun_dir):
    """The speedrun's tools model behind `nanoseek serve`: the client offers the calculator, runs each call the
    model makes, sends the result back as a tool message and reads the answer (greedy, 8 held-out problems)."""
    from openai import OpenAI

    task = get_task("multiply")
    right = 0
    with Server(speedrun_dir / "tools" / "grpo" / "model") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for problem in task.problems("test", 8):
            messages = problem.messages()
            ask = {"model": "nanoseek", "tools": [calculator.TOOL], "temperature": 0, "max_tokens": 64}
            first = client.chat.completions.create(messages=messages, **ask).choices[0]
            assert first.finish_reason == "tool_calls" and first.message.tool_calls
            calls = [c.model_dump() for c in first.message.tool_calls]
            messages.append({"role": "assistant", "content": first.message.content or "", "tool_calls": calls})
            for call in first.message.tool_calls:
                result = calculator.call(json.loads(call.function.arguments))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
            final = client.chat.completions.create(messages=messages, **ask).choices[0]
            assert final.finish_reason == "stop" and not final.message.tool_calls
            right += task.verify(problem, final.message.content) == 1.0
    assert right >= 6, f"{right} of 8 right"
