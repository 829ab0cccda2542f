"""The calculator: correct arithmetic, and clear refusals of anything that is not arithmetic."""

from __future__ import annotations

import math

import pytest

from workers.tools import build_registry
from workers.tools.calculator import CalculatorError, MAX_EXPRESSION_CHARS, evaluate, format_number
from workers.tools.registry import ToolContext


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("-3 ** 2", -9),
        ("+4 - -4", 8),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("7 / 2", 3.5),
        ("sqrt(16) + abs(-2)", 6.0),
        ("log(1000, 10)", pytest.approx(3.0)),
        ("log10(1e6)", 6.0),
        ("exp(0) + sin(0) + cos(0)", 2.0),
        ("round(3.14159, 2)", 3.14),
        ("round(2.5)", 2),
        ("min(4, 2, 8) + max(1, 9)", 11),
        ("floor(2.7) + ceil(2.1)", 5),
        ("pi", math.pi),
        ("2 * e", 2 * math.e),
        ("3 < 4 <= 4", True),
        ("1 == 2", False),
        ("factorial(10)", 3628800),
        ("1_000_000 * 3", 3_000_000),
    ],
)
def test_correct_results(expr: str, expected: object) -> None:
    assert evaluate(expr) == expected


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("os", "name 'os' is not allowed"),
        ("__import__('os')", "name '__import__' is not allowed"),
        ("__import__('os').system('id')", "attribute access is not allowed"),
        ("(1).__class__", "attribute access is not allowed"),
        ("1 / 0", "division by zero"),
        ("5 // 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("2 ^ 3", "use ** for powers"),
        ("'a' * 3", "literal 'a' is not allowed"),
        ("[1, 2]", "List is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("x = 1", "syntax error"),
        ("sqrt(-1)", "sqrt(): math domain error"),
        ("sqrt", "must be called"),
        ("round(x) + 1", "name 'x' is not allowed"),
        ("round(1.5, ndigits=1)", "positional arguments only"),
        ("9 ** 9 ** 9", "result too large"),
        ("10 ** 100000", "result too large"),
        ("2.0 ** 100000", "float overflow"),
        ("exp(1000)", "result too large"),
        ("factorial(100000)", "limited to n <= 1000"),
        ("(-8) ** 0.5", "complex"),
        ("1 if 2 else 3", "IfExp is not allowed"),
    ],
)
def test_refusals_with_clear_messages(expr: str, message: str) -> None:
    with pytest.raises(CalculatorError) as info:
        evaluate(expr)
    assert message in str(info.value)


def test_big_intermediate_integers_are_refused() -> None:
    # Each step is small in characters but the product keeps doubling in size.
    expr = "*".join(["(10 ** 900)"] * 20)
    with pytest.raises(CalculatorError, match="result too large"):
        evaluate(expr)
    assert evaluate("2 ** 1000 > 10 ** 300") is True


def test_long_and_complex_expressions_are_refused() -> None:
    with pytest.raises(CalculatorError, match="too long"):
        evaluate("1+" * MAX_EXPRESSION_CHARS + "1")
    with pytest.raises(CalculatorError, match="too complex"):
        evaluate("+".join(["1"] * 400))
    with pytest.raises(CalculatorError):
        evaluate("(" * 300 + "1" + ")" * 300)


def test_format_number() -> None:
    assert format_number(0.1 + 0.2) == "0.3"
    assert format_number(4.0) == "4.0"
    assert format_number(12) == "12"
    assert format_number(1e300) == "1e+300"
    assert format_number(True) == "True"


async def test_as_a_registry_tool() -> None:
    registry = build_registry()
    ctx = ToolContext(agent_id="a")
    out = await registry.call("calculator", '{"expression": "(2 + 3) * 4 / 8"}', ctx, 5.0)
    assert (out.content, out.is_error) == ("2.5", False)
    out = await registry.call("calculator", '{"expression": "open(\'/etc/passwd\')"}', ctx, 5.0)
    assert out.is_error and "name 'open' is not allowed" in out.content
    out = await registry.call("calculator", '{"expr": "1"}', ctx, 5.0)
    assert out.is_error and "expression" in out.content
    spec = registry.get("calculator").spec()
    assert spec.parameters["required"] == ["expression"]
    assert "description" in spec.parameters["properties"]["expression"]
