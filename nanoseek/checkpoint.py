"""Hugging Face DeepSeek-V3 checkpoints in and out: config.json plus safetensors (one file or sharded).

The on-disk layout is DeepSeek's: one tensor per expert (`model.layers.N.mlp.experts.E.gate_proj.weight`),
MTP module k at layer index num_hidden_layers + k-1 with its own copies of the embedding and head (as
in DeepSeek-V3's layer 61). In memory the experts are stacked for grouped matmuls and the MTP modules
share the main embedding and head; `hf_tensor_map` is the single place that maps one onto the other.
safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import shutil
import time
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.atomic import atomic_file, atomic_write
from nanoseek.config import ModelConfig
from nanoseek.flags import flag
from nanoseek.fp8 import FP8, dequantize_blocks, quantize_blocks
from nanoseek.model import Transformer
from nanoseek.model.fp8_weights import cast_except_fp8, make_fp8_resident, resident_bytes
from nanoseek.model.int8_weights import quantize_int8

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30
SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3's FP8 checkpoints: `weight` in E4M3 plus `weight_scale_inv`
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the tensors and shapes at fault."""


def hf_tensor_map(model: Transformer) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every checkpoint key -> a view of the model tensor that holds it; plus the keys that loading accepts
    and skips: MTP copies of the embedding and head, the experts other ranks hold (model-parallel
    inference), and tensors left on the meta device (a rank that holds only experts)."""
    cfg = model.cfg
    tensors: dict[str, torch.Tensor] = {}
    skipped: set[str] = set()
    held = {}  # expert-module name -> (first, count) of the experts this model holds
    for name, module in model.named_modules():
        if hasattr(module, "first_expert"):
            held[name] = (module.first_expert, module.n_experts)
    for name, t in model.state_dict(keep_vars=True).items():
        module_name = name.rsplit(".", 1)[0]
        first = held.get(module_name, (0, 0))[0]
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                tensors[name] = t
            continue
        if name.startswith("mtp."):  # mtp.K.block.x / mtp.K.enorm.weight -> model.layers.{L+K}.x
            k, rest = name.removeprefix("mtp.").split(".", 1)
            name = f"layers.{cfg.num_hidden_layers + int(k)}.{rest.removeprefix('block.')}"
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name.removesuffix("gate_up_proj"), cfg.moe_intermediate_size
            for e in range(t.shape[0]):
                tensors[f"model.{prefix}{first + e}.gate_proj.weight"] = t[e, :inter]
                tensors[f"model.{prefix}{first + e}.up_proj.weight"] = t[e, inter:]
            others = [e for e in range(cfg.n_routed_experts) if not first <= e < first + t.shape[0]]
            for e, p in itertools.product(others, ("gate_proj", "up_proj", "down_proj")):
                skipped |= {f"model.{prefix}{e}.{p}.weight", f"model.{prefix}{e}.{p}.weight{SCALE_SUFFIX}"}
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                tensors[f"model.{prefix}{first + e}.down_proj.weight"] = t[e]
        elif name.endswith("mlp.experts.gate_up_proj_scale_inv"):  # FP8-resident experts' block scales
            prefix, half = name.removesuffix("gate_up_proj_scale_inv"), t.shape[1] // 2
            for e in range(t.shape[0]):
                tensors[f"model.{prefix}{first + e}.gate_proj.weight{SCALE_SUFFIX}"] = t[e, :half]
                tensors[f"model.{prefix}{first + e}.up_proj.weight{SCALE_SUFFIX}"] = t[e, half:]
        elif name.endswith("mlp.experts.down_proj_scale_inv"):
            prefix = name.removesuffix("down_proj_scale_inv")
            for e in range(t.shape[0]):
                tensors[f"model.{prefix}{first + e}.down_proj.weight{SCALE_SUFFIX}"] = t[e]
        else:
            tensors[f"model.{name}"] = t
    copies: set[str] = set()
    for k in range(cfg.num_nextn_predict_layers):
        layer = f"model.layers.{cfg.num_hidden_layers + k}"
        tensors[f"{layer}.embed_tokens.weight"] = model.embed_tokens.weight
        tensors[f"{layer}.shared_head.head.weight"] = model.lm_head.weight
        copies |= {f"{layer}.embed_tokens.weight", f"{layer}.shared_head.head.weight"}
    on_meta = {key for key, t in tensors.items() if t.is_meta}
    for key in on_meta:
        del tensors[key]
    copies |= skipped | on_meta | {key + SCALE_SUFFIX for key in on_meta}
    return tensors, copies


# --- saving ---------------------------------------------------------------------------------------
def is_fp8_weight(key: str, t: torch.Tensor) -> bool:
    """The projections DeepSeek-V3 ships in FP8: attention (kv_a_proj_with_mqa included) and MLP/expert
    matrices (not gate, embeddings, head, norms, or the MTP modules' eh_proj)."""
    projection = key.endswith(("_proj.weight", ".kv_a_proj_with_mqa.weight"))
    return t.ndim == 2 and projection and (".self_attn." in key or ".mlp." in key)


def save_pretrained(
    model: Transformer, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, fp8: bool = False
) -> None:
    """Write config.json and safetensors that nanoseek and transformers' DeepseekV3ForCausalLM load.

    fp8=True writes DeepSeek-V3's FP8 format: projection weights in E4M3 with a `weight_scale_inv` per
    128x128 block, everything else in bf16 (about half the bytes of a bf16 checkpoint)."""
    if model.cfg.scoring_func != "sigmoid":
        warnings.warn(
            "transformers' DeepseekV3 always scores experts with a sigmoid: this softmax-gated model "
            "loads in nanoseek but will not match there",
            stacklevel=2,
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, _ = hf_tensor_map(model)
    if fp8:
        tensors = _to_fp8_layout(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    for stale in [*out.glob("model-*-of-*.safetensors"), out / SAFE_SINGLE, out / SAFE_INDEX]:
        stale.unlink(missing_ok=True)
    names = (
        [SAFE_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for fname, keys in zip(names, shards, strict=True):
        # clone: the expert views share storage, which safetensors refuses to write.
        shard = {k: tensors[k].detach().to("cpu", copy=True).contiguous() for k in keys}
        with atomic_file(out / fname) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, fname))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(out / SAFE_INDEX, json.dumps(index, indent=2) + "\n")
    if fp8:
        model.cfg.save_json(out / "config.json", dtype="bfloat16", quantization_config=FP8_QUANTIZATION_CONFIG)
    else:
        model.cfg.save_json(out / "config.json", dtype=str(model.embed_tokens.weight.dtype).removeprefix("torch."))


def _to_fp8_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        if is_fp8_weight(key, t):
            out[key], out[key + SCALE_SUFFIX] = quantize_blocks(t.detach())
        elif t.is_floating_point() and not key.endswith("e_score_correction_bias"):  # the bias stays fp32
            out[key] = t.detach().to(torch.bfloat16)
        else:
            out[key] = t
    return out


# --- loading --------------------------------------------------------------------------------------
def weight_files(model_dir: Path) -> list[Path]:
    if (model_dir / SAFE_INDEX).is_file():
        weight_map = json.loads((model_dir / SAFE_INDEX).read_text())["weight_map"]
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path.name} is listed in {SAFE_INDEX} but missing from {model_dir}")
        return files
    if (model_dir / SAFE_SINGLE).is_file():
        return [model_dir / SAFE_SINGLE]
    pickled = [p.name for p in model_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    hint = f" (found {', '.join(pickled)}: nanoseek never unpickles; re-save it as safetensors)" if pickled else ""
    raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {model_dir}{hint}")


def _safetensors_error(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable safetensors file ({e}): it is truncated or corrupt; copy or convert it again"
    )


_STORED = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F8_E4M3": FP8,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_checkpoint(model_dir: Path, skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from every safetensors file, one tensor in memory at a time. Each is read with one
    read into its own buffer, not through a memory map: a mapped file's touched pages count as the
    process's memory until the file closes, which would hold a whole shard beside the model it fills.
    Tensors named in `skip` are not read at all (another rank's experts)."""
    for path in weight_files(model_dir):
        try:
            checkpoint_keys(path.parent, [path])  # the header, checked by safetensors itself
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
                for key, meta in header.items():
                    if key == "__metadata__" or key in skip:
                        continue
                    t = torch.empty(meta["shape"], dtype=_STORED[meta["dtype"]])
                    start, end = meta["data_offsets"]
                    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else bytearray()
                    f.seek(8 + size + start)
                    if end - start != len(raw) or f.readinto(raw) != len(raw):
                        raise SafetensorError(f"{key} ends past the end of the file")
                    yield key, t
        except (SafetensorError, KeyError, ValueError) as e:
            raise _safetensors_error(path, e) from None


def checkpoint_keys(model_dir: Path, files: list[Path] | None = None) -> dict[str, str]:
    """Every tensor name and its stored dtype (safetensors' name, e.g. "BF16"), read from the headers only."""
    keys = {}
    for path in files if files is not None else weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    keys[key] = f.get_slice(key).get_dtype()
        except SafetensorError as e:
            raise _safetensors_error(path, e) from None
    return keys


FINGERPRINT_FILE = ".nanoseek-fingerprint.json"
# The coarsest file-timestamp tick in use (FAT's 2 s; ext4, xfs and tmpfs tick every few ms): a file changed
# twice within one tick keeps its ctime.
RACY_NS = 2 * 10**9


def _stamp(file: Path) -> list[int]:
    """What any write to a file changes: size, mtime and inode can be kept or put back (os.utime), but
    ctime moves on at every write and at every utime, and no user call sets it."""
    st = file.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _hash_files(files: list[Path]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as stream:
            while chunk := stream.read(2**23):
                h.update(chunk)
    return h.digest()


def weights_fingerprint(model_dir: str | Path) -> bytes:
    """A 16-byte hash of config.json and every byte of the weight files: corrupt or retrained weights never
    share a prefix cache with the healthy model. Hashed once, then remembered beside the files with each
    file's _stamp (a read-only folder is hashed again at each load). Bytes flipped in place with the mtime
    put back still move ctime; a file whose ctime lies within RACY_NS of when the hash was remembered may
    have changed again within that tick, so it is hashed again (git's rule for "racily clean" files)."""
    path = Path(model_dir)
    files = [path / "config.json", *weight_files(path)]
    stamp = {f.name: _stamp(f) for f in files}
    remembered = path / FINGERPRINT_FILE
    try:
        saved = json.loads(remembered.read_text())
        settled = max(ctime for *_, ctime in stamp.values()) < saved["written_ns"] - RACY_NS
        if saved["files"] == stamp and settled:
            return bytes.fromhex(saved["blake2b"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    written_ns = time.time_ns()  # taken before hashing: a write during the hash is after it, so never trusted
    digest = _hash_files(files)
    record = {"files": stamp, "written_ns": written_ns, "blake2b": digest.hex()}
    with contextlib.suppress(OSError):  # a read-only folder: hashed again next time
        atomic_write(remembered, json.dumps(record) + "\n", fsync=False)  # a torn file is only hashed again
    return digest


def available_memory(device: torch.device) -> int | None:
    """Bytes free on the device (CUDA), or the memory the OS can give (CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_weight_bytes(
    cfg: ModelConfig,
    dtype: torch.dtype,
    fp8: bool = False,
    expert_shard: tuple[int, int] | None = None,
    experts_only: bool = False,
) -> int:
    """The weights' bytes from the config's arithmetic alone, a little under the exact count (norms, block
    scales and RoPE tables left out), with no layer built or even looped over: a typo'd num_hidden_layers
    of 10**12 is priced at once. fp8: projections at one byte per parameter (FP8-resident); expert_shard
    (rank, world): E / world routed experts per MoE layer; experts_only: those experts alone."""
    from nanoseek.cost import attention_params, expert_params

    h, wide = cfg.hidden_size, dtype.itemsize
    narrow = 1 if fp8 else wide
    blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers  # MTP modules are MoE blocks too
    moe = blocks - cfg.first_k_dense_replace if cfg.n_routed_experts else 0
    experts = cfg.n_routed_experts // (expert_shard[1] if expert_shard else 1)
    routed = moe * experts * expert_params(cfg) * narrow
    if experts_only:
        return routed
    projections = blocks * attention_params(cfg) + (blocks - moe) * 3 * h * cfg.intermediate_size
    projections += moe * cfg.n_shared_experts * expert_params(cfg)
    head = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)  # embedding and output head
    kept = head + moe * cfg.n_routed_experts * h + cfg.num_nextn_predict_layers * 2 * h * h  # routers, eh_proj
    return routed + projections * narrow + kept * wide


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**70 else f"{n / 2**30:.2e} GiB"


def check_fits_in_memory(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    need: int | None = None,
    *,
    fp8: bool = False,
    expert_shard: tuple[int, int] | None = None,
    experts_only: bool = False,
) -> None:
    """Refuse, before allocating, a config whose weights cannot fit (a typo'd hidden_size of 1e9 asks 16 TB).
    need: the weights' bytes when known (a model on the meta device), else estimate_weight_bytes."""
    if need is None:
        need = estimate_weight_bytes(cfg, dtype, fp8, expert_shard, experts_only)
    have = available_memory(device)
    if have is not None and need > have:
        kept = f"{dtype} with FP8 projections" if fp8 else str(dtype)
        raise CheckpointError(
            f"this config's weights need about {_gib(need)} in {kept} and {device} has {_gib(have)} "
            f"available: check config.json (hidden_size {cfg.hidden_size:,}, {cfg.num_hidden_layers:,} layers, "
            f"{cfg.n_routed_experts:,} experts); if those are right, keep the weights in FP8 (--weights fp8, "
            "about 1 byte per parameter), split the experts over GPUs (torchrun), or use a machine with more memory"
        )


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def dequantize_fp8(
    tensors: Iterator[tuple[str, torch.Tensor]], problems: list[str], resident: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pair each E4M3 `weight` with its `weight_scale_inv` (in any order, in any shard) and yield it
    dequantized; everything else passes through. Weights the model keeps in FP8 (`resident`) pass as they
    are with their scales, or, from a higher-precision checkpoint, are quantised here, block by block."""
    waiting: dict[str, torch.Tensor] = {}
    for key, t in tensors:
        if key.removesuffix(SCALE_SUFFIX) in resident:
            if t.dtype != FP8 and not key.endswith(SCALE_SUFFIX):
                q, scale = quantize_blocks(t)
                yield key, q
                yield key + SCALE_SUFFIX, scale
            else:
                yield key, t
            continue
        if not (t.dtype == FP8 or key.endswith(SCALE_SUFFIX)):
            yield key, t
            continue
        base = key.removesuffix(SCALE_SUFFIX)
        waiting[key] = t
        weight, scale = waiting.get(base), waiting.get(base + SCALE_SUFFIX)
        if weight is None or scale is None:
            continue
        del waiting[base], waiting[base + SCALE_SUFFIX]
        blocks = tuple(-(-n // 128) for n in weight.shape)
        if tuple(scale.shape) != blocks:
            problems.append(
                f"{base + SCALE_SUFFIX}: checkpoint shape {tuple(scale.shape)} but {base} "
                f"{tuple(weight.shape)} needs {blocks} (one scale per 128x128 block)"
            )
            continue
        yield base, dequantize_blocks(weight, scale.float())
    for key in sorted(waiting):
        partner = key + SCALE_SUFFIX if waiting[key].dtype == FP8 else key.removesuffix(SCALE_SUFFIX)
        problems.append(f"missing tensor {partner} (the partner of {key})")


_STORED_NAME = {dtype: name for name, dtype in _STORED.items()}


def _counted(n: int, what: str) -> str:
    return f"{n} {what} value{'s' if n != 1 else ''}"


def tensor_problem(key: str, t: torch.Tensor) -> str | None:
    """What is wrong with a checkpoint tensor as stored, whatever model it fills (None: nothing): values that
    are not finite, or a dtype the format has no place for. One pass over a healthy tensor."""
    if t.dtype == FP8:
        if key.endswith(SCALE_SUFFIX):
            return f"stored as F8_E4M3, but a block scale ({SCALE_SUFFIX}) is F32"
        nan = int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())  # E4M3FN has NaN and no infinity
        return _counted(nan, "NaN") if nan else None
    if not t.is_floating_point():
        return (
            f"stored as {_STORED_NAME.get(t.dtype, t.dtype)} ({t.dtype}), but weights are floating point "
            f"(F32, BF16, F16, or F8_E4M3 with a {SCALE_SUFFIX})"
        )
    if bool(torch.isfinite(t).all()):
        return None
    nan = int(t.isnan().sum())
    inf = int(t.isinf().sum())
    return " and ".join(_counted(n, what) for n, what in ((nan, "NaN"), (inf, "infinite")) if n)


def _screened(tensors: Iterator[tuple[str, torch.Tensor]], corrupt: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors as they are read, each checked once (tensor_problem) before the copy into the model would
    take it silently: a NaN weight turns every answer into an error, an int32 one into nonsense. Integers
    are not passed on (quantising them would fail unnamed)."""
    for key, t in tensors:
        if problem := tensor_problem(key, t):
            corrupt.append(f"{key}: {problem}")
        if t.is_floating_point():
            yield key, t


def _listed(problems: list[str]) -> str:
    return "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")


@torch.no_grad()
def load_weights(model: Transformer, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model, dequantizing FP8 ones; every problem is reported by name."""
    targets, copies = hf_tensor_map(model)
    resident = frozenset(k for k, t in targets.items() if t.dtype == FP8)
    seen: set[str] = set()
    problems: list[str] = []
    corrupt: list[str] = []
    for key, t in dequantize_fp8(_screened(tensors, corrupt), problems, resident):
        if key in copies:
            seen.add(key)
            continue
        if key not in targets:
            problems.append(f"unexpected tensor {key} {tuple(t.shape)}")
            continue
        target = targets[key]
        if t.shape != target.shape:
            problems.append(f"{key}: checkpoint shape {tuple(t.shape)} but the model expects {tuple(target.shape)}")
            continue
        target.copy_(t)
        seen.add(key)
    if corrupt:  # before the fit: a refused tensor would be reported missing as well
        raise CheckpointError(
            f"the checkpoint is corrupt ({len(corrupt)} tensors):\n  {_listed(corrupt)}\n"
            "copy it again from its source, or convert it again (nanoseek convert) from a healthy checkpoint"
        )
    problems += [f"missing tensor {k} {tuple(targets[k].shape)}" for k in sorted(set(targets) - seen - copies)]
    if problems:
        raise CheckpointError(f"checkpoint does not fit the config ({len(problems)} problems):\n  {_listed(problems)}")


WEIGHTS = ("auto", "fp8", "int8", "bf16", "fp32")


def from_pretrained(
    model_dir: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    weights: str | None = None,
    expert_shard: tuple[int, int] | None = None,
    experts_only: bool = False,
) -> Transformer:
    """Load a Hugging Face DeepSeek-V3 model folder, reading each tensor straight from the safetensors
    files into its place (no second copy of the model on the way). dtype: the compute dtype (None: the
    checkpoint's). weights: "fp8" keeps the projections in E4M3 with their 128x128 block scales (quantising
    a higher-precision checkpoint), "int8" quantises them and the head to int8 with a scale per row once loaded
    (model/int8_weights.py: CPU decode), "bf16" / "fp32" dequantise them, "auto" keeps an FP8 checkpoint FP8;
    None (training, conversion) dequantises to dtype. expert_shard (rank, world): hold only this rank's
    contiguous E / world routed experts (model-parallel inference); experts_only: nothing else either (the
    other tensors stay on the meta device, unread)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: pass a Hugging Face model folder (config.json + safetensors)")
    cfg = ModelConfig.from_json(path)
    keys = checkpoint_keys(path)
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    if cfg.num_nextn_predict_layers and not any(k.startswith(mtp_prefix) for k in keys):
        # transformers drops DeepSeek's MTP layer when it saves; the main model is still complete.
        warnings.warn(f"{path} has no MTP weights ({mtp_prefix}*): loading without MTP modules", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if weights in ("bf16", "fp32"):
        dtype = dtype or {"bf16": torch.bfloat16, "fp32": torch.float32}[weights]
    if dtype is None:  # the checkpoint's own (bf16 for DeepSeek's FP8 checkpoints)
        stored = [_SAFETENSORS_DTYPES[d] for d in keys.values() if d in _SAFETENSORS_DTYPES]
        dtype = max(set(stored), key=stored.count) if stored else torch.float32
    resident = weights == "fp8" or (weights == "auto" and any(d == "F8_E4M3" for d in keys.values()))
    # Priced from the config before anything is built: a meta-device model of a typo'd 10**6 layers alone
    # fills the memory, and check_fits_in_memory below only sees the model once it is built.
    target = torch.device(device or "cpu")
    check_fits_in_memory(cfg, dtype, target, fp8=resident, expert_shard=expert_shard, experts_only=experts_only)
    with torch.device("meta"):  # no memory and no random init for weights that are overwritten anyway
        model = Transformer(cfg)
    if expert_shard is not None:
        rank, world = expert_shard
        if cfg.n_routed_experts % world:
            raise ValueError(f"{world} ranks must divide the {cfg.n_routed_experts} routed experts")
        count = cfg.n_routed_experts // world
        for module in model.modules():
            if hasattr(module, "keep_experts"):
                module.keep_experts(rank * count, count)
    if resident:
        make_fp8_resident(model)
    cast_except_fp8(model, dtype)
    held = [m for m in model.modules() if hasattr(m, "keep_experts")] if experts_only else [model]
    check_fits_in_memory(cfg, dtype, target, need=sum(resident_bytes(m) for m in held))
    for module in held:
        module.to_empty(device=device or "cpu")
    model.tie_weights()
    load_weights(model, read_checkpoint(path, skip=hf_tensor_map(model)[1]))
    model.rotary_emb.reset_parameters()  # a non-persistent buffer: recomputed, not loaded
    if weights == "int8":
        quantize_int8(model)
    return model.eval()


# --- the command: `nanoseek convert` ------------------------------------------------------------------------
@dataclass(slots=True)
class ConvertConfig:
    """Convert a DeepSeek-V3 model folder to DeepSeek's FP8 format (E4M3 weights with a weight_scale_inv per
    128x128 block) or back to bf16."""

    model: str = flag("the model folder to read", metavar="DIR")
    to: str = flag("the format to write", choices=["fp8", "bf16"])
    out: str = flag("the model folder to write", metavar="DIR")


def convert(cfg: ConvertConfig) -> int:
    model = from_pretrained(cfg.model, dtype=torch.float32)  # dequantizes an FP8 source
    if cfg.to == "bf16":
        model = model.to(torch.bfloat16)
    save_pretrained(model, cfg.out, fp8=cfg.to == "fp8")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(cfg.model) / name).is_file():
            shutil.copy(Path(cfg.model) / name, Path(cfg.out) / name)
    size = sum(p.stat().st_size for p in Path(cfg.out).glob("*.safetensors"))
    print(f"{cfg.model} -> {cfg.out} ({cfg.to}, {size / 2**20:.1f} MiB of weights)")
    return 0
