"""The distribution functions the statistics use: Student t, noncentral t, F and chi-square.

Why not scipy.stats: importing it takes ~0.65 s on this machine (its distribution classes
format their docstrings at import), and every `rts refresh` and every worker process pays
it. These are the `scipy.special` functions that scipy.stats' own `t`, `nct`, `f` and
`chi2` call, with scipy.stats' handling of the domain edges: NaN for parameters outside
the domain (df <= 0, a probability outside [0, 1]), the support's ends at q = 0 and 1, and
sf = 1 below the support. `rts_dagster_tests/analysis/test_distributions.py` compares each
with scipy.stats over grids that include those edges.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import special


def _masked(value: np.ndarray, valid: np.ndarray) -> np.ndarray | np.float64:
    out = np.where(valid, value, np.nan)
    return out[()] if out.ndim == 0 else out


def _positive(*params: ArrayLike) -> np.ndarray:
    ok = np.asarray(True)
    for p in params:
        arr = np.asarray(p, dtype=np.float64)
        ok = ok & (arr > 0)  # NaN compares False
    return ok


def _probability(q: ArrayLike) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    return (q >= 0.0) & (q <= 1.0)


def t_ppf(q: ArrayLike, df: ArrayLike) -> np.ndarray | np.float64:
    """Quantile of Student's t with `df` degrees of freedom (= scipy.stats.t.ppf)."""
    q = np.asarray(q, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        value = np.where(q == 0.0, -np.inf, special.stdtrit(df, q))
    return _masked(value, _positive(df) & _probability(q))


def nct_cdf(x: ArrayLike, df: ArrayLike, nc: ArrayLike) -> np.ndarray | np.float64:
    """CDF of the noncentral t (= scipy.stats.nct.cdf)."""
    value = special.nctdtr(df, nc, x)
    return _masked(value, _positive(df) & np.isfinite(np.asarray(nc, dtype=np.float64)))


def nct_sf(x: ArrayLike, df: ArrayLike, nc: ArrayLike) -> np.ndarray | np.float64:
    """Survival function of the noncentral t (= scipy.stats.nct.sf), accurate in the upper
    tail: if T ~ nct(df, nc) then -T ~ nct(df, -nc), so P(T > x) = P(-T < -x). Where that
    tail is too far out for `nctdtr` (it returns NaN), 1 - cdf, which is then ~0."""
    nc = np.asarray(nc, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    value = special.nctdtr(df, -nc, -x)
    value = np.where(np.isnan(value), 1.0 - special.nctdtr(df, nc, x), value)
    return _masked(np.clip(value, 0.0, 1.0), _positive(df) & np.isfinite(nc))


def f_ppf(q: ArrayLike, dfn: ArrayLike, dfd: ArrayLike) -> np.ndarray | np.float64:
    """Quantile of the F distribution (= scipy.stats.f.ppf)."""
    q = np.asarray(q, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        value = np.where(q == 1.0, np.inf, special.fdtri(dfn, dfd, q))
    return _masked(value, _positive(dfn, dfd) & _probability(q))


def chi2_ppf(q: ArrayLike, df: ArrayLike) -> np.ndarray | np.float64:
    """Quantile of the chi-square distribution (= scipy.stats.chi2.ppf)."""
    q = np.asarray(q, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        value = np.where(q == 1.0, np.inf, 2.0 * special.gammaincinv(df / 2.0, q))
    return _masked(value, _positive(df) & _probability(q))


def chi2_sf(x: ArrayLike, df: ArrayLike) -> np.ndarray | np.float64:
    """Survival function of the chi-square distribution (= scipy.stats.chi2.sf)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        value = np.where(x < 0.0, 1.0, special.chdtrc(df, np.maximum(x, 0.0)))
    return _masked(value, _positive(df) & ~np.isnan(x))
