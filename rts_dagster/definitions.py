"""The Dagster code location: `dagster dev -w workspace.yaml` or `-m rts_dagster.definitions`."""

import dagster as dg

from rts_dagster.defs.resources import OfflineRunsSource, RtsStorage
from rts_dagster.defs.runs import discovered_runs, reward_streams

# Eager aggregates refresh when partitions change; Dagster's own automation sensor starts
# stopped, so ours runs by default (STACK.md).
automation_sensor = dg.AutomationConditionSensorDefinition(
    "rts_automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)

ASSETS = [discovered_runs, reward_streams]
RESOURCES = {"run_source": OfflineRunsSource(), "rts_storage": RtsStorage()}

defs = dg.Definitions(assets=ASSETS, sensors=[automation_sensor], resources=RESOURCES)
