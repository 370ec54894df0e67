"""Expert parallelism: the routed experts sharded over an EP group of processes (V3 paper Sec. 3.2).

Each rank of an EP group of size P holds E / P consecutive experts. A MoE layer sorts its (token, slot)
pairs by expert, which also groups them by the rank that owns the expert; the counts are exchanged first
(all_to_all on a [P, E / P] matrix), then the rows travel with all_to_all on uneven splits, run through
the local experts as one grouped GEMM, and travel back the same way. Both exchanges are autograd
functions whose backward is the reverse exchange, so gradients flow to every rank's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class ExpertGroup:
    group: dist.ProcessGroup
    rank: int
    size: int


class _AllToAll(torch.autograd.Function):
    """Rows of x, in_splits[i] of them for rank i, -> the rows every rank sent here (out_splits[i] from i)."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def dispatch(
    rows: torch.Tensor, counts: torch.Tensor, ep: ExpertGroup
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Send rows (sorted by global expert; counts [E]) to the ranks owning their experts.

    Returns the rows this rank's experts must process, sorted by local expert, their counts
    [E / P], and `combine`, which takes those rows' outputs back to where they came from."""
    local_experts = counts.shape[0] // ep.size
    send = counts.view(ep.size, local_experts)  # [destination rank, its local expert]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=ep.group)  # [source rank, local expert]
    send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
    arrived = _AllToAll.apply(rows, recv_splits, send_splits, ep.group)  # ordered by (source, expert)
    expert_of_row = torch.repeat_interleave(
        torch.arange(local_experts, device=rows.device).repeat(ep.size), recv.flatten(), output_size=arrived.shape[0]
    )
    by_expert = expert_of_row.argsort(stable=True)

    def combine(out: torch.Tensor) -> torch.Tensor:
        return _AllToAll.apply(out.index_select(0, by_expert.argsort()), send_splits, recv_splits, ep.group)

    return arrived.index_select(0, by_expert), recv.sum(0), combine
