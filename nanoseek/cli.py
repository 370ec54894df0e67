"""`nanoseek <command>`: the command line, a table of (settings dataclass, run function).

nanoseek info --preset v3-671b                  # parameters, active parameters, KV bytes per token
nanoseek tokenizer train --input DIR --vocab-size 4096 --out tok/
nanoseek data prepare --input DIR --tokenizer tok/ --out data/
nanoseek train --preset tiny --steps 300 --out runs/tiny    # default data: Python's stdlib source
nanoseek plot runs/tiny                         # loss and expert-load PNGs
nanoseek convert --model runs/tiny/model --to fp8 --out tiny-fp8/   # DeepSeek-V3's FP8 format
nanoseek generate --model runs/tiny/model --prompt "def fib(n):" --max-tokens 64
nanoseek chat --model runs/sft/model            # an interactive chat in the terminal
nanoseek serve --model runs/tiny/model --cache-dir kv/    # OpenAI/DeepSeek-compatible API + chat page
nanoseek task write --task arithmetic --n 2000 --solutions --out sft.jsonl
nanoseek sft --model runs/tiny/model --data sft.jsonl --out runs/sft
nanoseek grpo --model runs/sft/model --task arithmetic --out runs/grpo
nanoseek eval --model runs/grpo/model --task arithmetic --n 200
nanoseek distill --teacher DIR --student DIR --prompts prompts.jsonl --task arithmetic --out runs/distill

Each command's settings are a dataclass in the module that owns the work (its flags: `nanoseek.flags`) and
its run function takes them and returns the exit code. Both are named here as "module:attribute" and
imported only for the command that runs, so `nanoseek info` and any `--help` import no server or trainer.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any

from nanoseek.flags import add_dataclass_flags, from_args


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # "task write": an action of a command group
    settings: str  # "module:Class" under nanoseek: the settings dataclass (its docstring is the description)
    run: str  # "module:function" under nanoseek: called with the settings, returns the exit code
    help: str
    epilog: str | None = None


COST_EXAMPLE = "DeepSeek-V3's budget: nanoseek cost --preset v3-671b --v3-report"
SERVE_EXAMPLE = (
    "example: nanoseek serve --model runs/tiny/model --cache-dir ~/.cache/nanoseek/kv, then open "
    "http://127.0.0.1:8000/ or point an OpenAI client at http://127.0.0.1:8000/v1"
)
GROUPS = {
    "tokenizer": "train a byte-level BPE tokenizer",
    "data": "tokenise a corpus into shards",
    "task": "verifiable tasks",
}
COMMANDS = (
    Command(
        "speedrun",
        "speedrun:SpeedrunConfig",
        "speedrun:run",
        "the whole system end to end, with a report card (tiny: 15 minutes on a 2-core CPU)",
    ),
    Command(
        "info", "cost:InfoConfig", "cost:print_info", "parameters, active parameters and KV-cache bytes of a model"
    ),
    Command(
        "cost",
        "cost:CostConfig",
        "cost:print_cost",
        "FLOPs, GPU-hours and dollars to train a config; serving memory; API prices",
        epilog=COST_EXAMPLE,
    ),
    Command("tokenizer train", "data:TokenizerTrainConfig", "data:train_tokenizer_files", "train on text files"),
    Command("data prepare", "data:PrepareConfig", "data:prepare_files", "text, JSONL and parquet -> token shards"),
    Command(
        "train",
        "train.config:TrainConfig",
        "train.trainer:train",
        "pretrain a model (default: tiny, on Python's stdlib)",
    ),
    Command("plot", "plots:PlotConfig", "plots:plot", "PNG plots of a run folder"),
    Command("convert", "checkpoint:ConvertConfig", "checkpoint:convert", "rewrite a checkpoint in FP8 or bf16"),
    Command("generate", "serve.config:GenerateConfig", "serve.terminal:generate", "complete a prompt"),
    Command("chat", "serve.config:ChatConfig", "serve.terminal:chat", "an interactive chat in the terminal"),
    Command(
        "serve",
        "serve.config:ServeConfig",
        "serve.api:run",
        "an OpenAI/DeepSeek-compatible API server with context caching and billing",
        epilog=SERVE_EXAMPLE,
    ),
    Command(
        "ledger",
        "serve.config:LedgerConfig",
        "serve.ledger_report:print_ledger",
        "per-key usage, cost and balance from a serving ledger",
    ),
    Command("task write", "rl.config:TaskWriteConfig", "rl.tasks:write", "problems as JSONL"),
    Command(
        "sft",
        "train.config:SFTConfig",
        "train.trainer:sft",
        "supervised fine-tuning on chat JSONL (loss on assistant tokens)",
    ),
    Command(
        "distill",
        "rl.config:DistillConfig",
        "rl.distill:run",
        "fine-tune a student on a teacher's verified chain-of-thought",
    ),
    Command("grpo", "rl.config:GRPOConfig", "rl.grpo:run", "GRPO with rule-based rewards on a verifiable task"),
    Command(
        "eval",
        "rl.config:EvalConfig",
        "rl.evaluate:run",
        "pass@k on held-out problems, or lm-evaluation-harness tasks against a server",
    ),
)


def load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(f"nanoseek.{module}"), name)


def chosen(argv: list[str]) -> str | None:
    """The command that argv names ("task write" for a group's action), before any parsing."""
    words = [w for w in argv if not w.startswith("-")][:2]
    name = " ".join(words) if words and words[0] in GROUPS else (words or [None])[0]
    return name if any(c.name == name for c in COMMANDS) else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command listed; the flags of `command` alone (they import its settings' module)."""
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="The DeepSeek-V3 system in one PyTorch codebase.",
        epilog="start here: nanoseek speedrun (the whole system in 15 minutes on a CPU, with a report card); "
        "`nanoseek COMMAND --help` for each command",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for cmd in COMMANDS:
        group, _, action = cmd.name.partition(" ")
        if action and group not in groups:
            groups[group] = commands.add_parser(group, help=GROUPS[group]).add_subparsers(
                dest="action", required=True, metavar="ACTION"
            )
        sub = (groups[group] if action else commands).add_parser(action or group, help=cmd.help)
        sub.set_defaults(spec=cmd)
        if cmd.name == command:
            settings = load(cmd.settings)
            sub.description, sub.epilog = inspect.cleandoc(settings.__doc__), cmd.epilog
            add_dataclass_flags(sub, settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(chosen(argv)).parse_args(argv)
    try:
        return load(args.spec.run)(from_args(load(args.spec.settings), args))
    except (FileNotFoundError, ValueError) as e:
        print(f"nanoseek {args.spec.name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
