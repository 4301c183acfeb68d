"""Degenerate series and runs are classified, named, and kept out of what they cannot feed."""

from __future__ import annotations

import numpy as np
import polars as pl

from rts_dagster.analysis import quality
from rts_dagster.schema import REWARD_STREAMS, conform


def _series(run: str, label: str, rewards, granularity="epoch", seed=1, task="t") -> pl.DataFrame:
    rewards = np.asarray(rewards, dtype=np.float64)
    prev = np.concatenate([[np.nan], rewards[:-1]])
    return conform(
        pl.DataFrame(
            {
                "task": task,
                "seed": seed,
                "run_id": run,
                "label": label,
                "granularity": granularity,
                "sample_index": np.arange(rewards.size),
                "agent_step": np.arange(rewards.size) * 100,
                "epoch": np.arange(rewards.size),
                "reward": rewards,
                "sps": 1000.0,
                "is_stale": (rewards == prev) & (granularity == "epoch"),
            }
        ),
        REWARD_STREAMS,
    )


def _streams(rng) -> pl.DataFrame:
    noisy = 0.5 + 0.1 * rng.standard_normal(200)
    stuck = np.concatenate([[0.3], np.full(1244, 0.5)])  # the reviewer's 1,244 of 1,245
    solved = np.ones(300)
    return pl.concat(
        [
            _series("r1", "a", noisy),
            _series("r1", "b", stuck),
            _series("r1", "c", solved),
            _series("r2", "a", noisy[:6]),  # died early
            _series("r2", "b", [np.nan] * 4),
            _series("r3", "a", solved, granularity="completion"),  # repeats are real here
        ]
    )


def test_each_degenerate_kind_gets_its_status_and_a_reason(rng):
    q = quality.series_quality(_streams(rng))
    got = {(r["run_id"], r["label"], r["granularity"]): r for r in q.iter_rows(named=True)}
    assert got[("r1", "a", "epoch")]["status"] == "ok"
    assert got[("r1", "a", "epoch")]["reason"] == ""
    stuck = got[("r1", "b", "epoch")]
    assert stuck["status"] == "mostly_stale"
    # 0.5 appears 1,244 times; the first of them is new, the other 1,243 repeat it
    assert "1243 of 1245 rows repeat" in stuck["reason"]
    # a genuinely constant series is not called stale
    assert got[("r1", "c", "epoch")]["status"] == "constant"
    assert "constant at 1 over 300 samples" in got[("r1", "c", "epoch")]["reason"]
    assert got[("r3", "a", "completion")]["status"] == "constant"
    assert got[("r2", "a", "epoch")]["status"] == "too_short"
    assert "only 6 usable samples" in got[("r2", "a", "epoch")]["reason"]
    assert got[("r2", "b", "epoch")]["status"] == "no_finite"


def test_purposes_keep_constant_series_for_levels_only(rng):
    streams = _streams(rng)
    q = quality.series_quality(streams)
    level = quality.keep_usable(streams, q, quality.PURPOSE_LEVEL)
    dynamics = quality.keep_usable(streams, q, quality.PURPOSE_DYNAMICS)
    assert set(level.select("run_id", "label").unique().iter_rows()) == {
        ("r1", "a"),
        ("r1", "c"),
        ("r3", "a"),
    }
    assert set(dynamics.select("run_id", "label").unique().iter_rows()) == {("r1", "a")}


def test_runs_that_contribute_nothing_are_named_as_whole_runs(rng):
    q = quality.series_quality(_streams(rng))
    runs = quality.run_quality(q)
    r2 = runs.filter(pl.col("run_id") == "r2").row(0, named=True)
    assert not r2["contributes_dynamics"] and not r2["contributes_level"]
    assert "2 of 2 series left out" in r2["reason"]
    out = quality.left_out(q, quality.PURPOSE_DYNAMICS)
    whole = out.filter(pl.col("label") == "*")
    assert set(whole["run_id"]) == {"r2", "r3"}
    assert "all 2 labels unusable" in whole.filter(pl.col("run_id") == "r2")["reason"][0]
    # r1 contributes: its bad labels are listed one by one
    assert set(out.filter(pl.col("run_id") == "r1")["label"]) == {"b", "c"}


def test_granularity_runs_keeps_mixed_tasks_apart(rng):
    q = quality.series_quality(
        pl.concat(
            [
                _series("r1", "a", 0.5 + 0.1 * rng.standard_normal(50), granularity="completion"),
                _series("r1", "a", 0.5 + 0.1 * rng.standard_normal(50)),
                _series("r2", "a", 0.5 + 0.1 * rng.standard_normal(50)),
            ]
        )
    )
    table = quality.granularity_runs(q)
    assert table.rows() == [("t", "completion", ["r1"], 1), ("t", "epoch", ["r1", "r2"], 2)]
