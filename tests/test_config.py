"""ModelConfig reads DeepSeek's and transformers' config.json, writes one transformers reads, and validates."""

import dataclasses
import json

import pytest
from hf_reference import hf_config
from hypothesis import given
from hypothesis import strategies as st

from nanoseek import PRESETS, ModelConfig, YarnScaling, get_preset

# deepseek-ai/DeepSeek-V3 config.json as released (rope_theta top level, rope_scaling with "type").
DEEPSEEK_V3_RELEASE = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "ep_size": 1,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


def test_reads_the_deepseek_v3_release_config():
    assert ModelConfig.from_hf_dict(DEEPSEEK_V3_RELEASE) == get_preset("v3-671b")


def test_reads_a_transformers_5_config():
    hf = hf_config(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 5000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "mscale": 0.5,
            "mscale_all_dim": 0.25,
        },
        eos_token_id=[7, 8],
        num_nextn_predict_layers=2,
        max_position_embeddings=256,
    )
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    assert cfg.rope_theta == 5000.0 and cfg.eos_token_id == 7 and cfg.num_nextn_predict_layers == 2
    assert cfg.rope_scaling == YarnScaling(
        factor=8.0, original_max_position_embeddings=32, mscale=0.5, mscale_all_dim=0.25
    )
    assert (cfg.hidden_size, cfg.n_group, cfg.q_lora_rank) == (hf.hidden_size, hf.n_group, hf.q_lora_rank)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_written_config_is_read_back_by_transformers_and_by_us(tmp_path, name):
    from transformers import AutoConfig

    cfg = get_preset(name)
    cfg.save_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path) == cfg
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "deepseek_v3"
    for field in ("hidden_size", "kv_lora_rank", "q_lora_rank", "n_routed_experts", "topk_group", "rope_interleave"):
        assert getattr(hf, field) == getattr(cfg, field)
    assert hf.num_mtp_layers == cfg.num_nextn_predict_layers
    assert hf.rope_parameters["rope_type"] == ("yarn" if cfg.rope_scaling else "default")


@given(
    layers=st.integers(1, 6),
    dense=st.integers(0, 6),
    groups=st.sampled_from([1, 2, 4]),
    topk_group=st.integers(1, 4),
    k=st.integers(1, 8),
    q_lora=st.sampled_from([None, 16]),
    yarn=st.booleans(),
    tie=st.booleans(),
)
def test_hf_dict_round_trip(layers, dense, groups, topk_group, k, q_lora, yarn, tie):
    try:
        cfg = get_preset("tiny").replace(
            num_hidden_layers=layers,
            first_k_dense_replace=dense,
            n_group=groups,
            topk_group=topk_group,
            num_experts_per_tok=k,
            q_lora_rank=q_lora,
            tie_word_embeddings=tie,
            rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=64) if yarn else None,
        )
    except ValueError:
        return  # invalid combinations are rejected up front (tested below)
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_group": 3}, "divisible by n_group"),
        ({"topk_group": 5}, "topk_group"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"qk_rope_head_dim": 15}, "even"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"first_k_dense_replace": 9}, "first_k_dense_replace"),
        ({"hidden_size": 0}, "hidden_size must be positive"),
    ],
)
def test_invalid_configs_say_what_is_wrong(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_preset("tiny"), **changes)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="tiny, small"):
        get_preset("huge")


def test_unsupported_rope_type_is_refused():
    with pytest.raises(ValueError, match="unsupported rope type 'linear'"):
        ModelConfig.from_hf_dict({"rope_scaling": {"type": "linear", "factor": 2.0}})


@pytest.mark.parametrize(
    ("key", "value"), [("topk_method", "group_limited_greedy"), ("hidden_act", "gelu"), ("moe_layer_freq", 2)]
)
def test_settings_nanoseek_does_not_implement_are_refused(key, value):
    with pytest.raises(ValueError, match=f"{key}="):
        ModelConfig.from_hf_dict({**DEEPSEEK_V3_RELEASE, key: value})


