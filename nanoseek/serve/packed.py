"""Weights packed once for the CPU's decode kernels: oneDNN's linear on a weight in its own blocked layout.

A decode step multiplies a few rows by every weight matrix once, so it runs at the speed the weights stream
from memory. `F.linear` hands a [out, in] matrix to MKL's GEMM, which at 1-32 rows reads it at about a third
of the bandwidth a plain `sum` reaches on the same CPU; oneDNN's linear on a weight reordered once into its
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the prepacking Inductor's freezing does) reads it
1.5-4x faster, fp32 and bf16 alike (`python benchmarks/bench_decode.py` measures both in one run).

Applied from outside the model, to an engine's own model on a CPU: every dense projection (attention, MLPs,
shared experts, the head) becomes a `DecodeLinear`, and each routed expert's gate_up and down matrices get
packed copies; all are registered with nanoseek.model.kernels, whose `linear` op they and the experts' loop
call. The op is opaque to torch.compile, so a captured decode step reads the packed copies too (Dynamo cannot
trace oneDNN's opaque tensors themselves), past the few rows that kernels.linear fuses into the step. A model
too small to pack still gets `DecodeLinear`s without packed copies, for that fusion. The dense weights stay
where they were (the checkpoint's keys, MLA's absorbed kv_b_proj and fingerprints read them): the packed
copies cost one more copy of the weights in memory.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from nanoseek.device import last_level_cache_bytes
from nanoseek.model import kernels
from nanoseek.model.kernels import register_packed
from nanoseek.model.moe import RoutedExperts

PACKABLE = (torch.float32, torch.bfloat16)


def packing_available(device: torch.device) -> bool:
    return (
        device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def packing_pays(model: nn.Module) -> bool:
    """Packed weights stream faster from memory (a `small` decode step 1.13-1.28x), but a model that fits in
    the CPU's cache is bound by per-call overhead, and oneDNN's is larger (`tiny`: 0.70x): pack a model whose
    weights exceed the last-level cache (benchmarks/bench_decode.py measures both presets)."""
    return sum(p.nbytes for p in model.parameters()) > last_level_cache_bytes()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] fp32 or bf16 weight in oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # 1: the batch it is tuned for, decode's


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ packed.T (+ bias) -> [..., out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class DecodeLinear(nn.Module):
    """An inference nn.Linear whose product is kernels.linear: a few rows fused into a captured step, otherwise
    the product on a packed copy of its weight (with `packed`) or `F.linear`. The weight stays a parameter
    under the same name, so the state dict and everything that reads the weight are unchanged."""

    def __init__(self, linear: nn.Linear, packed: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias, self.packed = linear.weight, linear.bias, packed
        if packed:
            register_packed(self.weight, partial(packed_linear, packed=pack(self.weight)), owner=self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.linear(x, self.weight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}{', oneDNN-packed' * self.packed}"


@torch.no_grad()
def pack_model(model: nn.Module, packed: bool = True) -> int:
    """Every dense nn.Linear of an fp32 or bf16 inference model becomes a DecodeLinear, in place; with `packed`,
    it and every routed expert are packed too. Returns how many matrices were packed. The weights must not
    change afterwards (the packed copies, and a captured step's view of the model, would not)."""
    count = 0
    for module in list(model.modules()):
        if packed and isinstance(module, RoutedExperts) and module.gate_up_proj.dtype in PACKABLE:
            for stacked in (module.gate_up_proj, module.down_proj):
                for weight in stacked:  # each expert's matrix, a view of the stacked parameter
                    register_packed(weight, partial(packed_linear, packed=pack(weight)), owner=stacked)
                    count += 1
            module.packed = True
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in PACKABLE:
                setattr(module, name, DecodeLinear(child, packed))
                count += packed
    return count
