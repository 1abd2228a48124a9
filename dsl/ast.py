"""The fusenet syntax tree: frozen dataclasses that remember where they came from.

Positions are excluded from equality, so two programs that differ only in
layout compare equal: that is what `parse(fmt(x)) == parse(x)` relies on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Pos:
    """1-based line and column of a construct's first character, and its end."""

    line: int
    col: int
    end_line: int = 0
    end_col: int = 0  # exclusive; 0 when unknown

    def __str__(self) -> str:
        return f"{self.line}:{self.col}"


NOWHERE = Pos(0, 0)


def _pos() -> Pos:
    return field(default=NOWHERE, compare=False, repr=False)


# ---- expressions -----------------------------------------------------------


@dataclass(frozen=True)
class Num:
    value: int | float
    text: str = field(default="", compare=False)  # as written, kept for fmt
    pos: Pos = _pos()


@dataclass(frozen=True)
class Dims:
    """`1x8x8`, `3x3`: an HxW pair or a CxHxW shape; `input 20` holds (20,)."""

    values: tuple[int, ...]
    pos: Pos = _pos()


@dataclass(frozen=True)
class Name:
    """A bare word: a block parameter, `true`/`false`, or a symbol like `same`."""

    id: str
    pos: Pos = _pos()


@dataclass(frozen=True)
class Str:
    value: str
    pos: Pos = _pos()


def _nesting() -> int:
    """How deeply an operator nests (parser-set, compared by nobody): see
    MAX_EXPR_DEPTH in dsl/limits.py. 0 for a node built by hand."""
    return field(default=0, compare=False, repr=False)


class _Operator:
    """Equality and hashing for operator nodes, iterative: a sum of 10,000
    terms is a legal program, and the dataclass-generated methods would recurse
    once per term."""

    def __eq__(self, other):
        stack = [(self, other)]
        while stack:
            a, b = stack.pop()
            if type(a) is not type(b):
                return False
            if isinstance(a, BinOp):
                if a.op != b.op:
                    return False
                stack += [(a.left, b.left), (a.right, b.right)]
            elif isinstance(a, Neg):
                stack.append((a.operand, b.operand))
            elif a != b:
                return False
        return True

    def __hash__(self):
        parts, stack = [], [self]
        while stack:
            e = stack.pop()
            if isinstance(e, BinOp):
                parts.append(e.op)
                stack += [e.right, e.left]
            elif isinstance(e, Neg):
                parts.append("neg")
                stack.append(e.operand)
            else:
                parts.append(e)
        return hash(tuple(parts))


@dataclass(frozen=True, eq=False)
class BinOp(_Operator):
    op: str  # + - * / // %
    left: "Expr"
    right: "Expr"
    pos: Pos = _pos()
    depth: int = _nesting()


@dataclass(frozen=True, eq=False)
class Neg(_Operator):
    operand: "Expr"
    pos: Pos = _pos()
    depth: int = _nesting()


Expr = Union[Num, Dims, Name, Str, BinOp, Neg]


# ---- statements ------------------------------------------------------------


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Expr
    pos: Pos = _pos()


@dataclass(frozen=True)
class Layer:
    """`name positional... key=value...`: a layer use or a train option."""

    name: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[Keyword, ...] = ()
    pos: Pos = _pos()

    def kwarg(self, name: str) -> Keyword | None:
        return next((k for k in self.kwargs if k.name == name), None)


@dataclass(frozen=True)
class Chain:
    """`a -> b -> c`, optionally bound to a tap name: `e1 = a -> b`."""

    layers: tuple[Layer, ...]
    bind: str | None = None
    pos: Pos = _pos()


@dataclass(frozen=True)
class Input:
    dims: Dims
    pos: Pos = _pos()


@dataclass(frozen=True)
class Residual:
    body: tuple["Stmt", ...]
    shortcut: tuple["Stmt", ...] | None = None  # None: identity
    pos: Pos = _pos()


@dataclass(frozen=True)
class Repeat:
    count: Expr
    body: tuple["Stmt", ...]
    pos: Pos = _pos()


Stmt = Union[Input, Chain, Residual, Repeat]


class Body(tuple):
    """The statements of a `{ ... }`: a plain tuple (it compares equal to one)
    that also remembers the line of its closing brace, so the formatter can
    keep comments written just before that brace inside it."""

    close_line: int = 0  # 0: unknown (a body built by hand)
    close_pos: Pos = NOWHERE  # the closing brace
    depth: int = 0  # residual/repeat bodies nested inside it (parser-set; see MAX_NESTING)


@dataclass(frozen=True)
class Param:
    name: str
    default: Expr | None = None
    pos: Pos = _pos()


@dataclass(frozen=True)
class BlockDef:
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    pos: Pos = _pos()


@dataclass(frozen=True)
class Network:
    name: str
    body: tuple[Stmt, ...]
    pos: Pos = _pos()


@dataclass(frozen=True)
class TrainSection:
    options: tuple[Layer, ...]
    pos: Pos = _pos()


@dataclass(frozen=True)
class Comment:
    """A `# ...` comment, kept so the formatter can put it back."""

    text: str
    line: int
    own_line: bool  # True: on a line of its own; False: after code


@dataclass(frozen=True)
class Program:
    blocks: tuple[BlockDef, ...]
    network: Network | None
    train: TrainSection | None
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)
    source: str = field(default="", compare=False, repr=False)
    filename: str = field(default="<string>", compare=False, repr=False)
