"""Load test of `nanoseek serve` on loopback: 64 concurrent OpenAI clients against one client.

    python benchmarks/load.py [--model DIR] [--clients 64] [--requests-per-client 2] [--max-tokens 32]

Starts a real server (a random tiny model unless --model is given; its end-of-sequence logit is zeroed so
every reply runs to max_tokens and both cases do the same work), then 1 client sends requests one after
another, and N clients do the same at once. Every request must be answered (none lost, no errors).
Prints p50/p99 latency and aggregate completion tokens/s for both, and their ratio. Bounded in requests
and by --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch

from nanoseek import Transformer, get_preset, save_pretrained
from nanoseek.data import iter_texts, stdlib_files
from nanoseek.tokenizer import train_tokenizer


def random_model(out: Path) -> Path:
    tokenizer = train_tokenizer(iter_texts(stdlib_files()[::50]), vocab_size=1024, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").replace(vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id] = 0
    save_pretrained(model, out)
    tokenizer.save(out)
    return out


def start_server(model: Path, port: int, clients: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--max-seqs", str(max(64, clients)), "--max-pending", str(4 * clients)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the server did not start")


async def run_clients(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(
        base_url=url,
        api_key="none",
        max_retries=0,
        timeout=600,
        http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=clients + 8)),
    )
    latencies, tokens, errors = [], 0, []

    async def one_client(c: int) -> None:
        nonlocal tokens
        for r in range(per_client):
            start = time.perf_counter()
            try:
                out = await client.chat.completions.create(
                    model="nanoseek",
                    max_tokens=max_tokens,
                    temperature=0.7,
                    seed=c * per_client + r,
                    messages=[{"role": "user", "content": f"Client {c}, request {r}: write a function that sorts."}],
                )
            except openai.OpenAIError as e:
                errors.append(repr(e))
                continue
            latencies.append(time.perf_counter() - start)
            tokens += out.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return {
        "sent": clients * per_client,
        "answered": len(latencies),
        "errors": errors,
        "wall": wall,
        "tokens": tokens,
        "latencies": latencies,
    }


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: a random tiny model)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--single-requests", type=int, default=8, help="requests the lone client sends")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_model(Path(tmp) / "model")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = start_server(model, port, args.clients)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            asyncio.run(run_clients(url, 1, 2, args.max_tokens))  # warm-up
            cases = {
                "1 client": (1, args.single_requests),
                f"{args.clients} clients": (args.clients, args.requests_per_client),
            }
            results = {}
            for name, (clients, per_client) in cases.items():
                results[name] = asyncio.run(
                    asyncio.wait_for(run_clients(url, clients, per_client, args.max_tokens), args.timeout)
                )
                sent, r = clients * per_client, results[name]
                assert r["answered"] == sent and not r["errors"], (
                    f"{name}: {sent - r['answered']} lost: {r['errors'][:3]}"
                )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    print(f"load test, {args.max_tokens} tokens per reply, loopback HTTP with the openai client:")
    for name, r in results.items():
        lat = r["latencies"]
        print(
            f"  {name:<11} {r['answered']:4d}/{r['sent']} answered  p50 {percentile(lat, 50):6.2f} s  "
            f"p99 {percentile(lat, 99):6.2f} s  {r['tokens'] / r['wall']:8.1f} tokens/s"
        )
    one, many = (r["tokens"] / r["wall"] for r in results.values())
    print(f"  aggregate throughput: {many / one:.1f}x one client")


if __name__ == "__main__":
    main()
