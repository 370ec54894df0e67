"""Random, fully perturbed transformers DeepseekV3ForCausalLM models: the reference for parity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_HF: dict[str, Any] = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    max_position_embeddings=128,
    rope_interleave=True,
    tie_word_embeddings=False,
    num_nextn_predict_layers=0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def hf_config(**overrides: Any):
    overrides.setdefault("num_key_value_heads", overrides.get("num_attention_heads", TINY_HF["num_attention_heads"]))
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**{**TINY_HF, **overrides})


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight and the gate bias off its initial value, so nothing matches by accident."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() or "inv_freq" in name:
            continue
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name.endswith("e_score_correction_bias"):
            t.copy_(0.3 * noise)  # large enough to change which experts win
        elif t.ndim == 1:
            t.copy_(1.0 + 0.2 * noise)  # norms
        else:
            t.copy_(noise / t.shape[-1] ** 0.5)
    return model


def make_hf_model(out_dir: Path | None = None, seed: int = 0, **overrides: Any):
    """A perturbed float32 reference model in eval mode, saved to out_dir when given."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM._from_config(hf_config(**overrides), attn_implementation="eager")
    perturb_(model.float().eval(), seed)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def load_hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
