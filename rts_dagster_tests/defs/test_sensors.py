"""`finished_runs_sensor` on a real temporary instance over real offline wandb runs.

Runs appear by copying run folders in; a run without its exit record is "running" while
its file is fresh and "crashed" once it has been quiet longer than the source's grace
period (we set the mtime), and "finished" when the full file comes back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from rts_dagster import sensor_cursor as sc
from rts_dagster.definitions import ASSETS
from rts_dagster.defs.resources import OfflineRunsSource, RtsStorage
from rts_dagster.defs.sensors import build_finished_runs_sensor, finished_runs_sensor
from rts_dagster.report import document
from rts_dagster.sources.skypilot import SkyPilotJobs
from rts_dagster.sources.wandb_file import DEFAULT_RUNNING_GRACE_S, iter_records
from rts_dagster_tests.conftest import write_tiny_run
from rts_dagster_tests.defs.daemon import apply_tick, execute_request

AGGREGATES = ["data_quality", "variance_table", "timescale_recommendations", "verdicts", "report"]
DUPLICATE = "bob.fixed_maps.seed1"  # claims (fixed_maps, 1) after alice's run did


@pytest.fixture(scope="module")
def stock(tiny_offline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run folder of each run id: the shared tiny runs plus a later duplicate claim."""
    extra = tmp_path_factory.mktemp("duplicate")
    write_tiny_run(extra, "fixed_maps", 1, name=DUPLICATE)
    folders = {}
    for root in (tiny_offline_dir, extra):
        for path in root.rglob("run-*.wandb"):
            folders[path.name.removeprefix("run-").removesuffix(".wandb")] = path.parent
    return folders


def _empty_queue() -> Any:
    return ([], 0, {}, 0)


class Harness:
    """An instance, a data dir, an offline dir the test fills, and sensor ticks applied
    the way the daemon applies them (evaluate_tick leaves partitions and events to it)."""

    def __init__(self, tmp_path: Path, instance: dg.DagsterInstance, stock: dict[str, Path]):
        self.instance = instance
        self.stock = stock
        self.offline = tmp_path / "offline" / "wandb"
        self.offline.mkdir(parents=True)
        self.data = tmp_path / "data"
        self.resources = {
            "run_source": OfflineRunsSource(directory=str(self.offline.parent)),
            "rts_storage": RtsStorage(data_dir=str(self.data)),
        }
        self.cursor: str | None = None
        self.restart(build_finished_runs_sensor(skypilot=SkyPilotJobs(queue=_empty_queue)))

    def restart(self, sensor: dg.SensorDefinition) -> None:
        """A new code location: new sensor and resource objects; only the cursor is kept."""
        self.sensor = sensor
        self.defs = dg.Definitions(assets=ASSETS, sensors=[sensor], resources=self.resources)

    def tick(self) -> Any:
        data = apply_tick(self.sensor, self.instance, self.cursor, self.defs, self.resources)
        self.cursor = data.cursor
        return data

    def copy_in(self, run_id: str) -> Path:
        folder = self.stock[run_id]
        shutil.copytree(folder, self.offline / folder.name)
        return self.offline / folder.name / f"run-{run_id}.wandb"

    def write_unfinished(self, run_id: str, *, quiet_for_s: float = 0.0) -> Path:
        """The run's file cut inside its exit record (what a killed writer leaves), with
        an mtime `quiet_for_s` seconds ago."""
        source = self.stock[run_id] / f"run-{run_id}.wandb"
        data = source.read_bytes()
        exit_offset = _exit_record_offset(source)
        path = self.offline / self.stock[run_id].name / source.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[: exit_offset + 5])
        set_quiet(path, quiet_for_s)
        return path

    def partitions(self) -> list[str]:
        return sorted(self.instance.get_dynamic_partitions("runs"))

    def discovered(self) -> pl.DataFrame:
        return pl.read_parquet(self.data / "discovered_runs.parquet")

    def execute(self, request: dg.RunRequest) -> None:
        execute_request(request, self.instance, self.resources)

    def aggregates(self) -> str:
        assert dg.materialize(
            ASSETS, selection=AGGREGATES, instance=self.instance, resources=self.resources
        ).success
        return (self.data / "report" / "report.md").read_text(encoding="utf-8")


