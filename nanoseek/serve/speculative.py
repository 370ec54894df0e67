"""MTP speculative decoding (V3 paper Sec. 5.4.3): the MTP module drafts k tokens, the main model checks
them in one forward pass, and the accepted prefix plus one token from the main model are emitted.

Verification is the standard speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): draft
token d with draft probability q(d) is kept with probability min(1, p(d) / q(d)), where p is the main
model's distribution; at the first rejection a token is drawn from normalise(max(0, p - q)); if all k are
kept, one more is drawn from p. The emitted tokens follow p exactly. Greedy decoding is the special case
p = onehot(argmax), q = onehot(d): drafts are kept while they equal the main model's argmax, so the
output is identical to plain greedy decoding.
"""

from __future__ import annotations

import torch

from nanoseek.serve.sampling import SamplingParams, filter_logits, needs_history


def draftable(params: SamplingParams) -> bool:
    """Whether a request takes drafts: penalties, biases and logprobs need the full sampler on every token."""
    return not needs_history(params) and params.logprobs is None and not params.logit_bias


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution [..., V] that `params` draws from (one-hot for greedy)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filter_logits(logits.float(), params).softmax(-1)


def draft_token(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def verify(
    target_logits: torch.Tensor,
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[int]:
    """target_logits [k+1, V] at the positions that fed the last token and each draft; draft_probs [k, V]
    (None for greedy decoding, which needs only the drafts).

    Returns the emitted tokens: the accepted drafts and one token from the main model (1 to k+1)."""
    if params.greedy:  # the drafts while they equal the argmax, then the argmax (draft_probs unused)
        target = target_logits.argmax(-1).tolist()
        kept = next((j for j, d in enumerate(drafts) if d != target[j]), len(drafts))
        return target[: kept + 1]
    p = distribution(target_logits, params).cpu()
    q = draft_probs.cpu()
    out: list[int] = []
    for j, d in enumerate(drafts):
        ratio = (p[j, d] / q[j, d]).item() if q[j, d] > 0 else 0.0
        if torch.rand((), generator=generator).item() < min(1.0, ratio):
            out.append(d)
            continue
        residual = (p[j] - q[j]).clamp(min=0)
        if residual.sum() <= 0:  # p == q, so a rejection has probability zero; draw from p
            residual = p[j]
        out.append(draft_token(residual / residual.sum(), params, generator))
        return out
    out.append(draft_token(p[len(drafts)], params, generator))
    return out
