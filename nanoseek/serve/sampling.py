"""The one sampler, for the engine and for RL: greedy, temperature, top-k, top-p, min-p, repetition /
presence / frequency penalties, per-request seeds, log-probabilities; a whole batch in one pass.

Penalties follow the usual conventions: repetition (CTRL, Keskar et al. 2019) divides positive logits of
seen tokens and multiplies negative ones; presence and frequency (OpenAI) subtract a constant per seen
token and per occurrence of it in the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanoseek.flags import flag


@dataclass(slots=True)
class SamplingParams:
    """How one request samples. The defaults are OpenAI's and DeepSeek's API defaults (temperature 1,
    top_p 1), shared by the CLI's flags (the fields made with `flag`) and the server's request fields."""

    max_tokens: int = flag("longest reply, in tokens", default=64)
    temperature: float = flag("sampling temperature; 0: greedy", default=1.0)
    top_k: int = flag("sample from the k likeliest tokens; 0: off", default=0)
    top_p: float = flag("nucleus sampling: the likeliest tokens holding this much probability", default=1.0)
    min_p: float = flag("drop tokens below this fraction of the likeliest one's probability", default=0.0)
    repetition_penalty: float = flag("divide seen tokens' positive logits by this (CTRL's)", default=1.0)
    presence_penalty: float = flag("subtracted once from every seen token's logit (OpenAI's)", default=0.0)
    frequency_penalty: float = flag("subtracted per occurrence in the output (OpenAI's)", default=0.0)
    stop: list[str] = flag("stop strings", default_factory=list, metavar="TEXT")
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = flag("sampling seed (default: fresh randomness)", default=None)
    logprobs: int | None = None  # also return the top-n alternatives' log-probabilities
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to those tokens' logits (OpenAI's)
    prompt_logprobs: int | None = None  # each prompt token's log-probability and the top-n alternatives
    grammar: str | None = None  # llguidance Lark text the output must match (serve/grammar.py)

    def __post_init__(self) -> None:
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError("max_tokens must be at least 1 (0 only to score a prompt: with prompt_logprobs)")
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


class History:
    """What penalties need of one request, kept up to date in O(1) per token: the prompt's tokens and a
    count of each output token, as [V] tensors (only for requests with penalties)."""

    def __init__(self, prompt: list[int], vocab: int, device: torch.device | str = "cpu"):
        self.prompt_seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.prompt_seen[torch.tensor(prompt, dtype=torch.long, device=device)] = True
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)

    def add(self, token: int) -> None:
        self.counts[token] += 1


def needs_history(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[History | None],
) -> list[Sampled]:
    """One token for every row of logits [B, V] (float32), in one pass over the batch: penalties, greedy,
    temperature, top-k, top-p and min-p, then inverse-CDF sampling with one uniform number per row. A
    seeded row draws its number from its own generator, so a seed gives the same tokens whatever else is
    in the batch."""
    logits = logits.float().clone()
    rows = [i for i, h in enumerate(histories) if h is not None and needs_history(params[i])]
    if rows:  # penalties, for the rows that have them, stacked
        seen = torch.stack([histories[i].prompt_seen | (histories[i].counts > 0) for i in rows])
        counts = torch.stack([histories[i].counts for i in rows])
        sub = logits[rows]
        rep = _column([params[i].repetition_penalty for i in rows], sub)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub -= _column([params[i].frequency_penalty for i in rows], sub) * counts
        sub -= _column([params[i].presence_penalty for i in rows], sub) * (counts > 0).to(sub.dtype)
        logits[rows] = sub
    biased = [(i, token, bias) for i, p in enumerate(params) for token, bias in p.logit_bias.items()]
    if biased:  # every row's biases in one indexed add
        rows_, tokens_, biases = zip(*biased, strict=True)
        logits.index_put_((torch.tensor(rows_), torch.tensor(tokens_)), _column(biases, logits)[:, 0], accumulate=True)
    logprobs = logits.log_softmax(-1)
    tokens = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        sub = logits[sampled] / _column([max(params[i].temperature, 1e-4) for i in sampled], logits)
        uniform = torch.rand(len(sampled), device=sub.device)
        for j, i in enumerate(sampled):  # seeded rows: each from its own generator
            if generators[i] is not None:
                uniform[j] = torch.rand(1, generator=generators[i]).item()
        picks = torch.empty(len(sampled), dtype=torch.long, device=sub.device)
        filtered = [j for j, i in enumerate(sampled) if filters(params[i])]
        if filtered:  # top-k, top-p and min-p need the distribution sorted
            picks[filtered] = _filtered_draw(sub[filtered], uniform[filtered], [params[sampled[j]] for j in filtered])
        if unfiltered := [j for j, i in enumerate(sampled) if not filters(params[i])]:  # in vocabulary order
            picks[unfiltered] = _draw(sub[unfiltered].softmax(-1), uniform[unfiltered])
        tokens[sampled] = picks
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    most = max((p.logprobs or 0 for p in params), default=0)
    top = logprobs.topk(most, dim=-1) if most else None
    tokens_list, chosen_list = tokens.tolist(), chosen.tolist()  # one copy to the host for the batch
    top_values, top_ids = (top.values.tolist(), top.indices.tolist()) if top is not None else (None, None)
    out = []
    for i, p in enumerate(params):
        alternatives = None
        if p.logprobs:
            alternatives = dict(zip(top_ids[i][: p.logprobs], top_values[i][: p.logprobs], strict=True))
        out.append(Sampled(tokens_list[i], chosen_list[i], alternatives))
    return out


def filters(params: SamplingParams) -> bool:
    """Whether a sampled row cuts its distribution (top-k, top-p or min-p), for which it must be sorted."""
    return params.top_k > 0 or params.top_p < 1 or params.min_p > 0


def _draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row of probs [R, V], the index where its uniform number falls in the
    cumulative sum (in any order of the vocabulary: vocabulary order needs no sort)."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1)).clamp(max=probs.shape[-1] - 1).squeeze(-1)


def _filtered_draw(logits: torch.Tensor, uniform: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p and min-p, on each row's sorted distribution, then inverse-CDF sampling."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = rank >= _column([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params], logits)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)  # top-p and min-p after top-k
    drop |= probs.cumsum(-1) - probs >= _column([p.top_p for p in params], logits)  # top-p
    drop |= probs < _column([p.min_p for p in params], logits) * probs[:, :1]  # min-p
    drop[:, 0] = False  # the most likely token always stays (a top_p that rounds to 0 keeps it, as vLLM)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    return order.gather(-1, _draw(probs, uniform)[:, None]).squeeze(-1)


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    prompt: list[int],
    output: list[int],
) -> Sampled:
    """Pick the next token for one request from its logits [V] (float32): `sample_batch` on one row."""
    history = None
    if needs_history(params):
        history = History(prompt, logits.shape[-1], logits.device)
        for token in output:
            history.add(token)
    return sample_batch(logits[None], [params], [generator], [history])[0]
