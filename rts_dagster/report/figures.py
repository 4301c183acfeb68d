"""Plotly figures of the report. Pure: tables in, `go.Figure` out; every axis has units."""

from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go
import polars as pl
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from rts_dagster.escape import plot_label, plot_text

SEED_COLOURS = qualitative.Plotly
_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 60, "b": 50}}


def _colour(i: int) -> str:
    return SEED_COLOURS[i % len(SEED_COLOURS)]


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _category_axis(names: list[str]) -> dict[str, object]:
    """A category axis over untrusted `names` (already `plot_text`): every name gets its
    tick (plotly would skip every other one), drawn cut to `plot_label` length so a long
    label cannot squeeze the plot; the data keep the full text, which the hover shows."""
    return {
        "type": "category",
        "tickmode": "array",
        "tickvals": names,
        "ticktext": [plot_label(html.unescape(n)) for n in names],
    }


def _dashed_line(value: float, axis: str, across: str, vertical: bool = True) -> go.layout.Shape:
    """A grey dashed reference line at `value` on `axis` ("x", "x2", ...) spanning the
    subplot's `across` axis ("y", "y2", ...): what `add_vline`/`add_hline` draw, without
    their per-call bookkeeping (several ms a line)."""
    across_ref = f"{across} domain"
    if vertical:
        return go.layout.Shape(
            line={"color": "#888", "dash": "dash"},
            type="line",
            x0=value,
            x1=value,
            xref=axis,
            y0=0,
            y1=1,
            yref=across_ref,
        )
    return go.layout.Shape(
        line={"color": "#888", "dash": "dash"},
        type="line",
        x0=0,
        x1=1,
        xref=across_ref,
        y0=value,
        y1=value,
        yref=axis,
    )


def _ref(axis: go.layout.XAxis | go.layout.YAxis) -> str:
    """ "xaxis2" -> "x2": how traces and shapes name an axis."""
    return axis.plotly_name.replace("axis", "")


def _x_title(granularity: str) -> str:
    return "samples of the label (" + ("completions)" if granularity == "completion" else "epochs)")


def _shared_x_title(fig: go.Figure, n_panels: int, title: str, y_title: str) -> None:
    """One x title under the middle of a row of `n_panels` panels that share what their x
    axis means (one title per panel would run into its neighbours' titles), and the y
    title of the first panel; one layout update for all of them."""
    axes: dict[str, dict[str, object]] = {}
    for col in range(1, n_panels + 1):
        middle = col == (n_panels + 1) // 2
        axes[fig.get_subplot(1, col).xaxis.plotly_name] = {"title_text": title if middle else None}
    axes.setdefault(fig.get_subplot(1, 1).yaxis.plotly_name, {})["title_text"] = y_title
    fig.update_layout(axes)


def _by_task_and_seed(table: pl.DataFrame) -> dict[tuple[str, object], pl.DataFrame]:
    """The rows of each (task, seed), each sorted by sample index."""
    return table.sort("sample_index").partition_by("task", "seed", as_dict=True)


def reward_curves(curves: pl.DataFrame, granularity: str) -> go.Figure:
    """Mean reward over labels vs sample index, one panel per task, one colour per seed.

    `curves`: task, seed, sample_index, reward (already averaged over labels/smoothed)."""
    tasks = sorted(curves["task"].unique().to_list())
    fig = make_subplots(
        rows=1,
        cols=max(len(tasks), 1),
        subplot_titles=[plot_text(t) for t in tasks],
        shared_yaxes=True,
    )
    seeds = sorted(curves["seed"].unique().to_list())
    parts = _by_task_and_seed(curves)
    traces, cols = [], []  # added in one call: plotly's per-call bookkeeping is slow
    for col, task in enumerate(tasks, 1):
        for i, seed in enumerate(seeds):
            part = parts.get((task, seed))
            if part is None:
                continue
            traces.append(
                go.Scatter(
                    x=part["sample_index"].to_numpy(),
                    y=part["reward"].to_numpy(),
                    mode="lines",
                    name=f"seed {seed}",
                    legendgroup=f"seed {seed}",
                    showlegend=col == 1,
                    line={"color": _colour(i), "width": 1.5},
                )
            )
            cols.append(col)
    if traces:
        fig.add_traces(traces, rows=[1] * len(cols), cols=cols)
    _shared_x_title(
        fig, len(tasks), _x_title(granularity), "reward (episode score, mean over labels)"
    )
    fig.update_layout(
        title=f"Reward vs sample index ({granularity} stream)", height=380, width=1100, **_LAYOUT
    )
    return fig


