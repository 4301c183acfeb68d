"""Confidence intervals that hold with 2-5 seeds, each naming its method and n.

Why not the percentile bootstrap: with 3 seeds a resample repeats one seed three times
11% of the time, and the percentile interval of one mean covers ~75% at nominal 95%
(DOMAIN.md, "Statistics with 2-5 seeds"). Student t intervals are exact for normal data at
any n >= 2; ratios (timescales, noise, SNR) are handled on the log scale.

Every function returns an `Interval`; `Interval.describe()` is the text the report prints
beside the numbers ("95% t interval, n=3"). Fewer than 2 finite values give NaN bounds:
no interval is ever formed from one seed.

Variance components (is the spread between seeds larger than between tasks or labels?)
get intervals from the exact sampling distributions of ANOVA mean squares under normal
random effects: the F interval for the intraclass correlation (Shrout & Fleiss 1979;
McGraw & Wong 1996), the interval it implies for the variance ratio
sigma2_within / sigma2_between = (1 - ICC) / ICC (a monotone map, so just as exact), and the
chi-square interval for one variance. They are exact for balanced groups at any n >= 2;
with unequal group sizes k0 replaces k and the method name says "approximate".

Each interval also has a vectorised `*_bounds` form (leading axes = replications) used by
the Interval functions and by the Monte Carlo coverage tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rts_dagster.analysis.distributions import chi2_ppf, f_ppf, t_ppf

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval, the method that formed it and the n it rests on."""

    estimate: float
    low: float
    high: float
    method: str  # short name, e.g. "t", "t on logs", "t, Bonferroni over 15"
    n: int  # independent units behind the interval (seeds, pairs of runs)
    level: float = LEVEL

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def describe(self) -> str:
        """ "95% t interval, n=3" (what the report prints next to the bounds)."""
        return f"{self.level:.0%} {self.method} interval, n={self.n}"

    def covers(self, value: float) -> bool:
        return self.defined and self.low <= value <= self.high


def _finite(values: np.ndarray | list[float]) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def t_interval(
    values: np.ndarray | list[float], level: float = LEVEL, method: str = "t"
) -> Interval:
    """Mean of the finite `values` with its Student t interval (df = n - 1)."""
    mean, low, high, n = t_bounds(_finite(values), level)
    return Interval(float(mean), float(low), float(high), method, int(n), level)


