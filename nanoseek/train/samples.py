"""A few sampled continuations at evaluation steps, so the user sees the model learn.

A plain full-forward loop (no KV cache: the model may be sharded or mid-step), drawing with the one
sampler that the inference engine uses.
"""

from __future__ import annotations

import torch

from nanoseek.model import Transformer
from nanoseek.serve.sampling import SamplingParams, sample_token
from nanoseek.tokenizer import Tokenizer


@torch.no_grad()
def sample_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    seed: int = 0,
    max_context: int = 256,
) -> str:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = torch.tensor([(ids + new)[-max_context:]], device=device)
        token = sample_token(model(context)[0, -1], params, g, ids, new).token
        if token == tokenizer.eos_id:
            break
        new.append(token)
    model.train(was_training)
    return tokenizer.decode(new)
