"""Run the asset graph for tests the way `rts refresh` does: discovery, every partition's
per-run assets, then the aggregates, on a real (temporary) Dagster instance."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from rts_dagster.definitions import ASSETS
from rts_dagster.defs.resources import OfflineRunsSource, RtsStorage

PER_RUN = ["reward_streams", "series_metrics", "lp_replay"]
AGGREGATES = [
    "data_quality",
    "variance_table",
    "timescale_recommendations",
    "lp_recommendations",
    "verdicts",
    "experiment_comparison",
    "experiment_plan",
    "report",
]
# a closed loop short enough for tests (the default is 3 seeds x 300 epochs)
FAST_CLOSED_LOOP = {
    "ops": {
        "lp_recommendations": {
            "config": {"closed_loop_epochs": 20, "closed_loop_seeds": [1], "workers": 1}
        }
    }
}


@contextmanager
def materialized(
    offline: Path,
    data: Path,
    per_run: list[str] = PER_RUN,
    aggregates: list[str] = AGGREGATES,
    run_config: dict[str, Any] | None = None,
) -> Iterator[tuple[dg.DagsterInstance, dict[str, Any]]]:
    """Materialize the offline runs under `offline` into `data`; yields the instance and
    the resources (for further materializations), asserting every step succeeded."""
    resources = {
        "run_source": OfflineRunsSource(directory=str(offline)),
        "rts_storage": RtsStorage(data_dir=str(data)),
    }
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            ASSETS, selection=["discovered_runs"], instance=instance, resources=resources
        ).success
        for key in instance.get_dynamic_partitions("runs") if per_run else []:
            assert dg.materialize(
                ASSETS, selection=per_run, partition_key=key, instance=instance, resources=resources
            ).success
        if aggregates:
            assert dg.materialize(
                ASSETS,
                selection=aggregates,
                instance=instance,
                resources=resources,
                run_config=run_config,
            ).success
        yield instance, resources
