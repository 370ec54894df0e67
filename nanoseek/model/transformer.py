"""The DeepSeek-V3 language model: embedding, decoder blocks (MLA + dense/MoE), final norm, output head, and
the optional MTP modules. One class serves training, RL rollouts and serving.

    model = Transformer(get_preset("tiny"))
    logits = model(input_ids)                        # [B, T, vocab]
    logits, mtp_logits = model(input_ids, mtp=True)  # mtp_logits[k-1]: [B, T-k, vocab], predicts t_{i+k+1}
    losses = model(input_ids, mtp=True, targets=targets)  # summed cross-entropies [1 + depths], no logits
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
from nanoseek.model.layers import RMSNorm, compute_dtype
from nanoseek.model.loss import linear_cross_entropy
from nanoseek.model.mla import LatentCache
from nanoseek.model.moe import Gate, MoE, RoutedExperts
from nanoseek.model.mtp import MTPModule
from nanoseek.model.rope import RotaryEmbedding


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotary_emb = RotaryEmbedding(cfg)
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when configured (again after `to_empty`, which unties)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones for norms, zero balancing bias."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Gate):
                nn.init.normal_(module.weight, std=std)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, RoutedExperts):
                nn.init.normal_(module.gate_up_proj, std=std)
                nn.init.normal_(module.down_proj, std=std)
        self.rotary_emb.reset_parameters()

    def forward(
        self, input_ids: torch.Tensor, mtp: bool = False, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids [B, T] -> logits [B, T, vocab]; with mtp=True also each MTP depth's logits.

        With targets [B, T] (IGNORE where nothing is learnt) it returns the summed token losses instead,
        [1 + depths]: the main head's, then each MTP depth's against the targets shifted by k. They come
        from `linear_cross_entropy`, which never holds the whole logits (the training path)."""
        t = input_ids.shape[1]
        embeds = self.embed_tokens(input_ids)
        positions = torch.arange(t, device=input_ids.device)
        cos, sin = self.rotary_emb(positions, embeds.dtype)
        h = embeds
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        outputs = [self._head(h, targets)]
        for k, module in enumerate(self.mtp if mtp else (), start=1):
            # Depth k at position i sees token i+k and depth k-1's hidden state at i: T-k positions.
            h = module(embeds[:, k:], h[:, :-1], cos[: t - k], sin[: t - k])
            outputs.append(self._head(h, None if targets is None else targets[:, k:]))
        if targets is not None:
            return torch.stack(outputs)
        return (outputs[0], outputs[1:]) if mtp else outputs[0]

    def _head(self, h: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, T, vocab], or with targets the summed cross-entropy (the fused, chunked path)."""
        if targets is None:
            return self.lm_head(h)
        # The matmuls run in autocast's dtype, as lm_head's would.
        return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), compute_dtype(h))

    def forward_cached(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """The inference engine's pass: new tokens [B, t] at absolute positions [B, t], attending through
        `cache` (absorbed MLA). Returns the final normed hidden states [B, t, hidden]; `lm_head` of the
        rows the caller needs gives their logits."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, h.dtype)  # [B, t, 1, rope/2]
        for layer in self.layers:
            h = layer(h, cos, sin, cache)
        return self.norm(h)

    def mtp_forward_cached(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, cache: LatentCache
    ) -> torch.Tensor:
        """MTP module 1 for speculative drafting: position i combines token i+1 [B, t] with the hidden
        state of position i [B, t, hidden]; returns its normed hidden states [B, t, hidden]."""
        embeds = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, embeds.dtype)
        return self.mtp[0](embeds, hidden, cos, sin, cache)

    def moe_layers(self) -> list[tuple[str, MoE]]:
        """(name, MoE) for every MoE block, the MTP modules' included, in checkpoint order."""
        return [(name.removesuffix(".mlp"), m) for name, m in self.named_modules() if isinstance(m, MoE)]

    def num_parameters(self, include_mtp: bool = False) -> int:
        """Parameters (tied weights once); the MTP modules only when asked, as the V3 paper counts."""
        total = sum(p.numel() for p in self.parameters())
        return total if include_mtp else total - sum(p.numel() for p in self.mtp.parameters())
