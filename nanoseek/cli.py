"""`nanoseek <command>`: the command line.

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from nanoseek.config import PRESETS, ModelConfig, get_preset
from nanoseek.cost import GPUS, all_to_all_bytes_per_token, human, model_stats


def _config_from_args(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_json(args.model) if args.model else get_preset(args.preset)


def cmd_info(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    stats = model_stats(cfg, dtype_bytes=args.kv_bytes)
    a2a = all_to_all_bytes_per_token(cfg, args.ep) if args.ep > 1 else None
    if args.json:
        extra = {} if a2a is None else {"ep": args.ep, "all_to_all_bytes_per_token": a2a}
        print(json.dumps({"source": args.model or args.preset, **stats.as_dict(), **extra}))
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
        ("parameters", f"{human(stats.params_total)} ({stats.params_total:,})"),
        ("active per token", f"{human(stats.params_active)} ({stats.params_active:,})"),
        ("MTP modules", f"{human(stats.params_mtp)} ({cfg.num_nextn_predict_layers} depth)"),
        (
            f"KV cache / token ({args.kv_bytes} B/elem)",
            f"MLA {human(stats.kv_bytes_per_token, 'B')} vs MHA {human(stats.kv_bytes_per_token_mha, 'B')} "
            f"({ratio:.1f}x smaller)",
        ),
    ]
    if a2a is not None:
        rows.append((f"all-to-all / token (EP={args.ep})", f"{human(a2a, 'B')} forward (bf16), as much again backward"))
    from nanoseek.device import cpu_features

    rows.append(("this CPU", cpu_features()))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from nanoseek.cost import cost_report, format_cost_report, parse_count
    from nanoseek.serve.billing import PriceTable

    report = cost_report(
        _config_from_args(args),
        GPUS[args.gpu],
        tokens=parse_count(args.tokens),
        seq_len=args.seq_len,
        mfu=args.mfu,
        v3_report=args.v3_report,
        price_per_gpu_hour=args.price_per_gpu_hour,
        weights=args.weights,
        context_len=args.context_len,
        gpus_per_node=args.gpus_per_node,
    )
    prices = PriceTable.parse(args.prices, args.currency)
    inputs, outputs = parse_count(args.input_tokens), parse_count(args.output_tokens)
    hit = round(inputs * args.hit_rate)
    report["api"] = {
        "input_tokens": inputs,
        "output_tokens": outputs,
        "hit_rate": args.hit_rate,
        "price": float(prices.cost(hit, round(inputs) - hit, round(outputs))),
        "currency": prices.currency,
    }
    print(json.dumps(report, indent=2) if args.json else format_cost_report(report, args.preset or args.model))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from nanoseek.data import expand_inputs, iter_texts
    from nanoseek.tokenizer import train_tokenizer

    files = expand_inputs(args.input)
    tokenizer = train_tokenizer(iter_texts(files), args.vocab_size)
    tokenizer.save(args.out)
    print(f"trained a {tokenizer.vocab_size}-token BPE on {len(files)} file(s) -> {args.out}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from nanoseek.data import expand_inputs, prepare
    from nanoseek.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    meta = prepare(
        expand_inputs(args.input),
        tokenizer,
        args.out,
        seed=args.seed,
        val_permille=args.val_permille,
        fim_rate=args.fim_rate,
    )
    tokenizer.save(f"{args.out}/tokenizer")  # the data remembers how it was tokenised
    tokens = {split: sum(s["tokens"] for s in shards) for split, shards in meta.shards.items()}
    print(f"{meta.documents} documents, {tokens} tokens ({meta.dtype}) -> {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from nanoseek.train import parallel
    from nanoseek.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    trainer, history = parallel.fit(Trainer(cfg))
    if history and trainer.par.is_main:
        last = history[-1]
        val = next((m["val_loss"] for m in reversed(history) if m.get("val_loss") is not None), None)
        print(
            f"step {last['step']}: loss {last['loss']:.3f}, val loss {val if val is None else round(val, 3)}, "
            f"{last['tokens_per_s']:.0f} tok/s; model in {cfg.out}/model"
        )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import torch

    from nanoseek.checkpoint import from_pretrained, save_pretrained

    model = from_pretrained(args.model, dtype=torch.float32)  # dequantizes an FP8 source
    if args.to == "bf16":
        model = model.to(torch.bfloat16)
    save_pretrained(model, args.out, fp8=args.to == "fp8")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(args.model) / name).is_file():
            shutil.copy(Path(args.model) / name, Path(args.out) / name)
    size = sum(p.stat().st_size for p in Path(args.out).glob("*.safetensors"))
    print(f"{args.model} -> {args.out} ({args.to}, {size / 2**20:.1f} MiB of weights)")
    return 0


def _sampling_params(args: argparse.Namespace):
    from nanoseek.serve import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or [],
    )


def _engine(args: argparse.Namespace):
    from nanoseek.serve import Engine

    return Engine(
        args.model, fp8_cache=args.fp8_cache, enforce_eager=not args.capture, weights=args.weights, model_parallel=True
    )


def expert_rank(args: argparse.Namespace) -> int | None:
    """Under torchrun, a rank > 0 serves its share of the routed experts to rank 0 (nanoseek.serve.parallel)
    and returns its exit code here; rank 0 and a lone process get None and go on."""
    from nanoseek.serve import parallel

    ranks = parallel.from_env()
    return parallel.run_worker(args.model, ranks, args.weights) if ranks and ranks.rank > 0 else None


def cmd_generate(args: argparse.Namespace) -> int:
    if (code := expert_rank(args)) is not None:
        return code
    engine = _engine(args)
    try:
        prompt = args.prompt
        if args.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
        params = _sampling_params(args)
        if args.no_stream:
            print(engine.generate([prompt], params)[0].text)
            return 0
        for piece in engine.stream(prompt, params):
            print(piece, end="", flush=True)
        print()
        return 0
    finally:
        engine.close()


def cmd_chat(args: argparse.Namespace) -> int:
    if (code := expert_rank(args)) is not None:
        return code
    engine = _engine(args)
    try:
        return _chat(engine, args)
    finally:
        engine.close()


def _chat(engine, args: argparse.Namespace) -> int:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("nanoseek chat: type a message; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            user = input("you> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        prompt = engine.tokenizer.apply_chat_template(messages, tokenize=True)  # typed specials stay text
        reply = ""
        print("assistant> ", end="", flush=True)
        for piece in engine.stream(prompt, _sampling_params(args)):
            reply += piece
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="a model folder with its tokenizer")
    from nanoseek.serve.sampling import SamplingParams

    d = SamplingParams()  # one set of sampling defaults: the engine's, the API's (OpenAI's), the CLI's
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="0: off")
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--min-p", type=float, default=d.min_p)
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", nargs="*", metavar="TEXT", help="stop strings")
    parser.add_argument("--fp8-cache", action="store_true", help="keep the latent KV cache in FP8")
    parser.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "fp8", "bf16", "fp32"],
        help="projection weights in memory: fp8 (E4M3 with 128x128 block scales, about 1 byte "
        "per parameter), bf16 or fp32 (dequantised); auto: fp8 for an FP8 checkpoint",
    )
    parser.add_argument(
        "--capture",
        action="store_true",
        help="capture decode steps with torch.compile, once per batch bucket (seconds to compile "
        "on a CPU, then fewer per-step overheads)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    if (code := expert_rank(args)) is not None:
        return code
    from nanoseek.serve.api import ServeConfig, serve

    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    serve(ServeConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    from nanoseek.serve.billing import Ledger, PriceTable, usage_report

    if not Path(args.ledger).is_file():
        raise SystemExit(f"no ledger at {args.ledger}: pass the --ledger file `nanoseek serve` writes")
    ledger = Ledger(args.ledger, PriceTable.parse(args.prices, args.currency))
    print(usage_report(ledger, as_csv=args.csv), end="")
    ledger.close()
    return 0


def cmd_speedrun(args: argparse.Namespace) -> int:
    from nanoseek.speedrun import Speedrun

    report = Speedrun(args.preset, args.out, plan=args.plan).run()
    grpo = report["stages"]["grpo"]
    print(
        f"speedrun done in {report['total_seconds'] / 60:.1f} min: held-out pass@1 {grpo['pass_at_1_before']:.3f} -> "
        f"{grpo['pass_at_1_after']:.3f}; report card: {args.out}/report.md, {args.out}/report.html"
    )
    if args.serve:
        from nanoseek.serve.api import ServeConfig, serve

        serve(
            ServeConfig(
                model=str(Path(args.out) / "grpo" / "model"), port=args.port, cache_dir=str(Path(args.out) / "kv-cache")
            )
        )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from nanoseek.plots import plot_run

    for path in plot_run(args.run):
        print(path)
    return 0


def add_dataclass_flags(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None
) -> None:
    """One kebab-case flag per config field (but `skip`), with its type, default (or `defaults`) and help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default)
        flag, kind, help_text = f"--{f.name.replace('_', '-')}", hints[f.name], f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
        parser.add_argument(flag, type=base, default=default, help=f"{help_text} (default: {default})")


