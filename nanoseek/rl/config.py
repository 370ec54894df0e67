"""`nanoseek grpo` settings: a light module, so that building the CLI imports no GRPO trainer."""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.config import flag
from nanoseek.rl.grpo_loss import LOSS_TYPES
from nanoseek.train.config import RunConfig, override


@dataclass(slots=True)
class GRPOConfig(RunConfig):
    """Every field is a `nanoseek grpo` flag of the same name in kebab case."""

    model: str = flag("the policy's starting point: a model folder with its tokenizer (required)", default="")
    task: str = flag("arithmetic, countdown, or a JSONL file of prompt/answer", default="arithmetic")
    # The run's settings (train/config.py's RunConfig) with GRPO's defaults: a step samples a fresh batch;
    # the learning rate stays constant after warmup, and Adam moves every weight by about this much.
    out: str = override("out", "runs/grpo")
    steps: int = override("steps", 60)
    lr: float = override("lr", 2e-5)
    warmup_steps: int = override("warmup_steps", 5)
    eval_every: int = override("eval_every", 20)
    save_every: int = override("save_every", 20)
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

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("nanoseek grpo needs --model DIR (best a supervised warm start, e.g. nanoseek sft)")
        RunConfig.__post_init__(self)
        for name in ("prompts_per_step", "group_size", "max_tokens", "mu"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.group_size < 2:
            raise ValueError("--group-size must be at least 2: advantages compare completions of one prompt")
        if self.loss_type not in LOSS_TYPES or self.scale_rewards not in ("group", "none"):
            raise ValueError(f"--loss-type must be one of {LOSS_TYPES} and --scale-rewards group or none")
        if self.beta < 0 or self.epsilon <= 0 or self.temperature <= 0:
            raise ValueError("--beta must be >= 0, --epsilon and --temperature positive")
