"""Plots of a run folder: `nanoseek plot DIR` writes loss.png and expert_load.png from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: pass a folder written by `nanoseek train`")
    metrics = []
    for line in path.read_text().splitlines():
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
    return metrics


def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
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
    steps = [m["step"] for m in metrics]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [m["lm_loss"] for m in metrics], alpha=0.3, color="C0")
    ax.plot(steps, _smooth([m["lm_loss"] for m in metrics]), color="C0", label="train (next token)")
    if any(m.get("mtp_loss") for m in metrics):
        ax.plot(steps, _smooth([m["mtp_loss"] for m in metrics]), color="C2", label="train (MTP depth 1+)")
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
            image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, load.max()),
                              extent=(steps[0], steps[-1], load.shape[0] - 0.5, -0.5))  # fmt: skip
            ax.set_ylabel(f"{layer}\nexpert")
            fig.colorbar(image, ax=ax, label="load / mean")
        axes[-1, 0].set_xlabel("step")
        axes[0, 0].set_title("expert load over steps (1 = balanced)")
        fig.tight_layout()
        written.append(run / "expert_load.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
