"""Column legends for the text tables the commands print, free of torch.

Every table a command prints (``tpg verify``'s records, ``tpg verify --suite``'s matrix, ``tpg probe``'s
cases, ``tpg prove``'s checks, ``tpg train --report-memory``'s models) is followed by a legend with one
entry per column, in one layout::

    columns:
      NAME      what the column holds
      LONGER    ...

so a reader finds every header explained, and a test checks that none is missing
(:func:`missing_legend_entries`).
"""

from __future__ import annotations


def legend_lines(entries: dict[str, str], title: str = "columns:") -> list[str]:
    """``title`` and one line ``  NAME  meaning`` per entry, the meanings aligned."""
    if not entries:
        return []
    width = max(len(name) for name in entries)
    return [title] + [f"  {name.ljust(width)}  {meaning}" for name, meaning in entries.items()]


def table_header(lines: list[str]) -> list[str]:
    """The column names of the first table in ``lines``: the line above the first row of dashes, cut at
    the dashes' spans (so a name may contain single spaces)."""
    for i in range(1, len(lines)):
        dashes = lines[i]
        if dashes.strip() and set(dashes.replace(" ", "")) == {"-"} and "  " in dashes.strip():
            spans, start = [], None
            for j, ch in enumerate(dashes + " "):
                if ch == "-" and start is None:
                    start = j
                elif ch != "-" and start is not None:
                    spans.append((start, j))
                    start = None
            return [lines[i - 1][a:b].strip() for a, b in spans]
    raise ValueError("no table (a header line over a line of dashes) in the text")


def missing_legend_entries(text: str, title: str = "columns:") -> list[str]:
    """The columns of the first table of ``text`` that the legend block under ``title`` does not explain
    (empty when every column has its line ``  NAME  meaning``)."""
    lines = text.splitlines()
    header = table_header(lines)
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == title)
    except StopIteration:
        return header
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line[2:])
    return [name for name in header if not any(entry.startswith(name + "  ") for entry in block)]


__all__ = ["legend_lines", "table_header", "missing_legend_entries"]
