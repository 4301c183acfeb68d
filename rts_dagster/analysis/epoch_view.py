"""What each run's epoch means can tell, and how that compares with its per-completion truth.

For every usable epoch series (one label of one run, Metta's `env_per_label_rewards/<label>`)
`epoch_model.estimate_epoch_series` gives what the series can tell in epoch units (drift per
epoch, epoch noise, and the held-value decay lambda when it is resolved); a conversion to
per-completion units is made only with a scale (`epoch_model.to_per_completion`):
- c and C from the run's own recorded stream (completions of the label, and of all labels,
  per epoch), when the run has one;
- N (environments) from the run config (`training_env.num_envs`), when recorded;
- C from the user (`completions_per_epoch`, the asset's config), otherwise.
Where the run also has its per-completion stream, the stream's own noise of that label
(std of first differences / sqrt 2 over the same epochs) sits beside the converted figure:
the comparison shows how much the held-value averaging hides. The second half of each
series is used (closer to a plateau than the whole curve). Pure polars/numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import polars as pl

from rts_dagster.analysis import epoch_model
from rts_dagster.schema import EPOCH_VIEW, GRANULARITY_COMPLETION, GRANULARITY_EPOCH, conform

RUN_KEYS = ["task", "seed", "run_id"]
SCALE_STREAM = "recorded stream"
SCALE_CONFIG_ENVS = "run config (training_env.num_envs)"
SCALE_USER = "user (completions_per_epoch)"
SCALE_NONE = "none"


def _second_half(epoch_rows: pl.DataFrame) -> pl.DataFrame:
    """Rows of each label from the middle epoch of the run on."""
    middle = pl.col("epoch").max().over(RUN_KEYS) // 2
    return epoch_rows.filter(pl.col("epoch") >= middle)


def _stream_scales(streams: pl.DataFrame, first_epoch: pl.DataFrame) -> pl.DataFrame:
    """Per (run, label): c (completions of the label per epoch), C (all completions per
    epoch) and the stream's own noise of that label, over the epochs the epoch series uses."""
    comp = streams.filter(
        (pl.col("granularity") == GRANULARITY_COMPLETION) & pl.col("reward").is_finite()
    ).join(first_epoch, on=RUN_KEYS)
    comp = comp.filter(pl.col("epoch") >= pl.col("_from"))
    if comp.height == 0:
        return pl.DataFrame(
            schema={
                **{k: streams.schema[k] for k in RUN_KEYS},
                "label": pl.String,
                "c": pl.Float64,
                "C": pl.Float64,
                "sigma_stream": pl.Float64,
            }
        )
    span = (pl.col("epoch").max() - pl.col("epoch").min() + 1).cast(pl.Float64)
    per_run = comp.group_by(RUN_KEYS).agg(span.alias("_span"), (pl.len() / span).alias("C"))
    per_label = (
        comp.sort(*RUN_KEYS, "label", "sample_index")
        .group_by(*RUN_KEYS, "label")
        .agg(
            pl.len().alias("_n"),
            (pl.col("reward").diff().std(ddof=1) / math.sqrt(2.0)).alias("sigma_stream"),
        )
        .join(per_run, on=RUN_KEYS)
        .with_columns((pl.col("_n") / pl.col("_span")).alias("c"))
    )
    return per_label.select(*RUN_KEYS, "label", "c", "C", "sigma_stream")


