"""Verifiable tasks: problems generated from a seed, with disjoint train and test splits, and a verifier.

    nanoseek task write --task arithmetic --split train --n 2000 --solutions --out arith.jsonl

Built in: `arithmetic` (multi-digit addition and subtraction, with a digit-by-digit worked solution for
supervised warm starts), `multiply` (3-digit by 2-digit products: long multiplication worked in the chain
of thought, or one call of the calculator tool) and `countdown` (TinyZero's: reach a target from 3-4
numbers, each used once, with + - * /; reward 1 if right, 0.1 if well formed but wrong, 0 otherwise).
Any JSONL file with "prompt" and "answer" per line is a task too (exact, or numeric, match). Replies follow R1's format,
`<think>reasoning</think><answer>answer</answer>`; a problem lands in the test split by a hash of its
content, so no seed can leak a test problem into training.
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.rl import calculator
from nanoseek.rl.config import TaskWriteConfig

INSTRUCTION = "Think step by step inside <think></think>, then give the result inside <answer></answer>."
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The content of the last <answer>...</answer>, stripped; None if there is none."""
    found = ANSWER.findall(completion)
    return found[-1].strip() if found else None


@dataclass(frozen=True, slots=True)
class Problem:
    question: str  # what the user asks
    answer: str  # the reference answer
    meta: dict = field(default_factory=dict, compare=False)
    instruction: str = field(default=INSTRUCTION, compare=False)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{self.question} {self.instruction}"}]


def in_test_split(key: str, permille: int = 100) -> bool:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big") % 1000 < permille


