"""What the engine serves, made ready: a model folder loaded in its inference dtype (under torchrun, with this
rank's share of the routed experts), its weights packed for the CPU's decode kernels where that pays, and the
fingerprint that keys the prefix cache (what a cached latent depends on).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.device import inference_dtype
from nanoseek.model import Transformer
from nanoseek.serve import launch
from nanoseek.serve.packed import pack_model, packing_available, packing_pays

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def load_model(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype | None,
    weights: str,
    ranks: launch.Ranks | None = None,
) -> Transformer:
    """The model of a folder, in eval mode. `weights` bf16/fp32 make the weights' dtype the compute dtype;
    otherwise dtype (None: the measured best for the device; rank 0's under torchrun, where each rank holds
    everything but the routed experts, and E / N of those)."""
    from nanoseek.checkpoint import check_fits_in_memory, from_pretrained

    cfg = ModelConfig.from_json(model_dir)  # a wrongly typed setting is named here, before any work
    shard = (ranks.rank, ranks.world) if ranks is not None else None
    # Priced before the dtype probe, which multiplies a [4 hidden, hidden] matrix, at the fewest bytes the
    # weights can take (from_pretrained prices them again once the dtype is known).
    narrowest = dtype or WEIGHT_DTYPES.get(weights) or torch.bfloat16
    check_fits_in_memory(cfg, narrowest, device, fp8=weights in ("fp8", "auto"), expert_shard=shard)
    dtype = dtype or WEIGHT_DTYPES.get(weights) or inference_dtype(device, cfg.hidden_size)
    if ranks is not None:
        launch.claim()
        dtype = launch.share_dtype(ranks, dtype)
    return from_pretrained(model_dir, dtype=dtype, device=device, weights=weights, expert_shard=shard).eval()


def pack_for_decode(model: Transformer, device: torch.device, pack_weights: str) -> bool:
    """Pack the weights for oneDNN's decode kernels (serve/packed.py): on, off, or auto (where the model is
    larger than the CPU's cache, so that decode streams it). Returns whether they were packed. On a CPU the
    products go through kernels.linear either way, so that a captured step fuses those of a few rows."""
    wanted = packing_pays(model) if pack_weights == "auto" else pack_weights == "on"
    packed = wanted and packing_available(device)
    if device.type == "cpu":
        pack_model(model, packed)
    return packed


def fingerprint(model: Transformer, layout: str, model_dir: Path | None, every_byte: bool) -> bytes:
    """What a cached latent depends on: the config, the cache layout and the weights. For the disk tier
    (`every_byte`), every weight byte: of the files, hashed once and remembered beside them, or of the
    tensors of a model passed in memory; corrupt or retrained weights in the same folder never read the
    healthy model's files. In memory alone a strided sample of each tensor tells models apart."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.cfg.to_hf_dict(), sort_keys=True, default=str).encode())
    h.update(layout.encode())
    if every_byte and model_dir is not None:
        from nanoseek.checkpoint import weights_fingerprint

        h.update(weights_fingerprint(model_dir))
        return h.digest()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().flatten()
        if not every_byte:
            flat = flat[:: max(1, t.numel() // 256)][:256]
        h.update(name.encode() + repr(tuple(t.shape)).encode())
        h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.digest()
