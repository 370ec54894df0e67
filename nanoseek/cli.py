"""`nanoseek <command>`: the command line.

nanoseek info --preset v3-671b          # parameters, active parameters, KV-cache bytes per token
nanoseek info --model DIR --json        # the same for a Hugging Face model folder, as JSON
"""

from __future__ import annotations

import argparse
import json
import sys

from nanoseek.config import PRESETS, ModelConfig, get_preset
from nanoseek.cost import model_stats


def _human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _config_from_args(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_json(args.model) if args.model else get_preset(args.preset)


def cmd_info(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    stats = model_stats(cfg, dtype_bytes=args.kv_bytes)
    if args.json:
        print(json.dumps({"source": args.model or args.preset, **stats.as_dict()}))
        return 0
    ratio = stats.kv_bytes_per_token_mha / stats.kv_bytes_per_token
    rows = [
        ("model", args.model or f"preset {args.preset}"),
        (
            "layers",
            f"{cfg.num_hidden_layers} ({cfg.first_k_dense_replace} dense, "
            f"{cfg.num_hidden_layers - cfg.first_k_dense_replace} MoE), hidden {cfg.hidden_size}",
        ),
        ("experts", f"{cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}) + {cfg.n_shared_experts} shared"),
        ("parameters", f"{_human(stats.params_total)} ({stats.params_total:,})"),
        ("active per token", f"{_human(stats.params_active)} ({stats.params_active:,})"),
        ("MTP modules", f"{_human(stats.params_mtp)} ({cfg.num_nextn_predict_layers} depth)"),
        (
            f"KV cache / token ({args.kv_bytes} B/elem)",
            f"MLA {_human(stats.kv_bytes_per_token, 'B')} vs MHA {_human(stats.kv_bytes_per_token_mha, 'B')} "
            f"({ratio:.1f}x smaller)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek-V3 system in one PyTorch codebase.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser(
        "info",
        help="parameters, active parameters and KV-cache bytes of a model",
        description="Print model arithmetic for a preset or a Hugging Face model folder.",
    )
    source = info.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="a built-in config (default tiny)")
    source.add_argument("--model", metavar="DIR", help="a folder with a DeepSeek-V3 config.json")
    info.add_argument("--kv-bytes", type=int, default=2, metavar="N", help="bytes per cached element (bf16: 2)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
