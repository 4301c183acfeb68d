"""What the Dagster daemon does with one sensor tick, for tests on a real instance."""

from __future__ import annotations

from typing import Any

import dagster as dg


def apply_tick(
    sensor: dg.SensorDefinition,
    instance: dg.DagsterInstance,
    cursor: str | None,
    definitions: dg.Definitions,
    resources: dict[str, Any],
) -> Any:
    """Evaluate one tick and apply its side effects as the daemon would: add the requested
    dynamic partitions and record the runless asset events (`evaluate_tick` leaves both
    to the daemon). Returns the tick's data (run requests, cursor, ...)."""
    context = dg.build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        cursor=cursor,
        definitions=definitions,
        resources=resources,  # evaluate_tick does not take them from `definitions`
    )
    data = sensor.evaluate_tick(context)
    for request in data.dynamic_partitions_requests or []:
        known = set(instance.get_dynamic_partitions(request.partitions_def_name))
        new = [k for k in request.partition_keys if k not in known]
        instance.add_dynamic_partitions(request.partitions_def_name, new)
    for event in data.asset_events:
        instance.report_runless_asset_event(event)
    return data


def execute_request(
    request: dg.RunRequest, instance: dg.DagsterInstance, resources: dict[str, Any]
) -> None:
    """Run a sensor's request in-process, as a run worker would; it must succeed."""
    from rts_dagster.definitions import ASSETS

    result = dg.materialize(
        ASSETS,
        selection=list(request.asset_selection or []),
        partition_key=request.partition_key,
        instance=instance,
        resources=resources,
        tags=request.tags,
    )
    assert result.success, request.partition_key