def _exit_record_offset(path: Path) -> int:
    from wandb.proto import wandb_internal_pb2

    for offset, payload in iter_records(path):
        if wandb_internal_pb2.Record.FromString(payload).WhichOneof("record_type") == "exit":
            return offset
    raise AssertionError(f"{path} has no exit record")


def set_quiet(path: Path, seconds: float) -> None:
    stamp = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(stamp, stamp))


@pytest.fixture
def harness(tmp_path: Path, stock: dict[str, Path]):
    with dg.instance_for_test() as instance:
        yield Harness(tmp_path, instance, stock)


def _keys(data: Any) -> list[str]:
    return [r.run_key for r in data.run_requests]


def _run_state(run_key: str) -> str:
    """`run_id:state` of a run_key `run_id:state:marker` (offline markers hold colons)."""
    return ":".join(run_key.split(":", 2)[:2])


def test_ten_ticks_request_each_terminal_state_once(harness: Harness):
    h = harness
    all_keys: list[str] = []
    requests: dict[str, dg.RunRequest] = {}

    def tick(expect: list[str]) -> Any:
        data = h.tick()
        got = _keys(data)
        all_keys.extend(got)
        requests.update({r.run_key: r for r in data.run_requests})
        assert sorted(_run_state(k) for k in got) == sorted(expect)
        return data

    # 1: nothing there yet
    first = tick([])
    assert first.skip_message and sc.parse_cursor(first.cursor).heartbeat is None
    # 2: a finished run appears -> its partition is added and requested
    h.copy_in("alice.fixed_maps.seed1")
    tick(["alice.fixed_maps.seed1:finished"])
    assert h.partitions() == ["fixed_maps.seed1"]
    # 3: nothing changed
    tick([])
    # 4: another finished run, and one still being written (no exit record, fresh file)
    h.copy_in("alice.fixed_maps.seed2")
    live = h.write_unfinished("alice.assembly_lines.seed1")
    tick(["alice.fixed_maps.seed2:finished"])
    assert "assembly_lines.seed1" in h.partitions()  # registered while running
    # 5: the writer died: quiet for longer than the grace period -> crashed
    set_quiet(live, DEFAULT_RUNNING_GRACE_S + 100)
    tick(["alice.assembly_lines.seed1:crashed"])
    # 6: restart (the registered sensor, a new code location): nothing new
    h.restart(finished_runs_sensor)
    tick([])
    # 7: the run resumes: written to again, running
    h.write_unfinished("alice.assembly_lines.seed1")
    tick([])
    # 8: ... and finishes
    shutil.copy(h.stock["alice.assembly_lines.seed1"] / live.name, live)
    tick(["alice.assembly_lines.seed1:finished"])
    # 9: a second run claims (fixed_maps, 1); plus a file nobody can read
    h.copy_in(DUPLICATE)
    junk = h.offline / "offline-run-junk" / "run-junk.wandb"
    junk.parent.mkdir()
    junk.write_bytes(b"not a wandb file" * 8)
    tick([f"{DUPLICATE}:finished"])
    # 10: restart again; a finished run no rule matches is not requested
    h.restart(build_finished_runs_sensor(skypilot=SkyPilotJobs(queue=_empty_queue)))
    h.copy_in("unmatched-run-name")
    tick([])

    assert len(all_keys) == len(set(all_keys)) == 5
    table = h.discovered()
    matched = table.filter(pl.col("status") == "matched")
    assert h.partitions() == sorted(matched["partition_key"].to_list())
    key_of = dict(zip(matched["run_id"], matched["partition_key"], strict=True))
    assert key_of["alice.fixed_maps.seed1"] == "fixed_maps.seed1"  # the earlier run keeps it
    assert key_of[DUPLICATE].startswith("fixed_maps.seed1.")
    for run_key, request in requests.items():
        assert request.partition_key == key_of[run_key.split(":", 1)[0]]
        assert [k.to_user_string() for k in request.asset_selection] == [
            "reward_streams",
            "series_metrics",
            "lp_replay",
        ]
        assert request.tags["rts/trigger"] == "finished_runs_sensor"
    assert set(table.filter(pl.col("status") != "matched")["status"]) == {"ignored", "unreadable"}
    event = h.instance.get_latest_materialization_event(dg.AssetKey("discovered_runs"))
    assert event is not None and event.asset_materialization is not None
    assert event.asset_materialization.metadata["written_by"].value == "finished_runs_sensor"
    # the stored cursor is small and keeps the runs of the window only
    cursor = json.loads(h.cursor or "{}")
    assert len(cursor["processed"]) <= 6 and cursor["pending"] == []


