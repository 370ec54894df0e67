"""Model arithmetic from a config alone (no weights): parameter counts and KV-cache bytes per token.

Counts follow the V3 paper's convention: the main model without the MTP modules (671B total, 37B
activated per token for DeepSeek-V3). The balancing bias is a buffer, not a parameter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nanoseek.config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    h, n = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = h * n * cfg.qk_head_dim
    else:
        q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * n * cfg.qk_head_dim
    kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + n * cfg.v_head_dim * h


def expert_params(cfg: ModelConfig) -> int:
    """One routed (or shared) SwiGLU expert."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def layer_params(cfg: ModelConfig, layer_idx: int) -> tuple[int, int]:
    """(total, activated per token) for one decoder block."""
    base = attention_params(cfg) + 2 * cfg.hidden_size  # + input and post-attention norms
    if not cfg.is_moe_layer(layer_idx):
        dense = base + 3 * cfg.hidden_size * cfg.intermediate_size
        return dense, dense
    shared = base + cfg.n_routed_experts * cfg.hidden_size + cfg.n_shared_experts * expert_params(cfg)
    return (shared + cfg.n_routed_experts * expert_params(cfg), shared + cfg.num_experts_per_tok * expert_params(cfg))


@dataclass(slots=True)
class ModelStats:
    params_total: int
    params_active: int
    params_mtp: int  # the MTP modules' own weights (they share the embedding and head)
    kv_bytes_per_token: int  # MLA latent cache, all layers
    kv_bytes_per_token_mha: int  # the same model with full multi-head K/V
    kv_dtype_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2, attention: str = "mla") -> int:
    """Bytes cached per token over all layers: MLA keeps the latent plus the shared RoPE key;
    MHA keeps full keys (nope + rope) and values for every head."""
    if attention == "mla":
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    elif attention == "mha":
        per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        raise ValueError(f"attention must be 'mla' or 'mha', got {attention!r}")
    return per_layer * cfg.num_hidden_layers * dtype_bytes


def moe_layer_count(cfg: ModelConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


def all_to_all_bytes_per_token(cfg: ModelConfig, ep: int, dispatch_bytes: float = 2, combine_bytes: float = 2) -> float:
    """Bytes one token sends to other ranks in a forward pass of the main model under expert parallelism.

    Each MoE layer sends the token's hidden state once per routed expert (K copies), and with uniform
    routing a fraction (ep - 1) / ep of the experts live elsewhere; the outputs come back the same way
    (combine). The backward pass moves the same bytes again. DeepSeek-V3 dispatches in FP8 (1 byte plus a
    4-byte scale per 128 channels) and combines in BF16: dispatch_bytes=1 + 4/128, combine_bytes=2.
    """
    if ep < 1 or (cfg.n_routed_experts and cfg.n_routed_experts % ep):
        raise ValueError(f"ep={ep} must be >= 1 and divide n_routed_experts={cfg.n_routed_experts}")
    remote = (ep - 1) / ep
    per_layer = cfg.num_experts_per_tok * cfg.hidden_size * remote * (dispatch_bytes + combine_bytes)
    return moe_layer_count(cfg) * per_layer


def model_stats(cfg: ModelConfig, dtype_bytes: int = 2) -> ModelStats:
    h, v = cfg.hidden_size, cfg.vocab_size
    outer = v * h * (1 if cfg.tie_word_embeddings else 2) + h  # embedding, head, final norm
    layers = [layer_params(cfg, i) for i in range(cfg.num_hidden_layers)]
    mtp = sum(
        layer_params(cfg, cfg.num_hidden_layers + k)[0] + 2 * h * h + 3 * h  # eh_proj; enorm, hnorm, head norm
        for k in range(cfg.num_nextn_predict_layers)
    )
    return ModelStats(
        params_total=outer + sum(t for t, _ in layers),
        params_active=outer + sum(a for _, a in layers),
        params_mtp=mtp,
        kv_bytes_per_token=kv_bytes_per_token(cfg, dtype_bytes, "mla"),
        kv_bytes_per_token_mha=kv_bytes_per_token(cfg, dtype_bytes, "mha"),
        kv_dtype_bytes=dtype_bytes,
    )
