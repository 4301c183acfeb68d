"""Plotly figures of the report. Pure: tables in, `go.Figure` out; every axis has units."""

from __future__ import annotations

import plotly.graph_objects as go
import polars as pl
from plotly.colors import qualitative
from plotly.subplots import make_subplots

SEED_COLOURS = qualitative.Plotly
_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 60, "b": 50}}


def _colour(i: int) -> str:
    return SEED_COLOURS[i % len(SEED_COLOURS)]


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _x_title(granularity: str) -> str:
    return "samples of the label (" + ("completions)" if granularity == "completion" else "epochs)")


def reward_curves(curves: pl.DataFrame, granularity: str) -> go.Figure:
    """Mean reward over labels vs sample index, one panel per task, one colour per seed.

    `curves`: task, seed, sample_index, reward (already averaged over labels/smoothed)."""
    tasks = sorted(curves["task"].unique().to_list())
    fig = make_subplots(rows=1, cols=max(len(tasks), 1), subplot_titles=tasks, shared_yaxes=True)
    seeds = sorted(curves["seed"].unique().to_list())
    for col, task in enumerate(tasks, 1):
        for i, seed in enumerate(seeds):
            part = curves.filter((pl.col("task") == task) & (pl.col("seed") == seed)).sort(
                "sample_index"
            )
            if part.height == 0:
                continue
            fig.add_trace(
                go.Scatter(
                    x=part["sample_index"].to_numpy(),
                    y=part["reward"].to_numpy(),
                    mode="lines",
                    name=f"seed {seed}",
                    legendgroup=f"seed {seed}",
                    showlegend=col == 1,
                    line={"color": _colour(i), "width": 1.5},
                ),
                row=1,
                col=col,
            )
        unit = "completions" if granularity == "completion" else "epochs"
        fig.update_xaxes(title_text=f"sample index per label ({unit})", row=1, col=col)
    fig.update_yaxes(title_text="reward (episode score, mean over labels)", row=1, col=1)
    fig.update_layout(title=f"Reward vs sample index ({granularity} stream)", height=380, **_LAYOUT)
    return fig


def band_overlay(bands: pl.DataFrame, value_title: str, title: str, granularity: str) -> go.Figure:
    """Median line with a p10-p90 shaded band vs sample index, one panel per task, one
    colour per seed. `bands`: task, seed, sample_index, p10, p50, p90."""
    tasks = sorted(bands["task"].unique().to_list())
    seeds = sorted(bands["seed"].unique().to_list())
    fig = make_subplots(rows=1, cols=max(len(tasks), 1), subplot_titles=tasks, shared_yaxes=True)
    for col, task in enumerate(tasks, 1):
        for i, seed in enumerate(seeds):
            part = bands.filter((pl.col("task") == task) & (pl.col("seed") == seed)).sort(
                "sample_index"
            )
            if part.height == 0:
                continue
            x = part["sample_index"].to_numpy()
            colour = _colour(i)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=part["p90"].to_numpy(),
                    mode="lines",
                    line={"width": 0},
                    showlegend=False,
                    hoverinfo="skip",
                    legendgroup=f"seed {seed}",
                ),
                row=1,
                col=col,
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
                    legendgroup=f"seed {seed}",
                ),
                row=1,
                col=col,
            )
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=part["p50"].to_numpy(),
                    mode="lines",
                    name=f"seed {seed}",
                    legendgroup=f"seed {seed}",
                    showlegend=col == 1,
                    line={"color": colour, "width": 1.5},
                ),
                row=1,
                col=col,
            )
        middle = col == (len(tasks) + 1) // 2  # one x title: they would overlap
        fig.update_xaxes(title_text=_x_title(granularity) if middle else None, row=1, col=col)
    fig.update_yaxes(title_text=value_title, row=1, col=1)
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
                name=task,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker={"color": _colour(i), "size": 5},
                text=[
                    f"{lab} (seed {s})" for lab, s in zip(part["label"], part["seed"], strict=True)
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
    table = table.filter(pl.col("ratio").is_finite())
    fig = go.Figure(
        go.Bar(
            y=table["name"].to_list(),
            x=table["ratio"].to_numpy(),
            orientation="h",
            error_x={
                "type": "data",
                "symmetric": False,
                "array": (table["ratio_ci_high"] - table["ratio"]).to_numpy(),
                "arrayminus": (table["ratio"] - table["ratio_ci_low"]).to_numpy(),
            },
            marker={"color": _colour(0)},
        )
    )
    fig.add_vline(x=1.0, line_dash="dash", line_color="#888")
    fig.update_layout(
        title="Seed variance / task (or label) variance, with 95% bootstrap CI",
        xaxis_title="variance ratio (dimensionless; > 1: seeds differ more)",
        xaxis_type="log",
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
                name=task,
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


def timescales(recs: pl.DataFrame) -> go.Figure:
    """Recommended EMA timescale per label with its CI, next to the LP config's.
    `recs`: name, timescale, timescale_ci_low, timescale_ci_high, lp_timescale."""
    fig = go.Figure(
        go.Scatter(
            x=recs["timescale"].to_numpy(),
            y=recs["name"].to_list(),
            mode="markers",
            marker={"size": 8, "color": _colour(2)},
            error_x={
                "type": "data",
                "symmetric": False,
                "array": (recs["timescale_ci_high"] - recs["timescale"]).to_numpy(),
                "arrayminus": (recs["timescale"] - recs["timescale_ci_low"]).to_numpy(),
            },
            name="recommended 1/K",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=recs["lp_timescale"].to_numpy(),
            y=recs["name"].to_list(),
            mode="markers",
            marker={"size": 9, "symbol": "x", "color": "#c00"},
            name="LP config 1/ema_timescale",
        )
    )
    fig.update_layout(
        title="EMA timescale: recommended (steady-state Kalman gain) vs configured",
        xaxis_title="EMA timescale (completions of the label, log scale)",
        xaxis_type="log",
        # every label gets its tick (plotly would skip every other one)
        yaxis={"type": "category", "tickmode": "array", "tickvals": recs["name"].to_list()},
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
                name=task,
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
