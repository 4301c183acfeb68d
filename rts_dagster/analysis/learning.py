"""Does the reward rise during training? A slope per (run, label) with an interval.

A run's completions (or epoch means) are serially dependent: the policy changes slowly, and
epoch means hold values over epochs. An OLS slope over the raw samples would claim far too
much precision. Instead the run is cut into `n_bins` equal agent-step bins, the label's
mean reward per bin is taken, and the slope is the OLS slope over those bin means, with a
t interval on n_bins - 2 degrees of freedom: bins long compared with the dependence make
the bin means close to independent around the trend. Across seeds, the per-run slopes get a
t interval over seeds (n >= 2). Pure polars/numpy.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from rts_dagster.analysis.distributions import t_ppf
from rts_dagster.schema import LEARNING_SLOPES, LEARNING_SUMMARY, conform

N_BINS = 10
LEVEL = 0.95
PER = 1e6  # slopes in reward per 1M agent steps


def learning_slopes(
    streams: pl.DataFrame, n_bins: int = N_BINS, level: float = LEVEL
) -> pl.DataFrame:
    """One row per (task, seed, run_id, label, granularity): the slope of the label's
    reward over agent steps (per 1M), from the OLS fit over `n_bins` agent-step bin means
    of the run, with a t interval (df = bins with data - 2). Columns: LEARNING_SLOPES."""
    keys = ["task", "seed", "run_id", "label", "granularity"]
    rows = streams.filter(pl.col("reward").is_finite() & pl.col("agent_step").is_not_null())
    if rows.height == 0:
        return pl.DataFrame(schema=LEARNING_SLOPES)
    step = pl.col("agent_step").cast(pl.Float64)
    lo = step.min().over("run_id", "granularity")
    hi = step.max().over("run_id", "granularity")
    span = pl.when(hi > lo).then(hi - lo).otherwise(1.0)
    binned = (
        rows.with_columns(
            ((step - lo) / span * n_bins).floor().clip(0, n_bins - 1).cast(pl.Int64).alias("bin"),
        )
        .group_by([*keys, "bin"])
        .agg(pl.col("reward").mean().alias("y"), step.mean().alias("x"))
    )
    x, y = pl.col("x") / PER, pl.col("y")
    fit = (
        binned.group_by(keys)
        .agg(
            pl.len().cast(pl.Int64).alias("n_bins"),
            ((x - x.mean()) * (y - y.mean())).sum().alias("_sxy"),
            ((x - x.mean()) ** 2).sum().alias("_sxx"),
            ((y - y.mean()) ** 2).sum().alias("_syy"),
            y.first().alias("_first"),
        )
        .with_columns((pl.col("_sxy") / pl.col("_sxx")).alias("slope"))
        .with_columns(
            # residual sum of squares of the line: Syy - Sxy^2 / Sxx
            ((pl.col("_syy") - pl.col("_sxy") ** 2 / pl.col("_sxx")).clip(0.0)).alias("_rss")
        )
    )
    n = fit["n_bins"].to_numpy()
    df = n - 2
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(fit["_rss"].to_numpy() / np.where(df > 0, df, np.nan) / fit["_sxx"].to_numpy())
        half = t_ppf(0.5 + level / 2, np.where(df > 0, df, 1)) * se
    half = np.where(df > 0, half, np.nan)
    slope = fit["slope"].to_numpy()
    out = fit.with_columns(
        pl.Series("ci_low", slope - half),
        pl.Series("ci_high", slope + half),
        pl.format(
            "OLS over {} agent-step bin means of the run, t, {}%, df={}",
            pl.col("n_bins"),
            pl.lit(f"{level * 100:g}"),
            pl.col("n_bins") - 2,
        ).alias("method"),
    ).sort(keys)
    return conform(out, LEARNING_SLOPES, "learning_slopes")


def learning_summary(slopes: pl.DataFrame, level: float = LEVEL) -> pl.DataFrame:
    """One row per (task, label, granularity): the mean slope over seeds with a t interval
    over seeds (null with one seed), and in how many runs the run's own interval is above
    0 (`n_rising`) or below (`n_falling`). Columns: LEARNING_SUMMARY."""
    keys = ["task", "label", "granularity"]
    if slopes.height == 0:
        return pl.DataFrame(schema=LEARNING_SUMMARY)
    agg = slopes.group_by(keys).agg(
        pl.len().cast(pl.Int64).alias("n_runs"),
        pl.col("slope").mean().alias("slope"),
        pl.col("slope").std(ddof=1).alias("_sd"),
        (pl.col("ci_low") > 0).sum().cast(pl.Int64).alias("n_rising"),
        (pl.col("ci_high") < 0).sum().cast(pl.Int64).alias("n_falling"),
    )
    n = agg["n_runs"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        half = t_ppf(0.5 + level / 2, np.maximum(n - 1, 1)) * agg["_sd"].to_numpy() / np.sqrt(n)
    half = np.where(n >= 2, half, np.nan)
    slope = agg["slope"].to_numpy()
    out = agg.with_columns(
        pl.Series("ci_low", slope - half),
        pl.Series("ci_high", slope + half),
        pl.when(pl.col("n_runs") >= 2)
        .then(pl.format("t over seeds, {}%, n={} seeds", pl.lit(f"{level * 100:g}"), "n_runs"))
        .otherwise(pl.lit("one seed: no interval over seeds"))
        .alias("method"),
    ).sort(keys)
    return conform(out, LEARNING_SUMMARY, "learning_summary")
