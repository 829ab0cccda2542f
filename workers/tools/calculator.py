"""`calculator`: safe arithmetic by walking the parsed expression tree (never eval/exec).

Only numbers, arithmetic operators, comparisons, the constants pi/e/tau and a fixed list of math
functions are allowed. Integer sizes, exponents, expression length and tree size are capped so a
model (or a prompt injection it read) cannot make a worker spin on a huge computation.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

from pydantic import BaseModel, Field

from workers.tools.registry import Tool, ToolContext

MAX_EXPRESSION_CHARS = 2_000
MAX_NODES = 500
# Python refuses to print ints above 4300 digits; stay below that (13_000 bits ~ 3_900 digits).
MAX_INT_BITS = 13_000
MAX_FACTOR_ARG = 1_000

Number = int | float


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate; the message is for the model."""


class CalculatorArgs(BaseModel):
    expression: str = Field(
        min_length=1,
        max_length=MAX_EXPRESSION_CHARS,
        description=(
            "One arithmetic expression in Python syntax, e.g. '(3.5 + 2) * 4 ** 2 / sqrt(2)' or "
            "'log(1000, 10) - floor(7 / 2)'. Use ** for powers (not ^). No variables or statements."
        ),
    )


def _check_int(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result too large (integers are limited to {MAX_INT_BITS} bits)")
    return value


def _safe_pow(base: Number, exp: Number) -> Number:
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
        # bits(base ** exp) ~ exp * bits(base): refuse before computing it.
        if exp * base.bit_length() > MAX_INT_BITS + base.bit_length():
            raise CalculatorError(f"result too large (integers are limited to {MAX_INT_BITS} bits)")
        return base**exp
    if isinstance(base, int) and isinstance(exp, int) and exp < 0 and base == 0:
        raise CalculatorError("division by zero (0 raised to a negative power)")
    try:
        result = base**exp
    except OverflowError:
        raise CalculatorError("result too large (float overflow)") from None
    if isinstance(result, complex):
        raise CalculatorError("result is a complex number (negative base with fractional exponent)")
    return result


def _safe_mul(a: Number, b: Number) -> Number:
    if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
        raise CalculatorError(f"result too large (integers are limited to {MAX_INT_BITS} bits)")
    return a * b


def _div(a: Number, b: Number) -> Number:
    if b == 0:
        raise CalculatorError("division by zero")
    return a / b


def _floordiv(a: Number, b: Number) -> Number:
    if b == 0:
        raise CalculatorError("division by zero")
    return a // b


def _mod(a: Number, b: Number) -> Number:
    if b == 0:
        raise CalculatorError("division by zero (modulo by zero)")
    return a % b


_BIN_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _safe_mul,
    ast.Div: _div,
    ast.FloorDiv: _floordiv,
    ast.Mod: _mod,
    ast.Pow: _safe_pow,
}
_UNARY_OPS: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CMP_OPS: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_OP_SYMBOL = {
    ast.BitXor: "'^' (use ** for powers)",
    ast.BitAnd: "'&'",
    ast.BitOr: "'|'",
    ast.LShift: "'<<'",
    ast.RShift: "'>>'",
    ast.MatMult: "'@'",
}

CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}


def _round(x: Number, ndigits: int | None = None) -> Number:
    if ndigits is not None and not isinstance(ndigits, int):
        raise CalculatorError("round(x, n): n must be an integer")
    return round(x) if ndigits is None else round(x, ndigits)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


def _factorial(n: Number) -> int:
    if not isinstance(n, int) or n < 0:
        raise CalculatorError("factorial(n) needs a non-negative integer")
    if n > MAX_FACTOR_ARG:
        raise CalculatorError(f"factorial(n) is limited to n <= {MAX_FACTOR_ARG}")
    return math.factorial(n)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "log": _log,
    "log10": math.log10,
    "log2": math.log2,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "abs": abs,
    "round": _round,
    "min": min,
    "max": max,
    "floor": math.floor,
    "ceil": math.ceil,
    "factorial": _factorial,
}


