"""RewardStreamRecorder: parquet round trip, chunk naming, workers, flushing rules."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import polars as pl
import pytest

from rts_dagster.recorder import (
    SUMMARY_KEY,
    RewardStreamRecorder,
    list_chunks,
    read_reward_stream,
    save_reward_stream_files,
    stream_dir,
)
from rts_dagster.schema import COMPLETION_RECORD


class FakeRun:
    """The three things the recorder uses from a wandb Run."""

    def __init__(self, directory: Path) -> None:
        self.dir = str(directory)
        self.saved: list[tuple[str, str, str]] = []
        self.summary: dict[str, Any] = {}

    def save(self, path: str, base_path: str, policy: str) -> None:
        self.saved.append((path, base_path, policy))


def test_round_trip_through_parquet(tmp_path: Path) -> None:
    with RewardStreamRecorder(tmp_path, worker=3) as recorder:
        recorder.record("site.a", 0.25, 100, epoch=0, task_id=7, wall_time=1000.5)
        recorder.record("site.b", -0.5, 150)
        recorder.record_many(
            ["site.a", "site.c"], np.array([1.5, 0.0]), [200, 210], epochs=1, wall_times=2000.0
        )
        assert recorder.n_recorded == 4 and recorder.n_buffered == 4
    frame = read_reward_stream(tmp_path)
    assert frame.schema == COMPLETION_RECORD
    assert frame["completion_index"].to_list() == [0, 1, 2, 3]
    assert frame["worker"].to_list() == [3] * 4
    assert frame["label"].to_list() == ["site.a", "site.b", "site.a", "site.c"]
    assert frame["reward"].to_list() == [0.25, -0.5, 1.5, 0.0]  # stored as given, unclipped
    assert frame["agent_step"].to_list() == [100, 150, 200, 210]
    assert frame["epoch"].to_list() == [0, -1, 1, 1]
    assert frame["task_id"].to_list() == [7, -1, -1, -1]
    assert frame["wall_time"][0] == 1000.5 and frame["wall_time"][1] > 1.7e9
    # A reader that only has the schema gets the same frame straight from the file.
    direct = pl.read_parquet(list_chunks(tmp_path)[0])
    assert direct.equals(frame)


def test_chunks_are_named_per_worker_and_sequence(tmp_path: Path) -> None:
    recorder = RewardStreamRecorder(tmp_path, worker=5, flush_every=3, flush_seconds=None)
    for i in range(7):
        recorder.record(f"l{i % 2}", i / 10, i)
    assert recorder.n_buffered == 1  # two chunks of 3 flushed on the way
    recorder.close()
    names = [p.name for p in list_chunks(tmp_path)]
    assert names == [
        "part-w0005-000000.parquet",
        "part-w0005-000001.parquet",
        "part-w0005-000002.parquet",
    ]
    assert [pl.read_parquet(p).height for p in list_chunks(tmp_path)] == [3, 3, 1]
    # Nothing else is left in the directory (no temp files from the atomic write).
    assert sorted(p.name for p in stream_dir(tmp_path).iterdir()) == names
    with pytest.raises(RuntimeError):
        recorder.record("l0", 0.1, 8)
    recorder.close()  # idempotent


def test_many_workers_share_a_directory(tmp_path: Path) -> None:
    recorders = [RewardStreamRecorder(tmp_path, worker=w, flush_every=4) for w in (0, 1, 12)]
    for step in range(10):
        for worker, recorder in zip((0, 1, 12), recorders, strict=True):
            recorder.record(f"w{worker}", float(step), step * 10 + worker)
    for recorder in recorders:
        recorder.close()
    frame = read_reward_stream(tmp_path)
    assert frame.height == 30
    for worker in (0, 1, 12):
        rows = frame.filter(pl.col("worker") == worker)
        assert rows["completion_index"].to_list() == list(range(10))
        assert rows["label"].unique().to_list() == [f"w{worker}"]
    assert len(list_chunks(tmp_path, worker=12)) == 3  # 4 + 4 + 2


def test_context_manager_flushes_on_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError), RewardStreamRecorder(tmp_path) as recorder:
        recorder.record("a", 1.0, 1)
        raise KeyError("boom")
    assert read_reward_stream(tmp_path).height == 1


def test_resume_continues_numbering(tmp_path: Path) -> None:
    with RewardStreamRecorder(tmp_path, worker=2) as recorder:
        recorder.record_many("a", [0.1, 0.2, 0.3], [1, 2, 3])
    with RewardStreamRecorder(tmp_path, worker=2) as recorder:
        recorder.record("a", 0.4, 4)
    names = [p.name for p in list_chunks(tmp_path)]
    assert names == ["part-w0002-000000.parquet", "part-w0002-000001.parquet"]
    assert read_reward_stream(tmp_path)["completion_index"].to_list() == [0, 1, 2, 3]


def test_record_many_checks_lengths(tmp_path: Path) -> None:
    recorder = RewardStreamRecorder(tmp_path)
    with pytest.raises(ValueError):
        recorder.record_many(["a", "b"], [0.1, 0.2, 0.3], 5)
    with pytest.raises(ValueError):
        recorder.record_many(["a", "b"], [0.1, 0.2], [1, 2, 3])
    recorder.record_many([], [], [])
    assert recorder.flush() is None


def test_flush_seconds_zero_flushes_every_call(tmp_path: Path) -> None:
    with RewardStreamRecorder(tmp_path, flush_seconds=0.0) as recorder:
        recorder.record("a", 0.1, 1)
        recorder.record("a", 0.2, 2)
    assert len(list_chunks(tmp_path)) == 2


def test_with_a_run_saves_each_chunk_and_updates_the_summary(tmp_path: Path) -> None:
    run = FakeRun(tmp_path / "files")
    with RewardStreamRecorder(run=run, flush_every=2) as recorder:
        recorder.record_many(["a", "b", "a"], [0.1, 0.2, 0.3], [1, 2, 3])
        recorder.record("b", 0.4, 4)
    saved = [Path(path).name for path, _, _ in run.saved]
    assert saved == ["part-w0000-000000.parquet", "part-w0000-000001.parquet"]
    assert all(base == run.dir and policy == "now" for _, base, policy in run.saved)
    assert run.summary[SUMMARY_KEY] == 4
    assert read_reward_stream(tmp_path / "files").height == 4
    run.saved.clear()
    assert len(save_reward_stream_files(run)) == 2 and len(run.saved) == 2


def test_uses_the_active_wandb_run_or_needs_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    with pytest.raises(ValueError):
        RewardStreamRecorder()
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=None))
    with pytest.raises(ValueError):
        RewardStreamRecorder()
    run = FakeRun(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=run))
    with RewardStreamRecorder() as recorder:
        recorder.record("a", 0.5, 1)
    assert recorder.run is run and len(run.saved) == 1


def test_bulk_recording_sanity(tmp_path: Path) -> None:
    # Throughput is measured in the docs, not asserted here: this only exercises volume.
    with RewardStreamRecorder(tmp_path, flush_every=50_000) as recorder:
        for i in range(120_000):
            recorder.record("training_facility.extractor_hub_30", 0.5, i, 3, i % 40)
    assert [p.name[-14:-8] for p in list_chunks(tmp_path)] == ["000000", "000001", "000002"]
    frame = read_reward_stream(tmp_path)
    assert frame.height == 120_000 and frame["completion_index"].is_sorted()


def test_chunks_have_exactly_the_completion_record_schema(tmp_path):
    from rts_dagster.recorder import _ARROW_TYPES
    from rts_dagster.schema import COMPLETION_RECORD

    assert list(_ARROW_TYPES) == COMPLETION_RECORD.names()
    rec = RewardStreamRecorder(tmp_path, flush_every=10_000)
    rec.record("a", 0.5, agent_step=10, epoch=1, task_id=3)
    path = rec.flush()
    assert pl.read_parquet(path).schema == COMPLETION_RECORD


def _record_in_child(directory: str) -> None:
    rec = RewardStreamRecorder(directory, worker=5)
    for i in range(100):
        rec.record("x", 0.01 * i, agent_step=i)
    rec.close()


def test_a_forked_worker_can_flush_after_the_parent_used_polars(tmp_path):
    import multiprocessing

    # polars' thread pool does not survive fork; the chunk writer must not need it
    pl.DataFrame({"a": range(10_000)}).group_by(pl.col("a") % 7).len()
    child = multiprocessing.get_context("fork").Process(
        target=_record_in_child, args=(str(tmp_path),)
    )
    child.start()
    child.join(timeout=60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0
    assert read_reward_stream(tmp_path)["reward"].to_list() == [0.01 * i for i in range(100)]
