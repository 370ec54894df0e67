"""FP8 mixed-precision training with DeepSeek-V3's fine-grained scaling (V3 paper Sec. 3.3).

Every GEMM input is E4M3. Activations (and activation gradients) are scaled per 1x128 tile: each token,
each 128 channels of the contraction dimension; weights per 128x128 block. Scales come from the online
max-abs of the tile (no delayed scaling) and values are clamped to +-448 before the cast, because torch's
float8 cast does not saturate on every backend and version (on CUDA it gives NaN). Dimensions that are
not multiples of 128 are zero-padded.

The three GEMMs of a linear layer (Fig. 6): Fprop y = x W^T, Dgrad dx = dy W, Wgrad dW = dy^T x, all on
FP8 operands with FP32 accumulation across 128-element K blocks. For Wgrad the contraction runs over
tokens, so x (saved in FP8 with its 1x128 scales) and dy are re-quantized in 128x1 tiles (Sec. 3.3.3).
Master weights, optimizer state, embedding, output head, MoE gate, norms and attention stay in higher
precision.

Backends behind one numerics contract: on CUDA with compute capability >= 8.9, each 128-wide K block is
one torch._scaled_mm of FP8 operands whose FP32 result is scaled and accumulated in FP32 (DeepSeek's
"promotion to CUDA cores"); elsewhere a faithful emulation dequantizes the same FP8 values per tile and
block and multiplies in FP32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
TILE = 128
_TINY = 1e-12


def _ceil(n: int, d: int = TILE) -> int:
    return -(-n // d)


def _pad_to(x: torch.Tensor, dim: int, multiple: int = TILE) -> torch.Tensor:
    extra = _ceil(x.shape[dim], multiple) * multiple - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, extra]
    return F.pad(x, pad)


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (E4M3 [..., K_pad], fp32 scales [..., K_pad / 128]) with one scale per 1x128 tile."""
    x = _pad_to(x.float(), -1)
    tiles = x.unflatten(-1, (-1, TILE))  # [..., K_pad / 128, 128]
    scale = tiles.abs().amax(dim=-1, keepdim=True).clamp(min=_TINY) / FP8_MAX
    return _to_fp8(tiles, scale).flatten(-2), scale.squeeze(-1)


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, k: int | None = None) -> torch.Tensor:
    x = (q.float().unflatten(-1, (-1, TILE)) * scale.unsqueeze(-1)).flatten(-2)
    return x if k is None else x[..., :k]


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (E4M3 [..., N, K], fp32 scales [..., ceil(N/128), ceil(K/128)]), one per 128x128 block.

    The scales are DeepSeek-V3's `weight_scale_inv`: the factor that takes the FP8 values back."""
    n, k = w.shape[-2:]
    padded = _pad_to(_pad_to(w.float(), -1), -2)
    blocks = padded.unflatten(-1, (-1, TILE)).unflatten(-3, (-1, TILE))  # [..., N/128, 128, K/128, 128]
    scale = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=_TINY) / FP8_MAX
    q = _to_fp8(blocks, scale).flatten(-2).flatten(-3, -2)[..., :n, :k]
    return q, scale.squeeze(-1).squeeze(-2)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape[-2:]
    full = scale.repeat_interleave(TILE, dim=-2).repeat_interleave(TILE, dim=-1)[..., :n, :k]
    return q.float() * full


def block_scales_per_row(scale: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N/128, K/128] block scales -> [..., N, K/128]: the scale of each row's K block."""
    return scale.repeat_interleave(TILE, dim=-2)[..., :n, :]


