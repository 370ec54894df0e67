"""pass@k on a verifiable task's held-out problems, sampled with the engine.

    nanoseek eval --model runs/grpo/model --task arithmetic --n 200               # greedy pass@1
    nanoseek eval --model DIR --task countdown --n 100 --samples 8 --k 1,8 --temperature 0.7

pass@k is the unbiased estimator of Chen et al. (2021): with n samples per problem of which c are right,
1 - C(n - c, k) / C(n, k), averaged over problems. A sample is right when the task's verifier gives it
full reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from nanoseek.rl.tasks import Problem, Task
from nanoseek.serve.engine import Engine
from nanoseek.serve.sampling import SamplingParams


def batch_engine(model_dir) -> Engine:
    """An engine sized for offline batches (evaluation, teacher traces): many sequences per step."""
    return Engine(model_dir, max_seqs=256, max_batched_tokens=4096)


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
