"""Model configuration with the Hugging Face DeepSeek-V3 `config.json` field names, and presets.

`ModelConfig.from_hf_dict` reads config.json files written by the DeepSeek releases (`rope_theta` plus a
`rope_scaling` dict) and by transformers 5.x (`rope_parameters`); `to_hf_dict` writes one that
transformers' `DeepseekV3ForCausalLM` reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.flags import flag

IGNORE = -100  # the label of a token that trains nothing (torch's and transformers' ignore_index)


def _is_number(v: object) -> bool:
    # bool is an int subclass, and a huge int (10**400) has no float: neither is a float setting.
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


# Each kind of field, by its annotation as written (`from __future__ import annotations` keeps them strings).
_FITS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
    "YarnScaling": lambda v: isinstance(v, YarnScaling),
}
_EXPECTS = {
    "int": "an integer",
    "float": "a finite number",
    "bool": "true or false",
    "str": "a string",
    "None": "null",
    "YarnScaling": "a rope scaling object",
}


_JSON_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def _shown(value: object) -> str:
    """A value as config.json spells it, and its JSON type: '"128" (a string)', cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({_JSON_TYPES.get(type(value), 'a ' + type(value).__name__)})" if value is not None else text


def check_type(name: str, value: object, annotation: str) -> None:
    """Raise a ValueError naming the setting, what it got and what it expects, unless value fits annotation."""
    kinds = annotation.split(" | ")
    if not any(_FITS[kind](value) for kind in kinds):
        expects = " or ".join(_EXPECTS[kind] for kind in kinds)
        raise ValueError(f"{name} must be {expects}, got {_shown(value)}")
    if _FITS["int"](value) and not -(2**63) <= value < 2**63:  # no tensor is that large, and sums would overflow
        raise ValueError(f"{name} must be an integer below 2**63 (torch's largest size), got {_shown(value)}")


