"""Diagnostics in the form `file:line:col: error: message`, with the source
line, a caret under the offending span, and a hint where one helps."""
from __future__ import annotations

import difflib
import functools
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from dsl.ast import Pos

MAX_SHOWN = 50  # diagnostics printed per error; the rest are counted
MAX_KEPT = 200  # diagnostics a Collector keeps; the rest are counted


@dataclass(frozen=True)
class Note:
    """A secondary location, e.g. the other definition in a `concat` mismatch."""

    message: str
    pos: Pos


@dataclass(frozen=True)
class Diagnostic:
    message: str
    pos: Pos
    hint: str | None = None
    notes: tuple[Note, ...] = field(default=())


class FusenetError(Exception):
    """A rejected program: one or more diagnostics against one source text."""

    def __init__(
        self,
        diagnostics: Sequence[Diagnostic],
        source: str = "",
        filename: str = "<string>",
        omitted: int = 0,
        stopped: bool = False,
    ):
        self.diagnostics = tuple(diagnostics)
        self.source = source
        self.filename = filename
        self.omitted = omitted  # further errors found but not kept (see Collector)
        self.stopped = stopped  # checking stopped at MAX_KEPT errors: there may be more
        super().__init__(self.format())

    def format(self) -> str:
        lines = source_lines(self.source)  # split once: a program may have thousands of errors
        shown = [format_diagnostic(d, self.source, self.filename, lines) for d in self.diagnostics[:MAX_SHOWN]]
        hidden = max(0, len(self.diagnostics) - MAX_SHOWN) + self.omitted
        if hidden > 0:
            shown.append(f"{self.filename}: {hidden} more error{'s' if hidden != 1 else ''} not shown")
        if self.stopped:
            shown.append(f"{self.filename}: checking stopped after {MAX_KEPT} errors")
        return "\n".join(shown)

    def __str__(self) -> str:
        return self.format()


def source_lines(source: str) -> list[str]:
    """The lines as the parser counts them: split at "\n" only (not at form feeds
    or Unicode line separators, which str.splitlines also takes), without "\r"."""
    raw = source.split("\n")
    if len(raw) > 1 and raw[-1] == "":
        raw.pop()  # the text ends with a newline; a last line holding only "\r" is a line
    return [line.rstrip("\r") for line in raw]


# Names for the characters whose Unicode name says little or that have none.
_CHAR_NAMES = {
    "\0": "null", "\t": "tab", "\v": "vertical tab", "\f": "form feed", "\r": "carriage return",
    "\x1b": "escape", "\x7f": "delete", "\ufeff": "byte-order mark",
}


def _invisible(ch: str) -> bool:
    return not ch.isprintable() or (ch.isspace() and ch != " ")


def describe_char(ch: str) -> str:
    """A character as an error message names it: `'@'` when it can be seen,
    `U+00A0 (no-break space)` or `U+0000 (null, \\x00)` when printing it raw
    would show nothing, or break the terminal."""
    if not _invisible(ch):
        return f"'{ch}'"
    name = _CHAR_NAMES.get(ch) or unicodedata.name(ch, "").lower() or "control character"
    if unicodedata.category(ch) == "Cc":
        name += ", " + repr(ch)[1:-1]
    return f"U+{ord(ch):04X} ({name})"


def _visible(text: str) -> str:
    """A source line made safe to print, one column per character so the caret
    stays aligned: C0 controls as their control pictures (U+2400..), other
    invisible characters as U+FFFD."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch == " " or not _invisible(ch):
            out.append(ch)
        elif ord(ch) < 0x20:
            out.append(chr(0x2400 + ord(ch)))
        elif ch == "\x7f":
            out.append("\u2421")
        elif ch.isspace() and unicodedata.category(ch) == "Zs":
            out.append(ch)  # a visible-width space (NBSP): the message names it
        else:
            out.append("\ufffd")
    return "".join(out)


def escape_invisible(text: str) -> str:
    """Text for a message line, with any invisible or control character written
    as its escape (a string argument "a\\x85b", a file name): never raw."""
    if text.isprintable():
        return text
    return "".join(repr(ch)[1:-1] if _invisible(ch) and ch != " " else ch for ch in text)


def _excerpt(source: str, pos: Pos, prefix: str = "    ", lines: list[str] | None = None) -> list[str]:
    lines = source_lines(source) if lines is None else lines
    if not (1 <= pos.line <= len(lines)):
        return []
    # made visible before trailing spaces go: a trailing form feed or NBSP is what the caret points at
    text = _visible(lines[pos.line - 1].expandtabs(1)).rstrip(" ")
    start = max(pos.col, 1)
    if pos.end_line == pos.line and pos.end_col > pos.col:
        width = pos.end_col - pos.col
    else:
        width = 1
    width = max(1, min(width, max(1, len(text) - start + 1)))
    return [prefix + text, prefix + " " * (start - 1) + "^" + "~" * (width - 1)]


def format_diagnostic(d: Diagnostic, source: str, filename: str, lines: list[str] | None = None) -> str:
    lines = source_lines(source) if lines is None else lines
    where = f"{filename}:{d.pos.line}:{d.pos.col}" if d.pos.line else filename  # line 0: the whole file
    # messages quote the program (a string argument) and name files: escaped, like the excerpts
    out = [escape_invisible(f"{where}: error: {d.message}")]
    out += _excerpt(source, d.pos, lines=lines)
    for note in d.notes:
        out.append(escape_invisible(f"{filename}:{note.pos.line}:{note.pos.col}: note: {note.message}"))
        out += _excerpt(source, note.pos, lines=lines)
    if d.hint:
        out.append(escape_invisible(f"hint: {d.hint}"))
    return "\n".join(out)


def nearest(word: str, candidates: Iterable[str]) -> str | None:
    """The closest known name to a misspelt one, or None if nothing is close."""
    return _nearest(word, tuple(candidates))


@functools.lru_cache(maxsize=1024)
def _nearest(word: str, candidates: tuple[str, ...]) -> str | None:
    # Cached: a misspelling inside a block is reported once per call of the
    # block, and difflib takes 50-100 us a time.
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    match = nearest(word, candidates)
    return f"did you mean '{match}'?" if match else None


class Collector:
    """Gathers diagnostics so one run can report several errors.

    It keeps the first MAX_KEPT and counts the rest: a block with a mistake,
    expanded 16,000 times, must not make 16,000 diagnostics, each given a note
    per enclosing block call. A stage may also stop once it is `full`."""

    def __init__(self, source: str = "", filename: str = "<string>"):
        self.source, self.filename = source, filename
        self.diagnostics: list[Diagnostic] = []
        self.omitted = 0
        self.stopped = False  # set by a stage that stopped early because the collector was full

    @property
    def full(self) -> bool:
        return len(self.diagnostics) >= MAX_KEPT

    def error(self, message: str, pos: Pos, hint: str | None = None, notes: Sequence[Note] = ()) -> None:
        if len(self.diagnostics) >= MAX_KEPT:
            self.omitted += 1
            return
        self.diagnostics.append(Diagnostic(message, pos, hint, tuple(notes)))

    def add_note_since(self, start: int, note: Note) -> None:
        """Append `note` to every diagnostic reported since there were `start`:
        context learnt after the fact, such as the block call an error happened in."""
        self.diagnostics[start:] = [replace(d, notes=d.notes + (note,)) for d in self.diagnostics[start:]]

    def raise_if_any(self) -> None:
        if self.diagnostics:
            raise FusenetError(self.diagnostics, self.source, self.filename, self.omitted, self.stopped)
