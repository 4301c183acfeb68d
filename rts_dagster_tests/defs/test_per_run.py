"""per_run_table: the run-by-run tables of the aggregates equal the same functions applied
to every run at once, are read from the cache on the next call, and are computed again
when a partition's stream file is rewritten."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
from polars.testing import assert_frame_equal

from rts_dagster import storage
from rts_dagster.analysis import epoch_view, kalman, quality
from rts_dagster.analysis.learning import learning_slopes
from rts_dagster.defs.analysis import usable_of_runs
from rts_dagster.defs.per_run import cache_file, per_run_files, per_run_table
from rts_dagster.discovery import row_files
from rts_dagster.schema import (
    EPOCH_VIEW,
    LEARNING_SLOPES,
    LOCAL_LEVEL,
    REWARD_STREAMS,
    SERIES_KEYS,
    SERIES_QUALITY,
    conform,
)
from rts_dagster_tests.synthetic import run_streams


def _write_runs(root: Path, n_tasks: int = 3, seeds: int = 3) -> tuple[list[dict], pl.DataFrame]:
    rng = np.random.default_rng(7)
    rows, frames = [], []
    for t in range(n_tasks):
        for seed in range(1, seeds + 1):
            task = f"task{t}"
            row = {
                "task": task,
                "seed": seed,
                "run_id": f"{task}.seed{seed}",
                "partition_key": f"{task}.seed{seed}",
            }
            streams = run_streams(task, seed, rng)
            parquet, _ = storage.stream_paths(root, *row_files(row))
            storage.write_parquet(streams, parquet)
            rows.append(row)
            frames.append(streams)
    return rows, pl.concat(frames)


def _sorted(df: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    return df.sort(keys, nulls_last=True)


def test_per_run_tables_equal_the_functions_on_every_run_at_once(tmp_path: Path) -> None:
    rows, streams = _write_runs(tmp_path)
    # chunk=2: runs are computed a few at a time, never all together
    got_quality = per_run_table(
        tmp_path, rows, "series_quality", quality.series_quality, SERIES_QUALITY, chunk=2
    )
    want_quality = quality.series_quality(streams)
    assert_frame_equal(got_quality, want_quality)
    assert set(got_quality["status"]) >= {quality.STATUS_OK, quality.STATUS_CONSTANT}

    dynamics = quality.keep_usable(streams, want_quality, quality.PURPOSE_DYNAMICS)
    level = quality.keep_usable(streams, want_quality, quality.PURPOSE_LEVEL)
    cases = [
        (
            "local_level",
            usable_of_runs(kalman.estimate_local_level, quality.PURPOSE_DYNAMICS, LOCAL_LEVEL),
            LOCAL_LEVEL,
            kalman.estimate_local_level(dynamics),
            [*SERIES_KEYS, "regime"],
        ),
        (
            "epoch_view",
            usable_of_runs(epoch_view.epoch_view, quality.PURPOSE_DYNAMICS, EPOCH_VIEW),
            EPOCH_VIEW,
            epoch_view.epoch_view(dynamics),
            ["task", "seed", "run_id", "label"],
        ),
        (
            "learning_slopes",
            usable_of_runs(learning_slopes, quality.PURPOSE_LEVEL, LEARNING_SLOPES),
            LEARNING_SLOPES,
            learning_slopes(level),
            list(SERIES_KEYS),
        ),
    ]
    for name, compute, schema, want, keys in cases:
        got = per_run_table(tmp_path, rows, name, compute, schema, chunk=2)
        assert got.height == want.height > 0, name
        assert_frame_equal(_sorted(got, keys), _sorted(conform(want, schema), keys))


def test_the_cache_is_read_and_a_rewritten_partition_is_computed_again(tmp_path: Path) -> None:
    rows, _ = _write_runs(tmp_path, n_tasks=2, seeds=2)
    calls: list[list[str]] = []

    def compute(streams: pl.DataFrame) -> pl.DataFrame:
        calls.append(sorted(streams["run_id"].unique().to_list()))
        return quality.series_quality(streams)

    lines: list[str] = []
    first = per_run_table(tmp_path, rows, "q", compute, SERIES_QUALITY, chunk=10, log=lines.append)
    assert calls == [sorted(r["run_id"] for r in rows)]
    assert lines == ["q: 4 run(s) computed, 0 from the cache"]

    calls.clear()
    again = per_run_table(tmp_path, rows, "q", compute, SERIES_QUALITY, log=lines.append)
    assert calls == []  # nothing recomputed
    assert_frame_equal(again, first)

    # one partition re-materialized with other values: only that run is computed again
    changed = rows[1]
    parquet, _ = storage.stream_paths(tmp_path, *row_files(changed))
    streams = pl.read_parquet(parquet).with_columns(pl.col("reward") * 2.0)
    storage.write_parquet(streams, parquet)
    stat = parquet.stat()
    os.utime(parquet, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    calls.clear()
    third = per_run_table(tmp_path, rows, "q", compute, SERIES_QUALITY, log=lines.append)
    assert calls == [[changed["run_id"]]]
    assert lines[-1] == "q: 1 run(s) computed, 3 from the cache"
    doubled = third.filter(pl.col("run_id") == changed["run_id"])
    before = first.filter(pl.col("run_id") == changed["run_id"])
    np.testing.assert_allclose(doubled["reward_max"], 2.0 * before["reward_max"])
    # the old version of that run's cached rows is gone: one version per run in the file
    stored = pl.read_parquet(cache_file(tmp_path, "q"))
    markers = stored.filter(pl.col("_cache_marker"))
    assert sorted(markers["_cache_partition"]) == sorted(r["partition_key"] for r in rows)
    assert stored.filter(~pl.col("_cache_marker")).height == third.height

    # a run no longer asked for leaves the file; the others are still read from it
    calls.clear()
    fewer = per_run_table(tmp_path, rows[:3], "q", compute, SERIES_QUALITY)
    assert calls == []
    assert_frame_equal(fewer, third.filter(pl.col("run_id") != rows[3]["run_id"]))
    stored = pl.read_parquet(cache_file(tmp_path, "q"))
    assert rows[3]["partition_key"] not in set(stored["_cache_partition"])


def test_an_unreadable_cache_file_is_computed_again(tmp_path: Path) -> None:
    rows, _ = _write_runs(tmp_path, n_tasks=1, seeds=2)
    first = per_run_table(tmp_path, rows, "q", quality.series_quality, SERIES_QUALITY)
    cache_file(tmp_path, "q").write_bytes(b"not parquet")
    calls: list[int] = []

    def compute(streams: pl.DataFrame) -> pl.DataFrame:
        calls.append(streams.height)
        return quality.series_quality(streams)

    again = per_run_table(tmp_path, rows, "q", compute, SERIES_QUALITY)
    assert len(calls) == 1
    assert_frame_equal(again, first)
    assert pl.read_parquet(cache_file(tmp_path, "q")).height > 0  # rewritten whole


def test_per_run_files_reads_only_the_files_that_changed(tmp_path: Path) -> None:
    rows, _ = _write_runs(tmp_path, n_tasks=2, seeds=2)

    def path_of(row: dict) -> Path:
        return storage.stream_paths(tmp_path, *row_files(row))[0]

    want = pl.concat([pl.read_parquet(path_of(r)) for r in rows])
    lines: list[str] = []
    got = per_run_files(tmp_path, rows, "streams", path_of, REWARD_STREAMS, log=lines.append)
    assert_frame_equal(got, conform(want, REWARD_STREAMS))
    changed = path_of(rows[2])
    storage.write_parquet(pl.read_parquet(changed).with_columns(pl.col("reward") + 1.0), changed)
    stat = changed.stat()  # a new version even where mtimes are coarse
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = per_run_files(tmp_path, rows, "streams", path_of, REWARD_STREAMS, log=lines.append)
    assert lines == [
        "streams: 4 run(s) computed, 0 from the cache",
        "streams: 1 run(s) computed, 3 from the cache",
    ]
    want = pl.concat([pl.read_parquet(path_of(r)) for r in rows])
    assert_frame_equal(again, conform(want, REWARD_STREAMS))  # order of `rows` kept


def test_settings_are_part_of_the_key(tmp_path: Path) -> None:
    rows, _ = _write_runs(tmp_path, n_tasks=1, seeds=2)
    seen: list[float] = []

    def compute_with(scale: float):
        def compute(streams: pl.DataFrame) -> pl.DataFrame:
            seen.append(scale)
            return quality.series_quality(streams)

        return compute

    for scale in (1.0, 1.0, 2.0):
        per_run_table(
            tmp_path, rows, "v", compute_with(scale), SERIES_QUALITY, settings={"s": scale}
        )
    assert seen == [1.0, 2.0]


def test_a_run_without_rows_and_a_missing_stream_file(tmp_path: Path) -> None:
    rows, _ = _write_runs(tmp_path, n_tasks=1, seeds=2)
    ghost = {"task": "task0", "seed": 9, "run_id": "task0.seed9", "partition_key": "task0.seed9"}

    def only_seed1(streams: pl.DataFrame) -> pl.DataFrame:
        return quality.series_quality(streams.filter(pl.col("seed") == 1))

    out = per_run_table(tmp_path, [*rows, ghost], "s1", only_seed1, SERIES_QUALITY)
    assert set(out["seed"]) == {1}
    # seed 2 produced no rows: cached as empty, not computed again
    again = per_run_table(tmp_path, rows, "s1", lambda s: 1 / 0, SERIES_QUALITY)
    assert_frame_equal(again, out)
