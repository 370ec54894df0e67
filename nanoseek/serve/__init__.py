"""Serving: the inference engine (paged latent cache, continuous batching, absorbed MLA) and the sampler."""

from nanoseek.serve.engine import Engine, RequestOutput
from nanoseek.serve.sampling import SamplingParams

__all__ = ["Engine", "RequestOutput", "SamplingParams"]
