"""One report model, two renderings: `report.md` (with PNGs) and a self-contained `report.html`.

Both are rendered from the same `Block`s, so every number appears identically in both.
Untrusted text (labels, run names) is escaped by the renderers: callers pass raw strings
in `Text.parts` marked as `Raw` only for our own formatting.
"""

from __future__ import annotations

import hashlib
import html as _html
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

import plotly.graph_objects as go
import polars as pl

from rts_dagster import storage
from rts_dagster.escape import html_text, md


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


# our own relative link targets only (e.g. "tables/learning.csv"): no scheme, no "..", no
# character a renderer would have to escape
_LINK_TARGET = re.compile(r"[a-z0-9_]+(/[a-z0-9_]+)*\.[a-z]+")


@dataclass(frozen=True)
class Link:
    """A relative link to a file the report writes beside itself; `href` is ours, never
    user text (checked), `text` is escaped like any other part."""

    text: str
    href: str

    def __post_init__(self) -> None:
        if not _LINK_TARGET.fullmatch(self.href):
            raise ValueError(f"not one of the report's own relative paths: {self.href!r}")


@dataclass(frozen=True)
class Paragraph:
    """Plain text; every part is escaped (a `Link` part becomes a link). `bold` parts are
    emphasised."""

    parts: Sequence[str | Link]
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
class FigureRecipe:
    """A figure to draw: `draw(*args)` (a pure function of its inputs, report/figures.py).
    Its `key` names the drawing code and every input, so `write_report` reuses the JSON of
    the same figure drawn for an earlier report instead of drawing it again: plotly builds
    a figure slowly, and an incremental refresh changes the inputs of few figures."""

    draw: Callable[..., go.Figure]
    args: tuple[object, ...]

    @cached_property
    def figure(self) -> go.Figure:
        return self.draw(*self.args)

    @cached_property
    def key(self) -> str | None:
        """sha256 of the drawing code (its module and escape.py), the plotly and polars
        versions and every argument; None when an argument cannot be digested."""
        digest = hashlib.sha256(_code_fingerprint(self.draw.__module__).encode())
        digest.update(f"{self.draw.__module__}.{self.draw.__qualname__}".encode())
        return digest.hexdigest()[:32] if _digest_into(digest, self.args) else None


@cache
def _code_fingerprint(module: str) -> str:
    import plotly

    from rts_dagster import escape

    parts = [plotly.__version__, pl.__version__]
    for path in (sys.modules[module].__file__, escape.__file__):
        parts.append(Path(path).read_text(encoding="utf-8") if path else module)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _digest_into(digest: hashlib._Hash, value: object) -> bool:
    """Feed `value` into `digest` exactly; False when its type is not one a figure input
    should have (then the figure is not reused)."""
    if isinstance(value, pl.DataFrame):
        digest.update(f"frame{value.height}:{value.schema!r};".encode())
        for column in value.iter_columns():
            _column_into(digest, column)
        return True
    if value is None or isinstance(value, str | int | float | bool):
        digest.update(repr((type(value).__name__, value)).encode() + b";")
        return True
    if isinstance(value, list | tuple):
        digest.update(b"seq%d:" % len(value))
        return all(_digest_into(digest, v) for v in value)
    if isinstance(value, dict):
        digest.update(b"map%d:" % len(value))
        return all(_digest_into(digest, kv) for kv in sorted(value.items(), key=repr))
    return False


def _column_into(digest: hashlib._Hash, column: pl.Series) -> None:
    """A column's exact content: its null mask, then the bits of its values (numbers,
    booleans, dates) or their bytes and lengths (text). Arrow buffers would not do: equal
    text columns can be laid out in different buffers."""
    nulls = column.is_null()
    digest.update(nulls.to_numpy().tobytes() if nulls.any() else b"no nulls;")
    if isinstance(column.dtype, pl.Categorical | pl.Enum):
        column = column.cast(pl.String)
    if column.dtype == pl.String:
        text = column.fill_null("")
        digest.update(text.str.len_bytes().to_numpy().tobytes())
        digest.update(text.str.join("").item().encode())
    elif column.dtype.is_numeric() or column.dtype.is_temporal() or column.dtype == pl.Boolean:
        physical = column.to_physical()
        filled = physical.fill_null(False if physical.dtype == pl.Boolean else 0)
        digest.update(filled.to_numpy().tobytes())
    else:  # nested values: rare in a figure's input
        digest.update(repr(column.to_list()).encode())


