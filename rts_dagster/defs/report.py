"""Asset `report`: report.md (+ PNGs) and report.html from every table above."""

import base64
from typing import Any

import dagster as dg
import polars as pl

from rts_dagster import storage
from rts_dagster.analysis import kalman, quality
from rts_dagster.analysis.learning import learning_slopes
from rts_dagster.analysis.verdict import verdicts_from_table
from rts_dagster.defs.analysis import (
    _lp_configs,
    arms_table,
    baseline_rows,
    load_all,
    materialized_rows,
    read_quality,
    timescale_recommendations,
    usable_of_runs,
    variance_table,
)
from rts_dagster.defs.experiments import (
    experiment_comparison,
    experiment_plan,
    read_experiment_tables,
)
from rts_dagster.defs.lp import lp_recommendations, lp_tables
from rts_dagster.defs.per_run import per_run_table
from rts_dagster.defs.resources import RtsStorage
from rts_dagster.defs.verdicts import verdicts as verdicts_asset
from rts_dagster.schema import LEARNING_SLOPES


def run_engines(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Engine name (`engine:<name>` tag; "" for none) -> number of matched runs."""
    out: dict[str, int] = {}
    for row in rows:
        tags = row.get("tags") or []
        name = next((t[len("engine:") :] for t in tags if t.startswith("engine:")), "")
        out[name] = out.get(name, 0) + 1
    return out


@dg.asset(
    group_name="report",
    deps=[
        variance_table,
        timescale_recommendations,
        lp_recommendations,
        verdicts_asset,
        experiment_comparison,
        experiment_plan,
    ],
    automation_condition=dg.AutomationCondition.eager(),
    description="report.md (+ PNG figures) and a self-contained report.html under "
    "$RTS_DATA_DIR/report/, built from the tables above.",
)
def report(context: dg.AssetExecutionContext, rts_storage: RtsStorage) -> dg.MaterializeResult:
    from rts_dagster.report.build import build_report, figure_tasks, tasks_with_arms
    from rts_dagster.report.document import write_report

    root = rts_storage.root()
    rows = materialized_rows(rts_storage, context)  # read once: every table below needs them
    verdicts = verdicts_from_table(pl.read_parquet(storage.verdicts_path(root)))
    experiments = read_experiment_tables(rts_storage)
    if experiments is not None:
        experiments["discovered"] = arms_table(rows).with_columns(pl.lit("matched").alias("status"))
    # whole streams and per-sample tables only for the tasks the figures show (the same
    # choice build_report makes): memory and time stay bounded however many runs there are
    armed = tasks_with_arms(experiments["discovered"]) if experiments is not None else []
    shown = set(figure_tasks(sorted({r["task"] for r in rows}), verdicts, with_arms=armed))
    tables = load_all(rts_storage, context, names=("series", "progress"), rows=rows, checked=True)
    shown_rows = [r for r in rows if r["task"] in shown]
    tables |= load_all(
        rts_storage, context, names=("streams", "rolling"), rows=shown_rows, checked=True
    )
    learning = per_run_table(
        root,
        baseline_rows(rows),
        "learning_slopes",
        usable_of_runs(learning_slopes, quality.PURPOSE_LEVEL, LEARNING_SLOPES),
        LEARNING_SLOPES,
        log=context.log.info,
    )
    epoch_path = storage.epoch_view_path(root)
    variance_df = pl.read_parquet(storage.variance_table_path(root))
    recs = pl.read_parquet(storage.timescales_path(root))
    doc = build_report(
        tables["streams"],
        tables["series"],
        tables["rolling"],
        tables["progress"],
        variance_df,
        recs,
        kalman.describe_recommendations(recs),
        _lp_configs(rts_storage, rows),
        lp=lp_tables(root, shown_rows),
        verdicts=verdicts,
        series_quality=read_quality(rts_storage),
        run_urls={r["run_id"]: r["url"] for r in rows if r.get("url")},
        epoch_views=pl.read_parquet(epoch_path) if epoch_path.exists() else None,
        experiments=experiments,
        engines=run_engines(rows),
        learning=learning,
    )
    written = write_report(doc, storage.report_dir(root))
    if written["note"]:
        context.log.warning(str(written["note"]))
    metadata: dict[str, Any] = {
        "report_md": dg.MetadataValue.path(str(written["markdown"])),
        "report_html": dg.MetadataValue.path(str(written["html"])),
        "figures": len(written["pngs"]),
    }
    curves = written["pngs"].get("reward_curves")
    if curves is not None:
        encoded = base64.b64encode(curves.read_bytes()).decode()
        metadata["reward_curves"] = dg.MetadataValue.md(
            f"![reward curves](data:image/png;base64,{encoded})"
        )
    return dg.MaterializeResult(metadata=metadata)