# --- the GEMM ---------------------------------------------------------------------------------------
def _use_scaled_mm(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """a [M, K_pad] x b [N, K_pad]^T in FP32, both E4M3 with one scale per row per 128-wide K block
    (a_scale [M, K_pad/128], b_scale [N, K_pad/128]). Returns [M, N] float32."""
    if _use_scaled_mm(a.device):
        return _scaled_mm_blockwise(a, a_scale, b, b_scale)
    a_full = a.float() * a_scale.repeat_interleave(TILE, dim=-1)
    b_full = b.float() * b_scale.repeat_interleave(TILE, dim=-1)
    return a_full @ b_full.T


def _scaled_mm_blockwise(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor):
    # One FP8 tensor-core GEMM per K block, its FP32 result scaled per row and column and accumulated in
    # FP32: DeepSeek-V3's recipe for limited FP8 accumulation precision (Sec. 3.3.2).
    m = a.shape[0]
    a = _pad_to(a.view(torch.uint8), 0, 16).view(FP8)  # _scaled_mm wants M a multiple of 16
    one = torch.ones((), device=a.device)
    out = torch.zeros(a.shape[0], b.shape[0], device=a.device, dtype=torch.float32)
    for i in range(a.shape[1] // TILE):
        block = slice(i * TILE, (i + 1) * TILE)
        partial = torch._scaled_mm(a[:, block], b[:, block].t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        out[:m] += partial[:m] * a_scale[:, i : i + 1] * b_scale[:, i].unsqueeze(0)
    return out[:m]


# --- autograd ---------------------------------------------------------------------------------------
class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        n, k = weight.shape
        rows = x.reshape(-1, k)
        xq, xs = quantize_tiles(rows)  # Fprop: activations 1x128
        wq, ws = quantize_blocks(weight)  # weights 128x128
        wq, ws = _pad_to(wq.view(torch.uint8), -1).view(FP8), block_scales_per_row(ws, n)
        y = fp8_gemm(xq, xs, wq, ws)
        ctx.save_for_backward(xq, xs, weight)  # the activation is kept in FP8: half of BF16's bytes
        ctx.x_meta = (x.shape, x.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xq, xs, weight = ctx.saved_tensors
        shape, dtype = ctx.x_meta
        n, k = weight.shape
        g = grad.reshape(-1, n)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # Dgrad: dx = dy W, contraction over N
            gq, gs = quantize_tiles(g)
            wq, ws = quantize_blocks(weight.T)  # the same 128x128 blocks, transposed
            wq, ws = _pad_to(wq.view(torch.uint8), -1).view(FP8), block_scales_per_row(ws, k)
            grad_x = fp8_gemm(gq, gs, wq, ws).to(dtype).view(shape)
        if ctx.needs_input_grad[1]:  # Wgrad: dW = dy^T x, contraction over tokens: 128x1 tiles
            x = dequantize_tiles(xq, xs, k)
            gq, gs = quantize_tiles(g.T)  # [N, M_pad]
            xq_t, xs_t = quantize_tiles(x.T)  # [K, M_pad]
            grad_w = fp8_gemm(gq, gs, xq_t, xs_t).to(weight.dtype)
        return grad_x, grad_w


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _Fp8LinearFn.apply(x, weight)


class Fp8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run on FP8 operands; same parameters and state dict as nn.Linear."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias  # shared: optimizer state and checkpoints unchanged
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight)
        return y if self.bias is None else y + self.bias


def fake_quantize_tiles(x: torch.Tensor) -> torch.Tensor:
    """x as its FP8 1x128-tile quantization reads back, in float32."""
    return dequantize_tiles(*quantize_tiles(x), x.shape[-1])


def fake_quantize_blocks(w: torch.Tensor) -> torch.Tensor:
    return dequantize_blocks(*quantize_blocks(w))


def fake_quantize_group_tiles(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """x [M, C], rows sorted into consecutive groups of `sizes`, as FP8 reads it back with 128x1 tiles along
    the rows that never cross a group: the grouped Wgrad's quantisation of each expert's tokens, done for
    every expert at once (each group is zero-padded to a whole tile, as a per-group call would pad it)."""
    counts = torch.tensor(sizes, device=x.device)
    padded = (counts + TILE - 1) // TILE * TILE
    group = torch.repeat_interleave(torch.arange(len(sizes), device=x.device), counts, output_size=x.shape[0])
    slot = torch.arange(x.shape[0], device=x.device) + (padded.cumsum(0) - padded - counts.cumsum(0) + counts)[group]
    tiles = x.new_zeros(int(padded.sum()), x.shape[1]).index_copy_(0, slot, x)
    return fake_quantize_tiles(tiles.t()).t().index_select(0, slot)  # [M, C], fp32


def convert_to_fp8(model: nn.Module) -> nn.Module:
    """Run every attention/MLP/expert projection in FP8, in place; embedding, head, gate and norms stay.

    Parameters are shared, not copied: optimizer state and checkpoints are unchanged."""
    for module in list(model.modules()):
        if isinstance(getattr(module, "fp8", None), bool):  # the MoE's grouped experts
            module.fp8 = True
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                setattr(module, name, Fp8Linear.from_linear(child))
    return model
