"""Plots of a run folder: `nanoseek plot DIR` writes loss.png and expert_load.png (training runs) or
reward.png (GRPO runs) from metrics.jsonl."""

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
    if any("reward" in m for m in metrics):
        return [plot_rewards(run, metrics)]
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


def plot_rewards(run: Path, metrics: list[dict[str, Any]]) -> Path:
    """GRPO: the mean reward and each reward function's mean per step, and held-out pass@1."""
    import matplotlib.pyplot as plt

    rows = [m for m in metrics if "reward" in m]
    steps = [m["step"] for m in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [m["reward"] for m in rows], alpha=0.3, color="C0")
    ax.plot(steps, _smooth([m["reward"] for m in rows], 0.8), color="C0", label="reward (sum)")
    names = [k for k in rows[-1] if k.startswith("rewards/") and k.endswith("/mean")]
    for i, name in enumerate(names, 1):
        ax.plot(steps, _smooth([m[name] for m in rows], 0.8), color=f"C{i}", label=name.split("/")[1])
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


# --- the speedrun's report card -----------------------------------------------------------------------
def _bar_chart(path: Path, labels: list[str], values: list[float], title: str, ylabel: str, log: bool = False) -> Path:
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


def _fp8_plot(path: Path, fp8: dict[str, Any]) -> Path:
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


def run_cost(cfg, plan: dict[str, Any], stages: dict[str, Any]) -> dict[str, Any]:
    """What this run's FLOPs would cost on rented H100s at DeepSeek-V3's MFU and $2 per GPU-hour."""
    from nanoseek.config import get_preset
    from nanoseek.cost import GPUS, flops_per_token, gpu_hours, v3_implied_mfu

    pretrain = flops_per_token(cfg, plan["seq_len"])
    short = flops_per_token(cfg, 128, mtp=False)
    rollout = flops_per_token(cfg, 128, training=False, mtp=False)
    fp8_tokens = plan["fp8_steps"] * plan["batch_size"] * plan["seq_len"] * 2
    grpo_tokens = plan["grpo_steps"] * 16 * 8 * 100  # problems x completions x ~100 tokens (prompt + reply)
    flops = {
        "pretrain": stages["pretrain"]["tokens"] * pretrain.total,
        "fp8": fp8_tokens * pretrain.total,
        "sft": stages["sft"]["tokens"] * short.total,
        "distill": stages["distill"]["prompts"] * 2 * 100 * rollout.total
        + plan["distill_steps"] * 32 * 128 * short.total,
        "grpo": grpo_tokens * (rollout.total + short.total),
    }
    mfu, gpu = v3_implied_mfu(get_preset("v3-671b")), GPUS["h100"]
    hours = gpu_hours(sum(flops.values()), gpu, mfu)
    return {"flops": flops, "total_flops": sum(flops.values()), "gpu": gpu.name, "mfu": mfu,
            "gpu_hours": hours, "dollars": hours * 2.0}  # fmt: skip