@dataclass(frozen=True, eq=False)
class Figure:
    """A figure block: `name` is the file stem (ours, not user text); `source` the figure,
    or the recipe that draws it when it is first needed."""

    name: str
    source: go.Figure | FigureRecipe
    caption: str

    @property
    def figure(self) -> go.Figure:
        return self.source.figure if isinstance(self.source, FigureRecipe) else self.source

    @property
    def key(self) -> str | None:
        """The recipe's key: equal keys draw equal figures (None: not known)."""
        return self.source.key if isinstance(self.source, FigureRecipe) else None


Block = Heading | Paragraph | Bullets | Table | Figure


TABLES_DIR = "tables"  # report/tables/<name>.csv: every row of the tables the report draws from
_TABLE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def table_href(name: str) -> str:
    """The relative path report.md/html link `name`'s CSV by."""
    return f"{TABLES_DIR}/{name}.csv"


@dataclass
class Report:
    title: str
    blocks: list[Block] = field(default_factory=list)
    # name -> every row of a table the report draws from, written as tables/<name>.csv;
    # the names are ours (checked), so no task label ever becomes a file name
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    def add_table_file(self, name: str, table: pl.DataFrame) -> str:
        """Keep `table` for tables/<name>.csv; returns the relative link to it."""
        if not _TABLE_NAME.fullmatch(name):
            raise ValueError(f"table file names are the report's own: {name!r}")
        self.tables[name] = table
        return table_href(name)

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


# Browser tabs rendering PNGs at once (`warm_renderer`): figures are rendered in parallel
# on a machine's cores; more tabs than cores only add memory.
RENDER_TABS = max(1, min(4, os.cpu_count() or 1))
_WARMING: list[threading.Thread] = []  # the thread rendering a first figure in each tab


def warm_renderer() -> bool:
    """Start kaleido's browser with `RENDER_TABS` tabs in the background, and have each
    tab render a trivial figure (a tab's first render loads plotly.js, ~1 s), so that the
    figures rendered later in this process take ~0.3 s each, several at once, instead of
    a ~1.5 s Chromium boot first (`rts refresh` calls this before the aggregate step,
    which runs the report in-process). Returns False, starting nothing, when no browser is
    found. Idempotent; `stop_renderer` (or the process' exit) closes it."""
    browser = find_browser()
    if browser is None:
        return False
    os.environ.setdefault("BROWSER_PATH", browser)
    quiet_ignored_browser_messages()
    import kaleido

    kaleido.start_sync_server(n=RENDER_TABS, silence_warnings=True)
    if not _WARMING:
        # plotly passes kaleido request options a running server ignores (nothing is
        # fetched: plotly.js is bundled); set here, not per call: catch_warnings is not
        # thread-safe and the first renders run beside the steps
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
        thread = threading.Thread(target=_first_renders, name="rts-warm-tabs", daemon=True)
        _WARMING.append(thread)
        thread.start()
    return True


def _first_renders() -> None:
    import plotly.io as pio

    tiny = {"data": [{"type": "scatter", "x": [0, 1], "y": [0, 1]}], "layout": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="rts-warm-") as tmp:
            paths = [Path(tmp) / f"{i}.png" for i in range(RENDER_TABS)]
            pio.write_images([tiny] * RENDER_TABS, paths, format="png", validate=False)
    except Exception:  # only a head start: the report renders and reports failures itself
        return


def stop_renderer() -> None:
    """Close the browser `warm_renderer` started (nothing if none runs)."""
    while _WARMING:
        _WARMING.pop().join(timeout=30)
    if "kaleido" not in sys.modules:
        return
    import kaleido

    kaleido.stop_sync_server(silence_warnings=True)


def _renderer_running() -> bool:
    if "kaleido" not in sys.modules:
        return False
    from kaleido import _sync_server

    return _sync_server.GlobalKaleidoServer().is_running()


def _write_images(
    figures: Sequence[Figure], texts: dict[str, FigureJson], paths: list[Path], scale: float
) -> str:
    """Render `figures` to `paths` in one kaleido call: "" or the error it raised. Through
    the warm browser when one runs; if that fails (e.g. the browser died), it is closed and
    the batch rendered once more the usual way."""
    import plotly.io as pio

    def render() -> None:
        with warnings.catch_warnings():
            # plotly passes kaleido its request headers, which a running server ignores;
            # nothing is fetched (plotly.js is bundled), so that warning says nothing
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            # kaleido 1.5 ignores a figure's own layout size unless it is passed
            # explicitly (None: kaleido's default 700 x 500)
            pio.write_images(
                [texts[f.name].as_dict() for f in figures],
                paths,
                format="png",
                scale=scale,
                validate=False,
                width=[texts[f.name].width for f in figures],
                height=[texts[f.name].height for f in figures],
            )

    try:
        render()
    except Exception as exc:  # the missing files are diagnosed by the caller
        if not _renderer_running():
            return f"{type(exc).__name__}: {exc}"
        stop_renderer()
        try:
            render()
        except Exception as again:
            return f"{type(again).__name__}: {again}"
    return ""


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