def band_overlay(bands: pl.DataFrame, value_title: str, title: str, granularity: str) -> go.Figure:
    """Median line with a p10-p90 shaded band vs sample index, one panel per task, one
    colour per seed. `bands`: task, seed, sample_index, p10, p50, p90."""
    tasks = sorted(bands["task"].unique().to_list())
    seeds = sorted(bands["seed"].unique().to_list())
    fig = make_subplots(
        rows=1,
        cols=max(len(tasks), 1),
        subplot_titles=[plot_text(t) for t in tasks],
        shared_yaxes=True,
    )
    parts = _by_task_and_seed(bands)
    traces, cols = [], []  # added in one call: plotly's per-call bookkeeping is slow
    for col, task in enumerate(tasks, 1):
        for i, seed in enumerate(seeds):
            part = parts.get((task, seed))
            if part is None:
                continue
            x = part["sample_index"].to_numpy()
            colour = _colour(i)
            traces += [
                go.Scatter(
                    x=x,
                    y=part["p90"].to_numpy(),
                    mode="lines",
                    line={"width": 0},
                    showlegend=False,
                    hoverinfo="skip",
                    legendgroup=f"seed {seed}",
                ),
                go.Scatter(
                    x=x,
                    y=part["p10"].to_numpy(),
                    mode="lines",
                    line={"width": 0},
                    fill="tonexty",
                    fillcolor=_rgba(colour, 0.18),
                    showlegend=False,
                    hoverinfo="skip",
                    legendgroup=f"seed {seed}",
                ),
                go.Scatter(
                    x=x,
                    y=part["p50"].to_numpy(),
                    mode="lines",
                    name=f"seed {seed}",
                    legendgroup=f"seed {seed}",
                    showlegend=col == 1,
                    line={"color": colour, "width": 1.5},
                ),
            ]
            cols += [col] * 3
    if traces:
        fig.add_traces(traces, rows=[1] * len(cols), cols=cols)
    _shared_x_title(fig, len(tasks), _x_title(granularity), value_title)
    fig.update_layout(title=title, height=420, width=1100, **_LAYOUT)
    return fig


