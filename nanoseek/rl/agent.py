"""Multi-turn rollouts with tools (agentic RL): the policy replies in DeepSeek-V3's tool-call format; when a
turn ends in calls, the tools run and their results are appended as the chat format's tool outputs, and the
policy goes on from there, up to `max_turns` turns.

    toolbox = Toolbox.named("calculator")
    [rollout] = run_rollouts(engine, [prompt_ids], [SamplingParams(temperature=1.0)], toolbox, max_turns=3)
    rollout.tokens, rollout.own          # the turns and the results between them; which tokens the policy sampled

A rollout is one token sequence, the very one SFT and serving see for the same conversation (the results are
rendered by the chat template's own rules, tokenizer.tool_results_ids). Rollouts share the engine's
continuous batch: a rollout whose tools are running is out of the batch and the others go on; it comes back,
prompt cached, when its results are in. A call in the last allowed turn is left unanswered (the rollout ends).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

from nanoseek.rl import calculator
from nanoseek.serve.engine import Engine
from nanoseek.serve.sampling import SamplingParams
from nanoseek.serve.tools import ToolCall, parse_tool_calls

TOOL_SECONDS = 10.0  # a tool that takes longer answers with an error the model can read (its thread is left)
MAX_RESULT_CHARS = 1000  # a longer result is cut (it becomes prompt tokens of the next turn)
TOOLS: dict[str, tuple[dict, Callable[[dict], str]]] = {  # name -> (OpenAI's description, run(arguments))
    calculator.NAME: (calculator.TOOL, calculator.call),
}


@dataclass(frozen=True)
class Toolbox:
    """The tools a policy may call, by name: their descriptions for the prompt and their functions."""

    tools: dict[str, Callable[[dict], str]]
    definitions: list[dict]

    @classmethod
    def named(cls, names: str | Sequence[str]) -> Toolbox:
        """'calculator' (or several, comma-separated) -> the toolbox."""
        names = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)
        if unknown := [n for n in names if n not in TOOLS]:
            raise ValueError(f"unknown tool {unknown[0]!r}: the tools are {', '.join(sorted(TOOLS))}")
        if not names:
            raise ValueError("name at least one tool")
        return cls({n: TOOLS[n][1] for n in names}, [TOOLS[n][0] for n in names])

    def run(self, call: ToolCall) -> str:
        """One call's result, or an "error: ..." the model can read (never an exception)."""
        if call.name not in self.tools:
            return f"error: there is no tool {call.name!r}; the tools are {', '.join(self.tools)}"
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            return "error: the arguments are not JSON"
        if not isinstance(arguments, dict):
            return "error: the arguments must be a JSON object"
        try:
            result = self.tools[call.name](arguments)
        except Exception as e:  # a tool's own failure is the model's to read, not the rollout's to end
            result = f"error: {type(e).__name__}: {e}"
        return result[:MAX_RESULT_CHARS]


