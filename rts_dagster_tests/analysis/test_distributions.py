"""analysis.distributions against scipy.stats (the reference it replaces, imported here
only), on grids that include the domain edges the statistics can hit."""

import numpy as np
import pytest
from scipy import stats

from rts_dagster.analysis import distributions as dist

DF = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 7.0, 29.0, 120.0, 1e6, np.inf])
Q = np.array([0.0, 1e-12, 0.0025, 0.025, 0.05, 0.3, 0.5, 0.7, 0.95, 0.975, 0.9975, 1.0])
X = np.array([-np.inf, -40.0, -3.0, -1.0, 0.0, 0.5, 2.0, 9.0, 60.0, np.inf])
BAD_DF = np.array([0.0, -1.0, np.nan])
BAD_Q = np.array([-0.1, 1.1, np.nan])


def close(ours: np.ndarray, reference: np.ndarray) -> None:
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=0.0, equal_nan=True)


def test_t_ppf_matches_scipy_stats_including_the_support_ends() -> None:
    q, df = np.meshgrid(Q, DF)
    close(dist.t_ppf(q, df), stats.t.ppf(q, df))
    assert dist.t_ppf(0.0, 3.0) == -np.inf and dist.t_ppf(1.0, 3.0) == np.inf
    assert dist.t_ppf(0.975, 4.0) == pytest.approx(2.7764451051977987, rel=1e-14)


def test_t_ppf_is_nan_outside_its_domain() -> None:
    assert np.isnan(dist.t_ppf(0.975, BAD_DF)).all()
    assert np.isnan(dist.t_ppf(BAD_Q, 3.0)).all()


def test_noncentral_t_cdf_and_sf_match_scipy_stats() -> None:
    for nc in (-3.0, -0.5, 0.0, 0.8, 2.5, 6.0):
        x, df = np.meshgrid(X[1:-1], DF[:-1])  # scipy.stats' nct has no df = inf
        close(dist.nct_cdf(x, df, nc), stats.nct.cdf(x, df, nc))
        # the sf is compared to 1e-9: scipy.stats takes it from Boost, we from the cdf's
        # reflection (both are accurate far below that)
        np.testing.assert_allclose(
            dist.nct_sf(x, df, nc), stats.nct.sf(x, df, nc), rtol=1e-9, atol=1e-300
        )


def test_noncentral_t_sf_keeps_its_precision_in_the_upper_tail() -> None:
    # 1 - cdf would round this to 0 or to a few digits
    tail = dist.nct_sf(40.0, 5.0, 1.0)
    assert 0.0 < tail < 1e-6
    assert tail == pytest.approx(float(stats.nct.sf(40.0, 5.0, 1.0)), rel=1e-9)


def test_noncentral_t_is_nan_outside_its_domain() -> None:
    assert np.isnan(dist.nct_cdf(1.0, BAD_DF, 1.0)).all()
    assert np.isnan(dist.nct_sf(1.0, BAD_DF, 1.0)).all()
    assert np.isnan(dist.nct_sf(1.0, 3.0, np.nan))


def test_f_ppf_matches_scipy_stats() -> None:
    for dfd in (1.0, 2.0, 3.0, 8.0, 40.0):
        q, dfn = np.meshgrid(Q, DF[:-1])
        close(dist.f_ppf(q, dfn, dfd), stats.f.ppf(q, dfn, dfd))
    assert np.isnan(dist.f_ppf(0.5, BAD_DF, 3.0)).all()
    assert np.isnan(dist.f_ppf(0.5, 3.0, BAD_DF)).all()
    assert np.isnan(dist.f_ppf(BAD_Q, 3.0, 3.0)).all()


def test_chi2_ppf_and_sf_match_scipy_stats() -> None:
    q, df = np.meshgrid(Q, DF[:-1])
    close(dist.chi2_ppf(q, df), stats.chi2.ppf(q, df))
    x, df = np.meshgrid(X, DF[:-1])
    close(dist.chi2_sf(x, df), stats.chi2.sf(x, df))
    assert dist.chi2_sf(-1.0, 3.0) == 1.0  # below the support
    assert np.isnan(dist.chi2_sf(1.0, BAD_DF)).all()
    assert np.isnan(dist.chi2_ppf(0.5, BAD_DF)).all()
    assert np.isnan(dist.chi2_sf(np.nan, 3.0))


def test_scalars_in_scalars_out() -> None:
    for value in (
        dist.t_ppf(0.975, 3.0),
        dist.nct_sf(2.0, 3.0, 1.0),
        dist.f_ppf(0.05, 2.0, 3.0),
        dist.chi2_ppf(0.5, 2.0),
        dist.chi2_sf(1.0, 2.0),
    ):
        assert np.ndim(value) == 0
        assert isinstance(float(value), float)
