"""Markdown tables from already-formatted cells (reports, sweeps, benchmarks)."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A header row, the rule, and one line per row; short rows are padded with empty cells."""
    width = len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * width]
    lines += ["| " + " | ".join([*row, *[""] * (width - len(row))]) + " |" for row in rows]
    return "\n".join(lines)
