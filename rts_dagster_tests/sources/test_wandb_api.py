"""`WandbRunSource` with the real `wandb.Api` (0.31) against the local fake backend."""

from __future__ import annotations

import io
import itertools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from rts_dagster.analysis.streams import HISTORY_PREFIXES
from rts_dagster.discovery import DiscoveryRules, classify_runs
from rts_dagster.schema import COMPLETION_RECORD
from rts_dagster.sources.base import RunReadError, RunSource
from rts_dagster.sources.wandb_api import (
    RetryPolicy,
    RunFilters,
    WandbAuthError,
    WandbRunSource,
    WandbUnavailableError,
    classify_error,
)
from rts_dagster_tests.fakes.wandb_data import LABELS, metta_history, wandb_client_env
from rts_dagster_tests.fakes.wandb_server import FakeRun, FakeWandbServer

T0 = datetime(2026, 1, 5, 12, tzinfo=UTC)
FAST_RETRY = RetryPolicy(max_tries=4, base_s=0.05, cap_s=0.5, rate_limit_wait_s=1.0)


# --- test data ------------------------------------------------------------------------------
def expected_history(history: pl.DataFrame, prefixes: Sequence[str] = HISTORY_PREFIXES):
    keys = sorted(
        c
        for c in history.columns
        if c not in ("_step", "_timestamp") and c.startswith(tuple(prefixes))
    )
    return history.select(
        pl.col("_step").cast(pl.Int64),
        pl.col("_timestamp").cast(pl.Float64),
        *(pl.col(k).cast(pl.Float64) for k in keys),
    ).sort("_step")


