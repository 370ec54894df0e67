"""Serving tokens/s on one process against N torchrun ranks (data-parallel attention, expert parallelism by
all-to-all: nanoseek.serve.parallel), and the bytes the MoE exchange moves.

    python benchmarks/bench_dpep.py [--ranks 2] [--requests 16] [--new-tokens 64] [--preset tiny | --model DIR]

A random model of the preset (tiny by default; MTP off) is saved with a byte-level BPE trained on the
standard library, as bench_llamacpp.py does (or --model DIR is used as it is). The same script then runs
as child processes of this one: alone (one Engine, OMP_NUM_THREADS = the machine's cores), and under
`torchrun --standalone --nproc-per-node N` (gloo on CPU; NCCL when CUDA is available, one GPU per rank,
`cuda:LOCAL_RANK`), every rank an Engine with E / N of the routed experts, rank 0's requests handed out by
DataParallelFront, OMP_NUM_THREADS = cores / N per rank so that both runs use the same threads in all (on
a CPU also a third run, below). All run eagerly (the data-parallel path always does), in fp32 unless
--weights says otherwise, and serve the same --requests concurrent greedy requests (--new-tokens each, EOS
ignored) on prompts of varied lengths cut from standard-library text, after a short warm-up under another
cache salt (no prefix-cache hits).

Printed: generated tokens/s of both and their ratio; whether the greedy tokens of the two are identical;
and for the N-rank run the bytes a token moves between ranks per MoE layer (ExchangeMetrics: the rows and
routing of the (token, rank) units sent to other ranks and the fp32 sums sent back, counted by the sending
rank, over the tokens through the layer, prompts included) beside what the broadcast design it replaced
would move: (N - 1) x (hidden x itemsize + k x (4 + 8)) out and (N - 1) x hidden x 4 back per token and
MoE layer. (The per-round [active, count] headers, a few bytes per rank and round, are in neither.)

On a 2-core machine no speed-up from data parallelism can show: the ranks share the 2 cores that the lone
process already uses with 2 threads, so nothing is added but the exchange (its collectives in every MoE
layer, the lock-step rounds, half-sized batches per rank). The main ratio there says more about threads
than about the exchange: at the tiny preset an eager step is bound by per-op dispatch, and a process with 2
intra-op threads on 2 cores stalls at every op's barrier whenever anything else takes one of the cores
(on the shared 2-vCPU machine this was written on, it measured anywhere from 90 to 1,600 tok/s between
runs), while single-threaded ranks each dispatch their own ops and degrade gracefully. Hence, on a CPU, a
third run: one process with 1 thread, against which the N ranks show the exchange's cost. The bytes per
token carry over to real hardware; the speed does not. Each run's time is the median of --repeats timed
passes (each under its own cache salt). `--json PATH` writes the figures (benchmarks/gpu_check.sh uses it
for the NCCL path).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def prompts_for(engine, requests: int) -> list[list[int]]:
    """`requests` prompts of 16 to 250 tokens, windows of standard-library text (random ids without a
    tokenizer): the same on every run of this machine."""
    import torch

    from nanoseek.data import iter_texts, stdlib_files

    lengths = [16 + (i * 53) % 235 for i in range(requests)]
    need = max(lengths) + 97 * requests
    stream: list[int] = []
    if engine.tokenizer is not None:
        for text in iter_texts(stdlib_files()[::50]):
            stream += engine.tokenizer.encode_text(text)
            if len(stream) >= need:
                break
    if len(stream) < need:
        vocab = engine.model.cfg.vocab_size
        stream = torch.randint(3, vocab, (need,), generator=torch.Generator().manual_seed(0)).tolist()
    return [stream[97 * i : 97 * i + n] for i, n in enumerate(lengths)]


def worker(args: argparse.Namespace) -> int:
    """One process of a run (alone, or a rank of the torchrun launch): serve the requests, and print the
    figures as one JSON line from rank 0."""
    import torch
    import torch.distributed as dist

    from nanoseek import SamplingParams
    from nanoseek.serve.config import EngineConfig
    from nanoseek.serve.engine import Engine
    from nanoseek.serve.launch import from_env
    from nanoseek.serve.parallel import DataParallelFront, run_worker

    cfg = EngineConfig(weights=args.weights, enforce_eager=True, pack_weights="off", cache_memory_mb=64)
    ranks = from_env(timeout_s=cfg.dist_timeout)  # NCCL and cuda:LOCAL_RANK where CUDA is available, else gloo
    device = ranks.device if ranks is not None else None
    engine = Engine(args.model, config=cfg, device=device, model_parallel=True)
    if ranks is not None and ranks.rank > 0:
        return run_worker(engine)
    front = DataParallelFront(engine) if ranks is not None else engine
    try:
        warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        front.generate([[5 + i] * (8 + i) for i in range(max(4, ranks.world if ranks else 1))], warm, "warm-up")
        prompts = prompts_for(engine, args.requests)
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        before, times, tokens = copy.deepcopy(front.rank_stats()), [], []
        for repeat in range(args.repeats):
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            start = time.perf_counter()
            outs = front.generate(prompts, params, f"pass {repeat}")  # no prefix-cache hits between passes
            times.append(time.perf_counter() - start)
            tokens.append([o.token_ids for o in outs])
        after = front.rank_stats()

        def grown(key: str) -> list[int]:  # per rank: the key's growth over the timed run, summed over layers
            return [sum(a.get(key, [])) - sum(b.get(key, [])) for a, b in zip(after, before, strict=True)]

        model_cfg = engine.model.cfg
        result = {
            "ranks": ranks.world if ranks else 1,
            "backend": dist.get_backend() if ranks else None,
            "device": str(engine.device),
            "device_name": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "dtype": str(engine.model.embed_tokens.weight.dtype).removeprefix("torch."),
            "itemsize": engine.model.embed_tokens.weight.element_size(),
            "hidden": model_cfg.hidden_size,
            "top_k": model_cfg.num_experts_per_tok,
            "experts": model_cfg.n_routed_experts,
            "moe_layers": model_cfg.num_hidden_layers - model_cfg.first_k_dense_replace,
            "prompt_tokens": sum(len(p) for p in prompts),
            "new_tokens": sum(len(t) for t in tokens[0]),
            "seconds": statistics.median(times),
            "tokens": tokens[0],
            "passes_agree": all(t == tokens[0] for t in tokens),
            "finished": [(a["finished"] - b["finished"]) // args.repeats for a, b in zip(after, before, strict=True)],
            "moe_bytes": grown("moe_bytes"),
            "moe_tokens": grown("moe_tokens"),
        }
        print(json.dumps(result), flush=True)
    finally:
        front.close()
    return 0


def run(model: Path, args: argparse.Namespace, ranks: int, threads: int) -> dict:
    """One run of this script's --worker: alone (ranks 1) or under torchrun; rank 0's JSON line."""
    me = [str(Path(__file__).resolve()), "--worker", "--model", str(model), "--weights", args.weights]
    me += ["--requests", str(args.requests), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    cmd = [sys.executable, *me] if ranks == 1 else [*TORCHRUN, str(ranks), *me]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not rows:
        raise SystemExit(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return rows[-1]


def broadcast_bytes(ranks: int, hidden: int, itemsize: int, k: int) -> int:
    """Per token and MoE layer in the replaced design: the row, k fp32 weights and k int64 indices to every
    other rank, an fp32 partial sum back from each."""
    return (ranks - 1) * (hidden * itemsize + k * (4 + 8)) + (ranks - 1) * hidden * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="the random model's preset (without --model)")
    parser.add_argument("--model", type=Path, help="a model folder (with its tokenizer) instead of a random one")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes; must divide the routed experts")
    parser.add_argument("--requests", type=int, default=16, help="concurrent greedy requests")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument(
        "--weights", default="fp32", choices=["fp32", "bf16", "auto"], help="both runs (fp32: exact comparison)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per run (the median is printed)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before giving up")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.exit(worker(args))
    if args.ranks < 2:
        parser.error("--ranks must be at least 2 (the lone process is the other run)")
    if min(args.requests, args.new_tokens, args.repeats) < 1:
        parser.error("--requests, --new-tokens and --repeats must be positive")
    import torch
    from bench_llamacpp import save_model  # the same random model and stdlib tokenizer (benchmarks/ is on the path)

    from nanoseek.config import ModelConfig
    from nanoseek.device import cpu_features

    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and args.ranks > gpus:
        parser.error(f"--ranks {args.ranks} needs {args.ranks} GPUs with NCCL; this machine has {gpus}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or save_model(Path(tmp) / "model", args.preset)
        experts = ModelConfig.from_json(model).n_routed_experts
        if experts % args.ranks:
            raise SystemExit(f"--ranks {args.ranks} must divide the model's {experts} routed experts")
        alone = run(model, args, 1, cores)
        split = run(model, args, args.ranks, max(1, cores // args.ranks))
        single = run(model, args, 1, 1) if not gpus and cores > 1 else None  # the intra-op threads' share

    rate = {name: r["new_tokens"] / r["seconds"] for name, r in (("alone", alone), ("split", split))}
    same = alone["tokens"] == split["tokens"] and alone["passes_agree"] and split["passes_agree"]
    agree = sum(
        x == y for a, b in zip(alone["tokens"], split["tokens"], strict=True) for x, y in zip(a, b, strict=False)
    )
    total = sum(len(t) for t in alone["tokens"])
    measured = sum(split["moe_bytes"]) / max(1, sum(split["moe_tokens"]))
    broadcast = broadcast_bytes(args.ranks, split["hidden"], split["itemsize"], split["top_k"])
    where = split["device_name"] if split["device_name"] != "cpu" else cpu_features()
    name = args.model.name if args.model else f"random {args.preset}"
    print(where)
    print(
        f"{name} (hidden {split['hidden']}, {split['moe_layers']} MoE layers, {split['experts']} routed experts, "
        f"top-{split['top_k']}), {split['dtype']}, eager; {args.requests} concurrent greedy requests x "
        f"{args.new_tokens} new tokens, prompts of {alone['prompt_tokens']} tokens in all:"
    )
    one = f"1 process on {alone['device']}, {alone['threads']} threads"
    many = f"{args.ranks} ranks ({split['backend']}), {split['threads']} thread(s) each"
    print(f"  {one:44s} {rate['alone']:8.1f} tok/s ({alone['seconds']:.2f} s)")
    print(
        f"  {many:44s} {rate['split']:8.1f} tok/s ({split['seconds']:.2f} s), "
        f"requests finished per rank {split['finished']}"
    )
    if single is not None:
        rate["single"] = single["new_tokens"] / single["seconds"]
        one_thread = "1 process, 1 thread (reference)"
        print(f"  {one_thread:44s} {rate['single']:8.1f} tok/s ({single['seconds']:.2f} s)")
    print(f"  {args.ranks} ranks / 1 process: {rate['split'] / rate['alone']:.2f}x", end="")
    if single is not None:
        print(f" ({rate['split'] / rate['single']:.2f}x the 1-thread process)", end="")
    print()
    verdict = "identical" if same else f"DIFFERENT ({agree}/{total} positions agree)"
    print(f"  greedy tokens, 1 process vs {args.ranks} ranks: {verdict}")
    print(
        f"  bytes between ranks per token per MoE layer: {measured:.0f} measured (all-to-all) vs {broadcast} for the "
        f"broadcast design: {measured / broadcast:.2f}x"
    )
    if not gpus:
        print(
            f"  ({cores} CPU cores shared by every run: no data-parallel speed-up can show here; against the 1-thread "
            "process the ranks show the exchange's cost; see --help)"
        )
    report = {
        "device": where,
        "model": name,
        "ranks": args.ranks,
        "backend": split["backend"],
        "devices": [alone["device"], split["device"]],
        "threads": [alone["threads"], split["threads"]],
        "dtype": split["dtype"],
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "tokens_per_s": [rate["alone"], rate["split"]],
        "ratio": rate["split"] / rate["alone"],
        "tokens_per_s_one_thread": rate.get("single"),
        "seconds": [alone["seconds"], split["seconds"]],
        "repeats": args.repeats,
        "greedy_identical": same,
        "greedy_agreement": agree / max(1, total),
        "finished_per_rank": split["finished"],
        "bytes_per_token_per_moe_layer": measured,
        "broadcast_bytes_per_token_per_moe_layer": broadcast,
        "bytes_ratio": measured / broadcast,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
