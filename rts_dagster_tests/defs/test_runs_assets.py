"""The Dagster wiring on a real (temporary) instance, over real offline wandb runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from rts_dagster import storage
from rts_dagster.defs.partitions import runs_partitions
from rts_dagster.defs.resources import OfflineRunsSource, RtsStorage
from rts_dagster.defs.runs import SchemaMemo, discovered_runs, reward_streams
from rts_dagster.schema import SERIES_QUALITY
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


def test_discover_register_and_materialize_every_partition(
    tiny_offline_dir, tmp_path, instance, monkeypatch
):
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
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
    # every run links to its WandB page: the offline run records hold entity `tests`,
    # project `rts-test`, and the run id (= the run name in these runs)
    last_key = expected_keys[-1]
    url = f"https://wandb.ai/tests/rts-test/runs/alice.{last_key}"
    assert mats.asset_materialization.partition == last_key
    link = mats.asset_materialization.metadata["wandb_url"]
    assert isinstance(link, dg.UrlMetadataValue) and link.url == url
    urls = dict(zip(table["run_id"], table["url"], strict=True))
    assert urls == {rid: f"https://wandb.ai/tests/rts-test/runs/{rid}" for rid in urls}


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


def _record(run_id: str, created_min: int):
    from datetime import UTC, datetime, timedelta

    from rts_dagster.sources.base import RunRecord

    created = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=created_min)
    return RunRecord(
        run_id=run_id,
        run_name="alice.fixed_maps.seed1",
        project="metta",
        entity="team",
        tags=(),
        config={},
        state="finished",
        created_at=created,
        heartbeat_at=created,
        source="offline",
        location=f"/runs/{run_id}.wandb",
        fingerprint="f",
    )


def test_write_discovered_keeps_keys_across_refreshes(tmp_path):
    """The asset and the sensor discover through write_discovered: the run found first
    keeps its key when an older run of the same (task, seed) appears, and a key registered
    for a run that vanished is not handed to the next one."""
    from rts_dagster.defs.runs import write_discovered
    from rts_dagster.discovery import DiscoveryRules

    rules = DiscoveryRules()
    newer, older = _record("newer", 10), _record("older", 0)
    _, _, new_keys = write_discovered([newer], [], rules, tmp_path, set())
    assert new_keys == ["fixed_maps.seed1"]
    table, _, new_keys = write_discovered([older, newer], [], rules, tmp_path, set(new_keys))
    keys = dict(zip(table["run_id"], table["partition_key"], strict=True))
    assert keys == {"newer": "fixed_maps.seed1", "older": "fixed_maps.seed1.older"}
    assert new_keys == ["fixed_maps.seed1.older"]

    fresh = tmp_path / "fresh"
    known = set(write_discovered([newer], [], rules, fresh, set())[2])
    write_discovered([], [], rules, fresh, known)  # the run is gone from the source
    table, _, _ = write_discovered([older], [], rules, fresh, known)
    assert table["partition_key"].to_list() == ["fixed_maps.seed1.older"]


def test_reward_streams_never_overwrites_another_runs_file(tiny_offline_dir, tmp_path, instance):
    import json

    resources = _resources(tiny_offline_dir, tmp_path)
    assert dg.materialize([discovered_runs], instance=instance, resources=resources).success
    key = "fixed_maps.seed1"
    kwargs = dict(selection=[reward_streams], partition_key=key, instance=instance)
    assert dg.materialize([discovered_runs, reward_streams], resources=resources, **kwargs).success
    meta_path = tmp_path / "fixed_maps" / "1.metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["run_id"] = "another-run"  # as if another run had written this partition
    meta_path.write_text(json.dumps(meta))
    parquet = tmp_path / "fixed_maps" / "1.parquet"
    before = parquet.read_bytes()
    result = dg.materialize(
        [discovered_runs, reward_streams], resources=resources, raise_on_error=False, **kwargs
    )
    assert not result.success
    message = " ".join(
        ev.step_failure_data.error.message for ev in result.all_events if ev.is_step_failure
    )
    assert "another-run" in message and "not overwriting" in message
    assert parquet.read_bytes() == before
    assert json.loads(meta_path.read_text())["run_id"] == "another-run"


# (config, the secret that must not survive): secrets by key name and by value shape.
_SECRET_CORPUS = [
    ({"pwd": "hunter2hunter2"}, "hunter2hunter2"),
    ({"db": {"passphrase": "correct horse battery"}}, "correct horse battery"),
    ({"auth": "s3cr3t-value"}, "s3cr3t-value"),
    ({"wandb_api_key": "0123456789abcdef0123456789abcdef01234567"}, "0123456789abcdef0123"),
    ({"headers": {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.payload"}}, "eyJhbGciOi"),
    ({"note": "sent Authorization: Bearer abcdEFGH12345678xyz"}, "abcdEFGH12345678xyz"),
    ({"database_url": "postgresql://metta:pa55w0rd@db.internal:5432/runs"}, "pa55w0rd"),
    ({"mirror": "https://bob:tok3n!x@git.example.com/repo.git"}, "tok3n!x"),
    ({"cmd": "python train.py --wandb-api-key=abc123def456 --epochs 5"}, "abc123def456"),
    ({"argv": ["train.py", "--hf-token", "hf_ZZtopSecret99"]}, "hf_ZZtopSecret99"),
    ({"argv": ["train.py", "--access_token=qwerty-12345"]}, "qwerty-12345"),
    ({"env": "WANDB_API_KEY=9f8e7d6c5b4a39281706f5e4d3c2b1a0ffeeddcc run"}, "9f8e7d6c5b4a3928"),
    ({"setup": "export DB_PASSWORD=opensesame42 && run"}, "opensesame42"),
    (
        {"blob": "use aK9fLq2ZxR7vT1mN8pW3sY6dG4hJ0cBe to log in"},
        "aK9fLq2ZxR7vT1mN8pW3sY6dG4hJ0cBe",
    ),
    ({"login": "wandb login 3c9d0f7a8b1e2d4c6a5f7e9d8c0b1a2f3e4d5c6b"}, "3c9d0f7a8b1e2d4c"),
]

# Values that must survive unchanged (what the report and the LP analysis need).
_PLAIN_CORPUS = {
    "ema_timescale": 0.001,
    "num_active_tasks": 64,
    "git_hash": "0123456789abcdef0123456789abcdef01234567",
    "checkpoint_dir": "/home/alice/checkpoints/assembly_lines_seed_1_2026_01_05",
    "wandb_url": "https://wandb.ai/metta-research/metta/runs/abc123",
    "label": "env_per_label_rewards/assembly_lines_navigation_hard_v2",
    "cmd": "python train.py --epochs 5 --lr 0.001",
    "tags": ["user:alice", "lp"],
    "flag": True,
}


@pytest.mark.parametrize(("config", "secret"), _SECRET_CORPUS)
def test_redact_removes_secrets_by_key_and_by_value(config, secret):
    import json

    from rts_dagster.defs.runs import redact

    stored = json.dumps(redact({"trainer": config, "seed": 1}))
    assert secret not in stored
    assert "<redacted>" in stored and '"seed": 1' in stored


def test_redact_keeps_ordinary_config_values():
    from rts_dagster.defs.runs import redact

    assert redact(_PLAIN_CORPUS) == _PLAIN_CORPUS


def test_the_schema_memo_reads_a_footer_once_per_version_of_a_file(
    tmp_path: Path, monkeypatch
) -> None:
    calls: list[Path] = []
    real = pl.read_parquet_schema

    def counting(path):  # type: ignore[no-untyped-def]
        calls.append(Path(path))
        return real(path)

    good = tmp_path / "good.parquet"
    old = tmp_path / "old.parquet"
    storage.write_parquet(pl.DataFrame(schema=SERIES_QUALITY), good)
    storage.write_parquet(pl.DataFrame({"run_id": ["r"]}), old)  # an older schema
    monkeypatch.setattr(pl, "read_parquet_schema", counting)
    memo = SchemaMemo(tmp_path)
    assert memo.has_schema(good, SERIES_QUALITY) and not memo.has_schema(old, SERIES_QUALITY)
    assert not memo.has_schema(tmp_path / "missing.parquet", SERIES_QUALITY)
    memo.save()
    again = SchemaMemo(tmp_path)  # a new process: from the saved memo
    assert again.has_schema(good, SERIES_QUALITY) and not again.has_schema(old, SERIES_QUALITY)
    assert len(calls) == 2
    # a rewritten file is read again, and gives its new answer
    storage.write_parquet(pl.DataFrame(schema=SERIES_QUALITY), old)
    stat = old.stat()
    os.utime(old, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert again.has_schema(old, SERIES_QUALITY) and len(calls) == 3
    # files not checked any more are forgotten
    only_good = SchemaMemo(tmp_path)
    only_good.has_schema(good, SERIES_QUALITY)
    only_good.save(forget_unseen=True)
    assert set(storage.read_json(only_good.path)) == {str(good)}
