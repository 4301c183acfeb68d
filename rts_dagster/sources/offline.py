"""`OfflineRunSource`: the runs of a directory tree of offline WandB run folders.

Finds every `run-*.wandb` file under a root (typically `<dir>/wandb/offline-run-<time>-<id>/`
or `run-<time>-<id>/`), reads it with `wandb_file` and the run's per-completion stream from
`<run folder>/files/reward_stream/` (written by `RewardStreamRecorder`). A file that cannot
be read is reported as an `UnreadableRun` with its path and why; it never stops the others.
So is anything that looks like a run but is not one: a `run-*.wandb` that is not a regular
file (a FIFO would block the reader forever, a link to `/dev/zero` would be read until memory
runs out), a file larger than the size sanity limit, a file cut before its run record, and
a run folder (`run-*` / `offline-run-*`) holding no `run-*.wandb` file.

Polling (`updated_since`): a file is listed when it *arrived or changed* since then, i.e.
its mtime or its ctime (inode change time: set by the copy or move that brought the file
in, even when `cp -a` / `rsync -a` keep the mtime). A run whose last logged time is older
than `updated_since` but whose file arrived after it is flagged `extra["late_data"]`, so
the sensor takes it although the run's own clock is old.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from rts_dagster.recorder import list_chunks
from rts_dagster.schema import COMPLETION_RECORD, conform
from rts_dagster.sources.base import RunReadError, RunRecord, UnreadableRun
from rts_dagster.sources.wandb_file import (
    DEFAULT_RUNNING_GRACE_S,
    RunFile,
    read_run_file,
    run_state,
    scan_run_file,
)
from rts_dagster.storage import read_json, write_json

SOURCE_NAME = "offline"
_SCAN_CACHE_VERSION = 1
_SCAN_DATES = ("start_time", "last_timestamp")


def _scan_to_json(scan: RunFile) -> dict:
    out = {k: v for k, v in vars(scan).items() if k != "history"}
    out["tags"] = list(scan.tags)
    for name in _SCAN_DATES:
        value = out[name]
        out[name] = value.isoformat() if value is not None else None
    return out


def _scan_from_json(data: dict) -> RunFile:
    data = dict(data)
    data["tags"] = tuple(data["tags"])
    for name in _SCAN_DATES:
        if data[name] is not None:
            data[name] = datetime.fromisoformat(data[name])
    return RunFile(**data)


def _load_scans(path: Path) -> dict[str, tuple[int, int, RunFile]]:
    """The scans a previous process saved (`OfflineRunSource(scan_cache=...)`); nothing if
    the file is missing, of another version or unreadable (it is only a cache)."""
    try:
        saved = read_json(path)
        if saved.get("version") != _SCAN_CACHE_VERSION:
            return {}
        return {
            key: (int(size), int(mtime), _scan_from_json(scan))
            for key, (size, mtime, scan) in saved["scans"].items()
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


# The biggest file taken for a run file: a long real run is a few GB; anything far above
# is not a wandb log (a sparse file, a disk image renamed...) and would take hours.
MAX_RUN_FILE_BYTES = 64 << 30


def _is_run_file_name(name: str) -> bool:
    return name.startswith("run-") and name.endswith(".wandb")


def _is_run_dir_name(name: str) -> bool:
    """wandb's run folder names: `run-<time>-<id>` and `offline-run-<time>-<id>`."""
    return (name.startswith(("run-", "offline-run-"))) and not name.endswith(".wandb")


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((word for test, word in kinds if test(mode)), "not a regular file")


