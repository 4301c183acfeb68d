"""`OfflineRunSource` over a folder of real offline runs, plus damaged files."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from rts_dagster.recorder import RewardStreamRecorder
from rts_dagster.schema import COMPLETION_RECORD
from rts_dagster.sources import offline
from rts_dagster.sources.base import RunReadError, RunRecord, RunSource
from rts_dagster.sources.offline import OfflineRunSource
from rts_dagster.sources.wandb_file import iter_records
from rts_dagster_tests.sources.test_wandb_file import record_kinds, write_run

LABELS = ["training_facility.extractor_hub_30", "machina_1.collect_far"]


def _rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for epoch in range(n):
        row = {f"env_per_label_rewards/{label}": float(rng.random()) for label in LABELS}
        row["overview/sps"] = float(rng.normal(5000, 100))
        row["metric/epoch"] = epoch
        rows.append(row)
    return rows


def _record_stream(files_dir: Path) -> pl.DataFrame:
    """Record completions for two workers (several chunks each); return what was recorded."""
    rng = np.random.default_rng(5)
    recorded = []
    for worker in (1, 0):
        with RewardStreamRecorder(files_dir, worker=worker, flush_every=7) as recorder:
            for i in range(30):
                row = {
                    "completion_index": i,
                    "worker": worker,
                    "label": LABELS[i % 2],
                    "task_id": int(rng.integers(100)),
                    "reward": float(rng.random()),
                    "agent_step": 1000 * i,
                    "epoch": i // 10,
                    "wall_time": 1.7e9 + i,
                }
                recorder.record(
                    row["label"],
                    row["reward"],
                    row["agent_step"],
                    epoch=row["epoch"],
                    task_id=row["task_id"],
                    wall_time=row["wall_time"],
                )
                recorded.append(row)
    return pl.DataFrame(recorded, schema=COMPLETION_RECORD).sort("worker", "completion_index")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two real runs (finished with a reward stream, failed without), a corrupt copy of
    the first and a file of random bytes, all in the usual offline-run-* layout."""
    root = tmp_path_factory.mktemp("offline_tree")
    good_rows = _rows(12, seed=1)
    good = write_run(
        root,
        "alice.fixed_maps.seed1",
        good_rows,
        project="metta",
        entity="metta-research",
        name="alice.fixed_maps.seed1",
        config={"trainer": {"curriculum": {"algorithm": {"ema_timescale": 0.001}}}},
        tags=["user:alice"],
    )
    stream = _record_stream(good.parent / "files")
    failed = write_run(root, "alice.fixed_maps.seed2", _rows(3, seed=2), exit_code=1, project="p")

    corrupt_dir = root / "wandb" / "offline-run-20260101_000000-corrupt"
    corrupt_dir.mkdir()
    data = bytearray(good.read_bytes())
    offsets = [offset for offset, _ in iter_records(good)]
    data[offsets[len(offsets) // 2] + 12] ^= 0xFF
    corrupt = corrupt_dir / "run-corrupt.wandb"
    corrupt.write_bytes(bytes(data))
    noise_dir = root / "wandb" / "offline-run-20260101_000000-x"
    noise_dir.mkdir()
    noise = noise_dir / "run-x.wandb"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    return {
        "root": root,
        "good": good,
        "good_rows": good_rows,
        "stream": stream,
        "failed": failed,
        "corrupt": corrupt,
        "noise": noise,
    }


def test_lists_good_runs_and_reports_unreadable_files(tree: dict[str, Any]) -> None:
    source: RunSource = OfflineRunSource(tree["root"])
    assert source.name == "offline"
    runs, unreadable = source.list_runs()
    by_id = {run.run_id: run for run in runs}
    assert sorted(by_id) == ["alice.fixed_maps.seed1", "alice.fixed_maps.seed2"]  # no dupes
    good = by_id["alice.fixed_maps.seed1"]
    assert good.run_name == "alice.fixed_maps.seed1"
    assert (good.project, good.entity, good.tags) == ("metta", "metta-research", ("user:alice",))
    assert good.config == {"trainer": {"curriculum": {"algorithm": {"ema_timescale": 0.001}}}}
    assert good.state == "finished"
    assert good.source == "offline"
    assert good.location == str(tree["good"])
    assert good.created_at is not None and good.created_at.tzinfo is not None
    assert good.heartbeat_at is not None and good.heartbeat_at >= good.created_at
    st = tree["good"].stat()
    assert good.fingerprint == f"{st.st_size}:{st.st_mtime_ns}:finished"
    failed = by_id["alice.fixed_maps.seed2"]
    assert failed.state == "failed" and failed.run_name == "alice.fixed_maps.seed2"

    assert sorted(u.location for u in unreadable) == sorted(
        [str(tree["corrupt"]), str(tree["noise"])]
    )
    errors = {u.location: u.error for u in unreadable}
    assert all(u.source == "offline" for u in unreadable)
    assert str(tree["corrupt"]) in errors[str(tree["corrupt"])]
    assert "byte offset" in errors[str(tree["corrupt"])]
    assert "not a .wandb file" in errors[str(tree["noise"])]


def test_get_run(tree: dict[str, Any]) -> None:
    source = OfflineRunSource(tree["root"])
    runs, _ = source.list_runs()
    for run in runs:
        assert source.get_run(run.location) == run
    with pytest.raises(RunReadError, match="missing"):
        source.get_run(str(tree["root"] / "missing" / "run-missing.wandb"))
    with pytest.raises(RunReadError, match="byte offset"):
        source.get_run(str(tree["corrupt"]))


def _good(source: OfflineRunSource, tree: dict[str, Any]) -> RunRecord:
    return source.get_run(str(tree["good"]))


def test_read_history(tree: dict[str, Any]) -> None:
    source = OfflineRunSource(tree["root"])
    history = source.read_history(_good(source, tree), ["env_per_label_rewards/"])
    keys = [f"env_per_label_rewards/{label}" for label in LABELS]
    assert history.columns == ["_step", "_timestamp", *sorted(keys)]
    assert history["_step"].to_list() == [10 * i for i in range(len(tree["good_rows"]))]
    for key in keys:
        assert history[key].to_list() == [row[key] for row in tree["good_rows"]]
    full = source.read_history(_good(source, tree))
    assert "overview/sps" in full.columns and "metric/epoch" in full.columns


def test_read_completions(tree: dict[str, Any]) -> None:
    source = OfflineRunSource(tree["root"])
    stream = source.read_completions(_good(source, tree))
    assert stream is not None
    assert stream.schema == COMPLETION_RECORD
    assert len(list((tree["good"].parent / "files" / "reward_stream").glob("*.parquet"))) > 2
    assert stream.equals(tree["stream"])
    failed = source.get_run(str(tree["failed"]))
    assert source.read_completions(failed) is None


def test_bad_stream_chunk_names_the_chunk(tree: dict[str, Any], tmp_path: Path) -> None:
    run_dir = tmp_path / "wandb" / tree["good"].parent.name
    shutil.copytree(tree["good"].parent, run_dir)
    bad = run_dir / "files" / "reward_stream" / "part-w0007-000000.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    source = OfflineRunSource(tmp_path)
    (run,), _ = source.list_runs()
    with pytest.raises(RunReadError, match=re.escape("part-w0007-000000.parquet")) as info:
        source.read_completions(run)
    assert str(bad) in str(info.value)
    # A chunk without the schema's columns is refused the same way.
    bad.unlink()
    pl.DataFrame({"reward": [1.0]}).write_parquet(
        run_dir / "files/reward_stream/part-w0008-000000.parquet"
    )
    with pytest.raises(RunReadError, match=re.escape("part-w0008-000000.parquet")):
        source.read_completions(run)


def test_scans_are_cached_until_a_file_changes(
    tree: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "wandb" / tree["good"].parent.name
    shutil.copytree(tree["good"].parent, run_dir)
    path = run_dir / tree["good"].name
    scans = []
    real_scan = offline.scan_run_file
    monkeypatch.setattr(
        offline, "scan_run_file", lambda p, **kw: scans.append(p) or real_scan(p, **kw)
    )
    source = OfflineRunSource(tmp_path)
    first, _ = source.list_runs()
    second, _ = source.list_runs()
    assert len(scans) == 1 and first == second
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    third, _ = source.list_runs()
    assert len(scans) == 2
    assert third[0].fingerprint != first[0].fingerprint


def test_run_without_exit_record_is_running_then_crashed(
    tree: dict[str, Any], tmp_path: Path
) -> None:
    (exit_offset,) = [offset for offset, kind in record_kinds(tree["good"]) if kind == "exit"]
    data = tree["good"].read_bytes()
    path = tmp_path / "wandb" / "offline-run-20260101_000000-live" / "run-live.wandb"
    path.parent.mkdir(parents=True)
    path.write_bytes(data[: exit_offset + 5])  # cut inside the exit record
    source = OfflineRunSource(tmp_path, running_grace_s=300)
    (run,), _ = source.list_runs()
    assert run.state == "running"
    assert run.extra["truncated"] and run.extra["exit_code"] is None
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))
    (later,), _ = source.list_runs()
    assert later.state == "crashed"
    assert later.fingerprint != run.fingerprint
    history = source.read_history(later)
    assert history.height == len(tree["good_rows"])


def test_missing_root_lists_nothing(tmp_path: Path) -> None:
    assert OfflineRunSource(tmp_path / "nope").list_runs() == ([], [])


def _list_within(source: OfflineRunSource, timeout_s: float = 20.0) -> Any:
    """`source.list_runs()`, failing (not hanging) if it does not return in time."""
    import threading

    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(source.list_runs()), daemon=True)
    worker.start()
    worker.join(timeout_s)
    assert not worker.is_alive(), "list_runs blocked"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and /dev/zero")