def _fields(cls: type, args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parsed flags that are fields of cls, but those the caller sets itself."""
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    return {k: v for k, v in vars(args).items() if k in names}


SFT_SKIP = ("preset", "init", "objective", "data", "teacher", "kl_weight")
SFT_DEFAULTS = {"steps": 200, "lr": 1e-3, "warmup_steps": 10, "out": "runs/sft", "eval_every": 50, "save_every": 50}


def cmd_sft(args: argparse.Namespace) -> int:
    from nanoseek.train import parallel
    from nanoseek.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(**_fields(TrainConfig, args, SFT_SKIP), init=args.model, data=args.data, objective="sft")
    trainer, history = parallel.fit(Trainer(cfg))
    if trainer.par.is_main:
        print(f"fine-tuned {cfg.steps} steps: final loss {history[-1]['loss']:.4f} -> {cfg.out}/model")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from nanoseek.rl.distill import distill, read_problems
    from nanoseek.rl.tasks import get_task
    from nanoseek.train.config import TrainConfig

    task = get_task(args.task) if args.task else None
    teacher = args.teacher if args.kl_weight > 0 else None
    cfg = TrainConfig(
        **_fields(TrainConfig, args, SFT_SKIP),
        init=args.student,
        objective="sft",
        data=str(Path(args.out) / "traces.jsonl"),
        teacher=teacher,
        kl_weight=args.kl_weight,
    )
    stats = distill(
        args.teacher,
        read_problems(args.prompts),
        task,
        cfg,
        samples=args.samples,
        temperature=args.teacher_temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the first process prints
        print(f"teacher: {stats['kept']} of {stats['prompts']} prompts kept (accuracy {stats['teacher_accuracy']:.3f})")
        print(stats.get("note") or f"student fine-tuned on the teacher's traces -> {cfg.out}/model")
    return 0 if "note" not in stats else 1


def cmd_grpo(args: argparse.Namespace) -> int:
    from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer
    from nanoseek.train import parallel

    trainer, history = parallel.fit(GRPOTrainer(GRPOConfig(**_fields(GRPOConfig, args))))
    evals = [m["eval/pass_at_1"] for m in history if "eval/pass_at_1" in m]
    if len(evals) >= 2 and trainer.par.is_main:
        print(f"held-out pass@1: {evals[0]:.3f} before, {evals[-1]:.3f} after -> {args.out}/model")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.lm_eval:
        return cmd_lm_eval(args)
    if not (args.model and args.task):
        raise SystemExit("nanoseek eval needs --model DIR and --task (or --lm-eval TASK.yaml with --model or --url)")
    from nanoseek.rl.evaluate import batch_engine, evaluate
    from nanoseek.rl.tasks import get_task

    ks = tuple(int(k) for k in args.k.split(","))
    task = get_task(args.task)
    problems = task.problems(args.split, args.n, args.seed)
    result = evaluate(
        batch_engine(args.model),
        task,
        problems,
        samples=args.samples,
        ks=ks,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps({f"pass@{k}": v for k, v in result.pass_at.items()} | {"n": args.n, "task": args.task}))
        return 0
    for problem, reply, reward in result.samples[: args.show]:
        print(f"{problem.question}\n  -> {reply!r} (reward {reward})")
    print(", ".join(f"pass@{k} {v:.3f}" for k, v in result.pass_at.items()) + f" on {args.n} {args.split} problems")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from nanoseek import harness

    yamls = [Path(y) for y in args.lm_eval]
    for y in yamls:
        if not y.is_file():
            raise SystemExit(f"no task YAML at {y}")
    options = dict(
        model_name=args.served_model_name,
        limit=args.limit,
        output=args.output,
        concurrency=args.concurrency,
        api_key=args.api_key,
    )
    if args.url:
        return harness.run(args.url, yamls, **options)
    if not args.model:
        raise SystemExit("--lm-eval needs --url of a running server, or --model DIR to serve for the evaluation")
    with harness.served(args.model, args.concurrency) as url:
        return harness.run(url, yamls, **options)


def cmd_task_write(args: argparse.Namespace) -> int:
    from nanoseek.data import sft_row
    from nanoseek.rl.tasks import get_task

    task = get_task(args.task)
    problems = task.problems(args.split, args.n, args.seed)
    with open(args.out, "w") as f:
        for p in problems:
            if args.solutions:  # chat examples for nanoseek sft (with the tools they call, if any)
                f.write(sft_row(task.conversation(p), task.tools))
            else:  # prompts for nanoseek distill (with what the verifier needs)
                f.write(json.dumps({"prompt": p.question, "answer": p.answer, "meta": p.meta}) + "\n")
    print(f"{len(problems)} {args.split} problems of {args.task} -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="The DeepSeek-V3 system in one PyTorch codebase.",
        epilog="start here: nanoseek speedrun (the whole system in 15 minutes on a CPU, with a report card); "
        "`nanoseek COMMAND --help` for each command",
    )
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
    info.add_argument("--ep", type=int, default=1, metavar="E", help="also the all-to-all bytes per token at EP=E")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    speedrun = commands.add_parser(
        "speedrun",
        help="the whole system end to end, with a report card (tiny: 15 minutes on a 2-core CPU)",
        description="Tokenizer and data -> pretraining (FP8 where the hardware has it; a short FP8 vs BF16 "
        "comparison) -> SFT -> distillation -> GRPO -> evaluation -> decode benchmark -> report.md, "
        "report.html, report.json; optionally the API server. A rerun skips finished stages and resumes a "
        "killed one.",
    )
    speedrun.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    speedrun.add_argument("--out", default="runs/speedrun", metavar="DIR")
    speedrun.add_argument(
        "--plan",
        choices=["tiny", "small", "quick"],
        help="stage sizes (default: the preset's; quick: a smoke test of a minute or two)",
    )
    speedrun.add_argument("--serve", action="store_true", help="then serve the final model (chat page at /)")
    speedrun.add_argument("--port", type=int, default=8000)
    speedrun.set_defaults(func=cmd_speedrun)

    cost = commands.add_parser(
        "cost",
        help="FLOPs, GPU-hours and dollars to train a config; serving memory; API prices",
        description="Training cost from a config: FLOPs per token (MLA attention, activated MoE weights, MTP), "
        "GPU-hours and money at an MFU; serving: weight bytes, latent KV bytes per token, contexts per node; "
        "and the API price of a workload at a cache-hit rate.",
        epilog="DeepSeek-V3's budget: nanoseek cost --preset v3-671b --v3-report",
    )
    source = cost.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="v3-671b", help="a built-in config")
    source.add_argument("--model", metavar="DIR", help="a folder with a DeepSeek-V3 config.json")
    cost.add_argument("--tokens", default="14.8T", help="training tokens (default: 14.8T)")
    cost.add_argument("--seq-len", type=int, default=4096, help="training sequence length (default: 4096)")
    cost.add_argument("--gpu", choices=sorted(GPUS), default="h800")
    cost.add_argument("--mfu", type=float, help="model FLOPs utilisation of BF16 peak (default: V3's implied)")
    cost.add_argument("--price-per-gpu-hour", type=float, default=2.0, help="rental, dollars (default: 2, V3's)")
    cost.add_argument(
        "--v3-report",
        action="store_true",
        help="DeepSeek-V3's phases (pre-training, 32K and 128K "
        "context extension) against its reported 2,788K GPU-hours",
    )
    cost.add_argument("--context-len", type=int, default=32768, help="serving context length (default: 32768)")
    cost.add_argument(
        "--gpus",
        "--gpus-per-node",
        dest="gpus_per_node",
        type=int,
        default=8,
        help="GPUs serving one copy of the model (default: 8, one node)",
    )
    cost.add_argument(
        "--weights",
        choices=["fp8", "bf16"],
        default="fp8",
        help="serving weights: fp8 with 128x128 block scales (DeepSeek's) or bf16 (default: fp8)",
    )
    cost.add_argument("--input-tokens", default="1M", help="API workload input tokens (default: 1M)")
    cost.add_argument("--output-tokens", default="1M", help="API workload output tokens (default: 1M)")
    cost.add_argument("--hit-rate", type=float, default=0.5, help="share of input tokens that hit the cache")
    cost.add_argument("--prices", default="0.5,2,8", help="per million tokens: cache hit, miss, output")
    cost.add_argument("--currency", default="CNY")
    cost.add_argument("--json", action="store_true")
    cost.set_defaults(func=cmd_cost)

    tok = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    tok_train = tok.add_parser("train", help="train on text files", description="Train a byte-level BPE.")
    tok_train.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, folders or globs")
    tok_train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    tok_train.add_argument("--out", required=True, metavar="DIR")
    tok_train.set_defaults(func=cmd_tokenizer_train)

    data = commands.add_parser("data", help="tokenise a corpus into shards").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    about = "Tokenise text, JSONL ('text') and parquet ('text') into memmap shards."
    prep = data.add_parser("prepare", help="text, JSONL and parquet -> token shards", description=about)
    prep.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, folders or globs")
    prep.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer folder or tokenizer.json")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    prep.add_argument("--val-permille", type=int, default=10, help="documents per 1000 kept for validation")
    prep.add_argument(
        "--fim-rate",
        type=float,
        default=0.1,
        help="share of training documents turned into "
        "fill-in-the-middle examples, prefix-suffix-middle (default: 0.1, DeepSeek-V3's)",
    )
    prep.set_defaults(func=cmd_data_prepare)

    from nanoseek.train.config import TrainConfig

    train = commands.add_parser(
        "train",
        help="pretrain a model (default: tiny, on Python's stdlib)",
        description="Pretrain with MTP and auxiliary-loss-free balancing.",
    )
    add_dataclass_flags(train, TrainConfig)
    train.set_defaults(func=cmd_train)

    convert = commands.add_parser(
        "convert",
        help="rewrite a checkpoint in FP8 or bf16",
        description="Convert a DeepSeek-V3 model folder to DeepSeek's FP8 format (E4M3 weights with a "
        "weight_scale_inv per 128x128 block) or back to bf16.",
    )
    convert.add_argument("--model", required=True, metavar="DIR")
    convert.add_argument("--to", required=True, choices=["fp8", "bf16"])
    convert.add_argument("--out", required=True, metavar="DIR")
    convert.set_defaults(func=cmd_convert)

    gen = commands.add_parser("generate", help="complete a prompt", description="Generate text from a prompt.")
    add_sampling_flags(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--no-stream", action="store_true", help="print the result once it is complete")
    gen.set_defaults(func=cmd_generate)

    chat = commands.add_parser(
        "chat",
        help="an interactive chat in the terminal",
        description="Chat with a model, with streaming and the chat template.",
    )
    add_sampling_flags(chat)
    chat.add_argument("--system", default="", help="a system prompt")
    chat.set_defaults(func=cmd_chat)

    from nanoseek.serve.config import ServeConfig

    server = commands.add_parser(
        "serve",
        help="an OpenAI/DeepSeek-compatible API server with context caching and billing",
        description="Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /v1/billing, "
        "/metrics, and a chat page at /. Prompt prefixes are cached in 64-token units in memory and, with "
        "--cache-dir, on disk; usage is billed as cache-hit input, cache-miss input and output tokens.",
        epilog="example: nanoseek serve --model runs/tiny/model --cache-dir ~/.cache/nanoseek/kv, then open "
        "http://127.0.0.1:8000/ or point an OpenAI client at http://127.0.0.1:8000/v1",
    )
    add_dataclass_flags(server, ServeConfig)
    server.set_defaults(func=cmd_serve)

    ledger = commands.add_parser(
        "ledger",
        help="per-key usage, cost and balance from a serving ledger",
        description="Print (or export as CSV) every API key's usage, cost, balance and "
        "open reservations, from the SQLite ledger that `nanoseek serve` writes.",
    )
    ledger.add_argument("--ledger", required=True, help="the ledger file (serve's --ledger)")
    ledger.add_argument("--prices", default="0.5,2,8", help="per million tokens: cache-hit,cache-miss,output")
    ledger.add_argument("--currency", default="CNY")
    ledger.add_argument("--csv", action="store_true", help="CSV on stdout instead of a table")
    ledger.set_defaults(func=cmd_ledger)

    sft = commands.add_parser(
        "sft",
        help="supervised fine-tuning on chat JSONL (loss on assistant tokens)",
        description="Fine-tune a model folder on OpenAI-style chat examples with the "
        "pretraining trainer: DeepSeek-V3's chat template, loss on assistant tokens only, "
        "multi-turn, padded batches (examples never attend to each other).",
    )
    sft.add_argument("--model", required=True, metavar="DIR", help="the model folder to start from")
    sft.add_argument("--data", required=True, metavar="FILE", help='JSONL, one {"messages": [...]} per line')
    add_dataclass_flags(sft, TrainConfig, skip=SFT_SKIP, defaults=SFT_DEFAULTS)
    sft.set_defaults(func=cmd_sft)

    distill = commands.add_parser(
        "distill",
        help="fine-tune a student on a teacher's verified chain-of-thought",
        description="The teacher samples <think>...</think><answer>...</answer> replies "
        "with the engine, the task's verifier keeps the right ones (rejection sampling), "
        "and the student is fine-tuned on them (plus KL to the teacher's logits with "
        "--kl-weight).",
    )
    distill.add_argument("--teacher", required=True, metavar="DIR")
    distill.add_argument("--student", required=True, metavar="DIR")
    distill.add_argument(
        "--prompts", required=True, metavar="FILE", help="JSONL of prompt/answer/meta (nanoseek task write)"
    )
    distill.add_argument("--task", help="the verifier that filters the traces (arithmetic, countdown, FILE.jsonl)")
    distill.add_argument("--samples", type=int, default=4, help="teacher replies per prompt (default: 4)")
    distill.add_argument("--teacher-temperature", type=float, default=0.7)
    distill.add_argument("--max-tokens", type=int, default=128, help="longest teacher reply")
    distill.add_argument("--kl-weight", type=float, default=0.0, help="also match the teacher's logits")
    add_dataclass_flags(distill, TrainConfig, skip=SFT_SKIP, defaults=SFT_DEFAULTS | {"out": "runs/distill"})
    distill.set_defaults(func=cmd_distill)

    from nanoseek.rl.config import GRPOConfig

    grpo = commands.add_parser(
        "grpo",
        help="GRPO with rule-based rewards on a verifiable task",
        description="Group Relative Policy Optimization (DeepSeekMath, R1): G sampled "
        "completions per prompt, rule rewards, group-relative advantages, clipped "
        "objective, optional k3 KL to a frozen reference.",
    )
    add_dataclass_flags(grpo, GRPOConfig)
    grpo.set_defaults(func=cmd_grpo)

    ev = commands.add_parser(
        "eval",
        help="pass@k on a task's held-out problems, or lm-evaluation-harness tasks against a served model",
        description="Sample replies to held-out problems and score them with the verifier; or, with --lm-eval, "
        "run lm-evaluation-harness task YAMLs (loglikelihood and generate_until) against a server: --url of a "
        "running one, or --model DIR to serve it for the run.",
    )
    ev.add_argument("--model", metavar="DIR")
    ev.add_argument("--task", help="arithmetic, countdown or FILE.jsonl")
    ev.add_argument("--n", type=int, default=200, help="problems (default: 200)")
    ev.add_argument("--split", default="test", choices=["test", "train"])
    ev.add_argument("--samples", type=int, default=1, help="replies per problem (default: 1)")
    ev.add_argument("--k", default="1", help="comma-separated k for pass@k (default: 1)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ev.add_argument("--max-tokens", type=int, default=128)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--show", type=int, default=3, help="print this many replies")
    ev.add_argument("--json", action="store_true")
    lm = ev.add_argument_group("lm-evaluation-harness (pip install 'lm-eval[api]')")
    lm.add_argument("--lm-eval", nargs="+", metavar="TASK.yaml", help="task YAMLs (data files relative to them)")
    lm.add_argument("--url", help="a running server's base URL, e.g. http://127.0.0.1:8000")
    lm.add_argument("--served-model-name", default="nanoseek", help="the model name the server answers to")
    lm.add_argument("--api-key", default=None, help="bearer key for a server started with --api-keys")
    lm.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    lm.add_argument("--output", default=None, metavar="DIR", help="results and per-item samples (JSONL)")
    lm.add_argument("--concurrency", type=int, default=1, help="requests in flight (default: 1)")
    ev.set_defaults(func=cmd_eval)

    task = commands.add_parser("task", help="verifiable tasks").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    about = "Write a task's problems as prompts (prompt/answer/meta, for distill) or as chat examples for sft."
    write = task.add_parser("write", help="problems as JSONL", description=about)
    write.add_argument("--task", required=True, help="arithmetic, countdown or calculator (tool use)")
    write.add_argument("--split", default="train", choices=["train", "test"])
    write.add_argument("--n", type=int, required=True)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--solutions", action="store_true", help="chat examples with worked solutions")
    write.add_argument("--out", required=True, metavar="FILE")
    write.set_defaults(func=cmd_task_write)

    plot = commands.add_parser("plot", help="PNG plots of a run folder")
    plot.add_argument("run", metavar="DIR", help="a run folder with metrics.jsonl")
    plot.set_defaults(func=cmd_plot)
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
