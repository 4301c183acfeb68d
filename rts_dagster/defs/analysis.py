"""Assets `series_metrics` (per run) and the cross-run aggregates `variance_table` and
`timescale_recommendations`. Thin: the science is in rts_dagster.analysis."""

import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import dagster as dg
import polars as pl

from rts_dagster import storage
from rts_dagster.analysis import epoch_view, kalman, lp_timescales, metrics, quality, variance
from rts_dagster.defs.batches import BACKFILL_POLICY, PartitionOutcome, materialize_partitions
from rts_dagster.defs.partitions import runs_partitions
from rts_dagster.defs.per_run import per_run_files, per_run_table
from rts_dagster.defs.resources import RtsStorage
from rts_dagster.defs.runs import load_partition_streams, read_discovered, reward_streams
from rts_dagster.discovery import partition_files, row_files
from rts_dagster.escape import md, md_table
from rts_dagster.schema import (
    EPOCH_VIEW,
    LOCAL_LEVEL,
    LP_TIMESCALES,
    NOISE_BY_PROGRESS,
    REWARD_STREAMS,
    ROLLING_METRICS,
    RUN_QUALITY,
    RUN_STATUS_MATCHED,
    SERIES_METRICS,
    SERIES_QUALITY,
    TIMESCALE_RECOMMENDATIONS,
    VARIANCE_TABLE,
    conform,
)

_TABLE_SCHEMAS = {
    "series": SERIES_METRICS,
    "rolling": ROLLING_METRICS,
    "progress": NOISE_BY_PROGRESS,
}


class SeriesMetricsConfig(dg.Config):
    """Windows and thresholds of the per-series metrics (defaults: the study plan's)."""

    slope_window: int = 25
    noise_window: int = 10
    ema_halflife: float = 25.0
    noise_bins: int = 10
    destale: bool = True
    sps_dip_threshold: float = 0.2

    def to_metrics(self) -> metrics.MetricsConfig:
        return metrics.MetricsConfig(**self.model_dump())


def _preview(df: pl.DataFrame, cols: list[str], limit: int = 20) -> str:
    rows = [
        [f"{v:.4g}" if isinstance(v, float) else v for v in r]
        for r in df.select(cols).head(limit).iter_rows()
    ]
    more = f"\n\n… {df.height - limit} more rows" if df.height > limit else ""
    return md_table(cols, rows) + more


def _partition_stream_paths(root: Path, row: dict[str, Any]) -> tuple[Path, Mapping[str, Path]]:
    """(reward_streams file, series_metrics files) of a matched discovered_runs row."""
    return _partition_files(root, row["task"], row["seed"], row["run_id"], row["partition_key"])


@lru_cache(maxsize=1 << 16)  # every aggregate maps every run to its files, several times
def _partition_files(
    root: Path, task: str, seed: int, run_id: str, key: str
) -> tuple[Path, Mapping[str, Path]]:
    folder, stem = partition_files(task, seed, run_id, key)
    metrics = MappingProxyType(storage.metrics_paths(root, folder, stem))
    return storage.stream_paths(root, folder, stem)[0], metrics


