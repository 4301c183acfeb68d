"""The sensor's cursor logic: format, selection, watermark, pruning, SkyPilot waiting."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from rts_dagster import sensor_cursor as sc

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def at(minutes: float) -> datetime:
    return T0 + minutes * MIN


def view(run_id: str, state: str, hb: float | None, marker: str | None = None) -> sc.RunView:
    heartbeat = at(hb) if hb is not None else None
    return sc.RunView(run_id, run_id, state, marker or f"{state}@{hb}", heartbeat)


def job(job_id: int, run_name: str, end: float, status: str = "SUCCEEDED") -> sc.EndedJob:
    return sc.EndedJob(job_id, run_name, status, at(end))


# --- format -----------------------------------------------------------------------------------
def test_round_trip_and_format():
    cursor = sc.SensorCursor(
        heartbeat=at(30),
        processed={("r1", "finished", "f1"): at(29), ("r2", "crashed", "f2"): None},
        pending={7: job(7, "alice.t.seed1", 25, "FAILED")},
        jobs_end_at=at(25),
        jobs_seen={7: at(25), 6: at(20)},
    )
    text = sc.serialize_cursor(cursor)
    assert sc.parse_cursor(text) == cursor
    raw = json.loads(text)
    assert raw["heartbeat"] == "2026-01-05T08:30:00+00:00"
    assert raw["processed"] == [
        ["r1", "finished", "f1", "2026-01-05T08:29:00+00:00"],
        ["r2", "crashed", "f2", None],
    ]
    assert raw["pending"] == [[7, "alice.t.seed1", "FAILED", "2026-01-05T08:25:00+00:00"]]
    assert raw["jobs"]["seen"][0][0] == 6
    assert sc.serialize_cursor(sc.parse_cursor(text)) == text  # deterministic


def test_empty_and_naive_cursors():
    assert sc.parse_cursor(None) == sc.SensorCursor() == sc.parse_cursor("")
    naive = sc.parse_cursor('{"heartbeat": "2026-01-05T08:00:00", "processed": []}')
    assert naive.heartbeat == T0


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"version": 99}',
        '{"heartbeat": 5}',
        '{"heartbeat": "yesterday"}',
        '{"processed": [["r1", "finished"]]}',
        '{"pending": [["x", "n", "S", "2026-01-05T08:00:00+00:00"]]}',
        '{"pending": [[1, "n", "S", null]]}',
    ],
)
def test_unreadable_cursors_raise(text: str):
    with pytest.raises(sc.CursorError):
        sc.parse_cursor(text)


# --- selection --------------------------------------------------------------------------------
def test_run_key_changes_with_state_and_data():
    crashed = view("r", "crashed", 10)
    finished = view("r", "finished", 20)
    assert sc.run_key(crashed) == "r:crashed:crashed@10"
    assert (
        len({sc.run_key(crashed), sc.run_key(finished), sc.run_key(view("r", "crashed", 30))}) == 3
    )
    assert sc.marker_for("size:mtime", at(1)) == "size:mtime"
    assert sc.marker_for("", at(1)) == at(1).isoformat()


def test_first_tick_selects_every_terminal_run():
    cursor = sc.SensorCursor()
    assert sc.listing_since(cursor) is None
    runs = [view("a", "finished", -600), view("b", "running", 0), view("c", "killed", 1)]
    assert [r.run_id for r in sc.select_runs(cursor, runs)] == ["a", "c"]
    assert {s for s in sc.TERMINAL_STATES} == {"finished", "failed", "crashed", "killed"}


def test_selection_skips_processed_and_out_of_window_runs():
    cursor = sc.SensorCursor(heartbeat=at(60), processed={("a", "finished", "finished@55"): at(55)})
    runs = [
        view("a", "finished", 55),  # processed
        view("a", "finished", 56),  # same state, new data: selected
        view("old", "finished", 49),  # listed by an over-eager source, before the window
        view("edge", "failed", 50),  # exactly at the window start
        view("b", "preempted", 59),  # not terminal
    ]
    assert sc.listing_since(cursor) == at(50)
    assert [r.entry for r in sc.select_runs(cursor, runs)] == [
        ("a", "finished", "finished@56"),
        ("edge", "failed", "failed@50"),
    ]
    # the same run listed twice (two copies of a folder) is selected once
    assert len(sc.select_runs(cursor, [view("x", "failed", 58)] * 2)) == 1


# --- watermark and pruning --------------------------------------------------------------------
def test_watermark_follows_the_newest_heartbeat_capped_at_now():
    cursor = sc.SensorCursor(heartbeat=at(10))
    step = sc.advance(cursor, seen=[view("a", "finished", 20)], handled=[], now=at(21))
    assert step.cursor.heartbeat == at(20)
    future = sc.advance(cursor, seen=[view("a", "finished", 99)], handled=[], now=at(21))
    assert future.cursor.heartbeat == at(21)
    idle = sc.advance(cursor, seen=[], handled=[], now=at(21))
    assert idle.cursor.heartbeat == at(10)
    back = sc.advance(cursor, seen=[view("a", "finished", 5)], handled=[], now=at(21))
    assert back.cursor.heartbeat == at(10)  # never moves back


def test_silent_running_run_holds_the_watermark_until_max_pin():
    cursor = sc.SensorCursor(heartbeat=at(100))
    seen = [view("alive", "running", 200), view("silent", "running", 150)]
    step = sc.advance(cursor, seen=seen, handled=[], now=at(200))
    assert step.cursor.heartbeat == at(160)  # silent run stays inside the window
    assert sc.listing_since(step.cursor) == at(150)
    # a run non-terminal for longer than max_pin behind the newest heartbeat lets go
    later = sc.advance(
        step.cursor, seen=seen, handled=[], now=at(400), max_pin=timedelta(minutes=30)
    )
    assert later.cursor.heartbeat == at(200)


def test_deferred_runs_stay_eligible():
    cursor = sc.SensorCursor(heartbeat=None)
    seen = [view("a", "finished", 0), view("b", "finished", 500)]
    step = sc.advance(cursor, seen=seen, handled=[seen[1]], deferred=[seen[0]], now=at(501))
    assert step.cursor.heartbeat == at(10)
    assert [r.run_id for r in sc.select_runs(step.cursor, seen)] == ["a"]


def test_processed_entries_are_pruned_once_out_of_the_window():
    cursor = sc.SensorCursor(heartbeat=at(0))
    handled = [
        view("old", "finished", 5),
        view("new", "finished", 95),
        view("nohb", "failed", None),
    ]
    step = sc.advance(cursor, seen=handled[:2], handled=handled, now=at(100))
    assert step.cursor.heartbeat == at(95)
    assert set(step.cursor.processed) == {handled[1].entry, handled[2].entry}
    # the pruned run, listed again by an over-eager source, is not selected again
    assert sc.select_runs(step.cursor, handled[:1]) == []


def test_late_data_runs_are_eligible_outside_the_window_once_per_marker():
    """A finished run whose export completes hours after its last heartbeat."""
    from dataclasses import replace

    cursor = sc.SensorCursor(heartbeat=at(600))
    late = replace(view("w", "finished", 10, marker="finished:10:export"), late_data=True)
    assert sc.select_runs(cursor, [view("w", "finished", 10)]) == []  # plain: out of window
    assert sc.select_runs(cursor, [late]) == [late]
    step = sc.advance(cursor, seen=[late], handled=[late], now=at(601))
    assert step.cursor.processed[late.entry] == at(601)  # kept, not pruned at once
    assert sc.select_runs(step.cursor, [late]) == []
    # it survives a serialisation round trip and further idle ticks
    again = sc.parse_cursor(sc.serialize_cursor(step.cursor))
    idle = sc.advance(again, seen=[late], handled=[], now=at(700))
    assert sc.select_runs(idle.cursor, [late]) == []


# --- SkyPilot waiting -------------------------------------------------------------------------
def test_ended_jobs_are_tracked_once_and_widen_the_listing():
    cursor = sc.SensorCursor(heartbeat=at(100))
    cursor, new = sc.add_ended_jobs(
        cursor, [job(1, "r1", 95), job(2, "r2", 50), job(1, "r1", 95)], now=at(100)
    )
    assert [j.job_id for j in new] == [1]  # 2 ended before the first look's horizon
    assert cursor.jobs_end_at == at(100)
    cursor, again = sc.add_ended_jobs(cursor, [job(1, "r1", 95), job(3, "r3", 99)], now=at(101))
    assert [j.job_id for j in again] == [3]
    assert sc.listing_since(cursor) == at(85)  # job 1 ended at 95, minus the overlap
    # the awaited run is eligible even outside the window (a late-synced WandB run)
    late = view("r1", "finished", 60)
    assert sc.select_runs(cursor, [late]) == [late]


def test_pending_job_resolves_when_its_run_is_processed_and_expires_otherwise():
    cursor = sc.SensorCursor(heartbeat=at(100))
    cursor, _ = sc.add_ended_jobs(cursor, [job(1, "r1", 98), job(2, "r2", 99)], now=at(100))
    running = view("r1", "running", 98)
    step = sc.advance(cursor, seen=[running], handled=[], now=at(101))
    assert set(step.cursor.pending) == {1, 2} and not step.resolved
    done = view("r1", "crashed", 98)
    step = sc.advance(step.cursor, seen=[done], handled=[done], now=at(115))
    assert [j.job_id for j in step.resolved] == [1] and set(step.cursor.pending) == {2}
    step = sc.advance(step.cursor, seen=[], handled=[], now=at(100 + 25 * 60))
    assert [j.job_id for j in step.expired] == [2] and not step.cursor.pending
    assert step.cursor.jobs_seen  # still remembered: never tracked again
    _, new = sc.add_ended_jobs(step.cursor, [job(2, "r2", 99)], now=at(100 + 25 * 60))
    assert new == []


# --- many ticks against a simulated source ----------------------------------------------------
@dataclass
class SimRun:
    """A run's (state, heartbeat) as a function of time, and when it becomes visible."""

    run_id: str
    timeline: Callable[[float], tuple[str, float] | None]


