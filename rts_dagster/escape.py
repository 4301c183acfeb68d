"""Escaping for untrusted text (labels, run names, tags) in Markdown and HTML output."""

from __future__ import annotations

import html
import re

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~>-])")


def md(text: object) -> str:
    """Markdown-safe inline text: every Markdown/HTML metacharacter backslash-escaped,
    newlines flattened (a label must not start a new table row or heading)."""
    flat = " ".join(str(text).split())
    return _MD_SPECIAL.sub(r"\\\1", flat).replace("&", "&amp;")


def html_text(text: object) -> str:
    """HTML-safe text (also safe inside a quoted attribute)."""
    return html.escape(str(text), quote=True)


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table whose cells are escaped with `md`."""
    lines = [
        "| " + " | ".join(md(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(md(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
