"""A captured CPU decode step's two choices against their alternatives, compiled side by side, same run.

    python benchmarks/bench_captured.py --model runs/tiny/model [--batches 1,2,4,8,32] [--rounds 4]

1. Products of a few rows: inside a captured step on a CPU, `kernels.linear` makes a product of up to
   FUSED_ROWS rows one multiply-and-sum that Inductor fuses with its neighbours; the alternative is a library
   call for every product (oneDNN's packed matvec where the weights are packed, MKL's GEMM otherwise).
2. Routed experts: each (token, expert) pair's products one fused reduction over its expert's rows, read
   where they lie, at every batch (`moe.GATHERED_ON_CPU`); the alternative, past as many pairs as experts,
   runs every expert on every token (batched matmuls, E / k times the arithmetic).

Both settings are read while a graph is traced, so each version's graphs are compiled once and the versions
timed in interleaved rounds (the best of each kept): greedy decoding at each batch, and MTP's fused
verify-and-draft step (one draft) at batch 1, whose main model runs on 2 rows.
"""

from __future__ import annotations

import argparse
import time

from nanoseek import Engine, SamplingParams
from nanoseek.device import cpu_features
from nanoseek.model import kernels, moe

PROMPTS = ["def __init__(self", "import os\nimport sys\n", "class Parser:\n    def ", "    return self.", "for i in "]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/tiny/model")
    parser.add_argument("--batches", default="1,2,4,8,32", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    print(cpu_features())
    batches = [int(b) for b in args.batches.split(",")]
    plain = Engine(args.model, max_seqs=max(batches))
    engines = {0: plain, 1: Engine(args.model, max_seqs=1, speculative_tokens=1)}
    cases = [(0, batch) for batch in batches] + [(1, 1)]  # (drafts, batch)
    texts = PROMPTS if plain.tokenizer else [list(range(3 + i, 20 + i)) for i in range(5)]  # or token ids
    prompts = {batch: [texts[i % len(texts)] for i in range(batch)] for _, batch in cases}
    fused = kernels.FUSED_ROWS
    versions = {"ours": (fused, True), "library products": (0, True), "every expert": (fused, False)}
    seconds: dict[tuple, float] = {}
    tokens: dict[tuple, list] = {}
    for round_ in range(args.rounds + 1):  # round 0 compiles each version's graphs
        for name, (rows, gathered) in versions.items():
            kernels.FUSED_ROWS, moe.GATHERED_ON_CPU = rows, gathered
            for drafts, batch in cases:
                if name == "every expert" and (drafts or batch * plain.model.cfg.num_experts_per_tok <= 8):
                    continue  # the same path as ours while pairs are few
                start = time.perf_counter()
                outputs = engines[drafts].generate(prompts[batch], params)
                elapsed, key = time.perf_counter() - start, (name, drafts, batch)
                tokens[key] = [o.token_ids for o in outputs]
                if round_:
                    seconds[key] = min(seconds.get(key, float("inf")), elapsed)
    kernels.FUSED_ROWS, moe.GATHERED_ON_CPU = fused, True
    for drafts, batch in cases:
        n = batch * args.new_tokens
        ours = n / seconds[("ours", drafts, batch)]
        line = f"{'batch ' + str(batch) + (', MTP one draft' if drafts else ''):>22}: ours {ours:6.0f} tok/s"
        for name in list(versions)[1:]:
            if (name, drafts, batch) in seconds:
                theirs = n / seconds[(name, drafts, batch)]
                same = tokens[(name, drafts, batch)] == tokens[("ours", drafts, batch)]
                line += f" | {name} {theirs:6.0f} tok/s: {ours / theirs:.2f}x{'' if same else ' (other tokens)'}"
        print(line)


if __name__ == "__main__":
    main()
