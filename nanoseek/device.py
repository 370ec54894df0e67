"""Pick the device and compute dtype by what the hardware does well, never by assumption."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """AMX tiles make bf16 matmuls several times faster than fp32; AVX-512 BF16 alone makes them slower."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def default_dtype(device: torch.device | str) -> torch.dtype:
    device = torch.device(device)
    if device.type == "cuda":
        # fp16 would need loss scaling; without bf16, stay in fp32.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