def noise_distribution(series: pl.DataFrame, noise_col: str, noise_title: str) -> go.Figure:
    """Box (with points) of per-series noise across tasks. `series`: task, label, seed, noise_col."""
    fig = go.Figure()
    for i, task in enumerate(sorted(series["task"].unique().to_list())):
        part = series.filter(pl.col("task") == task)
        fig.add_trace(
            go.Box(
                y=part[noise_col].to_numpy(),
                name=plot_text(task),
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker={"color": _colour(i), "size": 5},
                text=[
                    f"{plot_text(lab)} (seed {s})"
                    for lab, s in zip(part["label"], part["seed"], strict=True)
                ],
                hovertemplate="%{text}: %{y:.4f}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Sampling noise per label series across tasks",
        yaxis_title=noise_title,
        xaxis_title="task",
        showlegend=False,
        height=400,
        **_LAYOUT,
    )
    return fig


def variance_ratios(table: pl.DataFrame) -> go.Figure:
    """Horizontal bars of seed/task (or seed/label) variance ratios with 95% CIs.
    `table`: name, ratio, ratio_ci_low, ratio_ci_high."""
    table = table.filter(pl.col("ratio").is_finite() & (pl.col("ratio") > 0))
    ratio = table["ratio"].to_numpy()
    high = table["ratio_ci_high"].fill_null(np.nan).to_numpy()
    low = table["ratio_ci_low"].fill_null(np.nan).to_numpy()
    # an infinite upper bound (task component not distinguishable from 0) ends at the edge
    finite_high = high[np.isfinite(high)]
    edge = 10.0 * max(finite_high.max() if finite_high.size else 1.0, ratio.max(initial=1.0))
    high = np.where(np.isinf(high), edge, high)
    vr_names = [plot_text(n) for n in table["name"].to_list()]
    fig = go.Figure(
        go.Bar(
            y=vr_names,
            x=ratio,
            orientation="h",
            hovertemplate="%{y}: %{x:.3g}<extra></extra>",
            error_x={
                "type": "data",
                "symmetric": False,
                "array": np.nan_to_num(high - ratio, nan=0.0),
                "arrayminus": np.nan_to_num(ratio - low, nan=0.0),
            },
            marker={"color": _colour(0)},
        )
    )
    fig.update_layout(shapes=[_dashed_line(1.0, "x", "y")])
    fig.update_layout(
        title="Seed variance / task (or label) variance, with exact F 95% interval",
        xaxis_title="variance ratio (dimensionless; > 1: seeds differ more)",
        xaxis_type="log",
        yaxis=_category_axis(vr_names),
        height=max(260, 60 + 40 * table.height),
        **_LAYOUT,
    )
    return fig


def sps_vs_noise(points: pl.DataFrame) -> go.Figure:
    """Local noise vs SPS, binned by SPS, one colour per task.
    `points`: task, sps_bin_center, noise_mean, n."""
    fig = go.Figure()
    for i, task in enumerate(sorted(points["task"].unique().to_list())):
        part = points.filter(pl.col("task") == task).sort("sps_bin_center")
        fig.add_trace(
            go.Scatter(
                x=part["sps_bin_center"].to_numpy(),
                y=part["noise_mean"].to_numpy(),
                mode="lines+markers",
                name=plot_text(task),
                marker={"color": _colour(i), "size": 6},
                line={"color": _colour(i)},
                customdata=part["n"].to_numpy(),
                hovertemplate="SPS %{x:.0f}: noise %{y:.4f} (n=%{customdata})<extra></extra>",
            )
        )
    fig.update_layout(
        title="Local reward noise vs throughput",
        xaxis_title="SPS (agent steps per second, epoch mean)",
        yaxis_title="rolling std of reward (reward units)",
        height=380,
        **_LAYOUT,
    )
    return fig


def timescales(recs: pl.DataFrame, unit: str) -> go.Figure:
    """Tracking-optimal EMA timescale (steady-state Kalman 1/K) per label and regime with
    its interval, in `unit`; LP's configured timescale only where the unit is completions.
    `recs`: name, timescale, timescale_ci_low, timescale_ci_high, lp_timescale."""
    names = [plot_text(n) for n in recs["name"].to_list()]
    ts = recs["timescale"].to_numpy()
    high = recs["timescale_ci_high"].fill_null(np.nan).to_numpy()
    low = recs["timescale_ci_low"].fill_null(np.nan).to_numpy()
    fig = go.Figure(
        go.Scatter(
            x=ts,
            y=names,
            mode="markers",
            marker={"size": 8, "color": _colour(2)},
            hovertemplate="%{y}: %{x:.4g}<extra></extra>",
            error_x={
                "type": "data",
                "symmetric": False,
                "array": np.nan_to_num(high - ts, nan=0.0),
                "arrayminus": np.nan_to_num(ts - low, nan=0.0),
            },
            name="tracking-optimal 1/K",
        )
    )
    lp = recs["lp_timescale"].fill_null(np.nan).to_numpy()
    if unit == "completions" and np.isfinite(lp).any():
        fig.add_trace(
            go.Scatter(
                x=lp,
                y=names,
                mode="markers",
                marker={"size": 9, "symbol": "x", "color": "#c00"},
                name="LP config 1/ema_timescale",
            )
        )
    fig.update_layout(
        title=f"Tracking-optimal EMA timescale per label and regime ({unit})",
        xaxis_title=f"EMA timescale ({unit} of the label, log scale)",
        xaxis_type="log",
        yaxis=_category_axis(names),
        height=max(320, 100 + 22 * recs.height),
        width=1000,
        **_LAYOUT,
    )
    return fig


def noise_vs_progress(bins: pl.DataFrame) -> go.Figure:
    """Trend-robust noise vs progress through the series, median and p10-p90 over series,
    one colour per task. `bins`: task, progress, p10, p50, p90."""
    fig = go.Figure()
    for i, task in enumerate(sorted(bins["task"].unique().to_list())):
        part = bins.filter(pl.col("task") == task).sort("progress")
        x = part["progress"].to_numpy()
        colour = _colour(i)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=part["p90"].to_numpy(),
                mode="lines",
                line={"width": 0},
                showlegend=False,
                hoverinfo="skip",
                legendgroup=task,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=part["p10"].to_numpy(),
                mode="lines",
                line={"width": 0},
                fill="tonexty",
                fillcolor=_rgba(colour, 0.18),
                showlegend=False,
                hoverinfo="skip",
                legendgroup=task,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=part["p50"].to_numpy(),
                mode="lines+markers",
                name=plot_text(task),
                legendgroup=task,
                line={"color": colour},
            )
        )
    fig.update_layout(
        title="Does noise shrink as the label is learned?",
        xaxis_title="progress through the label's series (fraction of its samples)",
        yaxis_title="noise std(diff)/sqrt(2) in the bin (reward units)",
        height=400,
        **_LAYOUT,
    )
    return fig


