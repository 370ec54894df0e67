"""Plots of a run folder: `nanoseek plot DIR` writes loss.png and expert_load.png (training runs) or
reward.png (GRPO runs) from metrics.jsonl; and the report card's charts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.flags import flag
from nanoseek.train.run import read_metrics


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """An exponential moving average, for noisy per-step curves."""
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run = Path(run_dir)
    metrics = read_metrics(run)
    if not metrics:
        raise ValueError(f"{run}/metrics.jsonl is empty: train for at least one step")
    if any("reward" in m for m in metrics):
        return [plot_rewards(run, metrics)]
    steps = [m["step"] for m in metrics]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [m["lm_loss"] for m in metrics], alpha=0.3, color="C0")
    ax.plot(steps, smooth([m["lm_loss"] for m in metrics]), color="C0", label="train (next token)")
    if any(m.get("mtp_loss") for m in metrics):
        ax.plot(steps, smooth([m["mtp_loss"] for m in metrics]), color="C2", label="train (MTP depth 1+)")
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="C1", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title=f"loss: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(run / "loss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    layers = list(metrics[-1].get("expert_load", {}))
    if layers:
        fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 1.3 * len(layers)), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers, strict=True):
            rows = [m["expert_load"][layer] for m in metrics if layer in m.get("expert_load", {})]
            load = np.array(rows).T * len(rows[0])  # [experts, steps], 1.0 = perfectly balanced
            image = ax.imshow(
                load,
                aspect="auto",
                cmap="viridis",
                vmin=0,
                vmax=max(2.0, load.max()),
                extent=(steps[0], steps[-1], load.shape[0] - 0.5, -0.5),
            )
            ax.set_ylabel(f"{layer}\nexpert")
            fig.colorbar(image, ax=ax, label="load / mean")
        axes[-1, 0].set_xlabel("step")
        axes[0, 0].set_title("expert load over steps (1 = balanced)")
        fig.tight_layout()
        written.append(run / "expert_load.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_rewards(run: Path, metrics: list[dict[str, Any]]) -> Path:
    """GRPO: the mean reward and each reward function's mean per step, and held-out pass@1."""
    import matplotlib.pyplot as plt

    rows = [m for m in metrics if "reward" in m]
    steps = [m["step"] for m in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [m["reward"] for m in rows], alpha=0.3, color="C0")
    ax.plot(steps, smooth([m["reward"] for m in rows], 0.8), color="C0", label="reward (sum)")
    names = [k for k in rows[-1] if k.startswith("rewards/") and k.endswith("/mean")]
    for i, name in enumerate(names, 1):
        ax.plot(steps, smooth([m[name] for m in rows], 0.8), color=f"C{i}", label=name.split("/")[1])
    evals = [(m["step"], m["eval/pass_at_1"]) for m in metrics if "eval/pass_at_1" in m]
    if evals:
        ax.plot(*zip(*evals, strict=True), "s--", color="k", label="held-out pass@1 (greedy)")
    ax.set(xlabel="step", ylabel="reward / accuracy", title=f"GRPO: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run / "reward.png", dpi=120)
    plt.close(fig)
    return run / "reward.png"


def bar_chart(path: Path, labels: list[str], values: list[float], title: str, ylabel: str, log: bool = False) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(labels, values, color=[f"C{i}" for i in range(len(values))])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fp8_plot(path: Path, fp8: dict[str, Any]) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name in ("bf16", "fp8"):
        losses = fp8[name]["loss"]
        ax.plot(range(1, len(losses) + 1), losses, label=f"{name.upper()} ({fp8[name]['tokens_per_s']:.0f} tok/s)")
    ax.set(xlabel="step", ylabel="train loss", title="FP8 GEMMs (1x128 / 128x128 scaling) against BF16, same start")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass(slots=True)
class PlotConfig:
    """PNG plots of a run folder: loss, learning rate, expert load, rewards."""

    run: str = flag("a run folder with metrics.jsonl", positional=True, metavar="DIR")


def plot(cfg: PlotConfig) -> int:
    for path in plot_run(cfg.run):
        print(path)
    return 0
