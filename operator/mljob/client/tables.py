"""Tables as kubectl prints them: upper-case headers, columns padded to their widest cell, two
spaces between, nothing drawn. Pure.

`PagedTable` prints a table a page at a time (a job's items): the header once, each page aligned
on the widths seen so far, which only grow, so a million rows are never held to measure them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

GAP = "  "
NONE = "-"


def cell(value: Any) -> str:
    """A value as a table shows it: `-` for none, numbers with thousands separators, one line."""
    if value is None or value == "":
        return NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return " ".join(str(value).split())


def truncate(text: str, width: int | None) -> str:
    """`text` cut to `width` characters with a trailing `…` (None: no limit)."""
    if width is None or len(text) <= width:
        return text
    return text[: max(width - 1, 0)] + "…"


def widths(rows: Sequence[Sequence[str]], start: Sequence[int] = ()) -> list[int]:
    out = list(start)
    for row in rows:
        for index, text in enumerate(row):
            if index >= len(out):
                out.append(0)
            out[index] = max(out[index], len(text))
    return out


def line(row: Sequence[str], sizes: Sequence[int]) -> str:
    """A row padded to `sizes` (the last column is not padded: no trailing spaces)."""
    parts = [text.ljust(size) for text, size in zip(row[:-1], sizes, strict=False)]
    return GAP.join([*parts, row[-1]]) if row else ""


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    limits: Mapping[str, int | None] | None = None,
    upper: bool = True,
) -> list[str]:
    """The lines of a table; `limits` caps a column's width (a longer cell ends in `…`);
    `upper`: headers in capitals, as kubectl writes them."""
    limits = limits or {}
    texts = [
        [truncate(cell(value), limits.get(header)) for header, value in zip(headers, row, strict=True)]
        for row in rows
    ]
    head = [h.upper() if upper else h for h in headers]
    sizes = widths([head, *texts])
    return [line(head, sizes), *(line(row, sizes) for row in texts)]


class PagedTable:
    """A table printed a page at a time; `page` returns the lines to print for one page."""

    def __init__(self, headers: Sequence[str], limits: Mapping[str, int | None] | None = None) -> None:
        self.headers = list(headers)
        self.limits = dict(limits or {})
        self.sizes = widths([[h.upper() for h in headers]])
        self.started = False

    def page(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        texts = [[truncate(cell(row.get(h)), self.limits.get(h)) for h in self.headers] for row in rows]
        self.sizes = widths(texts, self.sizes)
        lines = [] if self.started else [line([h.upper() for h in self.headers], self.sizes)]
        self.started = True
        return lines + [line(row, self.sizes) for row in texts]
