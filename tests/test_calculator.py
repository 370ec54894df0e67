"""The calculator tool (nanoseek.rl.calculator): exact arithmetic, never eval, bounded input and work."""

import time
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.rl.calculator import MAX_DIGITS, calculate, evaluate

ints = st.integers(-(10**12), 10**12)


@settings(max_examples=200, deadline=None)
@given(a=ints, b=ints, c=ints, op=st.sampled_from(["+", "-", "*", "//", "%", "/"]))
def test_integer_arithmetic_is_exact(a, b, c, op):
    expression = f"({a}) {op} ({b}) + {c}"
    if op in ("//", "%", "/") and b == 0:
        assert calculate(expression) == "error: division by zero"
        return
    operations = {
        "+": lambda: a + b,
        "-": lambda: a - b,
        "*": lambda: a * b,
        "//": lambda: a // b,
        "%": lambda: a % b,
        "/": lambda: Fraction(a, b),
    }
    exact = operations[op]() + c
    assert evaluate(expression) == exact


def test_results_read_as_numbers_and_mistakes_as_errors_the_model_can_read():
    assert calculate("12 * (34 + 5)") == "468"
    assert calculate("7 / 2") == "3.5" and calculate("1 / 3") == "0.3333333333"
    assert calculate("-(2 ** 10) + 0.5") == "-1023.5"
    for bad, why in (
        ("__import__('os').system('x')", "function calls"),
        ("x + 1", "names"),
        ("(1).real", "attributes"),
        ("'a' * 3", "text"),
        ("2 ** 0.5", "whole numbers"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 300, "longer than"),
        ("1e999 - 1", "finite"),
    ):
        assert calculate(bad).startswith("error:") and why in calculate(bad), (bad, calculate(bad))


def test_huge_numbers_are_refused_before_the_work_is_done():
    start = time.monotonic()
    for expression in ("9 ** 9 ** 9", "2 ** 100000000", "10 ** 99 * 10 ** 5", "(10 ** 50) ** 3"):
        assert f"more than {MAX_DIGITS} digits" in calculate(expression), expression
    assert time.monotonic() - start < 1
