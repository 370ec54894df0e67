"""Model-parallel inference on torch.distributed: the routed experts, 97% of DeepSeek-V3's weights, split
over the ranks of a torchrun launch (gloo on CPU, NCCL on CUDA).

    torchrun --nproc-per-node 8 -m nanoseek serve --model /models/DeepSeek-V3 --weights fp8

Rank 0 runs the whole engine, unchanged: HTTP server, scheduler, sampler, paged latent cache, prefix cache,
MTP drafts, and the attention, dense layers, shared experts, embedding and head, plus its E / N experts.
At each MoE layer it broadcasts the layer's tokens and their routing; every rank runs the experts it holds
on the tokens that chose them, and the partial sums are reduced onto rank 0. Ranks > 0 hold only their
experts (everything else stays on the meta device, unread) and answer these calls until rank 0 stops.

Where this differs from DeepSeek's inference code (attention heads and dense layers tensor-parallel too):
the latent cache, which MLA keeps small (70 KB per token for V3), lives once, on rank 0, with the prefix
cache and the scheduler, so nothing about serving changes with N; rank 0 holds the ~4% that is not routed
experts (about 25 GB of V3 in FP8) beside its share of them. Decode steps run eagerly under N > 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanoseek.model.moe import RoutedExperts

STOP = -1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass(frozen=True, slots=True)
class Ranks:
    rank: int
    world: int
    device: torch.device


_ranks: Ranks | None = None
_attached = False


def from_env(device: torch.device | None = None) -> Ranks | None:
    """The torchrun launch this process is part of (WORLD_SIZE, RANK, LOCAL_RANK), joined; None alone."""
    global _ranks
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    if _ranks is not None:
        return _ranks
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _ranks = Ranks(dist.get_rank(), world, device)
    return _ranks


def share_dtype(ranks: Ranks, dtype: torch.dtype | None) -> torch.dtype:
    """Rank 0's compute dtype (its probe's choice), the same on every rank."""
    code = torch.tensor([DTYPES.index(dtype) if dtype is not None else 0], device=ranks.device)
    dist.broadcast(code, 0)
    return DTYPES[int(code)]


def expert_modules(model: torch.nn.Module) -> list[RoutedExperts]:
    return [m for m in model.modules() if isinstance(m, RoutedExperts)]


class RemoteExperts:
    """Rank 0's side of one MoE layer: its tokens and routing out to every rank, the partial sums back."""

    def __init__(self, ranks: Ranks, layer: int):
        self.ranks, self.layer = ranks, layer

    def __call__(self, experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
        send(self.ranks, self.layer, x, weights, indices)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        try:
            out = experts.local_sum(x, weights, indices)
        finally:  # the other ranks wait in this reduce: it is issued whatever happened here
            dist.reduce(out, dst=0)
        return out.to(x.dtype)


def send(ranks: Ranks, layer: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
    header = torch.tensor([layer, x.shape[0], indices.shape[1]], device=ranks.device)
    dist.broadcast(header, 0)
    for t in (x.contiguous(), weights.float().contiguous(), indices.contiguous()):
        dist.broadcast(t, 0)


def claim() -> None:
    """Rank 0's engine takes the launch: the other ranks serve one model's experts, so one engine."""
    global _attached
    if _attached:
        raise RuntimeError(
            "this torchrun launch already serves one model's experts: one model-parallel Engine per process"
        )
    _attached = True


def attach(model: torch.nn.Module, ranks: Ranks) -> None:
    """On rank 0: every MoE layer's experts call the other ranks."""
    for layer, experts in enumerate(expert_modules(model)):
        experts.remote = RemoteExperts(ranks, layer)


def stop(ranks: Ranks) -> None:
    """On rank 0: the other ranks leave their loops."""
    dist.broadcast(torch.tensor([STOP, 0, 0], device=ranks.device), 0)


def leave() -> None:
    """Close the process group this module opened (every process of a launch does, at its end)."""
    global _ranks
    if dist.is_initialized():
        dist.destroy_process_group()
    _ranks = None


@torch.no_grad()
def serve_experts(model: torch.nn.Module, ranks: Ranks, dtype: torch.dtype) -> int:
    """On ranks > 0: answer rank 0's MoE calls with this rank's experts until it stops; the calls served."""
    layers, hidden, served = expert_modules(model), model.cfg.hidden_size, 0
    while True:
        header = torch.empty(3, dtype=torch.long, device=ranks.device)
        dist.broadcast(header, 0)
        layer, n, k = header.tolist()
        if layer == STOP:
            return served
        x = torch.empty(n, hidden, dtype=dtype, device=ranks.device)
        weights = torch.empty(n, k, dtype=torch.float32, device=ranks.device)
        indices = torch.empty(n, k, dtype=torch.long, device=ranks.device)
        for t in (x, weights, indices):
            dist.broadcast(t, 0)
        dist.reduce(layers[layer].local_sum(x, weights, indices), dst=0)
        served += 1


def run_worker(model_dir: str, ranks: Ranks, weights: str = "auto") -> int:
    """A rank > 0 of `torchrun ... nanoseek generate|chat|serve`: load this rank's experts, serve them."""
    from nanoseek.checkpoint import from_pretrained

    dtype = share_dtype(ranks, None)
    model = from_pretrained(
        model_dir,
        dtype=dtype,
        device=ranks.device,
        weights=weights,
        expert_shard=(ranks.rank, ranks.world),
        experts_only=True,
    )
    serve_experts(model, ranks, dtype)
    leave()
    return 0


def run_as_expert_rank(model_dir: str, weights: str = "auto") -> int | None:
    """Under torchrun, a rank > 0 serves its share of the routed experts to rank 0 until rank 0 stops, and
    returns its exit code; rank 0 and a lone process get None and go on to run the engine."""
    ranks = from_env()
    return run_worker(model_dir, ranks, weights) if ranks and ranks.rank > 0 else None
