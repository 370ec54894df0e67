"""Pick the device and compute dtype by what the hardware does well, never by assumption.

`NANOSEEK_AUTO_DTYPE=float32|bfloat16` overrides the `auto` choice, so that a machine without AMX can
run the suite (and anything else) as a machine with AMX would, and the other way round.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

AUTO_DTYPE_ENV = "NANOSEEK_AUTO_DTYPE"
AUTO_DTYPE_CHOICES = ("float32", "bfloat16")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """AMX tiles make bf16 matmuls several times faster than fp32; AVX-512 BF16 alone makes them slower."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def forced_auto_dtype() -> torch.dtype | None:
    """The dtype `NANOSEEK_AUTO_DTYPE` forces on every `auto` choice, or None where it is unset."""
    name = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if not name:
        return None
    if name not in AUTO_DTYPE_CHOICES:
        raise ValueError(f"{AUTO_DTYPE_ENV}={name!r}: use one of {', '.join(AUTO_DTYPE_CHOICES)} or leave it unset")
    return getattr(torch, name)


def default_dtype(device: torch.device | str) -> torch.dtype:
    forced = forced_auto_dtype()
    if forced is not None:
        return forced
    device = torch.device(device)
    if device.type == "cuda":
        # fp16 would need loss scaling; without bf16, stay in fp32.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


def inference_dtype(device: torch.device | str, hidden_size: int) -> torch.dtype:
    """The `auto` dtype for decoding, which is matrix-vector work: bf16 on a GPU; on a CPU with AMX, bf16 only
    where it measures faster than fp32 at this model's width (AMX pays off on big matrices; a tiny model
    decodes slower in bf16), by a probe of a few milliseconds; fp32 on other CPUs."""
    forced = forced_auto_dtype()
    device = torch.device(device)
    if forced is not None or device.type != "cpu" or not cpu_has_fast_bf16():
        return forced or default_dtype(device)
    return (
        torch.bfloat16
        if _probe_seconds(torch.bfloat16, hidden_size) < _probe_seconds(torch.float32, hidden_size)
        else torch.float32
    )


def _probe_seconds(dtype: torch.dtype, hidden: int, rows: int = 4, repeats: int = 20) -> float:
    """The best time of a decode-shaped matmul (a few rows through a [4 hidden, hidden] weight)."""
    x, w = torch.randn(rows, hidden, dtype=dtype), torch.randn(4 * hidden, hidden, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best


def other_cpu_dtype() -> str:
    """The `auto` dtype of the other kind of CPU (bfloat16 where this one has no AMX): CI runs the
    dtype-sensitive tests again with it forced, so one machine covers both kinds."""
    return "float32" if cpu_has_fast_bf16() else "bfloat16"


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def cpu_features() -> str:
    """One line for logs, benchmarks and CI: the CPU, whether it has AMX, and the `auto` dtype it gets."""
    forced = os.environ.get(AUTO_DTYPE_ENV) or "unset"
    chosen = str(default_dtype("cpu")).removeprefix("torch.")
    amx = "yes" if cpu_has_fast_bf16() else "no"
    return f"{cpu_name()}, {os.cpu_count()} cores, AMX {amx}, {AUTO_DTYPE_ENV} {forced}: auto dtype on CPU is {chosen}"


def read_bandwidth(n_bytes: int = 512 * 2**20, rounds: int = 5) -> float:
    """Bytes/s that `sum` reads from a buffer far larger than the caches (the best of `rounds`): the memory
    roofline a decode step, which reads every weight it uses once, is measured against."""
    buffer = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs), or 32 MiB where it cannot be read."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()  # "32768K"
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=32 * 2**20)
