"""The output head and its cross-entropy in one pass, chunk by chunk: the [tokens, vocab] logits never
exist whole, in fp32 or otherwise.

    loss_sum = linear_cross_entropy(hidden, lm_head.weight, targets)  # hidden [N, H], targets [N] -> []

Each chunk's logits give its loss and, at once, their own gradient (softmax - one-hot), which two
matmuls turn into the gradients of the hidden states and of the head; backward only scales them. This
skips the log-softmax's backward pass and its [N, V] buffers, the idea of Liger-Kernel's fused linear
cross-entropy. The sum, not the mean: the trainer divides by the step's trained tokens.
"""

from __future__ import annotations

import torch

IGNORE = -100  # targets that train nothing (torch's and transformers' ignore_index)
CHUNK_BYTES = 4 << 20  # fp32 logits per chunk: a CPU's cache holds them; on a GPU they bound memory


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         dtype: torch.dtype | None = None, rows: int | None = None) -> torch.Tensor:  # fmt: skip
    """Summed cross-entropy of `hidden @ weight.T` against targets (IGNORE rows train nothing).

    hidden [N, H], weight [V, H], targets [N]; the matmuls run in `dtype` (default: hidden's; the model
    passes autocast's), the softmax and the sum in fp32; `rows` per chunk (default: CHUNK_BYTES of logits)."""
    keep = (targets != IGNORE).nonzero().squeeze(1)
    if len(keep) < len(targets):  # masked rows (an SFT prompt) cost nothing
        hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
    if len(targets) == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # a step with nothing to learn still gets (zero) gradients
    rows = rows or max(16, CHUNK_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype or hidden.dtype, rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, rows):
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), rows):
            h, y = hidden[start : start + rows].to(dtype), targets[start : start + rows]
            logits = (h @ w.t()).float()  # [n, V]
            picked = logits.gather(1, y[:, None])
            top = logits.amax(-1, keepdim=True)
            e = logits.sub_(top).exp_()  # in place: one [n, V] buffer per chunk
            z = e.sum(-1, keepdim=True)
            total += (top + z.log() - picked).sum()  # logsumexp - the target's logit
            if grads:
                g = e.div_(z)  # softmax
                g[torch.arange(len(y), device=y.device), y] -= 1.0
                g = g.to(dtype)
                grad_hidden[start : start + rows] = g @ w
                grad_weight += g.t() @ h
        if grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad, grad_weight * grad, None, None, None
