"""Evaluating argument expressions: integers, floats, booleans, HxW pairs, words.

Evaluation happens where block parameters are known (block expansion), so it
takes an environment. A bare word that is not a parameter evaluates to itself
(a symbol such as `same` or `bilinear`); `true`/`false` are booleans.
"""
from __future__ import annotations

from typing import Any, Mapping

from dsl.ast import BinOp, Dims, Expr, Name, Neg, Num, Pos, Str


class Symbol(str):
    """A bare word used as a value (`same`, `bilinear`, `sgd`)."""


class EvalError(Exception):
    def __init__(self, message: str, pos: Pos, hint: str | None = None):
        super().__init__(message)
        self.message, self.pos, self.hint = message, pos, hint


_ARITH = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def evaluate(expr: Expr, env: Mapping[str, Any]) -> Any:
    if isinstance(expr, Num):
        return expr.value
    if isinstance(expr, Dims):
        return tuple(expr.values)
    if isinstance(expr, Str):
        return expr.value
    if isinstance(expr, Name):
        if expr.id in env:
            return env[expr.id]
        if expr.id in ("true", "false"):
            return expr.id == "true"
        return Symbol(expr.id)
    if isinstance(expr, Neg):
        v = evaluate(expr.operand, env)
        if not _number(v):
            raise EvalError(f"cannot negate {describe(v)}", expr.pos)
        return -v
    if isinstance(expr, BinOp):
        a, b = evaluate(expr.left, env), evaluate(expr.right, env)
        if not (_number(a) and _number(b)):
            bad = a if not _number(a) else b
            raise EvalError(f"'{expr.op}' needs numbers, got {describe(bad)}", expr.pos)
        if expr.op in ("/", "//", "%") and b == 0:
            raise EvalError("division by zero", expr.pos)
        try:
            return _ARITH[expr.op](a, b)
        except OverflowError:
            raise EvalError(f"'{expr.op}': result too large", expr.pos) from None
    raise TypeError(f"not an expression: {expr!r}")


def describe(v: Any) -> str:
    """How a value is named in error messages."""
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"integer {v}"
    if isinstance(v, float):
        return f"number {v:g}"
    if isinstance(v, Symbol):
        return f"name '{v}'"
    if isinstance(v, str):
        return f'string "{v}"'
    if isinstance(v, tuple):
        return "dimensions " + "x".join(map(str, v))
    return repr(v)
