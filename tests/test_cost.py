"""Parameter and KV-cache arithmetic: against the V3 paper and against instantiated models."""

import pytest
import torch

from nanoseek import Transformer, get_preset, model_stats
from nanoseek.cost import kv_bytes_per_token


def test_v3_671b_matches_the_paper():
    stats = model_stats(get_preset("v3-671b"))
    assert stats.params_total == pytest.approx(671e9, rel=0.005)  # "671B total parameters"
    assert stats.params_active == pytest.approx(37e9, rel=0.03)  # "37B activated for each token"
    # 61 layers x (512 latent + 64 RoPE key) x 2 bytes (bf16)
    assert stats.kv_bytes_per_token == 61 * (512 + 64) * 2 == 70_272
    assert stats.kv_bytes_per_token_mha == 61 * 128 * (192 + 128) * 2


@pytest.mark.parametrize(
    "changes",
    [{}, {"q_lora_rank": None}, {"tie_word_embeddings": True}, {"first_k_dense_replace": 0},
     {"n_shared_experts": 0, "num_nextn_predict_layers": 2}, {"n_routed_experts": 0}],
)  # fmt: skip
def test_counts_equal_an_instantiated_model(changes):
    cfg = get_preset("tiny").replace(**changes)
    with torch.device("meta"):
        model = Transformer(cfg)
    stats = model_stats(cfg)
    assert stats.params_total == model.num_parameters()
    assert stats.params_mtp == model.num_parameters(include_mtp=True) - model.num_parameters()


def test_active_parameters_count_only_chosen_experts():
    cfg = get_preset("tiny")
    stats = model_stats(cfg)
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    unused = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    assert stats.params_total - stats.params_active == unused


def test_unknown_attention_kind_is_refused():
    with pytest.raises(ValueError, match="'mla' or 'mha'"):
        kv_bytes_per_token(get_preset("tiny"), attention="gqa")


def test_all_to_all_bytes_follow_the_config():
    from nanoseek.cost import all_to_all_bytes_per_token

    tiny = get_preset("tiny")  # 3 MoE layers, top-2, hidden 128
    assert all_to_all_bytes_per_token(tiny, ep=2) == 3 * 2 * 128 * (1 / 2) * (2 + 2)
    assert all_to_all_bytes_per_token(tiny, ep=1) == 0
    v3 = all_to_all_bytes_per_token(get_preset("v3-671b"), ep=64, dispatch_bytes=1 + 4 / 128, combine_bytes=2)
    assert v3 == pytest.approx(58 * 8 * 7168 * 63 / 64 * (1 + 4 / 128 + 2))
    with pytest.raises(ValueError, match="divide"):
        all_to_all_bytes_per_token(tiny, ep=3)
