"""Text to AST: the Lark LALR parser, syntax errors as diagnostics, recovery.

`parse(text, filename)` returns a `Program` or raises `FusenetError` holding
every error found. After a syntax error the offending line is blanked and the
text parsed again, so one run reports the errors of several lines.
"""
from __future__ import annotations

import functools
from pathlib import Path

import lark
from lark import Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from dsl import ast
from dsl.ast import Pos
from dsl.errors import Collector, Diagnostic, FusenetError, source_lines

GRAMMAR = Path(__file__).with_name("grammar.lark")
MAX_SYNTAX_ERRORS = 10


@functools.lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    try:
        import interegular  # noqa: F401  (strict mode needs it to check terminal collisions)

        strict = True
    except ImportError:  # pragma: no cover - the test extra installs it
        strict = False
    return lark.Lark(
        GRAMMAR.read_text(),
        parser="lalr",
        strict=strict,
        propagate_positions=True,
        maybe_placeholders=True,
    )


def _pos(meta_or_token) -> Pos:
    m = meta_or_token
    if isinstance(m, Token):
        return Pos(m.line, m.column, m.end_line or m.line, m.end_column or m.column + len(m))
    if getattr(m, "empty", False):
        return ast.NOWHERE
    return Pos(m.line, m.column, m.end_line, m.end_column)


@v_args(meta=True)
class _ToAst(Transformer):
    def start(self, meta, items):
        return items

    # expressions
    def number(self, meta, children):
        (tok,) = children
        text = str(tok)
        is_float = any(c in text for c in ".eE")
        return ast.Num(float(text) if is_float else int(text), text, _pos(tok))

    def dims(self, meta, children):
        (tok,) = children
        return ast.Dims(tuple(int(v) for v in str(tok).split("x")), _pos(tok))

    def name(self, meta, children):
        (tok,) = children
        return ast.Name(str(tok), _pos(tok))

    def string(self, meta, children):
        (tok,) = children
        return ast.Str(str(tok)[1:-1], _pos(tok))

    def neg(self, meta, children):
        return ast.Neg(children[0], _pos(meta))

    def _binop(self, op, meta, children):
        return ast.BinOp(op, children[0], children[1], _pos(meta))

    def add(self, meta, children):
        return self._binop("+", meta, children)

    def sub(self, meta, children):
        return self._binop("-", meta, children)

    def mul(self, meta, children):
        return self._binop("*", meta, children)

    def div(self, meta, children):
        return self._binop("/", meta, children)

    def floordiv(self, meta, children):
        return self._binop("//", meta, children)

    def mod(self, meta, children):
        return self._binop("%", meta, children)

    # layers and statements
    def keyword(self, meta, children):
        name, value = children
        return ast.Keyword(str(name), value, _pos(meta))

    def layer(self, meta, children):
        name, *rest = children
        args = tuple(a for a in rest if not isinstance(a, ast.Keyword))
        kwargs = tuple(a for a in rest if isinstance(a, ast.Keyword))
        return ast.Layer(str(name), args, kwargs, Pos(name.line, name.column, name.end_line, name.end_column))

    def chain(self, meta, children):
        return ast.Chain(tuple(children), None, _pos(meta))

    def binding(self, meta, children):
        name, chain = children
        return ast.Chain(chain.layers, str(name), _pos(meta))

    def input(self, meta, children):
        (tok,) = children
        return ast.Input(ast.Dims(tuple(int(v) for v in str(tok).split("x")), _pos(tok)), _pos(meta))

    def body(self, meta, children):
        body = ast.Body(children)
        body.close_line = meta.end_line
        return body

    def residual(self, meta, children):
        body, shortcut = children
        return ast.Residual(body, shortcut, _pos(meta))

    def repeat(self, meta, children):
        count, body = children
        return ast.Repeat(count, body, _pos(meta))

    def param(self, meta, children):
        name, default = children
        return ast.Param(str(name), default, _pos(name))

    def block_def(self, meta, children):
        name, *params, body = children
        params = tuple(p for p in params if p is not None)
        return ast.BlockDef(str(name), params, body, Pos(name.line, name.column, name.end_line, name.end_column))

    def network(self, meta, children):
        name, body = children
        return ast.Network(str(name), body, Pos(name.line, name.column, name.end_line, name.end_column))

    def train(self, meta, children):
        (body,) = children
        return ast.TrainSection(body, _pos(meta))


_TOKEN_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "DIMS": "dimensions such as 3x32x32",
    "STRING": "a quoted string",
    "_NL": "end of line",
    "$END": "end of file",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "EQUAL": "'='",
    "COMMA": "','",
    "__ANON_0": "'->'",
}


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    return f"'{tok}'"


def _expected_words(expected) -> list[str]:
    words = []
    for name in sorted(expected):
        word = _TOKEN_WORDS.get(name)
        if word is None:
            term = next((t for t in _lark().terminals if t.name == name), None)
            word = f"'{term.pattern.value}'" if term is not None and term.pattern.type == "str" else name.lower()
        if word not in words:
            words.append(word)
    return words


