"""Answers to two questions the report asks, per task, with intervals over seeds.

- Does noise shrink as a label is learned? Per series, the trend-robust noise of the last
  tenth of the series over that of the first tenth (`noise_by_progress`); per seed the
  geometric mean over its labels; across seeds the t interval on logs (each run counts once,
  so n = runs, normally the seeds; the interval holds at 3).
- Do SPS dips come with noisier rewards? Per series, the Pearson correlation of SPS with the
  rolling reward std (`series_metrics.sps_noise_corr`); per seed the mean over its labels;
  across seeds the t interval.
Pure polars; the sentences are written in report/.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from rts_dagster.analysis.intervals import log_t_bounds, t_bounds

# the method names of `intervals.t_interval` and `intervals.log_t_interval`
T_METHOD, LOG_T_METHOD = "t", "t on logs"

SUMMARY_COLUMNS = {
    "task": pl.String,
    "granularity": pl.String,
    "estimate": pl.Float64,
    "low": pl.Float64,
    "high": pl.Float64,
    "method": pl.String,
    "n": pl.Int64,
    "n_series": pl.Int64,
}


def _by_seed(per_series: pl.DataFrame, value: str, geometric: bool) -> pl.DataFrame:
    """One row per (task, granularity) with the interval over seeds of the per-seed
    aggregate of `value` (geometric mean over labels for ratios, else the mean)."""
    finite = per_series.filter(
        pl.col(value).is_finite() & (pl.col(value) > 0 if geometric else True)
    )
    agg = pl.col(value).log().mean().exp() if geometric else pl.col(value).mean()
    seeds = finite.group_by("task", "granularity", "seed", "run_id").agg(
        agg.alias("v"), pl.len().alias("k")
    )
    groups = (
        seeds.group_by("task", "granularity")
        .agg(pl.col("v"), pl.col("k").sum().alias("n_series"))
        .sort("task", "granularity")
    )
    if groups.height == 0:
        return pl.DataFrame(schema=SUMMARY_COLUMNS)
    # every group's per-seed values as a row of one NaN-padded matrix: one vectorised
    # interval call instead of one per task
    lengths = groups["v"].list.len().to_numpy().astype(np.int64)
    flat = groups["v"].explode().to_numpy().astype(np.float64)
    rows = np.repeat(np.arange(groups.height), lengths)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    matrix = np.full((groups.height, int(lengths.max())), np.nan)
    matrix[rows, cols] = flat
    estimate, low, high, n = (log_t_bounds if geometric else t_bounds)(matrix)
    return pl.DataFrame(
        {
            "task": groups["task"],
            "granularity": groups["granularity"],
            "estimate": estimate,
            "low": low,
            "high": high,
            "method": [LOG_T_METHOD if geometric else T_METHOD] * groups.height,
            "n": n.astype(np.int64),
            "n_series": groups["n_series"].cast(pl.Int64),
        },
        schema=SUMMARY_COLUMNS,
    )


def noise_trend(progress: pl.DataFrame) -> pl.DataFrame:
    """Last-tenth over first-tenth noise per (task, granularity), geometric mean over
    labels per seed, t interval on logs over seeds (< 1: noise shrinks as it is learned).
    `progress`: the NOISE_BY_PROGRESS table."""
    last_bin = pl.col("bin").max().over("task", "seed", "run_id", "label", "granularity")
    ends = progress.filter(
        pl.col("noise_diff").is_finite() & ((pl.col("bin") == 0) | (pl.col("bin") == last_bin))
    )
    ratio = ends.group_by("task", "seed", "run_id", "label", "granularity").agg(
        (
            pl.col("noise_diff").filter(pl.col("bin") > 0).first()
            / pl.col("noise_diff").filter(pl.col("bin") == 0).first()
        ).alias("ratio")
    )
    return _by_seed(ratio.drop_nulls("ratio"), "ratio", geometric=True)


def sps_noise(series: pl.DataFrame) -> pl.DataFrame:
    """Correlation of SPS with the rolling reward std per (task, granularity): mean over
    labels per seed, t interval over seeds (< 0: SPS dips come with noisier rewards).
    `series`: the SERIES_METRICS table."""
    return _by_seed(series, "sps_noise_corr", geometric=False)
