"""`linear(x, weight)`: `F.linear`, or the product on a copy of `weight` that a CPU kernel laid out for itself
and registered (`register_packed`; nanoseek.serve.packed does, for oneDNN's prepacked weights); inside a
captured CPU step, a product of a few rows is one multiply-and-sum that Inductor fuses with its neighbours.

The model stays the model: the layout is chosen from outside, and the weight itself stays where the checkpoint
put it. As a custom op it is opaque to torch.compile, so a captured decode step calls it as it is (Dynamo cannot
trace oneDNN's opaque tensors). Inference only: it has no backward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Rows up to which a captured CPU product is one fused multiply-and-sum (kernels.linear, Int8Linear): it reads
# the weight at ~31 GB/s where oneDNN's packed matvec reads ~25 and MKL's `F.linear` ~10 (16,384 x 512 fp32),
# and it saves a library call per product. Measured in whole decode steps: `small` 2 rows 6.0 against 8.7 ms,
# 8 rows 22.0 against 24.4; a `tiny` speculative step (2 rows) 0.67 against 1.00 ms. benchmarks/bench_captured.py
# measures whole decodes both ways.
FUSED_ROWS = 8

# weight.data_ptr() -> (weight's shape, the product x @ weight.T on its packed copy); see register_packed
_packed: dict[int, tuple[torch.Size, Callable[[torch.Tensor], torch.Tensor]]] = {}


def register_packed(weight: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor], owner: torch.Tensor) -> None:
    """From now on `linear(x, weight)` is `product(x)`, until `owner` (the tensor whose storage `weight` is,
    or a view of) is freed. The packed copy is read-only: the weight must not change after this."""
    key = weight.data_ptr()
    _packed[key] = (weight.shape, product)
    weakref.finalize(owner, _packed.pop, key, None)


def packed_product(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The registered product for this weight (the same memory and shape), if any."""
    shape, product = _packed.get(weight.data_ptr(), (None, None))
    return product if shape == weight.shape else None


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    product = packed_product(weight)
    return product(x) if product is not None else F.linear(x, weight)


# Declared with torch.library's schema API, as kv_cache.write_slots: `custom_op`'s wrappers cost 3x the call.
_LIB = torch.library.Library("nanoseek", "FRAGMENT")
_LIB.define("linear(Tensor x, Tensor weight) -> Tensor")
_LIB.impl("linear", _linear, "CompositeExplicitAutograd")
torch.library.register_fake(
    "nanoseek::linear", lambda x, weight: x.new_empty((*x.shape[:-1], weight.shape[0])), lib=_LIB
)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight.T -> [..., out], on weight's packed copy where one is registered."""
    if torch.compiler.is_compiling():
        if x.device.type == "cpu" and x.numel() <= FUSED_ROWS * x.shape[-1]:  # a decode step's few rows
            return (x.unsqueeze(-2) * weight).sum(-1)
        return torch.ops.nanoseek.linear(x, weight)  # opaque to the compiler
    return _linear(x, weight)  # eagerly the op's dispatch would only cost time
