"""The settings of the post-training commands (grpo, distill, eval, task write): a light module, so that
building the CLI imports no GRPO trainer and no engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.flags import flag, inherit
from nanoseek.rl.grpo_loss import LOSS_TYPES
from nanoseek.serve.config import EngineConfig
from nanoseek.train.config import FineTuneConfig, RunConfig, TrainConfig


@dataclass(slots=True)
class GRPOConfig(RunConfig):
    """Group Relative Policy Optimization (DeepSeekMath, R1): G sampled completions per prompt, rule rewards,
    group-relative advantages, clipped objective, optional k3 KL to a frozen reference."""

    model: str = flag("the policy's starting point: a model folder with its tokenizer (required)", default="")
    task: str = flag("arithmetic, countdown, or a JSONL file of prompt/answer", default="arithmetic")
    # The run's settings (train/config.py's RunConfig) with GRPO's defaults: a step samples a fresh batch;
    # the learning rate stays constant after warmup, and Adam moves every weight by about this much.
    out: str = inherit(RunConfig, "out", "runs/grpo")
    steps: int = inherit(RunConfig, "steps", 60)
    lr: float = inherit(RunConfig, "lr", 2e-5)
    warmup_steps: int = inherit(RunConfig, "warmup_steps", 5)
    eval_every: int = inherit(RunConfig, "eval_every", 20)
    save_every: int = inherit(RunConfig, "save_every", 20)
    prompts_per_step: int = flag("problems per step (P)", default=16)
    group_size: int = flag("completions per problem (G)", default=8)
    max_tokens: int = flag("longest completion", default=64)
    temperature: float = flag("sampling temperature of the rollouts", default=1.0)
    beta: float = flag("weight of the k3 KL to the reference model; 0: no reference model", default=0.0)
    epsilon: float = flag("clip range below (and above, unless --epsilon-high)", default=0.2)
    epsilon_high: float | None = flag("clip range above (DAPO's clip-higher, e.g. 0.28)", default=None)
    loss_type: str = flag("grpo (per-sequence mean), dapo (token-level) or dr_grpo (constant)", default="grpo")
    scale_rewards: str = flag("group (divide by the group's std) or none (Dr. GRPO)", default="group")
    mu: int = flag("optimizer steps per batch of rollouts (old log-probs kept for the ratio)", default=1)
    dynamic_sampling: bool = flag("drop groups whose rewards are all equal (DAPO)", default=False)
    overlong_buffer: int = flag("DAPO's soft overlong penalty over the last N tokens; 0: off", default=0)
    rewards: str = flag(
        "reward functions by dotted path, comma-separated",
        default="nanoseek.rl.rewards.accuracy_reward,nanoseek.rl.rewards.format_reward",
    )
    reward_weights: str | None = flag("weights of the reward functions, comma-separated (default: all 1)", default=None)
    eval_n: int = flag("held-out problems per evaluation", default=200)
    tools: str | None = flag("tools the policy may call in its rollouts and evaluations (calculator)", default=None)
    max_turns: int = flag("with --tools: assistant turns per rollout, tool results in between", default=3)
    engine: EngineConfig = field(default_factory=EngineConfig.for_batches)  # the rollouts' and evaluations'

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("nanoseek grpo needs --model DIR (best a supervised warm start, e.g. nanoseek sft)")
        RunConfig.__post_init__(self)
        for name in ("prompts_per_step", "group_size", "max_tokens", "mu", "max_turns"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.group_size < 2:
            raise ValueError("--group-size must be at least 2: advantages compare completions of one prompt")
        if self.loss_type not in LOSS_TYPES or self.scale_rewards not in ("group", "none"):
            raise ValueError(f"--loss-type must be one of {LOSS_TYPES} and --scale-rewards group or none")
        if self.beta < 0 or self.epsilon <= 0 or self.temperature <= 0:
            raise ValueError("--beta must be >= 0, --epsilon and --temperature positive")


@dataclass(slots=True, kw_only=True)  # its required fields follow defaulted ones
class DistillConfig(FineTuneConfig):
    """The teacher samples <think>...</think><answer>...</answer> replies with the engine, the task's verifier
    keeps the right ones (rejection sampling), and the student is fine-tuned on them (plus KL to the
    teacher's logits with --kl-weight)."""

    teacher: str = flag("the teacher model folder", metavar="DIR")
    student: str = flag("the student model folder to fine-tune", metavar="DIR")
    prompts: str = flag("JSONL of prompt/answer/meta (nanoseek task write)", metavar="FILE")
    task: str | None = flag("the verifier that filters the traces (arithmetic, countdown, FILE.jsonl)", default=None)
    samples: int = flag("teacher replies per prompt", default=4)
    teacher_temperature: float = flag("the teacher's sampling temperature", default=0.7)
    max_tokens: int = flag("longest teacher reply", default=128)
    kl_weight: float = flag("also match the teacher's logits, with this weight", default=0.0)
    out: str = inherit(RunConfig, "out", "runs/distill")
    engine: EngineConfig = field(default_factory=EngineConfig.for_batches)  # the teacher's

    def train_config(self) -> TrainConfig:
        """The student's fine-tuning on the traces that the run folder will hold."""
        return TrainConfig(
            **self.recipe(),
            init=self.student,
            objective="sft",
            data=str(Path(self.out) / "traces.jsonl"),
            teacher=self.teacher if self.kl_weight > 0 else None,
            kl_weight=self.kl_weight,
        )


@dataclass(slots=True)
class EvalConfig:
    """Sample replies to held-out problems and score them with the verifier; or, with --lm-eval, run
    lm-evaluation-harness task YAMLs (loglikelihood and generate_until) against a server: --url of a running
    one, or --model DIR to serve it for the run."""

    model: str | None = flag("a model folder", default=None, metavar="DIR")
    task: str | None = flag("arithmetic, countdown, multiply or FILE.jsonl", default=None)
    n: int = flag("problems", default=200)
    split: str = flag("which problems", default="test", choices=["test", "train"])
    samples: int = flag("replies per problem", default=1)
    k: str = flag("comma-separated k for pass@k", default="1")
    temperature: float = flag("0: greedy", default=0.0)
    max_tokens: int = flag("longest reply", default=128)
    seed: int = flag("seed of the problems and of sampling", default=0)
    show: int = flag("print this many replies", default=3)
    tools: str | None = flag("offer these tools (calculator) and report pass@k with and without them", default=None)
    max_turns: int = flag("with --tools: assistant turns per reply, tool calls in between", default=3)
    json: bool = flag("print one JSON object", default=False)
    lm_eval: list[str] = flag(
        "lm-evaluation-harness task YAMLs (data files relative to them; pip install 'lm-eval[api]')",
        default_factory=list,
        metavar="TASK.yaml",
    )
    url: str | None = flag("with --lm-eval: a running server's base URL, e.g. http://127.0.0.1:8000", default=None)
    served_model_name: str = flag("with --lm-eval: the model name the server answers to", default="nanoseek")
    api_key: str | None = flag("with --lm-eval: bearer key for a server started with --api-keys", default=None)
    limit: int | None = flag("with --lm-eval: items per task (default: all)", default=None)
    output: str | None = flag("with --lm-eval: results and per-item samples (JSONL)", default=None, metavar="DIR")
    concurrency: int = flag("with --lm-eval: requests in flight", default=1)
    engine: EngineConfig = field(default_factory=EngineConfig.for_batches)

    def __post_init__(self) -> None:
        if not self.lm_eval and not (self.model and self.task):
            raise ValueError(
                "nanoseek eval needs --model DIR and --task (or --lm-eval TASK.yaml with --model or --url)"
            )
        if self.lm_eval and not (self.url or self.model):
            raise ValueError("--lm-eval needs --url of a running server, or --model DIR to serve for the evaluation")

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.k.split(","))


@dataclass(slots=True)
class TaskWriteConfig:
    """Write a task's problems as prompts (prompt/answer/meta, for distill) or as chat examples for sft."""

    task: str = flag("arithmetic, countdown or multiply")
    n: int = flag("problems")
    out: str = flag("the JSONL file to write", metavar="FILE")
    split: str = flag("which problems", default="train", choices=["train", "test"])
    seed: int = flag("seed of the problems", default=0)
    solutions: bool = flag("chat examples with worked solutions", default=False)
    tools: str | None = flag("with --solutions: solve by calling these tools (multiply: calculator)", default=None)