# --- LP configuration section --------------------------------------------------------------------
LP_SNR_AXIS = "LP SNR relative to Metta default (ratio, log scale)"
# ratios beyond x10 (or below /10) are drawn at the edge of their panel's axis with their value
# written beside them, so one far configuration cannot squeeze the others near x1 together
SNR_CLIP = 10.0
_ROLE_STYLES = {  # role -> legend name, marker
    "other": ("other configuration", {"color": SEED_COLOURS[0], "size": 7, "symbol": "circle"}),
    "default": ("Metta default", {"color": "#444444", "size": 9, "symbol": "square"}),
    "replay_best": (
        "highest replayed SNR (not recommended)",
        {"color": "#ff7f0e", "size": 11, "symbol": "diamond"},
    ),
    "recommended": ("recommended", {"color": "#2ca02c", "size": 14, "symbol": "star"}),
}
TINY = 1e-6  # magnitudes below this print as "<1e-6": their digits mean nothing here


def _exponent_form(number: float, digits: int) -> str:
    """ "2.10e-4" (no zero padding of the exponent, sign only when negative)."""
    mantissa, exponent = f"{number:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def number(value: object) -> str:
    """3 significant digits in one style for the whole report: plain between 0.001 and
    1e5, otherwise "2.10e-4" / "5.50e6"; "<1e-6" (">-1e-6") for a nonzero magnitude below
    `TINY`, so a positive bound never prints as 0; "0", "n/a" (None/NaN), "inf", "-inf"."""
    if value is None:
        return "n/a"
    x = float(value)  # type: ignore[arg-type]
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    size = abs(x)
    if size == 0:
        return "0"
    if size < TINY:
        tiny = _exponent_form(TINY, 1)
        return f"<{tiny}" if x > 0 else f">-{tiny}"
    if 1e-3 <= size < 1e3:
        text = f"{x:#.3g}"
        return text[:-1] if text.endswith(".") else text
    if 1e3 <= size < 1e5:
        return f"{x:.0f}"
    return _exponent_form(x, 3)


def _fmt_ratio(value: float) -> str:
    """ "x1.53", "x<1e-6" is written "<x1e-6"; "n/a" when not finite."""
    if not math.isfinite(value):
        return "n/a"
    text = number(value)
    return f"{text[0]}x{text[1:]}" if text[0] in "<>" else f"x{text}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks spanning [lo, hi] (powers of ten only when that would be too many)."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    steps = (1, 2, 5) if last - first <= 3 else (1,)
    ticks = [m * 10.0**e for e in range(first, last + 1) for m in steps]
    return [t for t in ticks if lo <= t <= hi] or [1.0]


