"""Multi-head latent attention (DeepSeek-V2 paper Sec. 2.1; V3 paper Sec. 2.1.1).

Keys and values are compressed into one kv_lora_rank latent per token (kv_a_proj_with_mqa ->
kv_a_layernorm) and expanded per head by kv_b_proj; position enters only through a decoupled RoPE part:
qk_rope_head_dim query channels per head and one key shared by all heads. Queries optionally go through
their own low-rank bottleneck (q_a_proj -> q_a_layernorm -> q_b_proj). This is the expanded form used for
training and prefill; the absorbed form for decoding lives with the inference engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import RMSNorm
from nanoseek.model.rope import apply_rope, softmax_scale


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, n = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, n * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, n * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n * cfg.v_head_dim, h, bias=False)
        self.softmax_scale = softmax_scale(cfg)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden], causal; cos/sin [T, 1, rope/2] from RotaryEmbedding."""
        cfg = self.cfg
        b, t, _ = x.shape
        n, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim

        q = self.query(x).view(b, t, n, nope + rope)  # [B, T, H, nope + rope]
        q_nope, q_rope = q.split([nope, rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, kv_lora_rank]: all that MLA needs to cache

        q_rope = apply_rope(q_rope, cos, sin, cfg.rope_interleave)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, cfg.rope_interleave)  # [B, T, 1, rope]

        kv = self.kv_b_proj(latent).view(b, t, n, nope + cfg.v_head_dim)
        k_nope, v = kv.split([nope, cfg.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # [B, H, T, nope + rope]
        k = torch.cat((k_nope, k_rope.expand(-1, -1, n, -1)), dim=-1).transpose(1, 2)
        out = attention(q, k, v.transpose(1, 2), self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, n * cfg.v_head_dim))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA. q, k [B, H, T, d_qk], v [B, H, T, d_v] -> [B, H, T, d_v].

    Flash kernels want one head size for q, k and v; MLA's d_v is smaller (128 vs 192 in V3), so v is
    zero-padded and the padding sliced off: about 1.7x faster on CPU than SDPA's math fallback.
    """
    d_v = v.shape[-1]
    if d_v != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - d_v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :d_v]