def _syntax_diagnostic(err: UnexpectedInput, source: str) -> Diagnostic:
    if isinstance(err, UnexpectedCharacters):
        ch = source[err.pos_in_stream] if err.pos_in_stream < len(source) else "?"
        hint = "names use letters, digits and _; shapes are written 3x32x32" if ch not in "\"'" else "strings use double quotes"
        return Diagnostic(f"unexpected character '{ch}'", Pos(err.line, err.column, err.line, err.column + 1), hint)
    tok = err.token if isinstance(err, UnexpectedToken) else None
    expected = _expected_words(getattr(err, "expected", None) or getattr(err, "accepts", None) or [])
    if tok is None or tok.type == "$END":
        lines = source_lines(source)
        pos = Pos(len(lines), len(lines[-1]) + 1)
        hint = "a '{' is missing its '}'" if "'}'" in expected else None
        return Diagnostic("unexpected end of file", pos, hint)
    pos = Pos(tok.line, tok.column, tok.end_line or tok.line, (tok.end_column or tok.column + 1))
    if tok.type == "_NL":
        # point just past the last character of the line, where something is missing
        lines = source_lines(source)
        line = lines[tok.line - 1] if tok.line - 1 < len(lines) else ""
        pos = Pos(tok.line, len(line.rstrip()) + 1)
    hint = None
    if len(expected) <= 6 and expected:
        hint = "expected " + (expected[0] if len(expected) == 1 else ", ".join(expected[:-1]) + " or " + expected[-1])
    if str(tok) == "=" and tok.type != "_NL":
        hint = "a tap binding `name = layer -> ...` starts a line; a keyword argument is written key=value with a name before the '='"
    if str(tok) == "{":
        hint = (hint + "; " if hint else "") + "blocks are opened by network NAME {, block NAME(params) {, train {, residual {, shortcut {, repeat N {"
    return Diagnostic(f"unexpected {_describe_token(tok)}", pos, hint)


def _blank_line(text: str, line: int) -> str | None:
    """Blank one source line for error recovery, or None if that cannot help."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return None
    stripped = lines[line - 1].strip()
    if "{" in stripped or "}" in stripped:
        return None  # removing a brace would misreport everything after it
    lines[line - 1] = ""
    return "\n".join(lines)


def _collect_comments(text: str) -> tuple[ast.Comment, ...]:
    comments = []
    for tok in _lark().lex(text, dont_ignore=True):
        if tok.type == "COMMENT":
            own = text.split("\n")[tok.line - 1][: tok.column - 1].strip() == ""
            comments.append(ast.Comment(str(tok), tok.line, own))
        elif tok.type == "_NL":
            for k, raw in enumerate(str(tok).split("\n")):
                if k and raw.strip().startswith("#"):
                    comments.append(ast.Comment(raw.strip(), tok.line + k, True))
    return tuple(comments)


def parse_syntax(text: str, filename: str = "<string>") -> list:
    """Parse to a list of top-level AST items; raise FusenetError on syntax errors."""
    diagnostics: list[Diagnostic] = []
    attempt = text
    items = None
    while len(diagnostics) < MAX_SYNTAX_ERRORS:
        try:
            tree = _lark().parse(attempt)
        except UnexpectedInput as err:
            d = _syntax_diagnostic(err, attempt)
            if diagnostics and d.message == "unexpected end of file":
                break  # an unclosed brace after an earlier error: already explained
            diagnostics.append(d)
            if d.message == "unexpected end of file":
                break
            attempt = _blank_line(attempt, d.pos.line)
            if attempt is None:
                break
            continue
        if not diagnostics:
            try:
                items = _ToAst().transform(tree)
            except VisitError as e:  # pragma: no cover - transformer bug
                raise e.orig_exc from None
        break
    if diagnostics:
        raise FusenetError(diagnostics, text, filename)
    return items


def parse(text: str, filename: str = "<string>") -> ast.Program:
    """Parse a whole program and check its top-level structure."""
    items = parse_syntax(text, filename)
    errors = Collector(text, filename)
    blocks, networks, trains = [], [], []
    for item in items:
        if isinstance(item, ast.BlockDef):
            blocks.append(item)
        elif isinstance(item, ast.Network):
            networks.append(item)
        else:
            trains.append(item)
    if not networks:
        errors.error("no network defined", Pos(1, 1), "add `network NAME { input CxHxW ... }`")
    for extra in networks[1:]:
        errors.error(f"a second network '{extra.name}': a file describes one network", extra.pos)
    for extra in trains[1:]:
        errors.error("a second train section", extra.pos, "merge the options into one `train { }`")
    errors.raise_if_any()
    return ast.Program(
        tuple(blocks),
        networks[0],
        trains[0] if trains else None,
        _collect_comments(text),
        text,
        filename,
    )


def parse_file(path: str | Path) -> ast.Program:
    p = Path(path)
    return parse(p.read_text(), str(path))
