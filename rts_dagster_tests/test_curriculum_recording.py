"""RecordingCurriculum against a stand-in with Metta's curriculum method names and semantics.

The stand-in (written here, not Metta's code) mirrors what Metta's `CurriculumEnv` relies on:
`get_task()` hands out a task from a pool (`_tasks`, by id) with `get_id()` / `_task_id`,
`get_env_cfg().label` and `complete(score)`; `update_task_performance(task_id, score)` feeds
LP; `stats()`; tasks are evicted and replaced. The env loop below does what `CurriculumEnv.step`
does at an episode end: `task.complete(score)`, then `curriculum.update_task_performance(id,
score)`, then `get_task()` for the next episode.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydantic
import pytest

from rts_dagster.curriculum_recording import (
    CHILD_WORKER_BASE,
    UNKNOWN_LABEL,
    RecordingCurriculum,
    TrainerClock,
)
from rts_dagster.recorder import RewardStreamRecorder, list_chunks, read_reward_stream

LABELS = ("site.extractor_hub_30", "site.oxygen_bottleneck", "5x5_2chain_1sinks_dense")


@pytest.fixture(autouse=True)
def _clock_files_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TrainerClock() makes a temp file: keep it in the test's own directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


class StandInTask:
    """A curriculum task: id, env config with a label, completion bookkeeping."""

    def __init__(self, task_id: int, label: str, owner: StandInCurriculum) -> None:
        self._task_id = task_id
        self._env_cfg = SimpleNamespace(label=label, game=SimpleNamespace(max_steps=1000))
        self._owner = owner
        self._num_completions = 0

    def get_id(self) -> int:
        return self._task_id

    def get_env_cfg(self) -> Any:
        return self._env_cfg

    def complete(self, score: float) -> None:
        self._num_completions += 1
        if self._owner.feeds_lp_from_complete:  # a variant that feeds LP from complete()
            self._owner.update_task_performance(self._task_id, score)


class StandInCurriculum:
    """A pool of tasks sampled at random; every LP update is logged in `calls`."""

    def __init__(self, seed: int, pool: int = 6, evict_every: int = 0) -> None:
        self._rng = np.random.default_rng(seed)
        self._tasks: dict[int, StandInTask] = {}
        self._next_id = 100 * seed
        self.calls: list[tuple[int, float]] = []
        self.evict_every = evict_every
        self.feeds_lp_from_complete = False
        self.listener: Any = None  # something called back from inside the LP update
        self.num_active_tasks = pool
        self.closed = False
        self._handed_out = 0
        self._created = 0
        self._in_update = False
        for _ in range(pool):
            self._create()

    def _create(self) -> StandInTask:
        task = StandInTask(self._next_id, LABELS[self._next_id % len(LABELS)], self)
        self._tasks[task._task_id] = task
        self._next_id += 1
        self._created += 1
        return task

    def get_task(self) -> StandInTask:
        self._handed_out += 1
        if self.evict_every and self._handed_out % self.evict_every == 0:
            victim = min(self._tasks)
            del self._tasks[victim]  # a task out in an environment can still complete
            return self._create()
        ids = sorted(self._tasks)
        return self._tasks[ids[int(self._rng.integers(len(ids)))]]

    def update_task_performance(self, task_id: int, score: float) -> str:
        self.calls.append((int(task_id), float(score)))
        if self.listener is not None and not self._in_update:
            self._in_update = True
            try:
                self.listener.update_task_performance(task_id, score)
            finally:
                self._in_update = False
        return f"updated {task_id}"

    def stats(self) -> dict[str, float]:
        return {"num_created": float(self._created), "num_completed": float(len(self.calls))}

    def get_task_lp_score(self, task_id: int) -> float:
        return 0.5 if task_id in self._tasks else 0.0

    def explode(self) -> None:
        raise ValueError("curriculum says no")

    def close(self) -> str:
        self.closed = True
        return "inner closed"


def run_envs(
    curriculum: Any, n_envs: int, n_completions: int, seed: int, clock: TrainerClock | None
) -> list[tuple[str, float, int, int, int]]:
    """Metta's episode-end sequence on `n_envs` environments taking turns. Returns the
    reference rows (label, score, agent_step, epoch, task_id) in completion order."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.4, 0.3, n_completions)
    current = [curriculum.get_task() for _ in range(n_envs)]
    expected = []
    for i in range(n_completions):  # a loop over episodes of a fake env, not over data
        env = i % n_envs
        task = current[env]
        if clock is not None and i % 7 == 0:
            clock.set(1000 * (i + 1), i // 7)
        step = clock.agent_step() if clock is not None else -1
        epoch = clock.epoch() if clock is not None else -1
        expected.append((task.get_env_cfg().label, float(scores[i]), step, epoch, task.get_id()))
        task.complete(float(scores[i]))
        curriculum.update_task_performance(task._task_id, float(scores[i]))
        current[env] = curriculum.get_task()
    return expected


def rows(frame: Any) -> list[tuple[str, float, int, int, int]]:
    return list(frame.select("label", "reward", "agent_step", "epoch", "task_id").iter_rows())


def wrap(tmp_path: Path, inner: Any, clock: TrainerClock, **recorder_kwargs: Any) -> Any:
    recorder = RewardStreamRecorder(tmp_path, worker=0, **recorder_kwargs)
    return RecordingCurriculum(inner, recorder, agent_step=clock.agent_step, epoch=clock.epoch)


def test_every_call_and_attribute_passes_through(tmp_path: Path) -> None:
    inner = StandInCurriculum(seed=1)
    wrapper = wrap(tmp_path, inner, TrainerClock())
    task = wrapper.get_task()
    assert task is inner._tasks[task.get_id()]  # the task object itself, not a copy
    assert wrapper.update_task_performance(task.get_id(), 0.3) == f"updated {task.get_id()}"
    assert wrapper.stats() == {"num_created": 6.0, "num_completed": 1.0}
    assert wrapper.get_task_lp_score(task.get_id()) == 0.5
    assert wrapper._tasks is inner._tasks and wrapper.num_active_tasks == 6
    wrapper.num_active_tasks = 9
    wrapper.brand_new = "x"
    assert inner.num_active_tasks == 9 and inner.brand_new == "x"
    del wrapper.brand_new
    assert not hasattr(inner, "brand_new")
    with pytest.raises(ValueError, match="curriculum says no"):
        wrapper.explode()
    with pytest.raises(AttributeError):
        _ = wrapper.no_such_attribute
    # isinstance checks (e.g. Metta's pydantic validate_call on make_env_func) accept it
    assert isinstance(wrapper, StandInCurriculum)

    @pydantic.validate_call(config={"arbitrary_types_allowed": True})
    def make_env(curriculum: StandInCurriculum) -> Any:
        return curriculum

    assert make_env(wrapper) is wrapper
    assert wrapper.close() == "inner closed" and inner.closed


def test_exceptions_of_the_lp_update_propagate_unchanged(tmp_path: Path) -> None:
    inner = StandInCurriculum(seed=1)
    boom = KeyError("task 5 is gone")

    def failing_update(task_id: int, score: float) -> None:
        raise boom

    inner.update_task_performance = failing_update  # type: ignore[method-assign]
    wrapper = wrap(tmp_path, inner, TrainerClock())
    with pytest.raises(KeyError) as caught:
        wrapper.update_task_performance(inner.get_task().get_id(), 0.1)
    assert caught.value is boom


def test_records_equal_the_calls_with_labels_steps_and_epochs(tmp_path: Path) -> None:
    inner = StandInCurriculum(seed=2, evict_every=5)
    clock = TrainerClock()
    wrapper = wrap(tmp_path, inner, clock, flush_every=37)
    expected = run_envs(wrapper, n_envs=4, n_completions=300, seed=3, clock=clock)
    wrapper.close()
    stream = read_reward_stream(tmp_path)
    assert rows(stream) == expected
    assert stream["completion_index"].to_list() == list(range(300))
    assert len(list_chunks(tmp_path)) == 9  # 300 rows at 37 per chunk
    # what LP was fed is exactly what was recorded, call by call
    assert [(t, r) for _, r, _, _, t in rows(stream)] == inner.calls
    # evicted tasks still completed (out in an environment): label from get_task() memory
    evicted = {t for *_, t in expected} - set(inner._tasks)
    assert evicted and UNKNOWN_LABEL not in stream["label"].to_list()
    assert wrapper.recording_counts == {
        "recorded": 300,
        "failed": 0,
        "unknown_label": 0,
        "handed_out": 304,
    }


def test_label_looked_up_by_id_then_unknown_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inner = StandInCurriculum(seed=3)
    wrapper = wrap(tmp_path, inner, TrainerClock(agent_step=42))
    in_pool = inner.get_task()  # handed out behind the wrapper's back: found in the pool
    with caplog.at_level(logging.WARNING, logger="rts_dagster.curriculum_recording"):
        wrapper.update_task_performance(in_pool.get_id(), 0.5)
        wrapper.update_task_performance(987654, 0.25)
        wrapper.update_task_performance(987655, 0.75)
    wrapper.close()
    labels = read_reward_stream(tmp_path)["label"].to_list()
    assert labels == [in_pool.get_env_cfg().label, UNKNOWN_LABEL, UNKNOWN_LABEL]
    warnings = [r.getMessage() for r in caplog.records if "no known label" in r.getMessage()]
    assert len(warnings) == 1 and "987654" in warnings[0]
    assert wrapper.recording_counts["unknown_label"] == 2


def test_complete_feeding_lp_itself_is_not_recorded_twice(tmp_path: Path) -> None:
    inner = StandInCurriculum(seed=4)
    inner.feeds_lp_from_complete = True  # complete() calls the curriculum's LP update too
    clock = TrainerClock()
    wrapper = wrap(tmp_path, inner, clock)
    expected = run_envs(wrapper, n_envs=2, n_completions=50, seed=5, clock=clock)
    wrapper.close()
    assert len(inner.calls) == 100  # the curriculum saw both calls of each completion
    assert rows(read_reward_stream(tmp_path)) == expected  # one row per completion


def test_a_call_reentering_the_wrapper_is_not_recorded_again(tmp_path: Path) -> None:
    inner = StandInCurriculum(seed=5)
    clock = TrainerClock()
    wrapper = wrap(tmp_path, inner, clock)
    inner.listener = wrapper  # the LP update calls back into the wrapper
    expected = run_envs(wrapper, n_envs=3, n_completions=40, seed=6, clock=clock)
    wrapper.close()
    assert len(inner.calls) == 80
    assert rows(read_reward_stream(tmp_path)) == expected


def test_recording_failures_never_break_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inner = StandInCurriculum(seed=6)

    def broken_step() -> int:
        raise OSError("trainer state unavailable")

    recorder = RewardStreamRecorder(tmp_path, worker=0)
    wrapper = RecordingCurriculum(inner, recorder, agent_step=broken_step)
    with caplog.at_level(logging.WARNING, logger="rts_dagster.curriculum_recording"):
        results = [
            wrapper.update_task_performance(inner.get_task().get_id(), 0.1) for _ in range(5)
        ]
        # a closed recorder (or a full disk at flush time) raises inside record()
        recorder.close()
        object.__setattr__(wrapper, "_rc_agent_step", lambda: 7)
        task = inner.get_task()
        assert wrapper.update_task_performance(task.get_id(), 0.2) == f"updated {task.get_id()}"
        # a task whose env config cannot be read is still handed out unchanged
        task.get_env_cfg = lambda: (_ for _ in ()).throw(RuntimeError("bad cfg"))  # type: ignore[method-assign]
        inner._tasks = {task.get_id(): task}
        assert wrapper.get_task() is task
    assert results == [r for r in results if r.startswith("updated ")] and len(results) == 5
    assert len(inner.calls) == 6
    assert wrapper.recording_counts["failed"] == 6
    failures = [r for r in caplog.records if "recording a completion failed" in r.getMessage()]
    assert len(failures) == 1  # warned once, counted always
    assert any("could not read the label" in r.getMessage() for r in caplog.records)
    assert read_reward_stream(tmp_path).height == 0


def test_close_flushes_and_registers_chunks_of_other_processes(tmp_path: Path) -> None:
    saved: list[tuple[str, str, str]] = []
    run = SimpleNamespace(
        dir=str(tmp_path), summary={}, save=lambda p, base_path, policy: saved.append((p, policy))
    )
    inner = StandInCurriculum(seed=7)
    wrapper = RecordingCurriculum(
        inner, RewardStreamRecorder(run=run, worker=0), agent_step=lambda: 5
    )
    wrapper.update_task_performance(wrapper.get_task().get_id(), 1.0)
    with RewardStreamRecorder(tmp_path, worker=CHILD_WORKER_BASE + 1) as other:  # a worker's
        other.record("x", 0.0, 1)
    assert wrapper.close() == "inner closed"
    names = sorted(Path(p).name for p, _ in saved)
    assert names == ["part-w0000-000000.parquet", "part-w1000001-000000.parquet"]
    assert {policy for _, policy in saved} == {"now"}
    assert read_reward_stream(tmp_path).height == 2


def test_close_warns_when_nothing_reached_the_wrapper(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inner = StandInCurriculum(seed=8)
    wrapper = wrap(tmp_path, inner, TrainerClock())
    for _ in range(3):
        wrapper.get_task()
    with caplog.at_level(logging.WARNING, logger="rts_dagster.curriculum_recording"):
        wrapper.close()
    assert any("unwrapped curriculum" in r.getMessage() for r in caplog.records)


def test_a_copy_in_the_same_process_records_as_a_worker_of_its_own(tmp_path: Path) -> None:
    inner = StandInCurriculum(seed=9)
    clock = TrainerClock(agent_step=3, path=tmp_path / "clock.bin")
    wrapper = wrap(tmp_path, inner, clock)
    wrapper.update_task_performance(wrapper.get_task().get_id(), 0.5)  # buffered, not flushed
    copy = pickle.loads(pickle.dumps(wrapper))
    assert type(copy) is RecordingCurriculum and isinstance(copy, StandInCurriculum)
    copy.update_task_performance(copy.get_task().get_id(), 0.25)
    clock.set(8, 2)  # a copy of the clock reads the same memory
    copy.update_task_performance(copy.get_task().get_id(), 0.125)
    copy.close()
    wrapper.close()
    stream = read_reward_stream(tmp_path)
    assert stream.select("worker", "reward", "agent_step", "epoch").rows() == [
        (0, 0.5, 3, -1),
        (CHILD_WORKER_BASE + 1, 0.25, 3, -1),
        (CHILD_WORKER_BASE + 1, 0.125, 8, 2),
    ]


def _worker_process(wrapper: Any, clock: TrainerClock, seed: int, queue: Any) -> None:
    """A vectorised-env worker: waits for the trainer's clock, then plays episodes."""
    import time

    deadline = time.monotonic() + 20
    while clock.agent_step() == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    expected = run_envs(wrapper, n_envs=2, n_completions=60, seed=seed, clock=None)
    queue.put((mp.current_process().pid, expected, clock.agent_step(), clock.epoch()))
    # no close(): the worker's recorder is flushed when the process exits normally


def test_worker_processes_record_separately_with_the_trainers_step(tmp_path: Path) -> None:
    # spawn only: polars deadlocks in a forked child once the parent used its thread pool,
    # so RewardStreamRecorder cannot flush in forked workers (see docs/recording_in_metta.md)
    context = mp.get_context("spawn")
    inner = StandInCurriculum(seed=10)
    clock = TrainerClock()
    wrapper = wrap(tmp_path, inner, clock)
    # the trainer process records too, and has a buffer the workers must not flush again
    wrapper.update_task_performance(wrapper.get_task().get_id(), 9.0)
    queue = context.Queue()
    procs = [
        context.Process(target=_worker_process, args=(wrapper, clock, 20 + i, queue))
        for i in range(2)
    ]
    for proc in procs:
        proc.start()
    clock.set(123_456, 17)  # published after the workers started: they must see it
    results = [queue.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    wrapper.close()
    stream = read_reward_stream(tmp_path)
    claims = {
        int((tmp_path / "reward_stream" / f".claim-w{w}").read_text()): w
        for w in (CHILD_WORKER_BASE + 1, CHILD_WORKER_BASE + 2)
    }
    assert sorted(set(stream["worker"].to_list())) == [0, *sorted(claims.values())]
    assert stream.filter(worker=0)["reward"].to_list() == [9.0]
    for pid, expected, step, epoch in results:
        assert (step, epoch) == (123_456, 17)
        mine = stream.filter(worker=claims[pid])
        want = [(label, r, step, epoch, t) for label, r, _, _, t in expected]
        assert rows(mine) == want
        assert mine["completion_index"].to_list() == list(range(60))


def test_a_forked_copy_records_under_its_own_worker_not_into_the_inherited_buffer(
    tmp_path: Path,
) -> None:
    inner = StandInCurriculum(seed=11)
    wrapper = wrap(tmp_path, inner, TrainerClock(agent_step=4))
    parent_recorder = wrapper._rc_recorder
    wrapper.update_task_performance(wrapper.get_task().get_id(), 0.5)  # buffered in the parent
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no polars here (it deadlocks after fork), leave without finalizers
        try:
            wrapper.update_task_performance(wrapper.get_task().get_id(), 0.25)
            mine = wrapper._rc_recorder
            report = f"{mine.worker} {mine.n_buffered} {parent_recorder.n_buffered}"
            os.write(write_end, report.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    report = os.read(read_end, 100).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert report == f"{CHILD_WORKER_BASE + 1} 1 1"
    assert wrapper._rc_recorder is parent_recorder and parent_recorder.n_buffered == 1