def epoch_view(
    streams: pl.DataFrame,
    n_envs_by_run: Mapping[str, float] | None = None,
    completions_per_epoch: float | None = None,
) -> pl.DataFrame:
    """EPOCH_VIEW: one row per epoch series of `streams` (REWARD_STREAMS rows, already
    filtered to usable series). `n_envs_by_run`: run id -> environments from its config;
    `completions_per_epoch`: the user's figure for C (all labels) when nothing better."""
    n_envs_by_run = dict(n_envs_by_run or {})
    epochs = streams.filter(
        (pl.col("granularity") == GRANULARITY_EPOCH) & pl.col("reward").is_finite()
    )
    if epochs.height == 0:
        return pl.DataFrame(schema=EPOCH_VIEW)
    half = _second_half(epochs)
    first_epoch = half.group_by(RUN_KEYS).agg(pl.col("epoch").min().alias("_from"))
    scales = _stream_scales(streams, first_epoch)
    # One row per series, its values as a list; padded into one (S, E) matrix.
    series = (
        half.sort(*RUN_KEYS, "label", "sample_index")
        .group_by(*RUN_KEYS, "label", maintain_order=True)
        .agg(pl.col("reward"))
        .join(scales, on=[*RUN_KEYS, "label"], how="left")
    )
    lengths = series["reward"].list.len().to_numpy().astype(np.int64)
    width = int(lengths.max())
    matrix = np.full((series.height, width), np.nan)
    flat = series["reward"].explode().to_numpy()
    rows = np.repeat(np.arange(series.height), lengths)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    matrix[rows, cols] = flat
    est = epoch_model.estimate_epoch_series(matrix)

    c = series["c"].fill_null(np.nan).to_numpy()
    total = series["C"].fill_null(np.nan).to_numpy()
    envs = np.array([n_envs_by_run.get(r, np.nan) for r in series["run_id"].to_list()])
    from_stream = np.isfinite(c)
    user_total = completions_per_epoch if completions_per_epoch else np.nan
    total = np.where(from_stream, total, user_total)
    source = np.select(
        [from_stream, np.isfinite(envs), np.isfinite(total)],
        [SCALE_STREAM, SCALE_CONFIG_ENVS, SCALE_USER],
        SCALE_NONE,
    )
    conv = epoch_model.to_per_completion(
        est,
        label_per_epoch=c,  # NaN where the run has no stream
        n_envs=envs,
        total_per_epoch=total,
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        lag = 1.0 / est.lam
        sigma_stream = series["sigma_stream"].fill_null(np.nan).to_numpy()
        ratio = conv.sigma / sigma_stream
    out = series.select(*RUN_KEYS, "label").with_columns(
        pl.Series("n_epochs", est.n),
        pl.Series("drift_per_epoch", est.drift_per_epoch),
        pl.Series("epoch_noise", np.sqrt(est.diff_noise_var)),
        pl.Series("lam", est.lam),
        pl.Series("lag_epochs", lag),
        pl.Series("note", list(est.note), dtype=pl.String),
        pl.Series("scale_source", source.astype(str), dtype=pl.String),
        pl.Series("label_per_epoch", conv.label_per_epoch),
        pl.Series("total_per_epoch", total),
        pl.Series("n_envs", conv.n_envs),
        pl.Series("sigma_per_completion", conv.sigma),
        pl.Series("drift_per_completion", conv.drift_per_completion),
        pl.Series("conversion", list(conv.how), dtype=pl.String),
        pl.Series("sigma_stream", sigma_stream),
        pl.Series("sigma_ratio", ratio),
    )
    return conform(out, EPOCH_VIEW, "epoch_view")


def summarise_by_task(view: pl.DataFrame) -> pl.DataFrame:
    """Per task: medians over its series of the epoch noise, the converted and the stream's
    per-completion noise, their ratio, how many series had lambda resolved, and the scale
    sources used."""
    return (
        view.group_by("task")
        .agg(
            pl.len().alias("n_series"),
            pl.col("run_id").n_unique().alias("n_runs"),
            pl.col("epoch_noise").median(),
            pl.col("lam").is_not_nan().sum().alias("n_lambda_told"),
            pl.col("lag_epochs").filter(pl.col("lag_epochs").is_finite()).median(),
            pl.col("sigma_per_completion")
            .filter(pl.col("sigma_per_completion").is_finite())
            .median(),
            pl.col("sigma_stream").filter(pl.col("sigma_stream").is_finite()).median(),
            pl.col("sigma_ratio").filter(pl.col("sigma_ratio").is_finite()).median(),
            pl.col("scale_source").unique().sort().str.join(", ").alias("scale_sources"),
        )
        .sort("task")
    )
