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

from nanoseek.rl.agent import Toolbox, reply_text, run_rollouts
from nanoseek.rl.config import EvalConfig
from nanoseek.rl.tasks import Problem, Task, get_task
from nanoseek.serve.engine import Engine
from nanoseek.serve.sampling import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class EvalResult:
    pass_at: dict[int, float]
    samples: list[tuple[Problem, str, float]]  # (problem, reply, reward) of the first sample of each problem
    tool_use: float = 0.0  # the fraction of replies that called a tool

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
    toolbox: Toolbox | None = None,
    max_turns: int = 3,
) -> EvalResult:
    """Sample `samples` replies per problem (greedy if temperature is 0) and score them; with a toolbox, the
    tools are offered in the prompt and run when called (up to max_turns turns), and the last turn is scored."""
    if any(k > samples for k in ks):
        raise ValueError(f"pass@k needs k <= samples, got k={max(ks)} with {samples} samples")
    tools = toolbox.definitions if toolbox else None
    prompts, params = [], []
    for i, problem in enumerate(problems):
        ids = engine.tokenizer.apply_chat_template(problem.messages(), tokenize=True, tools=tools)
        for j in range(samples):
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i * samples + j))
    rollouts = run_rollouts(engine, prompts, params, toolbox, max_turns if toolbox else 1)
    correct, firsts = [], []
    for i, problem in enumerate(problems):
        group = rollouts[i * samples : (i + 1) * samples]
        rewards = [task.verify(problem, r.text) for r in group]
        correct.append(sum(r >= 1.0 for r in rewards))
        firsts.append((problem, reply_text(engine, group[0].tokens), rewards[0]))  # turns and results
    scores = {k: sum(pass_at_k(samples, c, k) for c in correct) / len(problems) for k in ks}
    return EvalResult(scores, firsts, sum(bool(r.calls) for r in rollouts) / len(rollouts))


def run(cfg: EvalConfig) -> int:
    """`nanoseek eval`: pass@k with the verifier, or lm-evaluation-harness tasks against a server."""
    if cfg.lm_eval:
        return run_lm_eval(cfg)
    task, engine = get_task(cfg.task), Engine(cfg.model, config=cfg.engine)
    problems = task.problems(cfg.split, cfg.n, cfg.seed)
    sampling = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "seed": cfg.seed}
    # With tools: the same problems with the tools offered, then without them (what the tools are worth).
    runs = {"with tools": Toolbox.named(cfg.tools), "without tools": None} if cfg.tools else {"": None}
    results = {
        name: evaluate(engine, task, problems, cfg.samples, cfg.ks, toolbox=box, max_turns=cfg.max_turns, **sampling)
        for name, box in runs.items()
    }
    if cfg.json:
        row = {"n": cfg.n, "task": cfg.task} | ({"tools": cfg.tools} if cfg.tools else {})
        for name, result in results.items():
            suffix = "_" + name.replace(" ", "_") if name else ""
            row |= {f"pass@{k}{suffix}": v for k, v in result.pass_at.items()}
            row |= {"tool_use_with_tools": result.tool_use} if name == "with tools" else {}
        print(json.dumps(row))
        return 0
    for name, result in results.items():
        for problem, reply, reward in result.samples[: cfg.show]:
            print(f"{problem.question}\n  -> {reply!r} (reward {reward})")
        scores = ", ".join(f"pass@{k} {v:.3f}" for k, v in result.pass_at.items())
        called = f" ({result.tool_use:.0%} of replies called a tool)" if name == "with tools" else ""
        print(f"{scores} on {cfg.n} {cfg.split} problems" + (f", {name}{called}" if name else ""))
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
