"""Multi-token prediction modules (V3 paper Sec. 2.2, eq. 21-23).

Module k predicts token t_{i+k+1} at position i from the embedding of t_{i+k} and the hidden state of
depth k-1 at position i: h' = eh_proj(cat[enorm(emb(t_{i+k})), hnorm(h^{k-1}_i)]), one decoder block,
then shared_head.norm and the main model's output head. The embedding and the head are the main
model's (shared, as in the paper); the checkpoint names follow DeepSeek-V3's layer 61. Depth 1 receives
the main model's final-normed hidden state (as vLLM and SGLang feed their MTP drafters), and, as in
transformers' generic `MtpLayer` (transformers/modeling_layers.py), depth k passes its normed state on.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
from nanoseek.model.layers import RMSNorm
from nanoseek.model.mla import LatentCache


class SharedHead(nn.Module):
    """Holds only the final norm: the output head itself is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_idx)
        self.shared_head = SharedHead(cfg)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """embeds, hidden [B, T', hidden] -> this depth's normed hidden state [B, T', hidden]."""
        x = self.eh_proj(torch.cat((self.enorm(embeds), self.hnorm(hidden)), dim=-1))
        return self.shared_head.norm(self.block(x, cos, sin, cache))