def test_skypilot_job_ended_waits_for_the_run(harness: Harness):
    h = harness
    doc = json.loads(
        (Path(__file__).parents[1] / "sources" / "data" / "skypilot_queue_v2.json").read_text()
    )
    now = time.time()
    records = [
        *doc["records"],  # ended months ago: before the first look, never tracked
        {
            "job_id": 501,
            "task_id": 0,
            "job_name": "alice.assembly_lines.seed1",
            "status": "FAILED",
            "submitted_at": now - 3600,
            "start_at": now - 3500,
            "end_at": now - 5,
            "user_name": "alice",
        },
        {  # never got a cluster: no run to wait for
            "job_id": 502,
            "job_name": "alice.fixed_maps.seed2",
            "status": "FAILED_NO_RESOURCE",
            "submitted_at": now - 60,
            "end_at": now - 30,
        },
    ]
    h.restart(build_finished_runs_sensor(skypilot=SkyPilotJobs(queue=lambda: (records, 0, {}, 0))))
    live = h.write_unfinished("alice.assembly_lines.seed1")  # WandB still says running

    first = h.tick()
    assert _keys(first) == []
    pending = sc.parse_cursor(first.cursor).pending
    assert [(j.job_id, j.run_name) for j in pending.values()] == [
        (501, "alice.assembly_lines.seed1")
    ]
    assert _keys(h.tick()) == []  # still running: kept waiting, no failure
    assert list(sc.parse_cursor(h.cursor).pending) == [501]

    set_quiet(live, DEFAULT_RUNNING_GRACE_S + 100)  # the run source catches up
    third = h.tick()
    assert [_run_state(k) for k in _keys(third)] == ["alice.assembly_lines.seed1:crashed"]
    assert sc.parse_cursor(third.cursor).pending == {}
    assert _keys(h.tick()) == []


def test_new_run_end_to_end_refreshes_the_report(harness: Harness, monkeypatch: pytest.MonkeyPatch):
    # PNG rendering (kaleido) is tested with the report; here it would only cost time
    monkeypatch.setattr(document, "find_browser", lambda: None)
    h = harness
    for run_id in (
        "alice.fixed_maps.seed1",
        "alice.fixed_maps.seed2",
        "alice.assembly_lines.seed1",
    ):
        h.copy_in(run_id)
    data = h.tick()
    assert len(data.run_requests) == 3
    for request in data.run_requests:
        h.execute(request)
    assert "from 3 runs" in h.aggregates()

    h.copy_in("alice.assembly_lines.seed2")
    data = h.tick()
    (request,) = data.run_requests
    assert request.partition_key == "assembly_lines.seed2"
    assert request.partition_key in h.partitions()
    h.execute(request)
    report = h.aggregates()
    assert "from 4 runs" in report

    # a fresh cursor (e.g. reset in the UI) requests nothing whose partition is current
    h.cursor = None
    again = h.tick()
    assert again.run_requests == [] and again.skip_message


def test_a_partition_with_a_run_in_progress_is_decided_later(harness: Harness):
    """A request already queued or running for a partition is not doubled: the run may
    be the one that makes the partition current. Once it has ended, the tick decides."""
    h = harness
    h.tick()
    h.copy_in("alice.fixed_maps.seed1")
    job = h.defs.resolve_implicit_global_asset_job_def()
    queued = h.instance.create_run_for_job(
        job_def=job, tags={"dagster/partition": "fixed_maps.seed1"}
    )
    assert queued.status == dg.DagsterRunStatus.NOT_STARTED
    assert _keys(h.tick()) == []
    h.instance.report_run_failed(queued)
    assert [_run_state(k) for k in _keys(h.tick())] == ["alice.fixed_maps.seed1:finished"]


