"""The optional SkyPilot adapter on recorded queue_v2 records; no SkyPilot, no network."""

from __future__ import annotations

import enum
import json
import logging
import sys
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rts_dagster.sources.skypilot import (
    TERMINAL_STATUSES,
    SkyPilotJobs,
    SkyPilotUnavailable,
    parse_queue,
    parse_record,
    query_queue,
    run_name_for_job,
)

DATA = Path(__file__).parent / "data" / "skypilot_queue_v2.json"


def recorded() -> tuple[list[dict[str, Any]], int, dict[str, int], int]:
    """The recorded answer in the shape `sky.get` returns it."""
    doc = json.loads(DATA.read_text(encoding="utf-8"))
    return doc["records"], doc["total"], doc["status_counts"], doc["total_no_filter"]


class ManagedJobStatus(enum.Enum):  # the SDK hands statuses over as an enum like this
    SUCCEEDED = "SUCCEEDED"
    RUNNING = "RUNNING"


def test_recorded_queue_parses_one_job_per_id():
    jobs = {job.job_id: job for job in parse_queue(recorded())}
    assert sorted(jobs) == list(range(101, 119))  # 19 records, job 113 is a 2-task pipeline
    first = jobs[101]
    assert first.job_name == "alice.fixed_maps.seed1" == first.run_name
    assert first.status == "SUCCEEDED" and first.terminal
    assert first.user_name == "alice"
    assert first.submitted_at == datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    assert first.end_at is not None and first.end_at.tzinfo is UTC
    assert first.end_at.timestamp() == pytest.approx(1767600000.0 + 26 * 3600 + 0.9)
    assert jobs[102].end_at is None and not jobs[102].terminal  # still running
    # a pipeline's outcome is its last task's: the train task failed after prep succeeded
    assert jobs[113].status == "FAILED"


def test_terminal_statuses_on_the_recorded_records():
    jobs = parse_queue(recorded())
    terminal = {j.status for j in jobs if j.terminal}
    running = {j.status for j in jobs if not j.terminal}
    assert terminal == TERMINAL_STATUSES  # every terminal status is in the recording
    assert running == {"RUNNING", "RECOVERING", "PENDING", "STARTING", "CANCELLING", "SUBMITTED"}


def test_job_name_to_run_name():
    jobs = {job.job_id: job for job in parse_queue(recorded())}
    assert jobs[110].run_name == "alice.assembly_lines.seed3"  # whitespace around the name
    assert jobs[111].job_name is None and jobs[111].run_name is None
    assert jobs[118].run_name is None  # empty name
    assert jobs[112].run_name == "bob's sweep \u2603 / lr=3e-4"  # kept as is: matched, not used
    assert run_name_for_job("  x.y.seed1\t") == "x.y.seed1"


def test_records_as_models_with_enum_status():
    model = types.SimpleNamespace(
        job_id=7,
        task_id=0,
        job_name="alice.t.seed1",
        status=ManagedJobStatus.SUCCEEDED,
        submitted_at=1767600000,
        start_at=None,
        end_at="1767603600.5",
        user_name=None,
    )
    job = parse_record(model)
    assert job is not None and job.status == "SUCCEEDED" and job.terminal
    assert job.end_at == datetime.fromtimestamp(1767603600.5, tz=UTC)
    assert parse_record({"job_id": 8, "status": "ManagedJobStatus.RUNNING"}).status == "RUNNING"
    assert parse_record({"job_id": None, "status": "SUCCEEDED"}) is None
    odd = parse_record({"job_id": "9", "status": None, "end_at": 0, "submitted_at": "soon"})
    assert odd is not None and odd.status == "" and not odd.terminal
    assert odd.end_at is None and odd.submitted_at is None
    # a bare record list (older SDKs) and a dict with "records" both parse
    assert [j.job_id for j in parse_queue([model])] == [7]
    assert len(parse_queue({"records": recorded()[0]})) == 18


class ListLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str) -> None:
        self.lines.append(("info", msg))

    def warning(self, msg: str) -> None:
        self.lines.append(("warning", msg))


