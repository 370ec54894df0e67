"""Time to first token for a long prompt: a cache miss, a memory-tier hit and a disk-tier hit.

    python benchmarks/bench_ttft.py [--preset tiny] [--prompt-tokens 2048] [--rounds 3]

The engine as the server runs it (64-token cache units, a disk tier under a temporary folder). Each round
takes a fresh random prompt: the first request computes all of it (miss), the same prompt again reads
its prefix from memory (hit), and a new engine on the same folder reads it from disk (disk hit; building
the engine is not timed). One new token each, so the time is the prefill. Hits are whole 64-token
blocks: a 2048-token prompt hits all 32 and recomputes its last token, a 2000-token one hits 31 and
computes its last 16 tokens. Prints medians and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from nanoseek import Engine, SamplingParams, Transformer, get_preset
from nanoseek.device import cpu_features, default_dtype


def ttft(engine: Engine, prompt: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    [out] = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    return time.perf_counter() - start, out.cached_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg = get_preset(args.preset).replace(max_position_embeddings=max(4096, 2 * args.prompt_tokens))
    torch.manual_seed(0)
    model = Transformer(cfg).to(default_dtype("cpu")).eval()
    options = dict(block_size=64, cache_memory_mb=512, max_batched_tokens=2048)
    times: dict[str, list[float]] = {"miss": [], "memory hit": [], "disk hit": []}
    with tempfile.TemporaryDirectory() as cache_dir:
        warm = Engine(model, **options)
        ttft(warm, torch.randint(10, cfg.vocab_size, (args.prompt_tokens,)).tolist())  # first-call costs
        for _ in range(args.rounds):
            prompt = torch.randint(10, cfg.vocab_size, (args.prompt_tokens,)).tolist()
            engine = Engine(model, cache_dir=cache_dir, **options)
            seconds, _ = ttft(engine, prompt)
            times["miss"].append(seconds)
            engine.disk_cache.flush()  # the miss's blocks are written in the background: let them land
            seconds, cached = ttft(engine, prompt)
            times["memory hit"].append(seconds)
            engine.close()
            seconds, disk_cached = ttft(Engine(model, cache_dir=cache_dir, **options), prompt)
            times["disk hit"].append(seconds)
            assert cached == disk_cached == 64 * (args.prompt_tokens // 64), (cached, disk_cached)
    print(cpu_features())
    print(
        f"time to first token, {args.prompt_tokens}-token prompt, preset {args.preset}, "
        f"{cached} tokens cached on a hit, medians of {args.rounds}:"
    )
    miss = statistics.median(times["miss"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<11} {median * 1000:8.1f} ms   {miss / median:5.1f}x faster than a miss")


if __name__ == "__main__":
    main()
