"""Many partitions per Dagster run: the same files as one run per partition, every
partition still its own materialization, and one bad partition costs only itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from rts_dagster import storage
from rts_dagster.definitions import ASSETS
from rts_dagster.discovery import row_files
from rts_dagster.refresh import partition_batches
from rts_dagster.simulate.writer import simulate_run
from rts_dagster_tests.defs.pipeline import PER_RUN, materialized

EPOCHS = 60


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("offline_batches")
    for seed in (1, 2, 3):
        simulate_run("assembly_lines", seed, out, epochs=EPOCHS)
    return out


def _range_tags(keys: list[str]) -> dict[str, str]:
    return {
        "dagster/asset_partition_range_start": keys[0],
        "dagster/asset_partition_range_end": keys[-1],
    }


def _tables(data: Path) -> dict[str, pl.DataFrame]:
    rows = pl.read_parquet(storage.discovered_runs_path(data)).filter(pl.col("status") == "matched")
    out = {}
    for row in rows.iter_rows(named=True):
        folder, stem = row_files(row)
        out[f"{stem}.streams"] = pl.read_parquet(storage.stream_paths(data, folder, stem)[0])
        for name, path in storage.metrics_paths(data, folder, stem).items():
            out[f"{stem}.{name}"] = pl.read_parquet(path)
        for name, path in storage.lp_replay_paths(data, folder, stem).items():
            out[f"{stem}.lp_{name}"] = pl.read_parquet(path)
    return out


def test_a_batch_writes_what_one_run_per_partition_writes(offline, tmp_path):
    single = tmp_path / "single"
    with materialized(offline, single, aggregates=[]):
        pass
    batched = tmp_path / "batched"
    with materialized(offline, batched, per_run=[], aggregates=[]) as (instance, resources):
        keys = instance.get_dynamic_partitions("runs")
        result = dg.materialize(
            ASSETS,
            selection=PER_RUN,
            instance=instance,
            resources=resources,
            tags=_range_tags(keys),
        )
        assert result.success
        # one run, and still one materialization per (asset, partition)
        mats = {
            (e.asset_key.to_user_string(), e.partition)
            for e in result.get_asset_materialization_events()
        }
        assert mats == {(a, k) for a in PER_RUN for k in keys}
        assert len(keys) == 3
    one, many = _tables(single), _tables(batched)
    assert one.keys() == many.keys()
    for name in one:
        assert one[name].equals(many[name]), name


def test_one_bad_partition_costs_only_itself(offline, tmp_path):
    data = tmp_path / "data"
    copy = tmp_path / "offline"
    shutil.copytree(offline, copy)
    with materialized(copy, data, per_run=[], aggregates=[]) as (instance, resources):
        keys = instance.get_dynamic_partitions("runs")
        rows = pl.read_parquet(storage.discovered_runs_path(data))
        bad = rows.filter(pl.col("partition_key") == keys[1]).row(0, named=True)
        Path(bad["location"]).unlink()  # the run's file vanished after discovery
        result = dg.materialize(
            ASSETS,
            selection=["reward_streams"],
            instance=instance,
            resources=resources,
            tags=_range_tags(keys),
            raise_on_error=False,
        )
        assert not result.success
        failure = next(e for e in result.all_events if e.is_step_failure)
        assert keys[1] in failure.step_failure_data.error.message
        # the others' files are written and complete
        for row in rows.filter(pl.col("partition_key") != keys[1]).iter_rows(named=True):
            folder, stem = row_files(row)
            assert storage.stream_paths(data, folder, stem)[1].exists()


def test_partition_batches_are_consecutive_ranges():
    order = [f"k{i}" for i in range(10)]
    todo = ["k7", "k1", "k2", "k3", "k9", "k8"]
    assert partition_batches(todo, order, batch_size=50) == [["k1", "k2", "k3"], ["k7", "k8", "k9"]]
    assert partition_batches(todo, order, batch_size=2) == [
        ["k1", "k2"],
        ["k3"],
        ["k7", "k8"],
        ["k9"],
    ]
    # split for 2 workers
    assert partition_batches(order, order, batch_size=50, jobs=2) == [order[:5], order[5:]]
    assert partition_batches([], order, batch_size=50) == []
