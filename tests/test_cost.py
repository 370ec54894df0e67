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
    from nanoseek.serve.prices import PriceTable

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


# --- serving economics: DeepSeek's day-6 figures and SGLang's 96 H100s (`nanoseek cost --serving-report`) -------
def serving(**assumptions):
    from nanoseek.cost import ServingAssumptions, serving_report

    return serving_report(get_preset("v3-671b"), ServingAssumptions(**assumptions))


def figures(report, layout=0):
    return {f["key"]: f for f in report["layouts"][layout]["figures"]}


def test_deepseeks_serving_day_is_rebuilt_within_15_percent():
    """Throughputs from the config, the H800's datasheet and V3's training utilisation; nodes, cost, revenue and
    margin from them and the day's published token counts."""
    report = serving()
    assert set(figures(report)) == {
        "prefill",
        "decode",
        "mean_nodes",
        "peak_nodes",
        "cost",
        "derived_cost",
        "revenue",
        "margin",
        "derived_margin",
    }
    for f in report["layouts"][0]["figures"]:
        assert abs(f["diff"]) < 0.15, f
        assert f["diff"] == pytest.approx(f["derived"] / f["published"] - 1)


def test_sglang_straddles_its_published_figures():
    """The same assumptions on SGLang's 96 H100s. Prefill, with the head run once per prompt, lands 12% under
    (its saturated benchmark of identical 2K prompts runs hotter than V3's training utilisation): within 15%.
    Decode stays 17% over, outside the aim: the model overlaps the all-to-all perfectly (two micro-batches: 78 ms
    of compute hides 64 of all-to-all, 1.8x faster than their sum) where SGLang's own ablation measures two-batch
    overlap at 1.255x (its low-latency kernels hold every SM while sending and receiving, and its dispatch
    busy-waits); a share of non-overlapped all-to-all would have to be fitted to SGLang's own figures."""
    figs = figures(serving(), layout=1)
    assert -0.15 < figs["prefill"]["diff"] < -0.1
    assert 0.15 < figs["decode"]["diff"] < 0.2
    decode = serving()["layouts"][1]["details"]["decode"]
    assert decode["compute_s"] + decode["comm_s"] > 1.8 * decode["step_s"]  # the overlap the model assumes
    per_million = 8 * 2.0 / (figs["decode"]["derived"] * 3600) * 1e6  # a decode node's hour over its tokens
    assert figs["cost_per_million_output"]["derived"] == pytest.approx(per_million)


def test_cost_revenue_and_margin_by_hand():
    from nanoseek.cost import node_day_cost, r1_revenue

    assert node_day_cost(226.75, 8, 2.0) == 226.75 * 8 * 2 * 24 == 87_072  # DeepSeek's $87,072 a day
    revenue = (342e9 * 0.14 + (608e9 - 342e9) * 0.55 + 168e9 * 2.19) / 1e6  # R1's prices per million tokens
    assert r1_revenue() == pytest.approx(revenue) and revenue == pytest.approx(562_027, rel=1e-3)
    figs = figures(serving())
    assert figs["cost"]["derived"] == 87_072 and figs["revenue"]["derived"] == pytest.approx(revenue)
    assert figs["margin"]["derived"] == pytest.approx(revenue / 87_072 - 1)  # 545%
    assert figs["derived_margin"]["derived"] == pytest.approx(revenue / figs["derived_cost"]["derived"] - 1)
    nodes = figs["mean_nodes"]["derived"]
    assert figs["derived_cost"]["derived"] == pytest.approx(nodes * 8 * 2 * 24)
    assert figs["peak_nodes"]["derived"] == pytest.approx(nodes * 278 / 226.75)
    tripled = figures(serving(price_per_gpu_hour=3.0))
    assert tripled["cost"]["derived"] == 226.75 * 8 * 3 * 24 and tripled["revenue"] == figs["revenue"]


def test_the_utilisation_is_v3s_training_one():
    """One calibration, on training: 23.6% of each precision's peak reproduces V3's 2,664K pre-training hours."""
    from nanoseek.cost import flops_by_precision, v3_precision_mfu

    cfg, mfu = get_preset("v3-671b"), v3_precision_mfu()
    fp8, bf16 = flops_by_precision(cfg, 4096)
    assert fp8 + bf16 == pytest.approx(flops_per_token(cfg, 4096).total)
    seconds = 14.8e12 * (fp8 / 1978.9e12 + bf16 / 989.4e12) / mfu
    assert seconds / 3600 == pytest.approx(2_664e3)
    assert 0.2 < mfu < 0.25
    assert serving()["assumptions"]["prefill_mfu"] == serving()["assumptions"]["decode_mfu"] == mfu


