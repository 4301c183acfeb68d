"""Learning slopes: OLS over agent-step bin means with a t interval; checked against
numpy's polyfit and for coverage on serially dependent streams with a known trend."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import signal

from rts_dagster.analysis.learning import learning_slopes, learning_summary


def streams(rewards: np.ndarray, steps: np.ndarray, runs: int = 1) -> pl.DataFrame:
    """(runs, samples) rewards of one label, one run per row."""
    n = rewards.shape[1]
    return pl.DataFrame(
        {
            "task": "t",
            "seed": np.repeat(np.arange(runs), n),
            "run_id": np.repeat([f"r{i}" for i in range(runs)], n),
            "label": "a",
            "granularity": "completion",
            "agent_step": np.tile(steps, runs),
            "reward": rewards.ravel(),
        }
    )


def test_slope_is_polyfit_over_bin_means():
    rng = np.random.default_rng(3)
    steps = np.sort(rng.integers(0, 2_000_000, 400))
    reward = 0.2 + 1e-7 * steps + rng.normal(0, 0.1, 400)
    got = learning_slopes(streams(reward[None], steps), n_bins=10).row(0, named=True)
    edges = (steps - steps.min()) / (steps.max() - steps.min()) * 10
    b = np.clip(np.floor(edges), 0, 9).astype(int)
    xs = np.array([steps[b == k].mean() for k in range(10)]) / 1e6
    ys = np.array([reward[b == k].mean() for k in range(10)])
    assert got["slope"] == pytest.approx(np.polyfit(xs, ys, 1)[0], rel=1e-10)
    assert got["n_bins"] == 10 and "df=8" in got["method"]
    assert got["ci_low"] < got["slope"] < got["ci_high"]


def test_binned_interval_covers_the_trend_under_serial_dependence():
    # AR(1) noise (phi 0.6) around a known line; many runs at once, one label each
    rng = np.random.default_rng(7)
    runs, n, truth = 1500, 600, 0.05  # reward per 1M agent steps
    steps = np.arange(n) * 2_000
    noise = signal.lfilter([1.0], [1.0, -0.6], rng.normal(0, 0.2, (runs, n)), axis=1)
    reward = 0.3 + truth * steps / 1e6 + noise
    table = learning_slopes(streams(reward, steps, runs), n_bins=10)
    cover = ((table["ci_low"] <= truth) & (truth <= table["ci_high"])).mean()
    assert cover >= 0.93, cover
    # the raw-sample OLS interval would be far too narrow: the binned one is wider
    assert table["n_bins"].min() == 10


def test_summary_over_seeds_and_counts():
    rng = np.random.default_rng(1)
    steps = np.arange(300) * 1_000
    rise = 0.5 * steps / 1e6 + rng.normal(0, 0.02, (3, 300))
    summary = learning_summary(learning_slopes(streams(rise, steps, 3))).row(0, named=True)
    assert summary["n_runs"] == 3 and summary["n_rising"] == 3 and summary["n_falling"] == 0
    assert summary["ci_low"] < 0.5 < summary["ci_high"]
    assert summary["method"] == "t over seeds, 95%, n=3 seeds"
    one = learning_summary(learning_slopes(streams(rise[:1], steps, 1))).row(0, named=True)
    assert one["ci_low"] is None or np.isnan(one["ci_low"])
