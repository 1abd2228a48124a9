"""Evaluating argument expressions: integers, floats, booleans, HxW pairs, words.

Evaluation happens where block parameters are known (block expansion), so it
takes an environment. A bare word that is not a parameter evaluates to itself
(a symbol such as `same` or `bilinear`); `true`/`false` are booleans.
"""
from __future__ import annotations

from typing import Any, Mapping

from dsl.ast import BinOp, Dims, Expr, Name, Neg, Num, Pos, Str
from dsl.limits import MAX_INT


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
    if isinstance(expr, BinOp):
        # Walk a left-associative chain (a + b + c ...) in a loop: a sum of
        # 10,000 terms is legal. Only right operands recurse, and the parser
        # bounds how deeply those nest (MAX_EXPR_DEPTH).
        spine = []
        while isinstance(expr, BinOp):
            spine.append(expr)
            expr = expr.left
        value = evaluate(expr, env)
        for op in reversed(spine):
            value = _binop(op, value, evaluate(op.right, env))
        return value
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
    raise TypeError(f"not an expression: {expr!r}")


def _binop(expr: BinOp, a: Any, b: Any) -> Any:
    if not (_number(a) and _number(b)):
        bad = a if not _number(a) else b
        raise EvalError(f"'{expr.op}' needs numbers, got {describe(bad)}", expr.pos)
    if expr.op in ("/", "//", "%") and b == 0:
        raise EvalError("division by zero", expr.pos)
    try:
        value = _ARITH[expr.op](a, b)
    except OverflowError:
        raise EvalError(f"'{expr.op}': result too large", expr.pos) from None
    # Integers stay within +-MAX_INT, so no product of many factors grows into a
    # number that takes seconds to compute or cannot be printed.
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise EvalError(
            f"'{expr.op}': result too large",
            expr.pos,
            "integers in fusenet lie within +-(2**63 - 1) (MAX_INT in dsl/limits.py)",
        )
    return value


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
        return f'string "{v}"' if len(v) <= 40 else f'string "{v[:37]}..."'
    if isinstance(v, tuple):
        return "dimensions " + "x".join(map(str, v))
    return repr(v)
