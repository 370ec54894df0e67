"""pass@k on a verifiable task's held-out problems, sampled with the engine.

    nanoseek eval --model runs/grpo/model --task arithmetic --n 200               # greedy pass@1
    nanoseek eval --model DIR --task countdown --n 100 --samples 8 --k 1,8 --temperature 0.7

pass@k is the unbiased estimator of Chen et al. (2021): with n samples per problem of which c are right,
1 - C(n - c, k) / C(n, k), averaged over problems. A sample is right when the task's verifier gives it
full reward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import comb
from pathlib import Path

from nanoseek.rl.config import EvalConfig
from nanoseek.rl.tasks import Problem, Task, get_task
from nanoseek.serve.engine import Engine
from nanoseek.serve.sampling import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def completion_text(engine: Engine, token_ids: list[int]) -> str:
    """A reply with its special tokens kept (<think>, </think>), without the end-of-sentence token."""
    if token_ids and token_ids[-1] == engine.eos_id:
        token_ids = token_ids[:-1]
    return engine.tokenizer.decode(token_ids, skip_special_tokens=False)


@dataclass
class EvalResult:
    pass_at: dict[int, float]
    samples: list[tuple[Problem, str, float]]  # (problem, reply, reward) of the first sample of each problem

    @property
    def pass_at_1(self) -> float:
        return self.pass_at[1]


def evaluate(
    engine: Engine,
    task: Task,
    problems: list[Problem],
    samples: int = 1,
    ks: tuple[int, ...] = (1,),
    temperature: float = 0.0,
    max_tokens: int = 128,
    seed: int = 0,
) -> EvalResult:
    """Sample `samples` replies per problem (greedy if temperature is 0) and score them."""
    if any(k > samples for k in ks):
        raise ValueError(f"pass@k needs k <= samples, got k={max(ks)} with {samples} samples")
    prompts, params = [], []
    for i, problem in enumerate(problems):
        ids = engine.tokenizer.apply_chat_template(problem.messages(), tokenize=True)
        for j in range(samples):
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i * samples + j))
    outputs = engine.generate(prompts, params)
    correct, firsts = [], []
    for i, problem in enumerate(problems):
        replies = [completion_text(engine, o.token_ids) for o in outputs[i * samples : (i + 1) * samples]]
        rewards = [task.verify(problem, r) for r in replies]
        correct.append(sum(r >= 1.0 for r in rewards))
        firsts.append((problem, replies[0], rewards[0]))
    scores = {k: sum(pass_at_k(samples, c, k) for c in correct) / len(problems) for k in ks}
    return EvalResult(scores, firsts)


def run(cfg: EvalConfig) -> int:
    """`nanoseek eval`: pass@k with the verifier, or lm-evaluation-harness tasks against a server."""
    if cfg.lm_eval:
        return run_lm_eval(cfg)
    task = get_task(cfg.task)
    problems = task.problems(cfg.split, cfg.n, cfg.seed)
    sampling = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "seed": cfg.seed}
    result = evaluate(Engine(cfg.model, config=cfg.engine), task, problems, samples=cfg.samples, ks=cfg.ks, **sampling)
    if cfg.json:
        print(json.dumps({f"pass@{k}": v for k, v in result.pass_at.items()} | {"n": cfg.n, "task": cfg.task}))
        return 0
    for problem, reply, reward in result.samples[: cfg.show]:
        print(f"{problem.question}\n  -> {reply!r} (reward {reward})")
    print(", ".join(f"pass@{k} {v:.3f}" for k, v in result.pass_at.items()) + f" on {cfg.n} {cfg.split} problems")
    return 0


def run_lm_eval(cfg: EvalConfig) -> int:
    from nanoseek import harness

    yamls = [Path(y) for y in cfg.lm_eval]
    if missing := [str(y) for y in yamls if not y.is_file()]:
        raise FileNotFoundError(f"no task YAML at {', '.join(missing)}")
    options = {
        "model_name": cfg.served_model_name,
        "limit": cfg.limit,
        "output": cfg.output,
        "concurrency": cfg.concurrency,
        "api_key": cfg.api_key,
    }
    if cfg.url:
        return harness.run(cfg.url, yamls, **options)
    with harness.served(cfg.model, cfg.concurrency) as url:
        return harness.run(url, yamls, **options)
