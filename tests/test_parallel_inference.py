"""Model-parallel inference (nanoseek.serve.parallel), for real: `torchrun` processes on gloo, the routed
experts split over the ranks, against one process on the same checkpoint: greedy tokens identical,
log-probabilities within 1e-5 (fp32), each rank holding its share of the experts, and a torchrun-launched
`nanoseek serve` that answers the openai client as a lone server does."""

import json
import os
import subprocess
import sys
import time

import httpx
import openai
from serving import Server, free_port, make_model_dir

SCRIPT = """
import json, sys, torch
from nanoseek import Engine, SamplingParams
from nanoseek.model.fp8_weights import resident_bytes
from nanoseek.serve import parallel
folder, weights, drafts = sys.argv[1], sys.argv[2], int(sys.argv[3])
ranks = parallel.from_env()
if ranks is not None and ranks.rank > 0:
    dtype = parallel.share_dtype(ranks, None)
    from nanoseek.checkpoint import from_pretrained
    model = from_pretrained(folder, dtype=dtype, weights=weights, expert_shard=(ranks.rank, ranks.world),
                            experts_only=True)
    held = sum(resident_bytes(m) for m in parallel.expert_modules(model))
    print(json.dumps({"rank": ranks.rank, "resident": held}), flush=True)
    parallel.serve_experts(model, ranks, dtype)
else:
    engine = Engine(folder, device="cpu", dtype=torch.float32, weights=weights, cache_memory_mb=16,
                    speculative_tokens=drafts, model_parallel=True)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=None if drafts else 5)
    outs = engine.generate([list(range(3, 40)), [7] * 20, list(range(100, 164))], params)
    experts = sum(m.gate_up_proj.numel() * m.gate_up_proj.element_size() + m.down_proj.numel()
                  * m.down_proj.element_size() for m in parallel.expert_modules(engine.model))
    print(json.dumps({"rank": 0, "tokens": [o.token_ids for o in outs], "resident": resident_bytes(engine.model),
                      "experts": experts, "drafted": engine.metrics.drafted_tokens,
                      "logprobs": [[lp for lp, _ in o.logprobs] for o in outs],
                      "top": [[sorted(alt.values()) for _, alt in o.logprobs] for o in outs]}), flush=True)
    engine.close()
"""
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NANOSEEK_AUTO_DTYPE": "float32"}


def run(folder, weights: str, ranks: int, drafts: int = 0) -> dict[int, dict]:
    args = ["-c", SCRIPT, str(folder), weights, str(drafts)]
    cmd = [sys.executable, *args] if ranks == 1 else [*TORCHRUN, str(ranks), "--no-python", sys.executable, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {row["rank"]: row for row in rows}


def test_two_ranks_decode_as_one_process_with_half_the_experts_each(tmp_path, tokenizer):
    folder = make_model_dir(tmp_path / "model", tokenizer)
    alone, split = run(folder, "fp32", 1)[0], run(folder, "fp32", 2)
    assert split[0]["tokens"] == alone["tokens"]
    worst = max(
        abs(a - b)
        for x, y in zip(alone["logprobs"], split[0]["logprobs"], strict=True)
        for a, b in zip(x, y, strict=True)
    )
    assert worst < 1e-5, worst
    assert all(
        abs(a - b) < 1e-5
        for x, y in zip(alone["top"], split[0]["top"], strict=True)
        for p, q in zip(x, y, strict=True)
        for a, b in zip(p, q, strict=True)
    )
    # Each rank holds half of the routed experts; rank 0 also everything else, ranks > 0 nothing else.
    assert split[0]["experts"] * 2 == alone["experts"] and split[1]["resident"] == split[0]["experts"]
    assert split[0]["resident"] == alone["resident"] - alone["experts"] // 2


def test_mtp_speculative_decoding_over_ranks_gives_the_plain_greedy_tokens(tmp_path, tokenizer):
    """The MTP module's MoE layer is split too; its drafts, verified on rank 0, change no token."""
    folder = make_model_dir(tmp_path / "model", tokenizer)
    drafted = run(folder, "fp32", 2, drafts=1)[0]
    assert drafted["tokens"] == run(folder, "fp32", 1)[0]["tokens"] and drafted["drafted"] > 0


def test_fp8_resident_weights_split_over_ranks_decode_as_one_process(tmp_path):
    import torch

    from nanoseek import Transformer, get_preset
    from nanoseek.checkpoint import save_pretrained

    torch.manual_seed(0)
    save_pretrained(Transformer(get_preset("tiny")), tmp_path, fp8=True)
    assert run(tmp_path, "fp8", 2)[0]["tokens"] == run(tmp_path, "fp8", 1)[0]["tokens"]


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_torchrun_launched_server_answers_as_a_lone_server(tmp_path, tokenizer):
    folder = make_model_dir(tmp_path / "model", tokenizer)
    messages = [{"role": "user", "content": "Hello there"}]

    def ask(url: str) -> str:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        reply = c.chat.completions.create(model="nanoseek", messages=messages, max_tokens=8, temperature=0)
        return reply.choices[0].message.content

    with Server(folder, env={"NANOSEEK_AUTO_DTYPE": "float32"}) as lone:
        expected = ask(lone.url)
    port = free_port()
    cmd = [*TORCHRUN, "2", "-m", "nanoseek", "serve", "--model", str(folder), "--port", str(port)]
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        try:
            url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
            while not healthy(url):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
                time.sleep(0.3)
            assert ask(url) == expected
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def test_an_engine_joins_a_torchrun_launch_only_when_asked(tmp_path, tokenizer):
    """distill, eval and the speedrun build engines too: under torchrun they must not join the launch."""
    folder = make_model_dir(tmp_path / "model", tokenizer)
    code = (
        "import torch; from nanoseek import Engine, SamplingParams; "
        f"e = Engine({str(folder)!r}, device='cpu', dtype=torch.float32, enforce_eager=True); "
        "out = e.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0)); "
        "print(len(out[0].token_ids))"
    )
    env = {
        **ENV,
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "2", result.stderr[-2000:]