def test_things_that_are_not_run_files_are_unreadable_with_path_and_reason(
    tree: dict[str, Any], tmp_path: Path
) -> None:
    wandb = tmp_path / "wandb"
    shutil.copytree(tree["good"].parent, wandb / tree["good"].parent.name)
    fifo = wandb / "offline-run-20260101_000000-fifo" / "run-fifo.wandb"
    fifo.parent.mkdir()
    os.mkfifo(fifo)  # a reader would block until a writer opens it: forever
    zero = wandb / "offline-run-20260101_000000-zero" / "run-zero.wandb"
    zero.parent.mkdir()
    zero.symlink_to("/dev/zero")  # read() would never end
    folder = wandb / "offline-run-20260101_000000-dir" / "run-dir.wandb"
    folder.mkdir(parents=True)
    empty = wandb / "offline-run-20260101_000000-empty"
    empty.mkdir()
    (run_offset,) = [offset for offset, kind in record_kinds(tree["good"]) if kind == "run"]
    cut = wandb / "offline-run-20260101_000000-cut" / "run-cut.wandb"
    cut.parent.mkdir()
    cut.write_bytes(tree["good"].read_bytes()[: run_offset + 10])  # inside the run record
    old = time.time_ns() - 3600 * 10**9
    os.utime(cut, ns=(old, old))

    runs, unreadable = _list_within(OfflineRunSource(tmp_path))
    assert [r.run_id for r in runs] == ["alice.fixed_maps.seed1"]
    errors = {u.location: u.error for u in unreadable}
    assert sorted(errors) == sorted(map(str, [fifo, zero, folder, empty, cut]))
    for location, error in errors.items():
        assert error.startswith(location), error
    assert "FIFO" in errors[str(fifo)]
    assert "character device" in errors[str(zero)]
    assert "directory" in errors[str(folder)]
    assert "without a run-*.wandb file" in errors[str(empty)]
    assert "before its run record" in errors[str(cut)] and "damaged" in errors[str(cut)]
    for path in (fifo, zero):  # a direct read refuses too
        with pytest.raises(RunReadError, match="not"):
            OfflineRunSource(tmp_path).get_run(str(path))


