"""Forward and training-step throughput: nanoseek against transformers' DeepseekV3, same weights, same batch.

    python benchmarks/bench_model.py [--preset tiny] [--batch 8] [--seq 256] [--iters 10] [--dtype float32]

Both models run in one process, alternating iteration by iteration so machine noise hits both alike;
the figure that matters is the ratio (median time of transformers / median time of nanoseek).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import nanoseek
from nanoseek import get_preset
from nanoseek.device import cpu_features, default_dtype


def reference_model(cfg: nanoseek.ModelConfig, dtype: torch.dtype):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_cfg = DeepseekV3Config(**{**cfg.to_hf_dict(), "num_nextn_predict_layers": 0})
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").to(dtype)


def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    logits = logits_of(model, x[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def race(fns: dict[str, Callable[[], None]], iters: int) -> dict[str, float]:
    """Median seconds per call, alternating the contenders each iteration (after 2 warm-up calls each)."""
    for fn in fns.values():
        fn(), fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: what this CPU does fastest)")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype("cpu")
    cfg = get_preset(args.preset).replace(num_nextn_predict_layers=0)
    reference = reference_model(cfg, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = nanoseek.from_pretrained(tmp, dtype=dtype)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq
    print(cpu_features())
    print(
        f"preset {args.preset}, batch {args.batch} x {args.seq} tokens, {dtype}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )

    with torch.no_grad():
        ours.eval(), reference.eval()
        diff = (logits_of(ours, x[:, :64]) - logits_of(reference, x[:, :64])).abs().max().item()
        print(f"same weights, max |logit diff| {diff:.2e}")
        fwd = race({"nanoseek": lambda: ours(x[:, :-1]), "transformers": lambda: reference(x[:, :-1])}, args.iters)

    ours.train(), reference.train()
    ours_opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, reference))
    step = race(
        {"nanoseek": lambda: train_step(ours, ours_opt, x), "transformers": lambda: train_step(reference, ref_opt, x)},
        args.iters,
    )
    for label, result in (("forward", fwd), ("train step (fwd+bwd+AdamW)", step)):
        ratio = result["transformers"] / result["nanoseek"]
        print(
            f"{label:28s} nanoseek {tokens / result['nanoseek']:9.0f} tok/s | "
            f"transformers {tokens / result['transformers']:9.0f} tok/s | {ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
