"""The Dagster wiring on the WandB source: the real `wandb.Api` against the fake server,
driven by `finished_runs_sensor` ticks and executed with `dg.materialize` on a real
temporary instance (what the daemon and a run worker do)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from rts_dagster import storage
from rts_dagster.definitions import ASSETS
from rts_dagster.defs.resources import RtsStorage, WandbRunsSource
from rts_dagster.defs.sensors import build_finished_runs_sensor
from rts_dagster.sources.skypilot import SkyPilotJobs
from rts_dagster_tests.defs.daemon import apply_tick, execute_request
from rts_dagster_tests.fakes.wandb_data import metta_history, wandb_client_env
from rts_dagster_tests.fakes.wandb_server import FakeRun, FakeWandbServer

T0 = datetime(2026, 1, 5, 12, tzinfo=UTC)
TASKS = ("fixed_maps", "assembly_lines")
# The run with the oldest heartbeat: once the newer runs have moved the sensor's window
# past it, only the late-export relisting can bring it back.
EXPORTING = "alice.fixed_maps.seed1"


@pytest.fixture(autouse=True)
def _wandb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wandb_client_env(monkeypatch, tmp_path)


@pytest.fixture
def server() -> Iterator[FakeWandbServer]:
    with FakeWandbServer() as fake:
        for t, task in enumerate(TASKS):
            for seed in (1, 2, 3):
                fake.add_run(
                    FakeRun(
                        f"alice.{task}.seed{seed}",
                        config={"seed": seed, "trainer": {"curriculum": {"ema_timescale": 0.001}}},
                        created_at=T0 + timedelta(minutes=10 * t + seed),
                        heartbeat_at=T0 + timedelta(hours=2, minutes=10 * t + seed),
                        history=metta_history(40, seed=10 * t + seed),
                    )
                )
        fake.update_run("alice.fixed_maps.seed2", state="crashed")
        fake.update_run(EXPORTING, exported_rows=10)  # the last 30 rows only live so far
        yield fake


class Daemon:
    """Sensor ticks applied the way the daemon applies them, runs executed in-process."""

    def __init__(self, instance: dg.DagsterInstance, resources: dict[str, Any]) -> None:
        self.instance = instance
        self.resources = resources
        self.sensor = build_finished_runs_sensor(
            skypilot=SkyPilotJobs(queue=lambda: ([], 0, {}, 0))
        )
        self.defs = dg.Definitions(assets=ASSETS, sensors=[self.sensor], resources=resources)
        self.cursor: str | None = None
        self.run_keys: set[str] = set()

    def tick(self) -> list[dg.RunRequest]:
        data = apply_tick(self.sensor, self.instance, self.cursor, self.defs, self.resources)
        self.cursor = data.cursor
        fresh = [r for r in data.run_requests if r.run_key not in self.run_keys]
        assert len(fresh) == len(data.run_requests), "the daemon would drop a repeated run_key"
        self.run_keys.update(r.run_key for r in fresh)
        for request in fresh:
            execute_request(request, self.instance, self.resources)
        return fresh


def test_sensor_materializes_a_wandb_project_and_follows_a_late_export(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    resources = {
        "run_source": WandbRunsSource(
            entity=server.entity,
            project=server.project,
            base_url=server.base_url,
            cache_dir=str(tmp_path / "cache"),
            timeout_s=5,
            export_probe_interval_s=0,
        ),
        "rts_storage": RtsStorage(data_dir=str(data_dir)),
    }
    with dg.instance_for_test() as instance:
        daemon = Daemon(instance, resources)

        first = daemon.tick()
        expected = sorted(f"{task}.seed{seed}" for task in TASKS for seed in (1, 2, 3))
        assert sorted(r.partition_key for r in first) == expected
        assert sorted(instance.get_dynamic_partitions("runs")) == expected
        meta = _metadata(data_dir, "fixed_maps", 1)
        assert meta["fingerprint"].endswith(":live") and meta["source"] == "wandb"
        assert meta["lp_config"] == {"ema_timescale": 0.001}
        live_streams = _streams(data_dir, "fixed_maps", 1)
        # 40 epochs x 3 labels, minus the late label's first 13 (absent) epochs
        assert live_streams.height == 40 * 3 - 13
        crashed = _metadata(data_dir, "fixed_maps", 2)
        assert crashed["state"] == "crashed"

        assert daemon.tick() == []  # nothing changed

        server.complete_export(EXPORTING)
        again = daemon.tick()
        assert [r.partition_key for r in again] == ["fixed_maps.seed1"]
        assert again[0].run_key.endswith(":export")
        meta = _metadata(data_dir, "fixed_maps", 1)
        assert meta["fingerprint"].endswith(":export")
        # the export holds the same rows the live scan returned
        assert_frame_equal(_streams(data_dir, "fixed_maps", 1), live_streams)

        assert daemon.tick() == []
        assert daemon.tick() == []

        # the aggregates run on the WandB-sourced partitions too
        result = dg.materialize(
            ASSETS,
            selection=[
                "data_quality",
                "variance_table",
                "timescale_recommendations",
                "verdicts",
                "report",
            ],
            instance=instance,
            resources=resources,
        )
        assert result.success
        variance = pl.read_parquet(storage.variance_table_path(data_dir))
        scopes = set(variance["scope"].to_list())
        assert {"across_tasks", *(f"within_task:{t}" for t in TASKS)} <= scopes
        across = variance.filter(pl.col("scope") == "across_tasks").row(0, named=True)
        assert (across["n_tasks"], across["n_seeds"]) == (2, 6)


def _metadata(data_dir: Path, task: str, seed: int) -> dict[str, Any]:
    return storage.read_json(data_dir / task / f"{seed}.metadata.json")


def _streams(data_dir: Path, task: str, seed: int) -> pl.DataFrame:
    return pl.read_parquet(data_dir / task / f"{seed}.parquet")