@dataclass(frozen=True)
class FigureJson:
    """A figure's plotly JSON (`go.Figure.to_json()`) and its layout size."""

    text: str
    width: object
    height: object

    @classmethod
    def of(cls, figure: go.Figure) -> FigureJson:
        return cls(figure.to_json(), figure.layout.width, figure.layout.height)

    def as_dict(self) -> dict:
        return json.loads(self.text)


FIGURE_JSON_DIR = "json"  # figures/json/<name>.<key>.json: what each figure's recipe drew


def figure_json(figures: Sequence[Figure], out_dir: Path) -> dict[str, FigureJson]:
    """Each figure's JSON. A figure drawn from a recipe whose key names a file in
    `<out_dir>/json/` (written when an earlier report drew it) is read, not drawn again;
    one drawn now is kept there, and the files of keys no longer current are removed."""
    json_dir = out_dir / FIGURE_JSON_DIR
    out: dict[str, FigureJson] = {}
    for f in figures:
        path = json_dir / f"{f.name}.{f.key}.json" if f.key else None
        found = _read_figure_json(path) if path is not None else None
        if found is None:
            found = FigureJson.of(f.figure)
            if path is not None:
                size = json.dumps({"width": found.width, "height": found.height})
                storage.write_text(f"{size}\n{found.text}", path)
        out[f.name] = found
    if json_dir.is_dir():
        current = {f"{f.name}.{f.key}.json" for f in figures if f.key}
        for path in json_dir.glob("*.json"):
            if path.name not in current:
                path.unlink(missing_ok=True)
    return out


def _read_figure_json(path: Path) -> FigureJson | None:
    """The figure JSON kept at `path` (its size on the first line), or None when the file
    is missing or not of that form."""
    try:
        head, _, text = path.read_text(encoding="utf-8").partition("\n")
        size = json.loads(head)
        return FigureJson(text, size["width"], size["height"]) if text else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _render_alone(figure: FigureJson, scale: float) -> tuple[bytes | None, str]:
    """Render one figure by itself: (png, "") or (None, the cause). Used for a figure the
    batch call did not write, to name why (kaleido's batch call drops it silently)."""
    import plotly.io as pio

    try:
        png = pio.to_image(
            figure.as_dict(),
            format="png",
            scale=scale,
            validate=False,
            width=figure.width,
            height=figure.height,
        )
    except Exception as exc:  # any renderer failure is reported, not raised
        return None, f"{type(exc).__name__}: {exc}"
    return png, ""


def write_pngs(
    figures: Sequence[Figure],
    out_dir: Path,
    scale: float = 1.5,
    texts: dict[str, FigureJson] | None = None,
) -> RenderedPngs:
    """Render every figure to `<out_dir>/<name>.png` through kaleido in one browser session.

    All are rendered into a temp dir first and only then renamed in, so the figures dir
    never mixes a new render with pictures of the previous one; a figure that fails is
    named with its cause and the others are kept. Stale temp dirs of a killed render are
    removed first. `texts`: the figures' JSON when the caller has it (`figure_json`)."""

    remove_stale_render_dirs(out_dir)
    quiet_ignored_browser_messages()
    browser = find_browser()
    if browser is None or not figures:
        return RenderedPngs({}, {})
    os.environ.setdefault("BROWSER_PATH", browser)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a figure whose JSON (data, layout, size) and scale are those of its PNG on disk is not
    # rendered again: after a refresh that changed one task most figures are the same
    if texts is None:
        texts = figure_json(figures, out_dir)
    digests = {f.name: _figure_digest(texts[f.name], scale) for f in figures}
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
        batch_error = _write_images(figures, texts, tmp_paths, scale)
        for f, tmp_path in zip(figures, tmp_paths, strict=True):
            if not tmp_path.is_file() or tmp_path.stat().st_size == 0:
                png, why = _render_alone(texts[f.name], scale)
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


def _figure_digest(figure: FigureJson, scale: float) -> str:
    text = f"{scale}|{figure.width}|{figure.height}|{figure.text}"
    return hashlib.sha256(text.encode()).hexdigest()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _md_parts(parts: Sequence[str | Link]) -> str:
    """The parts of a paragraph as Markdown. Beside a link the spaces at a text part's
    edges are kept (`md` drops them), so the link does not run into the words."""
    if not any(isinstance(p, Link) for p in parts):
        return "".join(md(p) for p in parts)
    out = []
    for part in parts:
        if isinstance(part, Link):
            out.append(f"[{md(part.text)}]({part.href})")
            continue
        lead = " " if part[:1].isspace() else ""
        trail = " " if part[-1:].isspace() else ""
        out.append(f"{lead}{md(part)}{trail}" if part.strip() else lead)
    return "".join(out)


