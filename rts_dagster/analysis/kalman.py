"""Local-level (random walk + noise) description of each reward series, per regime.

Model: y_t = mu_t + eps_t, mu_t = mu_{t-1} + eta_t, with Var(eta) = q (drift per sample)
and Var(eps) = r (observation noise). The steady-state Kalman filter for it is an EMA,
m_t = m_{t-1} + K (y_t - m_{t-1}), with the gain

    K = (-s + sqrt(s^2 + 4 s)) / 2,   s = q / r,

the fixed point of the Riccati recursion P <- (P + q) - (P + q)^2 / (P + q + r),
K = (P + q) / (P + q + r). K is the EMA weight that *tracks* the series best and 1/K its
timescale in samples. It describes the stream; it is not LP's best timescale (LP detects
change through |F - S|: see `lp_timescales`).

Units. A sample is one completion of the label (granularity "completion": `unit` =
"completions") or one epoch mean (granularity "epoch": `unit` = "epochs"). An epoch mean
averages many completions and held values (DOMAIN.md, "What reaches WandB"), so epoch
figures are kept in epochs and never compared with LP's per-completion `ema_timescale`.

Regimes. One constant drift over a whole learning curve is driven by the learning phase
(10-20x too fast once a label has plateaued). Each series is split in two by a
two-segment linear fit (`split_regimes`: every break point evaluated at once from
cumulative sums, the least-squares break kept when BIC prefers two lines to one; BIC
treats residuals as independent, so on long drifting series a break is accepted
readily). The steeper segment is "learning", the flatter "plateau"; without an accepted
break the whole series is one regime: "learning" when its fitted line moves by more than
2 residual sd over the series, else "plateau". The local level is fitted to the whole
series and to each regime (`regime` column: "whole", "learning", "plateau").

Estimation per (series, regime): the local-level model is ARIMA(0,1,1), whose one-step
predictor is that EMA, so K is the minimiser of the sum of squared one-step prediction
errors e_t = y_t - m_{t-1}, where m is the adjusted EMA (a running mean at first, like
the Kalman filter from a diffuse start), searched on a log grid and refined by a parabola
in log K. Series are laid out as rows of zero-padded matrices (bucketed by length, so
padding stays < 1.5x) and filtered along rows: one IIR pass per grid gain for all series,
the weight sums in closed form. With F = mean(e^2), r = F (1 - K) and q = K^2 F. (Method
of moments on first differences, q = Var(d) - 2r, is the difference of two large noisy
numbers when q << r; both moments are still reported.)

Stability (measured with `_fit_segments` on 4000 synthetic random-walk + noise series per
(K, n), r = 1, grid 1e-5..0.999): share of fits at the grid's lower end | share flagged
`at_bound` (a grid end, or 1/K longer than the series) | median |log(K_hat / K)| of the
unflagged fits:
    true K    n=25             n=50             n=100            n=200            n=400
    0.03      .61 .68 1.6      .57 .65 0.87     .47 .54 0.53     .28 .32 0.40     .09 .10 0.31
    0.1       .50 .56 0.59     .33 .38 0.41     .12 .14 0.34     .02 .02 0.23     .00 .00 0.16
    0.3       .17 .20 0.35     .05 .05 0.25     .00 .01 0.17     .00 .00 0.12     .00 .00 0.08
The fit is resolved (< ~10-15% flagged) once n K >~ 12: no fixed minimum makes every fit
stable. Below 100 samples even a stream with a 10-sample timescale is flagged more than
1 time in 7 and K is off by a factor ~1.5-2: `MIN_FIT_SAMPLES` = 100, shorter series /
regimes get NaN with the reason in `note`; the rest is caught per fit by `at_bound`
(kept in this table, flagged, left out of pooled figures and counted there).

Diagnostics: Ljung-Box Q (`ljung_box`) of the one-step errors of the fitted EMA, at the
grid gain nearest the estimate (within half a grid step, ~10%), with min(10, m // 5) lags
for m errors and one fitted parameter: `ljung_box_p`, and `fit_ok` = p >= 0.01 (errors
consistent with white noise, as the local-level model implies).
On true local-level series
(the Stability runs) p < 0.01 in 1.2-2.6% of unflagged fits: slightly above nominal (the
gain is fitted and the start is diffuse).

LP's `ema_timescale` (Metta main default 0.001) is an EMA *weight* applied once per
completion of one task *instance*: its timescale is 1/0.001 = 1000 completions of that
instance. A label's stream pools all its instances (e.g. 1500 active instances over 10
labels: ~150 per label, each seeing ~1/150 of the label's completions), so LP's EMA spans
about (instances per label) / ema_timescale completions of the label. The instance count
is not in these tables, so no ratio of a label timescale to LP's is formed
(`timescale_ratio` is always null). (Nor is the tracking optimum itself a linear rescaling:
a subsampled local level with a shared level has drift m q per instance completion, and
K ~ sqrt(q / r) for small K.)

Epoch rows (unit "epochs") fit the local-level model to epoch means of held values, which
add an autoregressive component the model lacks: they describe the epoch stream and are
not a per-completion timescale; their noise depends on completions per epoch and on the
held-value lag, so noise comparisons of epoch rows carry that caveat.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl
from scipy import stats
from scipy.signal import lfilter

from rts_dagster.analysis.intervals import LEVEL, Interval, log_t_bounds, log_t_interval
from rts_dagster.analysis.metrics import (
    MetricsConfig,
    first_differences,
    prepare_series,
    segment_sums,
)
from rts_dagster.schema import (
    GRANULARITY_COMPLETION,
    LOCAL_LEVEL,
    TIMESCALE_RECOMMENDATIONS,
    conform,
)

METTA_MAIN_EMA_TIMESCALE = 0.001  # LP `ema_timescale` default on Metta main (a weight)
GAIN_MIN = 1e-5  # smallest gain searched: timescale 100k samples
GAIN_MAX = 0.999
GRID_SIZE = 61  # log-spaced gains between GAIN_MIN and GAIN_MAX (~21% apart)
MIN_FIT_SAMPLES = 100  # shorter series/regimes: no fit (module doc, "Stability")
MIN_SAMPLES = MIN_FIT_SAMPLES  # former name
MIN_BREAK_SEGMENT = 10  # each side of a regime break has at least this many samples
LJUNG_BOX_MAX_LAGS = 10
FIT_OK_P = 0.01  # fit_ok: Ljung-Box p at or above this

REGIME_WHOLE = "whole"
REGIME_LEARNING = "learning"
REGIME_PLATEAU = "plateau"
REGIMES = (REGIME_WHOLE, REGIME_LEARNING, REGIME_PLATEAU)
UNIT_COMPLETIONS = "completions"
UNIT_EPOCHS = "epochs"


def unit_of(granularity: str) -> str:
    """Unit of one sample of a series of that granularity."""
    return UNIT_COMPLETIONS if granularity == GRANULARITY_COMPLETION else UNIT_EPOCHS


def steady_state_gain(q: np.ndarray | float, r: np.ndarray | float) -> np.ndarray:
    """Steady-state Kalman gain of the local-level model (the tracking-optimal EMA weight).

    K = (-s + sqrt(s^2 + 4 s)) / 2 with s = q / r, computed as 2 s / (s + sqrt(s^2 + 4s))
    (no cancellation for small s). q = 0 gives 0, r = 0 with q > 0 gives 1, q = r = 0 or
    a negative/NaN input gives NaN."""
    q = np.asarray(q, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = q / r
        gain = 2.0 * s / (s + np.sqrt(s * s + 4.0 * s))
    gain = np.where((r == 0.0) & (q > 0.0), 1.0, gain)
    gain = np.where(q == 0.0, np.where(r > 0.0, 0.0, np.nan), gain)
    return np.where((q < 0.0) | (r < 0.0), np.nan, gain)


def gain_to_variances(
    gain: np.ndarray, innovation_var: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(q, r) of the local-level model with steady-state gain K and one-step prediction
    error variance F: r = F (1 - K), q = K^2 F (so that q / r = K^2 / (1 - K))."""
    gain = np.asarray(gain, dtype=np.float64)
    innovation_var = np.asarray(innovation_var, dtype=np.float64)
    return gain * gain * innovation_var, (1.0 - gain) * innovation_var


