import os
import struct
from pathlib import Path

import plotly.graph_objects as go
import pytest

from rts_dagster.report.document import (
    Bullets,
    Figure,
    Heading,
    Paragraph,
    Report,
    Table,
    _renderer_running,
    find_browser,
    stop_renderer,
    warm_renderer,
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


def test_stale_render_dirs_of_a_killed_renderer_are_removed(tmp_path):
    """A SIGKILL mid-render leaves `.render-<pid>-*`; the next render removes it (a live
    renderer's dir, here our own pid, is kept)."""
    from rts_dagster.report.document import write_pngs

    figures_dir = tmp_path / "figures"
    dead = figures_dir / ".render-99999999-abc"  # above Linux's pid_max: never alive
    live = figures_dir / f".render-{os.getpid()}-xyz"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "partial.png").write_bytes(b"\x89PNG")
    write_pngs([], figures_dir)
    assert not dead.exists()
    assert (live / "partial.png").exists()


@pytest.mark.skipif(find_browser() is None, reason="no chromium for kaleido")
def test_one_failing_figure_is_named_and_the_others_are_kept(tmp_path):
    """A raw C0 control makes plotly.js fail (error 525): that figure is named with the
    cause, its stale PNG is removed, every other figure is rendered and linked."""
    figures_dir = tmp_path / "figures"
    figures_dir.mkdir()
    (figures_dir / "broken.png").write_bytes(b"old")
    (figures_dir / "curve.png").write_bytes(b"old")
    rep = _report()
    broken = go.Figure(go.Scatter(x=[0, 1], y=[1, 2]), layout_title_text="raw \x01 control")
    rep.add(Figure("broken", broken, "a figure plotly.js cannot draw"))
    out = write_report(rep, tmp_path)
    assert set(out["pngs"]) == {"curve"}
    assert (figures_dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (figures_dir / "broken.png").exists()
    assert "broken" in out["failed_figures"]
    assert "525" in out["failed_figures"]["broken"] or "plotly" in out["failed_figures"]["broken"]
    assert "broken" in out["note"]
    md = out["markdown"].read_text()
    assert "](figures/curve.png)" in md and "report.html#broken" in md


@pytest.mark.skipif(find_browser() is None, reason="no chromium for kaleido")
def test_labels_with_controls_and_markup_render_in_the_timescales_figure(tmp_path):
    import polars as pl

    from rts_dagster.report import figures

    names = ["a<b>&c", "esc\x1b[2J\x00", "rtl\u202eevil", "two\nlines", "L" * 300]
    recs = pl.DataFrame(
        {
            "name": names,
            "timescale": [10.0, 20.0, 30.0, 40.0, 50.0],
            "timescale_ci_low": [5.0, 10.0, 15.0, 20.0, 25.0],
            "timescale_ci_high": [20.0, 40.0, 60.0, 80.0, 100.0],
            "lp_timescale": [None] * 5,
        }
    )
    rep = Report(title="t")
    rep.add(Figure("timescales", figures.timescales(recs, "completions"), "c"))
    out = write_report(rep, tmp_path)
    assert out["failed_figures"] == {} and set(out["pngs"]) == {"timescales"}


@pytest.mark.skipif(find_browser() is None, reason="no chromium for kaleido")
def test_an_unchanged_figure_is_not_rendered_again(tmp_path, monkeypatch):
    """The second render of the same figures reuses their PNGs (kaleido is not called); a
    changed figure, or a PNG whose manifest entry is missing, is rendered again."""
    import plotly.io as pio

    from rts_dagster.report.document import RENDER_MANIFEST, write_pngs

    def figs(y2: float) -> list[Figure]:
        return [
            Figure("a", go.Figure(go.Scatter(x=[0, 1], y=[1, 2])), "a"),
            Figure("b", go.Figure(go.Scatter(x=[0, 1], y=[1, y2])), "b"),
        ]

    figures_dir = tmp_path / "figures"
    first = write_pngs(figs(2.0), figures_dir)
    assert set(first.paths) == {"a", "b"} and not first.failed
    rendered: list[list[str]] = []
    real = pio.write_images

    def counting(figures, paths, **kwargs):
        rendered.append(sorted(Path(p).stem for p in paths))
        return real(figures, paths, **kwargs)

    monkeypatch.setattr(pio, "write_images", counting)
    again = write_pngs(figs(2.0), figures_dir)
    assert rendered == [] and set(again.paths) == {"a", "b"}
    changed = write_pngs(figs(3.0), figures_dir)
    assert rendered == [["b"]] and set(changed.paths) == {"a", "b"}
    (figures_dir / RENDER_MANIFEST).unlink()
    write_pngs(figs(3.0), figures_dir)
    assert rendered[-1] == ["a", "b"]


def _counting_draw(calls: list[str]):
    def draw(frame, title: str) -> go.Figure:
        calls.append(title)
        return go.Figure(go.Scatter(x=frame["x"].to_numpy(), y=frame["y"].to_numpy()))

    return draw


def test_a_figure_whose_inputs_are_unchanged_is_not_drawn_again(tmp_path):
    """write_report keeps each recipe's figure JSON under figures/json/ by the key of its
    code and inputs: the next report with the same inputs reads it instead of drawing,
    changed inputs draw again and the old JSON goes."""
    import polars as pl

    from rts_dagster.report.document import FigureRecipe, render_html

    calls: list[str] = []
    draw = _counting_draw(calls)

    def report(y: float) -> Report:
        frame = pl.DataFrame({"x": [0, 1], "y": [0.5, y]})
        rep = Report(title="t")
        rep.add(Figure("curve", FigureRecipe(draw, (frame, "t")), "c"))
        return rep

    first = write_report(report(1.0), tmp_path, want_png=False)["html"].read_text()
    second = write_report(report(1.0), tmp_path, want_png=False)["html"].read_text()
    assert calls == ["t"] and first == second
    cached = list((tmp_path / "figures" / "json").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("curve.")
    drawn = report(1.0)
    assert render_html(drawn, "") == second  # the cached JSON gives the drawn figure's HTML
    write_report(report(2.0), tmp_path, want_png=False)
    assert calls == ["t", "t", "t"]  # render_html above drew one, the new inputs another
    assert [p.name for p in (tmp_path / "figures" / "json").iterdir()] != [cached[0].name]


def test_a_recipe_key_follows_the_values_not_their_memory_layout():
    import polars as pl

    from rts_dagster.report.document import FigureRecipe

    def key(frame: pl.DataFrame, *rest: object) -> str | None:
        return FigureRecipe(go.Figure, (frame, *rest)).key

    whole = pl.DataFrame({"task": ["a", "bbbbbbbbbbbbbbbbbbbb", None], "v": [0.0, 1.5, None]})
    pieces = pl.concat([whole.head(1), whole.slice(1, 1), whole.tail(1)], rechunk=False)
    assert pieces.n_chunks() > 1 and key(whole) == key(pieces)
    assert key(whole) != key(whole.with_columns(pl.col("v").fill_null(float("nan"))))
    assert key(whole) != key(whole.with_columns(pl.Series("v", [-0.0, 1.5, None])))
    assert key(whole) != key(whole.with_columns(pl.col("task").fill_null("")))
    assert key(whole, "title") != key(whole, "other title")
    assert FigureRecipe(go.Figure, (object(),)).key is None  # not digestible: never reused


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.skipif(find_browser() is None, reason="no chromium for kaleido")
def test_a_warm_browser_renders_the_same_pictures(tmp_path):
    """`warm_renderer` (what `rts refresh` starts before the aggregates) renders through the
    running browser; the pictures have the figures' sizes, as without it."""
    cold = write_report(_report(), tmp_path / "cold")
    assert warm_renderer()
    try:
        assert _renderer_running()
        warm = write_report(_report(), tmp_path / "warm")
        assert _renderer_running()  # it rendered through the running browser
    finally:
        stop_renderer()
    assert not _renderer_running()
    assert _png_size(warm["pngs"]["curve"]) == _png_size(cold["pngs"]["curve"])


@pytest.mark.skipif(find_browser() is None, reason="no chromium for kaleido")
def test_a_failing_warm_browser_is_closed_and_the_figures_render_anyway(tmp_path, monkeypatch):
    from kaleido import _sync_server

    assert warm_renderer()

    def broken(self, *args, **kwargs):  # e.g. the browser died under the server
        raise RuntimeError("browser gone")

    monkeypatch.setattr(_sync_server.GlobalKaleidoServer, "call_function", broken)
    try:
        out = write_report(_report(), tmp_path)
    finally:
        stop_renderer()
    assert not _renderer_running()
    assert _png_size(out["pngs"]["curve"])[0] > 300
