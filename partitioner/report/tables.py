"""Plain-text tables for the command line.

    >>> print(format_table(["k", "ms"], [[0, "1.5"], [1, "12.0"]]))
    k    ms
    0   1.5
    1  12.0
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_ranges", "format_table"]

def format_ranges(nodes: Sequence[int], max_chars: int = 40) -> str:
    """Sorted layer indices as compact runs, cut to about ``max_chars`` characters.

        >>> format_ranges([0, 1, 2, 5, 7, 8]), format_ranges(range(0, 40, 2), max_chars=12)
        ('0-2,5,7-8', '0,2,4,6,8,… (20 runs)')
    """
    nodes = list(nodes)
    runs: list[str] = []
    i = 0
    while i < len(nodes):
        j = i
        while j + 1 < len(nodes) and nodes[j + 1] == nodes[j] + 1:
            j += 1
        runs.append(str(nodes[i]) if i == j else f"{nodes[i]}-{nodes[j]}")
        i = j + 1
    text = ",".join(runs)
    if len(text) <= max_chars:
        return text
    shown = text[:max_chars].rsplit(",", 1)[0]
    return f"{shown},… ({len(runs)} runs)"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns right-aligned except the first, two spaces apart."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                      strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
