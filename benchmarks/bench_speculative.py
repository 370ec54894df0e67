"""MTP speculative decoding: acceptance rate and speed-up on a model trained with MTP.

    nanoseek train --preset tiny --steps 300 --out runs/tiny        # trains the MTP module too
    python benchmarks/bench_speculative.py --model runs/tiny/model [--new-tokens 64]

Greedy decoding of a few Python prompts with k = 0 (plain), 1 and 2 drafted tokens per step, same
engine, same run; prints the acceptance rate of the drafts, tokens per forward step and tokens/s.
(The V3 paper reports 85-90% acceptance of the second token and 1.8x tokens/s at its scale.)
"""

from __future__ import annotations

import argparse
import time

from nanoseek import Engine, SamplingParams

PROMPTS = ["def __init__(self", "import os\nimport sys\n", "class Parser:\n    def ", "    return self.", "for i in "]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/tiny/model")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    base = None
    for k in (0, 1, 2):
        engine = Engine(args.model, speculative_tokens=k)
        engine.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm up
        engine.metrics.__init__()
        start = time.perf_counter()
        outs = engine.generate(PROMPTS, params)
        tps = sum(o.completion_tokens for o in outs) / (time.perf_counter() - start)
        base = base or tps
        stats = engine.stats()
        print(
            f"k={k}: acceptance {stats['spec_acceptance']:.1%}, {stats['tokens_per_step']:.2f} tokens/step, "
            f"{tps:.0f} tok/s ({tps / base:.2f}x)"
        )


if __name__ == "__main__":
    main()
