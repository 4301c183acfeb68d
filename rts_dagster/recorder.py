"""Per-completion reward stream recorder for training jobs.

A training process calls `RewardStreamRecorder.record(...)` once per finished episode (or
`record_many(...)` with arrays). Completions are buffered in memory and flushed as parquet
chunk files `reward_stream/part-w<worker:04d>-<seq:06d>.parquet` inside the WandB run's
files directory (`run.dir`), so they travel with the run as run files instead of as
history rows. Format and rationale: docs/reward_stream_format.md.

This module imports no wandb: a training job pays for numpy and pyarrow (which writes the
chunks) and polars (which reads them back).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from rts_dagster.schema import COMPLETION_RECORD

# COMPLETION_RECORD as arrow types (the writer's; `test_recorder` checks they agree)
_ARROW_TYPES = {
    "completion_index": pa.int64(),
    "worker": pa.int32(),
    "label": pa.large_string(),
    "task_id": pa.int64(),
    "reward": pa.float64(),
    "agent_step": pa.int64(),
    "epoch": pa.int64(),
    "wall_time": pa.float64(),
}

STREAM_DIRNAME = "reward_stream"
SUMMARY_KEY = "reward_stream/completions_recorded"
_CHUNK_RE = re.compile(r"^part-w(\d{4,})-(\d{6,})\.parquet$")


def chunk_name(worker: int, seq: int) -> str:
    """File name of chunk `seq` of `worker`."""
    return f"part-w{worker:04d}-{seq:06d}.parquet"


def stream_dir(path: str | Path) -> Path:
    """The `reward_stream` directory for a run files dir, a run folder or the dir itself."""
    path = Path(path)
    if path.name == STREAM_DIRNAME:
        return path
    if (path / "files" / STREAM_DIRNAME).is_dir():  # a wandb run folder
        return path / "files" / STREAM_DIRNAME
    return path / STREAM_DIRNAME


def list_chunks(path: str | Path, worker: int | None = None) -> list[Path]:
    """Chunk files under `path` (see `stream_dir`), sorted by (worker, seq)."""
    directory = stream_dir(path)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _CHUNK_RE.match(entry.name)
        if match and (worker is None or int(match.group(1)) == worker):
            found.append((int(match.group(1)), int(match.group(2)), entry))
    return [entry for _, _, entry in sorted(found)]


def read_reward_stream(path: str | Path) -> pl.DataFrame:
    """All chunks under `path` as one COMPLETION_RECORD frame, sorted by (worker, index)."""
    chunks = list_chunks(path)
    if not chunks:
        return pl.DataFrame(schema=COMPLETION_RECORD)
    frame = pl.concat([pl.read_parquet(chunk) for chunk in chunks])
    frame = frame.select(pl.col(n).cast(t) for n, t in COMPLETION_RECORD.items())
    return frame.sort("worker", "completion_index")


def save_reward_stream_files(run: Any) -> list[Path]:
    """`run.save` every chunk in `run.dir/reward_stream`, e.g. chunks written by other
    processes of the job that have no handle on the run. Call it before `run.finish()`."""
    chunks = list_chunks(run.dir)
    for chunk in chunks:
        run.save(str(chunk), base_path=str(run.dir), policy="now")
    return chunks


class RewardStreamRecorder:
    """Buffer episode completions and flush them as parquet chunks.

    Give either `run` (a wandb Run: chunks go to `run.dir/reward_stream/` and are
    registered with `run.save(..., policy="now")`) or `directory` (chunks go to
    `directory/reward_stream/`; no wandb needed). With neither, the active `wandb.run` is
    used if wandb is imported and a run is active.

    A flush happens when `flush_every` completions are buffered, when `flush_seconds`
    have passed since the last flush (checked on each record call), and on `close()`.
    `worker` must be unique per recording process within the run. If chunks of this
    worker already exist in the directory (a resumed run), numbering continues after them.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        run: Any = None,
        worker: int = 0,
        flush_every: int = 50_000,
        flush_seconds: float | None = 600.0,
        log_summary: bool = True,
        start_index: int | None = None,
    ) -> None:
        if run is None and directory is None:
            wandb = sys.modules.get("wandb")
            run = getattr(wandb, "run", None) if wandb is not None else None
            if run is None:
                raise ValueError("give a wandb run or a directory (no active wandb run)")
        if not 0 <= worker <= 2**31 - 1:
            raise ValueError(f"worker must fit an int32 >= 0, got {worker}")
        if flush_every < 1:
            raise ValueError("flush_every must be >= 1")
        self.run = run
        base = Path(run.dir) if directory is None else Path(directory)
        self.base_dir = base
        self.directory = base / STREAM_DIRNAME
        self.directory.mkdir(parents=True, exist_ok=True)
        self.worker = int(worker)
        self.flush_every = int(flush_every)
        self.flush_seconds = flush_seconds
        self.log_summary = log_summary
        self.chunks: list[Path] = []
        self._closed = False
        self._seq, next_index = self._resume_point()
        self._next_index = next_index if start_index is None else int(start_index)
        self._flushed = 0
        self._clear()
        self._last_flush = time.time()

    # --- recording ----------------------------------------------------------------------
    def record(
        self,
        label: str,
        reward: float,
        agent_step: int,
        epoch: int = -1,
        task_id: int = -1,
        wall_time: float | None = None,
    ) -> None:
        """Record one finished episode. `wall_time` defaults to now (Unix seconds)."""
        if self._closed:
            raise RuntimeError("recorder is closed")
        now = time.time()
        self._labels.append(str(label))
        self._rewards.append(float(reward))
        self._agent_steps.append(int(agent_step))
        self._epochs.append(int(epoch))
        self._task_ids.append(int(task_id))
        self._wall_times.append(now if wall_time is None else float(wall_time))
        if len(self._labels) >= self.flush_every or self._due(now):
            self.flush()

    def record_many(
        self,
        labels: Sequence[str] | np.ndarray | str,
        rewards: Sequence[float] | np.ndarray,
        agent_steps: Sequence[int] | np.ndarray | int,
        epochs: Sequence[int] | np.ndarray | int = -1,
        task_ids: Sequence[int] | np.ndarray | int = -1,
        wall_times: Sequence[float] | np.ndarray | float | None = None,
    ) -> None:
        """Record several episodes in completion order; scalars are broadcast."""
        if self._closed:
            raise RuntimeError("recorder is closed")
        now = time.time()
        rewards_arr = np.asarray(rewards, dtype=np.float64).reshape(-1)
        n = rewards_arr.size
        if isinstance(labels, str):
            label_list = [labels] * n
        else:
            label_list = [str(label) for label in np.asarray(labels, dtype=object).tolist()]
        columns = {
            "agent_steps": _broadcast(agent_steps, n, np.int64),
            "epochs": _broadcast(epochs, n, np.int64),
            "task_ids": _broadcast(task_ids, n, np.int64),
            "wall_times": _broadcast(now if wall_times is None else wall_times, n, np.float64),
        }
        if len(label_list) != n:
            raise ValueError(f"{len(label_list)} labels for {n} rewards")
        self._labels.extend(label_list)
        self._rewards.extend(rewards_arr.tolist())
        self._agent_steps.extend(columns["agent_steps"].tolist())
        self._epochs.extend(columns["epochs"].tolist())
        self._task_ids.extend(columns["task_ids"].tolist())
        self._wall_times.extend(columns["wall_times"].tolist())
        if len(self._labels) >= self.flush_every or self._due(now):
            self.flush()

    # --- flushing -----------------------------------------------------------------------
    def flush(self) -> Path | None:
        """Write the buffered completions as one chunk; return its path (None if empty)."""
        n = len(self._labels)
        if n == 0:
            self._last_flush = time.time()
            return None
        # pyarrow, not polars: polars hangs in a worker forked after the parent used it
        # (vectorised env workers are often forked), pyarrow does not.
        columns = {
            "completion_index": np.arange(self._next_index, self._next_index + n, dtype=np.int64),
            "worker": np.full(n, self.worker, dtype=np.int32),
            "label": self._labels,
            "task_id": np.asarray(self._task_ids, dtype=np.int64),
            "reward": np.asarray(self._rewards, dtype=np.float64),
            "agent_step": np.asarray(self._agent_steps, dtype=np.int64),
            "epoch": np.asarray(self._epochs, dtype=np.int64),
            "wall_time": np.asarray(self._wall_times, dtype=np.float64),
        }
        table = pa.table(
            {name: pa.array(columns[name], type=_ARROW_TYPES[name]) for name in columns}
        )
        path = self.directory / chunk_name(self.worker, self._seq)
        # Readers (and wandb's uploader) must never see a half-written chunk: write a
        # hidden temp file in the same directory, then rename it into place atomically.
        tmp = self.directory / f".{path.name}.{os.getpid()}.tmp"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.chunks.append(path)
        self._seq += 1
        self._next_index += n
        self._flushed += n
        self._clear()
        self._last_flush = time.time()
        if self.run is not None:
            # Chunks are immutable once renamed: "now" uploads each exactly once.
            self.run.save(str(path), base_path=str(self.base_dir), policy="now")
            if self.log_summary:
                self.run.summary[SUMMARY_KEY] = self._flushed
        return path

    def close(self) -> None:
        """Flush what is buffered; later record calls raise. Idempotent."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> RewardStreamRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- introspection ------------------------------------------------------------------
    @property
    def n_buffered(self) -> int:
        """Completions recorded but not yet flushed."""
        return len(self._labels)

    @property
    def n_recorded(self) -> int:
        """Completions recorded by this recorder (flushed or buffered)."""
        return self._flushed + len(self._labels)

    # --- internals ----------------------------------------------------------------------
    def _clear(self) -> None:
        self._labels: list[str] = []
        self._rewards: list[float] = []
        self._agent_steps: list[int] = []
        self._epochs: list[int] = []
        self._task_ids: list[int] = []
        self._wall_times: list[float] = []

    def _due(self, now: float) -> bool:
        return self.flush_seconds is not None and now - self._last_flush >= self.flush_seconds

    def _resume_point(self) -> tuple[int, int]:
        """(next seq, next completion_index) after this worker's existing chunks."""
        existing = list_chunks(self.directory, worker=self.worker)
        if not existing:
            return 0, 0
        last = existing[-1]
        seq = int(_CHUNK_RE.match(last.name).group(2)) + 1  # type: ignore[union-attr]
        top = pl.read_parquet(last, columns=["completion_index"])["completion_index"].max()
        return seq, (int(top) + 1 if top is not None else 0)


def _broadcast(values: Any, n: int, dtype: type) -> np.ndarray:
    array = np.asarray(values, dtype=dtype).reshape(-1)
    if array.size == 1 and n != 1:
        return np.full(n, array[0], dtype=dtype)
    if array.size != n:
        raise ValueError(f"expected {n} values, got {array.size}")
    return array
