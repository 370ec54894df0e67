"""Chain-of-thought distillation: a teacher writes `<think>...</think><answer>...</answer>` replies, a
verifier keeps the right ones (rejection sampling, as R1's 800k SFT samples were made), and the student
is fine-tuned on them with the one trainer (optionally also matching the teacher's logits).

    nanoseek task write --task arithmetic --split train --n 2000 --out prompts.jsonl
    nanoseek distill --teacher runs/teacher/model --student runs/tiny/model --prompts prompts.jsonl \\
        --task arithmetic --out runs/distill
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from nanoseek.rl.evaluate import completion_text
from nanoseek.rl.tasks import Problem, Task
from nanoseek.serve.engine import Engine
from nanoseek.serve.sampling import SamplingParams


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


def write_traces(engine: Engine, problems: list[Problem], task: Task | None, out: str | Path, samples: int = 4,
                 temperature: float = 0.7, max_tokens: int = 128, seed: int = 0, batch: int = 256,
                 progress: bool = True) -> dict[str, float]:  # fmt: skip
    """Sample `samples` replies per prompt; keep, per prompt, the first one the verifier accepts (every
    first reply when there is no verifier). Writes chat JSONL for `nanoseek sft`; returns counts."""
    kept = total_right = 0
    with open(out, "w") as f, tqdm(total=len(problems), desc="teacher", unit="prompt", disable=not progress) as bar:
        for first in range(0, len(problems), batch):
            chunk = problems[first : first + batch]
            prompts = [engine.tokenizer.apply_chat_template(p.messages(), tokenize=True) for p in chunk]
            seeds = [seed + (first + i) * samples + j for i in range(len(chunk)) for j in range(samples)]
            params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=s) for s in seeds]
            outputs = engine.generate([ids for ids in prompts for _ in range(samples)], params)
            for i, problem in enumerate(chunk):
                replies = [completion_text(engine, o.token_ids) for o in outputs[i * samples : (i + 1) * samples]]
                right = [r for r in replies if task is None or task.verify(problem, r) >= 1.0]
                total_right += len(right)
                if right:
                    f.write(
                        json.dumps({"messages": [*problem.messages(), {"role": "assistant", "content": right[0]}]})
                        + "\n"
                    )
                    kept += 1
            bar.update(len(chunk))
    return {"prompts": len(problems), "kept": kept, "teacher_accuracy": total_right / (len(problems) * samples)}
