"""Report figures stay readable: axis titles do not run into each other, one far LP
configuration does not squeeze the rest of its panel, and printed numbers keep their meaning."""

import itertools
import math

import numpy as np
import polars as pl
import pytest

from rts_dagster.report import figures
from rts_dagster.report.build import _fmt_ci

TITLE_FONT_PX = 14  # plotly's axis title font in the report template is smaller; be strict
CHAR_WIDTH = 0.6  # width of an average character, in font sizes (generous for sans-serif)


def _curves(lengths: dict[str, int]) -> pl.DataFrame:
    rng = np.random.default_rng(7)
    frames = []
    for task, n in lengths.items():
        for seed in (1, 2, 3):
            i = np.arange(n)
            frames.append(
                pl.DataFrame(
                    {
                        "task": task,
                        "seed": seed,
                        "sample_index": i,
                        "reward": 0.1 + 0.6 * i / n + rng.normal(0, 0.03, n),
                    }
                )
            )
    return pl.concat(frames)


def _x_title_extents(fig) -> list[tuple[float, float]]:
    """Pixel extent [left, right] of every drawn x-axis title, centred under its axis."""
    width = fig.layout.width or 700  # kaleido's default width
    margin = fig.layout.margin
    plot = width - margin.l - margin.r
    out = []
    for name in [k for k in fig.layout if k.startswith("xaxis")]:
        axis = fig.layout[name]
        text = axis.title.text
        if not text:
            continue
        centre = margin.l + plot * (axis.domain[0] + axis.domain[1]) / 2
        half = len(text) * CHAR_WIDTH * TITLE_FONT_PX / 2
        out.append((centre - half, centre + half))
    return sorted(out)


@pytest.mark.parametrize("n_tasks", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["reward_curves", "band_overlay"])
def test_x_titles_of_task_panels_do_not_overlap(kind, n_tasks):
    lengths = dict(
        list({"assembly_lines": 1200, "fixed_maps": 300, "v": 90, "w": 50}.items())[:n_tasks]
    )
    curves = _curves(lengths)
    if kind == "reward_curves":
        fig = figures.reward_curves(curves, "completion")
    else:
        bands = curves.with_columns(
            p10=pl.col("reward") - 0.1, p50="reward", p90=pl.col("reward") + 0.1
        )
        fig = figures.band_overlay(bands, "slope", "title", "completion")
    extents = _x_title_extents(fig)
    assert extents, "the x axis must say what it counts and in which unit"
    assert all(
        "completions" in fig.layout[k].title.text
        for k in fig.layout
        if k.startswith("xaxis") and fig.layout[k].title.text
    )
    width = fig.layout.width or 700
    assert all(left >= 0 and right <= width for left, right in extents)  # inside the image
    assert all(a[1] < b[0] for a, b in itertools.pairwise(extents))  # no two titles touch


def _snr_points(
    task: str, ratios: list[float], lows: list[float], highs: list[float]
) -> pl.DataFrame:
    n = len(ratios)
    return pl.DataFrame(
        {
            "task": [task] * n,
            "config": [f"{task}_c{i}" for i in range(n)],
            "ratio": ratios,
            "ratio_low": lows,
            "ratio_high": highs,
            "role": ["default"] + ["other"] * (n - 1),
        }
    )


def test_one_far_configuration_does_not_squeeze_its_panel_or_the_others():
    far = _snr_points(
        "far",
        [1.0, 0.9, 1.1, 1.2, 213.0, 1.05],
        [1.0, 0.8, 0.95, 1.0, 22.2, 0.7],
        [1.0, 1.05, 1.3, 1.4, 2036.0, 946.0],  # the last: a whisker far beyond its point
    )
    near = _snr_points(
        "near", [1.0, 0.97, 1.03, 1.08], [1.0, 0.93, 0.99, 1.01], [1.0, 1.01, 1.07, 1.15]
    )
    low = _snr_points("low", [1.0, 0.0111, 1.2], [1.0, 0.00495, 1.1], [1.0, 0.0247, 1.3])
    fig = figures.lp_snr_ratios(pl.concat([far, near, low]))
    by_title = {a.text: i for i, a in enumerate(fig.layout.annotations, 1)}  # row of each task
    for task, frame in (("far", far), ("near", near), ("low", low)):
        axis = fig.layout["xaxis" if by_title[task] == 1 else f"xaxis{by_title[task]}"]
        lo, hi = axis.range
        assert axis.type == "log"
        # at most SNR_CLIP either way (plus the pad), so x1 +- 10% stays readable
        assert (
            lo >= -math.log10(figures.SNR_CLIP) - 0.11 and hi <= math.log10(figures.SNR_CLIP) + 0.11
        )
        # every point is inside the drawn range
        xs = np.log10(np.clip(frame["ratio"].to_numpy(), 1 / figures.SNR_CLIP, figures.SNR_CLIP))
        assert (xs >= lo).all() and (xs <= hi).all()
    near_axis = fig.layout[f"xaxis{by_title['near']}"]
    # a panel of near-default ratios spans its own values, not the clip
    assert near_axis.range[1] - near_axis.range[0] < math.log10(1.15 / 0.93) + 0.21
    texts = {
        y: t
        for trace in fig.data
        for y, t in zip(trace.y, trace.text or [""] * len(trace.y), strict=True)
    }
    # the far point sits at the edge with its value and its interval written beside it
    assert "x213" in texts["far_c4"] and "x22.2" in texts["far_c4"] and "x2036" in texts["far_c4"]
    assert "x946" in texts["far_c5"]  # a cut whisker says where it ends
    assert "x0.0111" in texts["low_c1"] and "x0.00495" in texts["low_c1"]
    assert texts["near_c1"] == "" and texts["far_c1"] == ""  # on-scale points need no text


def test_interval_text_keeps_tiny_positive_bounds_positive():
    assert _fmt_ci(0.0123, 5.83e-33, 0.04) == "0.0123 [<1e-6, 0.0400]"
    assert _fmt_ci(0.5, 0.1, math.inf) == "0.500 [0.100, inf]"
    assert _fmt_ci(2.5e-5, 1.2e-6, 3.0e-4) == "2.50e-5 [1.20e-6, 3.00e-4]"
    assert _fmt_ci(float("nan"), 0.0, 1.0) == "n/a"
    assert figures.number(0.0) == "0" and figures.number(-3e-9) == ">-1e-6"