def _sim_runs() -> list[SimRun]:
    def r1(t: float) -> tuple[str, float]:  # runs, finishes at 30
        return ("running", t) if t < 30 else ("finished", 30)

    def r2(t: float) -> tuple[str, float]:
        # silent from 20, marked crashed only at 35 (longer than the overlap), resumes at
        # 50 and finishes at 70
        if t < 20:
            return ("running", t)
        if t < 35:
            return ("running", 20)
        if t < 50:
            return ("crashed", 20)
        return ("running", t) if t < 70 else ("finished", 70)

    def r3(t: float) -> tuple[str, float] | None:  # appears at 40, already finished
        return None if t < 40 else ("finished", 38)

    def steady(t: float) -> tuple[str, float]:  # keeps the watermark moving
        return ("running", t)

    def r5(t: float) -> tuple[str, float]:
        return ("running", t) if t < 60 else ("killed", 60)

    def late(t: float) -> tuple[str, float] | None:
        # SkyPilot says its job ended at 90; the run source shows it only at 110
        return None if t < 110 else ("failed", 89)

    return [
        SimRun("r1", r1),
        SimRun("r2", r2),
        SimRun("r3", r3),
        SimRun("steady", steady),
        SimRun("r5", r5),
        SimRun("late", late),
    ]