def test_prefill_and_decode_throughput_by_hand():
    stats, mfu = model_stats(get_preset("v3-671b")), 0.25
    embedding, fp8_peak, bf16_peak = 129_280 * 7168, 1978.9e12, 989.4e12
    fp8 = 2 * (stats.params_active - 2 * embedding)  # every activated weight but the lookup and the BF16 head
    report = serving(prefill_mfu=mfu, decode_mfu=mfu)
    # Prefill: cache hits are prompt heads, so a computed token sees (1 + hit) * P / 2 keys, 2 x 128 x (192 + 128)
    # FLOPs each per layer; hits cost nothing, so input tokens = computed tokens / (1 - hit). The head's logits
    # are computed at each prompt's last position only: one head per (1 - hit) * P computed tokens.
    hit, ratio = 342 / 608, 608 / 168
    prompt = 4989 * ratio / (ratio + 0.5)  # P / O = 608 / 168 and P + O / 2 = 4,989
    attention = 61 * 128 * (192 + 128) * (1 + hit) * prompt
    head = 2 * embedding / ((1 - hit) * prompt)
    per_gpu = mfu / (fp8 / fp8_peak + (attention + head) / bf16_peak)
    assert figures(report)["prefill"]["derived"] == pytest.approx(8 * per_gpu / (1 - hit))
    sglang = mfu / (fp8 / fp8_peak + (61 * 128 * (192 + 128) * 2000 + 2 * embedding / 2000) / bf16_peak)
    assert figures(report, layout=1)["prefill"]["derived"] == pytest.approx(8 * sglang)  # 2K prompts, no hits
    # SGLang's decode: 256 sequences per GPU, each token's absorbed MLA over 2,000 cached latents.
    mla = 61 * 2 * 128 * (2 * 512 + 64) * 2000
    step = 256 * (fp8 / fp8_peak + (mla + 2 * embedding) / bf16_peak) / mfu
    assert figures(report, layout=1)["decode"]["derived"] == pytest.approx(8 * 256 / step)


def test_deepseeks_decode_batch_is_the_largest_that_keeps_20_tokens_per_user():
    from nanoseek.cost import DEEPSEEK_DAY6, ServingAssumptions, decode_step

    a = ServingAssumptions()
    d = serving()["layouts"][0]["details"]["decode"]
    assert d["user_tokens_per_s"] >= 20 and d["batch"] <= d["max_batch"]
    assert decode_step(get_preset("v3-671b"), DEEPSEEK_DAY6, a, d["batch"] + 1).user_tokens_per_s < 20
    assert d["output_per_node"] == pytest.approx(8 * d["batch"] * d["user_tokens_per_s"])
    assert d["experts_per_gpu"] == 2  # (256 + 32 redundant) / 144, as DeepSeek reports; prefill 288 / 32 = 9
    assert serving()["layouts"][0]["details"]["prefill"]["experts_per_gpu"] == 9


def test_the_assumptions_move_the_figures():
    base = serving()
    # Without two micro-batches the all-to-all adds to the step (SGLang's decode: 64 ms of it against 78 of compute).
    serial = serving(overlap=False)
    assert figures(serial, 1)["decode"]["derived"] < 0.6 * figures(base, 1)["decode"]["derived"]
    # Slower links make no difference while compute bounds the step.
    assert figures(serving(ib_efficiency=0.6), 0)["decode"]["derived"] == figures(base, 0)["decode"]["derived"]
    # MTP: each step verifies a draft (2 tokens through the model) and keeps 1.85 of them; per-user speed holds.
    mtp = serving(mtp_acceptance=0.85)["layouts"][0]["details"]["decode"]
    assert mtp["user_tokens_per_s"] >= 20
    assert mtp["output_per_node"] == pytest.approx(figures(base)["decode"]["derived"] * 1.85 / 2, rel=0.03)


def test_serving_report_cli(capsys):
    import json

    from nanoseek.cli import main

    assert main(["cost", "--serving-report", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [len(layout["figures"]) for layout in out["layouts"]] == [9, 3]
    for layout in out["layouts"]:
        for f in layout["figures"]:
            assert {"key", "name", "unit", "derived", "published", "diff"} <= f.keys()
            assert f["derived"] > 0 and f["published"] > 0
    assert "substantially lower" in out["caveat"]
    assert main(["cost", "--serving-report"]) == 0
    text = capsys.readouterr().out
    names = [f["name"] for layout in out["layouts"] for f in layout["figures"]]
    assert all(name in text for name in names) and "assumptions" in text and "substantially lower" in text
