"""Code that runs inside spawned ranks for tests/test_parallel.py (importable, so spawn can pickle it)."""

import os

import torch
import torch.distributed as dist

from nanoseek import get_preset
from nanoseek.model.expert_parallel import ExpertGroup
from nanoseek.model.moe import MoE

MOE_CFG = get_preset("tiny").replace(n_routed_experts=8, num_experts_per_tok=3)


def moe_inputs() -> tuple[MoE, torch.Tensor, torch.Tensor]:
    """One MoE layer (biased gate) and a batch of 4 sequences, identical in every process."""
    torch.manual_seed(0)
    moe = MoE(MOE_CFG)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.e_score_correction_bias.normal_(std=0.2)
    x = torch.randn(4, 16, MOE_CFG.hidden_size)
    probe = torch.randn(4, 16, MOE_CFG.hidden_size)  # loss = sum(y * probe): gradients add over ranks
    return moe, x, probe


def ep_moe_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    moe, x, probe = moe_inputs()
    moe.experts.shard(ExpertGroup(dist.group.WORLD, rank, world))
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)  # this rank's sequences
    x = x[rows].clone().requires_grad_(True)
    y = moe(x)
    (y * probe[rows]).sum().backward()
    grads = {n: p.grad for n, p in moe.named_parameters()}
    torch.save({"y": y.detach(), "x_grad": x.grad, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()
