"""Expert balance at our run length: V3's bias update speed (gamma 1e-3) against nanoseek's default for a short
run (moe.bias_gamma_for: 1.25 / steps, at most 0.005), in the same run on the tiny speedrun's pretraining.

    python benchmarks/bench_balancing.py [--steps 250] [--out docs/balancing.png]
    python benchmarks/bench_balancing.py --runs RUN_V3 RUN_DEFAULT     # plot two finished `nanoseek train` runs

Each run is `nanoseek train --preset tiny --batch-size 16 --seq-len 256` (the speedrun's pretrain stage) with
one gamma; printed: each MoE layer's max / mean expert load at the last step (1.0: balanced) and the final
validation loss; plotted: the worst layer's max / mean over the steps, for both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from nanoseek.model.moe import V3_BIAS_GAMMA, bias_gamma_for
from nanoseek.train.config import TrainConfig
from nanoseek.train.trainer import Trainer


def train(out: Path, steps: int, gamma: float) -> Path:
    cfg = TrainConfig(
        preset="tiny",
        steps=steps,
        batch_size=16,
        seq_len=256,
        bias_gamma=gamma,
        eval_every=max(1, steps // 5),
        save_every=steps,
        sample_tokens=0,
        out=str(out),
    )
    Trainer(cfg).fit()
    return out


def read(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--runs", type=Path, nargs=2, metavar=("V3", "DEFAULT"), help="plot two finished runs")
    parser.add_argument("--out", type=Path, default=Path("docs/balancing.png"))
    args = parser.parse_args()
    if args.runs:
        runs = dict(zip((f"V3's gamma {V3_BIAS_GAMMA:g}", "nanoseek's default"), args.runs, strict=True))
    else:
        tmp = Path(tempfile.mkdtemp(prefix="balancing-"))
        default = bias_gamma_for(args.steps)
        runs = {
            f"V3's gamma {V3_BIAS_GAMMA:g}": train(tmp / "v3", args.steps, V3_BIAS_GAMMA),
            f"nanoseek's default {default:g}": train(tmp / "default", args.steps, default),
        }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, run in runs.items():
        metrics = read(run)
        worst = [max(m["max_over_mean_load"].values()) for m in metrics]
        ax.plot([m["step"] for m in metrics], worst, label=name)
        last = metrics[-1]
        val = next(m["val_loss"] for m in reversed(metrics) if m.get("val_loss") is not None)
        layers = ", ".join(f"{k} {v:.2f}" for k, v in last["max_over_mean_load"].items())
        print(f"{name}: step {last['step']}, max/mean load {layers}; final val loss {val:.4f}")
    ax.axhline(1.3, color="grey", linestyle=":", label="1.3")
    ax.set(xlabel="step", ylabel="max / mean expert load (worst layer)", yscale="log")
    ax.set_title("tiny speedrun pretraining: balance by the bias update alone")
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
