"""Where the benchmark tools write their figures: a table row appended to a section of
``docs/benchmarks.md``, the section (with its table header) created at the end when missing."""

from __future__ import annotations

from pathlib import Path


def record_table_row(docs: Path, section: str, header: str, row: str) -> None:
    """Append ``row`` to the table of ``section`` (its ``## `` heading line), whose first line is
    ``header``; a section without the table gets one at its end."""
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    if not any(line.rstrip() == section for line in lines):
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(text + ("" if text.endswith("\n") else "\n") + "\n" + section + "\n\n" + header + row)
        return
    start = next(i for i, line in enumerate(lines) if line.rstrip() == section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    table = [i for i in range(start, end) if lines[i] == header.splitlines(keepends=True)[0]]
    if not table:
        lines[end:end] = ["\n", header, row]
    else:
        lines.insert(max(i for i in range(table[0], end) if lines[i].startswith("|")) + 1, row)
    docs.write_text("".join(lines))
