"""The AST built in the LALR parser's reduce callbacks.

Lark calls one method per grammar rule as the rule is reduced, bottom up, with
the rule's children already built. No parse tree is made and nothing here
recurses, so a program of any depth is built in one iterative pass; the
callbacks also enforce the syntactic limits of dsl/limits.py (literal sizes,
expression depth, body nesting) where the offending construct is reduced, and
raise `SourceError` with a located diagnostic.
"""
from __future__ import annotations

import math

from lark import Token, Transformer

from dsl import ast
from dsl.ast import Pos
from dsl.errors import Diagnostic
from dsl.limits import MAX_EXPR_DEPTH, MAX_INT, MAX_NESTING


class SourceError(Exception):
    """A construct the grammar accepts but the language refuses (a literal out
    of range, nesting past a limit); the parser reports it like a syntax error."""

    def __init__(self, diagnostic: Diagnostic):
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic


def token_pos(tok: Token) -> Pos:
    return Pos(tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + len(tok))


def _span(start: Pos, end: Pos) -> Pos:
    return Pos(start.line, start.col, end.end_line, end.end_col)


def _int_literal(text: str, pos: Pos) -> int:
    # Refuse by length first: int() of a 5,000-digit string raises ValueError.
    digits = text.lstrip("0")
    if len(digits) > len(str(MAX_INT)) or (digits and int(digits) > MAX_INT):
        shown = text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"
        raise SourceError(
            Diagnostic(
                f"integer {shown} is too large",
                pos,
                f"integers in fusenet lie within +-(2**63 - 1) (MAX_INT in dsl/limits.py)",
            )
        )
    return int(text)


def _float_literal(text: str, pos: Pos) -> float:
    value = float(text)  # never raises for this token's syntax: too large is inf
    if not math.isfinite(value):
        shown = text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"
        raise SourceError(
            Diagnostic(
                f"number {shown} is too large for a 64-bit float",
                pos,
                "the largest float is about 1.8e308",
            )
        )
    return value


def number_value(tok: Token) -> int | float:
    text = str(tok)
    if "." in text or "e" in text or "E" in text:
        return _float_literal(text, token_pos(tok))
    return _int_literal(text, token_pos(tok))


def dims_values(tok: Token) -> tuple[int, ...]:
    pos = token_pos(tok)
    return tuple(_int_literal(v, pos) for v in str(tok).split("x"))


def _depth(e: ast.Expr) -> int:
    return e.depth if isinstance(e, (ast.BinOp, ast.Neg)) else 0


def _check_depth(depth: int, pos: Pos) -> int:
    if depth > MAX_EXPR_DEPTH:
        raise SourceError(
            Diagnostic(
                f"expression nested too deeply (more than {MAX_EXPR_DEPTH} levels)",
                pos,
                f"at most {MAX_EXPR_DEPTH} nested unary minuses and parenthesised operands "
                "(MAX_EXPR_DEPTH in dsl/limits.py); a long sum a + b + c ... is fine",
            )
        )
    return depth


def _nesting(stmt) -> int:
    """How many bodies deep a statement reaches: 0 for a chain."""
    if isinstance(stmt, ast.Residual):
        return 1 + max(stmt.body.depth, stmt.shortcut.depth if stmt.shortcut is not None else 0)
    if isinstance(stmt, ast.Repeat):
        return 1 + stmt.body.depth
    return 0


def _check_nesting(stmt, keyword: Token):
    if _nesting(stmt) > MAX_NESTING:
        raise SourceError(
            Diagnostic(
                f"'{keyword}' nested too deeply (more than {MAX_NESTING} levels of residual/repeat bodies)",
                token_pos(keyword),
                f"bodies nest at most {MAX_NESTING} deep (MAX_NESTING in dsl/limits.py); use a block instead",
            )
        )
    return stmt


