"""A local fake of the WandB backend that the real `wandb.Api` (0.31) can talk to.

`FakeWandbServer` is a threaded stdlib HTTP server bound to 127.0.0.1 on a free port. Point
the client at it with `wandb.Api(overrides={"base_url": server.base_url}, api_key=...)`.
In wandb 0.31 every public-API call goes through the `wandb-core` sidecar (Go), so the
requests below are the ones that binary sends; they were found by reading
`wandb/apis/public/*.py`, the query strings inside `wandb/bin/wandb-core`, and by logging
what arrived here.

`POST /graphql`, by operation name:
- `Viewer` (login check on `Api()`), `ServerFeaturesQuery` (answered with no features);
- `Runs` (project runs, relay pagination with `cursor`/`hasNextPage`, `runCount`; the
  MongoDB-style `filters` are evaluated here: `$and/$or/$nor`, `$eq/$ne/$in/$nin`,
  `$gt/$gte/$lt/$lte` (timestamps compared as times), `$regex`, `$exists`, on `name`,
  `displayName`, `state`, `tags`, `createdAt`, `heartbeatAt`, `username`, `config.<dotted>`;
  `order` `[+-]created_at|heartbeat_at|name`);
- `Run` (one run), `RunHistoryKeys` (`historyKeys`: `lastStep` and per-key `typeCounts`);
- `RunParquetHistory` (`parquetUrls` of the export and `liveData`, one `{"_step": s}` per
  row not exported yet: non-empty `liveData` is how the client knows the export is
  incomplete);
- `SampledHistoryPage` (what `scan_history(keys=...)` asks for the live part: rows in
  `[minStep, maxStep)` holding every requested key) and `HistoryPage` (the same without
  keys);
- `RunFiles` (run files, `fileNames`/`pattern` (SQL LIKE)/cursor pagination).

`GET`/`HEAD` of the export's parquet files and of run files, with `Range` support (the
client reads parquet footers and column chunks with ranged GETs). Telemetry posts are
accepted and ignored.

Runs are plain Python (`FakeRun`): history is a polars frame (`_step`, `_timestamp`, keys;
null = not logged in that row). Faults are programmable (`fail_graphql`, `rate_limit`,
`delay`), as are run changes between calls (`update_run`, `complete_export`). Every request
is logged (`requests`) with its arrival time, so tests can check what the client did.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import math
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import polars as pl

WANDB_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # how WandB's GraphQL API writes createdAt/heartbeatAt
DEFAULT_API_KEY = "local-" + "0" * 40
_MAX_CONCURRENT = 32  # requests served at once; more get a 503 (keeps the fake bounded)


def wandb_time(moment: datetime) -> str:
    """A UTC time as WandB's API writes it: second precision, no zone suffix."""
    return moment.astimezone(UTC).strftime(WANDB_TIME_FORMAT)


