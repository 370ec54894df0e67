"""Rule-based rewards (R1's recipe: accuracy from a verifier plus a format reward), as plug-ins.

A reward function is any callable `fn(completion: str, problem: Problem, task: Task) -> float`, named on
the command line by its dotted path (`nanoseek grpo --rewards nanoseek.rl.rewards.accuracy_reward,mypkg.mod.fn`).
`completion` is the reply's text with its special tokens (<think>, </think>) kept.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from nanoseek.rl.tasks import Problem, Task

RewardFn = Callable[[str, Problem, Task], float]
FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def accuracy_reward(completion: str, problem: Problem, task: Task) -> float:
    """The task's verifier: 1 for a right answer (countdown: 0.1 for a well-formed wrong one)."""
    return task.verify(problem, completion)


def format_reward(completion: str, problem: Problem, task: Task) -> float:
    """1 if the reply is exactly <think>...</think><answer>...</answer>, else 0."""
    return float(FORMAT.fullmatch(completion) is not None)


def load_reward(path: str) -> RewardFn:
    """'package.module.function' (or 'package.module:function') -> the function."""
    module, _, name = path.replace(":", ".").rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot load the reward function {path!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn


def reward_name(path: str) -> str:
    return path.replace(":", ".").rpartition(".")[2]


def overlong_penalty(length: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_tokens - buffer, then down linearly to -1 at max_tokens."""
    if buffer <= 0 or length <= max_tokens - buffer:
        return 0.0
    return -min(1.0, (length - (max_tokens - buffer)) / buffer)