def test_rope_frequencies_stay_fp32_in_a_bf16_model_built_or_loaded(tmp_path):
    """Rounded to bf16, the angle of position p would be off by up to p * 2^-9 radians."""
    import torch

    from nanoseek import Transformer, from_pretrained, save_pretrained
    from nanoseek.model.rope import rope_inv_freq

    cfg = get_preset("tiny")
    exact = rope_inv_freq(cfg)[0]
    model = Transformer(cfg).to(torch.bfloat16)
    assert model.rotary_emb.inv_freq.dtype == torch.float32 and torch.equal(model.rotary_emb.inv_freq, exact)
    save_pretrained(model, str(tmp_path))
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16 and torch.equal(loaded.rotary_emb.inv_freq, exact)


def _tiny_hf(**changes) -> dict:
    """The tiny preset's config.json without rope_parameters, so that a top-level rope_theta is the one read."""
    d = get_preset("tiny").to_hf_dict()
    del d["rope_parameters"]
    return d | changes


@pytest.mark.parametrize(
    ("key", "value", "expects"),
    [
        ("hidden_size", 128.5, "an integer"),
        ("hidden_size", "128", "an integer"),
        ("hidden_size", True, "an integer"),
        ("num_hidden_layers", None, "an integer"),
        ("q_lora_rank", "64", "an integer or null"),
        ("routed_scaling_factor", "2.5", "a finite number"),
        ("rms_norm_eps", float("nan"), "a finite number"),
        ("rope_theta", "1e4", "a finite number"),
        ("norm_topk_prob", 1, "true or false"),
        ("scoring_func", ["sigmoid"], "a string"),
        ("bos_token_id", 0.5, "an integer or null"),
        ("num_hidden_layers", 10**30, r"an integer below 2\*\*63 \(torch's largest size\)"),
    ],
)
def test_a_wrongly_typed_field_names_the_field_what_it_got_and_what_it_expects(tmp_path, key, value, expects):
    (tmp_path / "config.json").write_text(json.dumps(_tiny_hf(**{key: value})))
    with pytest.raises(ValueError, match=rf"config\.json: {key} must be {expects}, got ") as e:
        ModelConfig.from_json(tmp_path)
    assert json.dumps(value) in str(e.value)


# Wrong values for each kind of field (a field's annotation, as written: "int | None" is an int field).
WRONG = {
    "int": ["1", 1.5, True, ["1"]],
    "float": ["1", True, float("inf"), {"a": 1}],
    "bool": [1, "true", None],
    "str": [1, None],
}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (f.name, value)
        for f in dataclasses.fields(ModelConfig)
        if f.name != "rope_scaling"
        for value in WRONG[f.type.split(" | ")[0]]
    ],
)
def test_every_field_is_type_checked(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be "):
        ModelConfig.from_hf_dict(_tiny_hf(**{name: value}))


def test_integers_are_accepted_as_floats_and_become_floats():
    cfg = ModelConfig.from_hf_dict(_tiny_hf(routed_scaling_factor=2, rope_theta=50000))
    assert cfg.routed_scaling_factor == 2.0 and isinstance(cfg.routed_scaling_factor, float)
    assert isinstance(cfg.rope_theta, float)


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"rope_type": "yarn", "factor": "40"}, 'rope_scaling factor must be a finite number, got "40"'),
        ({"rope_type": "yarn", "original_max_position_embeddings": 64.5}, "original_max_position_embeddings"),
        ([1, 2], "rope_parameters must be a JSON object"),
    ],
)
def test_wrongly_typed_rope_settings_are_named(rope, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(_tiny_hf(rope_parameters=rope))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"intermediate_size": -1}, "intermediate_size must be >= 0"),
        ({"n_routed_experts": -8}, "n_routed_experts must be >= 0"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be positive"),
        ({"rope_theta": -1.0}, "rope_theta must be positive"),
    ],
)
def test_out_of_range_values_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_preset("tiny"), **changes)


@pytest.mark.parametrize("text", ["{not json", "[]", "\xff\xfe"])
def test_a_config_json_that_is_not_a_json_object_names_the_file(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"config\.json is not a JSON object"):
        ModelConfig.from_json(tmp_path)
