import struct

import plotly.graph_objects as go
import pytest

from rts_dagster.report.document import (
    Bullets,
    Figure,
    Heading,
    Paragraph,
    Report,
    Table,
    find_browser,
    write_report,
)

EVIL = "<script>alert(1)</script>|**x**\n# heading [link](http://e)"


def _report() -> Report:
    fig = go.Figure(go.Scatter(x=[0, 1, 2], y=[0.1, 0.5, 0.4], name=EVIL))
    fig.update_layout(xaxis_title="sample index (completions)", yaxis_title="reward")
    rep = Report(title="Report for " + EVIL)
    rep.add(
        Heading(EVIL),
        Paragraph(["label ", EVIL, " is noisy"]),
        Bullets([EVIL, "plain"]),
        Table(["label", "noise"], [[EVIL, 0.123456], ["ok", float("nan")]], caption=EVIL),
        Figure("curve", fig, "Reward vs sample index for " + EVIL),
    )
    return rep


def test_untrusted_text_is_escaped_in_markdown_and_html(tmp_path):
    out = write_report(_report(), tmp_path, want_png=False)
    md = out["markdown"].read_text()
    html = out["html"].read_text()
    assert "<script>alert" not in md and "<script>alert" not in html.split("</script>", 1)[1]
    assert "&lt;script&gt;" in html
    for line in md.splitlines():
        # a label never opens a heading or a new table row of its own
        if "heading" in line:
            assert not line.lstrip().startswith("# heading")
    assert "\\|" in md  # the pipe cannot split a table cell
    assert "0.1235" in md and "0.1235" in html and "n/a" in md


def test_html_is_self_contained(tmp_path):
    out = write_report(_report(), tmp_path, want_png=False)
    html = out["html"].read_text()
    assert html.count("<script type='text/javascript'>") == 1  # plotly.js inlined once
    assert "<script src" not in html.lower()  # nothing fetched from a CDN
    assert "Plotly.newPlot" in html


@pytest.mark.skipif(find_browser() is None, reason="no chromium for kaleido")
def test_png_figures_render_and_are_linked(tmp_path):
    out = write_report(_report(), tmp_path)
    png = out["pngs"]["curve"]
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 300 and height > 200
    assert "](figures/curve.png)" in out["markdown"].read_text()
    assert not list(tmp_path.glob("figures/.render-*"))  # no temp leftovers
