"""The `calculate[...]` tool: bounded, exact arithmetic on untrusted text.

The text is parsed with `ast` and only an allow-list of nodes is evaluated, over exact fractions;
nothing is ever passed to eval/exec. Every failure is returned as an observation starting with
"Error: ", never raised, so a bad action cannot crash the agent loop.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import time
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction

MAX_INPUT_CHARS = 200
MAX_RESULT_DIGITS = 1000
MAX_FACTORIAL = 450  # 450! has 1001 digits
# Nested operations (syntax-tree depth). The evaluator recurses once per level, so without a bound of
# its own a deep input ("-" * 199 + "1") would fail or not depending on how deep the caller's stack
# already is. 100 admits every sum or product that fits in MAX_INPUT_CHARS ("1+1+...+1").
MAX_DEPTH = 100
TIME_LIMIT_S = 1.0
DECIMALS = 6

_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type, Callable[[Fraction], Fraction]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}

# Teacher spellings rewritten to Python syntax before parsing, in this order.
_SPELLINGS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"[$€£]"), ""),
    (re.compile(r"(?<=\d),(?=\d{3}(?!\d))"), ""),  # "1,800" -> "1800"
    (re.compile(r"\s*=\s*\??\s*$"), ""),  # trailing "=" or "= ?"
    (re.compile(r"[×·]|(?<=[\d)])\s*[xX]\s*(?=[\d(.])"), "*"),
    (re.compile(r"÷"), "/"),
    (re.compile(r"[−–]"), "-"),
    (re.compile(r"\^"), "**"),
    (re.compile(r"(\d+)\s*!"), r"factorial(\1)"),
    # "15%" followed by an operator or the end is a percentage; "17 % 5" stays modulo.
    (re.compile(r"(\d+(?:\.\d+)?)%(?=\s*(?:$|[)+*/-]))"), r"(\1/100)"),
]


class CalculatorError(Exception):
    """A reason the expression cannot be evaluated; becomes an "Error: ..." observation."""


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result as an observation string.

    Accepted: numbers, + - * / // % ** (also "^"), unary +/-, parentheses and the functions
    sqrt, abs, round, floor, ceil, factorial (also "5!"). Common spellings are accepted:
    "1,800" (a comma followed by exactly three digits is a thousands separator), "$", "x" or "×"
    for multiply, "÷", a trailing "=", and "15%" for 15/100 when an operator or the end follows.

    Output: an integer result as digits ("42", "2" for "6/3"); any other result rounded half-up
    to at most 6 decimals with trailing zeros dropped ("2.5", "0.333333"), or in scientific
    notation with 6 significant digits when that rounding would show 0 ("3.33333e-7").

    Bounds: input over 200 characters, nesting deeper than 100 levels, results over 1000 digits
    (checked before computing a power or factorial) and work past 1 s all give "Error: ...".
    Never raises.
    """
    if not isinstance(expression, str):
        return "Error: the expression must be text"
    if len(expression) > MAX_INPUT_CHARS:
        return f"Error: expression longer than {MAX_INPUT_CHARS} characters"
    text = expression.strip()
    for pattern, replacement in _SPELLINGS:
        text = pattern.sub(replacement, text)
    if not text:
        return "Error: empty expression"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return f"Error: cannot parse {expression.strip()!r} as arithmetic"
    try:
        value = _Evaluator(time.monotonic() + TIME_LIMIT_S).visit(tree.body)
        return _format(value)
    except CalculatorError as exc:
        return f"Error: {exc}"
    except ZeroDivisionError:
        return "Error: division by zero"
    except (ArithmeticError, ValueError, TypeError, RecursionError) as exc:
        return f"Error: {type(exc).__name__}: {exc}"


def _digits(value: int) -> int:
    """Decimal digits of |value|, from its bit length (cheap even for huge numbers)."""
    return int(abs(value).bit_length() * 0.30103) + 1


def _check_size(value: Fraction) -> Fraction:
    if max(_digits(value.numerator), _digits(value.denominator)) > MAX_RESULT_DIGITS:
        raise CalculatorError(f"result has more than {MAX_RESULT_DIGITS} digits")
    return value


def _from_float(value: float) -> Fraction:
    if not math.isfinite(value):
        raise CalculatorError("result is too large")
    return _check_size(Fraction(value))


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if base in (0, 1, -1) and exponent.denominator == 1:
        if base == 0 and exponent < 0:
            raise ZeroDivisionError
        return base ** int(exponent)
    # Estimate the size first: computing 10**100000 just to reject it would take too long.
    magnitude = math.log10(max(abs(base.numerator), base.denominator))
    exact_fits = exponent.denominator == 1 and magnitude * abs(float(exponent)) <= MAX_RESULT_DIGITS
    if exact_fits:
        return _check_size(base ** int(exponent))
    if base.denominator == 1 and exponent.denominator == 1:
        raise CalculatorError(f"result has more than {MAX_RESULT_DIGITS} digits")
    if base < 0 and exponent.denominator != 1:
        raise CalculatorError("fractional power of a negative number")
    # Non-integer bases (1.0001 ** 365) and roots are computed in floating point.
    try:
        return _from_float(float(base) ** float(exponent))
    except OverflowError:
        raise CalculatorError("result is too large") from None