class Task:
    name = "task"
    tools: list[dict] | None = None  # the tools a reply may call (OpenAI's shape)

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """n distinct problems of a split ('train' or 'test'), the same for the same seed."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be train or test, got {split!r}")
        rng, seen, out = random.Random(f"{self.name}/{split}/{seed}"), set(), []
        for _ in range(200 * n + 1000):
            problem = self.generate(rng)
            if problem.question in seen or in_test_split(problem.question) != (split == "test"):
                continue
            seen.add(problem.question)
            out.append(problem)
            if len(out) == n:
                return out
        raise ValueError(f"{self.name}: only {len(out)} distinct {split} problems exist, asked for {n}")

    def generate(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def verify(self, problem: Problem, completion: str) -> float:
        """The accuracy reward of a completion, in [0, 1]."""
        answer = extract_answer(completion)
        return float(answer is not None and same_value(answer, problem.answer))

    def solution(self, problem: Problem) -> str:
        """A correct reply in the R1 format (for supervised warm starts)."""
        return f"<think>The answer is {problem.answer}.</think><answer>{problem.answer}</answer>"

    def conversation(self, problem: Problem, use_tools: bool = False) -> list[dict]:
        """A solved example as chat messages (for nanoseek sft): reasoned out, or with calls of the task's tools
        (offered to the model as `self.tools`)."""
        if use_tools:
            return self.tool_conversation(problem)
        return [*problem.messages(), {"role": "assistant", "content": self.solution(problem)}]

    def tool_conversation(self, problem: Problem) -> list[dict]:
        raise ValueError(f"the {self.name} task has no tool-use solutions (multiply has)")


def same_value(given: str, expected: str) -> bool:
    if given == expected:
        return True
    try:
        return abs(float(given.replace(",", "")) - float(expected)) < 1e-6
    except ValueError:
        return False


@dataclass
class Arithmetic(Task):
    """a + b or a - b with `digits`-digit operands."""

    digits: int = 2
    name = "arithmetic"

    def generate(self, rng: random.Random) -> Problem:
        low, high = 10 ** (self.digits - 1), 10**self.digits - 1
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b
        return Problem(f"What is {a} {op} {b}?", str(value), {"a": a, "b": b, "op": op})

    def solution(self, problem: Problem) -> str:
        """Column arithmetic, one digit at a time from the right, with carries or borrows."""
        a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
        steps, result = column_steps(a, b, op)
        return f"<think>{steps}, so {a} {op} {b} = {result}.</think><answer>{result}</answer>"


def column_steps(a: int, b: int, op: str) -> tuple[str, int]:
    """a + b or a - b (a >= b) worked one digit at a time from the right: ("2+0=2, 8+6=14, ...", the result)."""
    xs, ys = str(a)[::-1], str(b)[::-1].ljust(len(str(a)), "0")
    steps, carry, digits = [], 0, []
    for x, y in zip(xs, ys, strict=False):
        x, y = int(x), int(y)
        if op == "+":
            total = x + y + carry
            steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
            digits.append(total % 10)
            carry = total // 10
        else:
            total = x - y - carry
            borrow = total < 0
            steps.append(f"{x}-{y}" + (f"-{carry}" if carry else "") + f"={total}" + (" borrow" if borrow else ""))
            digits.append(total + 10 if borrow else total)
            carry = int(borrow)
    if op == "+" and carry:
        digits.append(carry)
    return ", ".join(steps), int("".join(map(str, reversed(digits))))


OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate_expression(text: str) -> tuple[float, list[int]] | None:
    """Safely evaluate + - * / and parentheses over integers; (value, the integers used) or None."""
    try:
        tree = ast.parse(text.replace("×", "*").replace("÷", "/"), mode="eval").body
    except SyntaxError:
        return None
    used: list[int] = []

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            used.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("only integers, + - * / and parentheses")

    try:
        return value(tree), used
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


@dataclass
class Countdown(Task):
    """Reach the target with every number used exactly once (TinyZero's task and reward)."""

    min_numbers: int = 3
    max_numbers: int = 4
    name = "countdown"

    def generate(self, rng: random.Random) -> Problem:
        while True:
            numbers = [rng.randint(1, 99) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            expr, value = str(numbers[0]), numbers[0]
            for x in numbers[1:]:  # a random left-to-right expression gives a reachable target
                op = rng.choice("+-*/" if x and value % x == 0 else "+-*")
                expr, value = (
                    f"({expr} {op} {x})",
                    {"+": value + x, "-": value - x, "*": value * x, "/": value // x if x else value}[op],
                )
            if 1 <= value <= 100:
                question = (
                    f"Using the numbers {numbers}, create an equation that equals {value}. "
                    "Use + - * / and each number exactly once."
                )
                return Problem(question, expr, {"numbers": numbers, "target": value})

    def verify(self, problem: Problem, completion: str) -> float:
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        result = evaluate_expression(answer.split("=")[0])
        if result is None:
            return 0.1
        value, used = result
        right = sorted(used) == sorted(problem.meta["numbers"]) and abs(value - problem.meta["target"]) < 1e-5
        return 1.0 if right else 0.1

    def solution(self, problem: Problem) -> str:
        return f"<think>Combine the numbers step by step.</think><answer>{problem.answer}</answer>"


@dataclass
class Multiply(Task):
    """a * b with a `digits`-digit a and a `by_digits`-digit b: worked out by long multiplication in the chain
    of thought, or (with the calculator offered) by one call of the tool whose result the answer reads.

    nanoseek task write --task multiply --solutions [--tools calculator] --n 4000 --out multiply.jsonl"""

    digits: int = 3
    by_digits: int = 2
    name = "multiply"
    tools = [calculator.TOOL]  # noqa: RUF012 - a class constant, like name

    def generate(self, rng: random.Random) -> Problem:
        a = rng.randint(10 ** (self.digits - 1), 10**self.digits - 1)
        b = rng.randint(10 ** (self.by_digits - 1), 10**self.by_digits - 1)
        return Problem(f"What is {a} * {b}?", str(a * b), {"a": a, "b": b})

    def solution(self, problem: Problem) -> str:
        """Long multiplication: a times each digit of b from the right, digit by digit with carries, shifted
        by its place; then the partial products summed in columns."""
        a, b = problem.meta["a"], problem.meta["b"]
        lines, total = [], 0
        for place, digit in enumerate(int(d) for d in reversed(str(b))):
            steps, carry = [], 0
            for x in (int(d) for d in reversed(str(a))):
                product = x * digit + carry
                steps.append(f"{x}*{digit}" + (f"+{carry}" if carry else "") + f"={product}")
                carry = product // 10
            partial = a * digit * 10**place
            shifted = f", shifted {partial}" if place and partial else ""
            lines.append(f"{a}*{digit}: {', '.join(steps)}, so {a * digit}{shifted}.")
            if place:
                big, small = max(partial, total), min(partial, total)
                total = big + small
                lines.append(f"{big}+{small}: {column_steps(big, small, '+')[0]}, so {total}.")
            else:
                total = partial
        return f"<think>{' '.join(lines)}</think><answer>{total}</answer>"

    def tool_conversation(self, problem: Problem) -> list[dict]:
        expression = f"{problem.meta['a']} * {problem.meta['b']}"
        arguments = json.dumps({"expression": expression})
        call = {"id": "call_0", "type": "function", "function": {"name": calculator.NAME, "arguments": arguments}}
        result = calculator.calculate(expression)
        return [
            *problem.messages(),
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": result},
            {"role": "assistant", "content": f"<think>{expression} = {result}.</think><answer>{result}</answer>"},
        ]


@dataclass
class FileTask(Task):
    """Problems from a JSONL file with "prompt" and "answer"; the test split is chosen by hash."""

    path: str = ""

    def __post_init__(self) -> None:
        self.name = Path(self.path).stem
        self.items = []
        for number, line in enumerate(Path(self.path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.items.append(Problem(str(row["prompt"]), str(row["answer"])))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}:{number}: expected a JSON object with prompt and answer ({e})") from e
        if not self.items:
            raise ValueError(f"{self.path} holds no problems")

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        pool = [p for p in self.items if in_test_split(p.question) == (split == "test")]
        if len(pool) < n:
            raise ValueError(f"{self.path}: {len(pool)} {split} problems, asked for {n}")
        return random.Random(seed).sample(pool, n)


TASKS = {"arithmetic": Arithmetic, "countdown": Countdown, "multiply": Multiply}


def get_task(name: str) -> Task:
    """A built-in task by name, or a JSONL file of problems."""
    if name in TASKS:
        return TASKS[name]()
    if name.endswith(".jsonl") and Path(name).is_file():
        return FileTask(path=name)
    raise ValueError(f"unknown task {name!r}: use one of {sorted(TASKS)} or a .jsonl file with prompt and answer")


def task_tools(task: Task, names: str | None) -> list[dict] | None:
    """The descriptions of the named tools (comma-separated), which the task's tool-use solutions must call."""
    if not names:
        return None
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    offered = {t["function"]["name"] for t in task.tools or []}
    if not wanted or not wanted <= offered:
        raise ValueError(f"--tools {names}: the {task.name} task's solutions call {sorted(offered) or 'no tools'}")
    return [t for t in task.tools if t["function"]["name"] in wanted]


def write(cfg: TaskWriteConfig) -> int:
    """`nanoseek task write`: prompts for distill (with what the verifier needs), or chat examples for sft
    (with the tools they call, if any)."""
    from nanoseek.data import sft_row

    task = get_task(cfg.task)
    tools = task_tools(task, cfg.tools)
    problems = task.problems(cfg.split, cfg.n, cfg.seed)
    with open(cfg.out, "w") as f:
        for p in problems:
            if cfg.solutions:
                f.write(sft_row(task.conversation(p, use_tools=bool(tools)), tools))
            else:
                f.write(json.dumps({"prompt": p.question, "answer": p.answer, "meta": p.meta}) + "\n")
    print(f"{len(problems)} {cfg.split} problems of {cfg.task} -> {cfg.out}")
    return 0