class _Evaluator:
    def eval(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise CalculatorError(f"literal {node.value!r} is not allowed; only numbers are")
            return _check_int(node.value)
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            if node.id in FUNCTIONS:
                raise CalculatorError(f"function {node.id!r} must be called, e.g. {node.id}(2)")
            raise CalculatorError(f"name {node.id!r} is not allowed")
        if isinstance(node, ast.BinOp):
            op = _BIN_OPS.get(type(node.op))
            if op is None:
                raise CalculatorError(f"operator {_OP_SYMBOL.get(type(node.op), type(node.op).__name__)} is not allowed")
            return _check_int(op(self.eval(node.left), self.eval(node.right)))
        if isinstance(node, ast.UnaryOp):
            uop = _UNARY_OPS.get(type(node.op))
            if uop is None:
                raise CalculatorError(f"unary operator {type(node.op).__name__} is not allowed")
            return uop(self.eval(node.operand))
        if isinstance(node, ast.Compare):
            left = self.eval(node.left)
            for cmp, right_node in zip(node.ops, node.comparators):
                cop = _CMP_OPS.get(type(cmp))
                if cop is None:
                    raise CalculatorError(f"comparison {type(cmp).__name__} is not allowed")
                right = self.eval(right_node)
                if not cop(left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute):
                raise CalculatorError("attribute access is not allowed")
            if not isinstance(node.func, ast.Name):
                raise CalculatorError("only calls of the listed math functions are allowed, e.g. sqrt(2)")
            name = node.func.id
            fn = FUNCTIONS.get(name)
            if fn is None:
                raise CalculatorError(f"name {name!r} is not allowed (functions: {', '.join(FUNCTIONS)})")
            if node.keywords:
                raise CalculatorError(f"{name}() takes positional arguments only")
            args = [self.eval(a) for a in node.args]
            try:
                return _check_int(fn(*args))
            except CalculatorError:
                raise
            except ZeroDivisionError:
                raise CalculatorError(f"division by zero in {name}()") from None
            except OverflowError:
                raise CalculatorError(f"result too large in {name}()") from None
            except (ValueError, TypeError) as e:
                raise CalculatorError(f"{name}(): {e}") from None
        if isinstance(node, ast.Attribute):
            raise CalculatorError("attribute access is not allowed")
        raise CalculatorError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def evaluate(expression: str) -> Number | bool:
    """Evaluate an arithmetic expression; raises CalculatorError with a message for the model."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression too long ({len(expression)} > {MAX_EXPRESSION_CHARS} characters)")
    text = expression.strip()
    if not text:
        raise CalculatorError("expression is empty")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"syntax error: {e.msg} (column {e.offset})") from None
    except (ValueError, MemoryError, RecursionError):
        raise CalculatorError("expression could not be parsed") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression too complex (more than {MAX_NODES} syntax nodes)")
    try:
        return _Evaluator().eval(tree)
    except RecursionError:
        raise CalculatorError("expression nested too deeply") from None
    except OverflowError:
        raise CalculatorError("result too large (float overflow)") from None
    except TypeError as e:
        raise CalculatorError(f"type error: {e}") from None


def format_number(value: Number | bool) -> str:
    """Integers exactly; floats with 15 significant digits so 0.1 + 0.2 reads 0.3."""
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return f"{int(value)}.0"
    return format(value, ".15g")


async def calculator_tool(args: CalculatorArgs, ctx: ToolContext) -> str:
    value = evaluate(args.expression)
    return format_number(value)


def make_calculator_tool() -> Tool:
    return Tool(
        name="calculator",
        description=(
            "Evaluate one arithmetic expression exactly and return its value. Supports numbers, "
            "+ - * / // % ** (power), unary minus, parentheses, comparisons (< <= == != >= >), the "
            "constants pi, e, tau, and the functions sqrt, log(x[, base]), log10, log2, exp, sin, cos, "
            "tan, asin, acos, atan (radians), abs, round(x[, n]), min, max, floor, ceil, factorial. "
            "Use it for any non-trivial arithmetic instead of computing in your head."
        ),
        args_model=CalculatorArgs,
        fn=calculator_tool,
    )