@pytest.mark.parametrize("offline_like", [False, True])
def test_ticks_request_every_terminal_state_exactly_once(offline_like: bool):
    runs = _sim_runs()
    requested: list[str] = []
    text: str | None = None
    for minute in range(0, 140):
        now = at(minute + 0.5)
        cursor = sc.parse_cursor(text)  # every tick restarts from the stored text
        if minute >= 90:
            cursor, _ = sc.add_ended_jobs(cursor, [job(9, "late", 90, "FAILED")], now=now)
        since = sc.listing_since(cursor)
        listed = []
        for run in runs:
            state = run.timeline(minute)
            if state is None:
                continue
            v = view(run.run_id, state[0], state[1])
            # WandB filters on the heartbeat; an offline source on file mtime, which can
            # be later than the last heartbeat: it lists extra runs
            cutoff = v.heartbeat + (5 * MIN if offline_like else timedelta(0))
            if since is None or cutoff >= since:
                listed.append(v)
        selected = sc.select_runs(cursor, listed)
        requested += [sc.run_key(v) for v in selected]
        step = sc.advance(cursor, seen=listed, handled=selected, now=now)
        text = sc.serialize_cursor(step.cursor)
    assert sorted(requested) == sorted(set(requested))  # no duplicates
    assert set(requested) == {
        "r1:finished:finished@30",
        "r2:crashed:crashed@20",
        "r2:finished:finished@70",
        "r3:finished:finished@38",
        "r5:killed:killed@60",
        "late:failed:failed@89",
    }
    final = sc.parse_cursor(text)
    assert not final.pending
    # old entries were pruned: only runs with a heartbeat inside the last window remain
    assert all(
        hb is not None and hb >= final.heartbeat - sc.DEFAULT_OVERLAP
        for hb in final.processed.values()
    )