def _off_scale_text(
    ratio: np.ndarray, low: np.ndarray, high: np.ndarray, lo_clip: float, hi_clip: float
) -> tuple[list[str], list[str]]:
    """Text beside each point of an SNR panel, and where (plotly textposition): the value
    of a point drawn at the axis edge, or the bound of a whisker cut there; "" otherwise."""
    texts, sides = [], []
    for v, lo, hi in zip(ratio, low, high, strict=True):
        ci = f"CI {_fmt_ratio(lo)} to {_fmt_ratio(hi)}"
        if math.isfinite(v) and v > hi_clip:
            texts.append(f"{_fmt_ratio(v)} ({ci}) ▸  ")
            sides.append("middle left")
        elif math.isfinite(v) and v < lo_clip:
            texts.append(f"  ◂ {_fmt_ratio(v)} ({ci})")
            sides.append("middle right")
        elif math.isfinite(hi) and hi > hi_clip:
            texts.append(f"CI to {_fmt_ratio(hi)} ▸  ")  # left of the point: clear of the cut
            sides.append("middle left")
        elif math.isfinite(lo) and lo < lo_clip:
            texts.append(f"  CI from {_fmt_ratio(lo)} ◂")
            sides.append("middle right")
        else:
            texts.append("")
            sides.append("middle left")
    return texts, sides


def lp_snr_ratios(points: pl.DataFrame) -> go.Figure:
    """Per task (one panel row each), the replayed LP signal-to-noise ratio of every
    configuration relative to Metta's default, with its 95% CI over seeds, on a log axis.

    `points`: task, config, ratio, ratio_low, ratio_high (ratios, not logs; NaN bounds
    draw no whisker), role in {"other", "default", "recommended", "replay_best"}.
    Each panel's axis covers its own values, up to `SNR_CLIP` either way: a point beyond
    is drawn at the edge with its value and CI written beside it, a whisker beyond is cut
    at the edge with its bound written beside the point."""
    by_task = points.partition_by("task", as_dict=True)
    tasks = sorted(task for (task,) in by_task)
    counts = [max(by_task[(t,)].height, 1) for t in tasks]
    per_row = [40 + 24 * n for n in counts]
    gap, top, bottom = 110, 80, 140  # between rows: x title + next panel title
    plot_area = sum(per_row) + gap * max(len(tasks) - 1, 0)
    height = plot_area + top + bottom
    fig = make_subplots(
        rows=max(len(tasks), 1),
        cols=1,
        subplot_titles=[plot_text(t) for t in tasks],
        row_heights=[h / sum(per_row) for h in per_row] if tasks else None,
        vertical_spacing=gap / plot_area if len(tasks) > 1 else 0.0,
    )
    shown: set[str] = set()
    lo_clip, hi_clip = 1 / SNR_CLIP, SNR_CLIP
    # every trace, then the reference lines, then every axis change, in one call each:
    # plotly's per-call bookkeeping costs more than the figure (the JSON is the same)
    traces: list[go.Scatter] = []
    rows: list[int] = []
    axes: dict[str, dict[str, object]] = {}
    for row, task in enumerate(tasks, 1):
        part = by_task[(task,)]
        ratio = part["ratio"].cast(pl.Float64).to_numpy()
        low = part["ratio_low"].cast(pl.Float64).to_numpy()
        high = part["ratio_high"].cast(pl.Float64).to_numpy()
        finite = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in (ratio, low, high)])
        span_lo = max(min([1.0, *finite.tolist()]), lo_clip)
        span_hi = min(max([1.0, *finite.tolist()]), hi_clip)
        for role, (name, marker) in _ROLE_STYLES.items():
            sel = (part["role"] == role).to_numpy()
            if not sel.any():
                continue
            r = ratio[sel]
            x = np.clip(r, lo_clip, hi_clip)
            up = np.where(np.isfinite(high[sel]), np.clip(high[sel], lo_clip, hi_clip) - x, 0.0)
            down = np.where(np.isfinite(low[sel]), x - np.clip(low[sel], lo_clip, hi_clip), 0.0)
            configs = [plot_text(c) for c in part["config"].filter(pl.Series(sel)).to_list()]
            hover = [
                f"{c}: {_fmt_ratio(v)} (95% CI {_fmt_ratio(lo)} to {_fmt_ratio(hi)})"
                for c, v, lo, hi in zip(configs, r, low[sel], high[sel], strict=True)
            ]
            text, side = _off_scale_text(r, low[sel], high[sel], lo_clip, hi_clip)
            traces.append(
                go.Scatter(
                    x=x,
                    y=configs,
                    mode="markers+text",
                    text=text,
                    textposition=side,
                    textfont={"size": 11, "color": marker["color"]},
                    marker=marker,
                    error_x={
                        "type": "data",
                        "symmetric": False,
                        "array": up,
                        "arrayminus": down,
                        "color": marker["color"],
                        "thickness": 1.5,
                    },
                    name=name,
                    legendgroup=role,
                    showlegend=role not in shown,
                    hovertext=hover,
                    hoverinfo="text",
                )
            )
            rows.append(row)
            shown.add(role)
        subplot = fig.get_subplot(row, 1)
        ticks = _log_ticks(span_lo, span_hi)
        axes[subplot.xaxis.plotly_name] = {
            "type": "log",
            "range": [math.log10(span_lo) - 0.1, math.log10(span_hi) + 0.1],
            "tickmode": "array",
            "tickvals": ticks,
            "ticktext": [f"x{t:g}" for t in ticks],
            "title_text": LP_SNR_AXIS,
        }
        categories = [plot_text(c) for c in part["config"].to_list()]
        axes[subplot.yaxis.plotly_name] = {
            "type": "category",
            "categoryorder": "array",
            "categoryarray": categories,
            "tickmode": "array",  # every configuration gets its tick
            "tickvals": categories,
            "autorange": "reversed",
            "title_text": "configuration",
            "automargin": True,
        }
    if traces:
        fig.add_traces(traces, rows=rows, cols=[1] * len(rows))
    lines = []
    for row in sorted(set(rows)):  # as add_vline: only on subplots that show something
        subplot = fig.get_subplot(row, 1)
        lines.append(_dashed_line(1.0, _ref(subplot.xaxis), _ref(subplot.yaxis)))
    if lines:
        axes["shapes"] = lines
    if axes:
        fig.update_layout(axes)
    fig.update_layout(
        title="Replayed LP signal-to-noise ratio vs Metta's default (95% CI over seeds)",
        height=height,
        width=1000,
        legend={"orientation": "h", "y": -70 / plot_area, "yanchor": "top"},
        **{**_LAYOUT, "margin": {"l": 60, "r": 20, "t": top, "b": bottom}},
    )
    return fig


