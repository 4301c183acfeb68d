"""Degenerate series and runs are classified, named, and kept out of what they cannot feed."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from rts_dagster.analysis import kalman, quality
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


def test_absurd_rewards_are_flagged_per_series_with_their_count(rng):
    # issue 10 #12: a 1e300 (or inf) reward is a corrupt log, not a sample
    base = 0.5 + 0.1 * rng.standard_normal(60)
    huge, inf = base.copy(), base.copy()
    huge[[7, 40]] = [1e300, -2e6]
    inf[3] = np.inf
    at_bound = base.copy()
    at_bound[0] = quality.REWARD_BOUND  # the bound itself is still a value
    many_nan, few_nan = base.copy(), base.copy()
    many_nan[:7] = np.nan  # 7 of 60 > 10%
    few_nan[:6] = np.nan  # 6 of 60 = 10%: not more than the share
    q = quality.series_quality(
        pl.concat(
            [
                _series("r1", "huge", huge),
                _series("r1", "inf", inf, granularity="completion"),
                _series("r1", "at_bound", at_bound),
                _series("r1", "many_nan", many_nan),
                _series("r1", "few_nan", few_nan),
            ]
        )
    )
    got = {r["label"]: r for r in q.iter_rows(named=True)}
    assert got["huge"]["status"] == quality.STATUS_ABSURD == "absurd_values"
    assert got["huge"]["reason"].startswith("2 of 60 rewards infinite or beyond +-1e+06")
    assert "largest |reward| 1e+300" in got["huge"]["reason"]
    # the corrupt values do not leak into the summary columns
    assert got["huge"]["reward_max"] == pytest.approx(np.delete(base, [7, 40]).max())
    assert got["huge"]["n_finite"] == 58
    assert got["inf"]["status"] == "absurd_values"
    assert got["inf"]["reason"].startswith("1 of 60 rewards")
    assert got["at_bound"]["status"] == "ok"
    assert got["many_nan"]["status"] == "absurd_values"
    assert ", 7 NaN" in got["many_nan"]["reason"]
    assert got["few_nan"]["status"] == "ok"


def test_absurd_series_feed_no_estimate_and_pooled_timescales_stay_finite(rng):
    # Three seeds of two labels; one seed of `broken` logged a 1e300. The pipeline's pooled
    # timescales must equal those computed with that series removed by hand.
    parts = []
    for seed in (1, 2, 3):
        for label in ("normal", "broken"):
            r = 0.5 + np.cumsum(0.02 * rng.standard_normal(120)) + 0.1 * rng.standard_normal(120)
            if label == "broken" and seed == 2:
                r[40] = 1e300
            parts.append(_series(f"r{seed}", label, r, granularity="completion", seed=seed))
    streams = pl.concat(parts)
    q = quality.series_quality(streams)
    for purpose in (quality.PURPOSE_LEVEL, quality.PURPOSE_DYNAMICS):
        kept = quality.keep_usable(streams, q, purpose)
        assert kept.height == 5 * 120
        assert ("r2", "broken") not in set(kept.select("run_id", "label").unique().iter_rows())
        assert np.isfinite(kept["reward"].to_numpy()).all()
    by_hand = streams.filter(~((pl.col("run_id") == "r2") & (pl.col("label") == "broken")))
    with np.errstate(all="ignore"):
        got = kalman.recommend_timescales(
            kalman.estimate_local_level(quality.keep_usable(streams, q, quality.PURPOSE_DYNAMICS))
        )
        want = kalman.recommend_timescales(kalman.estimate_local_level(by_hand))
    cols = ["group", "label", "regime", "timescale", "timescale_ci_low", "timescale_ci_high"]
    assert_frame_equal(got.select(cols), want.select(cols))
    pooled = got.filter((pl.col("group") == "pooled") & (pl.col("regime") == "whole"))
    assert np.isfinite(pooled["timescale"].to_numpy()).all()
    runs = quality.run_quality(q).filter(pl.col("run_id") == "r2").row(0, named=True)
    assert "1 absurd values" in runs["reason"]
