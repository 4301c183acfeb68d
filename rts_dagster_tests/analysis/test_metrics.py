"""Per-series metrics checked against independent references (numpy.polyfit, numpy.std,
pandas.ewm, scipy.stats, direct formulas), plus edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import polars as pl
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from polars.testing import assert_frame_equal
from scipy import stats

from rts_dagster.analysis.metrics import (
    MetricsConfig,
    compute_metrics,
    diff_noise,
    ema_slope,
    noise_by_progress,
    rolling_metrics,
    rolling_ols_slope,
    rolling_std,
    series_metrics,
)
from rts_dagster.schema import (
    NOISE_BY_PROGRESS,
    REWARD_STREAMS,
    ROLLING_METRICS,
    SERIES_METRICS,
    conform,
)

SLOPE_RTOL = 1e-9  # |ours - reference| <= 1e-9 * (std of the reference slopes)


def make_series(
    y: np.ndarray,
    label: str = "lab",
    seed: int = 1,
    task: str = "task",
    granularity: str = "completion",
    sps: np.ndarray | None = None,
    stale: np.ndarray | None = None,
) -> pl.DataFrame:
    n = len(y)
    frame = pl.DataFrame(
        {
            "task": [task] * n,
            "seed": [seed] * n,
            "run_id": [f"{task}.seed{seed}"] * n,
            "label": [label] * n,
            "granularity": [granularity] * n,
            "sample_index": np.arange(n),
            "agent_step": np.arange(n) * 1000,
            "epoch": np.arange(n),
            "reward": np.asarray(y, dtype=np.float64),
            "sps": np.full(n, 5000.0) if sps is None else sps,
            "is_stale": np.zeros(n, dtype=bool) if stale is None else stale,
        }
    )
    return conform(frame, REWARD_STREAMS)


def polyfit_slopes(y: np.ndarray, w: int) -> np.ndarray:
    x = np.arange(w)
    return np.array([np.polyfit(x, y[t - w + 1 : t + 1], 1)[0] for t in range(w - 1, len(y))])


def ragged(rng: np.random.Generator, n_series: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(1, max_len, size=n_series)
    starts = np.cumsum(lengths) - lengths
    level = np.repeat(rng.normal(0, 50, n_series), lengths)
    scale = np.repeat(rng.uniform(0.01, 5, n_series), lengths)
    y = (
        1e3
        + level
        + np.cumsum(rng.normal(0, 0.1, lengths.sum()))
        + rng.normal(size=lengths.sum()) * scale
    )
    return y, starts


# --- rolling primitives vs references ------------------------------------------------------


def test_rolling_slope_matches_polyfit_on_ragged_series(rng: np.random.Generator) -> None:
    y, starts = ragged(rng, 40, 200)  # many series shorter than the window, many block edges
    got = rolling_ols_slope(y, 25, starts)
    ends = np.append(starts[1:], len(y))
    for a, b in zip(starts, ends, strict=True):
        if b - a < 25:
            assert np.isnan(got[a:b]).all()
            continue
        ref = polyfit_slopes(y[a:b], 25)
        assert np.isnan(got[a : a + 24]).all()
        scale = max(ref.std(), 1e-12)
        np.testing.assert_allclose(got[a + 24 : b], ref, rtol=0, atol=SLOPE_RTOL * scale)


def test_rolling_slope_long_series_large_offset(rng: np.random.Generator) -> None:
    """1e5 samples around 1e3: every window vs a per-window centred reference, a sample of
    windows vs numpy.polyfit, and proof the tolerance would catch a global cumsum."""
    n, w = 100_000, 25
    y = 1e3 + np.cumsum(rng.normal(0, 0.01, n)) + rng.normal(0, 0.05, n)
    got = rolling_ols_slope(y, w)
    win = sliding_window_view(y, w)
    xc = np.arange(w) - (w - 1) / 2
    ref = (win - win.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)  # centred per window
    scale = ref.std()
    atol = SLOPE_RTOL * scale
    np.testing.assert_allclose(got[w - 1 :], ref, rtol=0, atol=atol)
    picks = np.unique(np.r_[0, len(ref) - 1, rng.integers(0, len(ref), 1500), np.arange(30, 200)])
    fit = np.array([np.polyfit(np.arange(w), win[i], 1)[0] for i in picks])
    np.testing.assert_allclose(got[w - 1 :][picks], fit, rtol=0, atol=atol)
    # The unstable textbook formula (global cumulative sums) misses this tolerance.
    t = np.arange(n, dtype=np.float64)
    c0, c1 = np.cumsum(np.r_[0.0, y]), np.cumsum(np.r_[0.0, t * y])
    s0, s1 = c0[w:] - c0[:-w], c1[w:] - c1[:-w]
    tbar = np.arange(n - w + 1) + (w - 1) / 2
    naive = (s1 - tbar * s0) / (xc @ xc)
    assert np.max(np.abs(naive - ref)) > 100 * atol


def test_rolling_std_matches_numpy(rng: np.random.Generator) -> None:
    y, starts = ragged(rng, 30, 300)
    y[starts[3] : starts[3] + 40] = 1234.5  # a constant stretch: exactly zero std
    got = rolling_std(y, 10, starts)
    ends = np.append(starts[1:], len(y))
    for a, b in zip(starts, ends, strict=True):
        assert np.isnan(got[a : min(a + 9, b)]).all()
        if b - a >= 10:
            ref = sliding_window_view(y[a:b], 10).std(axis=1, ddof=1)
            np.testing.assert_allclose(got[a + 9 : b], ref, rtol=1e-9, atol=1e-300)
    # Tiny noise on a large offset and a trend: no cancellation.
    z = 1e3 + np.linspace(0, 50, 50_000) + rng.normal(0, 1e-3, 50_000)
    ref = sliding_window_view(z, 10).std(axis=1, ddof=1)
    np.testing.assert_allclose(rolling_std(z, 10)[9:], ref, rtol=1e-7)


def test_ema_slope_matches_pandas_ewm(rng: np.random.Generator) -> None:
    y, starts = ragged(rng, 25, 3000)
    got = ema_slope(y, 25.0, starts)
    ends = np.append(starts[1:], len(y))
    for a, b in zip(starts, ends, strict=True):
        assert np.isnan(got[a])
        if b - a > 1:
            d = pd.Series(np.diff(y[a:b]))
            ref = d.ewm(halflife=25.0, adjust=True).mean().to_numpy()
            np.testing.assert_allclose(got[a + 1 : b], ref, rtol=1e-9, atol=1e-12 * np.abs(d).max())


def test_noise_estimators_recover_sigma_under_a_strong_trend() -> None:
    """Learning curve 2.0 / (1 + exp(-(t - 5000) / 1500)) + N(0, 1e-3) on 10k samples.

    At its steepest the curve climbs 0.33 sigma per sample. A 10-sample window then
    holds a trend whose variance m^2 w(w+1)/12 ~ 9 m^2 is added to sigma^2, so the rolling
    std overstates sigma by >5%; first differences only carry m^2 / 2 (plus the spread of
    m), so std(diff)/sqrt(2) and the MAD version stay within 5%."""
    sigma = 1e-3
    t = np.arange(10_000)
    y = 2.0 / (1.0 + np.exp(-(t - 5000) / 1500)) + np.random.default_rng(7).normal(0, sigma, t.size)
    noise_diff, noise_mad = diff_noise(y)
    assert noise_diff == pytest.approx(sigma, rel=0.05)
    assert noise_mad == pytest.approx(sigma, rel=0.05)
    assert np.nanmean(rolling_std(y, 10)) > 1.05 * sigma
    row = series_metrics(make_series(y)).row(0, named=True)
    assert row["noise_diff"] == pytest.approx(noise_diff, rel=1e-9)
    assert row["noise_mad"] == pytest.approx(noise_mad, rel=1e-9)


# --- tables --------------------------------------------------------------------------------


def mixed_streams(rng: np.random.Generator) -> pl.DataFrame:
    sps = rng.normal(5000, 300, 400)
    parts = [
        make_series(rng.normal(size=400).cumsum() * 0.1 + rng.normal(size=400), "a", sps=sps),
        make_series(np.full(60, 0.25), "const"),
        make_series(rng.normal(size=12), "short"),
        make_series(np.array([0.7]), "single"),
        make_series(np.array([1.0, np.nan, np.inf, 2.0, -np.inf, 4.0, 3.0]), "nonfinite"),
        make_series(
            np.repeat(rng.normal(size=50), 2),
            "ep",
            task="other",
            granularity="epoch",
            stale=np.tile([False, True], 50),
        ),
    ]
    return pl.concat(parts)


def test_series_metrics_against_direct_formulas(rng: np.random.Generator) -> None:
    streams = mixed_streams(rng)
    cfg = MetricsConfig(spearman=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak (divide by zero, empty slices)
        out = series_metrics(streams, cfg)
    assert out.schema == SERIES_METRICS
    by = {r["label"]: r for r in out.iter_rows(named=True)}
    a = streams.filter(pl.col("label") == "a")
    y, sps = a["reward"].to_numpy(), a["sps"].to_numpy()
    r = by["a"]
    slopes = polyfit_slopes(y, 25)
    stds = sliding_window_view(y, 10).std(axis=1, ddof=1)
    d = np.diff(y)
    assert r["n_samples"] == 400 and r["n_nonfinite"] == 0 and r["stale_fraction"] == 0.0
    assert r["mean_reward"] == pytest.approx(y.mean(), rel=1e-12)
    assert r["final_reward"] == pytest.approx(y[-40:].mean(), rel=1e-12)
    assert r["mean_slope"] == pytest.approx(slopes.mean(), rel=1e-8)
    for q in (10, 50, 90):
        assert r[f"slope_p{q}"] == pytest.approx(np.quantile(slopes, q / 100), rel=1e-8)
    assert r["noise_rolling_mean"] == pytest.approx(stds.mean(), rel=1e-9)
    assert r["noise_diff"] == pytest.approx(d.std(ddof=1) / math.sqrt(2), rel=1e-9)
    mad = 1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2)
    assert r["noise_mad"] == pytest.approx(mad, rel=1e-9)
    ema = pd.Series(d).ewm(halflife=25.0, adjust=True).mean().iloc[-1]
    assert r["ema_slope_final"] == pytest.approx(ema, rel=1e-8)
    assert r["sps_reward_corr"] == pytest.approx(np.corrcoef(sps, y)[0, 1], rel=1e-9)
    assert r["sps_reward_spearman"] == pytest.approx(stats.spearmanr(sps, y)[0], rel=1e-9)
    assert r["sps_noise_corr"] == pytest.approx(np.corrcoef(sps[9:], stds)[0, 1], rel=1e-9)
    dip = sps < 0.8 * np.median(sps)
    assert r["sps_dip_fraction"] == pytest.approx(dip.mean())
    assert r["note"] == ""

    # Epoch series: stale repeats dropped (and counted) before anything is computed.
    ep = by["ep"]
    assert (ep["n_rows"], ep["n_stale"], ep["n_samples"]) == (100, 50, 50)
    assert ep["stale_fraction"] == 0.5 and ep["destaled"] is True
    fresh = streams.filter((pl.col("label") == "ep") & ~pl.col("is_stale"))["reward"].to_numpy()
    assert ep["mean_slope"] == pytest.approx(polyfit_slopes(fresh, 25).mean(), rel=1e-8)
    kept = series_metrics(streams, MetricsConfig(destale=False)).filter(pl.col("label") == "ep")
    assert kept["n_samples"].item() == 100 and kept["destaled"].item() is False


def test_edge_cases_are_nan_with_reasons(rng: np.random.Generator) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = series_metrics(mixed_streams(rng))
    by = {r["label"]: r for r in out.iter_rows(named=True)}
    const = by["const"]  # constant series: zero noise, undefined correlations, no warning
    assert const["noise_diff"] == 0.0 and const["noise_mad"] == 0.0
    assert const["noise_rolling_mean"] == 0.0
    assert const["slope_p50"] == 0.0 and abs(const["ema_slope_final"]) < 1e-15
    assert math.isnan(const["sps_noise_corr"])
    assert "zero noise" in const["note"]
    short = by["short"]  # 12 samples: no 25-sample slope, but a 10-sample std
    assert math.isnan(short["mean_slope"]) and math.isnan(short["slope_p50"])
    assert math.isfinite(short["noise_rolling_mean"]) and math.isfinite(short["noise_diff"])
    assert "shorter than slope_window=25" in short["note"]
    single = by["single"]
    assert single["n_samples"] == 1 and math.isnan(single["mean_reward"])
    assert "min_samples" in single["note"]
    nonfinite = by["nonfinite"]  # NaN, +inf, -inf dropped and counted
    assert nonfinite["n_nonfinite"] == 3 and nonfinite["n_samples"] == 4
    assert nonfinite["mean_reward"] == pytest.approx(2.5)
    assert "3 non-finite reward(s) dropped" in nonfinite["note"]
    assert out["sps_reward_spearman"].null_count() == out.height  # not computed by default

    nothing = series_metrics(make_series(np.array([np.nan, np.inf])))
    assert nothing["n_samples"].item() == 0 and math.isnan(nothing["mean_reward"].item())
    assert "no finite sample" in nothing["note"].item()
    empty = compute_metrics(pl.DataFrame(schema=REWARD_STREAMS))
    assert empty.series.height == 0 and empty.series.schema == SERIES_METRICS
    assert empty.rolling.height == 0 and empty.progress.height == 0


def test_single_label_and_input_order(rng: np.random.Generator) -> None:
    one = make_series(rng.normal(size=300), "only")
    res = compute_metrics(one)
    assert res.series.height == 1 and res.rolling.height == 300
    streams = mixed_streams(rng)
    shuffled = streams.sample(fraction=1.0, shuffle=True, seed=3)
    a = series_metrics(streams).sort("task", "label")
    b = series_metrics(shuffled).sort("task", "label")
    # Same numbers up to rounding (block anchors and summation order move with the rows).
    assert_frame_equal(a, b, check_exact=False, rel_tol=1e-9, abs_tol=1e-15)


def test_rolling_and_progress_tables(rng: np.random.Generator) -> None:
    streams = mixed_streams(rng)
    res = compute_metrics(streams)
    roll = res.rolling
    assert roll.schema == ROLLING_METRICS
    assert roll.equals(rolling_metrics(streams))
    assert roll.height == res.series["n_samples"].sum()
    ep = roll.filter(pl.col("label") == "ep")
    assert ep["sample_index"].to_list() == list(range(50))
    assert ep["raw_sample_index"].to_list() == list(range(0, 100, 2))  # stale rows removed
    a = roll.filter(pl.col("label") == "a")
    np.testing.assert_allclose(
        a["rolling_slope"].to_numpy()[24:], polyfit_slopes(a["reward"].to_numpy(), 25), atol=1e-12
    )

    prog = res.progress
    assert prog.schema == NOISE_BY_PROGRESS
    assert prog.equals(noise_by_progress(streams))
    pa = prog.filter(pl.col("label") == "a")
    assert pa["bin"].to_list() == list(range(10)) and pa["n_samples"].sum() == 400
    y = a["reward"].to_numpy()
    first = pa.row(0, named=True)
    assert first["mean_reward"] == pytest.approx(y[:40].mean())
    assert first["noise_diff"] == pytest.approx(np.diff(y[:40]).std(ddof=1) / math.sqrt(2))
    assert first["noise_rolling_mean"] == pytest.approx(
        sliding_window_view(y[:40], 10).std(axis=1, ddof=1).mean()
    )


def test_sps_dips_with_extra_noise_are_detected() -> None:
    rng = np.random.default_rng(3)
    n = 5000
    sps = np.repeat(np.where(rng.random(n // 50) < 0.2, 2500.0, 5000.0), 50)
    y = rng.normal(0, np.where(sps < 4000, 0.3, 0.1))
    row = series_metrics(make_series(y, sps=sps)).row(0, named=True)
    assert row["sps_noise_corr"] < -0.3
    assert row["noise_dip_ratio"] == pytest.approx(3.0, rel=0.15)
    assert row["sps_dip_fraction"] == pytest.approx((sps < 4000).mean())


def test_unknown_sps_gives_nan_correlations(rng: np.random.Generator) -> None:
    frame = make_series(rng.normal(size=100)).with_columns(pl.lit(None, pl.Float64).alias("sps"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = series_metrics(frame).row(0, named=True)
    assert math.isnan(row["sps_reward_corr"]) and math.isnan(row["sps_mean"])
    assert "no finite sps" in row["note"]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        MetricsConfig(slope_window=1)
    with pytest.raises(ValueError):
        rolling_ols_slope(np.array([1.0, np.nan, 2.0]), 2)
    with pytest.raises(ValueError):
        rolling_std(np.arange(5.0), 3, starts=np.array([1]))