def parse_time(text: str) -> datetime:
    """`wandb_time` output (or ISO 8601 with a zone) back to an aware UTC datetime."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclass
class FakeRun:
    """One run of the fake project, described in Python."""

    run_id: str
    name: str = ""  # display name; empty means run_id
    state: str = "finished"
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime(2026, 1, 5, 12, tzinfo=UTC))
    heartbeat_at: datetime | None = None  # None: created_at + 1 h
    history: pl.DataFrame | None = None  # `_step` Int64, `_timestamp`, numeric keys (null = absent)
    exported_rows: int | None = None  # None: fully exported; k: first k rows exported, rest live
    export_parts: int = 1  # the export is split into this many parquet files
    files: dict[str, bytes] = field(default_factory=dict)  # run files by name
    user: str = "alice"
    raw_config: str | None = None  # sent instead of `config` as the config text (fault: not JSON)

    def __post_init__(self) -> None:
        self.name = self.name or self.run_id
        if self.heartbeat_at is None:
            self.heartbeat_at = self.created_at + timedelta(hours=1)


@dataclass
class LoggedRequest:
    """What the fake saw: method, path, GraphQL operation and variables, answer status."""

    method: str
    path: str
    operation: str | None
    variables: dict[str, Any]
    status: int
    at: float  # time.monotonic() on arrival
    range: str | None = None


@dataclass
class _Fault:
    times: int
    operation: str | None  # GraphQL operation name, "GET" for file downloads, None = any GraphQL
    status: int = 0  # 0 = no error status (a pure delay)
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""

    def applies(self, operation: str | None, is_graphql: bool) -> bool:
        if self.times <= 0:
            return False
        if self.operation is None:
            return is_graphql
        return self.operation == operation


class _GraphQLError(Exception):
    pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    fake: FakeWandbServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real backend
    timeout = 60  # socket timeout: a client that goes quiet cannot hold a thread forever
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without TCP_NODELAY, Nagle plus the
        # client's delayed ACK add ~40 ms to every keep-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        self.server.fake._serve(self, "POST")

    def do_GET(self) -> None:
        self.server.fake._serve(self, "GET")

    def do_HEAD(self) -> None:
        self.server.fake._serve(self, "HEAD")


class FakeWandbServer:
    """The fake backend: one entity/project with the runs you add."""

    def __init__(
        self,
        entity: str = "tests",
        project: str = "rts-test",
        *,
        api_keys: tuple[str, ...] = (DEFAULT_API_KEY,),
        project_id: int = 4242,
    ) -> None:
        self.entity = entity
        self.project = project
        self.api_keys = set(api_keys)
        self.project_id = project_id
        self.requests: list[LoggedRequest] = []
        self._runs: dict[str, FakeRun] = {}
        self._versions: dict[str, int] = {}  # bumped on every change: export URLs change too
        self._exports: dict[tuple[str, int], list[bytes]] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(_MAX_CONCURRENT)
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeWandbServer:
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in a delay fault
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> FakeWandbServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("FakeWandbServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # --- programming the fake ------------------------------------------------------------
    def add_run(self, run: FakeRun) -> FakeRun:
        with self._lock:
            self._runs[run.run_id] = run
            self._versions[run.run_id] = self._versions.get(run.run_id, 0) + 1
        return run

    def run(self, run_id: str) -> FakeRun:
        with self._lock:
            return self._runs[run_id]

    def update_run(self, run_id: str, **changes: Any) -> FakeRun:
        """Change a run between client calls (state, heartbeat_at, history, exported_rows...)."""
        with self._lock:
            run = replace(self._runs[run_id], **changes)
            self._runs[run_id] = run
            self._versions[run_id] += 1
        return run

    def complete_export(self, run_id: str) -> FakeRun:
        """The backend finished exporting the run's history to parquet."""
        return self.update_run(run_id, exported_rows=None)

    def rate_limit(
        self,
        times: int = 1,
        reset_s: float = 1,
        operation: str | None = None,
        *,
        retry_after: bool = False,
    ) -> None:
        """Answer the next `times` matching requests with 429 and `RateLimit-Remaining: 0`,
        `RateLimit-Reset: <reset_s>` (plus `Retry-After` when asked)."""
        headers = {"RateLimit-Remaining": "0", "RateLimit-Reset": f"{reset_s:g}"}
        if retry_after:
            headers["Retry-After"] = f"{reset_s:g}"
        self._add_fault(_Fault(times, operation, 429, headers=headers, body="rate limit exceeded"))

    def fail_graphql(self, status: int = 500, times: int = 1, operation: str | None = None) -> None:
        """Answer the next `times` matching requests with HTTP `status`."""
        self._add_fault(_Fault(times, operation, status, body=f"fake failure {status}"))

    def delay(self, seconds: float, times: int = 1, operation: str | None = None) -> None:
        """Hold the next `times` matching requests for `seconds` before answering normally."""
        self._add_fault(_Fault(times, operation, 0, delay_s=seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add_fault(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    # --- inspecting what the client did ------------------------------------------------------
    def operations(self) -> list[str]:
        """GraphQL operation names received, in order (including failed ones)."""
        with self._lock:
            return [r.operation for r in self.requests if r.operation and r.method == "POST"]

    def count(self, operation: str) -> int:
        return self.operations().count(operation)

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # --- HTTP ------------------------------------------------------------------------------
    def _serve(self, handler: _Handler, method: str) -> None:
        arrived = time.monotonic()
        if not self._slots.acquire(timeout=5):
            self._reply(handler, 503, b"busy", method=method)
            return
        try:
            self._serve_one(handler, method, arrived)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired during a delay fault)
        finally:
            self._slots.release()

    def _serve_one(self, handler: _Handler, method: str, arrived: float) -> None:
        path = urlsplit(handler.path).path
        body = b""
        if method == "POST":
            body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        if method == "POST" and path != "/graphql":
            self._log(method, path, None, {}, 200, arrived)
            self._reply(handler, 200, b"{}")  # telemetry and other posts: accepted, ignored
            return
        request: dict[str, Any] = {}
        operation: str | None = "GET"
        if method == "POST":
            try:
                request = json.loads(body or b"{}")
            except json.JSONDecodeError:
                self._log(method, path, None, {}, 400, arrived)
                self._reply(handler, 400, b'{"errors":[{"message":"bad JSON"}]}')
                return
            operation = request.get("operationName") or _operation_name(request.get("query", ""))
        variables = request.get("variables") or {}
        if isinstance(variables, str):
            variables = json.loads(variables or "{}")
        fault = self._take_fault(operation, method == "POST")
        if fault is not None and fault.delay_s and self._stopping.wait(fault.delay_s):
            return
        if fault is not None and fault.status:
            self._log(method, path, operation, variables, fault.status, arrived)
            self._reply(handler, fault.status, fault.body.encode(), fault.headers, method=method)
            return
        if method == "POST":
            if not self._authorized(handler.headers.get("Authorization", "")):
                self._log(method, path, operation, variables, 401, arrived)
                msg = b'{"errors":[{"message":"user is not logged in"}]}'
                self._reply(handler, 401, msg)
                return
            status, payload = self._graphql(operation or "", variables)
            self._log(method, path, operation, variables, status, arrived)
            self._reply(handler, status, json.dumps(payload).encode())
            return
        data = self._blob(path)
        if data is None:
            self._log(method, path, None, {}, 404, arrived)
            self._reply(handler, 404, b"not found", method=method)
            return
        status, chunk, headers = _ranged(data, handler.headers.get("Range"))
        self._log(method, path, None, {}, status, arrived, handler.headers.get("Range"))
        self._reply(handler, status, chunk, headers, method=method, length=len(chunk))

    def _take_fault(self, operation: str | None, is_graphql: bool) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.applies(operation, is_graphql):
                    fault.times -= 1
                    return fault
        return None

    def _authorized(self, header: str) -> bool:
        if not header.startswith("Basic "):
            return False
        try:
            user_key = base64.b64decode(header[6:]).decode()
        except ValueError:
            return False
        return user_key.partition(":")[2] in self.api_keys

    def _log(
        self,
        method: str,
        path: str,
        operation: str | None,
        variables: dict[str, Any],
        status: int,
        arrived: float,
        byte_range: str | None = None,
    ) -> None:
        entry = LoggedRequest(method, path, operation, variables, status, arrived, byte_range)
        with self._lock:
            self.requests.append(entry)

    @staticmethod
    def _reply(
        handler: _Handler,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        method: str = "POST",
        length: int | None = None,
    ) -> None:
        handler.send_response(status)
        content_type = (
            "application/json" if body[:1] in (b"{", b"[") else "application/octet-stream"
        )
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(body)

    # --- GraphQL ---------------------------------------------------------------------------
    def _graphql(self, operation: str, variables: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        resolver = getattr(self, f"_op_{operation}", None)
        if resolver is None:
            return 200, {"data": None, "errors": [{"message": f"fake: no operation {operation!r}"}]}
        try:
            with self._lock:
                return 200, {"data": resolver(variables)}
        except _GraphQLError as exc:
            return 200, {"data": None, "errors": [{"message": str(exc)}]}

    def _op_Viewer(self, variables: dict[str, Any]) -> dict[str, Any]:
        viewer = {
            "id": "VXNlcjox",
            "entity": self.entity,
            "username": "tester",
            "email": "tester@example.invalid",
            "flags": "{}",
            "admin": False,
            "teams": {"edges": [{"node": {"name": self.entity}}]},
        }
        return {"viewer": viewer}

    def _op_GetDefaultEntity(self, variables: dict[str, Any]) -> dict[str, Any]:
        return {"viewer": {"id": "VXNlcjox", "entity": self.entity}}

    def _op_ServerFeaturesQuery(self, variables: dict[str, Any]) -> dict[str, Any]:
        return {"serverInfo": {"features": []}}

    def _project(self, variables: Mapping[str, Any]) -> bool:
        entity = variables.get("entity") or variables.get("entityName")
        project = variables.get("project") or variables.get("projectName")
        return entity == self.entity and project == self.project

    def _op_Runs(self, variables: dict[str, Any]) -> dict[str, Any]:
        if not self._project(variables):
            return {"project": None}
        filters = json.loads(variables.get("filters") or "{}")
        matching = [run for run in self._runs.values() if _matches(_run_doc(run), filters)]
        matching = _ordered(matching, variables.get("order") or "+created_at")
        start = _decode_cursor(variables.get("cursor")) + 1
        per_page = int(variables.get("perPage") or 50)
        page = matching[start : start + per_page]
        edges = [
            {"node": self._run_node(run), "cursor": _encode_cursor(start + i)}
            for i, run in enumerate(page)
        ]
        return {
            "project": {
                "internalId": _b64(f"Project:{self.project_id}"),
                "runCount": len(matching),
                "readOnly": False,
                "runs": {
                    "edges": edges,
                    "pageInfo": {
                        "endCursor": edges[-1]["cursor"] if edges else None,
                        "hasNextPage": start + per_page < len(matching),
                    },
                },
            }
        }

    def _op_Run(self, variables: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(variables)
        if run is None:
            return {"project": None if not self._project(variables) else {"run": None}}
        return {"project": {"run": self._run_node(run)}}

    def _op_RunState(self, variables: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(variables)
        return {"project": {"run": {"state": run.state} if run else None}}

    def _op_RunHistoryKeys(self, variables: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(variables)
        return {"project": {"run": {"historyKeys": _history_keys(run)} if run else None}}

    def _op_RunParquetHistory(self, variables: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(variables)
        if run is None:
            return {"project": {"run": None}}
        history = _history(run)
        exported = history.height if run.exported_rows is None else run.exported_rows
        live = history.get_column("_step").slice(exported).to_list()
        urls = [
            f"{self.base_url}/export/{quote(run.run_id)}/{self._versions[run.run_id]}/{i}.parquet"
            for i in range(len(self._export_parts(run)))
        ]
        parquet = {"parquetUrls": urls, "liveData": [{"_step": step} for step in live]}
        return {"project": {"run": {"parquetHistory": parquet}}}

    def _op_SampledHistoryPage(self, variables: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(variables)
        if run is None:
            return {"project": {"run": None}}
        spec = json.loads(variables["spec"])
        # wandb-core sends an inclusive maxStep here (the last step of its page)
        rows = _rows_in_range(run, spec.get("keys") or [], spec["minStep"], spec["maxStep"] + 1)
        return {"project": {"run": {"sampledHistory": [_downsample(rows, spec.get("samples"))]}}}

    def _op_RunSampledHistory(self, variables: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(variables)
        if run is None:
            return {"project": {"run": None}}
        out = []
        for spec_text in variables.get("specs") or []:
            spec = json.loads(spec_text)
            rows = _rows_in_range(run, spec.get("keys") or [], 0, 2**62)
            out.append(_downsample(rows, spec.get("samples", 500)))
        return {"project": {"run": {"sampledHistory": out}}}

    def _op_HistoryPage(self, variables: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(variables)
        if run is None:
            return {"project": {"run": None}}
        rows = _rows_in_range(run, [], variables["minStep"], variables["maxStep"])
        rows = _downsample(rows, variables.get("pageSize"))
        return {"project": {"run": {"history": [json.dumps(row) for row in rows]}}}

    def _op_RunFiles(self, variables: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(variables)
        if run is None:
            return {"project": None if not self._project(variables) else {"run": None}}
        names = sorted(run.files)
        wanted = variables.get("fileNames") or []
        if wanted:
            names = [n for n in names if n in wanted]
        elif variables.get("pattern"):
            like = _like_regex(variables["pattern"])
            names = [n for n in names if like.fullmatch(n)]
        start = _decode_cursor(variables.get("fileCursor")) + 1
        limit = int(variables.get("fileLimit") or 50)
        page = names[start : start + limit]
        edges = [
            {"node": self._file_node(run, name), "cursor": _encode_cursor(start + i)}
            for i, name in enumerate(page)
        ]
        files = {
            "edges": edges,
            "pageInfo": {
                "endCursor": edges[-1]["cursor"] if edges else None,
                "hasNextPage": start + limit < len(names),
            },
        }
        project_id = _b64(f"Project:{self.project_id}")
        return {
            "project": {"internalId": project_id, "run": {"fileCount": len(names), "files": files}}
        }

    def _find_run(self, variables: Mapping[str, Any]) -> FakeRun | None:
        if not self._project(variables):
            return None
        run_id = variables.get("name") or variables.get("runName") or variables.get("run")
        return self._runs.get(str(run_id))

    def _run_node(self, run: FakeRun) -> dict[str, Any]:
        history = _history(run)
        config = {k: {"value": v, "desc": None} for k, v in run.config.items()}
        config["_wandb"] = {"value": {"cli_version": "0.31.0"}, "desc": None}
        summary = history.tail(1).to_dicts()[0] if history.height else {}
        summary = {k: _json_number(v) for k, v in summary.items() if v is not None}
        assert run.heartbeat_at is not None
        return {
            "projectId": str(self.project_id),  # the client calls int() on it
            "id": _b64(f"Run:v1:{run.run_id}:{self.project}:{self.entity}"),
            "name": run.run_id,
            "displayName": run.name,
            "tags": list(run.tags),
            "sweepName": None,
            "state": run.state,
            "config": json.dumps(config) if run.raw_config is None else run.raw_config,
            "group": None,
            "jobType": None,
            "commit": None,
            "readOnly": False,
            "createdAt": wandb_time(run.created_at),
            "heartbeatAt": wandb_time(run.heartbeat_at),
            "description": None,
            "notes": None,
            "systemMetrics": "{}",
            "summaryMetrics": json.dumps(summary),
            "historyLineCount": history.height,
            "user": {"name": run.user, "username": run.user},
            "historyKeys": _history_keys(run),
        }

    def _file_node(self, run: FakeRun, name: str) -> dict[str, Any]:
        data = run.files[name]
        url = (
            f"{self.base_url}/files/{self.entity}/{self.project}/{quote(run.run_id)}/{quote(name)}"
        )
        assert run.heartbeat_at is not None
        return {
            "id": _b64(f"File:{run.run_id}:{name}"),
            "name": name,
            "url": url,
            "directUrl": url,
            "sizeBytes": len(data),
            "mimetype": "application/octet-stream",
            "updatedAt": wandb_time(run.heartbeat_at),
            "md5": base64.b64encode(hashlib.md5(data).digest()).decode(),
        }

    # --- blobs -----------------------------------------------------------------------------
    def _export_parts(self, run: FakeRun) -> list[bytes]:
        """The run's export as parquet files (cached per run version)."""
        key = (run.run_id, self._versions[run.run_id])
        if key not in self._exports:
            history = _history(run)
            exported = history.height if run.exported_rows is None else run.exported_rows
            frame = history.head(exported)
            parts = max(1, min(run.export_parts, frame.height)) if frame.height else 0
            bounds = [frame.height * i // parts for i in range(parts + 1)] if parts else []
            blobs = []
            for lo, hi in itertools.pairwise(bounds):
                buffer = io.BytesIO()
                frame.slice(lo, hi - lo).write_parquet(buffer)
                blobs.append(buffer.getvalue())
            self._exports[key] = blobs
        return self._exports[key]

    def _blob(self, path: str) -> bytes | None:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        with self._lock:
            if len(parts) == 4 and parts[0] == "export":
                run = self._runs.get(parts[1])
                if run is None or str(self._versions[run.run_id]) != parts[2]:
                    return None  # an old link: the export changed since it was handed out
                blobs = self._export_parts(run)
                index = int(parts[3].removesuffix(".parquet"))
                return blobs[index] if index < len(blobs) else None
            if (
                len(parts) >= 5
                and parts[0] == "files"
                and parts[1:3] == [self.entity, self.project]
            ):
                run = self._runs.get(parts[3])
                return None if run is None else run.files.get("/".join(parts[4:]))
        return None


# --- helpers -------------------------------------------------------------------------------
_OPERATION_RE = re.compile(r"\b(?:query|mutation)\s+([A-Za-z_]\w*)")


def _operation_name(query: str) -> str | None:
    found = _OPERATION_RE.search(query)
    return found.group(1) if found else None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _encode_cursor(index: int) -> str:
    return _b64(f"cursor:{index}")


def _decode_cursor(cursor: str | None) -> int:
    """Index of the last item already handed out (-1 before the first page)."""
    if not cursor:
        return -1
    return int(base64.b64decode(cursor).decode().removeprefix("cursor:"))


def _history(run: FakeRun) -> pl.DataFrame:
    if run.history is None:
        return pl.DataFrame({"_step": []}, schema={"_step": pl.Int64})
    return run.history.sort("_step")


def _history_keys(run: FakeRun) -> dict[str, Any]:
    history = _history(run)
    keys = {}
    for name in history.columns:
        count = history.height - history.get_column(name).null_count()
        if count:
            keys[name] = {"typeCounts": [{"type": "number", "count": count}]}
    steps = history.get_column("_step")
    last = int(steps.max()) if history.height else -1  # type: ignore[arg-type]
    return {"lastStep": last, "keys": keys}


def _json_number(value: Any) -> Any:
    """NaN and infinities as WandB writes them in JSON (strings), other values unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _rows_in_range(
    run: FakeRun, keys: list[str], min_step: int, max_step: int
) -> list[dict[str, Any]]:
    """History rows with min_step <= _step < max_step holding every key in `keys`
    (all logged keys when `keys` is empty); every row includes `_step`."""
    history = _history(run).filter((pl.col("_step") >= min_step) & (pl.col("_step") < max_step))
    wanted = [k for k in dict.fromkeys(keys) if k != "_step"]
    if any(k not in history.columns for k in wanted):
        return []
    if wanted:
        history = history.select("_step", *wanted).drop_nulls(wanted)
    rows = []
    for row in history.iter_rows(named=True):
        rows.append({k: _json_number(v) for k, v in row.items() if v is not None})
    return rows


def _downsample(rows: list[dict[str, Any]], samples: Any) -> list[dict[str, Any]]:
    """Like the backend: at most `samples` rows, evenly spaced, when there are more."""
    if not samples or len(rows) <= int(samples):
        return rows
    n = int(samples)
    return [rows[i * (len(rows) - 1) // max(n - 1, 1)] for i in range(n)]


def _like_regex(pattern: str) -> re.Pattern[str]:
    """SQL LIKE (`%` any run, `_` one character, backslash escapes) as a regex."""
    out, escaped = [], False
    for char in pattern:
        if escaped:
            out.append(re.escape(char))
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "%":
            out.append(".*")
        elif char == "_":
            out.append(".")
        else:
            out.append(re.escape(char))
    return re.compile("".join(out), re.DOTALL)


def _ranged(data: bytes, header: str | None) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) for a GET with an optional single `Range: bytes=...`."""
    size = len(data)
    headers = {"Accept-Ranges": "bytes"}
    if not header or not header.startswith("bytes=") or "," in header:
        return 200, data, headers
    first, _, last = header[len("bytes=") :].strip().partition("-")
    if first == "":  # suffix range: the last N bytes
        start, end = max(size - int(last or 0), 0), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return 416, b"", {**headers, "Content-Range": f"bytes */{size}"}
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return 206, data[start : end + 1], headers


# --- runs filters (MongoDB-style, as the backend evaluates them) ---------------------------
_MISSING = object()
_FIELD_ALIASES = {
    "display_name": "displayName",
    "created_at": "createdAt",
    "heartbeat_at": "heartbeatAt",
    "createdat": "createdAt",
    "heartbeatat": "heartbeatAt",
}


def _run_doc(run: FakeRun) -> dict[str, Any]:
    return {
        "name": run.run_id,
        "displayName": run.name,
        "state": run.state,
        "tags": list(run.tags),
        "createdAt": run.created_at,
        "heartbeatAt": run.heartbeat_at,
        "username": run.user,
        "config": run.config,
    }


def _resolve(doc: Mapping[str, Any], key: str) -> Any:
    key = _FIELD_ALIASES.get(key, key)
    if not key.startswith("config."):
        return doc.get(key, _MISSING)
    value: Any = doc["config"]
    parts = key.split(".")[1:]
    for i, part in enumerate(parts):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif part == "value" and i == len(parts) - 1:
            break  # `config.lr.value` is the same as `config.lr`
        else:
            return _MISSING
    return value


def _matches(doc: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    for key, cond in filters.items():
        if key == "$and":
            ok = all(_matches(doc, f) for f in cond)
        elif key == "$or":
            ok = any(_matches(doc, f) for f in cond)
        elif key == "$nor":
            ok = not any(_matches(doc, f) for f in cond)
        elif isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            ok = all(_operator(_resolve(doc, key), op, arg) for op, arg in cond.items())
        else:
            ok = _operator(_resolve(doc, key), "$eq", cond)
        if not ok:
            return False
    return True


def _operator(value: Any, op: str, arg: Any) -> bool:
    if op == "$exists":
        return (value is not _MISSING) == bool(arg)
    if value is _MISSING:
        return op in ("$ne", "$nin")
    values = value if isinstance(value, list) else [value]
    if op == "$eq":
        return value == arg or any(_equal(v, arg) for v in values)
    if op == "$ne":
        return not _operator(value, "$eq", arg)
    if op == "$in":
        return any(_equal(v, a) for v in values for a in arg)
    if op == "$nin":
        return not _operator(value, "$in", arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return any(_compare(v, op, arg) for v in values)
    if op == "$regex":
        return any(isinstance(v, str) and re.search(arg, v) is not None for v in values)
    raise _GraphQLError(f"fake: unsupported filter operator {op}")


def _equal(value: Any, arg: Any) -> bool:
    if isinstance(value, datetime) and isinstance(arg, str):
        return value == parse_time(arg)
    return value == arg


def _compare(value: Any, op: str, arg: Any) -> bool:
    if isinstance(value, datetime):
        arg = parse_time(arg)
    try:
        if op == "$gt":
            return value > arg
        if op == "$gte":
            return value >= arg
        if op == "$lt":
            return value < arg
        return value <= arg
    except TypeError:
        return False


def _ordered(runs: list[FakeRun], order: str) -> list[FakeRun]:
    descending = order.startswith("-")
    key = _FIELD_ALIASES.get(order.lstrip("+-"), order.lstrip("+-"))
    docs = {run.run_id: _run_doc(run) for run in runs}

    def sort_key(run: FakeRun) -> tuple[Any, str]:
        value = docs[run.run_id].get(key)
        return (value if value is not None else "", run.run_id)

    return sorted(runs, key=sort_key, reverse=descending)