_LOG2_RANGE = 3.0  # colour scale of probability / uniform: 1/8 .. 8


def lp_sampling(panels: pl.DataFrame) -> go.Figure:
    """Sampling probability of every label over the replayed stream, as heatmaps (label x
    completions replayed), one row of panels per task, panels left to right in `panel`
    order. Colour: probability relative to uniform (1/L) on a log2 scale, so tasks with
    different label counts share one scale; black dots: instants where the label is
    improving (trend == 1).

    `panels`: task, seed, panel (int), role, config, eval_index, label, probability, trend
    (one seed per task)."""
    by_task = panels.partition_by("task", as_dict=True)
    tasks = sorted(task for (task,) in by_task)
    n_cols = max([by_task[(t,)]["panel"].n_unique() for t in tasks] or [1])
    n_labels = {t: max(by_task[(t,)]["label"].n_unique(), 1) for t in tasks}
    per_row = [max(110, 40 + 15 * n_labels[t]) for t in tasks]
    gap = 120  # two-line panel titles and x-axis titles between rows
    top, bottom = 120, 130
    plot_area = sum(per_row) + gap * max(len(tasks) - 1, 0)
    height = plot_area + top + bottom
    titles: list[str] = []
    grid: list[list[tuple[str, pl.DataFrame] | None]] = []
    for task in tasks:
        by_panel = by_task[(task,)].partition_by("panel", as_dict=True)
        cells: list[tuple[str, pl.DataFrame] | None] = []
        for (p,) in sorted(by_panel):
            cell = by_panel[(p,)]
            first = cell.row(0, named=True)
            title = (
                f"{plot_text(task)}, seed {plot_text(first['seed'])}<br>"
                f"{plot_text(first['role'])}: {plot_text(first['config'])}"
            )
            cells.append((title, cell))
        cells += [None] * (n_cols - len(cells))
        grid.append(cells)
        titles += [c[0] if c else "" for c in cells]
    fig = make_subplots(
        rows=max(len(tasks), 1),
        cols=n_cols,
        subplot_titles=titles or None,
        shared_yaxes=True,
        row_heights=[h / sum(per_row) for h in per_row] if tasks else None,
        vertical_spacing=gap / plot_area if len(tasks) > 1 else 0.0,
        horizontal_spacing=0.03,
    )
    fig.update_annotations(font_size=12)  # the subplot titles
    ticks = list(range(-int(_LOG2_RANGE), int(_LOG2_RANGE) + 1))
    ticktext = [
        ("≤" if t == ticks[0] else "≥" if t == ticks[-1] else "")
        + (f"x{2**t:g}" if t >= 0 else f"x1/{2**-t:g}")
        + (" (uniform)" if t == 0 else "")
        for t in ticks
    ]
    # every trace, then every axis change, in one call each: plotly's per-call bookkeeping
    # costs more than the figure itself (the JSON is the same as one call per panel)
    traces: list[go.Heatmap | go.Scatter] = []
    rows: list[int] = []
    cols: list[int] = []
    axes: dict[str, dict[str, object]] = {}
    improving_shown = False
    for row, (task, cells) in enumerate(zip(tasks, grid, strict=True), 1):
        n = n_labels[task]
        for col, cell in enumerate(cells, 1):
            subplot = fig.get_subplot(row, col)
            x_name, y_name = subplot.xaxis.plotly_name, subplot.yaxis.plotly_name
            if cell is None:
                axes.setdefault(x_name, {})["visible"] = False
                continue
            _, part = cell
            labels = sorted(part["label"].unique().to_list())
            instants = np.sort(part["eval_index"].unique().to_numpy())
            li = np.searchsorted(labels, part["label"].to_numpy())
            ti = np.searchsorted(instants, part["eval_index"].to_numpy())
            prob = np.full((len(labels), instants.size), np.nan)
            prob[li, ti] = part["probability"].cast(pl.Float64).to_numpy()
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.log2(np.maximum(prob * n, 2.0 ** (-2 * _LOG2_RANGE)))
            shown_labels = [plot_text(lab) for lab in labels]
            traces.append(
                go.Heatmap(
                    x=instants,
                    y=shown_labels,
                    z=z,
                    customdata=prob,
                    coloraxis="coloraxis",
                    hovertemplate="%{y}<br>%{x} completions replayed<br>"
                    "probability %{customdata:.3g}<extra></extra>",
                )
            )
            rows.append(row)
            cols.append(col)
            imp = part.filter(pl.col("trend") == 1)
            if imp.height:
                # the label of each dot, as the text plotly draws (one conversion per label)
                dot_labels = np.array(shown_labels, dtype=object)[
                    np.searchsorted(labels, imp["label"].to_numpy())
                ]
                traces.append(
                    go.Scatter(
                        x=imp["eval_index"].to_numpy(),
                        y=dot_labels,
                        mode="markers",
                        marker={"color": "black", "size": 3, "opacity": 0.7},
                        name="label improving (trend = 1: rising reward)",
                        legendgroup="improving",
                        showlegend=not improving_shown,
                        hovertemplate="%{y} improving at %{x}<extra></extra>",
                    )
                )
                rows.append(row)
                cols.append(col)
                improving_shown = True
            axes.setdefault(x_name, {})["title_text"] = "completions replayed"
            axes.setdefault(y_name, {}).update(
                type="category",
                categoryorder="array",
                categoryarray=shown_labels,
                autorange="reversed",
                automargin=True,
            )
    if traces:
        fig.add_traces(traces, rows=rows, cols=cols)
    if axes:
        fig.update_layout(axes)
    fig.update_layout(
        title="Sampling probability over the replayed stream (one seed per task)",
        height=height,
        width=1200,
        coloraxis={
            "colorscale": "RdBu",
            "reversescale": True,
            "cmin": -_LOG2_RANGE,
            "cmax": _LOG2_RANGE,
            "colorbar": {
                "title": {"text": "probability / uniform (1/L), log scale", "side": "right"},
                "tickvals": ticks,
                "ticktext": ticktext,
                "len": min(1.0, 500 / height),
                "y": 1.0,
                "yanchor": "top",
            },
        },
        legend={"orientation": "h", "y": -70 / plot_area, "yanchor": "top"},
        **{**_LAYOUT, "margin": {"l": 60, "r": 20, "t": top, "b": bottom}},
    )
    return fig


