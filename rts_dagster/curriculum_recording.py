"""Record the per-completion stream LP is fed, by wrapping Metta's curriculum object.

`RecordingCurriculum(curriculum, recorder, agent_step=...)` behaves like `curriculum`
(every call, attribute read, write and exception passes through; `isinstance` sees the
wrapped class) and, at exactly one point -- its own `update_task_performance(task_id,
score)`, the call that feeds LP -- records (label, score, agent_step(), epoch(), task_id)
with a `RewardStreamRecorder` before calling through. Nothing in Metta changes: the
training script wraps the curriculum before handing it to the environments.

Why that one point: Metta's `CurriculumEnv.step` calls `task.complete(score)` and then
`curriculum.update_task_performance(task_id, score)`. Tasks are built by the wrapped
curriculum and hold no reference to the wrapper, so whatever `complete()` does inside
(even feeding LP itself) never reaches the wrapper; and a call that re-enters the wrapper
while it is already inside `update_task_performance` (same thread) is passed through
without recording. One completion, one row.

Vectorised environments copy the curriculum into worker processes (each keeps its own LP
state). A copy notices it runs in another process and opens its own recorder in the same
directory with a worker id of its own (`CHILD_WORKER_BASE + rank * 1000 + k`, k claimed
atomically with a hidden claim file), so copies never overwrite each other's chunks and
never flush records buffered by their parent. See docs/recording_in_metta.md.

Recording never breaks training: any failure (label lookup, agent_step callable,
recorder, disk) is logged once as a warning and the call passes through unchanged.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from multiprocessing import util
from pathlib import Path
from typing import Any

from rts_dagster.recorder import RewardStreamRecorder, list_chunks

logger = logging.getLogger(__name__)

UNKNOWN_LABEL = "unknown"
CHILD_WORKER_BASE = 1_000_000  # worker ids of process copies start here
WORKERS_PER_RANK = 1000  # process copies per parent recorder worker id
LABEL_CACHE_SIZE = 200_000  # task ids whose label is remembered from get_task()
SILENT_HANDOUTS = 10_000  # tasks handed out with nothing recorded before a warning

# Attributes that live on the wrapper itself; everything else goes to the curriculum.
_OWN = (
    "_rc_inner",
    "_rc_agent_step",
    "_rc_epoch",
    "_rc_recorder",
    "_rc_recorder_config",
    "_rc_pid",
    "_rc_labels",
    "_rc_lock",
    "_rc_local",
    "_rc_warned",
    "_rc_counts",
)


class TrainerClock:
    """The trainer's (agent_step, epoch) in a 16-byte memory-mapped file, readable from
    every process on the host.

    Environment worker processes hold copies of the curriculum, so a closure over the
    trainer's state would read a stale copy there. A clock pickles as its file path, so it
    reaches spawned and forked workers alike. Pass `clock.agent_step` and `clock.epoch` to
    `RecordingCurriculum` and call `clock.set(agent_step, epoch)` from the training loop
    (once per rollout is enough: that is the resolution of `agent_step` anyway).
    """

    def __init__(self, agent_step: int = 0, epoch: int = -1, path: str | Path | None = None):
        if path is None:
            fd, name = tempfile.mkstemp(prefix="rts-trainer-clock-", suffix=".bin")
            os.close(fd)
            path = name
        self.path = str(path)
        with open(self.path, "wb") as handle:
            handle.write(struct.pack("<qq", int(agent_step), int(epoch)))
        self._attach()

    def _attach(self) -> None:
        with open(self.path, "r+b") as handle:
            self._map = mmap.mmap(handle.fileno(), 16)
        self._values = memoryview(self._map).cast("q")

    def __getstate__(self) -> dict[str, str]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.path = state["path"]
        self._attach()

    def set(self, agent_step: int, epoch: int = -1) -> None:
        """Publish the trainer's current agent step and epoch."""
        self._values[0] = int(agent_step)
        self._values[1] = int(epoch)

    def agent_step(self) -> int:
        """The last published agent step."""
        return int(self._values[0])

    def epoch(self) -> int:
        """The last published epoch (-1 until set)."""
        return int(self._values[1])

    def remove(self) -> None:
        """Delete the clock's file (after training; copies keep their mapping)."""
        Path(self.path).unlink(missing_ok=True)


def task_id_of(task: Any) -> int:
    """The id of a curriculum task: `get_id()` if it has one, else `_task_id`."""
    getter = getattr(task, "get_id", None)
    return int(getter() if callable(getter) else task._task_id)


def task_label_of(task: Any) -> str | None:
    """The curriculum label of a task (`task.get_env_cfg().label`), None if it has none."""
    label = getattr(task.get_env_cfg(), "label", None)
    return label if isinstance(label, str) else None


