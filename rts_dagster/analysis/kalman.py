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

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from rts_dagster.analysis import recurrence
from rts_dagster.analysis.distributions import chi2_sf, t_ppf
from rts_dagster.analysis.intervals import LEVEL, Interval
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
    num = recurrence.first_order(y, w, axis=1)
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
    p = np.where(ok, chi2_sf(q, np.maximum(df, 1)), np.nan)
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
    half = float(t_ppf(0.5 + level / 2.0, df) * se)
    return Interval(_exp(diff), _exp(diff - half), _exp(diff + half), CI_METHOD_WELCH, n, level)


def _exp(x: float) -> float:
    """exp that saturates: a log-scale bound of a very wide interval (a Bonferroni level
    over thousands of pairs with 3 seeds) is 0 or inf, not an OverflowError."""
    return math.inf if x > 709.0 else math.exp(x)


_EXCLUSION_REASONS = (  # excluded_reason, in this order: (count column, why)
    ("_flagged", "gain at a grid bound or 1/K longer than the regime"),
    ("_short", f"shorter than {MIN_FIT_SAMPLES} samples"),
    ("_absent", "regime absent"),
    ("_undefined", "constant (no gain)"),
)


def _log_moments(
    index: np.ndarray, values: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group (`index` in 0..size-1) over its finite positive `values`: (count, mean of
    the logs, sum of squared deviations of the logs from that mean), in two passes like
    `intervals.t_bounds`. NaN mean where a group has no such value."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = np.isfinite(values) & (values > 0)
        at, logs = index[ok], np.log(values[ok])
        n = np.bincount(at, minlength=size)
        mean = np.bincount(at, logs, minlength=size) / n
        dev = logs - mean[at]
        return n, mean, np.bincount(at, dev * dev, minlength=size)


def _t_quantile(q: float, df: np.ndarray) -> np.ndarray:
    """t_ppf(q, df) elementwise, evaluated once per distinct df (there are few)."""
    values, inverse = np.unique(df, return_inverse=True)
    return np.asarray(t_ppf(q, values), dtype=np.float64)[inverse]


def _log_t_by(
    index: np.ndarray, values: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`intervals.log_t_bounds` per group: (geometric mean, low, high, n)."""
    n, mean, ss = _log_moments(index, values, size)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sd = np.sqrt(ss / (n - 1))
        half = _t_quantile(0.5 + LEVEL / 2.0, np.where(n >= 2, n - 1, 1)) * sd / np.sqrt(n)
        half = np.where(n >= 2, half, np.nan)
        mean = np.where(n >= 1, mean, np.nan)
        return np.exp(mean), np.exp(mean - half), np.exp(mean + half), n


def _geomean_by(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """`_geomean` per group."""
    n, mean, _ = _log_moments(index, values, size)
    with np.errstate(over="ignore"):
        return np.where(n > 0, np.exp(mean), np.nan)


def _exp_array(x: np.ndarray) -> np.ndarray:
    """`_exp` elementwise."""
    with np.errstate(over="ignore"):
        return np.where(x > 709.0, np.inf, np.exp(x))


@dataclass(frozen=True)
class _SeedNoise:
    """The per-seed noise behind a `recommend_timescales` table, for `_add_references`:
    one cell per (label row, seed) with a usable fit (its sqrt(r)), and one pair per
    (group, seed) with the geometric mean over that seed's labels (what the group's
    pooled row pools)."""

    group: np.ndarray  # (task, granularity, unit, regime) group of each table row
    cell_row: np.ndarray  # table row (a label row) of each cell
    cell_pair: np.ndarray  # the (group, seed) pair of each cell
    cell_noise: np.ndarray
    pair_row: np.ndarray  # table row (the pooled row) of each pair
    pair_noise: np.ndarray


@dataclass(frozen=True)
class _Layout:
    """Rows of a `recommend_timescales` table: each group's label rows (sorted by label),
    then its pooled row; groups in their order (codes from `recommend_timescales`)."""

    size: int
    group: np.ndarray  # group of each table row
    pooled: np.ndarray  # is each table row the pooled one
    source: np.ndarray  # a series row of each table row (for its keys)
    pooled_pos: np.ndarray  # table row of each group's pooled row
    label_row: np.ndarray  # table row of each series row's label
    pooled_row: np.ndarray  # table row of each series row's pooled row

    @classmethod
    def of(cls, group: np.ndarray, label: np.ndarray) -> _Layout:
        """From each series row's group (0, 1, ... in table order) and label code (in
        label order)."""
        n_groups = int(group.max()) + 1
        _, first_of_label, label_of = np.unique(
            group * (int(label.max()) + 1) + label, return_index=True, return_inverse=True
        )
        group_of_label = group[first_of_label]
        # each label row is preceded by the pooled rows of the groups before its own
        label_pos = np.arange(len(first_of_label)) + group_of_label
        pooled_pos = np.cumsum(np.bincount(group_of_label, minlength=n_groups)) + np.arange(
            n_groups
        )
        size = len(first_of_label) + n_groups
        source = np.empty(size, dtype=np.int64)
        source[label_pos] = first_of_label
        source[pooled_pos] = np.unique(group, return_index=True)[1]
        row_group = np.empty(size, dtype=np.int64)
        row_group[label_pos] = group_of_label
        row_group[pooled_pos] = np.arange(n_groups)
        pooled = np.zeros(size, dtype=bool)
        pooled[pooled_pos] = True
        return cls(
            size, row_group, pooled, source, pooled_pos, label_pos[label_of], pooled_pos[group]
        )


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
    keys = ["task", "granularity", "unit", "regime"]
    unit_seed = pl.concat_str(
        [pl.col("seed").cast(pl.String), pl.col("run_id")], separator="|"
    ).fill_null("?")
    gain_finite = pl.col("gain").is_finite().fill_null(False)
    n_samples = pl.col("n_samples")
    absent = (n_samples == 0).fill_null(False)
    short = ((n_samples > 0) & (n_samples < MIN_FIT_SAMPLES)).fill_null(False)
    usable = (
        gain_finite
        & pl.col("r").is_finite()
        & pl.col("q").is_finite()
        & ~pl.col("at_bound").fill_null(True)
    ).fill_null(False)
    # integer codes of every series row: groups numbered as they first appear (the table's
    # order), labels and seeds by sorted name (the order within a group)
    codes = per_series.with_row_index("_i").select(
        (pl.col("_i").min().over(keys).rank("dense").cast(pl.Int64) - 1).alias("group"),
        pl.col("label").rank("dense").fill_null(0).cast(pl.Int64).alias("label"),
        unit_seed.rank("dense").cast(pl.Int64).alias("seed"),
        usable.alias("usable"),
        # a seed whose run has no completion stream of the task
        (~(pl.col("granularity") == GRANULARITY_COMPLETION).any().over("task", unit_seed))
        .fill_null(False)
        .alias("epoch_only"),
        (gain_finite & pl.col("at_bound").fill_null(False)).alias("_flagged"),
        short.alias("_short"),
        absent.alias("_absent"),
        (~absent & ~short & ~gain_finite).alias("_undefined"),
        (pl.col("ljung_box_p") < FIT_OK_P).fill_null(False).alias("not_ok"),
        (1.0 / pl.col("gain")).alias("ts"),
        pl.col("r").sqrt().alias("noise"),
        pl.col("q").sqrt().alias("drift"),
    )
    group = codes["group"].to_numpy()
    seed = codes["seed"].to_numpy()
    n_seed_codes = int(seed.max()) + 1
    layout = _Layout.of(group, codes["label"].to_numpy())
    size, label_row, pooled_row = layout.size, layout.label_row, layout.pooled_row

    def per_row(mask: np.ndarray) -> np.ndarray:  # series rows counted on both rows
        return np.bincount(label_row[mask], minlength=size) + np.bincount(
            pooled_row[mask], minlength=size
        )

    def distinct_seeds(mask: np.ndarray) -> np.ndarray:  # distinct seeds on both rows
        out = np.zeros(size, dtype=np.int64)
        for row_of in (label_row, pooled_row):
            pairs = np.unique(row_of[mask] * n_seed_codes + seed[mask])
            out += np.bincount(pairs // n_seed_codes, minlength=size)
        return out

    # One cell per (label row, seed): its last usable fit (as assignment into a seeds x
    # labels matrix did), cells sorted by label row then seed.
    usable_rows = np.flatnonzero(codes["usable"].to_numpy())[::-1]
    _, last = np.unique(
        label_row[usable_rows] * n_seed_codes + seed[usable_rows], return_index=True
    )
    cells = usable_rows[last]
    cell_row = label_row[cells]
    ts, noise, drift = (codes[c].to_numpy()[cells] for c in ("ts", "noise", "drift"))
    # Per (group, seed): the geometric mean over the seed's labels, skipping NaN logs and
    # keeping 0 and inf (np.nanmean of the logs, as before); in label order within a pair.
    pair_keys, cell_pair = np.unique(group[cells] * n_seed_codes + seed[cells], return_inverse=True)
    pair_row = layout.pooled_pos[pair_keys // n_seed_codes]

    def per_seed(x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            logs = np.log(x)
            ok = ~np.isnan(logs)
            total = np.bincount(cell_pair[ok], logs[ok], minlength=len(pair_keys))
            return np.exp(total / np.bincount(cell_pair[ok], minlength=len(pair_keys)))

    pair_noise = per_seed(noise)
    rows_of = np.concatenate((cell_row, pair_row))
    geo, low, high, n_seeds = _log_t_by(rows_of, np.concatenate((ts, per_seed(ts))), size)
    with np.errstate(divide="ignore"):
        gain = np.where(geo > 0, 1.0 / geo, np.nan)
    not_ok = codes["not_ok"].to_numpy()[cells]

    names = per_series.select(pl.col(k).gather(layout.source) for k in (*keys, "label"))
    tasks = names["task"].drop_nulls().unique().to_list()
    weights = [_lp_weight(by_task.get(task, lp_config)) for task in tasks]  # one per task
    comparable = (pl.col("unit") == UNIT_COMPLETIONS).fill_null(False)
    lp_weight = pl.col("task").replace_strict(tasks, weights, default=None, return_dtype=pl.Float64)
    table = names.with_columns(
        pl.Series("_pooled", layout.pooled),
        pl.Series("n_series", per_row(np.ones(len(group), dtype=bool))),
        pl.Series("n_seeds", n_seeds),
        *(pl.Series(c, per_row(codes[c].to_numpy())) for c, _ in _EXCLUSION_REASONS),
        pl.Series(
            "n_fit_not_ok",
            np.bincount(cell_row[not_ok], minlength=size)
            + np.bincount(pooled_row[cells][not_ok], minlength=size),
        ),
        pl.Series("n_seeds_epoch_only", distinct_seeds(codes["epoch_only"].to_numpy())),
        pl.Series("noise_std", _geomean_by(rows_of, np.concatenate((noise, pair_noise)), size)),
        pl.Series(
            "drift_std", _geomean_by(rows_of, np.concatenate((drift, per_seed(drift))), size)
        ),
        pl.Series("gain", gain),
        pl.Series("timescale", geo),
        pl.Series("timescale_ci_low", low),
        pl.Series("timescale_ci_high", high),
    ).with_columns(
        pl.when("_pooled").then(pl.lit("pooled")).otherwise(pl.lit("label")).alias("group"),
        pl.when("_pooled").then(pl.lit("*")).otherwise("label").alias("label"),
        pl.sum_horizontal(c for c, _ in _EXCLUSION_REASONS).alias("n_excluded"),
        pl.concat_str(
            [
                pl.when(pl.col(c) > 0).then(pl.format("{} " + why, c))
                for c, why in _EXCLUSION_REASONS
            ],
            separator=", ",
            ignore_nulls=True,
        ).alias("excluded_reason"),
        pl.lit(CI_METHOD_LOG_T).alias("ci_method"),
        pl.col("n_seeds").alias("ci_n"),
        pl.lit(LEVEL).alias("ci_level"),
        pl.when(comparable).then(lp_weight).alias("lp_ema_timescale"),
        pl.when(comparable).then(1.0 / lp_weight).alias("lp_timescale"),
        pl.lit(None, dtype=pl.Float64).alias("timescale_ratio"),
        pl.when(comparable)
        .then(pl.lit(LP_PER_INSTANCE))
        .otherwise(pl.lit(LP_NOT_COMPARABLE))
        .alias("lp_comparison"),
    )
    n = pl.col("n_seeds")
    table = table.with_columns(
        pl.concat_str(  # the parts of the note that apply, "; "-joined
            [
                pl.when(~comparable).then(pl.lit(EPOCH_CAVEAT)),
                pl.when(n == 0)
                .then(pl.lit("no usable fit"))
                .when(n < 2)
                .then(pl.lit("1 seed: no interval")),
                pl.when(pl.col("n_excluded") > 0).then(
                    pl.format("{} fit(s) left out (excluded_reason)", "n_excluded")
                ),
                pl.when(pl.col("n_fit_not_ok") > 0).then(
                    pl.format(f"{{}} fit(s) with Ljung-Box p < {FIT_OK_P:g} kept", "n_fit_not_ok")
                ),
            ],
            separator="; ",
            ignore_nulls=True,
        ).alias("note")
    )
    seed_noise = _SeedNoise(layout.group, cell_row, cell_pair, noise, pair_row, pair_noise)
    return _add_references(table, seed_noise)


@dataclass
class _References:
    """The reference columns being filled, one entry per table row (`_add_references`);
    `kind`: 0 none (all null), 1 an interval, 2 the reference itself (no interval)."""

    kind: np.ndarray
    name: np.ndarray  # object: str or None
    method: np.ndarray
    ratio: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: np.ndarray
    ts_ratio: np.ndarray

    @classmethod
    def empty(cls, size: int) -> _References:
        def nan() -> np.ndarray:
            return np.full(size, np.nan)

        none = np.full(size, None, dtype=object)
        return cls(
            np.zeros(size, np.int8),
            none,
            none.copy(),
            nan(),
            nan(),
            nan(),
            np.zeros(size, np.int64),
            nan(),
        )

    def named(self, rows: np.ndarray, counts: np.ndarray, template: str) -> None:
        """`name` of each of `rows` from `template` and its count (few distinct counts)."""
        for k in np.unique(counts):
            self.name[rows[counts == k]] = template.format(int(k))

    def columns(self) -> list[pl.Series]:
        has = self.kind > 0
        full = self.kind == 1

        def series(name: str, values: np.ndarray, valid: np.ndarray, dtype: Any) -> pl.Series:
            out = pl.Series(name, values, dtype=dtype)
            missing = np.flatnonzero(~valid)
            return out.scatter(missing, None) if missing.size else out

        return [
            pl.Series("reference_label", self.name.tolist(), dtype=pl.String),
            series("noise_ratio", self.ratio, has, pl.Float64),
            series("noise_ratio_ci_low", self.low, full, pl.Float64),
            series("noise_ratio_ci_high", self.high, full, pl.Float64),
            pl.Series("noise_ratio_ci_method", self.method.tolist(), dtype=pl.String),
            series("noise_ratio_n", self.n, full, pl.Int64),
            series("timescale_vs_reference", self.ts_ratio, has, pl.Float64),
        ]


def _add_references(table: pl.DataFrame, seed_noise: _SeedNoise) -> pl.DataFrame:
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
    size = table.height
    refs = _References.empty(size)
    noise_std = table["noise_std"].to_numpy()
    timescale = table["timescale"].to_numpy()
    is_label = (table["group"] == "label").to_numpy()
    finite = np.isfinite(noise_std)
    _label_references(refs, seed_noise, is_label & finite, timescale)
    # pooled rows: peers are the pooled rows with a finite noise of the same (granularity,
    # unit, regime), numbered by the first row of each
    where = (
        table.with_row_index("_i")
        .select(pl.col("_i").min().over("granularity", "unit", "regime").cast(pl.Int64))
        .to_series()
        .to_numpy()
    )
    peer = ~is_label & finite
    n_peers = np.bincount(where[peer], minlength=size)[where]
    typical = peer & (n_peers > MAX_TASKS_VS_QUIETEST)
    if typical.any():
        _vs_typical_task(refs, seed_noise, np.flatnonzero(typical), where, noise_std, timescale)
    quietest = peer & (n_peers >= 2) & ~typical
    for w in np.unique(where[quietest]):  # a handful of (granularity, unit, regime)
        rows = np.flatnonzero(quietest & (where == w))
        _vs_quietest_task(
            refs, seed_noise, rows, table["task"].gather(rows).to_list(), noise_std, timescale
        )
    return conform(
        table.with_columns(refs.columns()), TIMESCALE_RECOMMENDATIONS, "timescale_recommendations"
    )


def _label_references(
    refs: _References, seed_noise: _SeedNoise, peer: np.ndarray, timescale: np.ndarray
) -> None:
    """Label rows with a finite noise (`peer`) in a group of at least 2 such labels: per
    seed, the label's noise over the geometric mean of its group's labels at that seed
    (seeds where at least 2 labels have a noise), paired t on logs over seeds."""
    size = len(peer)
    group = seed_noise.group
    n_groups = int(group.max()) + 1 if size else 0
    n_peers = np.bincount(group[peer], minlength=n_groups)
    rows = np.flatnonzero(peer & (n_peers[group] >= 2))
    if rows.size == 0:
        return
    x, pair = seed_noise.cell_noise, seed_noise.cell_pair
    n_pairs = len(seed_noise.pair_row)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ok = np.isfinite(x) & (x > 0)
        per_pair = np.bincount(pair[ok], minlength=n_pairs)
        typical = np.exp(np.bincount(pair[ok], np.log(x[ok]), minlength=n_pairs) / per_pair)
        common = ok & (per_pair[pair] >= 2)
        ratios = x[common] / typical[pair[common]]
        # the timescale of the typical label: mean log over the group's labels, unfiltered
        log_ts = np.bincount(group[peer], np.log(timescale[peer]), minlength=n_groups)
        typical_ts = np.exp(log_ts / n_peers)[group]
        ts_ratio = np.where(typical_ts != 0, timescale / typical_ts, np.nan)
    geo, low, high, n = _log_t_by(seed_noise.cell_row[common], ratios, size)
    refs.kind[rows] = 1
    refs.named(
        rows, n_peers[group[rows]], "the typical label of the task (geometric mean of {} labels)"
    )
    refs.method[rows] = CI_METHOD_TYPICAL
    for mine, theirs in (
        (refs.ratio, geo),
        (refs.low, low),
        (refs.high, high),
        (refs.n, n),
        (refs.ts_ratio, ts_ratio),
    ):
        mine[rows] = theirs[rows]


def _vs_typical_task(
    refs: _References,
    seed_noise: _SeedNoise,
    rows: np.ndarray,
    where: np.ndarray,
    noise_std: np.ndarray,
    timescale: np.ndarray,
) -> None:
    """`rows`: the pooled rows with a finite noise of the (granularity, unit, regime) that
    have more than MAX_TASKS_VS_QUIETEST of them. Each vs the others: Welch t on logs
    (df = seeds - 1, `welch_log_ratio_interval` with `hsu_df`) between its per-seed noise
    and the other rows' noise_std, with leave-one-out sums per (granularity, unit, regime)."""
    size = len(noise_std)
    w = where[rows]
    # the task's own per-seed noise
    na, mean_a, ss_a = (
        v[rows] for v in _log_moments(seed_noise.pair_row, seed_noise.pair_noise, size)
    )
    # the other tasks' log noise: mean and variance leaving the row out, from sums of
    # values centred on their (granularity, unit, regime) mean (no cancellation)
    x = np.log(noise_std[rows])
    k = np.bincount(w, minlength=size)[w] - 1
    centre = (np.bincount(w, x, minlength=size)[w]) / (k + 1)
    c = x - centre
    s1 = np.bincount(w, c, minlength=size)[w] - c
    s2 = np.bincount(w, c * c, minlength=size)[w] - c * c
    mean_b = centre + s1 / k
    var_b = (s2 - s1 * s1 / k) / (k - 1)
    n = np.minimum(na, k)
    diff = mean_a - mean_b
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        se = np.sqrt(ss_a / (na - 1) / na + var_b / k)
        half = _t_quantile(0.5 + LEVEL / 2.0, np.maximum(n - 1, 1)) * se
        plain = np.exp(diff)
    two = n >= 2
    spread = two & (se != 0.0)
    refs.ratio[rows] = np.where(n == 0, np.nan, np.where(spread, _exp_array(diff), plain))
    refs.low[rows] = np.where(two, np.where(spread, _exp_array(diff - half), plain), np.nan)
    refs.high[rows] = np.where(two, np.where(spread, _exp_array(diff + half), plain), np.nan)
    refs.n[rows] = n
    # the typical task's timescale: geometric mean of the others' finite positive ones
    t = timescale[rows]
    ok = np.isfinite(t) & (t > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lt = np.where(ok, np.log(np.where(ok, t, 1.0)), 0.0)
        count = np.bincount(w, ok, minlength=size)[w]
        centre_t = np.bincount(w, lt, minlength=size)[w] / count
        ct = np.where(ok, lt - centre_t, 0.0)
        others = count - ok
        typical = np.where(
            others > 0,
            np.exp(centre_t + (np.bincount(w, ct, minlength=size)[w] - ct) / others),
            np.nan,
        )
        refs.ts_ratio[rows] = np.where(typical != 0, t / typical, np.nan)
    refs.kind[rows] = 1
    refs.method[rows] = CI_METHOD_WELCH_TYPICAL
    refs.named(rows, k, "the typical task (geometric mean of {} other tasks)")


def _vs_quietest_task(
    refs: _References,
    seed_noise: _SeedNoise,
    rows: np.ndarray,
    tasks: list[str],
    noise_std: np.ndarray,
    timescale: np.ndarray,
) -> None:
    """`rows` (2..MAX_TASKS_VS_QUIETEST pooled rows with a finite noise of one (granularity,
    unit, regime), table order) vs the quietest of them: Welch t on logs of the per-seed
    noise, Bonferroni over all task pairs; the quietest is its own reference."""

    def seeds_of(i: int) -> np.ndarray:
        return seed_noise.pair_noise[seed_noise.pair_row == i]

    ref = min(range(len(rows)), key=lambda j: (noise_std[rows[j]], tasks[j]))
    r = int(rows[ref])
    theirs = seeds_of(r)
    pairs = len(rows) * (len(rows) - 1) // 2
    method = f"{CI_METHOD_WELCH}, Bonferroni over {pairs} task pairs"
    ref_ts = float(timescale[r])
    for i in rows:
        refs.name[i] = tasks[ref]
        if i == r:
            refs.kind[i] = 2
            refs.method[i] = "reference"
            refs.ratio[i] = refs.ts_ratio[i] = 1.0
            continue
        interval = welch_log_ratio_interval(
            seeds_of(int(i)), theirs, level=1.0 - (1.0 - LEVEL) / pairs
        )
        refs.kind[i] = 1
        refs.method[i] = method
        refs.ratio[i], refs.low[i], refs.high[i] = interval.estimate, interval.low, interval.high
        refs.n[i] = interval.n
        refs.ts_ratio[i] = float(timescale[i]) / ref_ts if ref_ts else math.nan


@functools.lru_cache(maxsize=4096)
def _pick_widening(k: int, n: int) -> float:
    """How much a t interval on n - 1 df widens at Bonferroni over k (cached: the same few
    (k, n) recur across tasks)."""
    return t_ppf(1 - (1 - LEVEL) / (2 * k), n - 1) / t_ppf(1 - (1 - LEVEL) / 2, n - 1)


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
    widen = _pick_widening(int(k), int(n))
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
    """`describe_by_task`'s sentences in one list: each task's own, in the table's task
    order, then the statements across tasks."""
    own, across = describe_by_task(table)
    return [sentence for sentences in own.values() for sentence in sentences] + across


def describe_by_task(table: pl.DataFrame) -> tuple[dict[str, list[str]], list[str]]:
    """(task -> its own sentences, statements across tasks): descriptive plain-words findings from `recommend_timescales` (no advice): per task,
    stream granularity and regime, noise, drift and the tracking-optimal timescale with its
    unit, interval, method and n, the fits left out and those failing Ljung-Box; LP's
    ema_timescale beside it in completion units as a per-instance weight (no ratio: a label
    pools many instances); each task's noisiest label vs its typical label and the noisiest
    task vs its reference (whole series; intervals widened for the pick where needed).
    Completion-stream rows are always described; epoch-stream rows when the task has no
    completion rows or some epoch seeds come from runs without a completion stream. Epoch
    noise comparisons carry the held-value caveat. A task's own sentences depend on its rows
    alone."""
    if table.height == 0:
        return {}, []
    pair = ["task", "granularity", "unit"]
    completion = pl.col("granularity") == GRANULARITY_COMPLETION
    epoch_only = (
        pl.col("n_seeds_epoch_only").fill_null(0).max().over(pair) > 0
        if "n_seeds_epoch_only" in table.columns
        else pl.lit(False)
    )
    # (granularity, unit) groups of each task to describe, in the sentences' order: tasks as
    # they first appear; within a task completion streams first, then by unit, then as
    # they first appear
    rows = (
        table.with_row_index("_i")
        .with_columns(
            pl.col("_i").min().over("task").alias("_task_at"),
            (~completion).alias("_not_completion"),
            pl.when(pl.col("unit") == UNIT_COMPLETIONS)
            .then(0)
            .when(pl.col("unit") == UNIT_EPOCHS)
            .then(1)
            .otherwise(2)
            .alias("_unit_rank"),
            pl.col("_i").min().over(pair).alias("_pair_at"),
            (completion | ~completion.any().over("task") | epoch_only).alias("_described"),
        )
        .filter(pl.col("_described"))
    )
    # per group: the first pooled row of each regime, then its noisiest label (the first
    # in table order on a tie) when at least 2 labels have a noise ratio and it is > 1
    regime_item = pl.col("regime").replace_strict(
        {REGIME_WHOLE: 0, REGIME_LEARNING: 1, REGIME_PLATEAU: 2}, default=None
    )
    regimes = (
        rows.filter(pl.col("group") == "pooled")
        .with_columns(regime_item.alias("_item"))
        .filter(pl.col("_item").is_not_null())
        .unique(subset=[*pair, "regime"], keep="first", maintain_order=True)
    )
    labels = rows.filter(
        (pl.col("group") == "label")
        & (pl.col("regime") == REGIME_WHOLE)
        & pl.col("noise_ratio").is_finite()
    ).with_columns(pl.len().over(pair).alias("_k"))
    tops = (
        labels.filter(
            (pl.col("_k") >= 2) & (pl.col("noise_ratio") == pl.col("noise_ratio").max().over(pair))
        )
        .unique(subset=pair, keep="first", maintain_order=True)
        .filter(pl.col("noise_ratio") > 1.0)
        .with_columns(pl.lit(3, dtype=pl.Int64).alias("_item"))
    )
    items = pl.concat(
        [regimes.with_columns(pl.col("_item").cast(pl.Int64)), tops], how="diagonal_relaxed"
    ).sort("_task_at", "_not_completion", "_unit_rank", "_pair_at", "_item")
    own: dict[str, list[str]] = {}
    for row in items.iter_rows(named=True):  # one sentence each
        out = own.setdefault(row["task"], [])
        if row["_item"] < 3:
            out.append(_regime_sentence(row["task"], row))
            continue
        low, high, method = _adjusted_for_picking(row, row["_k"])
        picked = row | {
            "noise_ratio_ci_low": low,
            "noise_ratio_ci_high": high,
            "noise_ratio_ci_method": method,
        }
        out.append(_noise_sentence(f"{row['task']}/{row['label']}", row["reference_label"], picked))
    across: list[str] = []
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
                across.append(_noise_sentence(top["task"], top["reference_label"], top))
    return own, across


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
