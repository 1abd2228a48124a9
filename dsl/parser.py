"""Text to AST: the Lark LALR parser, syntax errors as diagnostics, recovery.

`parse(text, filename)` returns a `Program` or raises `FusenetError` holding
every error found. After a syntax error the offending line is blanked and the
text parsed again, so one run reports the errors of several lines.

The parser builds the AST in its reduce callbacks (dsl/builder.py): no parse
tree, no recursion, so input of any depth parses in one pass and the limits of
dsl/limits.py are checked as constructs are reduced.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import lark
import lark.lexer
from lark import Token
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from dsl import ast
from dsl.ast import Pos
from dsl.builder import Builder, SourceError
from dsl.errors import Collector, Diagnostic, FusenetError, describe_char, source_lines
from dsl.gc_pause import gc_paused

GRAMMAR = Path(__file__).with_name("grammar.lark")
MAX_SYNTAX_ERRORS = 10
BOM = "\ufeff"  # a byte-order mark, as Notepad starts a UTF-8 file: not part of the program


def build_lark(strict: bool = False) -> lark.Lark:
    """The LALR parser for grammar.lark, building the AST as it parses.

    strict=True has Lark prove, with interegular, that no two terminals can
    match the same text: slow (0.3-0.5 s), so a test does it once
    (tests/dsl/test_parser.py) and every run of `fusenet check` skips it.
    """
    return lark.Lark(
        GRAMMAR.read_text(),
        parser="lalr",
        strict=strict,
        maybe_placeholders=True,
        transformer=Builder(),  # reduce callbacks build the AST; the builder keeps no state
    )


@functools.lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    # Lark checks terminal collisions whenever interegular is importable, in
    # strict mode or not (the latter only logs them); the check is most of the
    # time it takes to build the parser. Build without it, as Lark does when
    # interegular is absent; the strict build in the tests keeps the grammar
    # honest.
    lexer_module = lark.lexer
    had = getattr(lexer_module, "has_interegular", None)
    if had is not None:
        lexer_module.has_interegular = False
    try:
        return build_lark(strict=False)
    finally:
        if had is not None:
            lexer_module.has_interegular = had


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
        return Diagnostic(f"unexpected character {describe_char(ch)}", Pos(err.line, err.column, err.line, err.column + 1), hint)
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


# A comment runs from '#' to the end of its line, unless the '#' is inside a
# string; matching strings too skips theirs. (A regular expression instead of
# a second pass of the lexer: this is the same set on any program that parses.)
_COMMENT_OR_STRING = re.compile(r'"[^"\n]*"|#[^\n]*')


def _collect_comments(text: str) -> tuple[ast.Comment, ...]:
    comments = []
    line, seen = 1, 0
    for m in _COMMENT_OR_STRING.finditer(text):
        if m.group().startswith('"'):
            continue
        line += text.count("\n", seen, m.start())
        seen = m.start()
        line_start = text.rfind("\n", 0, m.start()) + 1
        own = text[line_start:m.start()].strip() == ""
        comments.append(ast.Comment(m.group().rstrip(), line, own))
    return tuple(comments)


def parse_syntax(text: str, filename: str = "<string>") -> list:
    """Parse to a list of top-level AST items; raise FusenetError on syntax errors."""
    diagnostics: list[Diagnostic] = []
    attempt = text
    items = None
    while len(diagnostics) < MAX_SYNTAX_ERRORS:
        try:
            items = _lark().parse(attempt)
        except (UnexpectedInput, SourceError) as err:
            d = err.diagnostic if isinstance(err, SourceError) else _syntax_diagnostic(err, attempt)
            if diagnostics and d.message == "unexpected end of file":
                break  # an unclosed brace after an earlier error: already explained
            diagnostics.append(d)
            if d.message == "unexpected end of file":
                break
            attempt = _blank_line(attempt, d.pos.line)
            if attempt is None:
                break
            continue
        break
    if diagnostics:
        raise FusenetError(diagnostics, text, filename)
    return items


def parse(text: str, filename: str = "<string>") -> ast.Program:
    """Parse a whole program and check its top-level structure."""
    text = text.removeprefix(BOM)
    with gc_paused():
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
