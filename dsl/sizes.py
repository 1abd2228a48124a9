"""Layer counts known from the source, before anything is expanded.

engine/ir/expand.py asks how many layers a repeat's body or a block expands to
before it expands them, so that a program that grows exponentially (nested
repeats, blocks calling blocks twice) is refused before any of it is built.
"""
from __future__ import annotations

from typing import Mapping

from dsl import ast
from dsl.limits import MAX_CALL_DEPTH, MAX_LAYERS, MAX_NESTING, MAX_REPEAT


class StaticSize:
    """How many layers a body expands to, known before expanding it, so that
    an exponential program is refused before any of it is built.

    Exact for a body whose repeat counts are written as numbers (every layer
    and call counted as if it binds without error); None when a count depends
    on a block parameter, where the expander's running count is the guard.
    Sizes saturate just past MAX_LAYERS; bodies and blocks are memoised, so
    the cost is one walk of the program. The walk recurses, but no deeper than
    the expander itself goes (MAX_NESTING bodies, MAX_CALL_DEPTH calls): past
    that it answers None and the expander reports the nesting."""

    CAP = MAX_LAYERS + 2

    def __init__(self, blocks: Mapping[str, ast.BlockDef]):
        self.blocks = blocks
        self.memo: dict[int, int | None] = {}  # id(body) -> size; bodies live as long as the program
        self.open: set[int] = set()  # bodies being sized: a recursive block has no size

    def body(self, stmts, calls: int = 0, depth: int = 0) -> int | None:
        """`calls` block calls and `depth` bodies deep (counted through calls)."""
        key = id(stmts)
        if key in self.memo:
            return self.memo[key]
        if key in self.open or calls > MAX_CALL_DEPTH or depth > MAX_NESTING:
            return None  # recursion, or nesting the expander refuses anyway
        self.open.add(key)
        total: int | None = 0
        for stmt in stmts:
            n = self.statement(stmt, calls, depth)
            if n is None:
                total = None
                break
            total = min(total + n, self.CAP)
        self.open.discard(key)
        self.memo[key] = total
        return total

    def statement(self, stmt, calls: int, depth: int) -> int | None:
        if isinstance(stmt, ast.Chain):
            total = 0
            for layer in stmt.layers:
                block = self.blocks.get(layer.name)
                n = 1 if block is None else self.body(block.body, calls + 1, depth)
                if n is None:
                    return None
                total += n
            return total
        if isinstance(stmt, ast.Residual):
            body = self.body(stmt.body, calls, depth + 1)
            short = self.body(stmt.shortcut, calls, depth + 1) if stmt.shortcut is not None else 0
            return None if body is None or short is None else body + short + 1
        if isinstance(stmt, ast.Repeat):
            if not isinstance(stmt.count, ast.Num):
                return None  # a parameter, or an expression: known when expanded
            count = stmt.count.value
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_REPEAT:
                return 0  # refused when expanded: it makes nothing
            body = self.body(stmt.body, calls, depth + 1)
            return None if body is None else min(count * body, self.CAP)
        return 0  # input
