"""Escaping for untrusted text (labels, run names, tags) in Markdown and HTML output."""

from __future__ import annotations

import html
import re

# Inline metacharacters: emphasis, code, links/images, raw HTML, table cells, strikethrough.
_MD_INLINE = re.compile(r"([\\`*_\[\]<>|~])")
# Block markers that only matter at the start of a line (heading, list, quote, numbered).
_MD_LINE_START = re.compile(r"^([#+\-=])|^(\d+)([.)])")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def md(text: object) -> str:
    """Markdown-safe inline text: newlines flattened (a label must not start a new table
    row or heading), inline metacharacters and a leading block marker backslash-escaped,
    `&` made literal so no HTML entity can be smuggled in."""
    flat = " ".join(str(text).split()).replace("&", "&amp;")
    if _NUMBER.match(flat):
        return flat
    escaped = _MD_INLINE.sub(r"\\\1", flat)
    return _MD_LINE_START.sub(
        lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", escaped, count=1
    )


def html_text(text: object) -> str:
    """HTML-safe text (also safe inside a quoted attribute)."""
    return html.escape(str(text), quote=True)


def plot_text(text: object) -> str:
    """Untrusted text as plotly draws it literally: plotly reads a subset of HTML tags and
    entities in every string it renders (ticks, titles, legend, hover), so `&`, `<` and `>`
    are written as entities, which it decodes back for display."""
    return html.escape(str(text), quote=False)


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table whose cells are escaped with `md`."""
    lines = [
        "| " + " | ".join(md(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(md(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
