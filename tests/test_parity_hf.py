"""nanoseek against the reference, transformers' DeepseekV3ForCausalLM, in float32 (max abs diff <= 1e-4)."""

import pytest
import torch
from hf_reference import TINY_HF, load_hf_model, make_hf_model, perturb_

import nanoseek
from nanoseek import ModelConfig, Transformer, save_pretrained

ATOL = 1e-4
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.9,
    "mscale_all_dim": 0.7,
}
SEQ = 48  # longer than YARN's original 16 positions

CASES = {
    "q_lora-groups-norm": {},
    "plain_q_proj": {"q_lora_rank": None},
    "yarn-long-context": {"rope_parameters": YARN, "max_position_embeddings": 64},
    "yarn-without-mscale": {
        "rope_parameters": {k: v for k, v in YARN.items() if "mscale" not in k},
        "max_position_embeddings": 64,
    },
    "one_group-no_norm": {"n_group": 1, "topk_group": 1, "norm_topk_prob": False},
    "all_moe": {"first_k_dense_replace": 0},
    "two_dense": {"first_k_dense_replace": 2},
    "rope_not_interleaved": {"rope_interleave": False},
    "tied_embeddings": {"tie_word_embeddings": True},
}


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY_HF["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_hf_checkpoint_loads_with_matching_logits(tmp_path, overrides):
    reference = make_hf_model(tmp_path, **overrides)
    model = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    x = _tokens()
    with torch.no_grad():
        expected, got = reference(x).logits, model(x)
    assert got.shape == (2, SEQ, TINY_HF["vocab_size"])
    assert (got - expected).abs().max().item() <= ATOL


REVERSE = {k: CASES[k] for k in ("q_lora-groups-norm", "plain_q_proj", "yarn-long-context", "tied_embeddings")}


@pytest.mark.parametrize("overrides", REVERSE.values(), ids=REVERSE.keys())
def test_saved_model_loads_in_transformers_with_matching_logits(tmp_path, overrides):
    hf_dict = {**TINY_HF, **overrides, "num_nextn_predict_layers": 1}  # MTP weights must not upset transformers
    model = perturb_(Transformer(ModelConfig.from_hf_dict(hf_dict)), seed=3).eval()
    save_pretrained(model, str(tmp_path), max_shard_bytes=100_000)  # also exercises the sharded index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    reference = load_hf_model(tmp_path)
    x = _tokens(2)
    with torch.no_grad():
        expected, got = reference(x).logits, model(x)
    assert (got - expected).abs().max().item() <= ATOL
