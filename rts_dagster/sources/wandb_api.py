"""`WandbRunSource`: the runs of one WandB project, read live with the public `wandb.Api`.

Every network call goes through the real client (`wandb.Api` 0.31, which hands GraphQL and
downloads to its `wandb-core` sidecar); this module never speaks HTTP itself.

**Discovery.** `api.runs("<entity>/<project>", filters, order="+heartbeat_at", lazy=False)`
(full run fragments, so the config comes with the listing instead of one query per run).
Source-side filters are constructor arguments (`RunFilters`; the Dagster resource exposes
them as fields, see `defs/resources.py`), sent to the server as MongoDB-style filters:
`{"displayName": {"$regex": ...}}` (RE2), `{"tags": {"$in": [...]}}`,
`{"state": {"$in": [...]}}`, `{"config.<key>": value}`, and with `updated_since`
`{"heartbeatAt": {"$gt": <time, written as WandB writes it>}}` minus an overlap window (WandB
keeps heartbeats to the second; returning a few runs too many is allowed). They only narrow
what is fetched: the task/seed rules file (`discovery.py`) is still applied to every listed
run, so the rules stay the single place that decides what a run is.

**History.** `run.download_history_exports(dir, require_complete_history=True)` (parquet) read
with polars, keeping `_step`, `_timestamp` and the numeric columns starting with one of the
requested prefixes: `_step` Int64, the rest Float64, rows in `_step` order, keys sorted by
name. While WandB has not exported everything (`IncompleteRunHistoryError`: the server still
reports `liveData`), the rows come from `run.scan_history(keys=..., page_size=...)`: one scan of
`_timestamp` plus every key present in all rows (by `historyKeys` type counts), one scan per
other key (for not-yet-exported steps a scan only yields rows holding all its keys),
outer-joined on `_step`; a step returned twice (exported and live pages can overlap) is kept
once. Rows holding none of the wanted keys are absent from that fallback. Scans page by
`_step` ranges, so a run whose steps are agent steps (~1e9) would need ~1e5 queries per key
group: above `max_scan_pages` pages the read fails with a clear `RunReadError` instead (retry
once the export exists). `run.history()` (server-side sampled) is never used.

**Change detection.** `fingerprint = "<state>:<heartbeatAt as returned>:<export|live|unread>"`.
The marker is `live` while the cache knows the run's export to be incomplete (and for active
runs), `export` once it is known complete, `unread` before any read told (listing does not
probe every export; `data_fingerprint` gives the marker a read found); `list_runs` re-probes runs cached as incomplete at most every
`export_probe_interval_s`, so a refresh re-pulls a run once its export appears. A finished
run's heartbeat no longer moves when its export completes, so an incremental listing
(`updated_since`) also re-lists, by id, the runs the cache knows as still exporting or
exported within the last `late_export_window_s`, marked `extra["late_data"] = True`: the
sensor refreshes them although their heartbeat is older than its window.

**Cache.** `<cache_dir>/<entity>/<project>/<run_id>/` (slugged; default
`$RTS_DATA_DIR/cache/wandb/...`): `state.json` (the (state, heartbeat) key the files belong
to), `export-<key hash>/` (the parquet export), `live-<key hash>-<prefixes hash>.parquet`
(a scan_history result), `reward_stream/part-*.parquet` (completion chunks, re-downloaded
only when their md5/size change). Downloads land in a temporary folder and are renamed into
place; `state.json` is written atomically (`storage.write_json`).

**Retries, two layers.** wandb-core retries GraphQL and downloads itself on 429/5xx/timeouts
(exponential backoff from 2 s, jittered; honours `Retry-After` but not `RateLimit-Reset`, and
never shows response headers to Python). Its defaults go on for many rounds, so this module
caps it once per process through the documented settings (`x_graphql_retry_max=1`,
`x_file_transfer_retry_max=1`, waits of 1-2 s, 600 s per download attempt; values the user
already set, e.g. with `WANDB__GRAPHQL_RETRY_MAX`, are kept). Python waits at most
`timeout_s` for each GraphQL request (`wandb.Api(timeout=...)`), and this module bounds each
*try* of a call too (a call such as "load run" may need a login request and a query, each
bounded by wandb alone): a try that gets no answer for `timeout_s` is abandoned (it runs in a
worker thread) and counts as a timeout. Paged calls (the listing, `scan_history`, file lists)
get `timeout_s` per page, so a long but answering listing is not cut. Downloads are bounded
by wandb-core per attempt (`FILE_TRANSFER_TIMEOUT_S`), not by `timeout_s`. Around each call
runs our own bounded loop (`RetryPolicy`: `max_tries`, exponential backoff from `base_s`
capped at `cap_s`; after a 429 at least `rate_limit_wait_s`, standing in for the reset wandb
does not pass on). Giving up raises `WandbUnavailableError` (a `RunReadError`) naming the
call. So one call against a hanging server costs at most
`max_tries * timeout_s + sum of the backoff waits` (defaults: 5 * 30 s + 7.5 s), and once a
call has given up (not on a rate limit), the next calls of the same source try once only
until one succeeds: reading one run (load, history, files) then costs about `timeout_s`
per further call instead of the whole retry budget again.

**Credentials.** The API key is read from `WANDB_API_KEY` when an `Api` is created, handed to
`wandb.Api` and nothing else: never stored on this object, logged or put into an error.
401/403 raise `WandbAuthError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from rts_dagster import settings
from rts_dagster.discovery import slug
from rts_dagster.schema import COMPLETION_RECORD, conform
from rts_dagster.sources.base import RunReadError, RunRecord, UnreadableRun
from rts_dagster.storage import read_json, write_json, write_parquet

log = logging.getLogger(__name__)

SOURCE_NAME = "wandb"
ENV_API_KEY = "WANDB_API_KEY"
ENV_BASE_URL = "WANDB_BASE_URL"
DEFAULT_BASE_URL = "https://api.wandb.ai"
WANDB_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # how WandB's GraphQL API writes createdAt/heartbeatAt
ACTIVE_STATES = frozenset({"running", "pending", "preempting"})  # export cannot be complete
CHUNK_NAME_RE = re.compile(r"^reward_stream/part-w\d{4,}-\d{6,}\.parquet$")
_CHUNK_PATTERN = "reward_stream/part-%.parquet"  # SQL LIKE, evaluated by the server
FILE_TRANSFER_TIMEOUT_S = 600  # per download attempt (exports can be large)
_NUMERIC_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

T = TypeVar("T")


class WandbAuthError(RuntimeError):
    """WandB refused the credentials, or `WANDB_API_KEY` is not set. Never holds the key."""


class WandbUnavailableError(RunReadError):
    """A WandB call still failed after the bounded retries (rate limit, 5xx, timeouts)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Our retry loop around each wandb call (wandb-core's own short retry runs inside)."""

    max_tries: int = 5
    base_s: float = 0.5  # wait after the first failure; doubles each time
    cap_s: float = 30.0
    rate_limit_wait_s: float = 5.0  # minimum wait after a 429 (wandb hides RateLimit-Reset)

    def wait_s(self, attempt: int, rate_limited: bool) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        wait = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        return max(wait, self.rate_limit_wait_s) if rate_limited else wait


@dataclass(frozen=True)
class RunFilters:
    """Server-side narrowing of the listing (the discovery rules still apply afterwards)."""

    name_regex: str | None = None  # RE2, matched against the display name
    tags_any: tuple[str, ...] = ()  # the run carries at least one of these tags
    states: tuple[str, ...] = ()  # empty = any state
    config_equals: Mapping[str, Any] = field(default_factory=dict)  # "a.b" -> value
    extra: Mapping[str, Any] | None = None  # any further MongoDB-style filter, ANDed

    def to_wandb(self, heartbeat_after: str | None = None) -> dict[str, Any]:
        """The `filters` argument of `wandb.Api.runs`."""
        parts: list[dict[str, Any]] = []
        if self.name_regex:
            parts.append({"displayName": {"$regex": self.name_regex}})
        if self.tags_any:
            parts.append({"tags": {"$in": list(self.tags_any)}})
        if self.states:
            parts.append({"state": {"$in": list(self.states)}})
        parts.extend({f"config.{key}": value} for key, value in self.config_equals.items())
        if heartbeat_after is not None:
            parts.append({"heartbeatAt": {"$gt": heartbeat_after}})
        if self.extra:
            parts.append(dict(self.extra))
        if not parts:
            return {}
        return parts[0] if len(parts) == 1 else {"$and": parts}


class WandbRunSource:
    """A `RunSource` over the runs of `<entity>/<project>` on a WandB server."""

    name = SOURCE_NAME

    def __init__(
        self,
        entity: str,
        project: str,
        *,
        base_url: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        filters: RunFilters | None = None,
        timeout_s: float = 30.0,
        per_page: int = 100,
        order: str = "+heartbeat_at",
        retry: RetryPolicy | None = None,
        scan_page_size: int = 10_000,
        max_scan_pages: int = 2_000,
        export_probe_interval_s: float = 300.0,
        updated_since_overlap_s: float = 60.0,
        late_export_window_s: float = 86_400.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.entity = entity
        self.project = project
        self.base_url = base_url.rstrip("/") if base_url else None
        root = Path(cache_dir) if cache_dir else settings.data_dir() / "cache" / "wandb"
        self.cache_root = root.resolve()
        self.filters = filters or RunFilters()
        self.timeout_s = timeout_s
        self.per_page = per_page
        self.order = order
        self.retry = retry or RetryPolicy()
        self.scan_page_size = scan_page_size
        self.max_scan_pages = max_scan_pages
        self.export_probe_interval_s = export_probe_interval_s
        self.updated_since_overlap_s = updated_since_overlap_s
        self.late_export_window_s = late_export_window_s
        self._sleep = sleep
        self._api: Any = None
        self._lock = threading.Lock()
        self._server_down = False  # the last call gave up on an unresponsive server

    # --- RunSource ------------------------------------------------------------------------
    def list_runs(
        self, updated_since: datetime | None = None
    ) -> tuple[list[RunRecord], list[UnreadableRun]]:
        """Runs matching the filters (with `updated_since`: heartbeat after it, minus the
        overlap window), oldest heartbeat first. A run whose attributes cannot be understood
        is listed as unreadable; an unreachable or refusing server raises."""
        after = None
        if updated_since is not None:
            moment = updated_since - timedelta(seconds=self.updated_since_overlap_s)
            after = format_wandb_time(moment)
        path = f"{self.entity}/{self.project}"
        listed, unreadable = self._fetch_runs(path, self.filters.to_wandb(after), fresh=True)
        late: set[str] = set()
        if updated_since is not None:
            late = set(self._late_export_ids())
            missing = sorted(late - {str(getattr(r, "id", "")) for r in listed})
            if missing:
                by_id = {"name": {"$in": missing}}  # `name` is the run id in WandB filters
                base = self.filters.to_wandb()
                more, more_bad = self._fetch_runs(path, {"$and": [base, by_id]} if base else by_id)
                listed += more
                unreadable += more_bad

        runs: list[RunRecord] = []
        for wandb_run in listed:
            location = f"{self.entity}/{self.project}/{getattr(wandb_run, 'id', '?')}"
            try:
                record = self._record(wandb_run, probe=True)
            except (WandbAuthError, WandbUnavailableError):
                raise
            except Exception as exc:  # one odd run must not hide the others
                unreadable.append(UnreadableRun(location, _describe(exc), SOURCE_NAME))
                continue
            if record.run_id in late:
                record.extra["late_data"] = True
            runs.append(record)
        return runs, unreadable

    def _fetch_runs(
        self, path: str, filters: dict[str, Any], fresh: bool = False
    ) -> tuple[list[Any], list[UnreadableRun]]:
        """The listed wandb runs, and those the client could not build (e.g. a config that
        is not JSON), each as unreadable with its reason: one bad run never fails the
        listing of the others."""

        def fetch(progress: _Progress) -> tuple[list[Any], list[UnreadableRun]]:
            # Api caches Runs objects: a new one sees new runs
            api = self._fresh_api() if fresh else self._cached_api()
            progress.beat()
            paginator = api.runs(
                path, filters=filters, order=self.order, per_page=self.per_page, lazy=False
            )
            bad: list[UnreadableRun] = []
            _build_runs_one_by_one(paginator, path, bad, on_page=progress.beat)
            return list(paginator), bad

        return self._call(f"list runs of {path}", fetch)

    def _late_export_ids(self) -> list[str]:
        """Run ids whose export the cache knows as incomplete, or completed recently."""
        project_dir = self.cache_root / slug(self.entity) / slug(self.project)
        now = time.time()
        ids = []
        for state_path in sorted(project_dir.glob("*/state.json")):
            state = _read_state(state_path.parent)
            completed_at = float(state.get("export_completed_at") or 0.0)
            late = state.get("export_complete") is False
            late = late or now - completed_at < self.late_export_window_s
            if late and state.get("run_id"):
                ids.append(str(state["run_id"]))
        return ids

    def get_run(self, location: str) -> RunRecord:
        """The current record of `entity/project/run_id`; `RunReadError` if it is gone."""
        wandb_run = self._load_run(location)
        try:
            return self._record(wandb_run, probe=False)
        except Exception as exc:
            raise RunReadError(f"{location}: {_describe(exc)}") from exc

    def read_history(
        self, run: RunRecord, key_prefixes: Sequence[str] | None = None
    ) -> pl.DataFrame:
        """The wide history frame, from the parquet export (cached), or from `scan_history`
        while the export is incomplete (also cached, per key prefixes)."""
        key = _cache_key(run.state, run.extra.get("heartbeat_raw") or _iso(run.heartbeat_at))
        run_dir = self._run_dir(run.entity, run.project, run.run_id)
        state = _read_state(run_dir)
        export_dir = _current_export(run_dir, state, key)
        if export_dir is None:
            wandb_run = self._load_run(run.location)
            try:
                export_dir = self._download_export(wandb_run, run_dir, key)
            except _ExportIncomplete:
                return self._live_history(wandb_run, run_dir, key, key_prefixes)
        return read_export(sorted(export_dir.glob("*.parquet")), key_prefixes, run.location)

    def read_completions(self, run: RunRecord) -> pl.DataFrame | None:
        """The run's `reward_stream/part-*.parquet` files (downloaded once, cached), as one
        `COMPLETION_RECORD` frame sorted by worker and completion_index; None if none."""
        wandb_run = self._load_run(run.location)
        files = self._call(
            f"{run.location}: list reward_stream files",
            lambda progress: _each_with_beat(
                wandb_run.files(pattern=_CHUNK_PATTERN, per_page=1000), progress
            ),
        )
        files = sorted((f for f in files if CHUNK_NAME_RE.match(f.name)), key=lambda f: f.name)
        if not files:
            return None
        run_dir = self._run_dir(run.entity, run.project, run.run_id)
        frames = []
        for wandb_file in files:
            path = self._cached_file(run_dir, wandb_file, run.location)
            try:
                frames.append(conform(pl.read_parquet(path), COMPLETION_RECORD, wandb_file.name))
            except Exception as exc:
                raise RunReadError(
                    f"{run.location}: unreadable reward stream chunk {wandb_file.name} ({exc})"
                ) from exc
        return pl.concat(frames).sort("worker", "completion_index")

    def data_fingerprint(self, run: RunRecord) -> str:
        """`run.fingerprint` with the export marker the cache now holds for its (state,
        heartbeat): `live` if a read found the export incomplete, `export` if complete."""
        heartbeat_raw = run.extra.get("heartbeat_raw") or _iso(run.heartbeat_at)
        key = _cache_key(run.state, heartbeat_raw)
        state = _read_state(self._run_dir(run.entity, run.project, run.run_id))
        complete = state.get("export_complete") if state.get("key") == key else None
        if run.state in ACTIVE_STATES:
            complete = False
        return f"{run.state}:{heartbeat_raw}:{_export_marker(complete)}"

    # --- records ----------------------------------------------------------------------------
    def _record(self, wandb_run: Any, probe: bool) -> RunRecord:
        run_id = str(wandb_run.id)
        state = str(wandb_run.state)
        # GraphQL fields without a property are reachable as snake_case attributes (Attrs)
        heartbeat_raw = getattr(wandb_run, "heartbeat_at", None)
        created_raw = getattr(wandb_run, "created_at", None)
        history_keys = _history_keys(wandb_run)
        key_counts = {n: _key_count(i) for n, i in (history_keys.get("keys") or {}).items()}
        run_dir = self._run_dir(self.entity, self.project, run_id)
        complete = self._export_complete(wandb_run, run_dir, state, heartbeat_raw, probe)
        return RunRecord(
            run_id=run_id,
            run_name=str(wandb_run.name or run_id),
            project=self.project,
            entity=self.entity,
            tags=tuple(str(t) for t in (wandb_run.tags or ())),
            config=dict(wandb_run.config or {}),
            state=state,
            created_at=parse_wandb_time(created_raw),
            heartbeat_at=parse_wandb_time(heartbeat_raw),
            source=SOURCE_NAME,
            location=f"{self.entity}/{self.project}/{run_id}",
            fingerprint=f"{state}:{heartbeat_raw}:{_export_marker(complete)}",
            extra={
                "heartbeat_raw": heartbeat_raw,
                "created_raw": created_raw,
                "export_complete": complete,
                "history_line_count": getattr(wandb_run, "history_line_count", None),
                "last_step": history_keys.get("lastStep"),
                "history_key_counts": key_counts,
            },
        )

    def _export_complete(
        self, wandb_run: Any, run_dir: Path, state: str, heartbeat_raw: Any, probe: bool
    ) -> bool | None:
        """What the cache says about the export for this (state, heartbeat): None if no
        read told yet (listing every run does not probe every export); an active run's
        export is never complete; one known incomplete is probed again when due."""
        if state in ACTIVE_STATES:
            return False
        key = _cache_key(state, heartbeat_raw)
        cached = _read_state(run_dir)
        known = cached.get("export_complete") if cached.get("key") == key else None
        if known is None or known:
            return known
        due = time.time() - float(cached.get("probed_at") or 0) >= self.export_probe_interval_s
        if not probe or not due:
            return False
        try:
            self._download_export(wandb_run, run_dir, key)
            return True
        except _ExportIncomplete:
            return False
        except RunReadError as exc:  # a failed probe must not fail the listing
            log.warning("%s: export probe failed: %s", run_dir.name, exc)
            return False

    # --- history ----------------------------------------------------------------------------
    def _download_export(self, wandb_run: Any, run_dir: Path, key: str) -> Path:
        """Download the run's parquet export into the cache; `_ExportIncomplete` if WandB
        has not exported everything yet (the state file then records when we looked)."""
        from wandb.apis.public.runhistory import IncompleteRunHistoryError

        location = f"{self.entity}/{self.project}/{wandb_run.id}"
        run_dir.mkdir(parents=True, exist_ok=True)

        def download(_: _Progress) -> Path:
            tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=run_dir))
            try:
                result = wandb_run.download_history_exports(tmp, require_complete_history=True)
                if result.errors:  # wandb reports failed files here instead of raising
                    detail = "; ".join(f"{Path(p).name}: {e}" for p, e in result.errors.items())
                    raise _DownloadError(f"export download failed: {detail}")
                for path in result.paths:  # wandb-core writes HTTP error bodies as files too
                    try:
                        pl.read_parquet_schema(path)
                    except Exception as exc:
                        raise _DownloadError(
                            f"export file {Path(path).name} is not parquet"
                        ) from exc
                return tmp
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

        try:
            # downloads: bounded per attempt by wandb-core (FILE_TRANSFER_TIMEOUT_S)
            tmp = self._call(f"{location}: download history export", download, bounded=False)
        except IncompleteRunHistoryError:
            _update_state(
                run_dir,
                key=key,
                run_id=str(wandb_run.id),
                export_complete=False,
                probed_at=time.time(),
            )
            raise _ExportIncomplete(location) from None
        final = run_dir / f"export-{_short_hash(key)}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for index, path in enumerate(sorted(final.glob("*.parquet"))):
            path.rename(final / f"part-{index:05d}.parquet")
        was_exporting = _read_state(run_dir).get("export_complete") is False
        _update_state(
            run_dir,
            key=key,
            run_id=str(wandb_run.id),
            export_complete=True,
            export_dir=final.name,
            live={},
            **({"export_completed_at": time.time()} if was_exporting else {}),
        )
        _remove_stale(run_dir)
        return final

    def _live_history(
        self, wandb_run: Any, run_dir: Path, key: str, key_prefixes: Sequence[str] | None
    ) -> pl.DataFrame:
        """History from `scan_history` (export incomplete), cached per key and prefixes."""
        prefixes_id = _short_hash(
            json.dumps(sorted(key_prefixes) if key_prefixes is not None else None)
        )
        state = _read_state(run_dir)
        cached = (state.get("live") or {}).get(prefixes_id) if state.get("key") == key else None
        if cached and (run_dir / cached).is_file():
            return pl.read_parquet(run_dir / cached)
        frame = self.scan_history_frame(wandb_run, key_prefixes)
        name = f"live-{_short_hash(key)}-{prefixes_id}.parquet"
        write_parquet(frame, run_dir / name)
        live = dict(state.get("live") or {}) if state.get("key") == key else {}
        live[prefixes_id] = name
        _update_state(run_dir, key=key, run_id=str(wandb_run.id), export_complete=False, live=live)
        _remove_stale(run_dir)
        return frame

    def scan_history_frame(
        self, wandb_run: Any, key_prefixes: Sequence[str] | None = None
    ) -> pl.DataFrame:
        """The wide history frame built from `run.scan_history` key groups (no cache)."""
        location = f"{self.entity}/{self.project}/{wandb_run.id}"
        history_keys = _history_keys(wandb_run)
        key_info = history_keys.get("keys") or {}
        counts = {name: _key_count(info) for name, info in key_info.items()}
        prefixes = tuple(key_prefixes) if key_prefixes is not None else None
        wanted = sorted(
            name
            for name, info in key_info.items()
            if name not in ("_step", "_timestamp")
            and _may_be_numeric(info)
            and (prefixes is None or name.startswith(prefixes))
        )
        rows_total = int(getattr(wandb_run, "history_line_count", None) or 0)
        everywhere = [n for n in wanted if rows_total and counts.get(n, 0) >= rows_total]
        groups = [["_timestamp", *everywhere]] + [[n] for n in wanted if n not in everywhere]
        last_step = int(history_keys.get("lastStep", -1))
        pages = math.ceil((last_step + 1) / self.scan_page_size) if last_step >= 0 else 0
        if pages > self.max_scan_pages:
            raise RunReadError(
                f"{location}: the history export is not complete yet and scan_history would "
                f"need {pages} pages of {self.scan_page_size} steps per key group "
                f"(cap {self.max_scan_pages}); retry once WandB has exported the history"
            )
        frames = []
        for group in groups:

            def scan(progress: _Progress, group: list[str] = group) -> list[dict[str, Any]]:
                rows = wandb_run.scan_history(keys=group, page_size=self.scan_page_size)
                return _each_with_beat(rows, progress)

            rows = self._call(f"{location}: scan_history {group[:3]}", scan)
            frames.append(_rows_frame(rows, group))
        merged = frames[0]
        for frame in frames[1:]:
            merged = merged.join(frame, on="_step", how="full", coalesce=True)
        columns = ["_step", "_timestamp", *wanted]
        return merged.select(columns).sort("_step")

    # --- files ------------------------------------------------------------------------------
    def _cached_file(self, run_dir: Path, wandb_file: Any, location: str) -> Path:
        """A run file from the cache, downloaded again only if its md5 or size changed."""
        name = str(wandb_file.name)
        target = run_dir / name
        signature = {"md5": wandb_file.md5, "size": int(wandb_file.size)}
        state = _read_state(run_dir)
        if (state.get("files") or {}).get(name) == signature and target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)

        def download(_: _Progress) -> Path:
            tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=run_dir))
            try:
                wandb_file.download(root=str(tmp), replace=True).close()
                os.replace(tmp / name, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return target

        self._call(f"{location}: download {name}", download, bounded=False)
        files = dict(_read_state(run_dir).get("files") or {})
        files[name] = signature
        _update_state(run_dir, files=files)
        return target

    def _run_dir(self, entity: str, project: str, run_id: str) -> Path:
        return self.cache_root / slug(entity) / slug(project) / slug(run_id)

    def server_url(self) -> str:
        """The server the client talks to: `base_url`, else `WANDB_BASE_URL`, else wandb's
        default (what `wandb.Api` itself picks, in that order)."""
        if self.base_url:
            return self.base_url
        from_env = os.environ.get(ENV_BASE_URL, "").strip().rstrip("/")
        if from_env:
            return f"{from_env} (from {ENV_BASE_URL})"
        return f"{DEFAULT_BASE_URL} (wandb's default; set {ENV_BASE_URL} for another)"

    # --- wandb client --------------------------------------------------------------------
    def _fresh_api(self) -> Any:
        with self._lock:
            self._api = self._new_api()
            return self._api

    def _cached_api(self) -> Any:
        with self._lock:
            if self._api is None:
                self._api = self._new_api()
            else:
                self._api.flush()  # Api caches Run objects: drop them to see current state
            return self._api

    def _new_api(self) -> Any:
        import wandb

        key = os.environ.get(ENV_API_KEY, "").strip()
        if not key:
            raise WandbAuthError(
                f"{ENV_API_KEY} is not set: the WandB source reads its API key from that "
                "environment variable only"
            )
        _limit_wandb_core_retries()
        overrides: dict[str, Any] = {"entity": self.entity, "project": self.project}
        if self.base_url:
            overrides["base_url"] = self.base_url
        # `timeout` bounds how long Python waits for each call (wandb-core's attempts and
        # backoff included); a call that outlives it is retried by `_call`.
        timeout = max(1, math.ceil(self.timeout_s))
        return wandb.Api(overrides=overrides, api_key=key, timeout=timeout)

    def _load_run(self, location: str) -> Any:
        from wandb.apis.public.runs import RunNotFoundError

        def load(_: _Progress) -> Any:
            try:
                return self._cached_api().run(location)
            except Exception as exc:
                # `Api.run` wraps RunNotFoundError into a CommError (normalize_exceptions)
                if isinstance(exc, RunNotFoundError) or isinstance(
                    getattr(exc, "exc", None), RunNotFoundError
                ):
                    raise _NotFound(f"{location}: run not found on WandB (deleted?)") from exc
                raise

        try:
            return self._call(f"{location}: load run", load)
        except _NotFound as exc:
            raise RunReadError(str(exc)) from None

    def _call(
        self,
        what: str,
        fn: Callable[[_Progress], T],
        bounded: bool = True,
    ) -> T:
        """`fn(progress)` with bounded retries on rate limits, 5xx and timeouts (see module
        doc). With `bounded`, a try that sees no answer for `timeout_s` (no return and no
        `progress.beat()`, which paged calls give per page) is abandoned as timed out,
        whatever wandb does inside. After a call gave up on an unresponsive server, the
        next calls try once only until one succeeds."""
        from wandb.apis.public.runhistory import IncompleteRunHistoryError

        max_tries = 1 if self._server_down else self.retry.max_tries
        for attempt in range(1, max_tries + 1):
            try:
                result = self._within_deadline(what, fn) if bounded else fn(_Progress())
                self._server_down = False
                return result
            except (IncompleteRunHistoryError, _NotFound, WandbAuthError):
                raise
            except Exception as exc:
                kind, status = classify_error(exc)
                if kind == "auth":
                    raise WandbAuthError(
                        f"WandB server {self.server_url()} refused the API key from "
                        f"{ENV_API_KEY} (HTTP {status}) during: {what}"
                    ) from None
                message = _describe(exc)
                if kind != "retry":
                    raise RunReadError(f"{what}: {message}") from exc
                if attempt == max_tries:
                    self._server_down = status != 429  # rate limits are not an outage
                    again = " (one try: the previous call gave up too)" if max_tries == 1 else ""
                    raise WandbUnavailableError(
                        f"{what}: gave up after {attempt} tries{again}: {message}"
                    ) from exc
                wait = self.retry.wait_s(attempt, status == 429)
                log.warning(
                    "%s: try %d failed (%s); retrying in %.1f s", what, attempt, message, wait
                )
                if not isinstance(exc, _CallTimedOut):
                    # a fresh client for the next try; after our own timeout the abandoned
                    # try may still finish creating one (its login answered), reused then
                    with self._lock:
                        self._api = None
                self._sleep(wait)
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _within_deadline(self, what: str, fn: Callable[[_Progress], T]) -> T:
        """`fn(progress)` in a worker thread, waited for until it returns or `timeout_s`
        pass without a result or a `progress.beat()`; then `_CallTimedOut`. The abandoned
        thread ends on its own (wandb bounds each request) and its result is dropped."""
        progress = _Progress()
        outcome: dict[str, Any] = {}
        finished = threading.Event()

        def work() -> None:
            try:
                outcome["value"] = fn(progress)
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc
            finally:
                finished.set()

        threading.Thread(target=work, name="rts-wandb-call", daemon=True).start()
        while not finished.wait(max(0.0, progress.last + self.timeout_s - time.monotonic())):
            if time.monotonic() - progress.last >= self.timeout_s:
                raise _CallTimedOut(
                    f"no answer from {self.server_url()} within timeout_s={self.timeout_s:g} s"
                )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


# --- helpers ---------------------------------------------------------------------------------
class _ExportIncomplete(Exception):
    pass


def _each_with_beat(items: Any, progress: _Progress) -> list[Any]:
    """`list(items)` of a paged wandb iterator, telling `progress` of every item."""
    collected = []
    for item in items:
        progress.beat()
        collected.append(item)
    return collected


class _NotFound(Exception):
    pass


class _CallTimedOut(Exception):
    """A try saw no answer within `timeout_s` (retried: its message says "timed out")."""


class _Progress:
    """When a paged call last heard from the server (`beat()` per page or row)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()


def _build_runs_one_by_one(
    paginator: Any,
    path: str,
    bad: list[UnreadableRun],
    on_page: Callable[[], None] = lambda: None,
) -> None:
    """Make a wandb `Runs` paginator build each run of a page on its own: a run it cannot
    build (its config is not JSON, ...) goes to `bad`, named and with the reason, and the
    page's other runs are kept. Without this, wandb fails the whole page (`CommError:
    Expecting value ...`) without naming the run. A paginator of another shape is left
    as it is."""
    build_page = getattr(paginator, "convert_objects", None)
    if build_page is None:
        return

    def build_each() -> list[Any]:
        on_page()
        response = paginator.last_response
        try:
            edges = response["project"]["runs"]["edges"]
        except (KeyError, TypeError):
            return list(build_page())  # wandb's own error (e.g. no such project)
        built: list[Any] = []
        try:
            for edge in edges:
                runs_part = {**response["project"]["runs"], "edges": [edge]}
                paginator.last_response = {
                    **response,
                    "project": {**response["project"], "runs": runs_part},
                }
                try:
                    built.extend(build_page())
                except Exception as exc:
                    node = edge.get("node") or {} if isinstance(edge, dict) else {}
                    run_id = str(node.get("name") or "?")
                    name = node.get("displayName")
                    bad.append(
                        UnreadableRun(
                            f"{path}/{run_id}",
                            f"{path}/{run_id} (name {name!r}): the client cannot read this "
                            f"run's attributes: {_describe(exc)}",
                            SOURCE_NAME,
                        )
                    )
        finally:
            paginator.last_response = response
        return built

    paginator.convert_objects = build_each


class _DownloadError(Exception):
    """A download went wrong in a way worth retrying."""


_STATUS_RES = (
    re.compile(r"\bHTTP (\d{3})\b"),
    re.compile(r"\bstatus:? (\d{3})\b"),
    re.compile(r"\bHTTP status (\d{3})\b"),
)
_TRANSIENT_MARKERS = (
    "deadline exceeded",
    "timeout",
    "timed out",
    "did not respond in time",
    "connection refused",
    "connection reset",
    "eof",
    "service process is not running",
)


def classify_error(exc: BaseException) -> tuple[str, int | None]:
    """("auth" | "retry" | "fatal", HTTP status if known) for an error from wandb.

    wandb 0.31 reports an HTTP status on `WandbApiFailedError.response.http_status` only
    when wandb-core did not retry; after its retries the status is only in the message
    ("giving up after 2 attempt(s) ... HTTP 429: ...")."""
    from wandb.errors import AuthenticationError

    status: int | None = None
    texts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        code = getattr(response, "http_status", None)
        if isinstance(code, int) and code > 0 and status is None:
            status = code
        texts.append(str(current))
        inner = getattr(current, "exc", None)
        current = inner if isinstance(inner, BaseException) else current.__cause__
    text = " ".join(texts)
    if status is None:
        for pattern in _STATUS_RES:
            found = pattern.search(text)
            if found:
                status = int(found.group(1))
                break
    if status in (401, 403):
        return "auth", status
    if status is not None and (status in (408, 429) or status >= 500):
        return "retry", status
    if isinstance(exc, _DownloadError):
        return "retry", status
    lowered = text.lower()
    if status is None and any(marker in lowered for marker in _TRANSIENT_MARKERS):
        return "retry", None
    if isinstance(exc, AuthenticationError) and status is None:
        return "auth", None  # wandb rejected the key before any request (e.g. its length)
    return "fatal", status


_wandb_core_lock = threading.Lock()
_wandb_core_limited = False


def _limit_wandb_core_retries() -> None:
    """Cap wandb-core's own retries once per process (settings the user set are kept)."""
    global _wandb_core_limited
    with _wandb_core_lock:
        if _wandb_core_limited:
            return
        import wandb
        from wandb.sdk import wandb_setup

        current = wandb_setup.singleton().settings
        wanted = {
            "x_graphql_retry_max": 1,  # 0 means "default" (many retries) to wandb-core
            "x_graphql_retry_wait_min_seconds": 1,  # whole seconds: wandb-core truncates
            "x_graphql_retry_wait_max_seconds": 2,
            "x_file_transfer_retry_max": 1,
            "x_file_transfer_retry_wait_min_seconds": 1,
            "x_file_transfer_retry_wait_max_seconds": 2,
            # Python waits for a download without a limit: bound each attempt here.
            "x_file_transfer_timeout_seconds": FILE_TRANSFER_TIMEOUT_S,
        }
        updates = {k: v for k, v in wanted.items() if getattr(current, k, None) is None}
        if updates:
            wandb.setup(settings=wandb.Settings(**updates))
        _wandb_core_limited = True


def read_export(
    paths: Sequence[Path], key_prefixes: Sequence[str] | None, location: str = ""
) -> pl.DataFrame:
    """Parquet export files -> the wide frame: `_step` Int64, `_timestamp` Float64, the
    numeric columns (starting with one of `key_prefixes` when given) as Float64, sorted by
    name; rows in `_step` order. Files may differ in columns (a key first logged late)."""
    prefixes = tuple(key_prefixes) if key_prefixes is not None else None
    schemas = {}
    for path in paths:
        try:
            schemas[path] = pl.read_parquet_schema(path)
        except Exception as exc:
            raise RunReadError(f"{location}: unreadable export file {path.name} ({exc})") from exc
    wanted: set[str] = set()
    for schema in schemas.values():
        for name, dtype in schema.items():
            if name in ("_step", "_timestamp") or not dtype.is_numeric():
                continue
            if prefixes is None or name.startswith(prefixes):
                wanted.add(name)
    columns = sorted(wanted)
    frames = []
    for path, schema in schemas.items():
        if "_step" not in schema:
            raise RunReadError(f"{location}: export file {path.name} has no _step column")
        present = [c for c in columns if c in schema]
        timestamp = (
            pl.col("_timestamp").cast(pl.Float64)
            if "_timestamp" in schema
            else pl.lit(None, pl.Float64).alias("_timestamp")
        )
        frames.append(
            pl.scan_parquet(path).select(
                pl.col("_step").cast(pl.Int64),
                timestamp,
                *(pl.col(c).cast(pl.Float64) for c in present),
            )
        )
    if not frames:
        return pl.DataFrame(schema={"_step": pl.Int64, "_timestamp": pl.Float64})
    merged = pl.concat(frames, how="diagonal").collect()
    missing = [pl.lit(None, pl.Float64).alias(c) for c in columns if c not in merged.columns]
    return merged.with_columns(missing).select("_step", "_timestamp", *columns).sort("_step")


def _history_keys(wandb_run: Any) -> dict[str, Any]:
    """The run's `historyKeys` (`lastStep`, per-key `typeCounts`), {} if unknown."""
    value = getattr(wandb_run, "history_keys", None) or {}
    if isinstance(value, str):
        value = json.loads(value or "{}")
    return value if isinstance(value, dict) else {}


def _key_count(info: Any) -> int:
    """Rows holding a key, from its `historyKeys` entry (`typeCounts`, all types)."""
    counts = (info or {}).get("typeCounts") or [] if isinstance(info, dict) else []
    return sum(int(c.get("count") or 0) for c in counts if isinstance(c, dict))


def _may_be_numeric(info: Any) -> bool:
    """Whether a `historyKeys` entry may hold numbers (no type info counts as maybe)."""
    counts = (info or {}).get("typeCounts") if isinstance(info, dict) else None
    if not counts:
        return True
    return any(isinstance(c, dict) and c.get("type") in ("number", "nan") for c in counts)


def _rows_frame(rows: list[dict[str, Any]], group: list[str]) -> pl.DataFrame:
    """scan_history rows -> `_step` + the group's columns as Float64, one row per step."""
    data: dict[str, pl.Series] = {
        "_step": pl.Series("_step", [int(r["_step"]) for r in rows], dtype=pl.Int64)
    }
    for name in group:
        data[name] = pl.Series(name, [_number(r.get(name)) for r in rows], dtype=pl.Float64)
    return pl.DataFrame(data).unique("_step", keep="first", maintain_order=True)


def _number(value: Any) -> float | None:
    """A history value as a float; NaN/infinity arrive as strings; others are skipped."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return _NUMERIC_STRINGS.get(value)
    return None


def parse_wandb_time(value: Any) -> datetime | None:
    """A createdAt/heartbeatAt value (no zone means UTC) as an aware UTC datetime."""
    if value in (None, ""):
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def format_wandb_time(moment: datetime) -> str:
    """A time as WandB writes it (UTC, whole seconds, no zone); naive means UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(WANDB_TIME_FORMAT)


def _iso(moment: datetime | None) -> str | None:
    return format_wandb_time(moment) if moment is not None else None


def _export_marker(complete: bool | None) -> str:
    """The fingerprint's last part: `export` (complete), `live` (incomplete: scan_history
    data), `unread` (not known yet). Each step changes the fingerprint, so a run read live
    and later exported is refreshed again, however the steps interleave with listings."""
    return {True: "export", False: "live", None: "unread"}[complete]


def _cache_key(state: str, heartbeat_raw: Any) -> str:
    return f"{state}:{heartbeat_raw}"


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "state.json"
    try:
        state = read_json(path)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _update_state(run_dir: Path, **changes: Any) -> None:
    state = _read_state(run_dir)
    if "key" in changes and changes["key"] != state.get("key"):
        # data cached for another (state, heartbeat) is stale; run files are immutable
        state = {"files": state.get("files") or {}, "run_id": state.get("run_id")}
    state.update(changes)
    write_json(state, run_dir / "state.json")


def _current_export(run_dir: Path, state: Mapping[str, Any], key: str) -> Path | None:
    if state.get("key") != key or not state.get("export_complete") or not state.get("export_dir"):
        return None
    path = run_dir / str(state["export_dir"])
    return path if path.is_dir() and any(path.glob("*.parquet")) else None


def _remove_stale(run_dir: Path) -> None:
    """Delete exports and scan results the state file no longer refers to."""
    state = _read_state(run_dir)
    keep = {state.get("export_dir"), *(state.get("live") or {}).values()}
    for entry in run_dir.iterdir():
        if entry.name.startswith(("export-", "live-")) and entry.name not in keep:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _describe(exc: BaseException) -> str:
    """One bounded line for an error message, with the API key masked just in case."""
    text = str(exc) if isinstance(exc, RunReadError) else f"{type(exc).__name__}: {exc}"
    key = os.environ.get(ENV_API_KEY, "").strip()
    if key:
        text = text.replace(key, "***")
    return " ".join(text.split())[:500]