@pytest.mark.parametrize("keep_mtime", [True, False], ids=["cp-a", "cp-r"])
def test_a_run_copied_in_hours_after_it_finished_is_materialized(
    harness: Harness, tmp_path: Path, keep_mtime: bool
):
    """The acceptance case: the cursor has moved on, then a run that finished hours ago
    (logged times and file mtime 5 h old) is copied in, with its mtime kept (`cp -a`,
    `rsync -a`) or not (`cp -r`). The next tick requests it, once, and it materializes."""
    from datetime import UTC, datetime, timedelta

    from rts_dagster_tests.sources.test_wandb_file import write_with_old_clock

    h = harness
    h.tick()
    h.copy_in("alice.fixed_maps.seed1")
    (first,) = h.tick().run_requests
    h.execute(first)
    assert _keys(h.tick()) == []
    moved_on = sc.parse_cursor(h.cursor).heartbeat
    assert moved_on is not None and moved_on > datetime.now(UTC) - timedelta(hours=1)

    late_id = "alice.fixed_maps.seed2"
    folder = h.stock[late_id]
    stock = tmp_path / "stock" / folder.name
    write_with_old_clock(folder / f"run-{late_id}.wandb", stock / f"run-{late_id}.wandb", 5 * 3600)
    copy = shutil.copy2 if keep_mtime else shutil.copyfile
    shutil.copytree(stock, h.offline / folder.name, copy_function=copy)
    age_s = time.time() - (h.offline / folder.name / f"run-{late_id}.wandb").stat().st_mtime
    assert (age_s > 4 * 3600) == keep_mtime

    data = h.tick()
    assert [_run_state(k) for k in _keys(data)] == [f"{late_id}:finished"]
    (request,) = data.run_requests
    assert request.partition_key == "fixed_maps.seed2"
    h.execute(request)
    for asset in ("reward_streams", "series_metrics", "lp_replay"):
        done = h.instance.get_materialized_partitions(dg.AssetKey(asset))
        assert "fixed_maps.seed2" in done, asset
    assert _keys(h.tick()) == []  # handled once


def _fail_run_of(h: Harness, partition: str) -> None:
    """A Dagster run of `partition` that failed (what a crashed run worker leaves)."""
    job = h.defs.resolve_implicit_global_asset_job_def()
    run = h.instance.create_run_for_job(job_def=job, tags={"dagster/partition": partition})
    h.instance.report_run_failed(run)


def test_a_request_that_did_not_complete_is_retried_with_a_bound(harness: Harness):
    from datetime import timedelta

    from rts_dagster.defs.sensors import SensorSettings

    h = harness
    h.restart(
        build_finished_runs_sensor(
            skypilot=SkyPilotJobs(queue=_empty_queue),
            settings=SensorSettings(max_attempts=3, launch_timeout=timedelta(hours=1)),
        )
    )
    h.tick()
    h.copy_in("alice.fixed_maps.seed1")
    (first,) = h.tick().run_requests
    assert _keys(h.tick()) == []  # not run yet, within the launch timeout: wait
    keys = [first.run_key]
    for attempt in (2, 3):
        _fail_run_of(h, "fixed_maps.seed1")
        (retry,) = h.tick().run_requests
        assert retry.partition_key == "fixed_maps.seed1"
        assert retry.run_key == f"{first.run_key}:retry{attempt - 1}"
        assert retry.tags["rts/attempt"] == str(attempt)
        assert sc.parse_cursor(h.cursor).requested["fixed_maps.seed1"].attempts == attempt
        keys.append(retry.run_key)
    _fail_run_of(h, "fixed_maps.seed1")
    assert _keys(h.tick()) == []  # third failure: given up
    assert sc.parse_cursor(h.cursor).requested == {}
    assert _keys(h.tick()) == []
    assert len(set(keys)) == 3  # Dagster would skip a repeated run_key


def test_a_request_never_launched_is_retried_then_settles(harness: Harness):
    from datetime import timedelta

    from rts_dagster.defs.sensors import SensorSettings

    h = harness
    h.restart(
        build_finished_runs_sensor(
            skypilot=SkyPilotJobs(queue=_empty_queue),
            settings=SensorSettings(launch_timeout=timedelta(0)),
        )
    )
    h.tick()
    h.copy_in("alice.fixed_maps.seed1")
    (first,) = h.tick().run_requests  # ... and the daemon never launches it
    (retry,) = h.tick().run_requests
    assert retry.run_key == f"{first.run_key}:retry1" and retry.tags["rts/attempt"] == "2"
    h.execute(retry)
    assert _keys(h.tick()) == []
    assert sc.parse_cursor(h.cursor).requested == {}
