"""Plain-text tables that fit a width: long cells are folded onto more lines, never cut, and
numbers are shown as people write them (``0.02``, not ``0.019999999552965164``)."""

from __future__ import annotations

import math
import shutil
from collections.abc import Collection, Sequence

#: where a folded cell breaks, by preference: at a space, after a dot (of a path) or a slash
_BREAKS = " ./"
#: a folded column keeps at least this many characters
_NARROWEST = 8


def number(x: float | None, digits: int = 4) -> str:
    """``x`` to ``digits`` significant digits (``0.02``, ``1e-08``, ``3e+04``); ``-`` for None."""
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def terminal_width() -> int:
    """The terminal's width in columns (``COLUMNS`` when set; 100 when not a terminal)."""
    return shutil.get_terminal_size((100, 24)).columns


def fold(text: str, width: int) -> list[str]:
    """``text`` on lines of at most ``width`` characters, broken at a space, else after a dot
    or a slash, where one falls in the second half of the line; else anywhere."""
    lines = []
    while len(text) > width:
        cut = width
        for mark in _BREAKS:
            at = text.rfind(mark, 0, width + 1 if mark == " " else width) + (mark != " ")
            if at > width // 2:
                cut = at
                break
        lines.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return [*lines, text]


def hanging(text: str, width: int | None, indent: int = 4) -> list[str]:
    """``text`` folded to ``width`` (None: one line), its later lines indented."""
    if width is None:
        return [text]
    first, *rest = fold(text, max(width - indent, 16))
    return [first, *(" " * indent + line for line in rest)]


def table(
    rows: Sequence[Sequence[str]], width: int | None = None, foldable: Collection[int] = (), gap: int = 2
) -> list[str]:
    """The lines of ``rows`` (the first is the header) in aligned columns, ``gap`` spaces
    apart. With ``width``, the columns whose indices are in ``foldable`` are narrowed, the
    widest first, and their cells folded onto more lines until the table fits (or every such
    column is down to a few characters)."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    if width is not None:
        excess = sum(widths) + gap * (len(widths) - 1) - width
        while excess > 0:
            wide = [i for i in foldable if widths[i] > _NARROWEST]
            if not wide:
                break
            i = max(wide, key=widths.__getitem__)
            others = [widths[j] for j in wide if j != i]
            step = min(excess, widths[i] - max(_NARROWEST, max(others, default=0)) or 1)
            widths[i] -= step
            excess -= step
    lines = []
    for row in rows:
        cells = [fold(cell, widths[i]) if i in foldable else [cell] for i, cell in enumerate(row)]
        for k in range(max(len(c) for c in cells)):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths)]
            lines.append((" " * gap).join(parts).rstrip())
    return lines
