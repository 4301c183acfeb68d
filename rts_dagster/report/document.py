"""One report model, two renderings: `report.md` (with PNGs) and a self-contained `report.html`.

Both are rendered from the same `Block`s, so every number appears identically in both.
Untrusted text (labels, run names) is escaped by the renderers: callers pass raw strings
in `Text.parts` marked as `Raw` only for our own formatting.
"""

from __future__ import annotations

import html as _html
import os
import shutil
import tempfile
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


def write_pngs(figures: Sequence[Figure], out_dir: Path, scale: float = 1.5) -> dict[str, Path]:
    """Render every figure to `<out_dir>/<name>.png` through kaleido in one browser session.
    Files are rendered into a temp dir and renamed in, so none is ever half-written."""
    import plotly.io as pio

    browser = find_browser()
    if browser is None or not figures:
        return {}
    os.environ.setdefault("BROWSER_PATH", browser)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".render-") as tmp:
        tmp_paths = [Path(tmp) / f"{f.name}.png" for f in figures]
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
        final = {}
        for f, tmp_path in zip(figures, tmp_paths, strict=True):
            target = out_dir / f"{f.name}.png"
            os.replace(tmp_path, target)
            final[f.name] = target
    return final


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
    """Write report.md, report.html and figures/*.png into `out_dir`; return what was written."""
    figures_dir = out_dir / "figures"
    note = ""
    pngs: dict[str, Path] = {}
    if want_png:
        if find_browser() is None:
            note = (
                "No Chromium/Chrome found, so figures are not rendered as PNG: open report.html "
                "for the interactive figures (install Debian's `chromium` to get PNGs)."
            )
        else:
            pngs = write_pngs(report.figures, figures_dir)
    html_path = storage.write_text(render_html(report, note), out_dir / "report.html")
    md_path = storage.write_text(
        render_markdown(report, pngs, "report.html", note), out_dir / "report.md"
    )
    return {"markdown": md_path, "html": html_path, "pngs": pngs, "note": note}
