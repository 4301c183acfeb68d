"""Asset `report`: report.md (+ PNGs) and report.html from every table above."""

import base64
from typing import Any

import dagster as dg
import polars as pl

from rts_dagster import storage
from rts_dagster.analysis import kalman
from rts_dagster.analysis.verdict import verdicts_from_table
from rts_dagster.defs.analysis import (
    _lp_configs,
    _matched_rows,
    arms_table,
    load_all,
    read_quality,
    timescale_recommendations,
    variance_table,
)
from rts_dagster.defs.experiments import (
    experiment_comparison,
    experiment_plan,
    read_experiment_tables,
)
from rts_dagster.defs.lp import lp_recommendations, lp_tables
from rts_dagster.defs.resources import RtsStorage
from rts_dagster.defs.verdicts import verdicts as verdicts_asset


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
    from rts_dagster.report.build import build_report
    from rts_dagster.report.document import write_report

    root = rts_storage.root()
    rows = _matched_rows(rts_storage)  # read once: every table below needs the runs
    tables = load_all(rts_storage, context, rows=rows)
    epoch_path = storage.epoch_view_path(root)
    variance_df = pl.read_parquet(storage.variance_table_path(root))
    recs = pl.read_parquet(storage.timescales_path(root))
    experiments = read_experiment_tables(rts_storage)
    if experiments is not None:
        experiments["discovered"] = arms_table(rows).with_columns(pl.lit("matched").alias("status"))
    doc = build_report(
        tables["streams"],
        tables["series"],
        tables["rolling"],
        tables["progress"],
        variance_df,
        recs,
        kalman.describe_recommendations(recs),
        _lp_configs(rts_storage, rows),
        lp=lp_tables(root, rows),
        verdicts=verdicts_from_table(pl.read_parquet(storage.verdicts_path(root))),
        series_quality=read_quality(rts_storage),
        run_urls={r["run_id"]: r["url"] for r in rows if r.get("url")},
        epoch_views=pl.read_parquet(epoch_path) if epoch_path.exists() else None,
        experiments=experiments,
        engines=run_engines(rows),
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
