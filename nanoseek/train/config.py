"""`nanoseek train` / `sft` / `distill` settings: a light module, so that building the CLI imports no trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanoseek.config import flag


@dataclass(slots=True)
class RunConfig:
    """What every trainer's run shares (`nanoseek train/sft/distill` and `nanoseek grpo`): its folder, length,
    seed, optimizer basics and cadence. A subclass changes a default with `override`."""

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


def override(name: str, default: Any) -> Any:
    """A RunConfig field with a subclass's own default (and the same help)."""
    return flag(RunConfig.__dataclass_fields__[name].metadata["help"], default=default)


@dataclass(slots=True)
class TrainConfig(RunConfig):
    """Every field is a `nanoseek train` flag of the same name in kebab case."""

    preset: str = flag("model preset", default="tiny")
    init: str | None = flag("start from this model folder's weights, config and tokenizer (fine-tuning)", default=None)
    objective: str = flag("pretrain (token shards) or sft (chat JSONL, loss on assistant tokens)", default="pretrain")
    teacher: str | None = flag("a teacher model folder for logit distillation (same vocabulary)", default=None)
    kl_weight: float = flag("weight of KL(teacher || student) on the trained tokens; 0: off", default=0.0)
    data: str | None = flag("folder from `nanoseek data prepare` (default: Python's stdlib source)", default=None)
    batch_size: int = flag("global batch, in sequences", default=16)
    micro_batch_size: int = flag("sequences per forward pass (accumulate up to --batch-size); 0: all", default=0)
    seq_len: int = flag("tokens per sequence", default=256)
    min_lr_ratio: float = flag("final learning rate as a fraction of --lr", default=0.1)
    schedule: str = flag("cosine or wsd (warmup-stable-decay)", default="cosine")
    weight_decay: float = flag("AdamW weight decay on matrices", default=0.1)
    beta1: float = flag("AdamW beta1", default=0.9)
    beta2: float = flag("AdamW beta2", default=0.95)
    mtp_lambda: float = flag("weight of the MTP loss (V3: 0.3, then 0.1)", default=0.3)
    balance_alpha: float = flag("weight of the sequence-wise balance loss, per MoE layer", default=1e-4)
    bias_gamma: float = flag("aux-loss-free bias update speed; 0 turns it off", default=1e-3)
    eval_batches: int = flag("validation batches per evaluation", default=4)
    sample_tokens: int = flag("tokens sampled per prompt at evaluation steps; 0: none", default=48)
    keep: int = flag("checkpoints to keep", default=3)
    fp8: bool = flag("FP8 GEMMs with DeepSeek-V3's 1x128 / 128x128 scaling", default=False)
    ep: int = flag("expert-parallel group size (under torchrun); must divide the process count", default=1)
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
        if self.objective not in ("pretrain", "sft"):
            raise ValueError("--objective must be pretrain or sft")
        if self.kl_weight < 0 or (self.kl_weight > 0 and not self.teacher):
            raise ValueError("--kl-weight must be >= 0, and > 0 needs --teacher DIR")
        if self.objective == "sft" and not (self.init and self.data):
            raise ValueError("supervised fine-tuning needs --model DIR (the model to start from) and --data chat.jsonl")
