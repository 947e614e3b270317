"""Markdown tables, written one way for every stage's tables and the report."""
from __future__ import annotations

from typing import Any, Iterable


def md_cell(value: Any) -> str:
    """One cell: whitespace collapsed, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(headers: Iterable[Any], rows: Iterable[Iterable[Any]]) -> list[str]:
    """The lines of a GitHub-flavoured Markdown table (no trailing blank line)."""
    headers = list(headers)
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
