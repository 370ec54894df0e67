"""Request latency against the ledger's size: a real `nanoseek serve` with 50,000 accounts against one
with 3, in the same run, alternating requests (the old JSON ledger rewrote every account per request:
621 ms with 50,000 keys against 13 ms with 3).

    python benchmarks/bench_ledger.py [--accounts 50000] [--requests 60]

Each request is a one-token completion from a key with a balance: it reserves its worst case, records
its usage and settles, three ledger transactions, plus the model's one decode step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from load import random_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import Server

from nanoseek.device import cpu_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nanoseek-ledger-bench-"))
    model = random_model(root / "model")
    servers = {}
    for n in (3, args.accounts):
        keys = root / f"keys{n}.txt"
        keys.write_text("".join(f"key-{i} 100\n" for i in range(n)))
        servers[n] = Server(model, "--api-keys", str(keys), "--ledger", str(root / f"ledger{n}.db"))
    body = {"model": "nanoseek", "prompt": "def f(x):", "max_tokens": 1, "temperature": 0}
    times: dict[int, list[float]] = {n: [] for n in servers}
    client = httpx.Client(timeout=60)  # keep-alive: the connection's setup is not the ledger's cost
    try:
        for i in range(args.requests):
            for n, server in servers.items():
                key = f"key-{(i * 7919) % n}"
                start = time.perf_counter()
                r = client.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                times[n].append(time.perf_counter() - start)
                assert r.status_code == 200, r.text
    finally:
        for server in servers.values():
            server.stop()
    print(cpu_features())
    median = {n: statistics.median(t[5:]) * 1000 for n, t in times.items()}  # the first few warm up
    small, large = median[3], median[args.accounts]
    print(
        f"request latency, median of {args.requests - 5}: 3 accounts {small:.1f} ms | "
        f"{args.accounts:,} accounts {large:.1f} ms | ratio {large / small:.2f}x"
    )


if __name__ == "__main__":
    main()