# --- experiments section: arms of one task compared with its baseline -----------------------------
EXPERIMENT_X_TITLE = "agent steps"
EXPERIMENT_REWARD_TITLE = "reward (mean over labels)"


def _band_trace(
    x: np.ndarray, low: np.ndarray, high: np.ndarray, colour: str, group: str
) -> go.Scatter | None:
    """A filled polygon between `low` and `high` over the bins where both are finite
    (None when there is none: e.g. a one-seed arm has no interval)."""
    keep = np.isfinite(x) & np.isfinite(low) & np.isfinite(high)
    if not keep.any():
        return None
    xs, lo, hi = x[keep], low[keep], high[keep]
    return go.Scatter(
        x=np.concatenate([xs, xs[::-1]]),
        y=np.concatenate([hi, lo[::-1]]),
        mode="lines",
        line={"width": 0},
        fill="toself",
        fillcolor=_rgba(colour, 0.18),
        showlegend=False,
        hoverinfo="skip",
        legendgroup=group,
    )


def _arm_lines(fig: go.Figure, table: pl.DataFrame, arms: list[str], value: str) -> None:
    """One line per arm (legend = arm name, cut to `plot_label` length) with its interval
    band; `table`: arm, agent_step, `value`, ci_low, ci_high. An arm keeps its colour (its
    place in `arms`) in every figure, also where another arm has no rows."""
    for i, arm in enumerate(arms):
        part = table.filter(pl.col("arm") == arm).sort("agent_step")
        if part.height == 0:
            continue
        colour = _colour(i)
        x = part["agent_step"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        y = part[value].cast(pl.Float64).fill_null(np.nan).to_numpy()
        low = part["ci_low"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        high = part["ci_high"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        group = f"arm {i}"
        band = _band_trace(x, low, high, colour, group)
        if band is not None:
            fig.add_trace(band)
        full = plot_text(arm)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=plot_label(arm),
                legendgroup=group,
                line={"color": colour, "width": 1.8},
                marker={"size": 4, "color": colour},
                text=[full] * part.height,  # not drawn (mode has no text): hover only
                hovertemplate="%{text}<br>%{x:.4g} agent steps: %{y:.4g}<extra></extra>",
            )
        )


def experiment_curves(curves: pl.DataFrame, arms: list[str], title: str) -> go.Figure:
    """Reward over agent steps of each arm of one task and granularity (mean over seeds of
    each run's mean over labels), with the interval over seeds as a band.

    `curves`: arm, agent_step, mean_reward, ci_low, ci_high; `arms` in legend order;
    `title` is untrusted text (escaped here)."""
    fig = go.Figure()
    _arm_lines(fig, curves, arms, "mean_reward")
    fig.update_layout(
        title=plot_label(title, 120),
        xaxis_title=EXPERIMENT_X_TITLE,
        yaxis_title=EXPERIMENT_REWARD_TITLE,
        height=420,
        width=1000,
        **_LAYOUT,
    )
    return fig


def experiment_difference(difference: pl.DataFrame, arms: list[str], title: str) -> go.Figure:
    """Arm minus baseline reward over agent steps, one line per arm with its interval band
    and a dashed zero line (no difference).

    `difference`: arm, agent_step, difference, ci_low, ci_high; `title` is untrusted text."""
    fig = go.Figure()
    _arm_lines(fig, difference, arms, "difference")
    fig.update_layout(shapes=[_dashed_line(0.0, "y", "x", vertical=False)])
    fig.update_layout(
        title=plot_label(title, 120),
        xaxis_title=EXPERIMENT_X_TITLE,
        yaxis_title="arm - baseline, reward (mean over labels)",
        height=420,
        width=1000,
        **_LAYOUT,
    )
    return fig
