"""Training checkpoints: model, optimizer, data position, RNG and step, written atomically.

Each checkpoint is a folder checkpoints/step_XXXXXX/ built under a temporary name, every file fsynced,
then renamed into place: a run killed at any moment leaves either the whole checkpoint or none.
state.json records a SHA-256 of every file, so a corrupt or truncated checkpoint is an error that says
which file, never a silently different run. The model and optimizer are stored in full, keyed by
parameter name, as safetensors (nothing is pickled), so any world size can resume them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nanoseek.atomic import atomic_dir
from nanoseek.checkpoint import CheckpointError

STATE = "state.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(root: Path) -> list[Path]:
    steps = [p for p in Path(root).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, torch.Tensor],
    extra: dict[str, Any],
    keep: int,
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    with atomic_dir(final) as tmp:  # a hidden name until whole: list_checkpoints never sees it
        save_file({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file({k: v.contiguous() for k, v in optim_state.items()}, tmp / "optimizer.safetensors")
        save_file({k: v.contiguous() for k, v in rng_state().items()}, tmp / "rng.safetensors")
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / STATE).write_text(json.dumps({"step": step, **extra, "sha256": files}, indent=2) + "\n")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Verify a checkpoint folder and read it: (model tensors, optimizer tensors, state.json); restores RNG."""
    path = Path(path)
    state_file = path / STATE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({state_file.name}: {e}); delete it to resume from an earlier one"
        ) from None
    for name, digest in state.get("sha256", {}).items():
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; delete it to resume from an earlier one")
        if _sha256(path / name) != digest:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} does not match its checksum; "
                "delete it to resume from an earlier one"
            )
    set_rng_state(load_file(path / "rng.safetensors"))
    return load_file(path / "model.safetensors"), load_file(path / "optimizer.safetensors"), state
