"""`nanoseek speedrun`: the whole system on a fresh machine, nothing to download, with a report card.

    nanoseek speedrun --preset tiny --out runs/speedrun [--serve]

Stages: data (a BPE and token shards of Python's own stdlib) -> pretrain (MLA + MoE + MTP, FP8 GEMMs
where the hardware has them) -> fp8 (a short FP8 run against BF16 from the same start) -> sft (worked
arithmetic solutions) -> distill (the SFT model's verified traces, rejection-sampled, taught to the
pretrained model) -> grpo (RL on the SFT model: held-out pass@1 before and after) -> tools (agentic RL:
SFT on calculator conversations, then multi-turn GRPO with the calculator; pass@1 with and without it)
-> inference (decode throughput, samples)
-> the report card (report.md, a self-contained report.html, report.json) -> optionally the API server.
Each stage leaves DIR/<stage>/result.json when done: a rerun skips finished stages, and a killed stage
resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanoseek.atomic import atomic_write
from nanoseek.config import get_preset
from nanoseek.cost import decode_step_bytes
from nanoseek.data import ensure_default_data, sft_row
from nanoseek.device import default_device, read_bandwidth
from nanoseek.flags import flag
from nanoseek.plots import plot_run
from nanoseek.report import write_report
from nanoseek.rl.agent import Toolbox
from nanoseek.rl.distill import distill
from nanoseek.rl.evaluate import evaluate
from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer
from nanoseek.rl.tasks import get_task
from nanoseek.serve.config import EngineConfig
from nanoseek.train.run import read_metrics
from nanoseek.train.trainer import TrainConfig, Trainer


@dataclass(frozen=True, slots=True)
class Plan:
    """How much of each stage a preset gets (the tiny plan fits 15 minutes on a 2-core CPU)."""

    pretrain_steps: int
    fp8_steps: int
    sft_steps: int
    sft_examples: int
    distill_prompts: int
    distill_steps: int
    grpo_steps: int
    eval_n: int
    # The tools stage: SFT on calculator conversations (small batches: copying the tool's result is learnt in
    # a jump after 300-600 updates, whatever their size, later or sooner with the GRPO model it starts from:
    # 400 steps gave 0.733 from one and 0.003 from another, where 600 gave 0.76), then GRPO with the calculator.
    tools_sft_steps: int = 600
    tools_sft_batch: int = 4
    tools_examples: int = 2400
    tools_grpo_steps: int = 15
    tools_prompts: int = 8  # per GRPO step, 8 rollouts each
    tools_lr: float = 2e-4
    batch_size: int = 16
    seq_len: int = 256
    teacher_samples: int = 2  # replies sampled per distillation prompt; the first verified one is kept
    teacher_temperature: float = 0.7
    grpo_lr: float = 2e-5


PLANS = {
    "tiny": Plan(
        pretrain_steps=250,
        fp8_steps=8,
        sft_steps=350,
        sft_examples=4000,
        distill_prompts=1000,
        distill_steps=350,
        grpo_steps=30,
        eval_n=400,
        grpo_lr=4e-5,
    ),
    "small": Plan(
        pretrain_steps=2000,
        fp8_steps=50,
        sft_steps=600,
        sft_examples=8000,
        distill_prompts=2000,
        distill_steps=400,
        grpo_steps=100,
        eval_n=500,
    ),
    "quick": Plan(
        pretrain_steps=12,
        fp8_steps=3,
        sft_steps=6,
        sft_examples=64,
        distill_prompts=16,
        distill_steps=3,
        grpo_steps=2,
        eval_n=16,
        tools_sft_steps=6,
        tools_grpo_steps=2,
        tools_examples=64,
        tools_prompts=4,
        batch_size=8,
        seq_len=128,
    ),
}
STAGES = ("data", "pretrain", "fp8", "sft", "distill", "grpo", "tools", "inference")
TASK = "arithmetic"


class Speedrun:
    def __init__(
        self, preset: str = "tiny", out: str | Path = "runs/speedrun", plan: str | None = None, progress: bool = True
    ):
        if preset not in ("tiny", "small"):
            raise ValueError("speedrun presets: tiny (15 minutes on a 2-core CPU) or small (a GPU)")
        self.preset, self.out, self.progress = preset, Path(out), progress
        self.plan = PLANS[plan or preset]
        self.cfg = get_preset(preset)
        self.task = get_task(TASK)
        self.fp8 = default_device().type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def result(self, stage: str) -> dict[str, Any] | None:
        path = self.dir(stage) / "result.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        steps: dict[str, Callable[[], dict[str, Any]]] = {s: getattr(self, f"stage_{s}") for s in STAGES}
        bar = tqdm(STAGES, desc="speedrun", unit="stage", disable=not self.progress, position=0)
        for stage in bar:
            bar.set_description(f"speedrun: {stage}")
            if self.result(stage) is not None:  # done in an earlier run
                continue
            self.dir(stage).mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            result = steps[stage]()
            result["seconds"] = round(time.perf_counter() - start, 1)
            atomic_write(self.dir(stage) / "result.json", json.dumps(result, indent=2) + "\n")
            bar.write(f"{stage}: done in {result['seconds']:.0f} s")
        bar.close()
        stages = {s: self.result(s) for s in STAGES}
        write_report(self.out, self.preset, self.cfg, asdict(self.plan), stages)  # adds stages.report
        return json.loads((self.out / "report.json").read_text())

    # --- the stages ------------------------------------------------------------------------------
    def _train_config(self, **kwargs) -> TrainConfig:
        plan = self.plan
        options = dict(
            preset=self.preset,
            batch_size=plan.batch_size,
            seq_len=plan.seq_len,
            progress=self.progress,
            eval_every=max(1, kwargs.get("steps", plan.pretrain_steps) // 5),
            save_every=50,
        )
        out = Path(kwargs["out"])
        options["resume"] = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step_*"))
        return TrainConfig(**(options | kwargs))

    def stage_data(self) -> dict[str, Any]:
        data = ensure_default_data(self.cfg.vocab_size, progress=self.progress)
        meta = json.loads((data / "meta.json").read_text())
        return {"data": str(data), "documents": sum(meta["documents"].values()), "vocab_size": meta["vocab_size"]}

    def stage_pretrain(self) -> dict[str, Any]:
        out = self.dir("pretrain")
        cfg = self._train_config(out=str(out), steps=self.plan.pretrain_steps, fp8=self.fp8)
        Trainer(cfg).fit()  # results come from the run folder: a resumed run returns only its new steps
        plot_run(out)
        metrics = read_metrics(out)
        vals = [m for m in metrics if m.get("val_loss") is not None] or [{}]
        last = metrics[-1]
        return {
            "steps": cfg.steps,
            "tokens": last["tokens"],
            "fp8": self.fp8,
            "train_loss": last["lm_loss"],
            "val_loss": vals[-1].get("val_loss"),
            "val_bpb": vals[-1].get("val_bpb"),
            "tokens_per_s": _mean(m["tokens_per_s"] for m in metrics[1:]),
            "mfu": _mean(m.get("mfu", 0.0) for m in metrics[1:]),
            "max_over_mean_load": last.get("max_over_mean_load", {}),
            "samples": next((m["samples"] for m in reversed(metrics) if m.get("samples")), {}),
        }

    def stage_fp8(self) -> dict[str, Any]:
        """The same start, data and steps with BF16 autocast, and with FP8 GEMMs on top."""
        runs = {}
        for name, fp8 in (("bf16", False), ("fp8", True)):
            out = self.dir("fp8") / name
            steps = self.plan.fp8_steps
            cfg = self._train_config(
                out=str(out),
                steps=steps,
                fp8=fp8,
                dtype="bfloat16",
                sample_tokens=0,
                save_every=steps,
                eval_every=steps,
            )
            Trainer(cfg).fit()
            metrics = read_metrics(out)
            runs[name] = {
                "loss": [m["lm_loss"] for m in metrics],
                "tokens": metrics[-1]["tokens"],
                "tokens_per_s": _mean(m["tokens_per_s"] for m in metrics[1:] or metrics),
            }
        return {
            "steps": self.plan.fp8_steps,
            **runs,
            "tokens": sum(r["tokens"] for r in runs.values()),
            "final_loss_ratio": runs["fp8"]["loss"][-1] / runs["bf16"]["loss"][-1],
            "speed_ratio": runs["fp8"]["tokens_per_s"] / runs["bf16"]["tokens_per_s"],
        }

    def _sft_config(self, out: Path, init: Path, data: Path, steps: int, **overrides) -> TrainConfig:
        options = dict(
            out=str(out),
            init=str(init),
            data=str(data),
            objective="sft",
            steps=steps,
            lr=3e-3,
            mtp_lambda=0.0,
            batch_size=32 if self.plan.batch_size >= 16 else 8,
            seq_len=128,
            warmup_steps=min(10, steps),
            sample_tokens=0,
        )
        return self._train_config(**(options | overrides))

    def pass_at_1(self, model: Path) -> float:
        """Greedy held-out pass@1 of a model folder (the same problems for every stage)."""
        from nanoseek.serve import Engine

        return evaluate(
            Engine(model, config=EngineConfig.for_batches()), self.task, self.test_problems(), max_tokens=64
        ).pass_at_1

    def test_problems(self):
        return self.task.problems("test", self.plan.eval_n)

    def stage_sft(self) -> dict[str, Any]:
        data = self.dir("sft") / "arith_sft.jsonl"
        with open(data, "w") as f:
            for p in self.task.problems("train", self.plan.sft_examples):
                f.write(sft_row(self.task.conversation(p), self.task.tools))
        cfg = self._sft_config(self.dir("sft"), self.dir("pretrain") / "model", data, self.plan.sft_steps)
        Trainer(cfg).fit()
        last = read_metrics(cfg.out)[-1]
        return {
            "examples": self.plan.sft_examples,
            "steps": cfg.steps,
            "tokens": last["tokens"],
            "loss": last["lm_loss"],
            "pass_at_1": self.pass_at_1(self.dir("sft") / "model"),
        }

    def stage_distill(self) -> dict[str, Any]:
        """The SFT model as teacher: verified traces on fresh prompts (R1's rejection sampling), taught to the
        pretrained model (rl/distill.py, the pipeline of `nanoseek distill`)."""
        student = self.dir("distill") / "student"
        cfg = self._sft_config(
            student, self.dir("pretrain") / "model", self.dir("distill") / "traces.jsonl", self.plan.distill_steps
        )
        prompts = self.task.problems("train", self.plan.distill_prompts, seed=1)
        stats = distill(
            self.dir("sft") / "model",
            prompts,
            self.task,
            cfg,
            samples=self.plan.teacher_samples,
            temperature=self.plan.teacher_temperature,
            max_tokens=64,
            min_traces=8,
        )
        trained = "note" not in stats
        return {
            **stats,
            "student_steps": cfg.steps if trained else 0,
            "student_pass_at_1": self.pass_at_1(student / "model") if trained else None,
        }

    def stage_grpo(self) -> dict[str, Any]:
        out = self.dir("grpo")
        steps = self.plan.grpo_steps
        resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step_*"))
        cfg = GRPOConfig(
            model=str(self.dir("sft") / "model"),
            task=TASK,
            out=str(out),
            steps=steps,
            eval_every=max(1, steps // 3),
            eval_n=self.plan.eval_n,
            save_every=max(1, steps // 3),
            resume=resume,
            progress=self.progress,
            lr=self.plan.grpo_lr,
            prompts_per_step=16 if self.plan.eval_n >= 100 else 4,
        )
        GRPOTrainer(cfg).fit()
        plot_run(out)
        metrics = read_metrics(out)
        evals = [m["eval/pass_at_1"] for m in metrics if "eval/pass_at_1" in m]
        rewards = [m["reward"] for m in metrics if "reward" in m]
        tokens = {kind: sum(m.get(f"tokens/{kind}", 0) for m in metrics) for kind in ("rollout", "trained", "scored")}
        return {
            "steps": steps,
            "pass_at_1_before": evals[0],
            "pass_at_1_after": evals[-1],
            "pass_at_1_curve": evals,
            "reward_first": rewards[0],
            "reward_last": rewards[-1],
            "eval_n": self.plan.eval_n,
            **{f"{kind}_tokens": n for kind, n in tokens.items()},
            # a step's rollouts, sampled by the engine (the median: the first step also compiles the decode step)
            "rollout_tokens_per_s": statistics.median(m["rollout_tokens_per_s"] for m in metrics if "reward" in m),
        }

    def stage_tools(self) -> dict[str, Any]:
        """Agentic RL on 3-digit x 2-digit products, which the chain of thought cannot do at this size: the GRPO
        model is fine-tuned on conversations that call the calculator, then trained by GRPO with multi-turn
        rollouts that run it. Held-out pass@1 with the tool offered, before and after GRPO, and without it
        (the same model and problems, no tools in the prompt)."""
        plan, task, out = self.plan, get_task("multiply"), self.dir("tools")
        problems = task.problems("train", plan.tools_examples, seed=2)
        rows = [sft_row(task.conversation(p, use_tools=True), task.tools) for p in problems]
        atomic_write(out / "tools_sft.jsonl", "".join(rows))
        sft = self._sft_config(
            out / "sft",
            self.dir("grpo") / "model",
            out / "tools_sft.jsonl",
            plan.tools_sft_steps,
            batch_size=plan.tools_sft_batch,
            seq_len=320,  # the tool's description makes a conversation about 270 tokens
        )
        Trainer(sft).fit()
        steps, grpo = plan.tools_grpo_steps, out / "grpo"
        cfg = GRPOConfig(
            model=str(out / "sft" / "model"),
            task="multiply",
            tools="calculator",
            max_turns=3,
            out=str(grpo),
            steps=steps,
            eval_every=steps,
            eval_n=plan.eval_n,
            save_every=steps,
            resume=(grpo / "checkpoints").is_dir() and any((grpo / "checkpoints").glob("step_*")),
            progress=self.progress,
            lr=plan.tools_lr,
            prompts_per_step=plan.tools_prompts,
            dynamic_sampling=True,  # most groups agree (all right or all wrong): train on the others
        )
        GRPOTrainer(cfg).fit()
        plot_run(grpo)
        metrics = read_metrics(grpo)
        evals = [m["eval/pass_at_1"] for m in metrics if "eval/pass_at_1" in m]
        from nanoseek.serve import Engine

        engine = Engine(grpo / "model", config=EngineConfig.for_batches())
        test = task.problems("test", plan.eval_n)
        shown = evaluate(engine, task, test[:3], max_tokens=64, toolbox=Toolbox.named("calculator"))
        without = evaluate(engine, task, test, max_tokens=160)  # room for a worked long multiplication
        rewards = [m["reward"] for m in metrics if "reward" in m]
        tokens = {kind: sum(m.get(f"tokens/{kind}", 0) for m in metrics) for kind in ("rollout", "trained", "scored")}
        return {
            "task": "multiply",
            "sft_examples": len(problems),
            "sft_steps": plan.tools_sft_steps,
            "sft_tokens": read_metrics(out / "sft")[-1]["tokens"],
            "grpo_steps": steps,
            "pass_at_1_sft_with_tools": evals[0],
            "pass_at_1_with_tools": evals[-1],
            "pass_at_1_without_tools": without.pass_at_1,
            "eval_n": plan.eval_n,
            "reward_first": rewards[0],
            "reward_last": rewards[-1],
            "calls_per_rollout": _mean(m.get("tools/calls_per_rollout", 0.0) for m in metrics if "reward" in m),
            **{f"{kind}_tokens": n for kind, n in tokens.items()},
            "samples": {p.question: reply for p, reply, _ in shown.samples}
            | {f"{without.samples[0][0].question} (no tools)": without.samples[0][1]},
        }

    def stage_inference(self) -> dict[str, Any]:
        """Decode throughput of the final model at a few batch sizes, MTP speculative decoding's speed-up on the
        pretrained model's code, and sample generations."""
        from nanoseek.serve import Engine, SamplingParams

        engine = Engine(self.dir("grpo") / "model", max_seqs=64, max_batched_tokens=2048)
        roofline, element = read_bandwidth(), engine.model.embed_tokens.weight.element_size()
        throughput, fraction = {}, {}
        for batch in (1, 8, 32):
            prompts = [[engine.tokenizer.bos_id, 100 + i] for i in range(batch)]
            params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
            engine.generate(prompts, params)  # warm-up: compiles the decode step for this batch
            start = time.perf_counter()
            engine.generate(prompts, params)
            steps_per_s = 32 / (time.perf_counter() - start)
            throughput[str(batch)] = round(batch * steps_per_s, 1)
            # how much of the CPU's read bandwidth the weights (and latents) a step reads stream at
            step = decode_step_bytes(engine.model.cfg, batch, 2 + 16, element, element)
            fraction[str(batch)] = round(step * steps_per_s / roofline, 3)
        code = Engine(self.dir("pretrain") / "model")
        samples = {
            p: code.generate([p], SamplingParams(max_tokens=48, temperature=0.7, seed=0))[0].text
            for p in ("def ", "class ")
        }
        problems = self.test_problems()[:3]
        scored = evaluate(engine, self.task, problems, max_tokens=64).samples
        samples |= {p.question: reply for p, reply, _ in scored}
        return {
            "decode_tokens_per_s": throughput,
            "mtp": mtp_speedup(self.dir("pretrain") / "model"),
            "read_gb_per_s": round(roofline / 1e9, 1),
            "roofline_fraction": fraction,
            "samples": samples,
            "kv_bytes_per_token": engine.kv_cache_bytes_per_token(),
        }


def mtp_speedup(model: Path, new_tokens: int = 64) -> dict[str, Any]:
    """Greedy batch-1 decoding of code with one MTP draft per step against none: tokens/s ratio, the drafts'
    acceptance by position and tokens per step (V3 reports 85-90% acceptance and 1.8x at its scale)."""
    from nanoseek.serve import Engine, SamplingParams

    prompts = ["def __init__(self", "import os\nimport sys\n", "class Parser:\n    def "]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    seconds, stats = {}, {}
    for k in (0, 1):
        engine = Engine(model, speculative_tokens=k)
        engine.generate(prompts[:1], params)  # warm-up: compiles its steps
        engine.metrics = type(engine.metrics)()
        start = time.perf_counter()
        for prompt in prompts:
            engine.generate([prompt], params)
        seconds[k], stats[k] = time.perf_counter() - start, engine.stats()
    return {
        "speedup": round(seconds[0] / seconds[1], 3),
        "acceptance_by_position": [round(a, 3) for a in stats[1]["spec_acceptance_by_position"]],
        "tokens_per_step": round(stats[1]["tokens_per_step"], 3),
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# --- the command: `nanoseek speedrun` -----------------------------------------------------------------------
@dataclass(slots=True)
class SpeedrunConfig:
    """Tokenizer and data -> pretraining (FP8 where the hardware has it; a short FP8 vs BF16 comparison) ->
    SFT -> distillation -> GRPO -> evaluation -> decode benchmark -> report.md, report.html, report.json;
    optionally the API server. A rerun skips finished stages and resumes a killed one."""

    preset: str = flag("the model", default="tiny", choices=["tiny", "small"])
    out: str = flag("the run folder", default="runs/speedrun", metavar="DIR")
    plan: str | None = flag(
        "stage sizes (default: the preset's; quick: a smoke test of a minute or two)",
        default=None,
        choices=sorted(PLANS),
    )
    serve: bool = flag("then serve the final model (chat page at /)", default=False)
    port: int = flag("the server's port", default=8000)


def run(cfg: SpeedrunConfig) -> int:
    report = Speedrun(cfg.preset, cfg.out, plan=cfg.plan).run()
    grpo, out = report["stages"]["grpo"], Path(cfg.out)
    minutes, before, after = report["total_seconds"] / 60, grpo["pass_at_1_before"], grpo["pass_at_1_after"]
    card = f"report card: {out / 'report.md'}, {out / 'report.html'}"
    print(f"speedrun done in {minutes:.1f} min: held-out pass@1 {before:.3f} -> {after:.3f}; {card}")
    if cfg.serve:
        from nanoseek.serve.api import serve
        from nanoseek.serve.config import ServeConfig

        serve(
            ServeConfig(
                str(out / "grpo" / "model"),
                port=cfg.port,
                engine=EngineConfig(cache_dir=str(out / "kv-cache")),
            )
        )
    return 0
