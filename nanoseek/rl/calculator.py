"""The calculator tool (the `multiply` task's tool-use conversations, agentic RL): arithmetic expressions
parsed by Python's `ast` and evaluated by a small interpreter, never `eval`'d, in exact rationals, with
bounded input, numbers and work. Errors come back as text the model can read, as a tool result would.

    calculate("12 * (34 + 5)")   # "468"
    calculate("7 / 2")           # "3.5"
    calculate("2 ** 1000000")    # "error: the result would have more than 100 digits"
"""

from __future__ import annotations

import ast
import math
import operator
from fractions import Fraction

MAX_CHARS = 200  # the longest expression accepted
MAX_DIGITS = 100  # no number, on the way or at the end, has more digits than this
DECIMALS = 10  # a non-integer result is shown to this many decimal places
NAME = "calculator"

TOOL = {  # the tool as OpenAI's API (and nanoseek's chat template) describes it; every token of it is in each prompt
    "type": "function",
    "function": {
        "name": NAME,
        "description": "Exact arithmetic: + - * / // % ** and parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}

BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class CalculatorError(ValueError):
    pass


def calculate(expression: str) -> str:
    """The expression's value as text, or "error: ..." saying what is wrong."""
    try:
        return show(evaluate(expression))
    except CalculatorError as e:
        return f"error: {e}"


def call(arguments: dict) -> str:
    """The tool as a policy calls it: {"expression": "..."} -> its value or an error, as text."""
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        return 'error: call the calculator with {"expression": "..."}, the expression as a string'
    return calculate(expression)


def evaluate(expression: str) -> Fraction:
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError("not an arithmetic expression") from None
    return _value(tree.body)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if not math.isfinite(node.value):  # 1e999 parses as infinity
            raise CalculatorError("numbers must be finite")
        return _bounded(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _power(_value(node.left), _value(node.right))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalculatorError("division by zero")
        return _bounded(Fraction(BINARY[type(node.op)](left, right)))
    raise CalculatorError(f"only numbers, + - * / // % ** and parentheses are allowed, not {_what(node)}")


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculatorError("exponents must be whole numbers")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero")
    size = max(abs(base.numerator), base.denominator)
    if size > 1 and abs(exponent) * math.log10(size) > MAX_DIGITS:  # judged before any work is done
        raise CalculatorError(f"the result would have more than {MAX_DIGITS} digits")
    return _bounded(base ** int(exponent))


def _bounded(value: Fraction) -> Fraction:
    if max(abs(value.numerator), value.denominator) >= 10**MAX_DIGITS:
        raise CalculatorError(f"the result would have more than {MAX_DIGITS} digits")
    return value


def show(value: Fraction) -> str:
    """An integer as it is; otherwise rounded to DECIMALS places, trailing zeros dropped."""
    if value.denominator == 1:
        return str(value.numerator)
    scaled = round(abs(value) * 10**DECIMALS)
    whole, part = divmod(scaled, 10**DECIMALS)
    text = f"{whole}.{part:0{DECIMALS}d}".rstrip("0").rstrip(".")
    return f"-{text}" if value < 0 and scaled else text


def _what(node: ast.AST) -> str:
    names = {ast.Name: "names", ast.Call: "function calls", ast.Attribute: "attributes", ast.Constant: "text"}
    return names.get(type(node), type(node).__name__)
