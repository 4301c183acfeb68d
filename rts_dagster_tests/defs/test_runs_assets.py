"""The Dagster wiring on a real (temporary) instance, over real offline wandb runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from rts_dagster.defs.partitions import runs_partitions
from rts_dagster.defs.resources import OfflineRunsSource, RtsStorage
from rts_dagster.defs.runs import discovered_runs, reward_streams
from rts_dagster.storage import read_json
from rts_dagster_tests.conftest import TINY_EPOCHS, TINY_SEEDS, TINY_TASKS, tiny_label_reward


def test_definitions_load():
    from rts_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"discovered_runs", "reward_streams"} <= keys
    assert graph.get(dg.AssetKey("reward_streams")).partitions_def == runs_partitions
    defs.resolve_all_job_defs()  # every job and sensor target resolves


def _resources(offline: Path, data: Path) -> dict:
    return {
        "run_source": OfflineRunsSource(directory=str(offline)),
        "rts_storage": RtsStorage(data_dir=str(data)),
    }


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def test_discover_register_and_materialize_every_partition(tiny_offline_dir, tmp_path, instance):
    resources = _resources(tiny_offline_dir, tmp_path)
    assert dg.materialize([discovered_runs], instance=instance, resources=resources).success

    expected_keys = sorted(f"{t}.seed{s}" for t in TINY_TASKS for s in TINY_SEEDS)
    assert sorted(instance.get_dynamic_partitions("runs")) == expected_keys
    table = pl.read_parquet(tmp_path / "discovered_runs.parquet")
    ignored = table.filter(pl.col("status") == "ignored")
    assert ignored["run_name"].to_list() == ["unmatched-run-name"]

    for key in expected_keys:
        result = dg.materialize(
            [discovered_runs, reward_streams],
            selection=[reward_streams],
            partition_key=key,
            instance=instance,
            resources=resources,
        )
        assert result.success, key

    # every logged value comes back, per label, in order, with stale repeats flagged
    for task, labels in TINY_TASKS.items():
        for seed in TINY_SEEDS:
            df = pl.read_parquet(tmp_path / task / f"{seed}.parquet")
            meta = read_json(tmp_path / task / f"{seed}.metadata.json")
            assert meta["row_counts"]["epoch"] == TINY_EPOCHS * len(labels) == df.height
            assert meta["task"] == task and meta["seed"] == seed
            assert meta["lp_config"] == {"ema_timescale": 0.001}
            for label in labels:
                series = df.filter(pl.col("label") == label).sort("sample_index")
                expected = [tiny_label_reward(task, label, seed, e) for e in range(TINY_EPOCHS)]
                assert series["reward"].to_list() == expected
                assert series["agent_step"].to_list() == [
                    (e + 1) * 1000 for e in range(TINY_EPOCHS)
                ]
                stale = [e % 3 == 2 for e in range(TINY_EPOCHS)]
                assert series["is_stale"].to_list() == stale
                assert series["sps"].to_list() == [5000.0 + 10 * e for e in range(TINY_EPOCHS)]

    mats = instance.get_latest_materialization_event(dg.AssetKey("reward_streams"))
    assert mats is not None


def test_corrupt_run_among_good_ones(tiny_offline_dir, tmp_path, instance):
    offline = tmp_path / "offline"
    shutil.copytree(tiny_offline_dir, offline)
    files = sorted(offline.rglob("run-alice.assembly_lines.seed2.wandb"))
    assert len(files) == 1
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte mid-file: bad CRC
    files[0].write_bytes(bytes(data))
    junk = offline / "wandb" / "offline-run-junk" / "run-junk.wandb"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"this is not a wandb file" * 10)

    out = tmp_path / "data"
    resources = _resources(offline, out)
    assert dg.materialize([discovered_runs], instance=instance, resources=resources).success
    table = pl.read_parquet(out / "discovered_runs.parquet")
    unreadable = table.filter(pl.col("status") == "unreadable")
    assert any("run-junk.wandb" in r for r in unreadable["reason"].to_list())

    results = {}
    for key in instance.get_dynamic_partitions("runs"):
        res = dg.materialize(
            [discovered_runs, reward_streams],
            selection=[reward_streams],
            partition_key=key,
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        results[key] = res
    good = {k for k, r in results.items() if r.success}
    assert good >= {"fixed_maps.seed1", "fixed_maps.seed2", "assembly_lines.seed1"}
    if "assembly_lines.seed2" in results:  # listed (run record readable) but fails loudly
        bad = results["assembly_lines.seed2"]
        assert not bad.success
        message = " ".join(
            ev.step_failure_data.error.message for ev in bad.all_events if ev.is_step_failure
        )
        assert "run-alice.assembly_lines.seed2.wandb" in message and "offset" in message
        assert not (out / "assembly_lines" / "2.parquet").exists()
    else:
        reasons = " ".join(unreadable["reason"].to_list())
        assert "run-alice.assembly_lines.seed2.wandb" in reasons and "offset" in reasons


def test_rts_source_selects_the_run_source(monkeypatch):
    from rts_dagster.defs.resources import WandbRunsSource, run_source_from_env

    monkeypatch.delenv("RTS_SOURCE", raising=False)
    assert isinstance(run_source_from_env(), OfflineRunsSource)
    monkeypatch.setenv("RTS_SOURCE", "wandb")
    monkeypatch.setenv("RTS_WANDB_ENTITY", "team")
    monkeypatch.setenv("RTS_WANDB_PROJECT", "proj")
    chosen = run_source_from_env()
    assert isinstance(chosen, WandbRunsSource)
    assert (chosen.entity, chosen.project) == ("team", "proj")
    monkeypatch.setenv("RTS_SOURCE", "nope")
    with pytest.raises(ValueError, match="RTS_SOURCE"):
        run_source_from_env()