def gain_grid(grid_size: int = GRID_SIZE) -> np.ndarray:
    """The log-spaced gains searched, GAIN_MIN .. GAIN_MAX."""
    return np.exp(np.linspace(math.log(GAIN_MIN), math.log(GAIN_MAX), grid_size))


# --- padded layout -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Bucket:
    rows: np.ndarray  # series in this bucket
    lengths: np.ndarray  # their lengths
    y: np.ndarray  # (rows, width) values relative to each series' first value, 0-padded
    valid: np.ndarray  # (rows, width) True on a one-step error: 1 <= position < length


def _buckets(y: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[_Bucket]:
    """Series grouped by length (within a factor 1.5) as zero-padded matrices."""
    out: list[_Bucket] = []
    if len(lengths) == 0:
        return out
    order = np.argsort(lengths, kind="stable")
    key = np.floor(np.log(np.maximum(lengths[order], 1)) / math.log(1.5))
    for rows in np.split(order, np.flatnonzero(np.diff(key)) + 1):
        lens = lengths[rows]
        width = int(lens.max())
        row_of = np.repeat(np.arange(len(rows)), lens)
        pos = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        flat = np.repeat(starts[rows], lens) + pos
        mat = np.zeros((len(rows), width))
        mat[row_of, pos] = y[flat] - np.repeat(y[starts[rows]], lens)
        p = np.arange(width)
        valid = (p[None, :] >= 1) & (p[None, :] < lens[:, None])
        out.append(_Bucket(rows, lens, mat, valid))
    return out


def _errors(bucket: _Bucket, gain: float, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    """One-step errors of the adjusted EMA of weight `gain` (0 where not `valid`).

    Numerator: an IIR pass along each row; weight sum sum_{k<=p} (1-K)^k in closed form."""
    y = bucket.y[rows]
    w = 1.0 - gain
    num = lfilter([1.0], [1.0, -w], y, axis=1)
    p = np.arange(y.shape[1] - 1, dtype=np.float64)
    den = -np.expm1((p + 1.0) * math.log1p(-gain)) / gain
    e = np.zeros_like(y)
    e[:, 1:] = y[:, 1:] - num[:, :-1] / den
    e[~bucket.valid[rows]] = 0.0
    return e


def _prediction_sse(buckets: list[_Bucket], n_series: int, gains: np.ndarray) -> np.ndarray:
    """Sum of squared one-step prediction errors per series (rows) and gain (columns)."""
    sse = np.zeros((n_series, len(gains)))
    for b in buckets:  # a handful of length buckets
        for j, gain in enumerate(gains):  # a loop over grid gains; each covers every sample
            e = _errors(b, float(gain))
            sse[b.rows, j] = np.einsum("ij,ij->i", e, e)
    return sse


def _parabola_min(log_k: np.ndarray, sse: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: (log gain, SSE at it, grid index of the minimum), refined by a parabola
    through the grid minimum and its two neighbours (kept on the grid at the ends)."""
    j = np.argmin(sse, axis=1)
    rows = np.arange(sse.shape[0])
    jc = np.clip(j, 1, len(log_k) - 2)
    y0, y1, y2 = sse[rows, jc - 1], sse[rows, jc], sse[rows, jc + 1]
    h = log_k[1] - log_k[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        curv = y0 - 2.0 * y1 + y2
        shift = np.where(curv > 0, 0.5 * h * (y0 - y2) / curv, 0.0)
    shift = np.clip(shift, -h / 2, h / 2)
    inner = (j > 0) & (j < len(log_k) - 1)
    best_log = np.where(inner, log_k[jc] + shift, log_k[j])
    with np.errstate(invalid="ignore"):
        best_sse = np.where(
            inner, y1 - 0.125 * (y0 - y2) ** 2 / np.where(curv > 0, curv, np.inf), sse[rows, j]
        )
    return best_log, np.minimum(best_sse, sse[rows, j]), j


def ljung_box(
    errors: np.ndarray,
    n_obs: np.ndarray | None = None,
    max_lags: int = LJUNG_BOX_MAX_LAGS,
    model_df: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ljung-Box Q, its p-value and the lags used, per row of `errors` (series x time).

    Row i uses its first `n_obs[i]` values (all when None), h_i = min(max_lags, n_i // 5)
    lags, Q = n (n + 2) sum_k acf_k^2 / (n - k) with the acf of the demeaned row
    normalised by its sum of squares, p = chi2.sf(Q, h - model_df); NaN when h <= model_df
    or the row is constant. Vectorised over rows; a loop over the <= `max_lags` lags."""
    errors = np.atleast_2d(np.asarray(errors, dtype=np.float64))
    rows, width = errors.shape
    n = np.full(rows, width) if n_obs is None else np.asarray(n_obs, dtype=np.int64)
    valid = np.arange(width)[None, :] < n[:, None]
    x = np.where(valid, errors, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(valid, x - x.sum(axis=1, keepdims=True) / n[:, None], 0.0)
        denom = np.einsum("ij,ij->i", x, x)
        lags = np.minimum(max_lags, n // 5)
        q = np.zeros(rows)
        for k in range(1, max_lags + 1):
            if k >= width:
                break
            acf = np.einsum("ij,ij->i", x[:, k:], x[:, :-k]) / denom
            q += np.where(k <= lags, acf * acf / (n - k), 0.0)
        q *= n * (n + 2.0)
    df = lags - model_df
    ok = (df > 0) & (denom > 0)
    q = np.where(ok, q, np.nan)
    p = np.where(ok, stats.chi2.sf(q, np.maximum(df, 1)), np.nan)
    return q, p, lags


@dataclass(frozen=True)
class _Fits:
    log_gain: np.ndarray
    sse: np.ndarray
    grid_index: np.ndarray
    ljung_box_p: np.ndarray
    ljung_box_lags: np.ndarray


def _fit_segments(
    y: np.ndarray, starts: np.ndarray, lengths: np.ndarray, grid_size: int = GRID_SIZE
) -> _Fits:
    """Grid + parabola gain of every contiguous segment of `y`, with the Ljung-Box p of
    its one-step errors at the grid gain of the minimum."""
    log_k = np.log(gain_grid(grid_size))
    buckets = _buckets(y, starts, lengths)
    sse = _prediction_sse(buckets, len(lengths), np.exp(log_k))
    best_log, best_sse, j = _parabola_min(log_k, sse)
    lb_p = np.full(len(lengths), np.nan)
    lb_lags = np.zeros(len(lengths), dtype=np.int64)
    for b in buckets:
        jb = j[b.rows]
        for g in np.unique(jb):  # one pass over the samples in all
            sel = np.flatnonzero(jb == g)
            e = _errors(b, math.exp(log_k[g]), sel)[:, 1:]
            _, p, lags = ljung_box(e, b.lengths[sel] - 1)
            lb_p[b.rows[sel]] = p
            lb_lags[b.rows[sel]] = lags
    return _Fits(best_log, best_sse, j, lb_p, lb_lags)


# --- regimes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RegimeSplit:
    """Per series: where the regimes are (positions in the cleaned series, end exclusive)."""

    break_at: np.ndarray  # least-squares break position (-1: series too short to split)
    accepted: np.ndarray  # BIC prefers two lines
    bic_gain: np.ndarray  # BIC(one line) - BIC(two lines)
    learning: np.ndarray  # (n_series, 2) [start, end) of the learning regime (0, 0: none)
    plateau: np.ndarray  # (n_series, 2) [start, end) of the plateau regime
    slope_whole: np.ndarray  # OLS slope of the one line, reward per sample
    slope_learning: np.ndarray
    slope_plateau: np.ndarray


def _line_fit(
    n: np.ndarray, t0: np.ndarray, sy: np.ndarray, syy: np.ndarray, sty: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(SSE, slope) of the OLS line through n consecutive positions t0 .. t0+n-1 with sums
    of y, y^2 and t*y: Sxx = n (n^2 - 1) / 12 exactly, no cancellation in t."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_mean = t0 + (n - 1.0) / 2.0
        sxx = n * (n * n - 1.0) / 12.0
        sxy = sty - t_mean * sy
        slope = np.where(sxx > 0, sxy / sxx, 0.0)
        sse = syy - sy * sy / n - slope * sxy
    return np.maximum(sse, 0.0), slope


def split_regimes(
    y: np.ndarray, starts: np.ndarray, lengths: np.ndarray, min_segment: int = MIN_BREAK_SEGMENT
) -> RegimeSplit:
    """Learning / plateau split of every series of the flat array `y` at once.

    Every break b (min_segment <= b <= n - min_segment) splits a series into two OLS lines;
    prefix sums of y, y^2 and t*y give both lines' SSE for all b of all series in one
    pass. The least-squares b is kept when BIC(two lines: 6 parameters) < BIC(one line: 3),
    BIC = n log(SSE / n) + k log n. Regimes as in the module doc."""
    n_series = len(lengths)
    n_all = len(y)
    sid = np.repeat(np.arange(n_series), lengths)
    pos = np.arange(n_all) - np.repeat(starts, lengths)
    mean = segment_sums(y, starts, starts + lengths) / np.maximum(lengths, 1)
    yc = y - np.repeat(mean, lengths)
    t = pos.astype(np.float64)

    def prefix(a: np.ndarray) -> np.ndarray:  # sum over the series' samples before each one
        c = np.concatenate(([0.0], np.cumsum(a)))
        return c[:-1] - np.repeat(c[starts], lengths)

    p_y, p_yy, p_ty = prefix(yc), prefix(yc * yc), prefix(t * yc)
    ends = starts + lengths
    tot_y = segment_sums(yc, starts, ends)
    tot_yy = segment_sums(yc * yc, starts, ends)
    tot_ty = segment_sums(t * yc, starts, ends)
    nn = lengths.astype(np.float64)
    sse1, slope1 = _line_fit(nn, np.zeros(n_series), tot_y, tot_yy, tot_ty)

    n_rep = np.repeat(nn, lengths)
    left_sse, left_slope = _line_fit(t, np.zeros(n_all), p_y, p_yy, p_ty)
    right_sse, right_slope = _line_fit(
        n_rep - t,
        t,
        np.repeat(tot_y, lengths) - p_y,
        np.repeat(tot_yy, lengths) - p_yy,
        np.repeat(tot_ty, lengths) - p_ty,
    )
    eligible = (pos >= min_segment) & (pos <= n_rep - min_segment)
    sse2 = np.where(eligible, left_sse + right_sse, np.inf)
    has = lengths >= 2 * min_segment
    best = np.full(n_series, np.inf)
    if n_all:
        nonempty = lengths > 0
        best[nonempty] = np.minimum.reduceat(sse2, starts[nonempty])
    hit = np.flatnonzero(eligible & (sse2 == np.repeat(best, lengths)))
    first_sid, first_idx = np.unique(sid[hit], return_index=True)
    at = np.full(n_series, -1, dtype=np.int64)
    at[first_sid] = hit[first_idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        bic1 = nn * np.log(sse1 / nn) + 3.0 * np.log(nn)
        bic2 = nn * np.log(best / nn) + 6.0 * np.log(nn)
        bic_gain = np.where(has & (sse1 > 0), bic1 - bic2, np.nan)
    accepted = np.nan_to_num(bic_gain, nan=-1.0) > 0
    flat_at = np.maximum(at, 0)
    break_at = np.where(at >= 0, pos[flat_at] if n_all else 0, -1)
    s_left = np.where(at >= 0, left_slope[flat_at] if n_all else 0.0, np.nan)
    s_right = np.where(at >= 0, right_slope[flat_at] if n_all else 0.0, np.nan)

    first_is_learning = np.abs(s_left) >= np.abs(s_right)
    whole = np.column_stack((np.zeros(n_series, dtype=np.int64), lengths))
    none = np.zeros((n_series, 2), dtype=np.int64)
    first = np.column_stack((np.zeros(n_series, dtype=np.int64), np.maximum(break_at, 0)))
    second = np.column_stack((np.maximum(break_at, 0), lengths))
    with np.errstate(divide="ignore", invalid="ignore"):
        moving = np.abs(slope1) * np.maximum(nn - 1.0, 0.0) > 2.0 * np.sqrt(sse1 / nn)
    acc = accepted[:, None]
    fil = first_is_learning[:, None]
    learning = np.where(acc, np.where(fil, first, second), np.where(moving[:, None], whole, none))
    plateau = np.where(acc, np.where(fil, second, first), np.where(moving[:, None], none, whole))
    slope_learning = np.where(
        accepted, np.where(first_is_learning, s_left, s_right), np.where(moving, slope1, np.nan)
    )
    slope_plateau = np.where(
        accepted, np.where(first_is_learning, s_right, s_left), np.where(moving, np.nan, slope1)
    )
    return RegimeSplit(
        break_at, accepted, bic_gain, learning, plateau, slope1, slope_learning, slope_plateau
    )


# --- per-series, per-regime estimates ----------------------------------------------------


def _moments(
    y: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Var(d) and the lag-1 autocovariance of d = first differences, per segment."""
    d = first_differences(y, starts)
    ends = starts + lengths
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.maximum(lengths - 1, 0)
        d_mean = segment_sums(d, starts + 1, ends) / m
        dc = d - np.repeat(np.where(m > 0, d_mean, 0.0), lengths)
        dc[starts] = 0.0
        var_diff = np.where(m >= 2, segment_sums(dc * dc, starts + 1, ends) / (m - 1), np.nan)
        lag = np.zeros_like(dc)
        lag[1:] = dc[1:] * dc[:-1]
        cov1 = np.where(m >= 3, segment_sums(lag, starts + 2, ends) / (m - 2), np.nan)
    return var_diff, cov1


def _gather(
    y: np.ndarray, starts: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments [lo, hi) of the series starting at `starts`, as one flat array with its
    own starts and lengths (empty segments left out)."""
    lens = hi - lo
    keep = lens > 0
    lens = lens[keep]
    pos = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    idx = np.repeat((starts + lo)[keep], lens) + pos
    return y[idx], np.cumsum(lens) - lens, lens


def estimate_local_level(
    streams: pl.DataFrame,
    config: MetricsConfig | None = None,
    grid_size: int = GRID_SIZE,
    regimes: bool = True,
) -> pl.DataFrame:
    """q, r, gain, timescale, Ljung-Box p and unit of every series of `streams`
    (REWARD_STREAMS columns), for the whole series and (with `regimes`) its learning and
    plateau regimes: rows ordered series by series, `regime` in REGIMES order.

    Series are cleaned as in `metrics` (non-finite rewards dropped; stale epoch rows
    dropped when `config.destale`). Columns: `schema.LOCAL_LEVEL`."""
    prep = prepare_series(streams, config)
    lengths = prep.nonempty_lengths
    starts = prep.starts
    n_series = len(lengths)
    split = split_regimes(prep.y, starts, lengths)
    n_reg = 3 if regimes else 1
    series = np.repeat(np.arange(n_series), n_reg)
    regime = np.tile(np.arange(n_reg), n_series)
    bounds = np.stack(
        (
            np.column_stack((np.zeros(n_series, dtype=np.int64), lengths)),
            split.learning,
            split.plateau,
        )
    )[:n_reg]  # (regime, series, 2)
    lo = bounds[regime, series, 0]
    hi = bounds[regime, series, 1]
    slope = np.stack((split.slope_whole, split.slope_learning, split.slope_plateau))[regime, series]
    n = hi - lo
    y_seg, seg_starts, seg_lens = _gather(prep.y, starts[series], lo, hi)
    present = n > 0
    var_diff = np.full(len(n), np.nan)
    cov1 = np.full(len(n), np.nan)
    var_diff[present], cov1[present] = _moments(y_seg, seg_starts, seg_lens)

    fit = n >= MIN_FIT_SAMPLES
    fit_in_present = fit[present]
    fits = (
        _fit_segments(
            *_gather(
                y_seg,
                seg_starts[fit_in_present],
                np.zeros(int(fit.sum()), dtype=np.int64),
                seg_lens[fit_in_present],
            ),
            grid_size,
        )
        if fit.any()
        else None
    )
    gain = np.full(len(n), np.nan)
    sse_min = np.full(len(n), np.nan)
    j = np.full(len(n), -1)
    lb_p = np.full(len(n), np.nan)
    lb_lags = np.zeros(len(n), dtype=np.int64)
    if fits is not None:
        gain[fit] = np.exp(fits.log_gain)
        sse_min[fit] = fits.sse
        j[fit] = fits.grid_index
        lb_p[fit] = fits.ljung_box_p
        lb_lags[fit] = fits.ljung_box_lags
    constant = fit & (sse_min == 0.0)
    undefined = ~fit | constant
    with np.errstate(divide="ignore", invalid="ignore"):
        innovation_var = np.maximum(sse_min, 0.0) / (n - 1)
        q, r = gain_to_variances(gain, innovation_var)
        raw_timescale = 1.0 / gain
    lower = fit & (j == 0)
    upper = fit & (j == grid_size - 1)
    longer = fit & ~lower & (raw_timescale > n)
    at_bound = (lower | upper | longer) & ~constant
    gain, q, r = (np.where(undefined, np.nan, v) for v in (gain, q, r))
    lb_p = np.where(undefined, np.nan, lb_p)
    fit_ok = np.where(undefined, False, lb_p >= FIT_OK_P)
    timescale = np.minimum(1.0 / gain, n)

    regime_names = np.asarray(REGIMES)[regime]
    note = np.full(len(n), "", dtype=object)
    note[lower] = (
        f"no detectable drift: gain at the grid's lower end ({GAIN_MIN:g}); "
        "left out of pooled figures"
    )
    note[upper] = "no detectable observation noise: gain ~ 1; left out of pooled figures"
    note[longer] = (
        "timescale longer than the series/regime: capped at its length; left out of pooled figures"
    )
    bad_lb = ~undefined & ~fit_ok & np.isfinite(lb_p)
    note[bad_lb] = [
        (f"{x}; " if x else "")
        + f"Ljung-Box p = {p:.2g} < {FIT_OK_P:g}: one-step errors autocorrelated"
        for x, p in zip(note[bad_lb], lb_p[bad_lb], strict=True)
    ]
    note[constant] = "constant series: no drift and no noise, gain undefined"
    short = present & ~fit
    note[short] = [
        f"{k} samples: fewer than {MIN_FIT_SAMPLES}, the minimum for a stable fit" for k in n[short]
    ]
    no_break = ~split.accepted[series]
    note[~present & (regime == 1)] = (
        "no learning regime: no break accepted by BIC and the series moves < 2 residual sd"
    )
    note[~present & (regime == 2)] = (
        "no plateau regime: no break accepted by BIC and the series moves > 2 residual sd"
    )
    one_regime = present & (regime > 0) & no_break
    note[one_regime] = [
        (f"{x}; " if x else "") + "no break accepted by BIC: the whole series"
        for x in note[one_regime]
    ]

    nonempty = prep.lengths > 0
    keys = prep.keys.filter(pl.Series(nonempty))[series]
    granularity = keys["granularity"].to_numpy() if keys.height else np.zeros(0, dtype=object)
    unit = np.where(granularity == GRANULARITY_COMPLETION, UNIT_COMPLETIONS, UNIT_EPOCHS)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(undefined, np.nan, gain * gain / (1.0 - gain))
    out = keys.with_columns(
        pl.Series("regime", regime_names.astype(str), dtype=pl.String),
        pl.Series("unit", unit.astype(str), dtype=pl.String),
        pl.Series("regime_start", lo),
        pl.Series("regime_end", hi),
        pl.Series("n_samples", n),
        pl.Series("trend_slope", np.where(present, slope, np.nan)),
        pl.Series("var_diff", var_diff),
        pl.Series("cov_diff_lag1", cov1),
        pl.Series("q", q),
        pl.Series("r", r),
        pl.Series("signal_to_noise", snr),
        pl.Series("gain", gain),
        pl.Series("timescale", timescale),
        pl.Series("at_bound", at_bound),
        pl.Series("ljung_box_p", lb_p),
        pl.Series("ljung_box_lags", lb_lags),
        pl.Series("fit_ok", fit_ok.astype(bool)),
        pl.Series("note", note.astype(str), dtype=pl.String),
    )
    return conform(out, LOCAL_LEVEL, "local_level")


# --- across seeds ----------------------------------------------------------------------------

CI_METHOD_LOG_T = "t on logs"
CI_METHOD_PAIRED = "paired t on log ratios"
CI_METHOD_WELCH = "Welch t on log ratios"
CI_METHOD_TYPICAL = "paired t on log ratios to the seed's geometric-mean label"
CI_METHOD_WELCH_TYPICAL = "Welch t (df = n - 1) on log ratios to the other tasks' geometric mean"
# Pooled rows vs the quietest task (Bonferroni over all task pairs) up to this many tasks
# with a finite noise in a (granularity, unit, regime), vs the typical task beyond.
MAX_TASKS_VS_QUIETEST = 10
EPOCH_CAVEAT = "epoch means of held values: a description, not a per-completion timescale"
EPOCH_NOISE_CAVEAT = "epoch means: depends on completions per epoch and the held-value lag"
LP_NOT_COMPARABLE = (
    "epoch means: timescale in epochs, not comparable with LP's per-completion "
    "ema_timescale (a scale needs completions per epoch, or the per-completion stream); "
    + EPOCH_CAVEAT
)
LP_PER_INSTANCE = (
    "timescale in completions of the label; LP's ema_timescale is a weight per completion "
    "of one task instance, and a label with m active instances spans about m / "
    "ema_timescale label completions of LP's EMA: m is not known here, so timescale_ratio "
    "is null"
)


def _lp_weight(config: Mapping[str, Any] | None) -> float:
    """LP's fast EMA weight from a config dict (Metta main's default when absent)."""
    value = (config or {}).get("ema_timescale", METTA_MAIN_EMA_TIMESCALE)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if value > 0 else math.nan


def _geomean(values: np.ndarray) -> float:
    x = values[np.isfinite(values) & (values > 0)]
    return float(np.exp(np.log(x).mean())) if x.size else math.nan


def welch_log_ratio_interval(
    a: np.ndarray | list[float],
    b: np.ndarray | list[float],
    level: float = LEVEL,
    hsu_df: bool = False,
) -> Interval:
    """Ratio of geometric means of two independent positive samples (e.g. the noise of
    two tasks over their own seeds), with the Welch t interval of the difference of mean
    logs (Satterthwaite df), transformed back. n = the smaller sample; NaN bounds when
    either has fewer than 2 values. `hsu_df`: df = n - 1 instead (Hsu's conservative df,
    never above Satterthwaite's): with 3 values in one sample and many in the other the
    estimated df is large exactly when that sample's variance comes out small, and the
    Satterthwaite interval covered 0.93 at nominal 0.95 (0.88 with 2 values)."""
    la = np.log(np.asarray([v for v in np.ravel(a) if np.isfinite(v) and v > 0]))
    lb = np.log(np.asarray([v for v in np.ravel(b) if np.isfinite(v) and v > 0]))
    n = int(min(la.size, lb.size))
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, CI_METHOD_WELCH, 0, level)
    diff = float(la.mean() - lb.mean())
    if n < 2:
        return Interval(math.exp(diff), math.nan, math.nan, CI_METHOD_WELCH, n, level)
    va, vb = la.var(ddof=1) / la.size, lb.var(ddof=1) / lb.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Interval(math.exp(diff), math.exp(diff), math.exp(diff), CI_METHOD_WELCH, n, level)
    if hsu_df:
        df = float(n - 1)
    else:
        df = (va + vb) ** 2 / (va * va / (la.size - 1) + vb * vb / (lb.size - 1))
    half = float(stats.t.ppf(0.5 + level / 2.0, df) * se)
    return Interval(_exp(diff), _exp(diff - half), _exp(diff + half), CI_METHOD_WELCH, n, level)


def _exp(x: float) -> float:
    """exp that saturates: a log-scale bound of a very wide interval (a Bonferroni level
    over thousands of pairs with 3 seeds) is 0 or inf, not an OverflowError."""
    return math.inf if x > 709.0 else math.exp(x)


def _exclusions(part: pl.DataFrame) -> tuple[int, str]:
    """How many series rows of a group are left out of pooling, and why (counted)."""
    n = part["n_samples"].to_numpy()
    gain = part["gain"].to_numpy()
    bound = part["at_bound"].to_numpy()
    absent = n == 0
    short = (n > 0) & (n < MIN_FIT_SAMPLES)
    undefined = ~absent & ~short & ~np.isfinite(gain)
    flagged = np.isfinite(gain) & bound
    counts = [
        (int(flagged.sum()), "gain at a grid bound or 1/K longer than the regime"),
        (int(short.sum()), f"shorter than {MIN_FIT_SAMPLES} samples"),
        (int(absent.sum()), "regime absent"),
        (int(undefined.sum()), "constant (no gain)"),
    ]
    total = sum(k for k, _ in counts)
    return total, ", ".join(f"{k} {why}" for k, why in counts if k)


def recommend_timescales(
    per_series: pl.DataFrame,
    lp_config: Mapping[str, Any] | None = None,
    lp_configs_by_task: Mapping[str, Mapping[str, Any]] | None = None,
) -> pl.DataFrame:
    """Tracking-optimal EMA timescale per (task, label, regime) and per (task, regime)
    (labels pooled), pooled over seeds, in the unit of the series.

    `per_series`: the `estimate_local_level` table, or any table with its columns whose
    q, r, gain and `unit` were converted (e.g. epoch figures turned into completion units
    given completions per epoch: set `unit` = "completions"). Per seed (a (seed, run_id)
    pair) a label contributes its timescale 1/K, noise sqrt(r), drift sqrt(q); the pooled
    row "*" takes per seed the geometric mean over that seed's labels. Across seeds: the
    geometric mean with a t interval on logs (`intervals.log_t_interval`; `ci_method`,
    `ci_n` = seeds). Fits with `at_bound`, shorter than MIN_FIT_SAMPLES, absent regimes
    and constant series are left out and counted (`n_excluded`, `excluded_reason`);
    usable fits with Ljung-Box p < FIT_OK_P stay in and are counted (`n_fit_not_ok`).
    `n_seeds_epoch_only`: seeds of the group whose run has no completion stream of the
    task (what an epoch row adds beyond the task's completion rows).

    The LP config (`lp_ema_timescale` from `lp_config` or `lp_configs_by_task[task]`,
    default Metta main's 0.001; `lp_timescale` = 1 / it, completions of one task instance)
    is shown only on rows whose unit is "completions"; `timescale_ratio` is always null: a
    label pools many task instances and their count is unknown here (module doc,
    `lp_comparison`). Epoch rows carry the held-value caveat in `lp_comparison` and
    `note`. Noise vs the typical label of the same (task, unit, regime): per seed log
    ratios, paired t (`noise_ratio_ci_method`); pooled rows vs the quietest task (up to
    MAX_TASKS_VS_QUIETEST tasks) or the typical task: Welch t on logs (different runs;
    `_add_references`). Columns: `schema.TIMESCALE_RECOMMENDATIONS`."""
    by_task = dict(lp_configs_by_task or {})
    if per_series.height == 0:
        return pl.DataFrame(schema=TIMESCALE_RECOMMENDATIONS)
    df = per_series.with_columns(
        (
            pl.col("gain").is_finite()
            & pl.col("r").is_finite()
            & pl.col("q").is_finite()
            & ~pl.col("at_bound").fill_null(True)
        ).alias("_usable"),
        pl.concat_str([pl.col("seed").cast(pl.String), pl.col("run_id")], separator="|")
        .fill_null("?")
        .alias("_unit_seed"),
    )
    with_completions = (
        df.filter(pl.col("granularity") == GRANULARITY_COMPLETION)
        .select(pl.concat_str([pl.col("task"), pl.col("_unit_seed")], separator="|"))
        .to_series()
        .unique()
        .to_list()
    )
    df = df.with_columns(
        ~pl.concat_str([pl.col("task"), pl.col("_unit_seed")], separator="|")
        .is_in(with_completions)
        .alias("_epoch_only")
    )
    rows: list[dict[str, Any]] = []
    seed_noise: dict[tuple[str, str, str, str, str], dict[str, float]] = {}
    group_keys = ("task", "granularity", "unit", "regime")
    # seeds whose run has no completion stream, per (group, label) and per group: counted
    # once here rather than filtered row by row
    epoch_rows = df.filter(pl.col("_epoch_only"))
    seeds_of = pl.col("_unit_seed").n_unique()
    epoch_only_of: dict[tuple, int] = {
        (*k, "*"): n for *k, n in epoch_rows.group_by(group_keys).agg(seeds_of).iter_rows()
    }
    epoch_only_of |= {
        tuple(k): n for *k, n in epoch_rows.group_by(*group_keys, "label").agg(seeds_of).iter_rows()
    }
    for key, part in df.group_by(group_keys, maintain_order=True):
        task, granularity, unit, regime = (str(v) for v in key)
        lp_weight = _lp_weight(by_task.get(task, lp_config))
        comparable = unit == UNIT_COMPLETIONS
        seeds = sorted(part["_unit_seed"].unique().to_list())
        labels = sorted(part["label"].unique().to_list())
        s_idx = {s: i for i, s in enumerate(seeds)}
        l_idx = {lab: i for i, lab in enumerate(labels)}
        ts = np.full((len(seeds), len(labels)), np.nan)
        noise = np.full_like(ts, np.nan)
        drift = np.full_like(ts, np.nan)
        not_ok = np.zeros_like(ts, dtype=bool)
        use = part.filter(pl.col("_usable"))
        i = np.asarray([s_idx[s] for s in use["_unit_seed"].to_list()], dtype=np.int64)
        k = np.asarray([l_idx[lab] for lab in use["label"].to_list()], dtype=np.int64)
        ts[i, k] = 1.0 / use["gain"].to_numpy()
        noise[i, k] = np.sqrt(use["r"].to_numpy())
        drift[i, k] = np.sqrt(use["q"].to_numpy())
        not_ok[i, k] = (use["ljung_box_p"].fill_null(math.nan) < FIT_OK_P).to_numpy()
        with warnings.catch_warnings():  # all-NaN seeds are meant to give NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            pooled_seed = {
                "ts": np.exp(np.nanmean(np.log(ts), axis=1)),
                "noise": np.exp(np.nanmean(np.log(noise), axis=1)),
                "drift": np.exp(np.nanmean(np.log(drift), axis=1)),
            }
        by_label = part.partition_by("label", as_dict=True, maintain_order=True)
        groups = [(lab, by_label[(lab,)], l_idx[lab]) for lab in labels]
        groups.append(("*", part, -1))
        # every label's interval (and the pooled one, last) in one vectorised call: the
        # same numbers as `log_t_interval` on each column
        geo, low, high, count = log_t_bounds(np.column_stack([ts, pooled_seed["ts"]]).T)
        for label, members, col in groups:
            if col >= 0:
                n_seed, d_seed = noise[:, col], drift[:, col]
                n_bad = int(not_ok[:, col].sum())
            else:
                n_seed, d_seed = pooled_seed["noise"], pooled_seed["drift"]
                n_bad = int(not_ok.sum())
            c = col if col >= 0 else len(labels)
            interval = Interval(
                float(geo[c]), float(low[c]), float(high[c]), CI_METHOD_LOG_T, int(count[c]), LEVEL
            )
            n_excl, why = _exclusions(members)
            epoch_only = epoch_only_of.get((task, granularity, unit, regime, label), 0)
            seed_noise[(task, granularity, unit, regime, label)] = dict(
                zip(seeds, n_seed, strict=True)
            )
            estimate = interval.estimate
            rows.append(
                {
                    "task": task,
                    "group": "pooled" if label == "*" else "label",
                    "label": label,
                    "granularity": granularity,
                    "regime": regime,
                    "unit": unit,
                    "n_series": members.height,
                    "n_seeds": interval.n,
                    "n_excluded": n_excl,
                    "excluded_reason": why,
                    "n_fit_not_ok": n_bad,
                    "n_seeds_epoch_only": epoch_only,
                    "noise_std": _geomean(n_seed),
                    "drift_std": _geomean(d_seed),
                    "gain": 1.0 / estimate if estimate > 0 else math.nan,
                    "timescale": estimate,
                    "timescale_ci_low": interval.low,
                    "timescale_ci_high": interval.high,
                    "ci_method": interval.method,
                    "ci_n": interval.n,
                    "ci_level": interval.level,
                    "lp_ema_timescale": lp_weight if comparable else None,
                    "lp_timescale": 1.0 / lp_weight if comparable else None,
                    "timescale_ratio": None,
                    "lp_comparison": LP_PER_INSTANCE if comparable else LP_NOT_COMPARABLE,
                    "note": _rec_note(interval.n, n_excl, n_bad, comparable),
                }
            )
    table = pl.DataFrame(rows, infer_schema_length=None)
    return _add_references(table, seed_noise)


def _rec_note(n_seeds: int, n_excluded: int, n_not_ok: int, completions: bool = True) -> str:
    parts = [] if completions else [EPOCH_CAVEAT]
    if n_seeds == 0:
        parts.append("no usable fit")
    elif n_seeds < 2:
        parts.append("1 seed: no interval")
    if n_excluded:
        parts.append(f"{n_excluded} fit(s) left out (excluded_reason)")
    if n_not_ok:
        parts.append(f"{n_not_ok} fit(s) with Ljung-Box p < {FIT_OK_P:g} kept")
    return "; ".join(parts)


_REFERENCE_COLUMNS = (
    "reference_label",
    "noise_ratio",
    "noise_ratio_ci_low",
    "noise_ratio_ci_high",
    "noise_ratio_ci_method",
    "noise_ratio_n",
    "timescale_vs_reference",
)


def _finite_noise(row: dict[str, Any]) -> bool:
    value = row["noise_std"]
    return value is not None and math.isfinite(value)


def _add_references(
    table: pl.DataFrame, seed_noise: dict[tuple[str, str, str, str, str], dict[str, float]]
) -> pl.DataFrame:
    """Noise of each label vs its task's typical label, and of each task vs the quietest
    task (up to MAX_TASKS_VS_QUIETEST tasks) or else vs the typical task.

    Label rows: per seed, the label's noise over the geometric mean of the noise of all the
    task's labels of that seed (same unit and regime); paired t on those log ratios over
    seeds. The reference is not picked from the data, so there is no winner's curse (a
    quietest-label reference under-covered: 0.86 with 40 labels at 3 seeds). Pooled rows,
    at most MAX_TASKS_VS_QUIETEST tasks with a finite noise in the (granularity, unit,
    regime): Welch t on logs vs the quietest task, Bonferroni over all task pairs, so the
    interval holds whichever pair the data picked. More tasks: that level is so extreme
    (54,285 pairs at 330 tasks) that every interval at 3 seeds is [0, inf], so each task is
    compared with the typical task instead: Welch t on logs between its per-seed noise and
    the other tasks' per-task geometric-mean noise (seeds of different tasks are not paired),
    an interval for exp(mean log noise of the task - mean over the other tasks of theirs),
    with df = seeds - 1 (`welch_log_ratio_interval`, `hsu_df`: Satterthwaite's df covered
    0.93 at 3 seeds). That reference is not picked from the data: no multiplicity
    correction (the sentence that names the noisiest task widens it for that pick,
    `describe_recommendations`)."""
    rows = list(table.iter_rows(named=True))
    # peers of each row, gathered once (table order kept): the labels of its task, or
    # the tasks of its (granularity, unit, regime), with a finite noise
    label_peers: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    task_peers: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if not _finite_noise(row):
            continue
        where = (row["granularity"], row["unit"], row["regime"])
        if row["group"] == "label":
            label_peers.setdefault((row["task"], *where), []).append(row)
        else:
            task_peers.setdefault(where, []).append(row)
    task_refs = {where: _task_references(peers, seed_noise) for where, peers in task_peers.items()}
    refs: list[dict[str, Any]] = []
    for row in rows:
        task, gran, unit, regime = row["task"], row["granularity"], row["unit"], row["regime"]
        if row["group"] != "label":
            ref = task_refs.get((gran, unit, regime), {}).get(task)
            refs.append(ref if ref and _finite_noise(row) else dict.fromkeys(_REFERENCE_COLUMNS))
            continue
        peers = label_peers.get((task, gran, unit, regime), [])
        if len(peers) < 2 or not _finite_noise(row):
            refs.append(dict.fromkeys(_REFERENCE_COLUMNS))
            continue
        mine = seed_noise[(task, gran, unit, regime, row["label"])]
        per_seed: dict[str, list[float]] = {}
        for peer in peers:
            for seed, value in seed_noise[(task, gran, unit, regime, peer["label"])].items():
                if value > 0 and math.isfinite(value):
                    per_seed.setdefault(seed, []).append(math.log(value))
        common = [s for s in sorted(mine) if s in per_seed and len(per_seed[s]) >= 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.asarray([mine[s] / math.exp(float(np.mean(per_seed[s]))) for s in common])
        interval = log_t_interval(ratios, method=CI_METHOD_TYPICAL)
        typical_ts = math.exp(
            float(np.log(np.asarray([p["timescale"] for p in peers], dtype=np.float64)).mean())
        )
        refs.append(
            _reference(
                f"the typical label of the task (geometric mean of {len(peers)} labels)",
                interval,
                row["timescale"] / typical_ts if typical_ts else math.nan,
            )
        )
    extra = pl.DataFrame(refs, schema={c: TIMESCALE_RECOMMENDATIONS[c] for c in _REFERENCE_COLUMNS})
    out = pl.concat([table.drop(_REFERENCE_COLUMNS, strict=False), extra], how="horizontal")
    return conform(out, TIMESCALE_RECOMMENDATIONS, "timescale_recommendations")


def _reference(name: str, interval: Interval, ts_ratio: float) -> dict[str, Any]:
    return {
        "reference_label": name,
        "noise_ratio": interval.estimate,
        "noise_ratio_ci_low": interval.low,
        "noise_ratio_ci_high": interval.high,
        "noise_ratio_ci_method": interval.method,
        "noise_ratio_n": interval.n,
        "timescale_vs_reference": ts_ratio,
    }


def _task_references(
    peers: list[dict[str, Any]],
    seed_noise: dict[tuple[str, str, str, str, str], dict[str, float]],
) -> dict[str, dict[str, Any]]:
    """Reference columns of each pooled row of one (granularity, unit, regime), by task:
    `peers` are its pooled rows with a finite noise (`_add_references`)."""
    if len(peers) < 2:
        return {}

    def noise_of(row: dict[str, Any]) -> dict[str, float]:
        return seed_noise[(row["task"], row["granularity"], row["unit"], row["regime"], "*")]

    out: dict[str, dict[str, Any]] = {}
    if len(peers) > MAX_TASKS_VS_QUIETEST:
        # per task: its geometric mean over seeds (noise_std) and its timescale
        log_noise = np.log(np.asarray([p["noise_std"] for p in peers], dtype=np.float64))
        timescales = np.asarray([p["timescale"] for p in peers], dtype=np.float64)
        name = f"the typical task (geometric mean of {len(peers) - 1} other tasks)"
        for i, row in enumerate(peers):
            others = np.exp(np.delete(log_noise, i))
            interval = replace(
                welch_log_ratio_interval(list(noise_of(row).values()), others, hsu_df=True),
                method=CI_METHOD_WELCH_TYPICAL,
            )
            typical_ts = _geomean(np.delete(timescales, i))
            with np.errstate(divide="ignore", invalid="ignore"):
                ts_ratio = row["timescale"] / typical_ts if typical_ts else math.nan
            out[row["task"]] = _reference(name, interval, ts_ratio)
        return out
    ref = min(peers, key=lambda p: (p["noise_std"], p["task"], p["label"]))
    theirs = noise_of(ref)
    pairs = len(peers) * (len(peers) - 1) // 2
    for row in peers:
        if row["task"] == ref["task"]:  # the reference itself
            out[row["task"]] = dict.fromkeys(_REFERENCE_COLUMNS) | {
                "reference_label": ref["task"],
                "noise_ratio": 1.0,
                "noise_ratio_ci_method": "reference",
                "timescale_vs_reference": 1.0,
            }
            continue
        interval = replace(
            welch_log_ratio_interval(
                list(noise_of(row).values()),
                list(theirs.values()),
                level=1.0 - (1.0 - LEVEL) / pairs,
            ),
            method=f"{CI_METHOD_WELCH}, Bonferroni over {pairs} task pairs",
            level=LEVEL,  # all pairs hold together at LEVEL
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            ts_ratio = row["timescale"] / ref["timescale"] if ref["timescale"] else math.nan
        out[row["task"]] = _reference(ref["task"], interval, ts_ratio)
    return out


def _adjusted_for_picking(
    row: dict[str, Any], k: int, what: str = "labels"
) -> tuple[float, float, str]:
    """The row's noise-ratio interval widened to Bonferroni over `k` (the sentence names the
    noisiest of k labels or tasks: a picked one), from its own t interval on logs on n - 1
    df (the paired interval's df, and the typical-task Welch interval's: `hsu_df`)."""
    low, high, n = row["noise_ratio_ci_low"], row["noise_ratio_ci_high"], row["noise_ratio_n"]
    if low is None or high is None or not n or n < 2 or not (low > 0 and high > 0):
        return math.nan, math.nan, row["noise_ratio_ci_method"] or ""
    centre, half = (math.log(high) + math.log(low)) / 2, (math.log(high) - math.log(low)) / 2
    widen = stats.t.ppf(1 - (1 - LEVEL) / (2 * k), n - 1) / stats.t.ppf(1 - (1 - LEVEL) / 2, n - 1)
    return (
        _exp(centre - half * widen),
        _exp(centre + half * widen),
        f"{row['noise_ratio_ci_method']}, Bonferroni over {k} {what}",
    )


# --- plain words (descriptive only) ------------------------------------------------------------


def _fmt(x: float | None) -> str:
    """2 significant digits below 10 (keeping a trailing zero: 2.0), integers above."""
    if x is None or not math.isfinite(x):
        return "n/a"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:#.2g}" if x < 10 else f"{x:.0f}"


def _fmt_range(lo: float | None, hi: float | None) -> str:
    """`lo-hi`, with more digits when the default rounding would print the same number."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    if _fmt(lo) != _fmt(hi):
        return f"{_fmt(lo)}-{_fmt(hi)}"
    return f"{lo:.4g}-{hi:.4g}"


def _interval_text(lo: float | None, hi: float | None, method: str, n: int, level: float) -> str:
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"no interval, n={n}"
    return f"{level:.0%} {method} interval {_fmt_range(lo, hi)}, n={n}"


RECORD_STREAM_SENTENCE = (
    "epoch means average many completions and held values, so these figures are in "
    f"epochs ({EPOCH_CAVEAT}); a per-completion stream (RewardStreamRecorder) gives "
    "figures in completions"
)


def _described_groups(rows: pl.DataFrame) -> list[tuple[str, str]]:
    """(granularity, unit) pairs of one task's rows to describe: completion-stream rows,
    and epoch-stream rows when the task has no completion rows or some of its epoch seeds
    come from runs without a completion stream (`n_seeds_epoch_only`)."""
    pairs = rows.select("granularity", "unit").unique(maintain_order=True).rows()
    has_completion = any(g == GRANULARITY_COMPLETION for g, _ in pairs)
    out = []
    for granularity, unit in pairs:
        part = rows.filter((pl.col("granularity") == granularity) & (pl.col("unit") == unit))
        epoch_only = (
            int(part["n_seeds_epoch_only"].fill_null(0).max() or 0)
            if "n_seeds_epoch_only" in part.columns
            else 0
        )
        if granularity == GRANULARITY_COMPLETION or not has_completion or epoch_only > 0:
            out.append((granularity, unit))
    order = {UNIT_COMPLETIONS: 0, UNIT_EPOCHS: 1}
    return sorted(out, key=lambda gu: (gu[0] != GRANULARITY_COMPLETION, order.get(gu[1], 2)))


def _regime_sentence(task: str, p: dict[str, Any]) -> str:
    """One pooled (task, granularity, unit, regime) row in plain words."""
    unit, regime = p["unit"], p["regime"]
    singular = unit[:-1]
    head = f"{task}, {regime} {'series' if regime == REGIME_WHOLE else 'regime'}"
    if p["granularity"] != GRANULARITY_COMPLETION and unit == UNIT_COMPLETIONS:
        head += " (epoch stream converted to completions"
    else:
        head += f" ({unit}"
    epoch_only = p.get("n_seeds_epoch_only") or 0
    if p["granularity"] != GRANULARITY_COMPLETION and epoch_only:
        head += f"; {epoch_only} of {p['n_seeds']} seeds from runs without a completion stream"
    head += ")"
    extra = ""
    if p["n_excluded"]:
        extra += f"; {p['n_excluded']} of {p['n_series']} fits left out ({p['excluded_reason']})"
    if p["n_fit_not_ok"]:
        n_usable = p["n_series"] - (p["n_excluded"] or 0)
        extra += (
            f"; {p['n_fit_not_ok']} of {n_usable} usable fits fail Ljung-Box (p < "
            f"{FIT_OK_P:g}: one-step errors autocorrelated, the local-level model misses "
            "structure there)"
        )
    if not math.isfinite(p["timescale"]):
        return f"{head}: no timescale could be estimated{extra}."
    text = (
        f"{head}: noise sd {p['noise_std']:.3g}, drift sd {p['drift_std']:.3g} per "
        f"{singular}; tracking-optimal EMA timescale (steady-state Kalman 1/K) "
        f"~{_fmt(p['timescale'])} {unit} ("
        + _interval_text(
            p["timescale_ci_low"], p["timescale_ci_high"], p["ci_method"], p["ci_n"], p["ci_level"]
        )
        + ")"
    )
    if unit == UNIT_COMPLETIONS and p["lp_ema_timescale"] is not None and regime == REGIME_WHOLE:
        weight = p["lp_ema_timescale"]
        text += (
            f"; LP's ema_timescale {weight:g} is a weight per completion of one task "
            f"instance ({_fmt(p['lp_timescale'])} completions of that instance); with m "
            f"instances of a label active, LP's EMA spans about m x {_fmt(p['lp_timescale'])}"
            " completions of the label"
        )
    if p["granularity"] != GRANULARITY_COMPLETION or unit != UNIT_COMPLETIONS:
        text += f"; {RECORD_STREAM_SENTENCE}"
    return text + extra + "."


def describe_recommendations(table: pl.DataFrame) -> list[str]:
    """Descriptive plain-words findings from `recommend_timescales` (no advice): per task,
    stream granularity and regime, noise, drift and the tracking-optimal timescale with its
    unit, interval, method and n, the fits left out and those failing Ljung-Box; LP's
    ema_timescale beside it in completion units as a per-instance weight (no ratio: a label
    pools many instances); each task's noisiest label vs its typical label and the noisiest
    task vs its reference (whole series; intervals widened for the pick where needed).
    Completion-stream rows are always described; epoch-stream rows when the task has no
    completion rows or some epoch seeds come from runs without a completion stream. Epoch
    noise comparisons carry the held-value caveat."""
    if table.height == 0:
        return []
    out: list[str] = []
    for task in table["task"].unique(maintain_order=True).to_list():
        task_rows = table.filter(pl.col("task") == task)
        for granularity, unit in _described_groups(task_rows):
            rows = task_rows.filter(
                (pl.col("granularity") == granularity) & (pl.col("unit") == unit)
            )
            for regime in (REGIME_WHOLE, REGIME_LEARNING, REGIME_PLATEAU):
                pooled = rows.filter((pl.col("group") == "pooled") & (pl.col("regime") == regime))
                if pooled.height:
                    out.append(_regime_sentence(task, pooled.row(0, named=True)))
            labels = rows.filter(
                (pl.col("group") == "label")
                & (pl.col("regime") == REGIME_WHOLE)
                & pl.col("noise_ratio").is_finite()
            )
            if labels.height >= 2:
                top = labels.sort("noise_ratio", descending=True).row(0, named=True)
                if top["noise_ratio"] > 1.0:
                    low, high, method = _adjusted_for_picking(top, labels.height)
                    picked = top | {
                        "noise_ratio_ci_low": low,
                        "noise_ratio_ci_high": high,
                        "noise_ratio_ci_method": method,
                    }
                    out.append(
                        _noise_sentence(
                            f"{task}/{top['label']}",
                            top["reference_label"],
                            picked,
                        )
                    )
    pooled = table.filter(
        (pl.col("group") == "pooled")
        & (pl.col("regime") == REGIME_WHOLE)
        & pl.col("noise_ratio").is_finite()
    )
    pairs = pooled.select("granularity", "unit").unique().rows()
    for granularity, unit in sorted(pairs, key=lambda gu: (gu[0] != GRANULARITY_COMPLETION, gu)):
        part = pooled.filter((pl.col("granularity") == granularity) & (pl.col("unit") == unit))
        if part.height >= 2:
            top = part.sort("noise_ratio", descending=True).row(0, named=True)
            if top["noise_ratio"] > 1.0:
                if top["noise_ratio_ci_method"] == CI_METHOD_WELCH_TYPICAL:
                    # vs the typical task the interval holds for one task, not for the
                    # noisiest of them (vs the quietest task it already holds for any pair)
                    low, high, method = _adjusted_for_picking(top, part.height, "tasks")
                    top = top | {
                        "noise_ratio_ci_low": low,
                        "noise_ratio_ci_high": high,
                        "noise_ratio_ci_method": method,
                    }
                out.append(_noise_sentence(top["task"], top["reference_label"], top))
    return out


def _noise_sentence(name: str, reference: str, row: dict[str, Any]) -> str:
    ts_ratio = row["timescale_vs_reference"]
    if ts_ratio is None or not math.isfinite(ts_ratio):
        ts_text = "their tracking timescales could not be compared"
    else:
        ts_text = f"its tracking-optimal timescale is {_fmt(ts_ratio)}x that of {reference}"
    ci = _interval_text(
        row["noise_ratio_ci_low"],
        row["noise_ratio_ci_high"],
        row["noise_ratio_ci_method"],
        row["noise_ratio_n"],
        row["ci_level"],
    )
    epoch = row["unit"] != UNIT_COMPLETIONS or row["granularity"] != GRANULARITY_COMPLETION
    caveat = f"; {EPOCH_NOISE_CAVEAT}" if epoch else ""
    return (
        f"{name} is {_fmt(row['noise_ratio'])}x as noisy as {reference} "
        f"(whole series, {row['unit']}{caveat}; {ci}); {ts_text}."
    )
