"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Norm weights (and any bias) are not decayed; the MoE balancing bias is a buffer, outside the optimizer.
Schedules: linear warmup, then cosine decay to min_lr_ratio * lr, or WSD (warmup-stable-decay, as in
MiniCPM and DeepSeek-V3's constant-then-decay phases): constant lr, then a linear decay over the last
decay_fraction of the steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8
) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(
    step: int,
    total_steps: int,
    lr: float,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    if schedule == "cosine":
        progress = (step - warmup_steps + 1) / max(1, total_steps - warmup_steps)  # the last step reaches min_lr
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_start = total_steps - int(decay_fraction * total_steps)
        if step < decay_start:
            return lr
        return lr - (lr - min_lr) * (step - decay_start + 1) / max(1, total_steps - decay_start)
    raise ValueError(f"schedule must be 'cosine' or 'wsd', got {schedule!r}")
