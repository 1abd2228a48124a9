"""AST to canonical text: 4-space indents, one statement per line, minimal
parentheses, numbers as written, comments kept in place.

parse(format_program(p)) == p for every program p (positions aside).
"""
from __future__ import annotations

from dsl import ast

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2}
_END = 10**9  # a line number past the end of any file


def format_expr(e: ast.Expr, parent_prec: int = 0, right: bool = False) -> str:
    if isinstance(e, ast.BinOp):
        return _format_chain(e, parent_prec, right)
    if isinstance(e, ast.Num):
        return e.text or repr(e.value)
    if isinstance(e, ast.Dims):
        return "x".join(map(str, e.values))
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Str):
        return f'"{e.value}"'
    if isinstance(e, ast.Neg):
        return "-" + format_expr(e.operand, 3)
    raise TypeError(e)


def _format_chain(e: ast.BinOp, parent_prec: int, right: bool) -> str:
    """A BinOp and the BinOps down its left side, in a loop (a sum of 10,000
    terms is legal); only right operands recurse, and the parser bounds their
    depth. Parentheses where precedence or left associativity needs them."""
    spine = []  # outermost first
    node: ast.Expr = e
    while isinstance(node, ast.BinOp):
        spine.append(node)
        node = node.left
    text = format_expr(node, _PREC[spine[-1].op])
    for k in range(len(spine) - 1, -1, -1):
        op = spine[k]
        prec = _PREC[op.op]
        text = f"{text} {op.op} {format_expr(op.right, prec, right=True)}"
        # the enclosing context: the next BinOp up the spine (as its left
        # operand), or the caller's for the outermost
        outer_prec, outer_right = (_PREC[spine[k - 1].op], False) if k else (parent_prec, right)
        # left-associative: a right operand of equal precedence needs parentheses
        if prec < outer_prec or (outer_right and prec == outer_prec):
            text = f"({text})"
    return text


def _positional(e: ast.Expr, first: bool = False) -> str:
    text = format_expr(e)
    # After the layer's name a leading '-' is a sign; after an argument it would
    # read as a binary minus, so a later negative positional keeps parentheses.
    return f"({text})" if text.startswith("-") and not first else text


def format_layer(layer: ast.Layer) -> str:
    parts = [layer.name]
    parts += [_positional(a, first=k == 0) for k, a in enumerate(layer.args)]
    parts += [f"{k.name}={format_expr(k.value)}" for k in layer.kwargs]
    return " ".join(parts)


class _Writer:
    def __init__(self, comments: tuple[ast.Comment, ...]):
        self.lines: list[str] = []
        self.pending = sorted(comments, key=lambda c: c.line)

    def _own_line_comments_before(self, line: int, indent: str) -> None:
        while self.pending and self.pending[0].own_line and self.pending[0].line < line:
            comment = self.pending.pop(0)
            self.lines.append(indent + comment.text)
            # At the top level a blank line after a comment (a file's header
            # comment, a section heading) is kept: it separates the comment from
            # what follows rather than describing it.
            following = self.pending[0].line if self.pending and self.pending[0].line < line else line
            if not indent and comment.line + 1 < following < _END:
                self.lines.append("")

    def emit(self, text: str, line: int, indent: str) -> None:
        self._own_line_comments_before(line, indent)
        trailing = ""
        if self.pending and not self.pending[0].own_line and self.pending[0].line == line:
            trailing = "  " + self.pending.pop(0).text
        self.lines.append(indent + text + trailing)

    def flush_until(self, line: int, indent: str) -> None:
        self._own_line_comments_before(line, indent)
        # drop stray trailing comments we could not place (lines not emitted)
        while self.pending and not self.pending[0].own_line and self.pending[0].line < line:
            self.lines.append(indent + self.pending.pop(0).text)

    def body(self, stmts, indent: str) -> None:
        for s in stmts:
            self.stmt(s, indent)
        close_line = _close(stmts)
        self.flush_until(close_line if close_line else _END, indent)

    def close(self, text: str, stmts, indent: str) -> None:
        """A closing line (`}`, `} shortcut {`), with a comment written after that brace."""
        self.emit(text, getattr(stmts, "close_line", 0), indent)

    def stmt(self, s, indent: str) -> None:
        inner = indent + "    "
        if isinstance(s, ast.Input):
            self.emit(f"input {format_expr(s.dims)}", s.pos.line, indent)
        elif isinstance(s, ast.Chain):
            text = " -> ".join(format_layer(layer) for layer in s.layers)
            self.emit(f"{s.bind} = {text}" if s.bind else text, s.pos.line, indent)
        elif isinstance(s, ast.Residual):
            self.emit("residual {", s.pos.line, indent)
            self.body(s.body, inner)
            if s.shortcut is not None:
                self.close("} shortcut {", s.body, indent)
                self.body(s.shortcut, inner)
                self.close("}", s.shortcut, indent)
            else:
                self.close("}", s.body, indent)
        elif isinstance(s, ast.Repeat):
            self.emit(f"repeat {_positional(s.count)} {{", s.pos.line, indent)
            self.body(s.body, inner)
            self.close("}", s.body, indent)
        else:
            raise TypeError(s)


def _close(stmts) -> int:
    """The line of a body's closing brace: comments above it stay in the body."""
    return getattr(stmts, "close_line", 0) or _end(stmts)


def _simple_option(stmt) -> bool:
    return isinstance(stmt, ast.Chain) and stmt.bind is None and len(stmt.layers) == 1


def _end(stmts) -> int:
    """A line number just past a body's last statement (for comment placement)."""
    if not stmts:
        return 0
    last = stmts[-1]
    inner = getattr(last, "shortcut", None) or getattr(last, "body", None)
    if isinstance(inner, tuple) and inner:
        return _end(inner) + 1
    return last.pos.line + 1


def format_program(program: ast.Program) -> str:
    w = _Writer(program.comments)
    items = sorted(
        list(program.blocks) + [x for x in (program.network, program.train) if x is not None],
        key=lambda item: item.pos.line,
    )
    for k, item in enumerate(items):
        if k:
            w.lines.append("")
        if isinstance(item, ast.BlockDef):
            params = ", ".join(p.name if p.default is None else f"{p.name}={format_expr(p.default)}" for p in item.params)
            w.emit(f"block {item.name}({params}) {{", item.pos.line, "")
            w.body(item.body, "    ")
            w.close("}", item.body, "")
        elif isinstance(item, ast.Network):
            w.emit(f"network {item.name} {{", item.pos.line, "")
            w.body(item.body, "    ")
            w.close("}", item.body, "")
        else:
            w.emit("train {", item.pos.line, "")
            width = max((len(o.layers[0].name) for o in item.options if _simple_option(o)), default=0)
            for o in item.options:
                if not _simple_option(o):
                    w.stmt(o, "    ")  # not a train option (load rejects it), but keep it as written
                    continue
                layer = o.layers[0]
                rest = format_layer(layer)[len(layer.name):].strip()
                w.emit(f"{layer.name.ljust(width)} {rest}".rstrip(), o.pos.line, "    ")
            w.flush_until(_close(item.options) or _END, "    ")
            w.close("}", item.options, "")
    w.flush_until(_END, "")
    return "\n".join(w.lines) + "\n"
