"""Asset `verdicts`: one verdict per task on the LP settings, from the data-quality,
timescale (LP separation), replay and closed-loop tables. Thin: the rules are in
rts_dagster.analysis.verdict."""

import math

import dagster as dg
import polars as pl

from rts_dagster import storage
from rts_dagster.analysis import quality, verdict
from rts_dagster.defs.analysis import (
    _lp_configs,
    data_quality,
    read_quality,
    timescale_recommendations,
)
from rts_dagster.defs.lp import lp_recommendations
from rts_dagster.defs.resources import RtsStorage
from rts_dagster.escape import md
from rts_dagster.schema import (
    LP_CLOSED_LOOP_SUMMARY,
    LP_RECOMMENDATIONS,
    LP_SWEEP_SUMMARY,
    LP_TIMESCALES,
    VERDICTS,
    conform,
    empty,
)


def _read(path, schema: pl.Schema, name: str) -> pl.DataFrame:
    """A table another asset wrote, or an empty one when that asset has not run (the
    verdict then says the evidence is missing rather than failing)."""
    if not path.exists():
        return empty(schema)
    return conform(pl.read_parquet(path), schema, name)


def _positive(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def runs_settings(
    rts_storage: RtsStorage, series_q: pl.DataFrame
) -> tuple[dict[str, float], dict[str, float]]:
    """Task -> the ema_timescale its runs trained with (Metta main's when unknown), and
    task -> active task instances per label (num_active_tasks / labels seen), when known."""
    labels = series_q.group_by("task").agg(pl.col("label").n_unique())
    n_labels = dict(zip(labels["task"].to_list(), labels["label"].to_list(), strict=True))
    ema, instances = {}, {}
    for task, cfg in _lp_configs(rts_storage).items():
        ema[task] = _positive(cfg.get("ema_timescale", 0.001)) or 0.001
        active = _positive(cfg.get("num_active_tasks"))
        if active and n_labels.get(task):
            instances[task] = active / n_labels[task]
    return ema, instances


@dg.asset(
    group_name="report",
    deps=[data_quality, timescale_recommendations, lp_recommendations],
    automation_condition=dg.AutomationCondition.eager(),
    description="One verdict per task (keep Metta's default LP settings, or change one), "
    "with its confidence, the chain of evidence and the experiment that would settle a "
    "conflict. File: verdicts.parquet.",
)
def verdicts(context: dg.AssetExecutionContext, rts_storage: RtsStorage) -> dg.MaterializeResult:
    root = rts_storage.root()
    series_q = read_quality(rts_storage)
    lp_paths = storage.lp_aggregate_paths(root)
    ema, instances = runs_settings(rts_storage, series_q)
    decided = verdict.decide_all(
        quality.granularity_runs(series_q),
        quality.left_out(series_q, quality.PURPOSE_DYNAMICS),
        _read(lp_paths["recommendations"], LP_RECOMMENDATIONS, "lp recommendations"),
        _read(lp_paths["closed_loop"], LP_CLOSED_LOOP_SUMMARY, "closed loop summary"),
        _read(storage.lp_timescales_path(root), LP_TIMESCALES, "lp timescales"),
        ema,
        _read(lp_paths["summary"], LP_SWEEP_SUMMARY, "lp sweep summary"),
        instances,
    )
    table = conform(verdict.verdicts_table(decided), VERDICTS, "verdicts")
    path = storage.write_parquet(table, storage.verdicts_path(root))
    from rts_dagster.report.verdicts import headline

    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            "path": dg.MetadataValue.path(str(path)),
            "verdicts": dg.MetadataValue.md("\n".join(f"- {md(headline(v))}" for v in decided)),
        }
    )
