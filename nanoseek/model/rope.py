"""Rotary position embedding with YaRN extension, as DeepSeek-V2/V3 use it for the decoupled RoPE key.

RoFormer (Su et al. 2021) rotates pairs of channels; YaRN (Peng et al. 2023, Sec. 3.2-3.4) blends
interpolated and extrapolated frequencies with a linear ramp between beta_fast and beta_slow rotations
and rescales attention by mscale. The formulas follow transformers' `_compute_yarn_parameters`, which
is what DeepSeek's checkpoints are evaluated with (DeepSeek-V2 paper, Appendix C).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (no change without extension)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [qk_rope_head_dim / 2] and the factor that scales cos and sin."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    yarn = cfg.rope_scaling
    if yarn is None:
        return 1.0 / pos_freqs, 1.0

    def correction_dim(rotations: float) -> float:
        # The channel index whose wavelength fits `rotations` times into the original context.
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high-frequency channels)
    inv_freq = (1.0 / (yarn.factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolate
    if yarn.mscale and yarn.mscale_all_dim:
        attention_factor = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    else:  # YaRN's own temperature when DeepSeek's pair is not given
        attention_factor = yarn_mscale(yarn.factor)
    return inv_freq, attention_factor


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_qk), times mscale(mscale_all_dim)^2 under YaRN (DeepSeek-V3 `inference/model.py`)."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope_scaling is not None and cfg.rope_scaling.mscale_all_dim:
        m = yarn_mscale(cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim)
        scale *= m * m
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [..., D] by angles whose cos/sin are [..., D/2] (broadcast over heads).

    interleave=True reads the pairs as (x0, x1), (x2, x3), ... as DeepSeek's checkpoints lay them out;
    False reads (x_i, x_{i+D/2}). Either way the rotated pairs are written as [first halves, second
    halves]: queries and keys share the layout, so their dot products are those of the paper.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """Holds the inverse frequencies; returns (cos, sin) [T, 1, D/2] for given positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.attention_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        self.inv_freq = rope_inv_freq(self.cfg)[0].to(self.inv_freq.device)  # fp32, whatever the model's dtype

    def _apply(self, fn, recurse=True):
        # The frequencies stay exact fp32 through model.to(bf16) (recomputed: a cast back would keep the
        # rounding): rounded to 8 bits, the angle of position p would be off by up to p * 2^-9 radians.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.reset_parameters()
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq  # [T, D/2], fp32 for long contexts
        cos = (angles.cos() * self.attention_factor).to(dtype)
        sin = (angles.sin() * self.attention_factor).to(dtype)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)  # [T, 1, D/2]: broadcast over heads
