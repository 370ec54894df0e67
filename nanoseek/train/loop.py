"""The one training loop: `fit(job, run)` for pretraining / SFT / distillation (train/trainer.py) and GRPO
(rl/grpo.py). It owns what every run does the same way: open or resume the run folder, the progress bar,
metrics.jsonl (and TensorBoard), the evaluation and save cadence. A job owns what its steps are.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Any, Protocol

from tqdm import tqdm

from nanoseek.train.run import RunFolder


class Job(Protocol):
    """What `fit` drives. step: the steps done (restored from a checkpoint on resume)."""

    name: str  # the progress bar's label
    step: int
    steps: int  # the run's total
    eval_every: int
    save_every: int

    def restore(self, saved: tuple[dict, dict, dict]) -> None: ...

    def before(self) -> dict[str, Any] | None:
        """A metrics row for step 0 (GRPO's held-out pass@1 before training), or None."""

    def train_step(self) -> dict[str, Any]:
        """One step; its metrics, `step` the count after it."""

    def eval_into(self, metrics: dict[str, Any]) -> list[str]:
        """Add the evaluation to the step's metrics (collective under torchrun); lines to print."""

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        """The progress bar's figures."""

    def save(self) -> None:
        """A checkpoint and the model folder (collective under torchrun)."""


class Cadence:
    """A job's steps and its evaluation and save cadence, read from its settings (`self.cfg`)."""

    cfg: Any

    @property
    def steps(self) -> int:
        return self.cfg.steps

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every

    @property
    def save_every(self) -> int:
        return self.cfg.save_every


def fit(
    job: Job, run: RunFolder, resume: bool, progress: bool, main: bool = True, tensorboard: bool = False
) -> list[dict[str, Any]]:
    """Run `job` to its last step in `run`, resuming from its last checkpoint if asked; the metrics of each
    step run. main: this process writes the files, the bar and the logs (under torchrun, the first alone)."""
    saved = run.start(resume, write=main)
    if saved is not None:
        job.restore(saved)
    writer = _tensorboard(run, main) if tensorboard else None
    history: list[dict[str, Any]] = []
    bar = tqdm(total=job.steps, initial=job.step, desc=job.name, unit="step", disable=not (progress and main))
    with run.open_metrics(job.step, resume) if main else nullcontext() as log:

        def record(metrics: dict[str, Any]) -> None:
            history.append(metrics)
            if main:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            if writer is not None:
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and key != "step":
                        writer.add_scalar(key, value, metrics["step"])

        if job.step == 0 and (first := job.before()) is not None:
            record(first)
        while job.step < job.steps:
            metrics = job.train_step()
            if job.step % job.eval_every == 0 or job.step == job.steps:
                for line in job.eval_into(metrics):
                    if main:
                        bar.write(line)
            record(metrics)
            bar.update(1)
            bar.set_postfix(job.postfix(metrics))
            if job.step % job.save_every == 0 or job.step == job.steps:
                job.save()
    bar.close()
    if writer is not None:
        writer.close()
    return history


def _tensorboard(run: RunFolder, main: bool):
    if not main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run.out / "tensorboard"))
