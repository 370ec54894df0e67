"""Multi-head latent attention (DeepSeek-V2 paper Sec. 2.1; V3 paper Sec. 2.1.1).

Keys and values are compressed into one kv_lora_rank latent per token (kv_a_proj_with_mqa ->
kv_a_layernorm) and expanded per head by kv_b_proj; position enters only through a decoupled RoPE part:
qk_rope_head_dim query channels per head and one key shared by all heads. Queries optionally go through
their own low-rank bottleneck (q_a_proj -> q_a_layernorm -> q_b_proj).

Two forms of the same attention. Training uses the expanded one: K and V per head from kv_b_proj.
Inference with a cache uses the absorbed one (DeepSeek-V2 Sec. 2.1.2, V3 `inference/model.py`): W_UK is
folded into the query and W_UV applied after attention, so attention reads only the cached latent and
RoPE key (kv_lora_rank + qk_rope_head_dim per token, shared by all heads) and nothing is re-expanded.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.fp8_weights import dense_weight
from nanoseek.model.layers import RMSNorm
from nanoseek.model.rope import apply_rope, softmax_scale


class LatentCache(Protocol):
    """What the absorbed path needs from an inference engine's cache, for one forward pass."""

    def store(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Keep the new tokens' latent [B, t, kv_lora_rank] and RoPE key [B, t, rope]."""

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, L, kv_lora_rank + rope], mask [B, 1, t, L] True where a query may attend)."""


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
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

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None
    ) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden], causal; cos/sin [T, 1, rope/2] (or [B, T, 1, rope/2])."""
        if cache is not None:
            return self.forward_absorbed(x, cos, sin, cache)
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

    def forward_absorbed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache):
        """Attention over the cached latents: the new tokens' latents are stored, then every query reads
        its sequence's whole context through the absorbed projections."""
        cfg = self.cfg
        b, t, _ = x.shape
        n, nope, rope, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank

        q_nope, q_rope = self.query(x).view(b, t, n, nope + rope).split([nope, rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([r, rope], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin, cfg.rope_interleave)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, cfg.rope_interleave).squeeze(2)
        cache.store(self.layer_idx, self.kv_a_layernorm(latent), k_rope)
        context, mask = cache.gather(self.layer_idx)  # [B, L, r + rope], [B, 1, t, L]

        w_kv = dense_weight(self.kv_b_proj, q_nope.dtype).view(n, nope + cfg.v_head_dim, r)
        w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]  # [H, nope, r], [H, v, r]
        q_latent = torch.matmul(q_nope.transpose(1, 2), w_uk)  # W_UK folded into q: [B, H, t, r]
        q = torch.cat((q_latent, q_rope.transpose(1, 2)), dim=-1)  # [B, H, t, r + rope]
        if t <= LATENT_DECODE_TOKENS:
            o = latent_attention(q, context, r, self.softmax_scale, mask)  # [B, H, t, r]
        else:
            k = context.unsqueeze(1).expand(-1, n, -1, -1)  # one latent "head" shared by all heads (MQA)
            v = context[..., :r].unsqueeze(1).expand(-1, n, -1, -1)
            o = attention(q, k, v, self.softmax_scale, mask)  # [B, H, t, r]
        out = torch.matmul(o, w_uv.transpose(1, 2)).transpose(1, 2)  # W_UV after attention: [B, t, H, v]
        return self.o_proj(out.reshape(b, t, n * cfg.v_head_dim))


LATENT_DECODE_TOKENS = 4  # up to this many new tokens per sequence (decoding, MTP drafts): latent_attention


def latent_attention(q: torch.Tensor, context: torch.Tensor, r: int, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """Decode-time MQA over the latents: every head's queries against the one shared latent "head" in two
    batched matmuls, without expanding the context per head or padding it for SDPA (both copy the whole
    context every layer and step). q [B, H, t, r + rope], context [B, L, r + rope], mask [B, 1, t, L]
    -> [B, H, t, r]."""
    b, h, t, _ = q.shape
    scores = torch.matmul(q.reshape(b, h * t, -1), context.transpose(1, 2)).view(b, h, t, -1) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs.view(b, h * t, -1), context[..., :r]).view(b, h, t, r)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA, causal unless a boolean mask is given. q, k [B, H, T, d_qk], v [B, H, S, d_v] -> [B, H, T, d_v].

    Flash kernels want one head size for q, k and v; MLA's d_v is smaller (128 vs 192 in V3), so v is
    zero-padded and the padding sliced off: about 1.7x faster on CPU than SDPA's math fallback.
    """
    d_v = v.shape[-1]
    if d_v != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - d_v))
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :d_v]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[..., :d_v]