def _html_part(part: str | Link) -> str:
    if isinstance(part, Link):
        return f"<a href='{_html.escape(part.href, quote=True)}'>{html_text(part.text)}</a>"
    return html_text(part)


def render_markdown(report: Report, pngs: dict[str, Path], html_name: str, note: str) -> str:
    lines = [f"# {md(report.title)}", ""]
    if note:
        lines += [f"> {md(note)}", ""]
    for block in report.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + md(block.text), ""]
        elif isinstance(block, Paragraph):
            text = _md_parts(block.parts)
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


def render_html(report: Report, note: str, texts: dict[str, FigureJson] | None = None) -> str:
    """The self-contained HTML; `texts`: the figures' JSON when the caller has it."""
    import plotly.io as pio
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
            text = "".join(_html_part(p) for p in block.parts)
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
            # from the figure's JSON: the same div as the figure's own to_html
            source = (texts or {}).get(block.name) or FigureJson.of(block.figure)
            div = pio.to_html(
                source.as_dict(),
                validate=False,
                full_html=False,
                include_plotlyjs=False,
                div_id=f"fig-{block.name}",
            )
            parts.append(
                f"<figure id='{_html.escape(block.name, quote=True)}'>{div}"
                f"<figcaption>{html_text(block.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


# A cell starting with one of these is run as a formula by spreadsheets (CSV injection):
# such text cells get a leading apostrophe, which spreadsheets show as plain text.
_FORMULA_START = r"^[=+\-@\t\r]"


def _as_text(column: pl.Expr) -> pl.Expr:
    return pl.when(column.str.contains(_FORMULA_START)).then("'" + column).otherwise(column)


def csv_text(table: pl.DataFrame) -> str:
    """`table` as CSV, quoted where needed by polars' writer (a label is one cell, whatever
    it holds); a list cell (run ids, ...) becomes one text cell joined by ", ", a struct
    cell its JSON. Text cells that a spreadsheet would run as a formula (starting with =,
    +, -, @, tab or CR: labels and run names are untrusted) start with an apostrophe."""
    flat = []
    for name, dtype in table.schema.items():
        column = pl.col(name)
        if isinstance(dtype, pl.List | pl.Array):
            flat.append(_as_text(column.cast(pl.List(pl.String)).list.join(", ")).alias(name))
        elif isinstance(dtype, pl.Struct):
            flat.append(column.struct.json_encode())
        elif dtype in (pl.String, pl.Categorical, pl.Enum) or isinstance(dtype, pl.Enum):
            flat.append(_as_text(column.cast(pl.String)).alias(name))
        else:
            flat.append(column)
    return table.select(flat).write_csv()


def write_tables(tables: dict[str, pl.DataFrame], out_dir: Path) -> dict[str, Path]:
    """Write every table to `<out_dir>/tables/<name>.csv` (atomically) and remove the CSVs
    an earlier report wrote that this one no longer has, so none is left stale."""
    tables_dir = out_dir / TABLES_DIR
    written = {
        name: storage.write_text(csv_text(table), tables_dir / f"{name}.csv")
        for name, table in tables.items()
    }
    if tables_dir.is_dir():
        for path in tables_dir.glob("*.csv"):
            if path.stem not in tables and _TABLE_NAME.fullmatch(path.stem) and path.is_file():
                path.unlink(missing_ok=True)
    return written


def write_report(report: Report, out_dir: Path, want_png: bool = True) -> dict[str, object]:
    """Write report.md, report.html, figures/*.png and tables/*.csv into `out_dir`; return
    what was written (`failed_figures`: name -> cause of each figure not rendered; the
    note says them too). The tables come first: the report links them."""
    tables = write_tables(report.tables, out_dir)
    figures_dir = out_dir / "figures"
    texts = figure_json(report.figures, figures_dir)
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
            rendered = write_pngs(report.figures, figures_dir, texts=texts)
            pngs, failed = rendered.paths, rendered.failed
            if failed:
                note = "Some figures could not be rendered as PNG (open report.html for them): " + (
                    "; ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
                )
    html_path = storage.write_text(render_html(report, note, texts), out_dir / "report.html")
    md_path = storage.write_text(
        render_markdown(report, pngs, "report.html", note), out_dir / "report.md"
    )
    return {
        "markdown": md_path,
        "html": html_path,
        "pngs": pngs,
        "tables": tables,
        "failed_figures": failed,
        "note": note,
    }
