"""`lp_replay` and `lp_recommendations` on the tiny offline runs (epoch granularity)."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from rts_dagster import storage
from rts_dagster.analysis.lp_sweep import KALMAN_MATCHED, METTA_DEFAULT, default_sweep
from rts_dagster.definitions import ASSETS
from rts_dagster.schema import LP_RECOMMENDATIONS, LP_REPLAY_METRICS
from rts_dagster_tests.conftest import TINY_SEEDS, TINY_TASKS
from rts_dagster_tests.defs.pipeline import FAST_CLOSED_LOOP, materialized


@pytest.fixture(scope="module")
def lp_pipeline(tiny_offline_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with materialized(
        tiny_offline_dir,
        data,
        aggregates=["data_quality", "lp_recommendations"],
        run_config=FAST_CLOSED_LOOP,
    ) as (instance, resources):
        yield data, instance, resources


def test_lp_replay_files_per_partition(lp_pipeline) -> None:
    data, _, _ = lp_pipeline
    for task, labels in TINY_TASKS.items():
        for seed in TINY_SEEDS:
            paths = storage.lp_replay_paths(data, task, str(seed))
            metrics = pl.read_parquet(paths["metrics"])
            assert metrics.schema == LP_REPLAY_METRICS
            # the default matrix, plus LP at the run's own local-level gain when the
            # local-level fit defines one (kalman needs more samples than these tiny runs)
            names = [c.name for c in default_sweep(len(labels))]
            got = metrics["config"].to_list()
            assert [name for name in got if name != KALMAN_MATCHED] == names
            matched = metrics.filter(pl.col("config") == KALMAN_MATCHED)["ema_timescale"]
            assert matched.len() <= 1 and matched.is_between(0, 1, closed="right").all()
            # the tiny runs have no per-completion stream: epoch means, stale rows dropped
            assert set(metrics["granularity"]) == {"epoch"}
            assert metrics["n_completions"].unique().to_list() == [20 * len(labels)]
            trace = pl.read_parquet(paths["trace"])
            sums = trace.group_by("config", "eval_index").agg(pl.col("probability").sum())
            assert sums["probability"].is_between(1 - 1e-12, 1 + 1e-12).all()


def test_lp_recommendations_one_per_task(lp_pipeline) -> None:
    data, _, _ = lp_pipeline
    paths = storage.lp_aggregate_paths(data)
    recs = pl.read_parquet(paths["recommendations"])
    assert recs.schema == LP_RECOMMENDATIONS
    assert sorted(recs["task"]) == sorted(TINY_TASKS)
    # every tiny label rises steadily: no plateaued label, so no SNR and no change advised
    assert set(recs["config"]) == {METTA_DEFAULT}
    assert all("epoch means" in s for s in recs["sentence"])
    # epoch means only: one row per task, fed by both seeds, never actionable
    assert set(recs["granularity"]) == {"epoch"} and not recs["actionable"].any()
    assert all(len(runs) == len(TINY_SEEDS) for runs in recs["runs"].to_list())
    assert all("RewardStreamRecorder" in s for s in recs["sentence"])
    closed = pl.read_parquet(paths["closed_loop"])
    assert closed.height == 0  # nothing replayed per completion: nothing to simulate
    summary = pl.read_parquet(paths["summary"])
    assert set(summary["task"]) == set(TINY_TASKS)


def test_lp_replay_names_a_missing_stream_file(lp_pipeline) -> None:
    data, instance, resources = lp_pipeline
    key = "assembly_lines.seed1"
    stream = storage.stream_paths(data, "assembly_lines", "1")[0]
    moved = stream.with_suffix(".moved")
    stream.rename(moved)
    try:
        result = dg.materialize(
            ASSETS,
            selection=["lp_replay"],
            partition_key=key,
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
    finally:
        moved.rename(stream)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message
    assert str(stream) in message and "materialize reward_streams[assembly_lines.seed1]" in message


def test_lp_replay_checks_itself_against_the_stepwise_reference(lp_pipeline) -> None:
    _, instance, resources = lp_pipeline
    result = dg.materialize(
        ASSETS,
        selection=["lp_replay"],
        partition_key="fixed_maps.seed2",
        instance=instance,
        resources=resources,
    )
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert set(checks) == {"distributions_valid", "matches_stepwise_reference"}
    assert all(c.passed for c in checks.values())
    deviation = checks["matches_stepwise_reference"].metadata["max_probability_deviation"]
    assert deviation.value <= 1e-12