def chunk_bytes(worker: int, start: int, n: int) -> tuple[pl.DataFrame, bytes]:
    frame = pl.DataFrame(
        {
            "completion_index": list(range(start, start + n)),
            "worker": [worker] * n,
            "label": [LABELS[i % 2] for i in range(n)],
            "task_id": list(range(n)),
            "reward": [0.1 * i for i in range(n)],
            "agent_step": [100 * (start + i) for i in range(n)],
            "epoch": [(start + i) // 4 for i in range(n)],
            "wall_time": [1.7e9 + start + i for i in range(n)],
        },
        schema=COMPLETION_RECORD,
    )
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return frame, buffer.getvalue()


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _wandb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wandb_client_env(monkeypatch, tmp_path)


@pytest.fixture
def server() -> Iterator[FakeWandbServer]:
    with FakeWandbServer() as fake:
        yield fake


def make_source(server: FakeWandbServer, tmp_path: Path, **kwargs: Any) -> WandbRunSource:
    kwargs.setdefault("timeout_s", 2.0)
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("per_page", 2)
    return WandbRunSource(
        server.entity,
        server.project,
        base_url=server.base_url,
        cache_dir=tmp_path / "cache",
        **kwargs,
    )


def arrivals(server: FakeWandbServer, operation: str) -> list[float]:
    return [r.at for r in server.requests if r.operation == operation]


# --- discovery ------------------------------------------------------------------------------
def test_is_a_run_source(server: FakeWandbServer, tmp_path: Path) -> None:
    source: RunSource = make_source(server, tmp_path)
    assert source.name == "wandb"


def test_list_runs_filters_server_side_and_paginates(server: FakeWandbServer, tmp_path: Path):
    for i in range(5):  # matching runs, heartbeats in reverse creation order
        server.add_run(
            FakeRun(
                f"id{i}",
                name=f"alice.fixed_maps.seed{i}",
                tags=["user:alice", "lp"],
                state="finished" if i % 2 else "crashed",
                config={"trainer": {"lr": 0.1}, "seed": i},
                created_at=T0 + timedelta(minutes=i),
                heartbeat_at=T0 + timedelta(hours=5 - i),
            )
        )
    server.add_run(FakeRun("bob1", name="bob.fixed_maps.seed1", tags=["user:bob"]))
    server.add_run(FakeRun("alice-run", name="alice.x.seed1", tags=["user:alice"], state="running"))
    server.add_run(
        FakeRun(
            "alice-lr", name="alice.y.seed1", tags=["user:alice"], config={"trainer": {"lr": 1}}
        )
    )
    filters = RunFilters(
        name_regex=r"^alice\.",
        tags_any=("user:alice",),
        states=("finished", "crashed"),
        config_equals={"trainer.lr": 0.1},
    )
    runs, unreadable = make_source(server, tmp_path, filters=filters).list_runs()

    assert unreadable == []
    assert [r.run_id for r in runs] == ["id4", "id3", "id2", "id1", "id0"]  # +heartbeat_at
    assert server.count("Runs") == 3  # 5 runs, 2 per page
    first = next(r for r in runs if r.run_id == "id1")
    assert first.run_name == "alice.fixed_maps.seed1"
    assert first.tags == ("user:alice", "lp")
    assert first.config == {"trainer": {"lr": 0.1}, "seed": 1}
    assert first.state == "finished"
    assert first.created_at == T0 + timedelta(minutes=1)
    assert first.heartbeat_at == T0 + timedelta(hours=4)
    assert first.heartbeat_at.tzinfo is UTC
    assert (first.source, first.location) == ("wandb", "tests/rts-test/id1")
    assert first.fingerprint == "finished:2026-01-05T16:00:00:unread"
    assert (first.entity, first.project) == ("tests", "rts-test")


def test_updated_since_asks_the_server_for_recent_heartbeats(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    for i in range(4):
        server.add_run(FakeRun(f"r{i}", heartbeat_at=T0 + timedelta(minutes=10 * i)))
    source = make_source(server, tmp_path, updated_since_overlap_s=0)
    runs, _ = source.list_runs(updated_since=T0 + timedelta(minutes=15))
    assert [r.run_id for r in runs] == ["r2", "r3"]
    sent = [r.variables["filters"] for r in server.requests if r.operation == "Runs"]
    assert sent[-1] == '{"heartbeatAt": {"$gt": "2026-01-05T12:15:00"}}'
    # the default overlap window also returns runs that beat just before the cut
    runs, _ = make_source(server, tmp_path).list_runs(updated_since=T0 + timedelta(minutes=20.5))
    assert [r.run_id for r in runs] == ["r2", "r3"]


def test_state_change_between_two_listings(server: FakeWandbServer, tmp_path: Path) -> None:
    server.add_run(FakeRun("r1", state="crashed", heartbeat_at=T0))
    source = make_source(server, tmp_path)
    first = source.list_runs()[0][0]
    server.update_run("r1", state="running", heartbeat_at=T0 + timedelta(minutes=5))
    second = source.list_runs()[0][0]
    server.update_run("r1", state="finished", heartbeat_at=T0 + timedelta(minutes=9))
    third = source.get_run(second.location)
    assert [r.state for r in (first, second, third)] == ["crashed", "running", "finished"]
    assert len({first.fingerprint, second.fingerprint, third.fingerprint}) == 3
    assert second.fingerprint.endswith(":live")  # a running run's export is never complete
    assert third.heartbeat_at == T0 + timedelta(minutes=9)


def test_get_run_of_a_deleted_run_is_a_read_error(server: FakeWandbServer, tmp_path: Path):
    with pytest.raises(RunReadError, match="run not found"):
        make_source(server, tmp_path).get_run("tests/rts-test/gone")


# --- history --------------------------------------------------------------------------------
def test_history_from_the_export_is_every_row_of_the_needed_keys(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    history = metta_history(40, seed=1)
    server.add_run(FakeRun("r1", history=history, export_parts=3))  # late.label: not in part 0
    source = make_source(server, tmp_path)
    run = source.list_runs()[0][0]

    frame = source.read_history(run, HISTORY_PREFIXES)
    assert_frame_equal(frame, expected_history(history))
    assert "overview/reward" not in frame.columns and "_runtime" not in frame.columns
    assert math.isnan(frame["env_per_label_rewards/training_facility.extractor_hub_30"][5])
    assert "SampledHistoryPage" not in server.operations()

    server.reset_log()
    again = source.read_history(run, HISTORY_PREFIXES)  # same state/heartbeat: cached
    assert_frame_equal(again, frame)
    assert server.operations() == []
    everything = source.read_history(run)
    assert_frame_equal(everything, expected_history(history, [""]))


def test_incomplete_export_falls_back_to_scan_history_then_repulls(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    history = metta_history(30, seed=2)
    server.add_run(FakeRun("r1", history=history, exported_rows=12))  # 18 rows still live
    source = make_source(server, tmp_path, export_probe_interval_s=0)
    run = source.list_runs()[0][0]
    assert run.fingerprint.endswith(":unread")  # never read: not known yet

    frame = source.read_history(run, HISTORY_PREFIXES)
    assert_frame_equal(frame, expected_history(history))
    assert server.count("SampledHistoryPage") > 0  # the live tail came from the scan

    relisted = source.list_runs()[0][0]
    assert relisted.fingerprint.endswith(":live")  # a refresh re-pulls it later
    assert relisted.extra["export_complete"] is False
    server.reset_log()
    assert_frame_equal(source.read_history(relisted, HISTORY_PREFIXES), frame)
    assert server.count("SampledHistoryPage") == 0  # scan result cached for this heartbeat

    server.complete_export("r1")
    complete = source.list_runs()[0][0]
    assert complete.fingerprint.endswith(":export") and complete.fingerprint != relisted.fingerprint
    server.reset_log()
    assert_frame_equal(source.read_history(complete, HISTORY_PREFIXES), frame)
    assert server.operations() == []  # the probe already downloaded the export


def test_incremental_listing_relists_runs_whose_export_completes_late(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """A finished run's heartbeat stops moving; its export may complete hours later. The
    incremental listing must still show it, marked late_data, until the window passes."""
    server.add_run(FakeRun("old", history=metta_history(20, seed=3), exported_rows=5))
    server.add_run(FakeRun("done", history=metta_history(20, seed=4)))
    recent = T0 + timedelta(days=2)
    server.add_run(FakeRun("new", created_at=recent, history=metta_history(20, seed=5)))
    source = make_source(server, tmp_path, export_probe_interval_s=0)
    by_id = {r.run_id: r for r in source.list_runs()[0]}
    for run in by_id.values():
        source.read_history(run, HISTORY_PREFIXES)  # "old" falls back to scan_history

    since = recent  # both "old" and "done" beat long before this
    runs = {r.run_id: r for r in source.list_runs(updated_since=since)[0]}
    assert set(runs) == {"new", "old"}  # "old" is still exporting: re-listed by id
    assert runs["old"].extra.get("late_data") is True and "late_data" not in runs["new"].extra
    assert runs["old"].fingerprint.endswith(":live")
    sent = [r.variables["filters"] for r in server.requests if r.operation == "Runs"]
    assert sent[-1] == '{"name": {"$in": ["old"]}}'

    server.complete_export("old")
    runs = {r.run_id: r for r in source.list_runs(updated_since=since)[0]}
    assert runs["old"].fingerprint.endswith(":export") and runs["old"].extra["late_data"]
    # still listed for late_export_window_s after completing, so a sensor that did not
    # run the probe itself sees the change; then it drops out of incremental listings
    assert "old" in {r.run_id for r in source.list_runs(updated_since=since)[0]}
    short = make_source(server, tmp_path, late_export_window_s=0)
    assert {r.run_id for r in short.list_runs(updated_since=since)[0]} == {"new"}


def test_scan_fallback_refuses_unbounded_scans(server: FakeWandbServer, tmp_path: Path):
    server.add_run(FakeRun("r1", history=metta_history(20, 3, 10_000_000), exported_rows=0))
    source = make_source(server, tmp_path, max_scan_pages=100)
    with pytest.raises(RunReadError, match="scan_history would need 20001 pages"):
        source.read_history(source.list_runs()[0][0], HISTORY_PREFIXES)


# --- completions ----------------------------------------------------------------------------
def test_completions_are_downloaded_once_and_conformed(server: FakeWandbServer, tmp_path: Path):
    w1a, blob_w1a = chunk_bytes(1, 0, 5)
    w0a, blob_w0a = chunk_bytes(0, 0, 4)
    w0b, blob_w0b = chunk_bytes(0, 4, 3)
    files = {
        "reward_stream/part-w0001-000000.parquet": blob_w1a,
        "reward_stream/part-w0000-000001.parquet": blob_w0b,
        "reward_stream/part-w0000-000000.parquet": blob_w0a,
        "reward_stream/.part-w0000-000002.parquet.123.tmp": b"partial",
        "reward_stream/notes.txt": b"not a chunk",
        "output.log": b"console",
    }
    server.add_run(FakeRun("r1", files=files))
    server.add_run(FakeRun("r2"))
    source = make_source(server, tmp_path)
    runs = {r.run_id: r for r in source.list_runs()[0]}

    got = source.read_completions(runs["r1"])
    assert got is not None
    assert_frame_equal(got, pl.concat([w0a, w0b, w1a]))
    assert got.schema == COMPLETION_RECORD
    assert source.read_completions(runs["r2"]) is None

    server.reset_log()
    assert_frame_equal(source.read_completions(runs["r1"]), got)
    assert [r for r in server.requests if r.method == "GET"] == []  # all from the cache

    changed, blob_changed = chunk_bytes(1, 0, 6)  # a re-uploaded chunk (new md5)
    server.update_run(
        "r1", files={**files, "reward_stream/part-w0001-000000.parquet": blob_changed}
    )
    again = source.read_completions(runs["r1"])
    assert_frame_equal(again, pl.concat([w0a, w0b, changed]))
    assert len([r for r in server.requests if r.method == "GET"]) == 1


# --- politeness: retries, rate limits, auth -------------------------------------------------
def test_rate_limit_waits_at_least_the_reset(server: FakeWandbServer, tmp_path: Path) -> None:
    server.add_run(FakeRun("r1"))
    source = make_source(server, tmp_path)
    source.list_runs()  # warm up the client
    server.reset_log()
    server.rate_limit(times=3, reset_s=1, operation="Runs")
    runs, _ = source.list_runs()
    assert [r.run_id for r in runs] == ["r1"]
    times = arrivals(server, "Runs")
    assert [r.status for r in server.requests if r.operation == "Runs"] == [429, 429, 429, 200]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times)), times


def test_server_errors_are_retried(server: FakeWandbServer, tmp_path: Path) -> None:
    server.add_run(FakeRun("r1", history=metta_history(10, 4)))
    source = make_source(server, tmp_path)
    run = source.list_runs()[0][0]
    server.fail_graphql(500, times=3, operation="RunParquetHistory")
    server.fail_graphql(502, times=1, operation="GET")
    frame = source.read_history(run, HISTORY_PREFIXES)
    assert frame.height == 10
    statuses = [r.status for r in server.requests if r.operation == "RunParquetHistory"]
    assert statuses == [500, 500, 500, 200]


def test_a_timeout_is_retried(server: FakeWandbServer, tmp_path: Path) -> None:
    server.add_run(FakeRun("r1"))
    source = make_source(server, tmp_path, timeout_s=1.0)
    source.list_runs()
    server.delay(1.6, times=2, operation="Runs")  # both of wandb-core's attempts time out
    started = time.monotonic()
    runs, _ = source.list_runs()
    assert [r.run_id for r in runs] == ["r1"]
    assert time.monotonic() - started >= 2.0


def test_retries_are_bounded(server: FakeWandbServer, tmp_path: Path) -> None:
    server.add_run(FakeRun("r1"))
    source = make_source(server, tmp_path, retry=RetryPolicy(max_tries=2, base_s=0.05))
    source.list_runs()
    server.reset_log()
    server.fail_graphql(503, times=100, operation="Runs")
    started = time.monotonic()
    with pytest.raises(
        WandbUnavailableError, match=r"list runs of tests/rts-test: gave up after 2"
    ):
        source.list_runs()
    assert server.count("Runs") == 4  # 2 tries, each wandb-core's attempt plus one retry
    assert time.monotonic() - started < 10


def test_auth_failure_never_shows_the_key(
    server: FakeWandbServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    secret = "local-" + "c0ffee42" * 5
    monkeypatch.setenv("WANDB_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(WandbAuthError) as caught:
        make_source(server, tmp_path).list_runs()
    message = str(caught.value)
    assert "WANDB_API_KEY" in message and "HTTP 401" in message
    chain: BaseException | None = caught.value
    while chain is not None:
        assert secret not in repr(chain)
        chain = chain.__cause__ or chain.__context__
    out, err = capfd.readouterr()
    assert secret not in caplog.text + out + err

    monkeypatch.delenv("WANDB_API_KEY")
    with pytest.raises(WandbAuthError, match="WANDB_API_KEY is not set"):
        make_source(server, tmp_path).list_runs()


def test_forbidden_mid_session_is_an_auth_error(server: FakeWandbServer, tmp_path: Path):
    server.add_run(FakeRun("r1"))
    source = make_source(server, tmp_path)
    run = source.list_runs()[0][0]
    server.fail_graphql(403, times=1, operation="Run")
    with pytest.raises(WandbAuthError, match="HTTP 403"):
        source.get_run(run.location)


def test_classify_error_and_backoff() -> None:
    class Failed(Exception):
        pass

    gave_up = Failed("POST x giving up after 2 attempt(s)\nwhile retrying: HTTP 429: slow down")
    assert classify_error(gave_up) == ("retry", 429)
    assert classify_error(Failed("unexpected HTTP status 503 Service Unavailable")) == (
        "retry",
        503,
    )
    assert classify_error(Failed("the service process is busy and did not respond in time")) == (
        "retry",
        None,
    )
    assert classify_error(Failed("status: 404 Not Found")) == ("fatal", 404)
    assert classify_error(Failed("HTTP 401: user is not logged in"))[0] == "auth"
    policy = RetryPolicy(base_s=0.5, cap_s=4, rate_limit_wait_s=3)
    assert [policy.wait_s(a, False) for a in (1, 2, 3, 4, 5)] == [0.5, 1, 2, 4, 4]
    assert policy.wait_s(1, True) == 3


# --- the acceptance scenario ----------------------------------------------------------------
def test_acceptance_six_runs_one_crashed_one_still_exporting(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    histories = {}
    for t, task in enumerate(("fixed_maps", "assembly_lines")):
        for seed in (1, 2, 3):
            run_id = f"alice.{task}.seed{seed}"
            histories[run_id] = metta_history(24, seed=10 * t + seed)
            server.add_run(
                FakeRun(
                    run_id,
                    tags=["user:alice"],
                    config={"seed": seed},
                    created_at=T0 + timedelta(minutes=10 * t + seed),
                    heartbeat_at=T0 + timedelta(hours=2, minutes=10 * t + seed),
                    history=histories[run_id],
                )
            )
    server.update_run("alice.fixed_maps.seed2", state="crashed")
    exporting = "alice.assembly_lines.seed3"
    server.update_run(exporting, exported_rows=0)

    source = make_source(server, tmp_path, export_probe_interval_s=0)
    runs, unreadable = source.list_runs()
    assert unreadable == [] and len(runs) == 6
    states = {r.run_id: r.state for r in runs}
    assert states == {run_id: "finished" for run_id in histories} | {
        "alice.fixed_maps.seed2": "crashed"
    }
    table = classify_runs(runs, [], DiscoveryRules())
    assert sorted(table["partition_key"].to_list()) == sorted(
        f"{task}.seed{seed}" for task in ("fixed_maps", "assembly_lines") for seed in (1, 2, 3)
    )

    for run in runs:
        server.reset_log()
        frame = source.read_history(run, HISTORY_PREFIXES)
        assert_frame_equal(frame, expected_history(histories[run.run_id]))
        scanned = server.count("SampledHistoryPage") > 0
        assert scanned == (run.run_id == exporting), run.run_id

    by_id = {r.run_id: r for r in source.list_runs()[0]}
    assert by_id[exporting].fingerprint.endswith(":live")
    server.complete_export(exporting)
    by_id = {r.run_id: r for r in source.list_runs()[0]}
    assert by_id[exporting].fingerprint.endswith(":export")
    server.reset_log()
    frame = source.read_history(by_id[exporting], HISTORY_PREFIXES)
    assert_frame_equal(frame, expected_history(histories[exporting]))
    assert server.count("SampledHistoryPage") == 0


# --- the Dagster resource -------------------------------------------------------------------
def test_resource_builds_the_source_with_server_side_filters(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    from rts_dagster.defs.resources import WandbRunsSource

    server.add_run(FakeRun("a1", name="alice.t.seed1", tags=["user:alice"], config={"seed": 1}))
    server.add_run(FakeRun("b1", name="bob.t.seed1", tags=["user:bob"], config={"seed": 1}))
    resource = WandbRunsSource(
        entity=server.entity,
        project=server.project,
        base_url=server.base_url,
        cache_dir=str(tmp_path / "cache"),
        tags_any=["user:alice"],
        config_equals_json='{"seed": 1}',
        timeout_s=2,
    )
    assert "key" not in repr(resource).lower()
    runs, _ = resource.source().list_runs()
    assert [r.run_id for r in runs] == ["a1"]
    assert resource.rules().rules[0].name == "default"


def test_a_run_whose_config_is_not_json_is_unreadable_and_the_others_are_listed(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    for i in range(3):  # per_page=2: the bad run shares a page with a good one
        server.add_run(
            FakeRun(f"ok{i}", name=f"alice.fixed_maps.seed{i}", created_at=T0 + timedelta(i))
        )
    server.add_run(
        FakeRun(
            "bad1",
            name="alice.fixed_maps.seed9",
            raw_config="{not json",
            created_at=T0 + timedelta(hours=1),
        )
    )
    runs, unreadable = make_source(server, tmp_path).list_runs()
    assert sorted(r.run_id for r in runs) == ["ok0", "ok1", "ok2"]
    assert [u.location for u in unreadable] == ["tests/rts-test/bad1"]
    assert "alice.fixed_maps.seed9" in unreadable[0].error
    table = classify_runs(runs, unreadable, DiscoveryRules())
    assert table.filter(pl.col("status") == "unreadable")["location"].to_list() == [
        "tests/rts-test/bad1"
    ]


def test_auth_error_names_the_server_from_wandb_base_url(
    server: FakeWandbServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "bad0" * 10)
    monkeypatch.setenv("WANDB_BASE_URL", server.base_url)
    source = WandbRunSource(
        server.entity, server.project, cache_dir=tmp_path / "cache", retry=FAST_RETRY
    )
    with pytest.raises(WandbAuthError) as caught:
        source.list_runs()
    message = str(caught.value)
    assert server.base_url in message and "WANDB_BASE_URL" in message
    assert "default" not in message
    assert server.count("Viewer") + server.count("Runs") >= 1  # it did ask that server


def test_a_hanging_server_costs_at_most_timeout_s_per_try(
    server: FakeWandbServer, tmp_path: Path
) -> None:
    """Login answers just inside `timeout_s`, the run query never: each try of "load run"
    is still cut at `timeout_s` (not login + query time), and after the call gave up, the
    next call makes one try only."""
    server.add_run(FakeRun("r1"))
    location = f"{server.entity}/{server.project}/r1"
    make_source(server, tmp_path).list_runs()  # wandb imported and set up before timing
    server.delay(0.8, times=100, operation="Viewer")
    server.delay(30.0, times=100, operation="Run")
    retry = RetryPolicy(max_tries=3, base_s=0.05, cap_s=0.05)
    source = make_source(server, tmp_path, timeout_s=1.0, retry=retry)
    started = time.monotonic()
    with pytest.raises(WandbUnavailableError, match="load run: gave up after 3 tries"):
        source.get_run(location)
    first = time.monotonic() - started
    assert first < 3 * 1.0 + 2 * 0.05 + 0.6  # three tries of at most timeout_s each

    started = time.monotonic()
    with pytest.raises(WandbUnavailableError, match="gave up after 1 tries"):
        source.get_run(location)
    assert time.monotonic() - started < 1.0 + 0.5
