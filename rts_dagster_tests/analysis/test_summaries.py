"""The report's answers to 'does noise shrink?' and 'do SPS dips bring noise?'."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats

from rts_dagster.analysis import summaries


def _progress(first: np.ndarray, last: np.ndarray) -> pl.DataFrame:
    """NOISE_BY_PROGRESS-like rows: 3 bins per (seed, label), noise given for bins 0 and 2."""
    seeds, labels = first.shape
    rows = []
    for s in range(seeds):
        for j in range(labels):
            for b, value in ((0, first[s, j]), (1, 1.0), (2, last[s, j])):
                rows.append(
                    {
                        "task": "t",
                        "seed": s,
                        "run_id": f"r{s}",
                        "label": f"l{j}",
                        "granularity": "completion",
                        "bin": b,
                        "noise_diff": value,
                    }
                )
    return pl.DataFrame(rows)


def test_noise_trend_is_a_t_interval_on_logs_over_seeds(rng):
    first = np.exp(rng.normal(0, 0.1, (3, 4)))
    last = first * np.exp(rng.normal(np.log(0.5), 0.2, (3, 4)))
    row = summaries.noise_trend(_progress(first, last)).row(0, named=True)
    per_seed = np.log(last / first).mean(axis=1)  # geometric mean over labels, per seed
    half = stats.t.ppf(0.975, 2) * per_seed.std(ddof=1) / np.sqrt(3)
    assert row["estimate"] == pytest.approx(np.exp(per_seed.mean()))
    assert (row["low"], row["high"]) == pytest.approx(
        (np.exp(per_seed.mean() - half), np.exp(per_seed.mean() + half))
    )
    assert (row["n"], row["n_series"], row["method"]) == (3, 12, "t on logs")


def test_sps_noise_means_labels_then_seeds():
    series = pl.DataFrame(
        {
            "task": "t",
            "granularity": "epoch",
            "seed": [1, 1, 2, 2, 3, 3],
            "run_id": ["a", "a", "b", "b", "c", "c"],
            "sps_noise_corr": [-0.4, -0.2, -0.5, -0.3, -0.2, float("nan")],
        }
    )
    row = summaries.sps_noise(series).row(0, named=True)
    per_seed = np.array([-0.3, -0.4, -0.2])
    assert row["estimate"] == pytest.approx(per_seed.mean())
    assert row["n"] == 3 and row["n_series"] == 5


def test_sentences_follow_the_interval_side():
    from rts_dagster.report.build import noise_trend_sentences, sps_noise_sentences

    table = pl.DataFrame(
        {
            "task": ["a", "b", "c"],
            "granularity": "completion",
            "estimate": [0.5, 1.4, 1.0],
            "low": [0.4, 1.2, 0.8],
            "high": [0.6, 1.6, 1.3],
            "method": "t on logs",
            "n": 3,
            "n_series": 9,
        }
    )
    shrink, grow, unclear = noise_trend_sentences(table)
    assert "noise shrinks" in shrink and "n=3 seeds" in shrink
    assert "noise grows" in grow and "does not clearly change" in unclear
    corr = table.with_columns(
        pl.Series("low", [-0.5, 0.1, -0.2]), pl.Series("high", [-0.1, 0.3, 0.2])
    )
    dips, higher, none = sps_noise_sentences(corr)
    assert "SPS dips come with noisier rewards" in dips
    assert "higher when SPS is higher" in higher and "no clear link" in none


def test_each_task_gets_the_interval_of_its_own_seeds(rng):
    """Tasks with 1 to 5 seeds and two granularities, in one call: each row is the scalar
    interval (`intervals.t_interval` / `log_t_interval`) of that task's per-seed values."""
    from rts_dagster.analysis.intervals import log_t_interval, t_interval

    rows = []
    for t in range(12):
        for gran in ("epoch", "completion"):
            for seed in range(1, 1 + t % 5 + 1):
                for label in range(3):
                    rows.append(
                        {
                            "task": f"task{t:02d}",
                            "granularity": gran,
                            "seed": seed,
                            "run_id": f"r{t}.{seed}",
                            "label": f"l{label}",
                            "sps_noise_corr": float(rng.normal(-0.2, 0.2)),
                        }
                    )
    series = pl.DataFrame(rows)
    got = summaries.sps_noise(series)
    assert got.height == 24
    for row in got.iter_rows(named=True):
        part = series.filter(
            (pl.col("task") == row["task"]) & (pl.col("granularity") == row["granularity"])
        )
        per_seed = part.group_by("seed").agg(pl.col("sps_noise_corr").mean())["sps_noise_corr"]
        want = t_interval(per_seed.to_numpy())
        assert row["estimate"] == pytest.approx(want.estimate, rel=1e-12)
        assert (row["n"], row["method"], row["n_series"]) == (want.n, want.method, part.height)
        if want.n < 2:
            assert np.isnan(row["low"]) and np.isnan(row["high"])
        else:
            assert (row["low"], row["high"]) == pytest.approx((want.low, want.high), rel=1e-12)
        positive = per_seed.to_numpy() + 1.0
        assert log_t_interval(positive).method == summaries.LOG_T_METHOD
