"""`OfflineRunSource`: the runs of a directory tree of offline WandB run folders.

Finds every `run-*.wandb` file under a root (typically `<dir>/wandb/offline-run-<time>-<id>/`
or `run-<time>-<id>/`), reads it with `wandb_file` and the run's per-completion stream from
`<run folder>/files/reward_stream/` (written by `RewardStreamRecorder`). A file that cannot
be read is reported as an `UnreadableRun`; it never stops the others.
"""

from __future__ import annotations

import os
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

SOURCE_NAME = "offline"


class OfflineRunSource:
    """A `RunSource` over the `.wandb` files found (recursively) under `root`.

    Scans are cached in memory by (path, size, mtime): repeated `list_runs` calls only
    re-read files that changed. The state of a run without an exit record is recomputed
    at every call ("running" until the file has been quiet for `running_grace_s`).
    """

    name = SOURCE_NAME

    def __init__(
        self, root: str | os.PathLike[str], *, running_grace_s: float = DEFAULT_RUNNING_GRACE_S
    ) -> None:
        self.root = Path(root)
        self.running_grace_s = running_grace_s
        self._cache: dict[str, tuple[int, int, RunFile | RunReadError]] = {}
        self._lock = threading.Lock()

    def run_files(self) -> list[Path]:
        """Every `run-*.wandb` file under the root, sorted (symlinked folders such as
        wandb's `latest-run` are not followed, so no run is listed twice)."""
        if not self.root.is_dir():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            found.extend(
                Path(dirpath, f) for f in filenames if f.startswith("run-") and f.endswith(".wandb")
            )
        return sorted(found)

    def list_runs(
        self, updated_since: datetime | None = None
    ) -> tuple[list[RunRecord], list[UnreadableRun]]:
        """Every readable run, and every run file that could not be read (with why).
        `updated_since` skips files not modified since then (cheap: a stat per file)."""
        runs: list[RunRecord] = []
        unreadable: list[UnreadableRun] = []
        cutoff_ns = int(updated_since.timestamp() * 1e9) if updated_since else None
        for path in self.run_files():
            try:
                if cutoff_ns is not None and path.stat().st_mtime_ns < cutoff_ns:
                    continue
                runs.append(self._record(path))
            except Exception as exc:  # a corrupt or vanished file must not stop the others
                unreadable.append(UnreadableRun(str(path), _describe(exc), SOURCE_NAME))
        return runs, unreadable

    def get_run(self, location: str) -> RunRecord:
        """The current record of the run file at `location`."""
        try:
            return self._record(Path(location))
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
        if isinstance(result, RunReadError):
            raise result
        return result

    def _record(self, path: Path) -> RunRecord:
        scan = self._scan(path)
        state = run_state(scan.exit_code, scan.mtime_ns, self.running_grace_s)
        mtime = datetime.fromtimestamp(scan.mtime_ns / 1e9, tz=UTC)
        run_id = scan.run_id or _id_from_name(path)
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


def _id_from_name(path: Path) -> str:
    """`run-<id>.wandb` -> `<id>` (for a file cut before its run record)."""
    return path.name.removeprefix("run-").removesuffix(".wandb")


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, RunReadError) else f"{type(exc).__name__}: {exc}"
