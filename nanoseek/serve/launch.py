"""The processes of a torchrun launch that serves one model (serve/parallel.py): joining it, with a data plane
(the default group: each MoE layer's exchange, timing out after --dist-timeout) and a control plane (a gloo
group with a timeout of days: requests, outputs, heartbeat, shutdown); rank 0's dtype for every rank; where
each routed expert lives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nanoseek.model.moe import RoutedExperts

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CONTROL_TIMEOUT = timedelta(days=7)  # an idle server's workers wait this long for rank 0's next round


@dataclass(frozen=True, slots=True)
class Ranks:
    rank: int
    world: int
    device: torch.device
    control: dist.ProcessGroup | None = None  # gloo, long timeout: requests, outputs, heartbeat, shutdown


class LaunchLost(RuntimeError):
    """A rank of the launch is gone (or a collective timed out): this server can no longer generate."""


_ranks: Ranks | None = None
_attached = False


def from_env(device: torch.device | None = None, timeout_s: float = 600.0) -> Ranks | None:
    """The torchrun launch this process is part of (WORLD_SIZE, RANK, LOCAL_RANK), joined; None alone.
    timeout_s bounds each collective of the data plane (--dist-timeout)."""
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
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _ranks = Ranks(dist.get_rank(), world, device, control)
    return _ranks


def share_dtype(ranks: Ranks, dtype: torch.dtype | None) -> torch.dtype:
    """Rank 0's compute dtype (its probe's choice), the same on every rank."""
    code = torch.tensor([DTYPES.index(dtype) if dtype is not None else 0])
    dist.broadcast(code, 0, group=ranks.control)
    return DTYPES[int(code)]


def expert_modules(model: torch.nn.Module) -> list[RoutedExperts]:
    return [m for m in model.modules() if isinstance(m, RoutedExperts)]


def claim() -> None:
    """One data-parallel engine per process: its exchange is the launch's."""
    global _attached
    if _attached:
        raise RuntimeError("this torchrun launch already serves one model: one model-parallel Engine per process")
    _attached = True


def leave() -> None:
    """Close the process groups this module opened (every process of a launch does, at its end)."""
    global _ranks, _attached
    if dist.is_initialized():
        dist.destroy_process_group()
    _ranks, _attached = None, False