class OfflineRunSource:
    """A `RunSource` over the `.wandb` files found (recursively) under `root`.

    Scans are cached in memory by (path, size, mtime): repeated `list_runs` calls only
    re-read files that changed. With `scan_cache` (a JSON file; the Dagster resource uses
    `$RTS_DATA_DIR/cache/offline_scans.json`) the cache outlives the process: each Dagster
    run is a new process, and a full scan checks every CRC of every file (~9 ms for a
    small run, 1,000 runs ~9 s). The state of a run without an exit record is recomputed
    at every call ("running" until the file has been quiet for `running_grace_s`).
    """

    name = SOURCE_NAME

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        running_grace_s: float = DEFAULT_RUNNING_GRACE_S,
        max_file_bytes: int = MAX_RUN_FILE_BYTES,
        scan_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.running_grace_s = running_grace_s
        self.max_file_bytes = max_file_bytes
        self._cache: dict[str, tuple[int, int, RunFile | RunReadError]] = {}
        self._lock = threading.Lock()
        self._scan_cache = Path(scan_cache) if scan_cache is not None else None
        self._scans_added = False
        if self._scan_cache is not None:
            self._cache.update(_load_scans(self._scan_cache))

    def run_files(self) -> list[Path]:
        """Every path named `run-*.wandb` under the root (files, and anything else so
        named: `list_runs` says why it is not a run), sorted. Symlinked folders such as
        wandb's `latest-run` are not followed, so no run is listed twice."""
        return sorted(self._walk()[0])

    def _walk(self) -> tuple[list[Path], list[Path]]:
        """(paths named `run-*.wandb`, run folders holding no `run-*.wandb` file)."""
        if not self.root.is_dir():
            return [], []
        found: list[Path] = []
        empty: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            here = [Path(dirpath, n) for n in (*filenames, *dirnames) if _is_run_file_name(n)]
            found.extend(here)
            folder = Path(dirpath)
            if folder != self.root and _is_run_dir_name(folder.name) and not here:
                empty.append(folder)
        return found, empty

    def list_runs(
        self, updated_since: datetime | None = None
    ) -> tuple[list[RunRecord], list[UnreadableRun]]:
        """Every readable run, and everything that looks like a run but could not be read
        (with its path and why). `updated_since` skips files that neither changed nor
        arrived since then (cheap: a stat per file); an arrival with an older last
        logged time is flagged `extra["late_data"]`."""
        runs: list[RunRecord] = []
        unreadable: list[UnreadableRun] = []
        cutoff_ns = int(updated_since.timestamp() * 1e9) if updated_since else None
        paths, empty = self._walk()
        self._forget_gone(paths)
        for path in sorted(paths):
            try:
                st = path.stat()  # follows a link: what would be read
                if cutoff_ns is not None and max(st.st_mtime_ns, st.st_ctime_ns) < cutoff_ns:
                    continue
                self._check_file(path, st)
                record = self._record(path)
                beat = record.heartbeat_at
                if updated_since is not None and beat is not None and beat < updated_since:
                    record.extra["late_data"] = True  # arrived after its own clock
                runs.append(record)
            except Exception as exc:  # a corrupt or vanished file must not stop the others
                unreadable.append(UnreadableRun(str(path), _describe(exc), SOURCE_NAME))
        for folder in sorted(empty):
            try:
                st = folder.stat()
            except OSError:
                continue  # gone meanwhile
            if cutoff_ns is None or max(st.st_mtime_ns, st.st_ctime_ns) >= cutoff_ns:
                reason = (
                    f"{folder}: run folder without a run-*.wandb file (empty, or not written yet)"
                )
                unreadable.append(UnreadableRun(str(folder), reason, SOURCE_NAME))
        self._save_scans()
        return runs, unreadable

    def _forget_gone(self, paths: list[Path]) -> None:
        """Drop the scans of files under the root that are gone, so the saved cache does not
        grow with every run ever seen (other roots' entries in a shared cache are kept)."""
        here = {str(p) for p in paths}
        root = str(self.root)
        with self._lock:
            gone = [k for k in self._cache if Path(k).is_relative_to(root) and k not in here]
            for key in gone:
                del self._cache[key]
            self._scans_added = self._scans_added or bool(gone)

    def _save_scans(self) -> None:
        """Write the scan cache if a file was scanned anew (errors are not kept: a file
        that could not be read is tried again next time)."""
        if self._scan_cache is None or not self._scans_added:
            return
        with self._lock:
            entries = {
                key: [size, mtime, _scan_to_json(scan)]
                for key, (size, mtime, scan) in self._cache.items()
                if isinstance(scan, RunFile)
            }
            self._scans_added = False
        # a cache: a read-only data dir only makes the next scan slower
        with contextlib.suppress(OSError):
            write_json({"version": _SCAN_CACHE_VERSION, "scans": entries}, self._scan_cache)

    def _check_file(self, path: Path, st: os.stat_result) -> None:
        """Raise `RunReadError` unless `path` is a regular file of a sane size."""
        if not stat.S_ISREG(st.st_mode):
            raise RunReadError(f"{path}: {_file_kind(st.st_mode)}, not a run file: not read")
        if st.st_size > self.max_file_bytes:
            raise RunReadError(
                f"{path}: {st.st_size} bytes, above the {self.max_file_bytes}-byte sanity "
                "limit for a run file: not read"
            )

    def get_run(self, location: str) -> RunRecord:
        """The current record of the run file at `location`."""
        try:
            path = Path(location)
            self._check_file(path, path.stat())
            return self._record(path)
        except RunReadError:
            raise
        except Exception as exc:
            raise RunReadError(f"{location}: {_describe(exc)}") from exc

    def read_history(
        self, run: RunRecord, key_prefixes: Sequence[str] | None = None
    ) -> pl.DataFrame:
        """The run's wide history frame (see `wandb_file.read_run_file`)."""
        history = read_run_file(run.location, key_prefixes).history
        if history is None:  # read_run_file always decodes history; keeps type checkers calm
            raise RunReadError(f"{run.location}: no history decoded")
        return history

    def read_completions(self, run: RunRecord) -> pl.DataFrame | None:
        """The per-completion stream of the run (`COMPLETION_RECORD`, sorted by worker and
        completion_index), or None if the run folder has no `reward_stream` chunk."""
        chunks = list_chunks(Path(run.location).parent)
        if not chunks:
            return None
        frames = []
        for chunk in chunks:
            try:
                frames.append(conform(pl.read_parquet(chunk), COMPLETION_RECORD, str(chunk)))
            except Exception as exc:
                raise RunReadError(f"{chunk}: unreadable reward stream chunk ({exc})") from exc
        return pl.concat(frames).sort("worker", "completion_index")

    def data_fingerprint(self, run: RunRecord) -> str:
        """`run.fingerprint`: a run file's data is what its size and mtime say."""
        return run.fingerprint

    # --- internals ------------------------------------------------------------------------
    def _scan(self, path: Path) -> RunFile:
        """`scan_run_file`, cached by (size, mtime); errors are cached the same way."""
        key = str(path)
        st = path.stat()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            result = cached[2]
        else:
            try:
                result = scan_run_file(path, running_grace_s=self.running_grace_s)
            except RunReadError as exc:
                result = exc
            with self._lock:
                self._cache[key] = (st.st_size, st.st_mtime_ns, result)
                self._scans_added = True
        if isinstance(result, RunReadError):
            raise result
        return result

    def _record(self, path: Path) -> RunRecord:
        scan = self._scan(path)
        state = run_state(scan.exit_code, scan.mtime_ns, self.running_grace_s)
        if not scan.run_id:
            # Nothing says which run this is: listing it under a name guessed from the
            # file name would only get it ignored, with no word of the damage.
            why = "still being written?" if state == "running" else "truncated or damaged"
            raise RunReadError(
                f"{path}: the file ends before its run record ({scan.size} bytes, "
                f"{scan.num_history_rows} history rows; {why})"
            )
        mtime = datetime.fromtimestamp(scan.mtime_ns / 1e9, tz=UTC)
        run_id = scan.run_id
        return RunRecord(
            run_id=run_id,
            run_name=scan.display_name or run_id,
            project=scan.project,
            entity=scan.entity,
            tags=scan.tags,
            config=scan.config,
            state=state,
            created_at=scan.start_time,
            heartbeat_at=scan.last_timestamp or mtime,
            source=SOURCE_NAME,
            location=str(path),
            fingerprint=f"{scan.size}:{scan.mtime_ns}:{state}",
            extra={
                "run_dir": str(path.parent),
                "exit_code": scan.exit_code,
                "truncated": scan.truncated,
                "num_history_rows": scan.num_history_rows,
                "file_mtime": mtime,
            },
        )


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, RunReadError) else f"{type(exc).__name__}: {exc}"
