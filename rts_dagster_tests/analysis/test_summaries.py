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