def t_bounds(
    values: np.ndarray, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised t interval over the last axis, ignoring non-finite entries:
    (mean, low, high, n) with the leading shape of `values`; NaN bounds where n < 2."""
    x = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(x)
    n = ok.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, x, 0.0).sum(axis=-1) / n
        dev = np.where(ok, x - mean[..., None], 0.0)
        sd = np.sqrt((dev * dev).sum(axis=-1) / (n - 1))
        df = np.where(n >= 2, n - 1, 1)
        half = t_ppf(0.5 + level / 2.0, df) * sd / np.sqrt(n)
    half = np.where(n >= 2, half, np.nan)
    mean = np.where(n >= 1, mean, np.nan)
    return mean, mean - half, mean + half, n


def paired_t_interval(
    a: np.ndarray | list[float], b: np.ndarray | list[float], level: float = LEVEL
) -> Interval:
    """Mean of a - b over the pairs where both are finite, with its t interval."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return t_interval(a - b, level, method="paired t")


def log_t_interval(
    values: np.ndarray | list[float], level: float = LEVEL, method: str = "t on logs"
) -> Interval:
    """Geometric mean of the positive finite `values` with the t interval of their logs,
    transformed back (for ratios and timescales, which are positive and skewed)."""
    x = _finite(values)
    geo, low, high, n = log_t_bounds(x[x > 0], level)
    return Interval(float(geo), float(low), float(high), method, int(n), level)


def log_t_bounds(
    values: np.ndarray, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised `log_t_interval` over the last axis: entries that are not finite and
    positive are ignored. Returns (geometric mean, low, high, n)."""
    x = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        logs = np.where(np.isfinite(x) & (x > 0), np.log(np.where(x > 0, x, 1.0)), np.nan)
    mean, low, high, n = t_bounds(logs, level)
    return np.exp(mean), np.exp(low), np.exp(high), n


def selection_adjusted_t_interval(
    values: np.ndarray | list[float], n_compared: int, level: float = LEVEL
) -> Interval:
    """t interval at level 1 - (1 - level) / K (Bonferroni over the K = `n_compared`
    configurations a winner was picked from): all K intervals hold together with
    probability >= `level`, so the winner's does too, whichever was picked."""
    k = max(int(n_compared), 1)
    inner = t_interval(values, bonferroni_level(level, k), method=f"t, Bonferroni over {k}")
    return Interval(inner.estimate, inner.low, inner.high, inner.method, inner.n, level)


def bonferroni_level(level: float, n_compared: int) -> float:
    """Per-interval level 1 - (1 - level) / K that makes K intervals hold together."""
    return 1.0 - (1.0 - level) / max(int(n_compared), 1)


# --- Variance components: exact F and chi-square intervals --------------------------------
ONE_WAY_MODEL = "one-way random effects ICC(1)"


@dataclass(frozen=True)
class MeanSquares:
    """ANOVA mean squares of a random-effects design (arrays: leading axes = replications).

    Under normal random effects, `within` * df_within / sigma2_within ~ chi2(df_within) and
    `between` * df_between / (sigma2_within + k sigma2_between) ~ chi2(df_between),
    independently: everything below follows from these two facts. `k` is the number of
    observations per group (k0 = (N - sum n_g^2 / N) / (G - 1) for unequal groups, when the
    second fact only holds approximately: `balanced` is then False)."""

    between: np.ndarray  # MSB: mean square between groups (tasks, labels)
    within: np.ndarray  # MSW (one-way) or the residual mean square (two-way additive)
    df_between: np.ndarray  # G - 1
    df_within: np.ndarray  # N - G (one-way) or N - G - S + 1 (two-way additive)
    k: np.ndarray  # observations per group (k0 when unbalanced)
    n_groups: np.ndarray  # G: groups with at least one observation
    n_obs: np.ndarray  # N: observations
    balanced: np.ndarray  # every group has the same number of observations
    model: str = ONE_WAY_MODEL  # names the ICC in method strings

    @property
    def f_ratio(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.between / self.within

    @property
    def var_within(self) -> np.ndarray:
        """sigma2_within estimate: the within (or residual) mean square."""
        return self.within

    @property
    def var_between(self) -> np.ndarray:
        """sigma2_between estimate (MSB - MSW) / k: unbiased, negative when the groups
        differ less than the within-group noise alone predicts."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.between - self.within) / self.k

    @property
    def usable(self) -> np.ndarray:
        """At least 2 groups, a within df, and finite positive mean squares (an F ratio
        of 0 or infinity has no interval)."""
        with np.errstate(invalid="ignore"):
            return (
                (self.n_groups >= 2)
                & (self.df_within >= 1)
                & np.isfinite(self.between)
                & np.isfinite(self.within)
                & (self.between > 0)
                & (self.within > 0)
            )


def one_way_anova(x: np.ndarray) -> MeanSquares:
    """Mean squares of x[..., group, member] (NaN = missing) for the one-way random-effects
    model x_gi = mu + a_g + e_gi, a_g ~ N(0, sigma2_between), e_gi ~ N(0, sigma2_within).

    Empty groups are ignored; a group with one member adds to MSB but not to MSW."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    n_g = ok.sum(axis=-1)
    has = n_g >= 1
    n_groups = has.sum(axis=-1)
    n_obs = n_g.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        total_g = np.where(ok, x, 0.0).sum(axis=-1)
        mean_g = np.where(has, total_g / np.maximum(n_g, 1), 0.0)
        grand = total_g.sum(axis=-1) / n_obs
        dev_w = np.where(ok, x - mean_g[..., None], 0.0)
        df_within = n_obs - n_groups
        df_between = n_groups - 1
        within = (dev_w * dev_w).sum(axis=(-2, -1)) / df_within
        dev_b = np.where(has, mean_g - grand[..., None], 0.0)
        between = (n_g * dev_b * dev_b).sum(axis=-1) / df_between
        k0 = (n_obs - (n_g * n_g).sum(axis=-1) / n_obs) / df_between
    size_max = np.where(has, n_g, 0).max(axis=-1)
    size_min = np.where(has, n_g, np.iinfo(np.int64).max).min(axis=-1)
    return MeanSquares(
        between=np.asarray(between, dtype=np.float64),
        within=np.asarray(within, dtype=np.float64),
        df_between=np.asarray(df_between),
        df_within=np.asarray(df_within),
        k=np.asarray(k0, dtype=np.float64),
        n_groups=np.asarray(n_groups),
        n_obs=np.asarray(n_obs),
        balanced=np.asarray(size_max == size_min),
    )


def _f_limits(ms: MeanSquares, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(F, F_L, F_U): F / (1 + k theta) ~ F(df_between, df_within) with
    theta = sigma2_between / sigma2_within, so theta is in [(F_L - 1)/k, (F_U - 1)/k] with
    probability `level` (Shrout & Fleiss 1979, eqs. for ICC(1,1))."""
    tail = 0.5 + level / 2.0
    usable = ms.usable
    d1 = np.where(usable, ms.df_between, 1)
    d2 = np.where(usable, ms.df_within, 1)
    f = np.where(usable, ms.f_ratio, np.nan)
    f_low = f / f_ppf(tail, d1, d2)
    f_high = f * f_ppf(tail, d2, d1)
    return f, f_low, f_high


def icc_f_bounds(
    ms: MeanSquares, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ICC = sigma2_between / (sigma2_between + sigma2_within): estimate
    (F - 1) / (F + k - 1) = (MSB - MSW) / (MSB + (k - 1) MSW) and its exact F interval.
    Everything lies in [-1/(k-1), 1] (the estimator's range; bounds are clipped to it
    against rounding); NaN where `ms.usable` is False."""
    f, f_low, f_high = _f_limits(ms, level)
    k = ms.k
    with np.errstate(invalid="ignore", divide="ignore"):
        floor = -1.0 / (k - 1.0)

        def icc(v: np.ndarray) -> np.ndarray:
            return np.clip((v - 1.0) / (v + k - 1.0), floor, 1.0)

        return icc(f), icc(f_low), icc(f_high)


def variance_ratio_f_bounds(
    ms: MeanSquares, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sigma2_within / sigma2_between = (1 - ICC) / ICC: estimate k / (F - 1), +inf when
    F <= 1 (the between-group estimate (MSB - MSW) / k is then <= 0: a ratio of variances
    sits at its boundary), and the interval implied by the ICC's exact F interval. The upper bound is +inf when F_L <= 1: the data cannot exclude groups that
    do not differ at all (sigma2_between = 0). Both bounds are +inf when even F_U <= 1."""
    f, f_low, f_high = _f_limits(ms, level)
    k = ms.k
    with np.errstate(invalid="ignore", divide="ignore"):

        def ratio(v: np.ndarray) -> np.ndarray:
            return np.where(v > 1.0, k / (v - 1.0), np.where(np.isnan(v), np.nan, np.inf))

        return ratio(f), ratio(f_high), ratio(f_low)


def chi2_variance_bounds(
    variance: np.ndarray | float, df: np.ndarray | float, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray]:
    """Exact interval for sigma2 from an estimate with df * variance / sigma2 ~ chi2(df):
    [df s2 / chi2_{1-a/2}(df), df s2 / chi2_{a/2}(df)]; NaN where df < 1."""
    s2 = np.asarray(variance, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64)
    ok = (df >= 1) & np.isfinite(s2) & (s2 >= 0)
    d = np.where(ok, df, 1.0)
    a = (1.0 - level) / 2.0
    low = np.where(ok, d * s2 / chi2_ppf(1.0 - a, d), np.nan)
    high = np.where(ok, d * s2 / chi2_ppf(a, d), np.nan)
    return low, high


def _as_mean_squares(data: MeanSquares | np.ndarray) -> MeanSquares:
    return data if isinstance(data, MeanSquares) else one_way_anova(np.asarray(data))


def f_method_name(ms: MeanSquares) -> str:
    """ "exact F (one-way random effects ICC(1))", or "approximate F (..., unequal group
    sizes, k0=2.67)" when the groups are unbalanced."""
    if bool(ms.balanced):
        return f"exact F ({ms.model})"
    return f"approximate F ({ms.model}, unequal group sizes, k0={float(ms.k):.3g})"


def _f_method(ms: MeanSquares, what: str) -> str:
    return f"{f_method_name(ms)[:-1]}{what}, {int(ms.n_groups)} groups)"


def icc_f_interval(data: MeanSquares | np.ndarray, level: float = LEVEL) -> Interval:
    """ICC with its F interval, from x[group, member] (NaN = missing: one-way ICC(1)) or
    from the `MeanSquares` of another design (e.g. a two-way additive fit). n = the
    number of observations; the method names the model and the number of groups."""
    ms = _as_mean_squares(data)
    est, low, high = icc_f_bounds(ms, level)
    return Interval(float(est), float(low), float(high), _f_method(ms, ""), int(ms.n_obs), level)


def icc1_f_interval(x: np.ndarray, level: float = LEVEL) -> Interval:
    """One-way random-effects ICC(1) of x[group, member] with its exact F interval."""
    return icc_f_interval(one_way_anova(np.asarray(x)), level)


def variance_ratio_f_interval(data: MeanSquares | np.ndarray, level: float = LEVEL) -> Interval:
    """sigma2_within / sigma2_between (e.g. var_seed / var_task) with the interval implied
    by the ICC's F interval; see `variance_ratio_f_bounds` for the +inf upper bound."""
    ms = _as_mean_squares(data)
    est, low, high = variance_ratio_f_bounds(ms, level)
    method = _f_method(ms, "; ratio (1 - ICC) / ICC")
    return Interval(float(est), float(low), float(high), method, int(ms.n_obs), level)


def chi2_variance_interval(
    variance: float, df: float, level: float = LEVEL, n: int | None = None
) -> Interval:
    """A variance estimate with `df` degrees of freedom (a sample variance: df = n - 1;
    an ANOVA MSW: df = N - G) and its exact chi-square interval. `n` defaults to df + 1."""
    low, high = chi2_variance_bounds(variance, df, level)
    size = int(df) + 1 if n is None else int(n)
    estimate = float(variance) if df >= 1 else math.nan
    method = f"chi-square (df={int(df)})"
    return Interval(estimate, float(low), float(high), method, size, level)


# --- Two independent groups: Welch t (unequal variances) ----------------------------------
def welch_df(
    var_a: np.ndarray | float,
    n_a: np.ndarray | float,
    var_b: np.ndarray | float,
    n_b: np.ndarray | float,
) -> np.ndarray:
    """Welch-Satterthwaite degrees of freedom of mean_a - mean_b:
    (va/na + vb/nb)^2 / ((va/na)^2/(na-1) + (vb/nb)^2/(nb-1)); NaN where a group has < 2."""
    va, na = np.asarray(var_a, dtype=np.float64), np.asarray(n_a, dtype=np.float64)
    vb, nb = np.asarray(var_b, dtype=np.float64), np.asarray(n_b, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        qa, qb = va / na, vb / nb
        df = (qa + qb) ** 2 / (qa * qa / (na - 1.0) + qb * qb / (nb - 1.0))
    return np.where((na >= 2) & (nb >= 2), df, np.nan)


def welch_t_bounds(
    mean_a: np.ndarray | float,
    var_a: np.ndarray | float,
    n_a: np.ndarray | float,
    mean_b: np.ndarray | float,
    var_b: np.ndarray | float,
    n_b: np.ndarray | float,
    level: float = LEVEL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised Welch interval for mean_a - mean_b from each group's mean, sample variance
    (ddof=1) and size: (difference, low, high, df). NaN bounds where a group has fewer than 2
    values. When both variances are 0 the df is undefined and the interval is the point."""
    ma, mb = np.asarray(mean_a, dtype=np.float64), np.asarray(mean_b, dtype=np.float64)
    va, na = np.asarray(var_a, dtype=np.float64), np.asarray(n_a, dtype=np.float64)
    vb, nb = np.asarray(var_b, dtype=np.float64), np.asarray(n_b, dtype=np.float64)
    ok = (na >= 2) & (nb >= 2)
    df = welch_df(va, na, vb, nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(va / na + vb / nb)
        q = t_ppf(0.5 + level / 2.0, np.where(np.isfinite(df) & (df > 0), df, 1.0))
        half = np.where(se == 0.0, 0.0, q * se)
    diff = ma - mb
    half = np.where(ok, half, np.nan)
    return diff, diff - half, diff + half, df


def welch_t_interval(
    a: np.ndarray | list[float], b: np.ndarray | list[float], level: float = LEVEL
) -> Interval:
    """mean(a) - mean(b) over the finite values of two independent groups (different seeds)
    with its Welch t interval (Welch-Satterthwaite df); n = len(a) + len(b)."""
    xa, xb = _finite(a), _finite(b)
    var_a = xa.var(ddof=1) if len(xa) >= 2 else math.nan
    var_b = xb.var(ddof=1) if len(xb) >= 2 else math.nan
    mean_a = xa.mean() if len(xa) else math.nan
    mean_b = xb.mean() if len(xb) else math.nan
    diff, low, high, _ = welch_t_bounds(mean_a, var_a, len(xa), mean_b, var_b, len(xb), level)
    return Interval(float(diff), float(low), float(high), "Welch t", len(xa) + len(xb), level)


def t_summary_bounds(
    mean: np.ndarray | float,
    var: np.ndarray | float,
    n: np.ndarray | float,
    level: float = LEVEL,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised one-sample (or paired-difference) t interval from a mean, its sample
    variance (ddof=1) and n: (low, high); NaN where n < 2."""
    m = np.asarray(mean, dtype=np.float64)
    v = np.asarray(var, dtype=np.float64)
    k = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = t_ppf(0.5 + level / 2.0, np.where(k >= 2, k - 1.0, 1.0))
        half = np.where(k >= 2, q * np.sqrt(v / k), np.nan)
    return m - half, m + half