@dg.asset(
    group_name="analysis",
    partitions_def=runs_partitions,
    deps=[reward_streams],
    backfill_policy=BACKFILL_POLICY,
    automation_condition=dg.AutomationCondition.eager(),
    description="Per (label, granularity) series of one run: rolling OLS and EMA slopes, "
    "rolling and trend-robust noise, stale fraction, SPS coupling; plus the per-sample "
    "rolling table and noise-vs-progress bins. Files: metrics/TASK/SEED.*.parquet.",
)
def series_metrics(
    context: dg.AssetExecutionContext, config: SeriesMetricsConfig, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    discovered = read_discovered(rts_storage)
    return materialize_partitions(
        context, lambda key: _partition_metrics(config, rts_storage, discovered, key)
    )


def _partition_metrics(
    config: SeriesMetricsConfig, rts_storage: RtsStorage, discovered: pl.DataFrame, key: str
) -> PartitionOutcome:
    part = load_partition_streams(rts_storage, key, discovered)
    paths = storage.metrics_paths(rts_storage.root(), part.folder, part.stem)
    result = metrics.compute_metrics(part.streams, config.to_metrics())
    for name, table in (
        ("series", result.series),
        ("rolling", result.rolling),
        ("progress", result.progress),
    ):
        storage.write_parquet(table, paths[name])
    series = result.series
    return PartitionOutcome(
        summary={"series": series.height, "rolling_rows": result.rolling.height},
        metadata={
            "dagster/row_count": series.height,
            "rolling_rows": result.rolling.height,
            "config": json.dumps(config.model_dump()),
            "path": dg.MetadataValue.path(str(paths["series"])),
            "preview": dg.MetadataValue.md(
                _preview(
                    series.sort("granularity", "noise_diff", descending=[False, True]),
                    [
                        "granularity",
                        "label",
                        "n_samples",
                        "stale_fraction",
                        "mean_reward",
                        "mean_slope",
                        "noise_diff",
                        "noise_rolling_mean",
                        "sps_reward_corr",
                    ],
                )
            ),
        },
    )


def _matched_rows(rts_storage: RtsStorage) -> list[dict[str, Any]]:
    discovered = read_discovered(rts_storage)
    return list(discovered.filter(pl.col("status") == RUN_STATUS_MATCHED).iter_rows(named=True))


ALL_TABLES = ("streams", "series", "rolling", "progress")


def materialized_rows(
    rts_storage: RtsStorage,
    context: dg.AssetExecutionContext,
    rows: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The matched discovered_runs rows (or `rows`) whose streams and series_metrics files
    are all written. Partitions not materialized yet are left out with a warning (they join
    on the next refresh); none at all is a failure."""
    root = rts_storage.root()
    done, missing = [], []
    for row in _matched_rows(rts_storage) if rows is None else rows:
        stream_path, paths = _partition_stream_paths(root, row)
        if stream_path.exists() and all(p.exists() for p in paths.values()):
            done.append(row)
        else:
            missing.append(row["partition_key"])
    if missing:
        context.log.warning(f"not yet materialized, left out: {', '.join(missing)}")
    if not done:
        raise dg.Failure("no materialized series_metrics partitions yet: run `rts refresh`")
    return done


def load_all(
    rts_storage: RtsStorage,
    context: dg.AssetExecutionContext,
    names: tuple[str, ...] = ALL_TABLES,
    rows: list[dict[str, Any]] | None = None,
    checked: bool = False,
) -> dict[str, pl.DataFrame]:
    """The streams and metric tables (only `names` are read) of every materialized
    partition (`materialized_rows`), concatenated. Holds them all in memory: aggregates read
    the per-series tables through it (from one cache file, `per_run.per_run_files`), and
    whole streams and per-sample tables only for a bounded set of runs (the report's figure
    tasks, an experiment's arms); run-by-run work goes through `per_run.per_run_table`.
    `rows`: the matched discovered_runs rows to read; `checked`: they come from
    `materialized_rows` in this step (not checked again: ~0.05 s per thousand runs)."""
    root = rts_storage.root()
    done = rows if checked and rows is not None else materialized_rows(rts_storage, context, rows)
    schemas = {"streams": REWARD_STREAMS, **_TABLE_SCHEMAS}
    out: dict[str, pl.DataFrame] = {}
    for name in names:
        if name in _CACHED_TABLES:
            out[name] = per_run_files(
                root,
                done,
                _CACHED_TABLES[name],
                lambda row, name=name: _partition_stream_paths(root, row)[1][name],
                schemas[name],
            )
            continue
        files = [
            stream_path if name == "streams" else paths[name]
            for stream_path, paths in (_partition_stream_paths(root, row) for row in done)
        ]
        out[name] = _read_tables(files, schemas[name])
    return out


# small per-series tables every aggregate reads for every run: one cache file each
_CACHED_TABLES = {"series": "series_metrics", "progress": "noise_by_progress"}


def _read_tables(paths: list[Path], schema: pl.Schema) -> pl.DataFrame:
    """The files concatenated, in order, conformed to `schema`: one multi-file read (polars
    reads them in parallel), or file by file when their schemas differ (older files)."""
    if not paths:
        return pl.DataFrame(schema=schema)
    try:
        return conform(pl.read_parquet(paths), schema)
    except (pl.exceptions.PolarsError, ValueError):
        return pl.concat([conform(pl.read_parquet(path), schema, str(path)) for path in paths])


def baseline_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of baseline arms among `rows`: the runs the task aggregates pool."""
    return [r for r in rows if r.get("baseline") is not False]


def usable_of_runs(
    compute: Callable[[pl.DataFrame], pl.DataFrame], purpose: str, schema: pl.Schema
) -> Callable[[pl.DataFrame], pl.DataFrame]:
    """`compute` on the series of some runs' streams whose quality status fits `purpose`
    (the arm is decided later, per run: see `per_run`); an empty table when none does."""

    def run(streams: pl.DataFrame) -> pl.DataFrame:
        kept = quality.keep_usable(streams, quality.series_quality(streams), purpose)
        return compute(kept) if kept.height else pl.DataFrame(schema=schema)

    return run


def _lp_configs(
    rts_storage: RtsStorage, rows: list[dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Task -> LP config of its baseline arm (the first baseline run's: one arm's runs agree
    on every setting)."""
    out: dict[str, dict[str, Any]] = {}
    for row in _matched_rows(rts_storage) if rows is None else rows:
        if row.get("baseline") is False:
            continue
        out.setdefault(row["task"], json.loads(row["lp_config"] or "{}"))
    return out


def arms_table(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """run_id, task, seed, arm, baseline of the matched runs (discovered_runs); a table
    written before arms existed reads as one baseline arm per task."""
    return pl.DataFrame(
        {
            "run_id": [r["run_id"] for r in rows],
            "task": [r["task"] for r in rows],
            "seed": [r["seed"] for r in rows],
            "arm": [r.get("arm") or "baseline" for r in rows],
            "baseline": [r.get("baseline") is not False for r in rows],
        },
        schema={
            "run_id": pl.String,
            "task": pl.String,
            "seed": pl.Int64,
            "arm": pl.String,
            "baseline": pl.Boolean,
        },
    )


@dg.asset(
    group_name="analysis",
    deps=[series_metrics],
    automation_condition=dg.AutomationCondition.eager(),
    description="Which series and runs can feed the aggregates: every series classified ok, "
    "constant, mostly_stale, too_short, absurd_values or no_finite, with the reason, and its arm "
    "(task aggregates use the baseline arm; other arms feed experiment_comparison); per (run, "
    "granularity) whether it contributes. Files: metrics/series_quality.parquet, metrics/run_quality.parquet.",
)
def data_quality(
    context: dg.AssetExecutionContext, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    rows = materialized_rows(rts_storage, context)
    per_run_quality = per_run_table(
        rts_storage.root(),
        rows,
        "series_quality",
        quality.series_quality,
        SERIES_QUALITY,
        log=context.log.info,
    )
    series_q = conform(
        quality.with_arms(per_run_quality, arms_table(rows)), SERIES_QUALITY, "series_quality"
    )
    runs_q = quality.run_quality(series_q)
    paths = storage.quality_paths(rts_storage.root())
    storage.write_parquet(series_q, paths["series"])
    storage.write_parquet(runs_q, paths["runs"])
    dropped = quality.left_out(series_q, quality.PURPOSE_DYNAMICS)
    whole = dropped.filter(pl.col("label") == "*")
    if whole.height:
        context.log.warning(
            "runs contributing nothing to noise/drift/LP: "
            + "; ".join(
                f"{r} ({g}): {why}"
                for r, g, why in whole.select("run_id", "granularity", "reason").iter_rows()
            )
        )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": series_q.height,
            "series_left_out": dropped.height,
            "runs_left_out": whole.height,
            "path": dg.MetadataValue.path(str(paths["series"])),
            "left_out": dg.MetadataValue.md(
                _preview(dropped, ["run_id", "granularity", "label", "reason"])
                if dropped.height
                else "nothing left out"
            ),
        }
    )


_QUALITY_SCHEMAS = {"series": SERIES_QUALITY, "runs": RUN_QUALITY}


def read_quality(rts_storage: RtsStorage, which: str = "series") -> pl.DataFrame:
    """One data_quality table: "series" (one row per series) or "runs"."""
    path = storage.quality_paths(rts_storage.root())[which]
    if not path.exists():
        raise dg.Failure("data_quality has not been materialized yet: run `rts refresh`")
    return conform(pl.read_parquet(path), _QUALITY_SCHEMAS[which], f"{which}_quality")


@dg.asset(
    group_name="analysis",
    deps=[series_metrics, data_quality],
    automation_condition=dg.AutomationCondition.eager(),
    description="Seed vs task variance (and seed vs label within each task) of mean reward, "
    "with exact F 95% intervals (ICC and the variance ratio) and chi-square intervals for Var(seed). File: metrics/variance_table.parquet.",
)
def variance_table(
    context: dg.AssetExecutionContext, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    tables = load_all(rts_storage, context, names=("series",))
    series_q = read_quality(rts_storage)
    table = variance.variance_table(
        quality.keep_usable(tables["series"], series_q, quality.PURPOSE_LEVEL)
    )
    table = conform(table, VARIANCE_TABLE, "variance_table")
    path = storage.write_parquet(table, storage.variance_table_path(rts_storage.root()))
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            "path": dg.MetadataValue.path(str(path)),
            "preview": dg.MetadataValue.md(
                _preview(
                    table,
                    [
                        "scope",
                        "level",
                        "var_seed",
                        "var_task_or_label",
                        "ratio",
                        "ratio_ci_low",
                        "ratio_ci_high",
                        "icc",
                        "reason",
                    ],
                )
            ),
        }
    )


class TimescaleConfig(dg.Config):
    """A scale for converting epoch means to per-completion figures when a run has no
    recorded stream and its config names no environment count."""

    completions_per_epoch: float | None = None  # all labels, per epoch (C)


def _n_envs_by_run(rts_storage: RtsStorage, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Run id -> environments per run from its config (`training_env.num_envs`), if any."""
    out: dict[str, float] = {}
    root = rts_storage.root()
    for row in rows:
        folder, stem = row_files(row)
        meta_path = storage.stream_paths(root, folder, stem)[1]
        try:
            env = storage.read_json(meta_path).get("env_config") or {}
            value = float((env.get("training_env") or {}).get("num_envs"))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if value > 0:
            out[row["run_id"]] = value
    return out


@dg.asset(
    group_name="analysis",
    deps=[series_metrics, data_quality],
    automation_condition=dg.AutomationCondition.eager(),
    description="Tracking-optimal EMA timescale per task, label and regime (whole, "
    "learning, plateau) from a local-level fit, in the series' unit (completions or epochs), "
    "with t-on-logs intervals over seeds; and LP's own objective: the fast/slow EMA pair that "
    "best separates learning from plateaued labels (completion units only). Files: "
    "metrics/timescale_recommendations.parquet, metrics/lp_timescales.parquet; and what each "
    "epoch series can tell under Metta's held-value logging, converted to per-completion "
    "units where a scale is known: metrics/epoch_view.parquet.",
)
def timescale_recommendations(
    context: dg.AssetExecutionContext, config: TimescaleConfig, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    root = rts_storage.root()
    rows = materialized_rows(rts_storage, context)
    baseline = baseline_rows(rows)
    per_series = per_run_table(
        root,
        baseline,
        "local_level",
        usable_of_runs(kalman.estimate_local_level, quality.PURPOSE_DYNAMICS, LOCAL_LEVEL),
        LOCAL_LEVEL,
        log=context.log.info,
    )
    table = kalman.recommend_timescales(
        per_series, lp_configs_by_task=_lp_configs(rts_storage, rows)
    )
    table = conform(table, TIMESCALE_RECOMMENDATIONS, "timescale_recommendations")
    separation = conform(
        lp_timescales.lp_separation_table(per_series), LP_TIMESCALES, "lp_timescales"
    )
    storage.write_parquet(separation, storage.lp_timescales_path(rts_storage.root()))
    n_envs = _n_envs_by_run(rts_storage, baseline)
    view = per_run_table(
        root,
        baseline,
        "epoch_view",
        usable_of_runs(
            lambda streams: epoch_view.epoch_view(streams, n_envs, config.completions_per_epoch),
            quality.PURPOSE_DYNAMICS,
            EPOCH_VIEW,
        ),
        EPOCH_VIEW,
        settings={"completions_per_epoch": config.completions_per_epoch},
        log=context.log.info,
    )
    storage.write_parquet(view, storage.epoch_view_path(rts_storage.root()))
    path = storage.write_parquet(table, storage.timescales_path(rts_storage.root()))
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            "path": dg.MetadataValue.path(str(path)),
            "findings": dg.MetadataValue.md(
                "\n".join(f"- {md(s)}" for s in kalman.describe_recommendations(table))
            ),
        }
    )
