"""FP8-resident weights for inference, as DeepSeek's own inference code keeps them: every attention and MLP
projection (and each routed expert) stays float8_e4m3fn with one fp32 scale per 128x128 block, DeepSeek-V3's
`weight_scale_inv`, so weights cost about one byte per parameter at rest (V3: 683 GB, not 1.34 TB).

A projection runs W8A8 on CUDA with compute capability >= 8.9: activations quantised per 1x128 tile, one
FP8 GEMM per 128-wide K block, accumulated in fp32 (nanoseek.fp8.fp8_gemm, DeepSeek's recipe). Elsewhere
its blocks are dequantised at use, one layer at a time, and the product runs in the compute dtype; in a
captured batch-1 decode step the dequantisation sits inside the product's reduction, which Inductor fuses,
so each weight is read as its one byte and never materialised.

Numerics against the model whose weights are the dequantised FP8 values: the dequantising path computes
with exactly those weights, so its logits are equal up to the order of fp32 sums (the routed experts run
one by one, dequantised as chosen; tested within 1e-5). W8A8 adds the activations' rounding: each
E4M3 value is within 2^-4 of the tile's element (3 mantissa bits, round to nearest), so a projection's
output moves by at most 2^-4 * sum_k |w_k| |x_k| per element.

Embeddings, the output head, the router and the norms stay in the compute dtype, as in DeepSeek's files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.fp8 import FP8, _pad_to, _use_scaled_mm, block_scales_per_row, dequantize_blocks, fp8_gemm, quantize_tiles

TILE = 128


def _blocks(n: int) -> int:
    return -(-n // TILE)


class Fp8Weight(nn.Module):
    """A bias-free nn.Linear whose weight is E4M3 with 128x128 block scales (state dict keys `weight` and
    `weight_scale_inv`, DeepSeek-V3's names)."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        scale = torch.empty(_blocks(out_features), _blocks(in_features), dtype=torch.float32, device=device)
        self.register_buffer("weight_scale_inv", scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_blocks(self.weight, self.weight_scale_inv).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.weight.shape
        if _use_scaled_mm(x.device):  # W8A8 on FP8 tensor cores
            xq, xs = quantize_tiles(x.reshape(-1, k))
            wq = _pad_to(self.weight.view(torch.uint8), -1).view(FP8)
            y = fp8_gemm(xq, xs, wq, block_scales_per_row(self.weight_scale_inv, n))
            return y.to(x.dtype).view(*x.shape[:-1], n)
        if torch.compiler.is_compiling() and x.numel() == k:  # one row, captured: dequantised inside the
            # reduction that Inductor fuses, so each weight is read as its one byte and never materialised
            w = dequantize_blocks(self.weight, self.weight_scale_inv)  # [n, k] fp32, fused into the sum
            return (x.reshape(1, k).float() * w).sum(-1).to(x.dtype).view(*x.shape[:-1], n)
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 (128x128 blocks)"


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A projection's weight matrix in `dtype`, whether it is kept quantised (FP8, int8) or not (MLA's absorbed
    kv_b_proj)."""
    return linear.dequantized(dtype) if hasattr(linear, "dequantized") else linear.weight.to(dtype)


def is_fp8_projection(name: str, module: nn.Module) -> bool:
    """The projections DeepSeek-V3 ships in FP8: attention (kv_a_proj_with_mqa included) and MLP matrices; not
    the MTP modules' eh_proj, the output head or the router (checkpoint.is_fp8_weight names the same by key)."""
    projection = name.endswith(("_proj", "kv_a_proj_with_mqa")) and name != "eh_proj"
    return type(module) is nn.Linear and projection and module.bias is None


def make_fp8_resident(model: nn.Module) -> nn.Module:
    """Swap every FP8 projection for an Fp8Weight and the routed experts to E4M3 with block scales, in place,
    on the model's device (call it on the meta device before loading: nothing is allocated twice)."""
    for module in list(model.modules()):
        if hasattr(module, "make_fp8_resident"):  # the MoE's stacked experts
            module.make_fp8_resident()
        for name, child in list(module.named_children()):
            if is_fp8_projection(name, child):
                setattr(module, name, Fp8Weight(child.in_features, child.out_features, device=child.weight.device))
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (the non-persistent RoPE tables too): what the weights hold."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied tensors once
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def cast_except_fp8(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype), except that E4M3 weights and their fp32 block scales stay as they are (Module.to
    would turn both into `dtype`)."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if not t.is_floating_point() or t.dtype in (FP8, dtype) else t.to(dtype)

    for module in model.modules():
        for name, t in list(module._parameters.items()):
            if t is not None and cast(t) is not t:
                module._parameters[name] = nn.Parameter(t.to(dtype), requires_grad=t.requires_grad)
        for name, t in list(module._buffers.items()):
            if t is not None and not name.endswith("scale_inv"):
                module._buffers[name] = cast(t)
    return model
