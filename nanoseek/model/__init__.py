"""The DeepSeek-V3 architecture: MLA, DeepSeekMoE, MTP."""

from nanoseek.model.transformer import Transformer

__all__ = ["Transformer"]