class RecordingCurriculum:
    """Metta's curriculum, unchanged, plus one recorded row per LP update.

    `agent_step` (required) and `epoch` (optional) are called at each recorded completion;
    in vectorised training pass `TrainerClock` methods (see there). `close()` flushes the
    recorder and, if the recorder owns a WandB run, registers every chunk in its directory
    (those of worker processes too), then calls the curriculum's own `close` if it has one.
    """

    def __init__(
        self,
        curriculum: Any,
        recorder: RewardStreamRecorder,
        agent_step: Callable[[], int],
        epoch: Callable[[], int] | None = None,
    ) -> None:
        own = object.__setattr__
        own(self, "_rc_inner", curriculum)
        own(self, "_rc_agent_step", agent_step)
        own(self, "_rc_epoch", epoch)
        own(self, "_rc_recorder", recorder)
        own(
            self,
            "_rc_recorder_config",
            {
                "directory": str(recorder.base_dir),
                "worker": int(recorder.worker),
                "flush_every": int(recorder.flush_every),
                "flush_seconds": recorder.flush_seconds,
            },
        )
        own(self, "_rc_pid", os.getpid())
        own(self, "_rc_labels", {})
        own(self, "_rc_lock", threading.Lock())
        own(self, "_rc_local", threading.local())
        own(self, "_rc_warned", set())
        own(self, "_rc_counts", _zero_counts())

    # --- the two intercepted calls ---------------------------------------------------------
    def get_task(self, *args: Any, **kwargs: Any) -> Any:
        """The curriculum's `get_task`, unchanged; the task's label is remembered by id."""
        task = self._rc_inner.get_task(*args, **kwargs)
        try:
            self._remember(task)
        except Exception as exc:  # never let bookkeeping break training
            self._warn_once("remember", f"could not read the label of a handed-out task: {exc!r}")
        return task

    def update_task_performance(self, task_id: Any, score: Any, *args: Any, **kwargs: Any) -> Any:
        """Record (label, score, agent_step, epoch, task_id), then call the curriculum's
        `update_task_performance` with the same arguments and return its result."""
        local = self._rc_local
        if getattr(local, "inside", False):  # re-entered from the curriculum: one row only
            return self._rc_inner.update_task_performance(task_id, score, *args, **kwargs)
        local.inside = True
        try:
            self._record(task_id, score)
            return self._rc_inner.update_task_performance(task_id, score, *args, **kwargs)
        finally:
            local.inside = False

    def close(self, *args: Any, **kwargs: Any) -> Any:
        """Flush this process's recorder (register chunks with the run when it owns one),
        then call the curriculum's own `close` if it has one."""
        recorder = self._rc_recorder if self._rc_pid == os.getpid() else None
        if recorder is not None:
            try:
                with self._rc_lock:
                    recorder.close()
                    if recorder.run is not None:
                        _register_other_chunks(recorder)
            except Exception as exc:
                self._warn_once("close", f"could not flush the reward stream: {exc!r}")
        counts = self._rc_counts
        if counts["recorded"] == 0 and counts["handed_out"] > 0:
            self._warn_once(
                "silent",
                f"{counts['handed_out']} tasks handed out but no update_task_performance call "
                "reached the wrapper: do the environments hold the unwrapped curriculum?",
            )
        inner_close = getattr(self._rc_inner, "close", None)
        return inner_close(*args, **kwargs) if callable(inner_close) else None

    # --- introspection (names chosen not to shadow the curriculum's) ---------------------
    @property
    def recording_counts(self) -> dict[str, int]:
        """Completions recorded / failed / recorded with the fallback label, tasks handed
        out, in this process."""
        return dict(self._rc_counts)

    @property
    def recording_wrapped(self) -> Any:
        """The wrapped curriculum itself."""
        return self._rc_inner

    # --- delegation -------------------------------------------------------------------------
    @property  # type: ignore[misc]
    def __class__(self) -> type:  # so that isinstance(wrapper, Curriculum) holds
        return type(self._rc_inner)

    def __getattr__(self, name: str) -> Any:
        if name in _OWN:  # not set yet (mid-unpickling): never recurse into the inner object
            raise AttributeError(name)
        return getattr(self._rc_inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._rc_inner, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._rc_inner, name)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self._rc_inner)) | {"recording_counts", "recording_wrapped"})

    def __repr__(self) -> str:
        return f"RecordingCurriculum({self._rc_inner!r})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A copy (pickled to a spawned worker) carries no recorder: it opens its own.
        state = {
            "curriculum": self._rc_inner,
            "agent_step": self._rc_agent_step,
            "epoch": self._rc_epoch,
            "recorder_config": self._rc_recorder_config,
            "labels": dict(self._rc_labels),
        }
        return (_rebuild, (state,))

    # --- internals --------------------------------------------------------------------------
    def _remember(self, task: Any) -> None:
        labels = self._rc_labels
        counts = self._rc_counts
        counts["handed_out"] += 1
        labels[task_id_of(task)] = task_label_of(task)
        if len(labels) > LABEL_CACHE_SIZE:
            del labels[next(iter(labels))]
        if counts["handed_out"] == SILENT_HANDOUTS and counts["recorded"] == 0:
            self._warn_once(
                "silent",
                f"{SILENT_HANDOUTS} tasks handed out but no update_task_performance call "
                "reached the wrapper: do the environments hold the unwrapped curriculum?",
            )

    def _label(self, task_id: int) -> str | None:
        if task_id in self._rc_labels and self._rc_labels[task_id] is not None:
            return self._rc_labels[task_id]
        tasks = getattr(self._rc_inner, "_tasks", None)
        task = tasks.get(task_id) if isinstance(tasks, dict) else None
        return task_label_of(task) if task is not None else None

    def _record(self, task_id: Any, score: Any) -> None:
        pid = os.getpid()
        if self._rc_pid != pid:  # a process copy: an inherited lock may be held forever
            if f"open:{pid}" in self._rc_warned:  # opening failed here before: do not retry
                self._rc_counts["failed"] += 1
                return
            object.__setattr__(self, "_rc_lock", threading.Lock())
        try:
            with self._rc_lock:
                recorder = self._process_recorder()  # may start this process's counts afresh
        except Exception as exc:
            self._rc_counts["failed"] += 1
            self._warn_once(f"open:{pid}", f"could not open a recorder in process {pid} ({exc!r})")
            return
        counts = self._rc_counts
        try:
            tid = int(task_id)
            label = self._label(tid)
            if label is None:
                label = UNKNOWN_LABEL
                counts["unknown_label"] += 1
                self._warn_once(
                    "unknown",
                    f"task {tid} has no known label (not handed out by this wrapper, not in "
                    f"the curriculum's pool): recorded as {UNKNOWN_LABEL!r}; later ones silently",
                )
            step = int(self._rc_agent_step())
            epoch = int(self._rc_epoch()) if self._rc_epoch is not None else -1
            reward = float(score)
            with self._rc_lock:
                recorder.record(label, reward, step, epoch=epoch, task_id=tid)
            counts["recorded"] += 1
        except Exception as exc:
            counts["failed"] += 1
            self._warn_once(
                "record",
                f"recording a completion failed ({exc!r}); training goes on, this and later "
                "failures are counted in recording_counts['failed']",
            )

    def _process_recorder(self) -> RewardStreamRecorder:
        """This process's recorder: the given one in the owner process, else a new one with
        a claimed worker id (an inherited recorder and its buffer are never used)."""
        pid = os.getpid()
        if self._rc_recorder is not None and self._rc_pid == pid:
            return self._rc_recorder
        config = self._rc_recorder_config
        worker = _claim_worker(Path(config["directory"]), int(config["worker"]))
        recorder = RewardStreamRecorder(
            config["directory"],
            worker=worker,
            flush_every=config["flush_every"],
            flush_seconds=config["flush_seconds"],
        )
        object.__setattr__(self, "_rc_recorder", recorder)
        object.__setattr__(self, "_rc_pid", pid)
        object.__setattr__(self, "_rc_counts", _zero_counts())
        # Runs when a multiprocessing worker exits normally (also for forked workers,
        # whose atexit handlers never run); a killed worker loses its buffer.
        util.Finalize(self, recorder.close, exitpriority=10)
        return recorder

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._rc_warned:
            self._rc_warned.add(key)
            logger.warning("RecordingCurriculum: %s", message)


