"""Intervals against published and closed-form references, and their edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from rts_dagster.analysis import intervals as iv

# Shrout & Fleiss (1979), Table 2: 6 targets (rows) rated by 4 judges (columns).
SHROUT_FLEISS = np.array(
    [
        [9, 2, 5, 8],
        [6, 1, 3, 2],
        [8, 4, 6, 8],
        [7, 1, 2, 6],
        [10, 5, 6, 9],
        [6, 2, 4, 7],
    ],
    dtype=np.float64,
)


def one_way_by_loops(groups: list[list[float]]) -> tuple[float, float, int, int, float]:
    """(MSB, MSW, df_b, df_w, k0) with explicit loops over ragged groups."""
    all_values = [v for g in groups for v in g]
    n_total = len(all_values)
    grand = sum(all_values) / n_total
    ssb = ssw = 0.0
    for g in groups:
        mean = sum(g) / len(g)
        ssb += len(g) * (mean - grand) ** 2
        for v in g:
            ssw += (v - mean) ** 2
    df_b, df_w = len(groups) - 1, n_total - len(groups)
    k0 = (n_total - sum(len(g) ** 2 for g in groups) / n_total) / df_b
    return ssb / df_b, ssw / df_w, df_b, df_w, k0


def test_icc1_matches_shrout_fleiss_published_example() -> None:
    ms = iv.one_way_anova(SHROUT_FLEISS)
    # Published mean squares: BMS = 11.24, WMS = 6.26 (df 5 and 18).
    assert float(ms.between) == pytest.approx(11.24, abs=0.005)
    assert float(ms.within) == pytest.approx(6.26, abs=0.005)
    assert (int(ms.df_between), int(ms.df_within), float(ms.k)) == (5, 18, 4.0)
    icc = iv.icc1_f_interval(SHROUT_FLEISS)
    # Published ICC(1,1) = 0.17 with 95% interval [-0.13, 0.72].
    assert (round(icc.estimate, 2), round(icc.low, 2), round(icc.high, 2)) == (0.17, -0.13, 0.72)
    assert icc.n == 24 and icc.method.startswith("exact F (one-way random effects ICC(1)")
    assert icc.describe().startswith("95% exact F") and icc.describe().endswith("n=24")
    # Closed form with scipy quantiles, to rounding.
    f = 11.241666666666667 / 6.263888888888889
    f_low = f / stats.f.ppf(0.975, 5, 18)
    f_high = f * stats.f.ppf(0.975, 18, 5)
    assert icc.estimate == pytest.approx((f - 1) / (f + 3), rel=1e-12)
    assert icc.low == pytest.approx((f_low - 1) / (f_low + 3), rel=1e-12)
    assert icc.high == pytest.approx((f_high - 1) / (f_high + 3), rel=1e-12)


def test_ratio_interval_is_the_monotone_image_of_the_icc_interval() -> None:
    icc = iv.icc1_f_interval(SHROUT_FLEISS)
    ratio = iv.variance_ratio_f_interval(SHROUT_FLEISS)
    assert ratio.estimate == pytest.approx((1 - icc.estimate) / icc.estimate, rel=1e-12)
    assert ratio.low == pytest.approx((1 - icc.high) / icc.high, rel=1e-12)
    # The ICC interval contains 0 (F = 1.79 < F_0.975(5, 18) = 3.38): tasks may not
    # differ at all, so the ratio is unbounded above.
    assert icc.low < 0 and ratio.high == math.inf
    # Groups closer than the noise predicts (F < 1): the ratio estimate is +inf, not < 0.
    close = SHROUT_FLEISS - SHROUT_FLEISS.mean(axis=1, keepdims=True) + 0.01 * np.arange(6)[:, None]
    assert iv.variance_ratio_f_interval(close).estimate == math.inf
    assert iv.icc1_f_interval(close).estimate < 0
    # Both sides positive: a finite interval, again the image of the ICC bounds.
    strong = SHROUT_FLEISS + 20 * np.arange(6)[:, None]
    icc, ratio = iv.icc1_f_interval(strong), iv.variance_ratio_f_interval(strong)
    assert 0 < icc.low < icc.high < 1
    assert ratio.low == pytest.approx((1 - icc.high) / icc.high, rel=1e-12)
    assert ratio.high == pytest.approx((1 - icc.low) / icc.low, rel=1e-12)
    # Direct definition: sigma2_within / sigma2_between = MSW / ((MSB - MSW) / k).
    ms = iv.one_way_anova(strong)
    assert ratio.estimate == pytest.approx(
        float(ms.within) / ((float(ms.between) - float(ms.within)) / 4), rel=1e-12
    )


def test_unbalanced_groups_use_k0_and_say_approximate() -> None:
    groups = [[1.0, 2.5, 1.7], [3.0, 4.1], [0.2, 0.9, 0.4, 1.1], [2.2, 2.0]]
    width = max(len(g) for g in groups)
    x = np.array([g + [math.nan] * (width - len(g)) for g in groups])
    msb, msw, df_b, df_w, k0 = one_way_by_loops(groups)
    ms = iv.one_way_anova(x)
    assert float(ms.between) == pytest.approx(msb, rel=1e-12)
    assert float(ms.within) == pytest.approx(msw, rel=1e-12)
    assert (int(ms.df_between), int(ms.df_within)) == (df_b, df_w)
    assert float(ms.k) == pytest.approx(k0, rel=1e-12)
    icc = iv.icc1_f_interval(x)
    assert icc.method.startswith("approximate F") and "k0=" in icc.method and icc.n == 11
    f = msb / msw
    f_low = f / stats.f.ppf(0.975, df_b, df_w)
    assert icc.low == pytest.approx((f_low - 1) / (f_low + k0 - 1), rel=1e-12)


def test_chi2_variance_interval_closed_form() -> None:
    values = np.array([0.31, 0.52, 0.18])
    s2 = float(np.var(values, ddof=1))
    out = iv.chi2_variance_interval(s2, df=2)
    assert out.low == pytest.approx(2 * s2 / stats.chi2.ppf(0.975, 2), rel=1e-12)
    assert out.high == pytest.approx(2 * s2 / stats.chi2.ppf(0.025, 2), rel=1e-12)
    assert (out.estimate, out.n, out.method) == (s2, 3, "chi-square (df=2)")
    assert math.isnan(iv.chi2_variance_interval(s2, df=0).low)
    ms = iv.one_way_anova(SHROUT_FLEISS)
    msw = iv.chi2_variance_interval(float(ms.within), int(ms.df_within), n=24)
    assert msw.low < float(ms.within) < msw.high and msw.n == 24


def test_too_few_groups_or_seeds_give_nan_never_an_exception() -> None:
    one_group = np.array([[1.0, 2.0, 3.0]])
    one_seed = np.array([[1.0], [2.0], [4.0]])
    with np.errstate(all="raise"):
        for x in (one_group, one_seed, np.full((3, 3), np.nan)):
            for interval in (iv.icc1_f_interval(x), iv.variance_ratio_f_interval(x)):
                assert math.isnan(interval.low) and math.isnan(interval.high)
                assert not interval.defined
    # Equal values within groups (MSW = 0) or equal group means (MSB = 0): no F interval.
    assert not iv.icc1_f_interval(np.array([[1.0, 1.0], [2.0, 2.0]])).defined
    assert not iv.icc1_f_interval(np.array([[1.0, 2.0], [2.0, 1.0]])).defined


def test_icc_bounds_stay_in_the_stated_range() -> None:
    # Groups whose means are almost equal: F near 0, the lower bound approaches
    # -1/(k-1) but never leaves [-1/(k-1), 1].
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3))
    x -= x.mean(axis=1, keepdims=True) - 1e-9 * np.arange(4)[:, None]
    icc = iv.icc1_f_interval(x)
    assert -0.5 <= icc.low <= icc.estimate <= icc.high <= 1.0
    assert icc.low == pytest.approx(-0.5, abs=1e-6)
    batch = iv.one_way_anova(rng.normal(size=(1000, 3, 3)) * rng.gamma(1, 1, (1000, 3, 1)))
    est, low, high = iv.icc_f_bounds(batch)
    assert np.all((low >= -0.5) & (low <= est) & (est <= high) & (high < 1.0))


def test_vectorised_bounds_equal_the_interval_functions(rng: np.random.Generator) -> None:
    x = rng.lognormal(0.0, 1.0, size=(20, 4))
    x[3, 1] = math.nan
    mean, low, high, n = iv.t_bounds(x)
    geo, glow, ghigh, gn = iv.log_t_bounds(x)
    for i in range(x.shape[0]):
        t = iv.t_interval(x[i])
        assert (t.estimate, t.low, t.high, t.n) == pytest.approx((mean[i], low[i], high[i], n[i]))
        lt = iv.log_t_interval(x[i])
        assert (lt.estimate, lt.low, lt.high, lt.n) == pytest.approx(
            (geo[i], glow[i], ghigh[i], gn[i])
        )
    # Reference: scipy's t interval.
    ref = stats.t.interval(0.95, 3, loc=x[0].mean(), scale=stats.sem(x[0]))
    assert (low[0], high[0]) == pytest.approx(ref, rel=1e-12)
    sel = iv.selection_adjusted_t_interval(x[0], 15)
    ref = stats.t.interval(1 - 0.05 / 15, 3, loc=x[0].mean(), scale=stats.sem(x[0]))
    assert (sel.low, sel.high) == pytest.approx(ref, rel=1e-12) and sel.level == 0.95
    groups = rng.normal(size=(5, 3, 3))
    est, ilow, ihigh = iv.icc_f_bounds(iv.one_way_anova(groups))
    for i in range(5):
        icc = iv.icc1_f_interval(groups[i])
        assert (icc.estimate, icc.low, icc.high) == pytest.approx((est[i], ilow[i], ihigh[i]))
