"""A request's state inside the engine, grouped by who needs it: its tokens and text (output), its place
in the paged cache (scheduler, block manager), its speculative drafts (MTP), its timing and billing.

Tokens live in one list, the prompt then the output, appended in place: nothing per step copies or scans
a sequence's whole history (a step costs the same after 8,000 tokens as after 8).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from nanoseek.serve.output import TextOutput
from nanoseek.serve.sampling import History, SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Speculation:
    """MTP drafts to verify at the next step, and what the MTP module has still to see."""

    drafts: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    pending_hidden: torch.Tensor | None = None  # main-model hidden states the MTP module has not seen
    mtp_computed: int = 0  # positions whose MTP latents are cached

    def clear(self) -> None:
        self.drafts, self.draft_probs, self.pending_hidden = [], None, None


@dataclass(eq=False)
class Sequence:
    id: str
    token_ids: list[int]  # the prompt, then the output as it grows
    params: SamplingParams
    text: TextOutput
    num_prompt: int = 0
    # The paged cache.
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose latents are in the cache
    num_hashed: int = 0  # full blocks registered for prefix sharing
    cache_root: bytes | None = None  # the prefix hash chain's start: model and namespace (API key)
    last_hash: bytes | None = None
    # Billing: prompt tokens served from the prefix cache (memory or disk), and from disk alone.
    cached_prompt_tokens: int = 0
    disk_hit_tokens: int = 0
    # Lifetime.
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None  # why the engine failed this request alone (finish_reason "error")
    logprobs: list[tuple[float, dict[int, float] | None]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, dict[int, float] | None] | None] = field(default_factory=list)
    generator: torch.Generator | None = None
    history: History | None = None  # the token counts that penalties need (only for requests with penalties)
    matcher: object | None = None  # an llguidance matcher following the output, for a constrained request
    spec: Speculation = field(default_factory=Speculation)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    last_token_time: float | None = None

    prompt: list[int] = field(init=False)  # the prompt's ids, kept apart: outputs carry them at every step

    def __post_init__(self) -> None:
        self.num_prompt = self.num_prompt or len(self.token_ids)
        self.prompt = self.token_ids[: self.num_prompt]

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt
