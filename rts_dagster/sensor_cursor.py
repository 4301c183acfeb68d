"""The cursor of `finished_runs_sensor`: pure bookkeeping, no Dagster, no I/O.

The cursor is the sensor's only state, so it must be enough to never request a run twice
for the same (state, data) and to never miss one, across restarts. It holds:

- `heartbeat`: the watermark. Each tick lists the runs whose heartbeat is at or after
  `heartbeat - overlap` (the overlap absorbs clock skew and late writes). It advances to the
  newest heartbeat seen, but never past `h + overlap` for a run seen in a non-terminal
  state with heartbeat `h` (unless that run looks abandoned, `max_pin`): a run's state
  can turn terminal long after its last heartbeat (WandB marks a run `crashed` minutes
  after heartbeats stop; an offline file turns `crashed` after a quiet grace period), and
  the run must still be in the listing window when that happens.
- `processed`: `[run_id, state, marker, heartbeat]` of every run handled inside the window
  (requested, or deliberately skipped). The marker is the source's fingerprint (which
  changes whenever the run's data may have changed), else the heartbeat. A run that goes
  crashed -> running -> finished gets new entries; the same (state, marker) never gets a
  second request. Entries whose heartbeat fell out of the window are pruned: such a run
  is never eligible again through the window, unless the source re-lists it as
  `late_data` (its data changed after its last heartbeat; kept from the tick it was
  handled).
- `pending` / `jobs`: SkyPilot jobs that reached a terminal status, waiting until the run
  source shows their run terminal (WandB can lag). A pending job widens the listing back
  to its end time and makes its run eligible even outside the window; it is dropped once
  its run is processed, or after `pending_timeout`. `jobs` remembers which ended jobs
  were already taken (with a watermark of their end times) so a job is tracked once.
- `requested`: per partition, the sensor's last request and how many times it was made.
  A request whose Dagster run failed, was canceled, or never started within
  `launch_timeout` is made again (new run_key `<run_key>:retry<n>`) up to `max_attempts`
  times in all, then given up with a warning; it is dropped once a run of the partition
  created after the request succeeded. A new request for the partition starts over.

Eligibility does not depend on how old a run's own clock is when the source says the run
is new to it (`late_data`, e.g. a finished offline run copied in hours later): what
matters is whether the sensor has processed the run's (state, marker) yet.

JSON form (timestamps ISO 8601 with offset):
`{"version": 1, "heartbeat": ..., "processed": [[run_id, state, marker, heartbeat], ...],
"pending": [[job_id, run_name, status, end_at], ...], "jobs": {"end_at": ..., "seen":
[[job_id, end_at], ...]}, "requested": [[partition_key, run_key, state, attempts,
requested_at], ...]}` (a cursor without `requested` reads as tracking none).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

# WandB run states after which a run's data is final (crashed may still turn into running).
TERMINAL_STATES = frozenset({"finished", "failed", "crashed", "killed"})

CURSOR_VERSION = 1
DEFAULT_OVERLAP = timedelta(minutes=10)
# A run non-terminal for longer than this behind the newest heartbeat no longer holds the
# watermark back (e.g. a WandB run left `preempted` forever).
DEFAULT_MAX_PIN = timedelta(days=1)
# How long a SkyPilot job that ended waits for its run to show up terminal in the source.
DEFAULT_PENDING_TIMEOUT = timedelta(hours=24)
# Requests of one partition in all (the first + retries) before the sensor gives up.
DEFAULT_MAX_ATTEMPTS = 3
# A request with no Dagster run this long after it was made was never launched.
DEFAULT_LAUNCH_TIMEOUT = timedelta(minutes=30)

# What became of the latest Dagster run of a requested partition (see `plan_retries`).
OUTCOME_SUCCEEDED = "succeeded"
OUTCOME_IN_PROGRESS = "in progress"
OUTCOME_FAILED = "failed"
OUTCOME_CANCELED = "canceled"
OUTCOME_NO_RUN = "no run"

Entry = tuple[str, str, str]  # (run_id, state, marker)


class CursorError(ValueError):
    """The stored cursor text cannot be read."""


@dataclass(frozen=True)
class RunView:
    """What the cursor logic needs to know about one listed run."""

    run_id: str
    run_name: str
    state: str
    marker: str  # fingerprint, else the heartbeat in ISO form
    heartbeat: datetime | None
    # The source re-listed the run because its data changed after its last heartbeat
    # (a WandB export completing): eligible although older than the window.
    late_data: bool = False

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def entry(self) -> Entry:
        return (self.run_id, self.state, self.marker)


@dataclass(frozen=True)
class EndedJob:
    """A SkyPilot job in a terminal status whose run we expect in the run source."""

    job_id: int
    run_name: str
    status: str
    end_at: datetime


@dataclass(frozen=True)
class Requested:
    """The sensor's latest request of one partition (made `attempts` times so far)."""

    partition_key: str
    run_key: str  # of the first request; retries append `:retry<n>`
    state: str
    attempts: int
    requested_at: datetime

    @property
    def current_run_key(self) -> str:
        """The run_key of the latest attempt (Dagster skips a run_key it has seen)."""
        return self.run_key if self.attempts <= 1 else f"{self.run_key}:retry{self.attempts - 1}"


