"""One report model, two renderings: `report.md` (with PNGs) and a self-contained `report.html`.

Both are rendered from the same `Block`s, so every number appears identically in both.
Untrusted text (labels, run names) is escaped by the renderers: callers pass raw strings
in `Text.parts` marked as `Raw` only for our own formatting.
"""

from __future__ import annotations

import hashlib
import html as _html
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from rts_dagster import storage
from rts_dagster.escape import html_text, md


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """Plain text; every part is escaped. `bold` parts are emphasised."""

    parts: Sequence[str]
    bold: bool = False


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[object]]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    name: str  # file stem; ours, not user text
    figure: go.Figure
    caption: str


Block = Heading | Paragraph | Bullets | Table | Figure


@dataclass
class Report:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    @property
    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]


def find_browser() -> str | None:
    """A Chromium/Chrome kaleido can drive, or None (kaleido would try to download one,
    which fails offline)."""
    explicit = os.environ.get("BROWSER_PATH")
    if explicit and Path(explicit).exists():
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


_RENDER_PREFIX = ".render-"
# A temp dir whose name carries no pid (or an unreadable one) is stale after this long.
_STALE_RENDER_S = 3600.0


def remove_stale_render_dirs(out_dir: Path) -> list[Path]:
    """Delete `.render-<pid>-*` temp dirs in `out_dir` left by a renderer that no longer
    runs (a SIGKILL skips the cleanup); a live renderer's dir is left alone."""
    removed: list[Path] = []
    if not out_dir.is_dir():
        return removed
    now = time.time()
    for path in out_dir.glob(f"{_RENDER_PREFIX}*"):
        if not path.is_dir() or path.is_symlink():
            continue
        pid_text = path.name[len(_RENDER_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit():
            stale = not storage.pid_alive(int(pid_text))
        else:
            try:
                stale = now - path.stat().st_mtime > _STALE_RENDER_S
            except OSError:
                continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@dataclass(frozen=True)
class RenderedPngs:
    """What `write_pngs` produced: the PNG of each rendered figure, and for each figure
    that failed, why (its old PNG is removed, so no stale picture is left beside the report)."""

    paths: dict[str, Path]
    failed: dict[str, str]


# choreographer (kaleido's browser driver) logs a full traceback at ERROR for a browser
# message it cannot decode and then ignores ("JSONError decoding message. Ignoring"), so a
# healthy render can print one. Harmless by itself: a figure it costs is not written, and
# `write_pngs` then renders it alone and names it with the cause. Only that record is
# dropped; every other choreographer/kaleido warning or error stays visible.
_CHOREO_PIPE_LOGGER = "choreographer.channels.pipe"
_IGNORED_BROWSER_MESSAGE = "JSONError decoding message"


class _DropIgnoredBrowserMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_IGNORED_BROWSER_MESSAGE))


def quiet_ignored_browser_messages() -> None:
    """Drop choreographer's "JSONError decoding message. Ignoring" tracebacks (see above);
    idempotent. Imports choreographer first: its loggers must be created by logistro's
    logger class (a plain `logging.Logger` made here first lacks `debug2`, and every
    render would then fail)."""
    try:
        import choreographer.channels.pipe  # noqa: F401
    except ImportError:  # no kaleido browser driver: nothing to quiet
        return
    logger = logging.getLogger(_CHOREO_PIPE_LOGGER)
    if not any(isinstance(f, _DropIgnoredBrowserMessages) for f in logger.filters):
        logger.addFilter(_DropIgnoredBrowserMessages())


def _render_alone(figure: go.Figure, scale: float) -> tuple[bytes | None, str]:
    """Render one figure by itself: (png, "") or (None, the cause). Used for a figure the
    batch call did not write, to name why (kaleido's batch call drops it silently)."""
    import plotly.io as pio

    try:
        png = pio.to_image(
            figure,
            format="png",
            scale=scale,
            validate=False,
            width=figure.layout.width,
            height=figure.layout.height,
        )
    except Exception as exc:  # any renderer failure is reported, not raised
        return None, f"{type(exc).__name__}: {exc}"
    return png, ""


def write_pngs(figures: Sequence[Figure], out_dir: Path, scale: float = 1.5) -> RenderedPngs:
    """Render every figure to `<out_dir>/<name>.png` through kaleido in one browser session.

    All are rendered into a temp dir first and only then renamed in, so the figures dir
    never mixes a new render with pictures of the previous one; a figure that fails is
    named with its cause and the others are kept. Stale temp dirs of a killed render are
    removed first."""
    import plotly.io as pio

    remove_stale_render_dirs(out_dir)
    quiet_ignored_browser_messages()
    browser = find_browser()
    if browser is None or not figures:
        return RenderedPngs({}, {})
    os.environ.setdefault("BROWSER_PATH", browser)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a figure whose JSON (data, layout, size) and scale are those of its PNG on disk is not
    # rendered again: after a refresh that changed one task most figures are the same
    digests = {f.name: _figure_digest(f.figure, scale) for f in figures}
    manifest_path = out_dir / RENDER_MANIFEST
    try:
        previous = storage.read_json(manifest_path)
    except (OSError, ValueError):
        previous = {}
    reused = {
        f.name: out_dir / f"{f.name}.png"
        for f in figures
        if previous.get(f.name) == digests[f.name] and (out_dir / f"{f.name}.png").is_file()
    }
    figures = [f for f in figures if f.name not in reused]
    if not figures:
        return RenderedPngs(reused, {})
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f"{_RENDER_PREFIX}{os.getpid()}-") as tmp:
        tmp_paths = [Path(tmp) / f"{f.name}.png" for f in figures]
        try:
            # kaleido 1.5 ignores a figure's own layout size unless it is passed explicitly
            # (None: kaleido's default 700 x 500)
            pio.write_images(
                [f.figure for f in figures],
                tmp_paths,
                format="png",
                scale=scale,
                validate=False,
                width=[f.figure.layout.width for f in figures],
                height=[f.figure.layout.height for f in figures],
            )
        except Exception as exc:  # the missing files are diagnosed below
            batch_error = f"{type(exc).__name__}: {exc}"
        else:
            batch_error = ""
        for f, tmp_path in zip(figures, tmp_paths, strict=True):
            if not tmp_path.is_file() or tmp_path.stat().st_size == 0:
                png, why = _render_alone(f.figure, scale)
                if png is None:
                    failed[f.name] = why or batch_error
                else:
                    tmp_path.write_bytes(png)
        final = {}
        # the manifest names what the PNGs show: gone while they are replaced
        manifest_path.unlink(missing_ok=True)
        for f, tmp_path in zip(figures, tmp_paths, strict=True):
            target = out_dir / f"{f.name}.png"
            if f.name in failed:
                target.unlink(missing_ok=True)
                continue
            os.replace(tmp_path, target)
            final[f.name] = target
    rendered = {**reused, **final}
    storage.write_json({name: digests[name] for name in rendered}, manifest_path)
    return RenderedPngs(rendered, failed)


