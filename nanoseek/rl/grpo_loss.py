"""The GRPO objective (DeepSeekMath Sec. 4.1, R1), with DAPO's and Dr. GRPO's variants, as pure functions.

Per prompt, G sampled completions get rewards r; their advantage is (r - mean) / (std + eps) within the
group (or r - mean with scale_rewards 'none', as Dr. GRPO). Per completion token t:

    ratio  = exp(logp - logp_old)
    loss_t = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * KL_t
    KL_t   = exp(ref - logp) - (ref - logp) - 1          (the k3 estimator, always >= 0)

and the token losses are averaged per sequence then over sequences ('grpo'), summed over all tokens
and divided by the token count ('dapo', token-level), or divided by a constant, sequences x
max_tokens ('dr_grpo').
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] (P prompts, G completions each) -> advantages [P, G]."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards == "none":
        return centred
    if scale_rewards != "group":
        raise ValueError("scale_rewards must be 'group' or 'none'")
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) by Schulman's k3 estimator: unbiased and non-negative."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """logp, old_logp, ref_logp, mask [N, T] over completion tokens; advantages [N]. Returns the loss and
    its statistics (kl, clip_ratio)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}")
    mask = mask.to(logp.dtype)
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + high) * adv)
    kl = torch.zeros_like(logp)
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probabilities")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        if max_tokens is None:
            raise ValueError("dr_grpo divides by sequences x max_tokens: pass max_tokens")
        loss = (per_token * mask).sum() / (logp.shape[0] * max_tokens)
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    tokens = mask.sum().clamp(min=1)
    stats = {"kl": float((kl * mask).sum() / tokens), "clip_ratio": float((clipped * mask).sum() / tokens)}
    return loss, stats
