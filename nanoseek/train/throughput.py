"""Metrics that compare across runs: validation bits per byte (a loss in nats per token depends on the
tokenizer; per byte of text it does not) and achieved FLOP/s with MFU, model FLOPs utilisation.

FLOPs per trained token come from nanoseek.cost (3x the forward pass: MLA attention at the sequence
length, the activated MoE weights, the head, the MTP modules). The peak is the device's dense bf16
figure from cost.GPUS for a known GPU, `--peak-flops` when given, and otherwise a one-second matmul probe
in the training dtype (on a CPU: what its vector units actually reach, a fairer bar than a datasheet).
"""

from __future__ import annotations

import functools
import json
import math
import time

import torch

from nanoseek.config import ModelConfig
from nanoseek.cost import GPUS, flops_per_token
from nanoseek.tokenizer import Tokenizer


def token_bytes(tokenizer: Tokenizer) -> torch.Tensor:
    """Bytes of text each token id stands for [vocab] (special tokens: 0). Byte-level BPE spells each byte
    as one character of its alphabet, so a token's length is its byte count; other tokenizers decode."""
    tok = tokenizer.tok
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    byte_level = "ByteLevel" in json.dumps(json.loads(tok.to_str()).get("decoder"))
    sizes = []
    for i in range(tokenizer.vocab_size):
        piece = tok.id_to_token(i)
        if piece is None or piece in special:
            sizes.append(0)
        else:
            sizes.append(len(piece) if byte_level else len(tok.decode([i]).encode()))
    return torch.tensor(sizes, dtype=torch.float64)


def bits_per_byte(loss_sum_nats: float, n_bytes: float) -> float:
    return loss_sum_nats / math.log(2) / max(n_bytes, 1.0)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, mtp: bool) -> float:
    return flops_per_token(cfg, seq_len, training=True, mtp=mtp).total


def peak_flops(
    device: torch.device, dtype: torch.dtype, given: float | None = None, fp8: bool = False
) -> tuple[float, str]:
    """The device's peak FLOP/s and where the figure comes from (probed once per process and kind). fp8: the
    peak of FP8 GEMMs, which an FP8 run's MFU is against (on a GPU with FP8 tensor cores, twice bf16's;
    elsewhere FP8 is emulated in `dtype`, so that dtype's peak)."""
    if given:
        return given, "--peak-flops"
    if fp8 and device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, gpu in GPUS.items():
            if key in name and gpu.fp8_flops:
                return gpu.fp8_flops, f"{gpu.name} datasheet, dense fp8"
    return _device_peak(device, dtype)


@functools.cache
def _device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, gpu in GPUS.items():
            if key in name:
                return gpu.bf16_flops, f"{gpu.name} datasheet, dense bf16"
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    best = 0.0
    for _ in range(5):  # the best of five 0.2 s windows: a shared machine's slow moments are not its peak
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.2:
            a @ b
            runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * runs / (time.perf_counter() - start))
    return best, f"measured {dtype} matmul on {device.type} (best of five 0.2 s windows)"
