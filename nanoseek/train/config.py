"""`nanoseek train` / `sft` / `distill` settings: a light module, so that building the CLI imports no trainer."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from nanoseek.flags import flag, inherit

# torch.distributed.pipelining's schedules that `--pp-schedule` offers (train/pipeline.py maps them to classes)
PP_SCHEDULES = ("dualpipev", "zbv", "interleaved1f1b", "1f1b", "gpipe")


@dataclass(slots=True)
class RunConfig:
    """What every trainer's run shares (`nanoseek train/sft/distill` and `nanoseek grpo`): its folder, length,
    seed, optimizer basics and cadence. A subclass changes a default with `flags.inherit`."""

    out: str = flag("run folder: metrics, checkpoints, the exported model", default="runs/tiny")
    steps: int = flag("optimizer steps in total", default=300)
    seed: int = flag("seed for initialisation, data order and sampling", default=0)
    lr: float = flag("peak learning rate", default=3e-3)
    warmup_steps: int = flag("linear warmup steps", default=30)
    grad_clip: float = flag("clip the global gradient norm to this", default=1.0)
    eval_every: int = flag("evaluate every N steps (validation loss and samples; GRPO: held-out pass@1)", default=50)
    save_every: int = flag("checkpoint every N steps (and at the end)", default=100)
    resume: bool = flag("continue from the last checkpoint in --out", default=False)
    progress: bool = flag("show a progress bar", default=True)

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "save_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError("--lr and --grad-clip must be positive and --warmup-steps >= 0")


@dataclass(slots=True)
class RecipeConfig(RunConfig):
    """What pretraining, SFT and distillation share: batch, schedule, optimizer, balancing, precision,
    parallelism."""

    batch_size: int = flag("global batch, in sequences", default=16)
    micro_batch_size: int = flag("sequences per forward pass (accumulate up to --batch-size); 0: all", default=0)
    seq_len: int = flag("tokens per sequence", default=256)
    min_lr_ratio: float = flag("final learning rate as a fraction of --lr", default=0.1)
    schedule: str = flag("cosine or wsd (warmup-stable-decay)", default="cosine", choices=["cosine", "wsd"])
    weight_decay: float = flag("AdamW weight decay on matrices", default=0.1)
    beta1: float = flag("AdamW beta1", default=0.9)
    beta2: float = flag("AdamW beta2", default=0.95)
    mtp_lambda: float = flag("weight of the MTP loss (V3: 0.3, then 0.1)", default=0.3)
    balance_alpha: float = flag("weight of the sequence-wise balance loss, per MoE layer", default=1e-4)
    bias_gamma: float | None = flag(
        "aux-loss-free bias update speed: after each step b_i += gamma * sign(mean load - load_i); default V3's "
        "1e-3, raised to 1.25 / --steps (at most 0.005) for runs from scratch under 1,250 steps (a bias must be "
        "able to move far enough within the run; a fine-tune keeps 1e-3); "
        "0 turns it off",
        default=None,
    )
    eval_batches: int = flag("validation batches per evaluation", default=4)
    sample_tokens: int = flag("tokens sampled per prompt at evaluation steps; 0: none", default=48)
    keep: int = flag("checkpoints to keep", default=3)
    fp8: bool = flag("FP8 GEMMs with DeepSeek-V3's 1x128 / 128x128 scaling", default=False)
    ep: int = flag("expert-parallel group size (under torchrun); must divide the process count", default=1)
    pp: int = flag(
        "pipeline-parallel stages (under torchrun): the decoder layers split over pp ranks; pp x ep must divide "
        "the process count (the rest is data parallel)",
        default=1,
    )
    pp_schedule: str = flag(
        "pipeline schedule: dualpipev (DeepSeek's DualPipe, V-shaped), zbv (zero bubble, V-shaped), "
        "interleaved1f1b (2 stages per rank, round-robin), 1f1b or gpipe (1 stage per rank); the "
        "micro-batches are --micro-batch-size rows (default: 2 per stage)",
        default="dualpipev",
        choices=list(PP_SCHEDULES),
    )
    compile: bool = flag("torch.compile the model", default=False)
    tensorboard: bool = flag("also log to --out/tensorboard", default=False)
    device: str = flag("auto, cpu or cuda", default="auto")
    dtype: str = flag("auto, float32 or bfloat16 (autocast)", default="auto")
    peak_flops: float | None = flag(
        "the device's peak FLOP/s for MFU (default: a GPU's datasheet bf16 figure, or a one-second matmul probe)",
        default=None,
    )

    def __post_init__(self) -> None:
        RunConfig.__post_init__(self)  # (zero-argument super() fails in a slotted dataclass)
        for name in ("batch_size", "seq_len", "keep", "eval_batches"):  # > 0
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.batch_size % self.micro_batch_size):
            raise ValueError("--micro-batch-size must divide --batch-size")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError("--schedule must be cosine or wsd")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError("--dtype must be auto, float32 or bfloat16")
        if self.ep < 1 or self.pp < 1:
            raise ValueError("--ep and --pp must be at least 1")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"--pp-schedule must be one of {', '.join(PP_SCHEDULES)}")

    def recipe(self) -> dict[str, Any]:
        """These settings as keyword arguments (for the TrainConfig that a fine-tuning command runs)."""
        return {f.name: getattr(self, f.name) for f in fields(RecipeConfig)}


@dataclass(slots=True)
class TrainConfig(RecipeConfig):
    """Pretrain with MTP and auxiliary-loss-free balancing (default: the tiny preset on Python's stdlib).
    The trainer's settings: `nanoseek sft` and `nanoseek distill` fill in the fine-tuning ones."""

    preset: str = flag("model preset", default="tiny")
    init: str | None = flag("start from this model folder's weights, config and tokenizer (fine-tuning)", default=None)
    objective: str = flag(
        "pretrain (token shards) or sft (chat JSONL, loss on assistant tokens)",
        default="pretrain",
        choices=["pretrain", "sft"],
    )
    teacher: str | None = flag("a teacher model folder for logit distillation (same vocabulary)", default=None)
    kl_weight: float = flag("weight of KL(teacher || student) on the trained tokens; 0: off", default=0.0)
    data: str | None = flag("folder from `nanoseek data prepare` (default: Python's stdlib source)", default=None)

    def __post_init__(self) -> None:
        RecipeConfig.__post_init__(self)
        if self.objective not in ("pretrain", "sft"):
            raise ValueError("--objective must be pretrain or sft")
        if self.kl_weight < 0 or (self.kl_weight > 0 and not self.teacher):
            raise ValueError("--kl-weight must be >= 0, and > 0 needs --teacher DIR")
        if self.objective == "sft" and not (self.init and self.data):
            raise ValueError("supervised fine-tuning needs --model DIR (the model to start from) and --data chat.jsonl")


@dataclass(slots=True)
class FineTuneConfig(RecipeConfig):
    """The recipe with fine-tuning's defaults: fewer steps, a lower learning rate, a shorter warmup."""

    out: str = inherit(RunConfig, "out", "runs/sft")
    steps: int = inherit(RunConfig, "steps", 200)
    lr: float = inherit(RunConfig, "lr", 1e-3)
    warmup_steps: int = inherit(RunConfig, "warmup_steps", 10)
    eval_every: int = inherit(RunConfig, "eval_every", 50)
    save_every: int = inherit(RunConfig, "save_every", 50)


@dataclass(slots=True, kw_only=True)  # its required fields follow defaulted ones
class SFTConfig(FineTuneConfig):
    """Fine-tune a model folder on OpenAI-style chat examples with the pretraining trainer: DeepSeek-V3's chat
    template, loss on assistant tokens only, multi-turn, padded batches (examples never attend to each
    other)."""

    model: str = flag("the model folder to start from", metavar="DIR")
    data: str = flag('JSONL, one {"messages": [...]} per line', metavar="FILE")

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.recipe(), init=self.model, data=self.data, objective="sft")
