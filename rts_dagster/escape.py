"""Escaping for untrusted text (labels, run names, tags) in Markdown and HTML output."""

from __future__ import annotations

import html
import re

# Inline metacharacters: emphasis, code, links/images, raw HTML, table cells, strikethrough.
_MD_INLINE = re.compile(r"([\\`*_\[\]<>|~])")
# Block markers only matter at the start of a line and only when followed by a space (or
# the end): "- x" is a list item, "-0.5" is a number; "# x" a heading; "1. x" a numbered
# item, "0.996 vs ..." is not. A line of only = or - would underline the line above.
_MD_LINE_START = re.compile(r"^([#+\-])(?=\s|$)|^(\d+)([.)])(?=\s|$)")
_MD_RULE = re.compile(r"^[=\-]+$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def md(text: object) -> str:
    """Markdown-safe inline text: newlines flattened (a label must not start a new table
    row or heading), inline metacharacters and a leading block marker backslash-escaped,
    `&` made literal so no HTML entity can be smuggled in."""
    flat = visible_controls(" ".join(str(text).split())).replace("&", "&amp;")
    if _NUMBER.match(flat):
        return flat
    escaped = _MD_INLINE.sub(r"\\\1", flat)
    if _MD_RULE.match(escaped):
        return "\\" + escaped
    return _MD_LINE_START.sub(
        lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", escaped, count=1
    )


def html_text(text: object) -> str:
    """HTML-safe text (also safe inside a quoted attribute); controls and bidi overrides
    made visible (U+202E would reverse the text after it)."""
    return html.escape(visible_controls(text), quote=True)


# C0 and C1 controls, DEL, line/paragraph separators and the bidi embeddings, overrides,
# isolates and marks: invisible or reordering characters a label must not smuggle into a
# figure or a terminal (plotly.js fails on C0 controls, a terminal obeys ESC sequences,
# U+202E reverses the text that follows it).
_CONTROLS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Longest label drawn in a figure before it is cut with an ellipsis (the full text stays
# in the hover text): a 300-character label would squeeze the plot to a sliver.
MAX_PLOT_LABEL = 60


def visible_controls(text: object) -> str:
    """`text` with every control or bidi character replaced by a visible escape
    (`\\n`, `\\x1b`, `\\u202e`), so it is shown, never obeyed, and never dropped silently."""

    def escape(m: re.Match[str]) -> str:
        ch = m[0]
        if ch in _NAMED:
            return _NAMED[ch]
        code = ord(ch)
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return _CONTROLS.sub(escape, str(text))


def terminal_text(text: object) -> str:
    """Untrusted text safe to print to a terminal: no control character reaches it raw."""
    return visible_controls(text)


def plot_text(text: object) -> str:
    """Untrusted text as plotly draws it literally: control and bidi characters made
    visible (plotly.js fails to render a figure with a C0 control in it), and `&`, `<`
    and `>` written as entities, since plotly reads a subset of HTML tags and entities in
    every string it renders (ticks, titles, legend, hover) and decodes entities back."""
    return html.escape(visible_controls(text), quote=False)


def plot_label(text: object, max_chars: int = MAX_PLOT_LABEL) -> str:
    """`plot_text` of `text` cut to `max_chars` characters with an ellipsis, for ticks,
    legends and subplot titles; pass `plot_text` of the full text as hover text."""
    visible = visible_controls(text)
    if len(visible) > max_chars:
        visible = visible[: max_chars - 1].rstrip() + "\u2026"
    return html.escape(visible, quote=False)


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table whose cells are escaped with `md`."""
    lines = [
        "| " + " | ".join(md(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(md(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
