"""Plain-text tables for CLI output (`rumor members`), aligned like `serf members`.

Why not a library: column alignment is twenty lines, and CLI output should not change
because a formatting dependency did. Output is plain ASCII layout with no colours, so
it stays grep- and awk-friendly; scripts should still prefer `--json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

MISSING = "-"
_GAP = "  "


def render_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Render `rows` as aligned columns with a header line; no trailing newline.

    `columns` picks and orders the keys (default: every key, in first-seen order);
    `headers` renames column titles (default: the key upper-cased). Missing and None
    values print as "-", numeric columns are right-aligned, and an empty table is
    just the header line (or "" when there are no columns at all).
    """
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    if not columns:
        return ""
    titles = [(headers or {}).get(col, col.upper()) for col in columns]
    cells = [[format_cell(row.get(col)) for col in columns] for row in rows]
    numeric = [
        all(_is_number(row.get(col)) for row in rows if row.get(col) is not None)
        and any(row.get(col) is not None for row in rows)
        for col in columns
    ]
    widths = [max([len(t), *(len(r[i]) for r in cells)]) for i, t in enumerate(titles)]
    lines = []
    for line in [titles, *cells]:
        parts = [
            cell.rjust(w) if num and line is not titles else cell.ljust(w)
            for cell, w, num in zip(line, widths, numeric, strict=True)
        ]
        lines.append(_GAP.join(parts).rstrip())
    return "\n".join(lines)


def format_cell(value: Any) -> str:
    """One value as table text: tags as k=v lists, floats with two decimals."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={format_cell(v)}" for k, v in value.items()) or MISSING
    if isinstance(value, list | tuple):
        return ",".join(format_cell(v) for v in value) or MISSING
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    # A newline or tab inside a cell would break the alignment of every other row.
    return " ".join(text.split()) if any(c in text for c in "\n\r\t") else text


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