class Builder(Transformer):
    """One method per rule or alias of grammar.lark; each gets the rule's kept
    children (named terminals as Tokens, `[...]` left out as None)."""

    def start(self, items):
        return items

    # -- expressions ------------------------------------------------------------
    def number(self, children):
        (tok,) = children
        return ast.Num(number_value(tok), str(tok), token_pos(tok))

    def dims(self, children):
        (tok,) = children
        return ast.Dims(dims_values(tok), token_pos(tok))

    def name(self, children):
        (tok,) = children
        return ast.Name(str(tok), token_pos(tok))

    def string(self, children):
        (tok,) = children
        return ast.Str(str(tok)[1:-1], token_pos(tok))

    def neg(self, children):
        minus, operand = children
        pos = _span(token_pos(minus), operand.pos)
        return ast.Neg(operand, pos, _check_depth(_depth(operand) + 1, pos))

    def _binop(self, op, left, right):
        pos = _span(left.pos, right.pos)
        # A left-associative chain (a + b + c) stays one level deep: only the
        # right operand, a nested subexpression, adds to the depth.
        depth = _check_depth(max(_depth(left), _depth(right) + 1), pos)
        return ast.BinOp(op, left, right, pos, depth)

    def add(self, children):
        return self._binop("+", *children)

    def sub(self, children):
        left, _minus, right = children
        return self._binop("-", left, right)

    def mul(self, children):
        return self._binop("*", *children)

    def div(self, children):
        return self._binop("/", *children)

    def floordiv(self, children):
        return self._binop("//", *children)

    def mod(self, children):
        return self._binop("%", *children)

    # -- layers and statements --------------------------------------------------------
    def keyword(self, children):
        name, value = children
        return ast.Keyword(str(name), value, _span(token_pos(name), value.pos))

    def layer(self, children):
        name, *rest = children
        args = tuple(a for a in rest if not isinstance(a, ast.Keyword))
        kwargs = tuple(a for a in rest if isinstance(a, ast.Keyword))
        return ast.Layer(str(name), args, kwargs, token_pos(name))

    def chain(self, children):
        first, last = children[0], children[-1]
        end = max((a.pos for a in last.args + last.kwargs), key=lambda p: (p.end_line, p.end_col), default=last.pos)
        return ast.Chain(tuple(children), None, _span(first.pos, end))

    def binding(self, children):
        name, chain = children
        return ast.Chain(chain.layers, str(name), _span(token_pos(name), chain.pos))

    def input(self, children):
        keyword, tok = children
        if tok.type == "NUMBER":
            if not isinstance(number_value(tok), int):
                raise SourceError(
                    Diagnostic(
                        f"input size {tok} is not an integer",
                        token_pos(tok),
                        "write `input F` for F features or `input CxHxW` for an image",
                    )
                )
            dims = ast.Dims((number_value(tok),), token_pos(tok))
        else:
            dims = ast.Dims(dims_values(tok), token_pos(tok))
        return ast.Input(dims, _span(token_pos(keyword), dims.pos))

    def body(self, children):
        *stmts, close = children
        body = ast.Body(stmts)
        body.close_line = close.line
        body.close_pos = token_pos(close)
        body.depth = max((_nesting(s) for s in stmts), default=0)
        return body

    def residual(self, children):
        keyword, body, shortcut = children
        end = (shortcut if shortcut is not None else body).close_pos
        return _check_nesting(ast.Residual(body, shortcut, _span(token_pos(keyword), end)), keyword)

    def repeat(self, children):
        keyword, count, body = children
        return _check_nesting(ast.Repeat(count, body, _span(token_pos(keyword), body.close_pos)), keyword)

    def param(self, children):
        name, default = children
        return ast.Param(str(name), default, token_pos(name))

    def block_def(self, children):
        name, *params, body = children
        params = tuple(p for p in params if p is not None)
        return ast.BlockDef(str(name), params, body, token_pos(name))

    def network(self, children):
        name, body = children
        return ast.Network(str(name), body, token_pos(name))

    def train(self, children):
        keyword, body = children
        return ast.TrainSection(body, _span(token_pos(keyword), body.close_pos))
