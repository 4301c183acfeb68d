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


def default_ema_by_task(rts_storage: RtsStorage) -> dict[str, float]:
    """Task -> the ema_timescale its runs were trained with (Metta main's when unknown)."""
    out = {}
    for task, cfg in _lp_configs(rts_storage).items():
        try:
            value = float(cfg.get("ema_timescale", 0.001))
        except (TypeError, ValueError):
            value = math.nan
        out[task] = value if math.isfinite(value) and value > 0 else 0.001
    return out


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
    series_q = read_quality(rts_storage)["series"]
    lp_paths = storage.lp_aggregate_paths(root)
    decided = verdict.decide_all(
        quality.granularity_runs(series_q),
        quality.left_out(series_q, quality.PURPOSE_DYNAMICS),
        _read(lp_paths["recommendations"], LP_RECOMMENDATIONS, "lp recommendations"),
        _read(lp_paths["closed_loop"], LP_CLOSED_LOOP_SUMMARY, "closed loop summary"),
        _read(storage.lp_timescales_path(root), LP_TIMESCALES, "lp timescales"),
        default_ema_by_task(rts_storage),
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
