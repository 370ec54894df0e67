"""Chain-of-thought distillation: a teacher writes `<think>...</think><answer>...</answer>` replies, a
verifier keeps the right ones (rejection sampling, as R1's 800k SFT samples were made), and the student
is fine-tuned on them with the one trainer (optionally also matching the teacher's logits).

    nanoseek task write --task arithmetic --split train --n 2000 --out prompts.jsonl
    nanoseek distill --teacher runs/teacher/model --student runs/tiny/model --prompts prompts.jsonl \\
        --task arithmetic --out runs/distill
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nanoseek.atomic import atomic_file, atomic_write
from nanoseek.data import sft_row
from nanoseek.rl.agent import reply_text
from nanoseek.rl.config import DistillConfig
from nanoseek.rl.tasks import Problem, Task
from nanoseek.serve.config import EngineConfig
from nanoseek.serve.engine import Engine
from nanoseek.serve.sampling import SamplingParams
from nanoseek.train.config import TrainConfig


def read_problems(path: str | Path) -> list[Problem]:
    """JSONL lines with "prompt" (and "answer", "meta" when a verifier should filter the replies)."""
    problems = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problems.append(Problem(str(row["prompt"]), str(row.get("answer", "")), row.get("meta", {})))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number}: expected a JSON object with a prompt ({e})") from e
    if not problems:
        raise ValueError(f"{path} holds no prompts")
    return problems


def write_traces(
    engine: Engine,
    problems: list[Problem],
    task: Task | None,
    out: str | Path,
    samples: int = 4,
    temperature: float = 0.7,
    max_tokens: int = 128,
    seed: int = 0,
    batch: int = 256,
    progress: bool = True,
) -> dict[str, float]:
    """Sample `samples` replies per prompt; keep, per prompt, the first one the verifier accepts (every
    first reply when there is no verifier). Writes chat JSONL for `nanoseek sft`; returns counts (teacher_tokens:
    prompt and generated tokens, what the sampling cost)."""
    kept = total_right = tokens = 0
    with open(out, "w") as f, tqdm(total=len(problems), desc="teacher", unit="prompt", disable=not progress) as bar:
        for first in range(0, len(problems), batch):
            chunk = problems[first : first + batch]
            prompts = [engine.tokenizer.apply_chat_template(p.messages(), tokenize=True) for p in chunk]
            seeds = [seed + (first + i) * samples + j for i in range(len(chunk)) for j in range(samples)]
            params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=s) for s in seeds]
            outputs = engine.generate([ids for ids in prompts for _ in range(samples)], params)
            tokens += samples * sum(map(len, prompts)) + sum(len(o.token_ids) for o in outputs)
            for i, problem in enumerate(chunk):
                replies = [reply_text(engine, o.token_ids) for o in outputs[i * samples : (i + 1) * samples]]
                right = [r for r in replies if task is None or task.verify(problem, r) >= 1.0]
                total_right += len(right)
                if right:  # the prompt as the teacher saw it (no tools offered), and its verified reply
                    f.write(sft_row([*problem.messages(), {"role": "assistant", "content": right[0]}]))
                    kept += 1
            bar.update(len(chunk))
    return {
        "prompts": len(problems),
        "kept": kept,
        "teacher_accuracy": total_right / (len(problems) * samples),
        "teacher_tokens": tokens,
    }


def distill(
    teacher: str | Path,
    problems: list[Problem],
    task: Task | None,
    train: TrainConfig,
    samples: int = 4,
    temperature: float = 0.7,
    max_tokens: int = 128,
    seed: int = 0,
    min_traces: int = 1,
    engine: EngineConfig | None = None,
) -> dict[str, Any]:
    """The whole pipeline, for `nanoseek distill` and the speedrun: the teacher's verified traces on
    `problems` written to `train.data` (their counts and the settings that made them beside it, in
    traces.json), then the student (`train.init`) fine-tuned on them into `train.out`. A rerun with the
    same teacher, prompts and sampling reuses the traces (a killed run resumes with `train.resume`).
    Under torchrun the first process samples and the others wait for its traces. Returns the counts, with
    the student's processed tokens; with fewer than `min_traces` kept, the student is not trained and a
    note says so."""
    traces = Path(train.data)
    traces.parent.mkdir(parents=True, exist_ok=True)
    record = traces.with_suffix(".json")
    settings = {
        "teacher": str(teacher),
        "task": task.name if task else None,
        "samples": samples,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "seed": seed,
        "prompts": hashlib.sha256(json.dumps([p.question for p in problems]).encode()).hexdigest(),
    }

    def written() -> dict[str, Any] | None:
        saved = json.loads(record.read_text()) if record.is_file() and traces.is_file() else {}
        return saved.get("stats") if saved.get("settings") == settings else None

    stats = written()
    if stats is None and os.environ.get("RANK", "0") != "0":
        while (stats := written()) is None:  # the first process is sampling: wait for its traces
            time.sleep(1.0)
    elif stats is None:
        with atomic_file(traces) as tmp:  # renamed when whole: a killed run leaves no half file
            stats = write_traces(
                Engine(teacher, config=engine or EngineConfig.for_batches()),
                problems,
                task,
                tmp,
                samples=samples,
                temperature=temperature,
                max_tokens=max_tokens,
                seed=seed,
                progress=train.progress,
            )
        atomic_write(record, json.dumps({"settings": settings, "stats": stats}, indent=2) + "\n")
    if stats["kept"] < min_traces:
        return {**stats, "student_tokens": 0, "note": f"{stats['kept']} verified traces: too few to fine-tune on"}
    from nanoseek.train import parallel
    from nanoseek.train.trainer import Trainer

    trainer, _ = parallel.fit(Trainer(train))
    return {**stats, "student_tokens": trainer.tokens}


def run(cfg: DistillConfig) -> int:
    """`nanoseek distill`: the pipeline on a prompts file, with the settings' verifier."""
    from nanoseek.rl.tasks import get_task

    task = get_task(cfg.task) if cfg.task else None
    train = cfg.train_config()
    sampling = {"samples": cfg.samples, "temperature": cfg.teacher_temperature, "max_tokens": cfg.max_tokens}
    stats = distill(cfg.teacher, read_problems(cfg.prompts), task, train, seed=cfg.seed, engine=cfg.engine, **sampling)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the first process prints
        print(f"teacher: {stats['kept']} of {stats['prompts']} prompts kept (accuracy {stats['teacher_accuracy']:.3f})")
        print(stats.get("note") or f"student fine-tuned on the teacher's traces -> {train.out}/model")
    return 0 if "note" not in stats else 1
