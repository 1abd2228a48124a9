"""The one fixed-width text-table writer of fusenet's terminal reports.

    >>> print(format_table(("kernel", "ms"), [("conv", "1.250"), ("relu", "0.031")], align="lr"))
    kernel     ms
    -------------
    conv    1.250
    relu    0.031

Every cell is a string already formatted by the caller; a column is as wide as
its widest cell (header included, and at least `min_widths`), cells are padded
left or right by `align`, columns are joined by `gap`, and trailing spaces are
stripped. `rule` draws the line under the header:
- "line": dashes as long as the header line;
- "columns": dashes under each column, as wide as the column, except the last,
  which gets as many as its header has characters (so a free-text last column
  does not stretch the rule);
- None: no rule.
This module imports neither torch nor triton.
"""
from __future__ import annotations

from typing import Sequence


def _widths(header: Sequence[str], rows: Sequence[Sequence[str]], min_widths: Sequence[int]) -> list[int]:
    widths = [len(h) for h in header]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"table row has {len(row)} cells, the header {len(header)}: {row!r}")
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    return [max(w, m) for w, m in zip(widths, list(min_widths) + [0] * (len(widths) - len(min_widths)))]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "l", *,
                 gap: str = "  ", rule: str | None = "line", min_widths: Sequence[int] = ()) -> str:
    """The table as lines joined by "\\n" (no trailing newline).

    `align` holds one letter per column, "l" (left) or "r" (right); when it is
    shorter than the header its last letter stands for the remaining columns.
    """
    if not align or set(align) - {"l", "r"}:
        raise ValueError(f"align takes letters 'l' and 'r', got {align!r}")
    widths = _widths(header, rows, min_widths)
    sides = [align[min(i, len(align) - 1)] for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return gap.join(c.rjust(w) if side == "r" else c.ljust(w)
                        for c, w, side in zip(cells, widths, sides)).rstrip()

    out = [line(header)]
    if rule == "line":
        out.append("-" * len(out[0]))
    elif rule == "columns":
        out.append(line(["-" * w for w in widths[:-1]] + ["-" * len(header[-1])]))
    elif rule is not None:
        raise ValueError(f"rule is 'line', 'columns' or None, got {rule!r}")
    out += [line(row) for row in rows]
    return "\n".join(out)
