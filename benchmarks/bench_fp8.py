"""FP8 training against the higher-precision baseline: same preset, steps, seed and data.

    python benchmarks/bench_fp8.py [--preset tiny] [--steps 200] [--out runs/fp8-bench]

Prints the relative difference of the final loss (DeepSeek-V3 reports < 0.25% against BF16), the bytes
of activations saved for backward in one training step (baseline in fp32 and bf16 autocast, and FP8),
the step time, and writes a loss-curve plot comparing the two runs. On a CPU the FP8 GEMMs are emulated
(quantise, dequantise per tile/block, FP32 matmul), so FP8 is slower here: the numerics are the point.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from nanoseek.train.trainer import TrainConfig, Trainer


def saved_activation_bytes(trainer: Trainer, dtype: torch.dtype) -> int:
    """Bytes autograd keeps for backward in one forward + loss (parameters excluded)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    trainer.amp_dtype = dtype
    window = trainer.loader.next_batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.compute_loss(*trainer.inputs_and_targets(window))["loss"].backward()
    trainer.model.zero_grad(set_to_none=True)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/fp8-bench")
    args = parser.parse_args()
    out = Path(args.out)

    results = {}
    for name, fp8 in (("baseline", False), ("fp8", True)):
        resume = (out / name / "checkpoints").is_dir()  # a rerun reuses finished runs
        cfg = TrainConfig(
            preset=args.preset,
            steps=args.steps,
            out=str(out / name),
            fp8=fp8,
            eval_every=50,
            save_every=args.steps,
            sample_tokens=0,
            resume=resume,
        )
        trainer = Trainer(cfg)
        history = trainer.fit() if trainer.step < args.steps else []
        results[name] = {"trainer": trainer, "history": history}

    from nanoseek.train.run import read_metrics

    runs = {name: read_metrics(out / name) for name in results}
    final = {n: statistics.mean(m["lm_loss"] for m in ms[-20:]) for n, ms in runs.items()}
    val = {n: [m["val_loss"] for m in ms if m.get("val_loss") is not None][-1] for n, ms in runs.items()}
    speed = {n: statistics.median(m["tokens_per_s"] for m in ms) for n, ms in runs.items()}
    print(f"{args.preset}, {args.steps} steps, same seed and data")
    print(
        f"final train loss (mean of last 20 steps): baseline {final['baseline']:.4f}, fp8 {final['fp8']:.4f}, "
        f"relative difference {100 * (final['fp8'] - final['baseline']) / final['baseline']:+.2f}%"
    )
    print(
        f"final validation loss: baseline {val['baseline']:.4f}, fp8 {val['fp8']:.4f}, "
        f"relative difference {100 * (val['fp8'] - val['baseline']) / val['baseline']:+.2f}%"
    )
    print(f"tokens/s: baseline {speed['baseline']:.0f}, fp8 (emulated on CPU) {speed['fp8']:.0f}")

    fp32 = saved_activation_bytes(results["baseline"]["trainer"], torch.float32)
    bf16 = saved_activation_bytes(results["baseline"]["trainer"], torch.bfloat16)
    fp8 = saved_activation_bytes(results["fp8"]["trainer"], torch.float32)
    print(
        f"activations saved for backward, one step: fp32 {fp32 / 2**20:.1f} MiB, "
        f"bf16 autocast {bf16 / 2**20:.1f} MiB, fp8 {fp8 / 2**20:.1f} MiB"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.plots import smooth

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, ms), color in zip(runs.items(), ("C0", "C3"), strict=True):
        steps = [m["step"] for m in ms]
        ax.plot(steps, smooth([m["lm_loss"] for m in ms]), color=color, label=f"{name} (train, smoothed)")
        v = [(m["step"], m["val_loss"]) for m in ms if m.get("val_loss") is not None]
        ax.plot(*zip(*v, strict=True), "o--", color=color, label=f"{name} (validation)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title=f"FP8 vs baseline, preset {args.preset}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fp8_vs_baseline.png", dpi=100)
    print(f"plot: {out / 'fp8_vs_baseline.png'}")


if __name__ == "__main__":
    main()