def _rebuild(state: dict[str, Any]) -> RecordingCurriculum:
    """Unpickle a copy: same curriculum and callables, no recorder until it records."""
    copy = object.__new__(RecordingCurriculum)
    own = object.__setattr__
    own(copy, "_rc_inner", state["curriculum"])
    own(copy, "_rc_agent_step", state["agent_step"])
    own(copy, "_rc_epoch", state["epoch"])
    own(copy, "_rc_recorder", None)
    own(copy, "_rc_recorder_config", state["recorder_config"])
    own(copy, "_rc_pid", None)
    own(copy, "_rc_labels", state["labels"])
    own(copy, "_rc_lock", threading.Lock())
    own(copy, "_rc_local", threading.local())
    own(copy, "_rc_warned", set())
    own(copy, "_rc_counts", _zero_counts())
    return copy


def _claim_worker(directory: Path, parent_worker: int) -> int:
    """Claim the lowest free worker id for a process copy of `parent_worker`'s wrapper by
    creating a hidden claim file exclusively (readers ignore names that are not chunks)."""
    stream = directory / "reward_stream"
    stream.mkdir(parents=True, exist_ok=True)
    first = CHILD_WORKER_BASE + parent_worker * WORKERS_PER_RANK
    for worker in range(first + 1, first + WORKERS_PER_RANK):
        try:
            fd = os.open(stream / f".claim-w{worker}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return worker
    raise RuntimeError(f"no free worker id for copies of worker {parent_worker} in {stream}")


def _register_other_chunks(recorder: RewardStreamRecorder) -> list[Path]:
    """`run.save` the chunks in the recorder's directory that it did not write itself
    (those of worker processes, which have no handle on the run)."""
    own = {str(path) for path in recorder.chunks}
    others = [chunk for chunk in list_chunks(recorder.base_dir) if str(chunk) not in own]
    for chunk in others:
        recorder.run.save(str(chunk), base_path=str(recorder.base_dir), policy="now")
    return others


def _zero_counts() -> dict[str, int]:
    return {"recorded": 0, "failed": 0, "unknown_label": 0, "handed_out": 0}