@dataclass
class Rollout:
    """One conversation the policy had: its prompt, then its turns with the tools' results between them."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)  # everything after the prompt
    own: list[bool] = field(default_factory=list)  # which of `tokens` the policy sampled (trained on)
    turns: list[str] = field(default_factory=list)  # each turn's text, special tokens kept, without its end
    calls: list[dict] = field(default_factory=list)  # {"name", "arguments", "result"} of each call (result None:
    # made in the last turn, unanswered), in order
    finish_reason: str | None = None  # stop, length (a turn or the context ran out), tool_calls (out of turns), error

    @property
    def text(self) -> str:
        """The last turn: the final answer, which the rewards read."""
        return self.turns[-1] if self.turns else ""

    @property
    def completion_tokens(self) -> int:
        return sum(self.own)

    def add_turn(self, ids: list[int], text: str) -> None:
        self.tokens += ids
        self.own += [True] * len(ids)
        self.turns.append(text)

    def add_results(self, ids: list[int]) -> None:
        self.tokens += ids
        self.own += [False] * len(ids)


def run_rollouts(
    engine: Engine,
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams],
    toolbox: Toolbox | None = None,
    max_turns: int = 1,
) -> list[Rollout]:
    """Each prompt's rollout, all in one continuous batch; without a toolbox, one turn each. A prompt the
    engine refuses raises (as engine.generate does); a conversation that outgrows the context ends there."""
    if max_turns < 1:
        raise ValueError("max_turns must be at least 1")
    tokenizer = engine.tokenizer
    rollouts = [Rollout(list(p)) for p in prompts]
    live: dict[str, int] = {}  # engine request -> rollout
    running: dict[Future, tuple[int, list[ToolCall], float]] = {}  # tools at work -> rollout, calls, start

    def start_turn(i: int) -> None:
        rollout, turn = rollouts[i], len(rollouts[i].turns)
        sampling = params[i]
        if turn and sampling.seed is not None:  # each turn samples afresh, reproducibly
            sampling = dataclasses.replace(sampling, seed=turn_seed(sampling.seed, turn))
        try:
            live[engine.add_request(rollout.prompt + rollout.tokens, sampling)] = i
        except ValueError:
            if not turn:
                raise
            rollout.finish_reason = "length"  # the conversation no longer fits the context

    def end_turn(i: int, ids: list[int], finish_reason: str) -> list[ToolCall]:
        rollout = rollouts[i]
        rollout.add_turn(ids, reply_text(engine, ids))
        calls = parse_tool_calls(tokenizer, ids) if toolbox and finish_reason == "stop" else []
        if calls and len(rollout.turns) < max_turns:
            return calls
        rollout.calls += [{"name": c.name, "arguments": c.arguments, "result": None} for c in calls]  # unanswered
        rollout.finish_reason = "tool_calls" if calls else finish_reason
        return []

    try:
        for i in range(len(rollouts)):
            start_turn(i)
        while live or running:
            if live:
                outputs = engine.step()
            else:  # only tools at work: wait for the first to answer
                wait(running, timeout=TOOL_SECONDS, return_when=FIRST_COMPLETED)
                outputs = []
            for out in outputs:
                if out.finish_reason is None or out.request_id not in live:
                    continue
                i = live.pop(out.request_id)
                if calls := end_turn(i, out.token_ids, out.finish_reason):
                    running[in_thread(lambda calls=calls: [toolbox.run(c) for c in calls])] = (
                        i,
                        calls,
                        time.monotonic(),
                    )
            now = time.monotonic()
            for work in [w for w, (_, _, t) in running.items() if w.done() or now - t > TOOL_SECONDS]:
                i, calls, _ = running.pop(work)
                overdue = [f"error: the tool took longer than {TOOL_SECONDS:g} s"] * len(calls)
                results = work.result() if work.done() else overdue
                rollouts[i].calls += [
                    {"name": c.name, "arguments": c.arguments, "result": r} for c, r in zip(calls, results, strict=True)
                ]
                rollouts[i].add_results(tokenizer.tool_results_ids(results))
                start_turn(i)
    finally:  # an error or an interrupt leaves nothing running in the engine, which may serve on
        for request_id in live:
            engine.cancel(request_id)
    return rollouts


def reply_text(engine: Engine, ids: list[int]) -> str:
    """A reply's text with its special tokens kept (<think>, the tool-call markup), without its end token."""
    return engine.tokenizer.decode(ids[:-1] if ids and ids[-1] == engine.eos_id else ids)


def turn_seed(seed: int, turn: int) -> int:
    """A turn's sampling seed, from the rollout's seed and the turn alone (no two pairs share one)."""
    digest = hashlib.blake2b(f"{seed}/{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def in_thread(work: Callable[[], list[str]]) -> Future:
    """work() on a daemon thread of its own: a tool that hangs is left behind, and never holds up the
    process's exit (a pool's threads are joined at exit)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as e:  # Toolbox.run returns errors as text; this is for the unforeseen
            future.set_exception(e)

    threading.Thread(target=run, daemon=True, name="tool").start()
    return future
