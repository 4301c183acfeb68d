"""The Dagster code location: `dagster dev -w workspace.yaml` or `-m rts_dagster.definitions`."""

import dagster as dg

from rts_dagster.defs.analysis import (
    data_quality,
    series_metrics,
    timescale_recommendations,
    variance_table,
)
from rts_dagster.defs.experiments import experiment_comparison, experiment_plan
from rts_dagster.defs.lp import lp_recommendations, lp_replay
from rts_dagster.defs.report import report
from rts_dagster.defs.resources import RtsStorage, run_source_from_env
from rts_dagster.defs.runs import discovered_runs, reward_streams
from rts_dagster.defs.sensors import finished_runs_sensor
from rts_dagster.defs.verdicts import verdicts

# Eager aggregates refresh when partitions change; Dagster's own automation sensor starts
# stopped, so ours runs by default (STACK.md).
automation_sensor = dg.AutomationConditionSensorDefinition(
    "rts_automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)

ASSETS = [
    discovered_runs,
    reward_streams,
    series_metrics,
    data_quality,
    variance_table,
    timescale_recommendations,
    lp_replay,
    lp_recommendations,
    verdicts,
    experiment_comparison,
    experiment_plan,
    report,
]
RESOURCES = {"run_source": run_source_from_env(), "rts_storage": RtsStorage()}

defs = dg.Definitions(
    assets=ASSETS, sensors=[automation_sensor, finished_runs_sensor], resources=RESOURCES
)
