"""`finished_runs_sensor`: refresh a run's partition when the run reaches a terminal state.

Each tick:
1. (optional) asks SkyPilot which managed jobs ended; their runs are awaited in the cursor
   until the run source shows them terminal (WandB can lag behind SkyPilot);
2. lists the runs updated since the cursor's watermark minus an overlap
   (`RunSource.list_runs(updated_since=...)`: cheap, and all an idle tick does);
3. if some run reached a terminal state not handled yet: lists *every* run, classifies
   them with `discovery.classify_runs` and writes `discovered_runs.parquet` itself, then
   registers new partitions and requests `reward_streams`, `series_metrics` and `lp_replay` for each such
   run's partition, with `run_key = run_id:state:fingerprint`;
4. requests again, with a bound, what an earlier tick requested but did not complete: the
   partition's latest Dagster run since the request failed or was canceled, or no run
   started within `launch_timeout` (attempt n of `max_attempts`, tag `rts/attempt`, a log
   line per retry and a warning when it gives up);
5. stores the new cursor (`rts_dagster.sensor_cursor`).

A finished run that arrives late (an offline run copied in hours after it finished, its
mtime kept) is taken on the first tick that sees it: the source lists what arrived since
the watermark and flags a run older than it as `late_data`; eligibility is "not processed
yet", not the age of the run's own clock.

Why the sensor writes `discovered_runs` itself (the same function as the asset:
`source.list_runs()` -> `runs.write_discovered`), and reports it as a
runless materialization of `discovered_runs`:
- `reward_streams` finds its run in that table, so it must be current before the
  requested run executes; written during the tick, it is (every write is atomic).
- The partition key depends on every run: the earliest run claiming a (task, seed) keeps
  the plain key, later ones get `<key>.<run id>`. Keys computed from the polled subset
  could differ from the asset's. One classification of the full list gives the keys we
  register, the keys we request and the table the runs read: they cannot disagree.
- Requesting `discovered_runs` in the same run as a partition works in Dagster 1.13
  (a run may mix an unpartitioned asset with one partition; checked), but it re-lists and
  re-classifies once per requested partition, and at execution time, so the table could
  assign other keys than the ones the sensor requested. A separate `discovered_runs` run
  would race the partition runs (runs of one tick are not ordered).
The full listing happens only on ticks where some run newly reached a terminal state
(an idle tick only polls). Nothing eager reacts to
`discovered_runs` (`reward_streams` has no automation condition), so the runless
materialization only records when and by whom the table was written.

A run whose partition already holds its data (metadata.json with the same run id,
fingerprint and STREAMS_VERSION, and the series metrics) is marked handled without a
request: a first tick after `rts refresh` requests nothing. The aggregates follow by
eager automation (`rts_automation_sensor`).
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from rts_dagster import sensor_cursor as sc
from rts_dagster.defs.analysis import series_metrics
from rts_dagster.defs.lp import lp_replay
from rts_dagster.defs.partitions import runs_partitions
from rts_dagster.defs.resources import RtsStorage, RunSourceResource
from rts_dagster.defs.runs import (
    discovered_runs_event,
    discovery_metadata,
    partition_is_current,
    reward_streams,
    write_discovered,
)
from rts_dagster.schema import RUN_STATUS_MATCHED
from rts_dagster.sources.base import RunRecord
from rts_dagster.sources.skypilot import SkyJob, SkyPilotJobs

SENSOR_NAME = "finished_runs_sensor"
# What one finished run refreshes (the aggregates follow by eager automation).
PER_RUN_ASSETS = [reward_streams, series_metrics, lp_replay]
TRIGGER_TAG = "rts/trigger"
# SkyPilot statuses whose job never reached the training command: no run to wait for.
NEVER_RAN_STATUSES = frozenset({"FAILED_PRECHECKS", "FAILED_NO_RESOURCE", "FAILED_SETUP"})


@dataclass(frozen=True)
class SensorSettings:
    """Windows and limits of the sensor (defaults suit WandB and offline sources)."""

    overlap: timedelta = sc.DEFAULT_OVERLAP
    max_pin: timedelta = sc.DEFAULT_MAX_PIN
    pending_timeout: timedelta = sc.DEFAULT_PENDING_TIMEOUT
    # A first tick over a big project would otherwise request hundreds of runs at once;
    # the rest stay eligible (they hold the watermark) and follow on the next ticks.
    max_requests_per_tick: int = 100
    # Requests of one partition in all (first + retries) when its run does not complete.
    max_attempts: int = sc.DEFAULT_MAX_ATTEMPTS
    # A request with no Dagster run after this long was never launched: request again.
    launch_timeout: timedelta = sc.DEFAULT_LAUNCH_TIMEOUT


def _view(run: RunRecord, late: bool = False) -> sc.RunView:
    heartbeat = run.heartbeat_at or run.created_at
    return sc.RunView(
        run_id=run.run_id,
        run_name=run.run_name,
        state=run.state,
        marker=sc.marker_for(run.fingerprint, heartbeat),
        heartbeat=heartbeat,
        late_data=late or bool(run.extra.get("late_data")),
    )


def _ended_job(job: SkyJob, now: datetime) -> sc.EndedJob | None:
    """The job as something to wait for, or None if no run is expected from it."""
    if not job.terminal or job.run_name is None or job.status in NEVER_RAN_STATUSES:
        return None
    if job.status == "CANCELLED" and job.start_at is None:
        return None  # cancelled while still queued
    return sc.EndedJob(job.job_id, job.run_name, job.status, job.end_at or now)


def _in_flight_partitions(instance: dg.DagsterInstance) -> frozenset[str]:
    """`runs` partitions with a run queued, starting or executing."""
    active = [
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED,
    ]
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=active), limit=1000)
    return frozenset(key for run in runs if (key := run.tags.get("dagster/partition")) is not None)


_OUTCOME_OF_STATUS = {
    dg.DagsterRunStatus.SUCCESS: sc.OUTCOME_SUCCEEDED,
    dg.DagsterRunStatus.FAILURE: sc.OUTCOME_FAILED,
    dg.DagsterRunStatus.CANCELED: sc.OUTCOME_CANCELED,
}


def _request_outcomes(
    instance: dg.DagsterInstance, requested: dict[str, sc.Requested]
) -> dict[str, str]:
    """What became of each tracked request: the status of the partition's latest Dagster
    run created since the request (any run of the partition counts, e.g. one started by
    hand); no entry when there is none."""
    outcomes = {}
    for key, req in requested.items():
        runs = instance.get_runs(
            filters=dg.RunsFilter(tags={"dagster/partition": key}, created_after=req.requested_at),
            limit=1,
        )
        if runs:
            outcomes[key] = _OUTCOME_OF_STATUS.get(runs[0].status, sc.OUTCOME_IN_PROGRESS)
    return outcomes


def _request(partition_key: str, run_key: str, state: str, attempt: int) -> dg.RunRequest:
    tags = {TRIGGER_TAG: SENSOR_NAME, "rts/run_state": state}
    if attempt > 1:
        tags["rts/attempt"] = str(attempt)
    return dg.RunRequest(
        run_key=run_key,
        partition_key=partition_key,
        asset_selection=[a.key for a in PER_RUN_ASSETS],
        tags=tags,
    )


def _retry_requests(
    log: Any,
    cursor: sc.SensorCursor,
    instance: dg.DagsterInstance,
    now: datetime,
    settings: SensorSettings,
) -> tuple[sc.SensorCursor, list[sc.Requested]]:
    """The cursor without the settled requests, and the requests to make again."""
    if not cursor.requested:
        return cursor, []
    plan = sc.plan_retries(
        cursor,
        _request_outcomes(instance, cursor.requested),
        now,
        max_attempts=settings.max_attempts,
        launch_timeout=settings.launch_timeout,
    )
    for req, outcome in plan.given_up:
        log.warning(
            f"partition {req.partition_key}: the requested run {outcome} after "
            f"{req.attempts} attempts: given up (rerun it by hand, e.g. `rts refresh`)"
        )
    for req, outcome in plan.retry:
        what = f"the run {outcome}" if outcome != sc.OUTCOME_NO_RUN else "no run started"
        log.warning(
            f"partition {req.partition_key}: the previous request did not complete ({what}): "
            f"requesting it again (attempt {req.attempts} of {settings.max_attempts})"
        )
    return plan.cursor, [req for req, _ in plan.retry]


def _plan_requests(
    log: Any,
    fresh: list[sc.RunView],
    record_of: dict[sc.Entry, RunRecord],
    table: pl.DataFrame,
    root: Path,
    max_requests: int,
    in_flight: frozenset[str] = frozenset(),
) -> tuple[list[dg.RunRequest], list[sc.RunView], list[sc.RunView]]:
    """(requests, handled, deferred) for the newly terminal runs `fresh`, given the
    discovered_runs `table` classified in the same tick."""
    rows = {row["location"]: row for row in table.iter_rows(named=True)}
    requests: list[dg.RunRequest] = []
    handled: list[sc.RunView] = []
    deferred: list[sc.RunView] = []
    requested_keys: set[str] = set()
    for view in fresh:
        row = rows.get(record_of[view.entry].location)
        if row is None or row["status"] != RUN_STATUS_MATCHED:
            reason = row["reason"] if row is not None else "not in discovered_runs"
            log.info(f"run {view.run_name!r} is {view.state} but not analysed: {reason}")
            handled.append(view)
            continue
        key = row["partition_key"]
        if key in requested_keys:  # two listings of one run (copied folder): one request
            handled.append(view)
            continue
        if partition_is_current(root, row):
            log.info(f"run {view.run_name!r} ({view.state}): partition {key} is up to date")
            handled.append(view)
            continue
        if key in in_flight:
            # A run of this partition is queued or running: it may be the one that makes
            # the partition current (a first read turns an `unread` WandB marker into
            # `export` or `live`). Decide once it has finished.
            log.info(f"run {view.run_name!r}: partition {key} has a run in progress: later")
            deferred.append(view)
            continue
        if len(requests) >= max_requests:
            deferred.append(view)
            continue
        requests.append(_request(key, sc.run_key(view), view.state, 1))
        requested_keys.add(key)
        handled.append(view)
        log.info(f"run {view.run_name!r} is {view.state}: requesting partition {key}")
    if deferred:
        log.info(f"{len(deferred)} newly terminal runs left for the next ticks (request cap)")
    return requests, handled, deferred


def finished_runs_tick(
    context: dg.SensorEvaluationContext,
    run_source: RunSourceResource,
    rts_storage: RtsStorage,
    skypilot: SkyPilotJobs | None,
    settings: SensorSettings,
) -> dg.SensorResult:
    """One evaluation of the sensor (see the module docstring)."""
    log = context.log
    now = datetime.now(UTC)
    try:
        cursor = sc.parse_cursor(context.cursor)
    except sc.CursorError as exc:
        # Starting over re-lists everything; partitions already current are not requested.
        log.warning(f"unreadable cursor ({exc}): starting over from a full listing")
        cursor = sc.SensorCursor()

    jobs = skypilot.jobs(log) if skypilot is not None else None
    if jobs is not None:
        ended = [e for e in (_ended_job(j, now) for j in jobs) if e is not None]
        cursor, new_jobs = sc.add_ended_jobs(cursor, ended, now, settings.overlap)
        for job in new_jobs:
            log.info(f"SkyPilot job {job.job_id} ({job.run_name!r}) ended {job.status}")

    cursor, retries = _retry_requests(log, cursor, context.instance, now, settings)

    since = sc.listing_since(cursor, settings.overlap)
    source = run_source.source()
    listed, unreadable = source.list_runs(updated_since=since)
    seen = [_view(r) for r in listed]
    candidates = sc.select_runs(cursor, seen, settings.overlap)

    requests: list[dg.RunRequest] = []
    handled: list[sc.RunView] = []
    deferred: list[sc.RunView] = []
    events: list[dg.AssetMaterialization] = []
    new_keys: list[str] = []
    if candidates:
        # Keys depend on every run (duplicate task/seed): classify the full list.
        runs, unreadable = (listed, unreadable) if since is None else source.list_runs()
        root = rts_storage.root()
        known = set(context.instance.get_dynamic_partitions(runs_partitions.name))
        table, path, new_keys = write_discovered(runs, unreadable, run_source.rules(), root, known)
        events.append(
            discovered_runs_event(
                discovery_metadata(table, path, new_keys),
                SENSOR_NAME,
                f"Written by {SENSOR_NAME} before requesting finished runs.",
            )
        )

        # Decide on the fresh records of the candidates (a state may have moved on).
        ids = {c.run_id for c in candidates}
        # The full listing does not flag late data; keep what the incremental one said.
        late_ids = {r.run_id for r in listed if r.extra.get("late_data")}
        seen = [_view(r, late=r.run_id in late_ids) for r in runs]
        fresh = sc.select_runs(cursor, [v for v in seen if v.run_id in ids], settings.overlap)
        requests, handled, deferred = _plan_requests(
            log,
            fresh,
            dict(zip((v.entry for v in seen), runs, strict=True)),
            table,
            root,
            settings.max_requests_per_tick,
            _in_flight_partitions(context.instance),
        )

    # A fresh request of a partition supersedes its retry (and starts its count over).
    fresh_keys = {r.partition_key for r in requests}
    retries = [r for r in retries if r.partition_key not in fresh_keys]
    requests += [_request(r.partition_key, r.current_run_key, r.state, r.attempts) for r in retries]
    tracked = [
        sc.Requested(r.partition_key or "", r.run_key or "", r.tags["rts/run_state"], 1, now)
        for r in requests
        if r.partition_key in fresh_keys
    ]
    cursor = sc.record_requests(cursor, [*tracked, *retries])

    step = sc.advance(
        cursor,
        seen=seen,
        handled=handled,
        deferred=deferred,
        now=now,
        overlap=settings.overlap,
        max_pin=settings.max_pin,
        pending_timeout=settings.pending_timeout,
    )
    for job in step.expired:
        log.warning(
            f"SkyPilot job {job.job_id} ended {job.status} at {job.end_at:%Y-%m-%d %H:%M} UTC "
            f"but run {job.run_name!r} never showed up terminal in the run source: given up"
        )
    waiting = sorted(j.run_name for j in step.cursor.pending.values())
    if waiting:
        log.info(f"waiting for the run source to show {len(waiting)} ended jobs: {waiting[:10]}")

    skip = None
    if not requests:
        window = f" since {since:%Y-%m-%d %H:%M:%S} UTC" if since is not None else ""
        skip = (
            f"no run to refresh: {len(listed)} runs listed{window}, {len(handled)} newly terminal"
        )
    return dg.SensorResult(
        run_requests=requests,
        skip_reason=skip,
        cursor=sc.serialize_cursor(step.cursor),
        dynamic_partitions_requests=(
            [runs_partitions.build_add_request(new_keys)] if new_keys else None
        ),
        asset_events=events,
    )


def build_finished_runs_sensor(
    *,
    name: str = SENSOR_NAME,
    skypilot: SkyPilotJobs | None = None,
    settings: SensorSettings | None = None,
    minimum_interval_seconds: int = 60,
) -> dg.SensorDefinition:
    """The sensor; `skypilot` defaults to the real (lazily imported, optional) SkyPilot
    queue; tests pass `SkyPilotJobs(queue=fake)`."""
    jobs = skypilot if skypilot is not None else SkyPilotJobs()
    config = settings or SensorSettings()

    @dg.sensor(
        name=name,
        target=PER_RUN_ASSETS,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Registers and requests the partition of every run that reached a "
        "terminal state (finished, failed, crashed, killed) since the last tick; writes "
        "discovered_runs first. Optional SkyPilot job tracking.",
    )
    def _sensor(
        context: dg.SensorEvaluationContext, run_source: RunSourceResource, rts_storage: RtsStorage
    ) -> dg.SensorResult:
        return finished_runs_tick(context, run_source, rts_storage, jobs, config)

    return _sensor


finished_runs_sensor = build_finished_runs_sensor()