def write_report(out: Path, preset: str, cfg, plan: dict[str, Any], stages: dict[str, Any]) -> list[Path]:
    """report.json, report.md and a self-contained report.html (plots inlined) in `out`."""
    import base64
    import shutil
    import time

    from nanoseek.config import get_preset
    from nanoseek.cost import kv_bytes_per_token, model_stats

    start = time.perf_counter()
    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots = []
    for stage, name in (("pretrain", "loss.png"), ("pretrain", "expert_load.png"), ("grpo", "reward.png")):
        if (out / stage / name).is_file():
            plots.append(Path(shutil.copy(out / stage / name, plots_dir / f"{stage}_{name}")))
    plots.append(_fp8_plot(plots_dir / "fp8_vs_bf16.png", stages["fp8"]))
    throughput = stages["inference"]["decode_tokens_per_s"]
    title = "engine decode throughput (this machine)"
    labels = [f"batch {b}" for b in throughput]
    plots.append(
        _bar_chart(plots_dir / "decode_throughput.png", labels, list(throughput.values()), title, "tokens / s")
    )
    v3 = get_preset("v3-671b")
    kinds = [("MLA", "mla"), ("GQA-8", "gqa"), ("MHA", "mha")]
    labels = [f"{name} {label}" for label, model in ((preset, cfg), ("V3", v3)) for name, _ in kinds]
    values = [kv_bytes_per_token(model, 2, kind) for _, model in ((preset, cfg), ("V3", v3)) for _, kind in kinds]
    plots.append(_bar_chart(plots_dir / "kv_bytes.png", labels, values, "KV-cache bytes per token (bf16)", "bytes",
                            log=True))  # fmt: skip
    stats = model_stats(cfg)
    card = {"preset": preset, "params_total": stats.params_total, "params_active": stats.params_active,
            "params_mtp": stats.params_mtp, "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "kv_bytes_per_token": {label: kv_bytes_per_token(cfg, 2, kind) for label, kind in kinds}}  # fmt: skip
    cost = run_cost(cfg, plan, stages)
    stages = dict(stages) | {"report": {"seconds": round(time.perf_counter() - start, 1)}}
    total = sum(s["seconds"] for s in stages.values())
    report = {"preset": preset, "plan": plan, "total_seconds": round(total, 1), "stages": stages, "model_card": card,
              "cost": cost, "plots": [str(p.relative_to(out)) for p in plots]}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    s, grpo, sft, distill = stages, stages["grpo"], stages["sft"], stages["distill"]
    lines = [
        f"# nanoseek speedrun: preset {preset}",
        "",
        f"{total / 60:.1f} minutes on this machine, from nothing to a model that reasons in the R1 format.",
        "",
        "| stage | seconds | result |",
        "|---|---|---|",
        f"| data | {s['data']['seconds']:.0f} | {s['data']['documents']} documents of Python's stdlib, BPE of "
        f"{s['data']['vocab_size']} |",
        f"| pretrain | {s['pretrain']['seconds']:.0f} | {s['pretrain']['steps']} steps, "
        f"{s['pretrain']['tokens']:,} tokens, val loss {s['pretrain']['val_loss']:.3f}"
        + (f" ({s['pretrain']['val_bpb']:.3f} bits/byte)" if s["pretrain"].get("val_bpb") else "")
        + f", {s['pretrain']['tokens_per_s']:.0f} tok/s"
        + (f", MFU {s['pretrain']['mfu']:.1%}" if s["pretrain"].get("mfu") else "")
        + " |",
        f"| fp8 | {s['fp8']['seconds']:.0f} | FP8 / BF16 final loss {s['fp8']['final_loss_ratio']:.3f}, speed "
        f"{s['fp8']['speed_ratio']:.2f}x |",
        f"| sft | {sft['seconds']:.0f} | {sft['steps']} steps on {sft['examples']} worked solutions: pass@1 "
        f"{sft['pass_at_1']:.3f} |",
        f"| distill | {distill['seconds']:.0f} | teacher kept {distill['kept']}/{distill['prompts']} traces; student "
        f"pass@1 {distill['student_pass_at_1']} |",
        f"| grpo | {grpo['seconds']:.0f} | held-out pass@1 {grpo['pass_at_1_before']:.3f} -> "
        f"{grpo['pass_at_1_after']:.3f} ({grpo['eval_n']} problems) |",
        f"| inference | {s['inference']['seconds']:.0f} | decode "
        + ", ".join(f"batch {b}: {v:.0f} tok/s" for b, v in throughput.items())
        + " |",
        f"| report | {s['report']['seconds']:.0f} | this card |",
        "",
        "## Model card",
        "",
        f"{card['params_total']:,} parameters, {card['params_active']:,} active per token (MTP module "
        f"{card['params_mtp']:,}); {card['layers']} layers, hidden {card['hidden_size']}, {card['routed_experts']} "
        f"routed experts ({card['experts_per_token']} per token). KV-cache bytes per token (bf16): "
        + ", ".join(f"{k} {v:,}" for k, v in card["kv_bytes_per_token"].items())
        + ".",
        "",
        "## What this run would cost on rented GPUs",
        "",
        f"{cost['total_flops']:.3g} FLOPs in all; on {cost['gpu']} at DeepSeek-V3's {cost['mfu']:.0%} MFU that is "
        f"{cost['gpu_hours'] * 3600:.3g} GPU-seconds, ${cost['dollars']:.2g} at $2 per GPU-hour "
        "(`nanoseek cost --preset v3-671b --v3-report` for the real thing).",
        "",
        "## Plots",
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in plots],
        "",
        "## Samples",
        "",
        *[
            f"- `{_one_line(prompt)}` -> `{_one_line(text)[:160]}`"
            for prompt, text in s["inference"]["samples"].items()
        ],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    html = _markdown_to_html("\n".join(lines), {p.name: base64.b64encode(p.read_bytes()).decode() for p in plots})
    (out / "report.html").write_text(html)
    return [out / "report.json", out / "report.md", out / "report.html", *plots]


def _one_line(text: str) -> str:
    """A sample inside one code span: newlines shown as ⏎, backticks as quotes."""
    return text.strip().replace("\n", " ⏎ ").replace("`", "'")


def _markdown_to_html(markdown: str, images: dict[str, str]) -> str:
    """The report's small markdown subset (headings, tables, images, bullets, code) as one HTML file."""
    import html
    import re

    def inline(text: str) -> str:
        return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))

    body, table = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-") for c in cells):
                table.append(cells)
            continue
        if table:
            head, *rows = table
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")  # fmt: skip
            table = []
        if m := re.fullmatch(r"!\[(.*)\]\(plots/(.*)\)", line):
            body.append(f'<img alt="{m[1]}" src="data:image/png;base64,{images[m[2]]}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line:
            body.append(f"<p>{inline(line)}</p>")
    style = ("body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:left}"
             "img{max-width:100%;display:block;margin:1rem 0}code{background:#f4f4f4;padding:0 .2rem}")  # fmt: skip
    return f"<!doctype html><meta charset='utf-8'><title>nanoseek report</title><style>{style}</style>\n" + "\n".join(
        body
    )
