"""The output head and its cross-entropy in one pass, chunk by chunk: the [tokens, vocab] logits never
exist whole, in fp32 or otherwise.

    loss_sum = linear_cross_entropy(hidden, lm_head.weight, targets)  # hidden [N, H], targets [N] -> []

Each chunk's logits give its loss and, at once, their own gradient (softmax - one-hot), which two
matmuls turn into the gradients of the hidden states and of the head; backward only scales them. This
skips the log-softmax's backward pass and its [N, V] buffers, the idea of Liger-Kernel's fused linear
cross-entropy. The sum, not the mean: the trainer divides by the step's trained tokens.
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import IGNORE

CPU_CHUNK_BYTES = 4 << 20  # fp32 logits per chunk on a CPU: its caches hold them (measured best here)


@torch.compiler.disable  # data-dependent shapes (the kept rows, the chunk loop): eager under torch.compile
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against targets (IGNORE rows train nothing).

    hidden [N, H], weight [V, H], targets [N]; the matmuls run in `dtype` (default: hidden's; the model
    passes autocast's), the softmax and the sum in fp32. `rows` per chunk, by default 4 MB of logits on
    a CPU and, on a GPU, logits as big as the hidden states (Liger's rule: V/H chunks)."""
    keep = (targets != IGNORE).nonzero().squeeze(1)
    if len(keep) < len(targets):  # masked rows (an SFT prompt) cost nothing
        hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
    if len(targets) == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # a step with nothing to learn still gets (zero) gradients
    vocab, width = weight.shape
    if rows is None:
        chunks = math.ceil(vocab / width)
        rows = max(16, CPU_CHUNK_BYTES // (4 * vocab)) if hidden.device.type == "cpu" else -(-len(targets) // chunks)
    track = torch.is_grad_enabled()  # under no_grad (evaluation) only the loss: one matmul, not three
    grads = (track and hidden.requires_grad, track and weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype or hidden.dtype, rows, grads)


class _LinearCrossEntropy(torch.autograd.Function):
    """forward: the summed loss, and (for the inputs in `grads`) the gradients, saved for backward to scale."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, rows, grads):
        want_hidden, want_weight = grads
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), rows):
            h, y = hidden[start : start + rows].to(dtype), targets[start : start + rows]
            logits = (h @ w.t()).float()  # [n, V]
            picked = logits.gather(1, y[:, None])
            top = logits.amax(-1, keepdim=True)
            e = logits.sub_(top).exp_()  # in place: one [n, V] buffer per chunk
            z = e.sum(-1, keepdim=True)
            total += (top + z.log() - picked).sum()  # logsumexp - the target's logit
            if want_hidden or want_weight:
                g = e.div_(z)  # softmax
                g[torch.arange(len(y), device=y.device), y] -= 1.0
                g = g.to(dtype)
                if want_hidden:
                    grad_hidden[start : start + rows] = g @ w
                if want_weight and g.dtype == grad_weight.dtype:
                    grad_weight.addmm_(g.t(), h)  # accumulates in place
                elif want_weight:
                    grad_weight += g.t() @ h  # bf16 products, summed over chunks in fp32
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        scaled = [None if g is None else g * grad for g in (grad_hidden, grad_weight)]
        return *scaled, None, None, None, None