def test_injected_queue():
    calls = []
    sky = SkyPilotJobs(queue=lambda: calls.append(1) or recorded())
    log = ListLog()
    jobs = sky.jobs(log)
    assert jobs is not None and len(jobs) == 18 and calls == [1]
    assert log.lines == []


def test_import_failure_disables_with_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "sky", None)  # `import sky` raises ImportError
    with pytest.raises(SkyPilotUnavailable, match="import sky"):
        query_queue()
    sky = SkyPilotJobs()
    log = ListLog()
    for _ in range(3):
        assert sky.jobs(log) is None
    assert len(log.lines) == 1
    level, line = log.lines[0]
    assert level == "info" and "SkyPilot job tracking disabled" in line and "import sky" in line
    assert sky.disabled_reason is not None


def _fake_sky(monkeypatch: pytest.MonkeyPatch, health: str) -> list[str]:
    """A stand-in `sky` package whose API server reports `health`; returns the calls."""
    calls: list[str] = []
    status = types.SimpleNamespace(value=health)
    common = types.ModuleType("sky.server.common")
    common.get_server_url = lambda: "http://user:secret@127.0.0.1:46580"  # type: ignore[attr-defined]
    common.get_api_server_status = lambda endpoint: types.SimpleNamespace(status=status)  # type: ignore[attr-defined]
    server = types.ModuleType("sky.server")
    server.common = common  # type: ignore[attr-defined]
    sky = types.ModuleType("sky")
    sky.server = server  # type: ignore[attr-defined]

    def queue_v2(**kwargs: Any) -> str:
        calls.append(f"queue_v2 {sorted(kwargs)}")
        assert kwargs["all_users"] and not kwargs["skip_finished"] and not kwargs["refresh"]
        return "req-1"

    def get(request_id: str) -> Any:
        calls.append(f"get {request_id}")
        return recorded()

    sky.jobs = types.SimpleNamespace(queue_v2=queue_v2)  # type: ignore[attr-defined]
    sky.get = get  # type: ignore[attr-defined]
    for name, module in (("sky", sky), ("sky.server", server), ("sky.server.common", common)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_unreachable_api_server_disables_without_starting_one(monkeypatch: pytest.MonkeyPatch):
    calls = _fake_sky(monkeypatch, "unhealthy")
    sky = SkyPilotJobs()
    log = ListLog()
    assert sky.jobs(log) is None and sky.jobs(log) is None
    assert calls == []  # never called queue_v2: the SDK would have started a local server
    assert len(log.lines) == 1
    assert "unhealthy" in log.lines[0][1] and "secret" not in log.lines[0][1]


def test_healthy_api_server_is_queried(monkeypatch: pytest.MonkeyPatch):
    calls = _fake_sky(monkeypatch, "healthy")
    jobs = SkyPilotJobs().jobs(ListLog())
    assert jobs is not None and len(jobs) == 18
    assert calls[0].startswith("queue_v2") and "fields" in calls[0] and calls[1] == "get req-1"


def test_errors_after_working_once_skip_one_query_only():
    answers: list[Any] = [recorded(), SkyPilotUnavailable("server went away"), RuntimeError("x")]

    def queue() -> Any:
        answer = answers.pop(0) if answers else recorded()
        if isinstance(answer, Exception):
            raise answer
        return answer

    sky = SkyPilotJobs(queue=queue)
    log = ListLog()
    assert sky.jobs(log) is not None
    assert sky.jobs(log) is None and sky.jobs(log) is None  # transient: warned, not disabled
    assert [level for level, _ in log.lines] == ["warning", "warning"]
    assert sky.jobs(log) is not None and sky.disabled_reason is None


def test_logger_objects_work_too(caplog: pytest.LogCaptureFixture):
    logger = logging.getLogger("rts.test.skypilot")

    def queue() -> Any:
        raise SkyPilotUnavailable("no API server configured")

    with caplog.at_level(logging.INFO, logger="rts.test.skypilot"):
        sky = SkyPilotJobs(queue=queue)
        sky.jobs(logger)
        sky.jobs(logger)
    assert len(caplog.records) == 1
