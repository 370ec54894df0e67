"""Decode against the memory roofline: how fast the engine streams its weights, packed and plain, in one run.

    python benchmarks/bench_decode.py [--preset small] [--batches 1 8 32] [--new-tokens 64] [--enforce-eager]

A random model of the preset decodes greedily with its weights packed for oneDNN (`pack_weights="on"`;
serve/packed.py: the default on a CPU for a model larger than its cache) and with plain `F.linear` (`"off"`),
with the decode step captured (the engine's default: torch.compile, compiled in a warm-up) or eagerly
(`--enforce-eager`), the two runs interleaved `--rounds` times so that the machine's noise hits both alike; the
best round of each counts.
Beside them: the bytes a decode step reads (cost.decode_step_bytes: attention, dense layers,
shared experts and head, plus the routed experts the batch's tokens chose), the bandwidth that implies, and
the fraction of what a plain `sum` over 512 MB reads on this CPU (the roofline).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from nanoseek import Engine, SamplingParams, Transformer, get_preset, save_pretrained
from nanoseek.cost import decode_step_bytes
from nanoseek.device import cpu_features, read_bandwidth


def decode_rate(engine: Engine, batch: int, new_tokens: int) -> float:
    """Generated tokens/s of one greedy batch (prompts of 4 tokens; prefill is a small share)."""
    prompts = [[1, 2, 3, 4 + i] for i in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    engine.generate(prompts, params)
    return batch * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--enforce-eager", action="store_true", help="the eager decode step (default: captured)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = get_preset(args.preset).replace(num_nextn_predict_layers=0)
    roofline = read_bandwidth()
    print(f"CPU: {cpu_features()}, {torch.get_num_threads()} threads; `sum` reads {roofline / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(Transformer(cfg), tmp)
        eager = args.enforce_eager
        engines = {
            "packed": Engine(tmp, dtype=dtype, pack_weights="on", enforce_eager=eager),
            "plain": Engine(tmp, dtype=dtype, pack_weights="off", enforce_eager=eager),
        }
        assert engines["packed"].packed and not engines["plain"].packed, "oneDNN packing unavailable here"
        greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        same = len({tuple(e.generate([[1, 2, 3, 4]], greedy)[0].token_ids) for e in engines.values()}) == 1
        element = torch.finfo(dtype).bits // 8
        step_bytes = {b: decode_step_bytes(cfg, b, 4 + args.new_tokens // 2, element, element) for b in args.batches}
        mode = "eager" if args.enforce_eager else "captured"
        print(f"{args.preset} ({args.dtype}, {mode}), {args.new_tokens} greedy tokens, best of {args.rounds} rounds:")
        for batch, step in step_bytes.items():
            for engine in engines.values():  # warm-up: the captured step compiles here
                decode_rate(engine, batch, 2)
            best = {name: 0.0 for name in engines}
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    best[name] = max(best[name], decode_rate(engine, batch, args.new_tokens))
            line = []
            for name, rate in best.items():
                gbs = rate / batch * step / 1e9
                line.append(f"{name} {rate:7.1f} tok/s ({gbs:4.1f} GB/s, {gbs * 1e9 / roofline:4.0%} of roofline)")
            mb = step / 1e6
            ratio = best["packed"] / best["plain"]
            print(f"  batch {batch:2d}: {mb:6.1f} MB/step | {' | '.join(line)} | packed/plain {ratio:.2f}x")
        print(f"same greedy tokens packed and plain: {same}")


if __name__ == "__main__":
    main()