@dataclass(frozen=True)
class SensorCursor:
    heartbeat: datetime | None = None
    processed: dict[Entry, datetime | None] = field(default_factory=dict)
    pending: dict[int, EndedJob] = field(default_factory=dict)
    jobs_end_at: datetime | None = None
    jobs_seen: dict[int, datetime] = field(default_factory=dict)
    requested: dict[str, Requested] = field(default_factory=dict)


def run_key(run: RunView) -> str:
    """The Dagster run_key of the request for `run` in its current state and data."""
    return f"{run.run_id}:{run.state}:{run.marker}"


def marker_for(fingerprint: str | None, heartbeat: datetime | None) -> str:
    """The source fingerprint when there is one, else the heartbeat (ISO), else ""."""
    if fingerprint:
        return fingerprint
    return heartbeat.isoformat() if heartbeat is not None else ""


# --- (de)serialisation ----------------------------------------------------------------------
def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _time(value: Any, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise CursorError(f"cursor {what}: expected an ISO timestamp, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise CursorError(f"cursor {what}: {exc}") from exc
    # A timestamp without offset is taken as UTC (we always write UTC).
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _required_time(value: Any, what: str) -> datetime:
    parsed = _time(value, what)
    if parsed is None:
        raise CursorError(f"cursor {what}: missing timestamp")
    return parsed


def parse_cursor(text: str | None) -> SensorCursor:
    """The cursor stored as `text`; an empty cursor for None/"" (first tick).
    Raises `CursorError` on anything it cannot read."""
    if not text:
        return SensorCursor()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CursorError(f"cursor is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CursorError("cursor is not a JSON object")
    if raw.get("version", CURSOR_VERSION) != CURSOR_VERSION:
        raise CursorError(f"cursor version {raw.get('version')!r} is not {CURSOR_VERSION}")
    try:
        processed = {
            (str(run_id), str(state), str(marker)): _time(hb, "processed heartbeat")
            for run_id, state, marker, hb in raw.get("processed", [])
        }
        pending = {}
        for job_id, run_name, status, end_at in raw.get("pending", []):
            job = EndedJob(int(job_id), str(run_name), str(status), _required_time(end_at, "end"))
            pending[job.job_id] = job
        jobs = raw.get("jobs") or {}
        seen = {int(j): _required_time(end, "job end") for j, end in jobs.get("seen", [])}
        requested = {}
        for key, key_of_run, state, attempts, at in raw.get("requested", []):
            req = Requested(
                str(key), str(key_of_run), str(state), int(attempts), _required_time(at, "request")
            )
            requested[req.partition_key] = req
    except (TypeError, ValueError) as exc:  # wrong arity or types
        if isinstance(exc, CursorError):
            raise
        raise CursorError(f"cursor has a malformed entry: {exc}") from exc
    return SensorCursor(
        heartbeat=_time(raw.get("heartbeat"), "heartbeat"),
        processed=processed,
        pending=pending,
        jobs_end_at=_time(jobs.get("end_at"), "jobs end_at"),
        jobs_seen=seen,
        requested=requested,
    )


def serialize_cursor(cursor: SensorCursor) -> str:
    """Compact, deterministic JSON (sorted entries) of `cursor`."""
    return json.dumps(
        {
            "version": CURSOR_VERSION,
            "heartbeat": _iso(cursor.heartbeat),
            "processed": sorted([*entry, _iso(hb)] for entry, hb in cursor.processed.items()),
            "pending": [
                [j.job_id, j.run_name, j.status, _iso(j.end_at)]
                for j in sorted(cursor.pending.values(), key=lambda j: j.job_id)
            ],
            "jobs": {
                "end_at": _iso(cursor.jobs_end_at),
                "seen": [[j, _iso(end)] for j, end in sorted(cursor.jobs_seen.items())],
            },
            "requested": [
                [r.partition_key, r.run_key, r.state, r.attempts, _iso(r.requested_at)]
                for _, r in sorted(cursor.requested.items())
            ],
        },
        separators=(",", ":"),
    )


# --- one tick ---------------------------------------------------------------------------------
def listing_since(cursor: SensorCursor, overlap: timedelta = DEFAULT_OVERLAP) -> datetime | None:
    """`updated_since` for this tick's listing: None on the first tick (list everything),
    else the window start, moved back to cover every pending SkyPilot job's end."""
    if cursor.heartbeat is None:
        return None
    since = cursor.heartbeat - overlap
    for job in cursor.pending.values():
        since = min(since, job.end_at - overlap)
    return since


def _awaited(cursor: SensorCursor) -> set[str]:
    return {job.run_name for job in cursor.pending.values()}


def select_runs(
    cursor: SensorCursor, runs: Iterable[RunView], overlap: timedelta = DEFAULT_OVERLAP
) -> list[RunView]:
    """Runs to handle now: terminal, not processed in this (state, marker), and inside the
    window (a source may list older runs too) or awaited by a pending SkyPilot job."""
    window = None if cursor.heartbeat is None else cursor.heartbeat - overlap
    awaited = _awaited(cursor)
    selected: dict[Entry, RunView] = {}
    for run in runs:
        if not run.terminal or run.entry in cursor.processed or run.entry in selected:
            continue
        in_window = window is None or run.heartbeat is None or run.heartbeat >= window
        if in_window or run.late_data or run.run_name in awaited or run.run_id in awaited:
            selected[run.entry] = run
    return list(selected.values())


def add_ended_jobs(
    cursor: SensorCursor,
    jobs: Iterable[EndedJob],
    now: datetime,
    overlap: timedelta = DEFAULT_OVERLAP,
) -> tuple[SensorCursor, list[EndedJob]]:
    """Start waiting for the runs of SkyPilot jobs that ended since the jobs watermark
    (on the first look: in the last `overlap`). Returns the cursor and the new jobs."""
    horizon = (cursor.jobs_end_at or now) - overlap
    jobs = list(jobs)
    new = [j for j in jobs if j.end_at >= horizon and j.job_id not in cursor.jobs_seen]
    new = list({j.job_id: j for j in new}.values())
    ends = [j.end_at for j in jobs if j.end_at <= now]  # a future end is clock skew
    end_at = max([*ends, cursor.jobs_end_at or now])
    return (
        replace(
            cursor,
            pending={**cursor.pending, **{j.job_id: j for j in new}},
            jobs_seen={**cursor.jobs_seen, **{j.job_id: j.end_at for j in new}},
            jobs_end_at=end_at,
        ),
        new,
    )


@dataclass(frozen=True)
class Advance:
    cursor: SensorCursor
    resolved: list[EndedJob]  # pending jobs whose run is now processed
    expired: list[EndedJob]  # pending jobs given up after the timeout


def advance(
    cursor: SensorCursor,
    *,
    seen: Sequence[RunView],
    handled: Iterable[RunView],
    now: datetime,
    deferred: Iterable[RunView] = (),
    overlap: timedelta = DEFAULT_OVERLAP,
    max_pin: timedelta = DEFAULT_MAX_PIN,
    pending_timeout: timedelta = DEFAULT_PENDING_TIMEOUT,
) -> Advance:
    """The cursor after a tick that listed `seen` and handled `handled` (requested or
    skipped for good). `deferred` runs were selected but left for a later tick (request
    cap): they hold the watermark back like non-terminal runs so they stay eligible."""
    processed = dict(cursor.processed)
    for run in handled:
        # A late-data run is kept as if seen now: its old heartbeat would prune it at once
        # while the source still re-lists it.
        processed[run.entry] = now if run.late_data else run.heartbeat

    heartbeat = cursor.heartbeat
    beats = [r.heartbeat for r in seen if r.heartbeat is not None]
    if beats:
        newest = min(max(beats), now)  # a heartbeat in the future is clock skew
        # Only runs inside the window pin it (a source may list older ones too).
        oldest = newest - max_pin
        if heartbeat is not None:
            oldest = max(oldest, heartbeat - overlap)
        limits = [newest]
        limits += [
            r.heartbeat + overlap
            for r in seen
            if not r.terminal and r.heartbeat is not None and r.heartbeat >= oldest
        ]
        limits += [r.heartbeat + overlap for r in deferred if r.heartbeat is not None]
        target = min(limits)
        heartbeat = target if heartbeat is None else max(heartbeat, target)

    # A pending job is done once a run of its name is processed in a terminal state
    # (checked before pruning: an awaited run may be older than the window).
    done_names: set[str] = set()
    for run in seen:
        if run.terminal and run.entry in processed:
            done_names.update((run.run_name, run.run_id))

    if heartbeat is not None:
        window = heartbeat - overlap
        processed = {e: hb for e, hb in processed.items() if hb is None or hb >= window}
    pending, resolved, expired = {}, [], []
    for job_id, job in cursor.pending.items():
        if job.run_name in done_names:
            resolved.append(job)
        elif now - job.end_at > pending_timeout:
            expired.append(job)
        else:
            pending[job_id] = job

    jobs_seen = dict(cursor.jobs_seen)
    if cursor.jobs_end_at is not None:
        horizon = cursor.jobs_end_at - overlap
        jobs_seen = {j: end for j, end in jobs_seen.items() if end >= horizon or j in pending}

    return Advance(
        cursor=replace(
            cursor,
            heartbeat=heartbeat,
            processed=processed,
            pending=pending,
            jobs_seen=jobs_seen,
        ),
        resolved=resolved,
        expired=expired,
    )


# --- requests that did not complete ------------------------------------------------------------
def record_requests(cursor: SensorCursor, requests: Iterable[Requested]) -> SensorCursor:
    """Track `requests` (first attempts or retries); a partition's newer request replaces
    the older one."""
    return replace(cursor, requested={**cursor.requested, **{r.partition_key: r for r in requests}})


@dataclass(frozen=True)
class Retries:
    cursor: SensorCursor  # without the succeeded and given-up requests; retries not yet in
    retry: list[tuple[Requested, str]]  # to request again now (attempts counted), outcome
    succeeded: list[Requested]
    given_up: list[tuple[Requested, str]]  # with the outcome of the last attempt


def plan_retries(
    cursor: SensorCursor,
    outcomes: dict[str, str],
    now: datetime,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    launch_timeout: timedelta = DEFAULT_LAUNCH_TIMEOUT,
) -> Retries:
    """Which tracked requests to make again. `outcomes[partition_key]` is what became of
    the latest Dagster run of the partition created since its request (an `OUTCOME_*`;
    missing means no run). A failed or canceled run, or none within `launch_timeout`, is
    retried while fewer than `max_attempts` requests were made, else given up."""
    kept: dict[str, Requested] = {}
    retry: list[tuple[Requested, str]] = []
    succeeded: list[Requested] = []
    given_up: list[tuple[Requested, str]] = []
    for key, req in cursor.requested.items():
        outcome = outcomes.get(key, OUTCOME_NO_RUN)
        if outcome == OUTCOME_SUCCEEDED:
            succeeded.append(req)
            continue
        incomplete = outcome in (OUTCOME_FAILED, OUTCOME_CANCELED) or (
            outcome == OUTCOME_NO_RUN and now - req.requested_at >= launch_timeout
        )
        if not incomplete:
            kept[key] = req
        elif req.attempts < max_attempts:
            retry.append((replace(req, attempts=req.attempts + 1, requested_at=now), outcome))
        else:
            given_up.append((req, outcome))
    return Retries(replace(cursor, requested=kept), retry, succeeded, given_up)
