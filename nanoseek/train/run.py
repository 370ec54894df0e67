"""One run folder's lifecycle, the same for pretraining / SFT (train/trainer.py) and GRPO (rl/grpo.py):

    OUT/{NAME}_config.json   the settings, written atomically at every start
    OUT/checkpoints/step_N/  resumable state (train/state.py: atomic, checksummed)
    OUT/metrics.jsonl        one line per step; a resumed run keeps the lines up to its checkpoint
    OUT/model/               the latest weights as a Hugging Face folder with the tokenizer, swapped in whole

A fresh run refuses a folder that already holds checkpoints; a resumed one refuses settings that would
change the data stream its checkpoint stands in (the saved position would then mean something else).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import torch

from nanoseek.atomic import atomic_dir, atomic_write
from nanoseek.checkpoint import CheckpointError, save_pretrained
from nanoseek.train import state


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run folder's metrics.jsonl, one dict per step (a line cut short by a killed run is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: pass a folder written by `nanoseek train`")
    return read_jsonl(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One dict per line (a line cut short by a killed run is skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
    return rows


class RunFolder:
    def __init__(self, out: str | Path, name: str, config: dict[str, Any], must_match: tuple[str, ...]):
        self.out, self.name, self.config, self.must_match = Path(out), name, config, must_match
        self.checkpoints = self.out / "checkpoints"

    def start(self, resume: bool, write: bool = True) -> tuple[dict, dict, dict] | None:
        """Open the folder; with resume, the last checkpoint (model state, optimizer state, extras). write:
        this process writes the run's files (under torchrun, the first alone)."""
        self.out.mkdir(parents=True, exist_ok=True)
        found = state.list_checkpoints(self.checkpoints)
        saved = None
        if resume:
            if not found:
                raise CheckpointError(f"--resume: no checkpoint in {self.checkpoints}; drop --resume to start afresh")
            saved = state.load_checkpoint(found[-1])
            before = saved[2].get(f"{self.name}_config", {})
            changed = [k for k in self.must_match if k in before and before[k] != self.config.get(k)]
            if changed:
                diffs = ", ".join(f"--{k.replace('_', '-')} {before[k]} (now {self.config.get(k)})" for k in changed)
                raise CheckpointError(f"{found[-1]} was trained with {diffs}: resume with the same settings")
        elif found:
            raise CheckpointError(f"{self.out} already holds checkpoints: pass --resume, or pick a new --out")
        if write:
            atomic_write(self.out / f"{self.name}_config.json", json.dumps(self.config, indent=2) + "\n")
        return saved

    def open_metrics(self, step: int, resume: bool) -> IO[str]:
        return self.open_log("metrics.jsonl", step, resume)

    def open_log(self, name: str, step: int, resume: bool) -> IO[str]:
        """A JSONL log of rows with a "step" (metrics.jsonl, GRPO's rollouts.jsonl) for appending: a resumed
        run keeps the rows up to its checkpoint's step, a fresh one none (rewritten atomically: a run killed
        here loses no line)."""
        path = self.out / name
        kept = [m for m in read_jsonl(path) if m["step"] <= step] if resume and path.is_file() else []
        atomic_write(path, "".join(json.dumps(m) + "\n" for m in kept))
        return open(path, "a")

    def save(
        self, step: int, model_state: dict[str, torch.Tensor], optim_state: dict, extra: dict[str, Any], keep: int
    ) -> None:
        """A checkpoint of the run, its settings recorded for the resume check."""
        extra = {**extra, f"{self.name}_config": self.config}
        state.save_checkpoint(self.checkpoints, step, model_state, optim_state, extra, keep)

    def export(self, model, tokenizer) -> None:
        """The model folder (weights, config, tokenizer) built beside and swapped in whole."""
        with atomic_dir(self.out / "model") as tmp:
            save_pretrained(model, str(tmp))
            tokenizer.save(tmp)
