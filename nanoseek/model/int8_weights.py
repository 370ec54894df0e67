"""Weight-only int8 for CPU decode (`--weights int8`): every projection, the routed experts and the output head
kept as int8 with one fp32 scale per output row (symmetric, absmax / 127: torchao's int8 weight-only scheme;
llama.cpp's q8_0 keeps a scale per 32 weights), activations and arithmetic in the compute dtype.

Why: a decode step streams every weight it touches once, so its speed is bytes over bandwidth. In a captured
step of a few rows the product is a multiply-and-sum whose int8 -> float conversion Inductor fuses into the
reduction, so each weight is read as its one byte (16,384 x 512 alone, this 2-core AMD EPYC: 0.38 ms against
1.13 ms fp32 and 0.72 ms bf16). FP8 is no substitute on such a CPU: E4M3 has no vector conversion there, and
the same fused product runs at 3.6 ms. Past a few rows the fused product recomputes the conversion per row,
and one dequantised matrix at a time through the compute dtype's GEMM is faster (prefill, large batches).

Numerics: a weight moves by at most half its row's scale (round to nearest); the model computes with exactly
the dequantised values, so its logits equal those of the plain model holding them, up to the order of sums.
Quantised once at load from any checkpoint (a format for memory, never written to disk); the embeddings, the
router and the norms stay in the compute dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.kernels import FUSED_ROWS


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] float -> (int8 of the same shape, fp32 scale [..., out]): w ~= q * scale[..., None]."""
    w = weight.detach().float()
    scale = w.abs().amax(-1) / 127
    q = torch.where(scale[..., None] > 0, w / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None], 0)
    return q.round().clamp(-127, 127).to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[..., None]


def fused_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (q * scale).T as one multiply-and-sum per output row, which Inductor fuses with the int8
    conversion (inside a captured step; eagerly it would materialise [..., out, in])."""
    return ((x.unsqueeze(-2).float() * q.float()).sum(-1) * scale).to(x.dtype)


@functools.cache
def compiled_fused_product():
    """fused_product compiled once for any row count (an eager product of a few rows would first write the
    whole dequantised matrix: the `small` head's 33 MB a token)."""
    return torch.compile(fused_product, dynamic=True)


class Int8Linear(nn.Module):
    """A bias-free inference nn.Linear whose weight is int8 with an fp32 scale per output row (state dict keys
    `weight`, `weight_scale`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Int8, 16,384 x 512: 2 rows 0.6 ms and 8 rows 2.7 ms fused, against 7.3 and 4.8 ms for fp32 `F.linear`;
        # 32 rows 9.1 ms against 8.1 ms.
        if x.numel() <= FUSED_ROWS * self.in_features and not torch.is_grad_enabled():
            if torch.compiler.is_compiling():  # inside a captured step: fused with the step's other kernels
                return fused_product(x, self.weight, self.weight_scale)
            if x.device.type == "cpu":  # eagerly (the output head, an eager engine): the same kernel, compiled alone
                return compiled_fused_product()(x, self.weight, self.weight_scale)
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (a scale per row)"


def quantizable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.bias is None


@torch.no_grad()
def quantize_int8(model: nn.Module) -> int:
    """Every bias-free nn.Linear (projections, shared experts, MTP's eh_proj, the output head) becomes an
    Int8Linear and the routed experts int8 with per-row scales, in place; returns how many matrices changed.
    The router (a Gate, not an nn.Linear) and the embeddings stay as they are."""
    count = 0
    for module in list(model.modules()):
        if hasattr(module, "make_int8_resident"):  # the MoE's stacked experts
            count += module.make_int8_resident()
        for name, child in list(module.named_children()):
            if quantizable(child):
                setattr(module, name, Int8Linear(child))
                count += 1
    return count
