"""The speedrun's report card: report.json, report.md and a self-contained report.html, with what each stage
cost (seconds here, FLOPs and dollars on rented GPUs from its own token counts) and bought."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanoseek.plots import bar_chart, fp8_plot


def run_cost(cfg, plan: dict[str, Any], stages: dict[str, Any]) -> dict[str, Any]:
    """Each stage's FLOPs, from the tokens it processed, and what they would cost on rented H100s at
    DeepSeek-V3's MFU and $2 per GPU-hour. Training tokens count forward and backward (MTP where it was
    on), generated and scored ones a forward pass."""
    from nanoseek.config import get_preset
    from nanoseek.cost import GPUS, flops_per_token, gpu_hours, v3_implied_mfu

    pretrain = flops_per_token(cfg, plan["seq_len"]).total  # windows of seq_len, with MTP
    chat = flops_per_token(cfg, 128, mtp=False).total  # SFT rows and GRPO updates: short, no MTP
    forward = flops_per_token(cfg, 128, training=False, mtp=False).total

    def tokens(stage: str, key: str = "tokens") -> int:  # 0 where a result predates the count
        return stages[stage].get(key, 0)

    flops = {
        "pretrain": tokens("pretrain") * pretrain,
        "fp8": tokens("fp8") * pretrain,
        "sft": tokens("sft") * chat,
        "distill": tokens("distill", "teacher_tokens") * forward + tokens("distill", "student_tokens") * chat,
        "grpo": (tokens("grpo", "rollout_tokens") + tokens("grpo", "scored_tokens")) * forward
        + tokens("grpo", "trained_tokens") * chat,
    }
    if "tools" in stages:  # conversations with the tools' descriptions: longer rows
        long = flops_per_token(cfg, 320, mtp=False).total
        flops["tools"] = tokens("tools", "sft_tokens") * long + tokens("tools", "trained_tokens") * long
        flops["tools"] += (tokens("tools", "rollout_tokens") + tokens("tools", "scored_tokens")) * forward
    mfu, gpu = v3_implied_mfu(get_preset("v3-671b")), GPUS["h100"]
    seconds = {stage: gpu_hours(f, gpu, mfu) * 3600 for stage, f in flops.items()}
    hours = sum(seconds.values()) / 3600
    return {
        "flops": flops,
        "gpu_seconds": seconds,
        "total_flops": sum(flops.values()),
        "gpu": gpu.name,
        "mfu": mfu,
        "gpu_hours": hours,
        "dollars": hours * 2.0,
    }


def provenance() -> dict[str, Any]:
    """What reproducing a card needs, as nanochat's report header gives it: the code (git commit, and whether
    the tree had uncommitted changes), the machine (CPU, cores, AMX, AVX512-BF16), the software (torch,
    Python, threads), the date and the command line."""
    import datetime
    import os
    import platform
    import subprocess
    import sys

    import torch

    from nanoseek.device import cpu_has_fast_bf16, cpu_name

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    commit = git("rev-parse", "HEAD")
    return {
        "commit": commit or "unknown (not a git checkout)",
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "amx": cpu_has_fast_bf16(),
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["nanoseek" if sys.argv[0].endswith("nanoseek") else sys.argv[0], *sys.argv[1:]]),
    }


def header_line(p: dict[str, Any]) -> str:
    dirty = " with uncommitted changes" if p["uncommitted_changes"] else ""
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    return (
        f"Commit `{p['commit'][:12]}`{dirty}; {p['cpu']}, {p['cores']} cores (AMX {yes(p['amx'])}, AVX512-BF16 "
        f"{yes(p['avx512_bf16'])}); torch {p['torch']}, Python {p['python']}, {p['threads']} threads; "
        f"{p['date']}; `{p['command']}`."
    )


def balance(loads: dict[str, float] | None) -> str:
    """The last step's max / mean expert load per MoE layer (1.0: balanced), for the pretrain row."""
    if not loads:
        return ""
    return "; expert load max/mean at the end " + ", ".join(f"{layer} {v:.2f}" for layer, v in loads.items())


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
    for stage, name in (
        ("pretrain", "loss.png"),
        ("pretrain", "expert_load.png"),
        ("grpo", "reward.png"),
        ("tools/grpo", "reward.png"),
    ):
        if (out / stage / name).is_file():
            plots.append(Path(shutil.copy(out / stage / name, plots_dir / f"{stage.replace('/', '_')}_{name}")))
    plots.append(fp8_plot(plots_dir / "fp8_vs_bf16.png", stages["fp8"]))
    throughput = stages["inference"]["decode_tokens_per_s"]
    title = "engine decode throughput (this machine)"
    labels = [f"batch {b}" for b in throughput]
    plots.append(bar_chart(plots_dir / "decode_throughput.png", labels, list(throughput.values()), title, "tokens / s"))
    v3 = get_preset("v3-671b")
    kinds = [("MLA", "mla"), ("GQA-8", "gqa"), ("MHA", "mha")]
    labels = [f"{name} {label}" for label, model in ((preset, cfg), ("V3", v3)) for name, _ in kinds]
    values = [kv_bytes_per_token(model, 2, kind) for _, model in ((preset, cfg), ("V3", v3)) for _, kind in kinds]
    plots.append(
        bar_chart(plots_dir / "kv_bytes.png", labels, values, "KV-cache bytes per token (bf16)", "bytes", log=True)
    )
    stats = model_stats(cfg)
    card = {
        "preset": preset,
        "params_total": stats.params_total,
        "params_active": stats.params_active,
        "params_mtp": stats.params_mtp,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "routed_experts": cfg.n_routed_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "kv_bytes_per_token": {label: kv_bytes_per_token(cfg, 2, kind) for label, kind in kinds},
    }
    cost = run_cost(cfg, plan, stages)
    stages = dict(stages) | {"report": {"seconds": round(time.perf_counter() - start, 1)}}
    total = sum(s["seconds"] for s in stages.values())
    header = provenance()
    report = {
        "preset": preset,
        "header": header,
        "plan": plan,
        "total_seconds": round(total, 1),
        "stages": stages,
        "model_card": card,
        "cost": cost,
        "plots": [str(p.relative_to(out)) for p in plots],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    s, grpo, sft, distill = stages, stages["grpo"], stages["sft"], stages["distill"]
    gpu_s = cost["gpu_seconds"]
    tool_samples = (s.get("tools") or {}).get("samples", {})
    lines = [
        f"# nanoseek speedrun: preset {preset}",
        "",
        header_line(header),
        "",
        f"{total / 60:.1f} minutes on this machine, from nothing to a model that reasons in the R1 format.",
        "",
        f"Each stage's cost: seconds on this machine, and its FLOPs (from the tokens it processed) as seconds of "
        f"{cost['gpu']} at DeepSeek-V3's {cost['mfu']:.0%} MFU.",
        "",
        "| stage | seconds | GPU-seconds | what it bought |",
        "|---|---|---|---|",
        f"| data | {s['data']['seconds']:.0f} | – | {s['data']['documents']} documents of Python's stdlib, BPE of "
        f"{s['data']['vocab_size']} |",
        f"| pretrain | {s['pretrain']['seconds']:.0f} | {gpu_s['pretrain']:.3g} | {s['pretrain']['steps']} steps, "
        f"{s['pretrain']['tokens']:,} tokens, val loss {s['pretrain']['val_loss']:.3f}"
        + (f" ({s['pretrain']['val_bpb']:.3f} bits/byte)" if s["pretrain"].get("val_bpb") else "")
        + f", {s['pretrain']['tokens_per_s']:.0f} tok/s"
        + (f", MFU {s['pretrain']['mfu']:.1%}" if s["pretrain"].get("mfu") else "")
        + balance(s["pretrain"].get("max_over_mean_load"))
        + " |",
        f"| fp8 | {s['fp8']['seconds']:.0f} | {gpu_s['fp8']:.3g} | FP8 / BF16 final loss "
        f"{s['fp8']['final_loss_ratio']:.3f}, speed {s['fp8']['speed_ratio']:.2f}x |",
        f"| sft | {sft['seconds']:.0f} | {gpu_s['sft']:.3g} | {sft['steps']} steps on {sft['examples']} worked "
        f"solutions: held-out pass@1 {sft['pass_at_1']:.3f} |",
        f"| distill | {distill['seconds']:.0f} | {gpu_s['distill']:.3g} | the SFT model's verified traces "
        f"({distill['kept']} of {distill['prompts']} prompts) taught to the pretrained model in "
        f"{distill.get('student_steps', 0)} steps: held-out pass@1 "
        + (f"{distill['student_pass_at_1']:.3f}" if distill.get("student_pass_at_1") is not None else "– (not trained)")
        + " |",
        f"| grpo | {grpo['seconds']:.0f} | {gpu_s['grpo']:.3g} | RL on the SFT model: held-out pass@1 "
        f"{grpo['pass_at_1_before']:.3f} -> "
        f"{grpo['pass_at_1_after']:.3f} ({(grpo['pass_at_1_after'] - grpo['pass_at_1_before']) * 100:+.1f} points, "
        f"{grpo['eval_n']} problems)"
        + (f"; rollouts at {grpo['rollout_tokens_per_s']:.0f} tok/s" if "rollout_tokens_per_s" in grpo else "")
        + " |",
        *tools_row(s.get("tools"), gpu_s.get("tools", 0.0)),
        f"| inference | {s['inference']['seconds']:.0f} | – | decode "
        + ", ".join(f"batch {b}: {v:.0f} tok/s" for b, v in throughput.items())
        + roofline_text(s["inference"])
        + mtp_text(s["inference"])
        + " |",
        f"| report | {s['report']['seconds']:.0f} | – | this card |",
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
        *(["", "Tool use (the turns, the calculator's results between them):", ""] if s.get("tools") else []),
        *[f"- `{_one_line(q)}` -> `{_one_line(text)[:400]}`" for q, text in tool_samples.items()],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    html = _markdown_to_html("\n".join(lines), {p.name: base64.b64encode(p.read_bytes()).decode() for p in plots})
    (out / "report.html").write_text(html)
    return [out / "report.json", out / "report.md", out / "report.html", *plots]


def tools_row(tools: dict[str, Any] | None, gpu_seconds: float) -> list[str]:
    """The tools stage's row (none for a run from before it existed)."""
    if not tools:
        return []
    gain = (tools["pass_at_1_with_tools"] - tools["pass_at_1_without_tools"]) * 100
    rl = (tools["pass_at_1_with_tools"] - tools["pass_at_1_sft_with_tools"]) * 100
    return [
        f"| tools | {tools['seconds']:.0f} | {gpu_seconds:.3g} | 3-digit x 2-digit products with a calculator: "
        f"SFT ({tools['sft_steps']} steps) then multi-turn GRPO ({tools['grpo_steps']} steps); held-out pass@1 "
        f"{tools['pass_at_1_with_tools']:.3f} with the tool ({rl:+.1f} points from GRPO, SFT "
        f"{tools['pass_at_1_sft_with_tools']:.3f}), {tools['pass_at_1_without_tools']:.3f} without it "
        f"({gain:+.1f} points for the tool; {tools['eval_n']} problems) |"
    ]


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
            body.append(
                "<table><tr>"
                + "".join(f"<th>{inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
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
    style = (
        "body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:left}"
        "img{max-width:100%;display:block;margin:1rem 0}code{background:#f4f4f4;padding:0 .2rem}"
    )
    return f"<!doctype html><meta charset='utf-8'><title>nanoseek report</title><style>{style}</style>\n" + "\n".join(
        body
    )


def mtp_text(inference: dict[str, Any]) -> str:
    if "mtp" not in inference:
        return ""
    mtp = inference["mtp"]
    accepted = ", ".join(f"{rate:.0%}" for rate in mtp["acceptance_by_position"])
    return f"; MTP, one draft: {accepted} accepted, {mtp['tokens_per_step']:.2f} tokens/step, {mtp['speedup']:.2f}x"


def roofline_text(inference: dict[str, Any]) -> str:
    """How much of the CPU's read bandwidth decode reached at batch 1 (results of older runs lack it)."""
    if "roofline_fraction" not in inference:
        return ""
    return (
        f" (batch 1 reads {inference['roofline_fraction']['1']:.0%} of the {inference['read_gb_per_s']} GB/s roofline)"
    )
