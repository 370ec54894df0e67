"""nanoseek: the DeepSeek-V3 system (MLA, DeepSeekMoE, MTP) in one readable PyTorch codebase.

The public names load on first use (PEP 562), so `import nanoseek` costs neither the inference engine nor
FastAPI, and `nanoseek info` or any `--help` stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanoseek.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "PRESETS": "nanoseek.config",
    "ModelConfig": "nanoseek.config",
    "YarnScaling": "nanoseek.config",
    "get_preset": "nanoseek.config",
    "CheckpointError": "nanoseek.checkpoint",
    "from_pretrained": "nanoseek.checkpoint",
    "save_pretrained": "nanoseek.checkpoint",
    "ModelStats": "nanoseek.cost",
    "model_stats": "nanoseek.cost",
    "Transformer": "nanoseek.model",
    "Engine": "nanoseek.serve.engine",
    "RequestOutput": "nanoseek.serve.engine",
    "SamplingParams": "nanoseek.serve.sampling",
    "Tokenizer": "nanoseek.tokenizer",
    "load_tokenizer": "nanoseek.tokenizer",
}

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Engine",
    "ModelConfig",
    "ModelStats",
    "RequestOutput",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "YarnScaling",
    "from_pretrained",
    "get_preset",
    "load_tokenizer",
    "model_stats",
    "save_pretrained",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from nanoseek.checkpoint import CheckpointError, from_pretrained, save_pretrained
    from nanoseek.config import PRESETS, ModelConfig, YarnScaling, get_preset
    from nanoseek.cost import ModelStats, model_stats
    from nanoseek.model import Transformer
    from nanoseek.serve.engine import Engine, RequestOutput
    from nanoseek.serve.sampling import SamplingParams
    from nanoseek.tokenizer import Tokenizer, load_tokenizer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
