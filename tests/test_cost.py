"""Parameter and KV-cache arithmetic: against the V3 paper and against instantiated models."""

import pytest
import torch

from nanoseek import Transformer, get_preset, model_stats
from nanoseek.cost import flops_per_token, kv_bytes_per_token


def test_v3_671b_matches_the_paper():
    stats = model_stats(get_preset("v3-671b"))
    assert stats.params_total == pytest.approx(671e9, rel=0.005)  # "671B total parameters"
    assert stats.params_active == pytest.approx(37e9, rel=0.03)  # "37B activated for each token"
    # 61 layers x (512 latent + 64 RoPE key) x 2 bytes (bf16)
    assert stats.kv_bytes_per_token == 61 * (512 + 64) * 2 == 70_272
    assert stats.kv_bytes_per_token_mha == 61 * 128 * (192 + 128) * 2


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"q_lora_rank": None},
        {"tie_word_embeddings": True},
        {"first_k_dense_replace": 0},
        {"n_shared_experts": 0, "num_nextn_predict_layers": 2},
        {"n_routed_experts": 0},
    ],
)
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
    with pytest.raises(ValueError, match="'mla', 'mha' or 'gqa'"):
        kv_bytes_per_token(get_preset("tiny"), attention="mqa")


def test_all_to_all_bytes_follow_the_config():
    from nanoseek.cost import all_to_all_bytes_per_token

    tiny = get_preset("tiny")  # 3 MoE layers, top-2, hidden 128
    assert all_to_all_bytes_per_token(tiny, ep=2) == 3 * 2 * 128 * (1 / 2) * (2 + 2)
    assert all_to_all_bytes_per_token(tiny, ep=1) == 0
    v3 = all_to_all_bytes_per_token(get_preset("v3-671b"), ep=64, dispatch_bytes=1 + 4 / 128, combine_bytes=2)
    assert v3 == pytest.approx(58 * 8 * 7168 * 63 / 64 * (1 + 4 / 128 + 2))
    with pytest.raises(ValueError, match="divide"):
        all_to_all_bytes_per_token(tiny, ep=3)


def test_flops_per_token_by_hand():
    from nanoseek.cost import flops_per_token

    cfg = get_preset("v3-671b")
    f = flops_per_token(cfg, 4096)
    embedding = 129_280 * 7168  # the lookup is not a matmul; the (untied) head is
    assert f.matmul == 3 * 2 * (model_stats(cfg).params_active - embedding)
    assert f.attention == 3 * 61 * 128 * (192 + 128) * 4096 == 30_702_305_280  # QK and AV over 2048 keys on average
    assert f.total / 1e9 == pytest.approx(260.6, abs=0.1)
    forward = flops_per_token(cfg, 4096, training=False, mtp=False)
    assert forward.total * 3 == f.matmul + f.attention and forward.mtp == 0


def test_gpu_hours_tokens_and_api_price_by_hand():
    from decimal import Decimal

    from nanoseek.cost import GPUS, gpu_hours, parse_count, serving_footprint
    from nanoseek.serve.billing import PriceTable

    assert parse_count("14.8T") == 14.8e12 and parse_count("61.4B") == 61.4e9 and parse_count("2k") == 2000
    with pytest.raises(ValueError, match="not a count"):
        parse_count("lots")
    h100 = GPUS["h100"]
    assert gpu_hours(h100.bf16_flops * 3600 * 0.5, h100, 0.5) == pytest.approx(1.0)  # one hour at 50% MFU
    tiny = get_preset("tiny")
    s = serving_footprint(tiny, h100, context_len=1000, gpus_per_node=1, weight_bytes_per_param=2)
    stats = model_stats(tiny)
    assert s.weight_bytes == 2 * (stats.params_total + stats.params_mtp)
    assert s.contexts_per_node["mla"] == int((80e9 - s.weight_bytes) // (384 * 1000))
    assert PriceTable().cost(500_000, 500_000, 1_000_000) == Decimal("9.25")  # 0.25 + 1 + 8 yuan


def test_the_v3_report_is_reproduced_within_five_percent(capsys):
    import json

    from nanoseek.cli import main

    assert main(["cost", "--preset", "v3-671b", "--v3-report", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_gpu_hours"] == pytest.approx(2_788e3, rel=0.05)  # 2,788K H800 GPU-hours
    assert out["total_dollars"] == pytest.approx(5.576e6, rel=0.05)  # $5.576M at $2 per GPU-hour
    assert out["phases"][0]["gpu_hours"] == pytest.approx(2_664e3, rel=1e-6)  # the calibration phase itself
    assert 0.3 < out["mfu"] < 0.5
    ext = sum(p["gpu_hours"] for p in out["phases"][1:])
    assert 0.5 * 119e3 < ext < 119e3  # long-context attention at the same MFU: cheaper than reported


def test_the_speedrun_cost_follows_each_stages_own_token_counts():
    """The report card's cost comes from the tokens each stage processed, not from the plan's step counts."""
    from nanoseek.report import run_cost

    cfg = get_preset("tiny")
    stages = {
        "pretrain": {"tokens": 4000},
        "fp8": {"tokens": 400},
        "sft": {"tokens": 2000},
        "distill": {"teacher_tokens": 900, "student_tokens": 1500},
        "grpo": {"rollout_tokens": 700, "scored_tokens": 0, "trained_tokens": 700},
    }
    plan = {"seq_len": 256, "grpo_steps": 30}
    cost = run_cost(cfg, plan, stages)
    train, chat = flops_per_token(cfg, 256).total, flops_per_token(cfg, 128, mtp=False).total
    forward = flops_per_token(cfg, 128, training=False, mtp=False).total
    assert cost["flops"]["pretrain"] == 4000 * train and cost["flops"]["sft"] == 2000 * chat
    assert cost["flops"]["distill"] == 900 * forward + 1500 * chat
    assert cost["flops"]["grpo"] == 700 * (forward + chat)
    assert cost["total_flops"] == sum(cost["flops"].values())
    assert sum(cost["gpu_seconds"].values()) == pytest.approx(cost["gpu_hours"] * 3600)
    # Twice the rollouts cost twice as much, whatever the plan says.
    doubled = run_cost(cfg, plan | {"grpo_steps": 1}, stages | {"grpo": {k: 2 * v for k, v in stages["grpo"].items()}})
    assert doubled["flops"]["grpo"] == 2 * cost["flops"]["grpo"] and doubled["flops"]["sft"] == cost["flops"]["sft"]


@pytest.mark.parametrize("preset", ["tiny", "small", "v3-671b"])
def test_a_decode_step_reads_the_active_weights_at_batch_one_and_every_weight_at_a_large_batch(preset):
    from nanoseek.cost import decode_step_bytes, model_stats

    cfg = get_preset(preset)
    stats, embedding = model_stats(cfg), cfg.vocab_size * cfg.hidden_size  # the embedding is a lookup
    assert decode_step_bytes(cfg, 1, 0, 1.0) == stats.params_active - embedding
    assert decode_step_bytes(cfg, 10**6, 0, 1.0) == pytest.approx(stats.params_total - embedding)
    assert decode_step_bytes(cfg, 8, 100, 2.0, 2) - decode_step_bytes(cfg, 8, 0, 2.0, 2) == 8 * 100 * (
        stats.kv_bytes_per_token
    )