RENDER_MANIFEST = "render_manifest.json"  # figure name -> digest of what its PNG shows


def _figure_digest(figure: go.Figure, scale: float) -> str:
    text = f"{scale}|{figure.layout.width}|{figure.layout.height}|{figure.to_json()}"
    return hashlib.sha256(text.encode()).hexdigest()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.4g}"
    return "" if value is None else str(value)


def render_markdown(report: Report, pngs: dict[str, Path], html_name: str, note: str) -> str:
    lines = [f"# {md(report.title)}", ""]
    if note:
        lines += [f"> {md(note)}", ""]
    for block in report.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + md(block.text), ""]
        elif isinstance(block, Paragraph):
            text = "".join(md(p) for p in block.parts)
            lines += [f"**{text}**" if block.bold else text, ""]
        elif isinstance(block, Bullets):
            lines += [f"- {md(item)}" for item in block.items] + [""]
        elif isinstance(block, Table):
            if block.caption:
                lines += [f"*{md(block.caption)}*", ""]
            lines.append("| " + " | ".join(md(h) for h in block.header) + " |")
            lines.append("|" + "|".join("---" for _ in block.header) + "|")
            lines += ["| " + " | ".join(md(_fmt(c)) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif isinstance(block, Figure):
            if block.name in pngs:
                rel = f"figures/{pngs[block.name].name}"
                lines += [f"![{md(block.caption)}]({rel})", ""]
            else:
                lines += [f"[{md(block.caption)} (interactive)]({html_name}#{block.name})", ""]
            lines += [f"*{md(block.caption)}*", ""]
    return "\n".join(lines)


def render_html(report: Report, note: str) -> str:
    from plotly.offline import get_plotlyjs

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html_text(report.title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
        "padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        ".note{background:#fff8e1;padding:0.6em 1em;border-left:4px solid #f0b400}"
        "figcaption{color:#555;font-size:0.9em}</style>",
        # plotly.js inlined once: the file works offline with no other file beside it.
        f"<script type='text/javascript'>{get_plotlyjs()}</script>",
        "</head><body>",
        f"<h1>{html_text(report.title)}</h1>",
    ]
    if note:
        parts.append(f"<p class='note'>{html_text(note)}</p>")
    for block in report.blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html_text(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            text = "".join(html_text(p) for p in block.parts)
            parts.append(f"<p><b>{text}</b></p>" if block.bold else f"<p>{text}</p>")
        elif isinstance(block, Bullets):
            parts.append(
                "<ul>" + "".join(f"<li>{html_text(i)}</li>" for i in block.items) + "</ul>"
            )
        elif isinstance(block, Table):
            head = "".join(f"<th>{html_text(h)}</th>" for h in block.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{html_text(_fmt(c))}</td>" for c in row) + "</tr>"
                for row in block.rows
            )
            cap = f"<caption>{html_text(block.caption)}</caption>" if block.caption else ""
            parts.append(f"<table>{cap}<tr>{head}</tr>{body}</table>")
        elif isinstance(block, Figure):
            div = block.figure.to_html(
                full_html=False, include_plotlyjs=False, div_id=f"fig-{block.name}"
            )
            parts.append(
                f"<figure id='{_html.escape(block.name, quote=True)}'>{div}"
                f"<figcaption>{html_text(block.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: Report, out_dir: Path, want_png: bool = True) -> dict[str, object]:
    """Write report.md, report.html and figures/*.png into `out_dir`; return what was written
    (`failed_figures`: name -> cause of each figure not rendered; the note says them too)."""
    figures_dir = out_dir / "figures"
    note = ""
    pngs: dict[str, Path] = {}
    failed: dict[str, str] = {}
    if want_png:
        if find_browser() is None:
            note = (
                "No Chromium/Chrome found, so figures are not rendered as PNG: open report.html "
                "for the interactive figures (install Debian's `chromium` to get PNGs)."
            )
        else:
            rendered = write_pngs(report.figures, figures_dir)
            pngs, failed = rendered.paths, rendered.failed
            if failed:
                note = "Some figures could not be rendered as PNG (open report.html for them): " + (
                    "; ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
                )
    html_path = storage.write_text(render_html(report, note), out_dir / "report.html")
    md_path = storage.write_text(
        render_markdown(report, pngs, "report.html", note), out_dir / "report.md"
    )
    return {
        "markdown": md_path,
        "html": html_path,
        "pngs": pngs,
        "failed_figures": failed,
        "note": note,
    }
