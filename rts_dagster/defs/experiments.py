"""Assets `experiment_comparison` and `experiment_plan`: arms of one task against its
baseline, and the runs to launch to settle each verdict's open question. Thin: the
statistics are in rts_dagster.analysis.experiments, the plan in
rts_dagster.analysis.experiment_plan, the words in rts_dagster.report.plan."""

import dagster as dg
import polars as pl

from rts_dagster import storage
from rts_dagster.analysis import experiments, quality
from rts_dagster.analysis.experiment_plan import PlanConfig, plan_experiments
from rts_dagster.defs.analysis import (
    _matched_rows,
    _preview,
    arms_table,
    data_quality,
    load_all,
    read_quality,
)
from rts_dagster.defs.resources import RtsStorage
from rts_dagster.defs.runs import discovered_runs, read_discovered
from rts_dagster.defs.verdicts import verdicts
from rts_dagster.discovery import LP_CONFIG_KEYS
from rts_dagster.report.plan import render_plan
from rts_dagster.schema import (
    EXPERIMENT_COMPARISON,
    EXPERIMENT_CURVES,
    EXPERIMENT_DIFFERENCE,
    EXPERIMENT_PLAN,
    EXPERIMENT_RUN_METRICS,
    VERDICTS,
    conform,
    empty,
)

_TABLES = {
    "comparison": EXPERIMENT_COMPARISON,
    "run_metrics": EXPERIMENT_RUN_METRICS,
    "curves": EXPERIMENT_CURVES,
    "difference": EXPERIMENT_DIFFERENCE,
}


class ExperimentComparisonConfig(dg.Config):
    final_fraction: float = 0.25  # "final reward": mean over the last 25% of the run
    threshold_fraction: float = 0.8  # time to this share of the baseline's final reward
    n_bins: int = 20  # bins over training for the curves and the difference


@dg.asset(
    group_name="experiments",
    deps=[data_quality],
    automation_condition=dg.AutomationCondition.eager(),
    description="Per task, every arm (runs whose configs differ from the baseline's in a "
    "setting) against the baseline arm on the study plan's metrics: final reward (last 25%), "
    "IQM over labels, time to a reward threshold, noise before/after convergence, slope after "
    "convergence, trend-robust noise, SPS and its coupling with noise, sampling Gini/entropy; "
    "paired t by seed when the arms share seeds, else Welch; seeds for 80% power. Files: "
    "experiments/{comparison,run_metrics,curves,difference}.parquet.",
)
def experiment_comparison(
    context: dg.AssetExecutionContext, config: ExperimentComparisonConfig, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    rows = _matched_rows(rts_storage)
    runs = arms_table(rows)
    with_arms = runs.group_by("task").agg(pl.col("arm").n_unique().alias("n_arms"))
    tasks = with_arms.filter(pl.col("n_arms") > 1)["task"].to_list()
    paths = storage.experiment_paths(rts_storage.root())
    tables = {name: empty(schema) for name, schema in _TABLES.items()}
    if tasks:
        wanted = [r for r in rows if r["task"] in tasks]
        streams = load_all(rts_storage, context, names=("streams",), rows=wanted)["streams"]
        # every arm's usable series (degenerate ones are left out as everywhere else)
        streams = quality.keep_usable(
            streams, read_quality(rts_storage), quality.PURPOSE_LEVEL, all_arms=True
        )
        runs = runs.filter(pl.col("task").is_in(tasks))
        per_run = experiments.run_metrics(
            streams,
            runs,
            final_fraction=config.final_fraction,
            threshold_fraction=config.threshold_fraction,
        )
        tables = {
            "run_metrics": per_run,
            "comparison": experiments.compare_arms(
                per_run,
                runs,
                label_finals=experiments.label_final_rewards(
                    streams, runs, final_fraction=config.final_fraction
                ),
            ),
            "curves": experiments.arm_curves(streams, runs, n_bins=config.n_bins),
            "difference": experiments.difference_over_training(streams, runs, n_bins=config.n_bins),
        }
    else:
        context.log.info("no task has two arms yet: nothing to compare")
    for name, schema in _TABLES.items():
        storage.write_parquet(conform(tables[name], schema, name), paths[name])
    comparison = tables["comparison"]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": comparison.height,
            "tasks_with_arms": len(tasks),
            "path": dg.MetadataValue.path(str(paths["comparison"])),
            "comparison": dg.MetadataValue.md(
                _preview(
                    comparison,
                    ["task", "arm", "granularity", "metric", "difference", "method"],
                )
                if comparison.height
                else "no task has two arms yet"
            ),
        }
    )


class ExperimentPlanConfig(dg.Config):
    command_template: str = PlanConfig().command_template
    override_prefix: str = PlanConfig().override_prefix
    user: str | None = None  # name prefix of planned runs; default: the baseline runs' user
    min_seeds: int = 3
    max_seeds: int = 10


def read_experiment_tables(rts_storage: RtsStorage) -> dict[str, pl.DataFrame] | None:
    """experiment_comparison's tables and the plan, or None before the first
    materialization (the report then says the comparison has not run)."""
    paths = storage.experiment_paths(rts_storage.root())
    if not paths["comparison"].exists():
        return None
    out = {}
    for name, schema in {**_TABLES, "plan": EXPERIMENT_PLAN}.items():
        path = paths[name]
        out[name] = conform(pl.read_parquet(path), schema, name) if path.exists() else empty(schema)
    return out


@dg.asset(
    group_name="experiments",
    deps=[verdicts, discovered_runs, experiment_comparison],
    automation_condition=dg.AutomationCondition.eager(),
    description="The runs to launch to settle each verdict's open question: baseline and "
    "proposed arm on shared seeds, run names the discovery rules map back to the task, and "
    "launch commands (a template in the config; Metta's SkyPilot launcher by default); "
    "which planned runs exist yet. Files: experiments/plan.{md,json,parquet}.",
)
def experiment_plan(
    context: dg.AssetExecutionContext, config: ExperimentPlanConfig, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    root = rts_storage.root()
    verdicts_file = storage.verdicts_path(root)
    table = (
        conform(pl.read_parquet(verdicts_file), VERDICTS, "verdicts")
        if verdicts_file.exists()
        else empty(VERDICTS)
    )
    plan_config = PlanConfig(**config.model_dump())
    plan = plan_experiments(table, read_discovered(rts_storage), LP_CONFIG_KEYS, plan_config)
    paths = storage.experiment_paths(root)
    storage.write_parquet(plan, paths["plan"])
    storage.write_json(plan.to_dicts(), paths["plan_json"])
    storage.write_text(render_plan(plan, plan_config.command_template), paths["plan_md"])
    missing = plan.filter(~pl.col("exists")).height
    if missing:
        context.log.info(f"experiment plan: {missing} of {plan.height} planned runs not found yet")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": plan.height,
            "missing_runs": missing,
            "path": dg.MetadataValue.path(str(paths["plan_md"])),
        }
    )