def _check_fields(obj: Any, prefix: str = "") -> None:
    """Type-check every field of a config dataclass; an int given for a float setting becomes a float."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        check_type(prefix + f.name, value, f.type)
        if f.type.startswith("float") and _FITS["int"](value):
            setattr(obj, f.name, float(value))


@dataclass(slots=True)
class YarnScaling:
    """YaRN context extension (Peng et al. 2023) as DeepSeek-V2/V3 configure it."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None  # None: not set, as transformers reads a config without the key
    mscale_all_dim: float | None = None

    def __post_init__(self) -> None:
        _check_fields(self, prefix="rope_scaling ")
        if self.factor < 1.0:
            raise ValueError(f"rope scaling factor must be >= 1, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("original_max_position_embeddings must be positive")


@dataclass(slots=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # one routed or shared expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: plain q_proj, as in V2-Lite
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "softmax" for V2-style gates
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    def __post_init__(self) -> None:
        _check_fields(self)
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
            "rope_theta",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank must be positive or null (a plain q_proj), got {self.q_lora_rank}")
        # Negative sizes would reach torch as tensor shapes; negative counts would silently mean none.
        non_negative = (
            "intermediate_size",
            "moe_intermediate_size",
            "qk_nope_head_dim",
            "n_routed_experts",
            "n_shared_experts",
            "rms_norm_eps",
            "initializer_range",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError("first_k_dense_replace must lie in [0, num_hidden_layers]")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if self.num_nextn_predict_layers < 0:
            raise ValueError("num_nextn_predict_layers must be >= 0")
        if self.has_moe:
            self._check_routing()

    def _check_routing(self) -> None:
        e, g = self.n_routed_experts, self.n_group
        if g <= 0 or e % g:
            raise ValueError(f"n_routed_experts ({e}) must be divisible by n_group ({g})")
        if not 1 <= self.topk_group <= g:
            raise ValueError(f"topk_group must lie in [1, n_group={g}], got {self.topk_group}")
        if g > 1 and e // g < 2:
            raise ValueError("group-limited routing scores a group by its top-2 experts: need >= 2 per group")
        reachable = self.topk_group * (e // g)
        if not 1 <= self.num_experts_per_tok <= reachable:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must lie in [1, {reachable}] "
                f"(topk_group * experts per group)"
            )

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def has_moe(self) -> bool:
        moe_layers = self.num_hidden_layers - self.first_k_dense_replace + self.num_nextn_predict_layers
        return self.n_routed_experts > 0 and moe_layers > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MTP modules sit at layer_idx >= num_hidden_layers, so they are MoE too (as in V3's layer 61)."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    # --- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Every setting is type-checked (by __post_init__): a wrong one is a ValueError that names it."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of settings, got a {type(d).__name__}")
        unsupported = {
            "hidden_act": ("silu",),
            "moe_layer_freq": (1,),
            "topk_method": ("noaux_tc", "greedy"),
            "attention_bias": (False,),
        }
        for key, allowed in unsupported.items():
            if d.get(key, allowed[0]) not in allowed:
                raise ValueError(
                    f"{key}={d[key]!r} is not supported (nanoseek implements {', '.join(map(repr, allowed))})"
                )
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "rope_theta"}
        kwargs = {k: v for k, v in d.items() if k in names}
        for key in ("bos_token_id", "eos_token_id"):  # transformers allows lists; we keep the first
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][0] if kwargs[key] else None
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kwargs["num_nextn_predict_layers"] = d["num_mtp_layers"]
        # transformers 5.x nests rope_theta in rope_parameters; DeepSeek's releases keep it top level.
        key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
        rope = d.get(key) or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{key} must be a JSON object, got {_shown(rope)}")
        kwargs["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))  # checked by __post_init__
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "yarn":
            yarn_names = {f.name for f in dataclasses.fields(YarnScaling)}
            yarn = {k: v for k, v in rope.items() if k in yarn_names and v is not None}
            if "factor" not in yarn:  # transformers' rule: the context extension ratio
                if "original_max_position_embeddings" not in yarn or "max_position_embeddings" not in d:
                    raise ValueError(
                        "yarn rope scaling needs 'factor' or both max_position_embeddings and "
                        "'original_max_position_embeddings'"
                    )
                check_type("max_position_embeddings", d["max_position_embeddings"], "int")
                original = yarn["original_max_position_embeddings"]
                check_type("rope_scaling original_max_position_embeddings", original, "int")
                yarn["factor"] = d["max_position_embeddings"] / original
            kwargs["rope_scaling"] = YarnScaling(**yarn)
        elif kind != "default":
            raise ValueError(f"unsupported rope type {kind!r}: nanoseek implements 'default' and 'yarn'")
        if kwargs.get("q_lora_rank") == 0:
            kwargs["q_lora_rank"] = None
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("rope_scaling")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            yarn = {k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if v is not None}
            rope = {"rope_type": "yarn", "rope_theta": self.rope_theta, **yarn}
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **d,
            "rope_parameters": rope,
            "num_key_value_heads": self.num_attention_heads,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
        }

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}: pass a Hugging Face model folder")
        fix = "write it again (save_pretrained writes one) or copy the model's own config.json"
        try:
            settings = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{path} is not a JSON object of model settings: it is not valid JSON ({e}); {fix}"
            ) from None
        if not isinstance(settings, dict):
            raise ValueError(f"{path} is not a JSON object of model settings: it holds {_shown(settings)}; {fix}")
        try:
            return cls.from_hf_dict(settings)
        except ValueError as e:  # the file too, not only the setting: the server reads more than one
            raise ValueError(f"{path}: {e}") from None

    def save_json(self, path: str | Path, **extra: Any) -> None:
        Path(path).write_text(json.dumps({**self.to_hf_dict(), **extra}, indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# One complexity dial per preset: each is a ModelConfig; `tiny` trains on a 2-core CPU in minutes.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        max_position_embeddings=1024,
    ),
    "small": ModelConfig(
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=256,
        num_hidden_layers=8,
        first_k_dense_replace=1,
        num_attention_heads=8,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        max_position_embeddings=2048,
    ),
    # DeepSeek-V2-Lite's shape (15.7B total, 2.4B active) with V3's sigmoid gate and bias, so that it
    # stays one checkpoint format (model_type deepseek_v3) that transformers loads.
    "v2-lite": ModelConfig(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        max_position_embeddings=163840,
        rope_scaling=YarnScaling(
            factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707
        ),
        num_nextn_predict_layers=0,
        bos_token_id=100000,
        eos_token_id=100001,
    ),
    # The real DeepSeek-V3 dimensions (config.json of deepseek-ai/DeepSeek-V3): arithmetic only.
    "v3-671b": ModelConfig(
        max_position_embeddings=163840,
        rope_scaling=YarnScaling(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0),
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


__all__ = ["PRESETS", "ModelConfig", "ModelSource", "YarnScaling", "get_preset"]


@dataclass(slots=True)
class ModelSource:
    """A model's config from a built-in preset or a model folder (for commands that need no weights)."""

    preset: str | None = flag("a built-in config (default: tiny)", default=None, choices=sorted(PRESETS))
    model: str | None = flag(
        "a folder with a DeepSeek-V3 config.json (instead of --preset)", default=None, metavar="DIR"
    )
    default_preset = "tiny"

    def __post_init__(self) -> None:
        if self.preset and self.model:
            raise ValueError("pass --preset or --model, not both")

    @property
    def name(self) -> str:
        return self.model or self.preset or self.default_preset

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_json(self.model) if self.model else get_preset(self.preset or self.default_preset)