def _integer(value: Fraction, name: str) -> int:
    if value.denominator != 1:
        raise CalculatorError(f"{name} needs a whole number")
    return value.numerator


def _sqrt(value: Fraction) -> Fraction:
    if value < 0:
        raise CalculatorError("square root of a negative number")
    num, den = math.isqrt(value.numerator), math.isqrt(value.denominator)
    if num * num == value.numerator and den * den == value.denominator:
        return Fraction(num, den)
    return _from_float(math.sqrt(value))


def _factorial(value: Fraction) -> Fraction:
    n = _integer(value, "factorial")
    if n < 0:
        raise CalculatorError("factorial of a negative number")
    if n > MAX_FACTORIAL:
        raise CalculatorError(f"factorial argument above {MAX_FACTORIAL}")
    return Fraction(math.factorial(n))


def _round(value: Fraction, ndigits: Fraction = Fraction(0)) -> Fraction:
    """Round half away from zero, as people do by hand (Python's round() rounds half to even)."""
    places = _integer(ndigits, "round's digits")
    if abs(places) > MAX_RESULT_DIGITS:
        raise CalculatorError("too many digits to round to")
    scale = Fraction(10) ** places
    magnitude = Fraction(math.floor(abs(value) * scale + Fraction(1, 2))) / scale
    return magnitude if value >= 0 else -magnitude


_FUNCTIONS: dict[str, tuple[Callable[..., Fraction], int, int]] = {  # name: (fn, min args, max args)
    "sqrt": (_sqrt, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "floor": (lambda v: Fraction(math.floor(v)), 1, 1),
    "ceil": (lambda v: Fraction(math.ceil(v)), 1, 1),
    "factorial": (_factorial, 1, 1),
}


class _Evaluator(ast.NodeVisitor):
    """Evaluates the allow-listed nodes; any other node is an error."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.depth = 0

    def visit(self, node: ast.AST) -> Fraction:
        # Each step is bounded by the size checks, so checking the clock between steps enforces
        # the time limit without threads or signals.
        if time.monotonic() > self.deadline:
            raise CalculatorError(f"took longer than {TIME_LIMIT_S:g} s")
        if self.depth >= MAX_DEPTH:
            raise CalculatorError(f"expression nested deeper than {MAX_DEPTH} levels")
        self.depth += 1
        try:
            return super().visit(node)
        finally:
            self.depth -= 1

    def generic_visit(self, node: ast.AST) -> Fraction:
        raise CalculatorError(f"unsupported syntax ({type(node).__name__}); use numbers and + - * / ** ( )")

    def visit_Constant(self, node: ast.Constant) -> Fraction:
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"unsupported value {node.value!r}")
        if isinstance(node.value, float):
            if not math.isfinite(node.value):
                raise CalculatorError("number is too large")
            return _check_size(Fraction(repr(node.value)))  # repr gives the literal's exact decimal
        return _check_size(Fraction(node.value))

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Fraction:
        op = _UNARY.get(type(node.op))
        if op is None:
            raise CalculatorError(f"unsupported operator ({type(node.op).__name__})")
        return op(self.visit(node.operand))

    def visit_BinOp(self, node: ast.BinOp) -> Fraction:
        left, right = self.visit(node.left), self.visit(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        op = _BINARY.get(type(node.op))
        if op is None:
            raise CalculatorError(f"unsupported operator ({type(node.op).__name__})")
        return _check_size(Fraction(op(left, right)))

    def visit_Call(self, node: ast.Call) -> Fraction:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCTIONS or node.keywords:
            raise CalculatorError(f"unsupported function; available: {', '.join(_FUNCTIONS)}")
        fn, lo, hi = _FUNCTIONS[name]
        if not lo <= len(node.args) <= hi:
            raise CalculatorError(f"{name} takes {lo if lo == hi else f'{lo} or {hi}'} argument(s)")
        return _check_size(Fraction(fn(*(self.visit(arg) for arg in node.args))))

    def visit_Name(self, node: ast.Name) -> Fraction:
        raise CalculatorError(f"unknown name {node.id!r}; use numbers only")


def _format(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec = _digits(value.numerator) + DECIMALS + 10  # enough to hold every kept digit
        rounded = (Decimal(value.numerator) / Decimal(value.denominator)).quantize(
            Decimal(1).scaleb(-DECIMALS), rounding=ROUND_HALF_UP
        )
    if rounded == 0:
        with localcontext() as ctx:
            ctx.prec = DECIMALS
            return format((Decimal(value.numerator) / Decimal(value.denominator)).normalize(), "g")
    return format(rounded, "f").rstrip("0").rstrip(".")
