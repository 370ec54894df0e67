"""nanoseek: the DeepSeek-V3 system (MLA, DeepSeekMoE, MTP) in one readable PyTorch codebase."""

from nanoseek.checkpoint import CheckpointError, from_pretrained, save_pretrained
from nanoseek.config import PRESETS, ModelConfig, YarnScaling, get_preset
from nanoseek.cost import ModelStats, model_stats
from nanoseek.model import Transformer
from nanoseek.serve import Engine, RequestOutput, SamplingParams
from nanoseek.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

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
