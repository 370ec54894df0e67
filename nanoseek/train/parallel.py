"""Data parallelism (FSDP2) plus expert parallelism, on torch.distributed; pipeline stages around them.

    torchrun --nproc-per-node 2 -m nanoseek train --preset tiny --ep 2 --out runs/ep2
    torchrun --nproc-per-node 4 -m nanoseek train --preset tiny --pp 2 --ep 2 --out runs/pp2ep2

The world of N processes is a dp x ep mesh: rank = dp_index * ep + ep_index, so an EP group is ep
consecutive ranks (one node's GPUs, where all_to_all is fastest). Dense weights are sharded over all N
ranks with FSDP2 (`fully_shard` per decoder block, then the root). Routed experts are split over the EP
group instead (rank i of the group keeps experts [i E/ep, (i+1) E/ep)) and replicated over the dp_index:
their gradients are all-reduced over that dimension by hand. Every rank reads batch_size / N rows of
each global batch, so 1 or N processes see the same data per step, and gradients are averaged over all
N ranks, so the same global batch gives the same update.

With pipeline parallelism (--pp P, train/pipeline.py) the mesh is pp x dp x ep, pp outermost: each of
the P stage positions holds N / P ranks, the stage's replicas, which shard and average exactly as above
(FSDP over the replicas, EP groups inside them), and the ranks of one replica pass activations down
its pipeline. With pp = 1 this is the dp x ep mesh above, rank for rank.

Backends: gloo on CPU, NCCL on CUDA, picked from the device. Checkpoints are written in full (every
tensor gathered, every expert in place) so a run saved with N ranks resumes with any other number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.model.expert_parallel import ExpertGroup
from nanoseek.model.moe import RoutedExperts

EXPERT_SUFFIXES = ("experts.gate_up_proj", "experts.down_proj")


@dataclass(slots=True)
class Parallel:
    """Where this process stands; the defaults describe a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ep: int = 1
    pp: int = 1
    fsdp_mesh: object = None  # 1-D, what FSDP shards over: every rank, or (pp > 1) this stage's replicas
    mesh: object = None  # ("dp", "ep"), or ("pp", "dp", "ep") with pipeline stages
    pp_group: object = None  # this replica's pipeline: one rank per stage position
    expert_group: ExpertGroup | None = field(default=None)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def replicas(self) -> int:
        """Data-parallel copies of each stage (dp x ep): all ranks without pipeline stages."""
        return self.world // self.pp

    @property
    def replica_rank(self) -> int:
        """This rank's place among its stage's replicas: which rows of the global batch it reads."""
        return self.rank % self.replicas

    @property
    def pp_rank(self) -> int:
        return self.rank // self.replicas

    @property
    def dp(self) -> int:
        return self.replicas // self.ep


def init(ep: int, device_type: str, pp: int = 1) -> Parallel:
    """Join the process group that torchrun describes (WORLD_SIZE, RANK, ...); a single process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if ep != 1 or pp != 1:
            flags = f"--ep {ep}" if pp == 1 else f"--pp {pp} x --ep {ep}" if ep > 1 else f"--pp {pp}"
            raise ValueError(f"{flags} needs {ep * pp} or a multiple of {ep * pp} processes: launch with torchrun")
        return Parallel()
    if world % (ep * pp):
        flags = f"--ep {ep}" if pp == 1 else f"--pp {pp} x --ep {ep}"
        raise ValueError(f"{flags} must divide the number of processes ({world})")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    par = Parallel(rank=dist.get_rank(), world=world, local_rank=local_rank, ep=ep, pp=pp)
    if pp == 1:
        par.fsdp_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("world",))
        par.mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    else:  # pp outermost: rank = pp_rank * replicas + dp_index * ep + ep_index
        par.mesh = init_device_mesh(device_type, (pp, par.dp, ep), mesh_dim_names=("pp", "dp", "ep"))
        stages = init_device_mesh(device_type, (pp, par.replicas), mesh_dim_names=("pp", "replica"))
        par.fsdp_mesh, par.pp_group = stages["replica"], stages["pp"].get_group()
    if ep > 1:
        par.expert_group = ExpertGroup(par.mesh["ep"].get_group(), par.rank % ep, ep)
    return par


def is_expert(name: str) -> bool:
    return name.endswith(EXPERT_SUFFIXES)


def apply(
    model: nn.Module,
    par: Parallel,
    param_dtype: torch.dtype | None = None,
    blocks: list[nn.Module] | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard the routed experts over the EP group, then everything else with FSDP2 over the replicas: each
    block (default: a Transformer's decoder layers and MTP modules; a pipeline stage names its own), then
    the root. reshard_after_forward=False keeps a block's gathered weights until its backward (a pipeline
    stage runs many micro-batches per step: one all-gather per step, not one per micro-batch)."""
    if par.replicas == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    experts = set()
    if par.expert_group is not None:
        for module in model.modules():
            if isinstance(module, RoutedExperts):
                module.shard(par.expert_group)
                experts |= {module.gate_up_proj, module.down_proj}
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs = {"mesh": par.fsdp_mesh, "mp_policy": policy, "reshard_after_forward": reshard_after_forward}
    if experts:
        kwargs["ignored_params"] = experts  # placed by expert parallelism, synced in sync_expert_grads
    for block in [*model.layers, *model.mtp] if blocks is None else blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if is_expert(name)]


