"""Untrusted text through `md`/`md_table`, rendered by an independent CommonMark+GFM
renderer (markdown-it-py): it must come out as literal text, never as markup."""

import html

import pytest
from markdown_it import MarkdownIt

from rts_dagster.escape import html_text, md, md_table

RENDER = MarkdownIt("commonmark").enable("table").enable("strikethrough")

NASTY = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "**bold** _em_ `code` ~~strike~~",
    "[click](javascript:alert(1))",
    "![img](http://evil/x.png)",
    "# heading",
    "- list item",
    "1. numbered",
    "> quote",
    "a | b | c",
    "line\nbreak\n# heading",
    "&lt;script&gt;",
    "back\\slash",
    "fixed_maps.extractor_hub_30",
    "+ plus item",
    "===",
    "---",
    "***",
    "10) parenthesised",
    "-0.5 (a number, not a list)",
    "0.996 vs 0.985",
]


def test_md_escapes_only_what_needs_escaping():
    # numbers and number-led phrases stay readable in the raw report.md
    for text in ("0.996 vs 0.985", "-0.5 (x)", "x0.854 (0.769 to 0.947)", "#tag", "a-b"):
        assert md(text) == text


def _text_of(rendered: str) -> str:
    """The visible text of rendered HTML of a single paragraph."""
    assert rendered.startswith("<p>") and rendered.endswith("</p>\n"), rendered
    return html.unescape(rendered[3:-5])


@pytest.mark.parametrize("text", NASTY)
def test_md_renders_as_the_literal_text(text):
    rendered = RENDER.render(md(text))
    assert _text_of(rendered) == " ".join(text.split())


@pytest.mark.parametrize("text", NASTY)
def test_md_table_cell_stays_one_cell(text):
    rendered = RENDER.render(md_table(["label", "value"], [[text, 1.5]]))
    assert rendered.count("<td>") == 2 and rendered.count("<tr>") == 2
    cell = rendered.split("<td>")[1].split("</td>")[0]
    assert html.unescape(cell) == " ".join(text.split())


def test_numbers_are_not_escaped():
    assert md("-5.3") == "-5.3" and md("1e-05") == "1e-05"


def test_html_text_escapes_attributes():
    assert html_text("\"'<>&") == "&quot;&#x27;&lt;&gt;&amp;"


def test_untrusted_text_reaches_plotly_escaped() -> None:
    """plotly renders a subset of HTML in titles, legends, ticks and hover text."""
    import polars as pl

    from rts_dagster.escape import plot_text
    from rts_dagster.report import figures

    evil = "<b>t</b>&x"
    assert plot_text(evil) == "&lt;b&gt;t&lt;/b&gt;&amp;x"
    series = pl.DataFrame(
        {"task": [evil, evil], "label": ["<i>l</i>", "m"], "seed": [1, 2], "noise": [0.1, 0.2]}
    )
    box = figures.noise_distribution(series, "noise", "noise (reward units)")
    assert box.data[0].name == plot_text(evil)
    assert box.data[0].text[0] == "&lt;i&gt;l&lt;/i&gt; (seed 1)"
    curves = pl.DataFrame(
        {"task": [evil], "seed": [1], "sample_index": [0], "reward": [0.5]},
    )
    fig = figures.reward_curves(curves, "completion")
    assert fig.layout.annotations[0].text == plot_text(evil)


CONTROL_TEXTS = ["esc\x1b]0;title\x07\x1b[2J", "nul\x00", "c1\x9b31m", "rtl\u202eevil", "a\nb\tc"]


@pytest.mark.parametrize("text", CONTROL_TEXTS)
def test_plot_and_terminal_text_show_controls_never_obey_them(text):
    from rts_dagster.escape import plot_text, terminal_text

    for out in (plot_text(text), terminal_text(text)):
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out), out
        assert "\u202e" not in out
        assert out[:2] == text[:2] or text[1] == "\n"  # the readable part is kept
    assert plot_text("a\nb") == "a\\nb"  # a newline is shown, not flattened silently
    assert terminal_text("\x1b[2J") == "\\x1b[2J"


def test_timescale_ticks_are_the_labels_cut_with_an_ellipsis_full_text_on_hover():
    import polars as pl

    from rts_dagster.escape import MAX_PLOT_LABEL, plot_text
    from rts_dagster.report import figures

    long = "x" * 300
    names = ["a<b>&c", long, "two\nlines"]
    recs = pl.DataFrame(
        {
            "name": names,
            "timescale": [10.0, 20.0, 30.0],
            "timescale_ci_low": [5.0, 10.0, 15.0],
            "timescale_ci_high": [20.0, 40.0, 60.0],
            "lp_timescale": [None] * 3,
        }
    )
    fig = figures.timescales(recs, "completions")
    assert list(fig.data[0].y) == [plot_text(n) for n in names]  # hover: the full text
    assert list(fig.layout.yaxis.tickvals) == list(fig.data[0].y)  # ticks match the data
    text = list(fig.layout.yaxis.ticktext)
    assert text[0] == "a&lt;b&gt;&amp;c" and text[2] == "two\\nlines"
    assert len(text[1]) == MAX_PLOT_LABEL and text[1].endswith("\u2026")
    assert text[1][:-1] == long[: MAX_PLOT_LABEL - 1]