# --- retries of requests that did not complete ------------------------------------------------
def _req(key: str, attempts: int = 1, at_min: float = 0) -> sc.Requested:
    return sc.Requested(key, f"{key}-run:finished:f", "finished", attempts, at(at_min))


def test_requested_round_trips_and_old_cursors_track_none():
    cursor = sc.record_requests(sc.SensorCursor(), [_req("a.seed1", 2, 5), _req("b.seed1")])
    text = sc.serialize_cursor(cursor)
    assert sc.parse_cursor(text) == cursor
    assert json.loads(text)["requested"][0] == [
        "a.seed1",
        "a.seed1-run:finished:f",
        "finished",
        2,
        "2026-01-05T08:05:00+00:00",
    ]
    assert sc.parse_cursor('{"heartbeat": null}').requested == {}
    with pytest.raises(sc.CursorError):
        sc.parse_cursor('{"requested": [["a", "k", "finished", 1]]}')


def test_retry_run_keys_are_new_for_each_attempt():
    keys = [_req("k", n).current_run_key for n in (1, 2, 3)]
    assert keys == ["k-run:finished:f", "k-run:finished:f:retry1", "k-run:finished:f:retry2"]


def test_plan_retries_by_outcome_with_a_bound():
    reqs = {
        "ok": _req("ok"),
        "busy": _req("busy"),
        "failed": _req("failed"),
        "canceled": _req("canceled", 2),
        "last": _req("last", 3),
        "fresh": _req("fresh", 1, at_min=50),  # no run yet, requested 10 min ago
        "lost": _req("lost", 1, at_min=0),  # no run after an hour: never launched
    }
    cursor = sc.SensorCursor(requested=reqs)
    outcomes = {
        "ok": sc.OUTCOME_SUCCEEDED,
        "busy": sc.OUTCOME_IN_PROGRESS,
        "failed": sc.OUTCOME_FAILED,
        "canceled": sc.OUTCOME_CANCELED,
        "last": sc.OUTCOME_FAILED,
    }
    plan = sc.plan_retries(
        cursor, outcomes, at(60), max_attempts=3, launch_timeout=timedelta(minutes=30)
    )
    assert {(r.partition_key, r.attempts, o) for r, o in plan.retry} == {
        ("failed", 2, sc.OUTCOME_FAILED),
        ("canceled", 3, sc.OUTCOME_CANCELED),
        ("lost", 2, sc.OUTCOME_NO_RUN),
    }
    assert all(r.requested_at == at(60) for r, _ in plan.retry)
    assert [r.partition_key for r in plan.succeeded] == ["ok"]
    assert [(r.partition_key, o) for r, o in plan.given_up] == [("last", sc.OUTCOME_FAILED)]
    assert sorted(plan.cursor.requested) == ["busy", "fresh"]
    # retried requests are tracked again with their count; a bound of 1 means no retry
    again = sc.record_requests(plan.cursor, [r for r, _ in plan.retry])
    assert again.requested["canceled"].attempts == 3
    once = sc.plan_retries(cursor, outcomes, at(60), max_attempts=1)
    assert once.retry == [] and len(once.given_up) == 4


def test_a_late_arrival_is_selected_whatever_its_clock():
    """A run the source lists as arrived late (`late_data`) is eligible although its
    heartbeat is hours behind the watermark; without the flag it is not (a source may
    list old runs too)."""
    cursor = sc.SensorCursor(heartbeat=at(600))
    old = view("late", "finished", 0)
    assert sc.select_runs(cursor, [old]) == []
    late = sc.RunView("late", "late", "finished", "m", at(0), late_data=True)
    assert sc.select_runs(cursor, [late]) == [late]
    step = sc.advance(cursor, seen=[late], handled=[late], now=at(600))
    assert sc.select_runs(step.cursor, [late]) == []  # processed: not twice
