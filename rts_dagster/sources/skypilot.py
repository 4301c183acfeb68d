"""Optional SkyPilot adapter: which managed jobs (= training runs) have ended.

SkyPilot is not a dependency. `sky` is imported lazily, on the first query; if that fails,
or no SkyPilot API server is configured and healthy, `SkyPilotJobs` disables itself with
one log line and the sensor works from the run source alone. We never let the SDK start
a local API server itself (its default when the endpoint is local and down): that takes
tens of seconds and is not a sensor's business.

Query: `sky.jobs.queue_v2(refresh=False, skip_finished=False, all_users=True)` then
`sky.get(request_id)` -> `(records, total, status_counts, total_no_filter)`; each record is a
`ManagedJobRecord` (a pydantic model that also answers `record["field"]`) or, from older
SDKs, a dict. A job's name is its run's name (Metta launches `sky jobs launch -n <run>`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

TERMINAL_STATUSES = frozenset(
    {
        "SUCCEEDED",
        "CANCELLED",
        "FAILED",
        "FAILED_SETUP",
        "FAILED_PRECHECKS",
        "FAILED_NO_RESOURCE",
        "FAILED_CONTROLLER",
    }
)
# Fields we read; asking for them keeps the answer small (servers ignore unknown ones).
QUEUE_FIELDS = (
    "job_id",
    "task_id",
    "job_name",
    "task_name",
    "status",
    "submitted_at",
    "start_at",
    "end_at",
    "user_name",
)


class SkyPilotUnavailable(RuntimeError):
    """SkyPilot cannot be used here (not installed, no healthy API server)."""


@dataclass(frozen=True)
class SkyJob:
    """One managed job, as far as this project cares."""

    job_id: int
    job_name: str | None
    status: str  # ManagedJobStatus value, e.g. "SUCCEEDED"
    submitted_at: datetime | None  # UTC
    end_at: datetime | None  # UTC; None while running
    user_name: str | None
    start_at: datetime | None = None  # None: the job never started (no run to wait for)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def run_name(self) -> str | None:
        return run_name_for_job(self.job_name)


def run_name_for_job(job_name: str | None) -> str | None:
    """The WandB run name of a job: the job name itself, minus surrounding whitespace;
    None for a job without a usable name."""
    if job_name is None:
        return None
    name = str(job_name).strip()
    return name or None


def _field(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def _status(value: Any) -> str:
    """`ManagedJobStatus.SUCCEEDED`, its value or its str() -> "SUCCEEDED"."""
    if value is None:
        return ""
    value = getattr(value, "value", value)
    return str(value).strip().rsplit(".", 1)[-1].upper()


def _timestamp(value: Any) -> datetime | None:
    """Epoch seconds (SkyPilot's unit) -> UTC; None, 0 or garbage -> None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if not seconds > 0:  # also rejects NaN
        return None
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def parse_record(record: Any) -> SkyJob | None:
    """A `SkyJob` from one queue record (model or dict); None without a job id."""
    job_id = _field(record, "job_id")
    try:
        job_id = int(job_id)
    except (TypeError, ValueError):
        return None
    name = _field(record, "job_name")
    user = _field(record, "user_name")
    return SkyJob(
        job_id=job_id,
        job_name=None if name is None else str(name),
        status=_status(_field(record, "status")),
        submitted_at=_timestamp(_field(record, "submitted_at")),
        end_at=_timestamp(_field(record, "end_at")),
        user_name=None if user is None else str(user),
        start_at=_timestamp(_field(record, "start_at")),
    )


def parse_queue(result: Any) -> list[SkyJob]:
    """Jobs from a `sky.get(queue_v2(...))` answer (or a bare record list), one per job id.

    A pipeline has one record per task; the job's outcome is its last task's record."""
    records: Iterable[Any]
    if isinstance(result, tuple | list) and len(result) == 4 and isinstance(result[1], int):
        records = result[0]
    elif isinstance(result, Mapping) and "records" in result:
        records = result["records"]
    else:
        records = result
    by_job: dict[int, tuple[int, SkyJob]] = {}
    for record in records:
        job = parse_record(record)
        if job is None:
            continue
        task_id = _field(record, "task_id")
        task = task_id if isinstance(task_id, int) else 0
        if job.job_id not in by_job or task >= by_job[job.job_id][0]:
            by_job[job.job_id] = (task, job)
    return [job for _, job in sorted(by_job.values(), key=lambda t: t[1].job_id)]


def _safe_url(url: str) -> str:
    """`url` without user:password (endpoints may carry basic-auth credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable endpoint>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def query_queue() -> Any:
    """The managed-jobs queue from the configured SkyPilot API server (all users).

    Raises `SkyPilotUnavailable` when `sky` is missing or the server is not healthy."""
    try:
        import sky  # optional: never a dependency of this project
        from sky.server import common as server_common
    except Exception as exc:  # ImportError, or a broken install failing at import
        raise SkyPilotUnavailable(f"`import sky` failed ({type(exc).__name__}: {exc})") from exc
    # Check health ourselves: the SDK would start a local API server if the local one is down.
    try:
        endpoint = server_common.get_server_url()
        info = server_common.get_api_server_status(endpoint)
    except Exception as exc:
        raise SkyPilotUnavailable(
            f"cannot determine the SkyPilot API server ({type(exc).__name__}: {exc})"
        ) from exc
    status = str(getattr(info.status, "value", info.status)).lower()
    if status != "healthy":
        raise SkyPilotUnavailable(
            f"SkyPilot API server {_safe_url(endpoint)} is {status} "
            "(start one with `sky api start` or set api_server.endpoint in ~/.sky/config.yaml)"
        )
    try:
        request_id = sky.jobs.queue_v2(
            refresh=False, skip_finished=False, all_users=True, fields=list(QUEUE_FIELDS)
        )
    except TypeError:  # an SDK without `fields`
        request_id = sky.jobs.queue_v2(refresh=False, skip_finished=False, all_users=True)
    try:
        return sky.get(request_id)
    except Exception as exc:
        # No jobs controller yet means no managed job ever ran: an empty queue.
        if type(exc).__name__ == "ClusterNotUpError":
            return ([], 0, {}, 0)
        raise


class SkyPilotJobs:
    """The SkyPilot job queue for a sensor, or nothing when SkyPilot is unavailable.

    `queue` returns what `sky.get(queue_v2(...))` returns (tests inject a fake). Once
    unavailable (`SkyPilotUnavailable` on the first query), the adapter stays disabled for
    the life of the process after logging one line; errors after it has worked once are
    logged per query and only skip that query."""

    def __init__(self, queue: Callable[[], Any] | None = None) -> None:
        self._queue = queue or query_queue
        self.disabled_reason: str | None = None
        self._worked = False

    def jobs(self, log: logging.Logger | Any) -> list[SkyJob] | None:
        """Every job in the queue, or None when SkyPilot is disabled or failed this time."""
        if self.disabled_reason is not None:
            return None
        try:
            result = self._queue()
        except SkyPilotUnavailable as exc:
            if self._worked:
                log.warning(f"SkyPilot queue unavailable this tick: {exc}")
                return None
            self.disabled_reason = str(exc)
            log.info(
                f"SkyPilot job tracking disabled: {exc}. Finished runs are found from the "
                "run source alone; restart the code location to retry."
            )
            return None
        except Exception as exc:  # network, auth, server errors: skip this query only
            log.warning(f"SkyPilot queue query failed ({type(exc).__name__}: {exc})")
            return None
        self._worked = True
        return parse_queue(result)
