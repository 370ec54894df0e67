"""A few sampled continuations at evaluation steps, so the user sees the model learn.

Deliberately small (no KV cache): the inference engine brings the real sampler.
"""

from __future__ import annotations

import torch

from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer


@torch.no_grad()
def sample_text(
    model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.8,
    seed: int = 0, max_context: int = 256,
) -> str:  # fmt: skip
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    g = torch.Generator().manual_seed(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = torch.tensor([(ids + new)[-max_context:]], device=device)
        probs = torch.softmax(model(context)[0, -1].float().cpu() / temperature, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=g))
        if token == tokenizer.eos_id:
            break
        new.append(token)
    model.train(was_training)
    return tokenizer.decode(new)
