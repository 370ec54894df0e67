"""Weights in memory: resident bytes, peak memory while loading, and decode speed for each `weights` mode
(fp8 kept in E4M3 with 128x128 block scales, int8 with a scale per row, bf16, fp32), the same checkpoint, in one
run.

    python benchmarks/bench_weights.py [--preset small] [--new-tokens 64]

The checkpoint is the preset with random weights saved in DeepSeek-V3's FP8 format. Each mode loads in a
fresh process, which reports its resident weight bytes and how far its RSS rose during the load (peak,
against what stays once loaded; RSS after importing torch subtracted): the loader reads tensors one by
one from the safetensors files into their places, so no second copy of the model is ever held. Decode is
greedy, batch 1, compute dtype fp32 for the fp32 and int8 modes and bf16 for the others, with the engine's
defaults (captured): the FP8 and int8 modes dequantise each weight inside the batch-1 products' fused
reductions on this CPU. int8 is quantised once loaded (its peak is the compute dtype's model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import save_pretrained
from nanoseek.device import cpu_features

CHILD = """
import json, sys, time, torch
from nanoseek import Engine, SamplingParams
from nanoseek.model.fp8_weights import resident_bytes

def status(field):  # this process's memory, in bytes, from the kernel
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024

folder, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = status("VmRSS")
dtype = torch.float32 if mode in ("fp32", "int8") else torch.bfloat16
engine = Engine(folder, device="cpu", dtype=dtype, weights=mode, cache_memory_mb=16)
grown, peak = status("VmRSS") - before, status("VmHWM") - before
params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
engine.generate([list(range(1, 17))], params)
start = time.perf_counter()
engine.generate([list(range(2, 18))], params)
rate = n / (time.perf_counter() - start)
print(json.dumps({"resident": resident_bytes(engine.model), "grown": grown, "peak": peak, "tok_s": rate}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    print(cpu_features())
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_pretrained(Transformer(get_preset(args.preset)), Path(tmp), fp8=True)
        rows = {}
        for mode in ("fp32", "bf16", "fp8", "int8"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, tmp, mode, str(args.new_tokens)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    bf16 = rows["bf16"]["resident"]
    print(f"preset {args.preset}, greedy batch 1, {args.new_tokens} new tokens")
    for mode, r in rows.items():
        print(
            f"{mode:>4}: weights {r['resident'] / 2**20:6.1f} MiB ({r['resident'] / bf16:.2f}x bf16) | RSS while "
            f"loading: peak {r['peak'] / 2**20:6.1f} MiB, {r['peak'] / r['grown']:.2f}x what stays | "
            f"decode {r['tok_s']:5.1f} tok/s ({r['tok_s'] / rows['fp32']['tok_s']:.2f}x fp32)"
        )


if __name__ == "__main__":
    main()
