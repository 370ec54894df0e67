"""lm-evaluation-harness, run for real (`nanoseek eval --lm-eval`, which runs `lm_eval` with its
local-completions model) against a real `nanoseek serve`: the harness's per-item log-likelihoods equal the
model's own, computed here with one forward pass, and its greedy replies equal the model's greedy decoding."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from serving import Server, make_model_dir

from nanoseek.checkpoint import from_pretrained

TASKS = Path(__file__).parent / "lm_eval_tasks"


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """As lm-eval asks it: the continuation's tokens are those of context + continuation after the
    context's, the sum of their log-probabilities."""
    whole, n = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
    with torch.no_grad():
        logprobs = model(torch.tensor([whole]))[0].log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n, len(whole)))


def greedy(model, tokenizer, context: str, max_tokens: int, until: str) -> str:
    ids = tokenizer.encode(context)
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            ids.append(token)
    return tokenizer.decode(ids[len(tokenizer.encode(context)) :]).split(until)[0]


def test_lm_eval_loglikelihoods_and_replies_equal_the_models_own(tmp_path, tokenizer):
    model_dir = make_model_dir(tmp_path / "model", tokenizer)
    with Server(model_dir, log=tmp_path / "server.log", env={"NANOSEEK_AUTO_DTYPE": "float32"}) as server:
        yamls = [str(TASKS / "nanoseek_mc.yaml"), str(TASKS / "nanoseek_gen.yaml")]
        cmd = [sys.executable, "-m", "nanoseek", "eval", "--lm-eval", *yamls]
        cmd += ["--url", server.url, "--output", str(tmp_path / "out")]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nanoseek_mc" in result.stdout and "acc" in result.stdout  # lm-eval's results table
    model = from_pretrained(model_dir, dtype=torch.float32, device="cpu").eval()
    [mc] = (tmp_path / "out").glob("*/samples_nanoseek_mc_*.jsonl")
    items = [json.loads(line) for line in mc.read_text().splitlines()]
    assert len(items) == 5
    for item in items:
        context = f"Question: {item['doc']['question']}\nAnswer:"
        for choice, (ll, _) in zip(item["doc"]["choices"], item["filtered_resps"], strict=True):
            assert abs(float(ll) - loglikelihood(model, tokenizer, context, " " + choice)) < 1e-4
    [gen] = (tmp_path / "out").glob("*/samples_nanoseek_gen_*.jsonl")
    for item in map(json.loads, gen.read_text().splitlines()):
        context = f"Q: {item['doc']['question']}\nA:"
        assert item["resps"][0][0] == greedy(model, tokenizer, context, 16, "\n")
