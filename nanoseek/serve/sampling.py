"""The one sampler, for the engine and for RL: greedy, temperature, top-k, top-p, min-p, repetition /
presence / frequency penalties, per-request seeds, log-probabilities.

Penalties follow the usual conventions: repetition (CTRL, Keskar et al. 2019) divides positive logits of
seen tokens and multiplies negative ones; presence and frequency (OpenAI) subtract a constant per seen
token and per occurrence of it in the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # also return the top-n alternatives' log-probabilities

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, 0 <= min_p <= 1, top_k >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be positive")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """logits [V] for one request, penalised by what it has seen."""
    if params.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(sorted(set(prompt) | set(output)), device=logits.device)
        chosen = logits[seen]
        logits[seen] = torch.where(chosen > 0, chosen / params.repetition_penalty, chosen * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[-1]).float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks, row by row. logits [..., V] -> same shape."""
    logits = logits / max(params.temperature, 1e-4)  # a vanishing temperature must not overflow to inf - inf
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the smallest set reaching top_p
        drop[..., 0] = False  # the most likely token always stays: a top_p that rounds to 0 keeps it (as vLLM)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


@dataclass(slots=True)
class Sampled:
    token: int
    logprob: float
    top_logprobs: dict[int, float] | None = None


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, prompt: list[int],
    output: list[int],
) -> Sampled:  # fmt: skip
    """Pick the next token for one request from its logits [V] (float32)."""
    logits = apply_penalties(logits.float().clone(), params, prompt, output)
    logprobs = logits.log_softmax(-1)
    if params.greedy:
        token = int(logits.argmax())
    else:
        probs = filter_logits(logits, params).softmax(-1)
        token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    top = None
    if params.logprobs:
        values, ids = logprobs.topk(params.logprobs)
        top = dict(zip(ids.tolist(), values.tolist(), strict=True))
    return Sampled(token, float(logprobs[token]), top)