def test_files_above_the_size_limit_are_not_read(
    tree: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(tree["good"].parent, tmp_path / "wandb" / tree["good"].parent.name)
    scans: list[Any] = []
    monkeypatch.setattr(offline, "scan_run_file", lambda p, **kw: scans.append(p))
    size = tree["good"].stat().st_size
    source = OfflineRunSource(tmp_path, max_file_bytes=size - 1)
    runs, (bad,) = source.list_runs()
    assert runs == [] and scans == []
    assert f"{size} bytes, above the {size - 1}-byte sanity limit" in bad.error


def test_a_run_copied_in_late_is_listed_as_late_data(tree: dict[str, Any], tmp_path: Path) -> None:
    """`cp -a` of a run that finished hours ago: mtime and logged times are old, only the
    arrival (ctime) is new. A poll since before the copy lists it, flagged late."""
    from datetime import UTC, datetime, timedelta

    from rts_dagster_tests.sources.test_wandb_file import write_with_old_clock

    stock = tmp_path / "stock" / "offline-run-20260101_000000-late" / "run-late.wandb"
    write_with_old_clock(tree["good"], stock, 3 * 3600)
    source = OfflineRunSource(tmp_path / "offline")
    since = datetime.now(UTC) - timedelta(minutes=10)
    assert source.list_runs(updated_since=since) == ([], [])
    target = tmp_path / "offline" / "wandb" / stock.parent.name
    shutil.copytree(stock.parent, target)  # copy2: mtime kept
    assert target.joinpath(stock.name).stat().st_mtime_ns == stock.stat().st_mtime_ns
    (run,), _ = source.list_runs(updated_since=since)
    assert run.state == "finished" and run.extra["late_data"] is True
    assert run.heartbeat_at is not None and run.heartbeat_at < since - timedelta(hours=2)
    (full,), _ = source.list_runs()  # a full listing has no cutoff to be late for
    assert "late_data" not in full.extra


def test_the_scan_cache_outlives_the_process(tiny_offline_dir, tmp_path, monkeypatch) -> None:
    """A second source on the same scan cache lists the same runs without scanning a file;
    a changed file is scanned again; a corrupt cache is ignored, not an error."""
    root = tmp_path / "runs"
    shutil.copytree(tiny_offline_dir, root, symlinks=True)
    cache = tmp_path / "cache" / "offline_scans.json"
    first, unreadable = OfflineRunSource(root, scan_cache=cache).list_runs()
    assert cache.exists() and not unreadable and len(first) == 5

    scanned: list[str] = []
    real_scan = offline.scan_run_file

    def counting(path, **kwargs):
        scanned.append(str(path))
        return real_scan(path, **kwargs)

    monkeypatch.setattr(offline, "scan_run_file", counting)
    again, _ = OfflineRunSource(root, scan_cache=cache).list_runs()
    assert scanned == []
    assert [r.__dict__ for r in again] == [r.__dict__ for r in first]

    changed = Path(first[0].location)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    OfflineRunSource(root, scan_cache=cache).list_runs()
    assert scanned == [str(changed)]

    cache.write_text("{not json")
    scanned.clear()
    listed, _ = OfflineRunSource(root, scan_cache=cache).list_runs()
    assert len(listed) == 5 and len(scanned) == 5

    # a run that is gone leaves the saved cache too (it does not grow with every run seen)
    shutil.rmtree(changed.parent)
    listed, _ = OfflineRunSource(root, scan_cache=cache).list_runs()
    saved = json.loads(cache.read_text())["scans"]
    assert len(listed) == 4 and str(changed) not in saved and len(saved) == 4