@torch.no_grad()
def sync_expert_grads(model: nn.Module, par: Parallel) -> None:
    """Expert-parallel gradients: each rank's experts received every EP peer's tokens, so their gradient
    sums those ranks' losses; add the dp replicas' and divide by the replicas (N without pipeline stages) to
    match FSDP's average."""
    if par.expert_group is None:
        return
    for p in expert_params(model):
        if p.grad is None:
            continue
        if par.dp > 1:
            dist.all_reduce(p.grad, group=par.mesh["dp"].get_group())
        p.grad.div_(par.replicas)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, par: Parallel) -> float:
    """Global-norm clipping over sharded (FSDP), expert-parallel and plain gradients alike: every element
    is held by exactly one rank (dp replicas of experts counted once), so one all_reduce of squares."""
    squares = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = _local(p.grad)
        grads.append(g)
        replicas = par.dp if is_expert(name) and par.expert_group is not None else 1
        squares += g.float().pow(2).sum() / replicas
    if par.distributed:
        dist.all_reduce(squares)
    norm = squares.sqrt().item()
    scale = min(1.0, max_norm / (norm + 1e-6))
    if scale < 1.0:
        torch._foreach_mul_(grads, scale)
    return norm


def shutdown(par: Parallel) -> None:
    if par.distributed and dist.is_initialized():
        dist.destroy_process_group()


def fit(trainer: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Run a trainer (train/sft/distill or GRPO) to its end, then leave the process group it opened under
    torchrun: every command that opens one closes it. Returns (trainer, its history); only its first
    process (trainer.par.is_main) should print."""
    try:
        return trainer, trainer.fit()
    finally:
        shutdown(trainer.par)


def barrier(par: Parallel) -> None:
    if par.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, par: Parallel) -> torch.Tensor:
    if par.distributed:
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, par: Parallel) -> bool:
    """Whether the flag is set on any rank (collective): for a choice that every rank must make alike."""
    if not par.distributed:
        return flag
    t = torch.tensor(float(flag), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def replica_sum(t: torch.Tensor, par: Parallel) -> torch.Tensor:
    """Sum over the ranks that read different rows of the batch: every rank, or with pipeline stages the
    stage's replicas (the ranks of one pipeline read the same rows)."""
    if par.pp == 1:
        return all_reduce_sum(t, par)
    if par.replicas > 1:
        dist.all_reduce(t, group=par.fsdp_mesh.get_group())
    return t


# --- full state, whatever the world size ---------------------------------------------------------
def _gather(t: torch.Tensor, expert: bool, par: Parallel) -> torch.Tensor:
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    if expert and par.expert_group is not None:
        parts = [torch.empty_like(t) for _ in range(par.ep)]
        dist.all_gather(parts, t.contiguous(), group=par.expert_group.group)
        t = torch.cat(parts)
    return t.detach().cpu()


def _shard_like(full: torch.Tensor, like: torch.Tensor, expert: bool, par: Parallel) -> torch.Tensor:
    """The piece of a full tensor that this rank holds where `like` lives (a DTensor for FSDP shards)."""
    if expert and par.expert_group is not None:
        full = full.chunk(par.ep)[par.expert_group.rank]
    full = full.to(device=_local(like).device, dtype=like.dtype)
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, like.device_mesh, like.placements)
    return full


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, par: Parallel):
    """(model tensors, optimizer tensors) as one process would hold them; collective on every rank."""
    model_state: dict[str, torch.Tensor] = {}
    optim_state: dict[str, torch.Tensor] = {}
    for module in model.modules():  # FSDP2 leaves the root unsharded after a step; the optimizer holds shards
        if hasattr(module, "reshard"):
            module.reshard()
    for name, p in model.named_parameters():
        model_state[name] = _gather(p, is_expert(name), par)
        for key, value in optimizer.state.get(p, {}).items():
            if key == "step":
                optim_state[f"{name}.{key}"] = _local(value).detach().cpu().reshape(())
            else:
                optim_state[f"{name}.{key}"] = _gather(value, is_expert(name), par)
    for name, b in model.named_buffers():
        if not name.endswith("inv_freq"):  # the non-persistent RoPE table
            model_state[name] = b.detach().cpu()
    return model_state, optim_state


@torch.no_grad()
def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict, par: Parallel
) -> None:
    params = dict(model.named_parameters())
    buffers = {n: b for n, b in model.named_buffers() if not n.endswith("inv_freq")}
    expected = set(params) | set(buffers)
    missing, unexpected = expected - set(model_state), set(model_state) - expected
    if missing or unexpected:
        from nanoseek.checkpoint import CheckpointError

        raise CheckpointError(
            f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for name, p in params.items():
        if model_state[name].shape != _full_shape(p, name, par):
            from nanoseek.checkpoint import CheckpointError

            raise CheckpointError(
                f"{name}: checkpoint shape {tuple(model_state[name].shape)} but the model "
                f"expects {tuple(_full_shape(p, name, par))}"
            )
        _local(p).copy_(_local(_shard_like(model_state[name], p, is_expert(name), par)))
        state = {}  # every per-parameter optimizer tensor saved for it (exp_avg, exp_avg_sq, ...)
        for key, value in optim_state.items():
            owner, _, field = key.rpartition(".")
            if owner != name:
                continue
            state[field] = value.clone().float() if field == "step" else _shard_like(value, p, is_expert(name), par)
        if state:
            optimizer.state[p] = state
    for name, b in buffers.items():
        b.copy_(model_state[name])


def _full_shape(p: torch.Tensor, name: str, par: Parallel) -> torch.Size:
    shape = p.shape  # a DTensor reports its global shape
    if is_expert(name) and par.expert_group is not None:
        shape = torch.Size([shape[0] * par.ep, *shape[1:]])
    return shape
