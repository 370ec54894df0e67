"""Training tokens/s with 1 process against 2 (FSDP2 data parallel, and data + expert parallel).

    python benchmarks/bench_parallel.py [--preset tiny] [--steps 12] [--batch-size 16] [--seq-len 256]

Each configuration is a real `nanoseek train` run (torchrun for 2 processes, gloo on CPU), same global
batch; the median tokens/s over the steps after the first two is read from metrics.jsonl. On a 2-core
machine two processes share the cores that one process already uses with 2 threads, so expect no
speed-up here: the point is that it runs, and what the communication costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(launcher: list[str], extra: list[str], out: Path, args: argparse.Namespace, threads: int) -> float:
    flags = "--eval-every 1000 --save-every 1000 --sample-tokens 0 --no-progress"
    cmd = [*launcher, "train", "--preset", args.preset, "--steps", str(args.steps), "--out", str(out)]
    cmd += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), *flags.split(), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(m["tokens_per_s"] for m in metrics[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    single = [sys.executable, "-m", "nanoseek"]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "nanoseek",
    ]
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            f"1 process, {cores} threads": run(single, [], Path(tmp) / "a", args, cores),
            "2 processes, FSDP2 (dp=2)": run(torchrun, [], Path(tmp) / "b", args, max(1, cores // 2)),
            "2 processes, FSDP2 + EP (ep=2)": run(torchrun, ["--ep", "2"], Path(tmp) / "c", args, max(1, cores // 2)),
        }
    base = next(iter(results.values()))
    print(f"preset {args.preset}, global batch {args.batch_size} x {args.seq_len}, {cores} CPU cores")
    for name, tps in results.items():
        print(f"{name:32s} {tps:8.0f} tok/s  {tps / base:.2f}x")


if __name__ == "__main__":
    main()
