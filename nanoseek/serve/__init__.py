"""Serving: the inference engine (paged latent cache, continuous batching, absorbed MLA) and the sampler.

The names load on first use, so that the light settings modules here (`serve.config`) import no engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanoseek.lazy import lazy_exports

_EXPORTS = {
    "Engine": "nanoseek.serve.engine",
    "RequestOutput": "nanoseek.serve.engine",
    "SamplingParams": "nanoseek.serve.sampling",
}
__all__ = ["Engine", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    from nanoseek.serve.engine import Engine, RequestOutput
    from nanoseek.serve.sampling import SamplingParams

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
