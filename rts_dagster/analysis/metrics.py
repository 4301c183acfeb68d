"""Rate of change, sampling noise, staleness and SPS coupling of reward series.

A *series* is the ordered samples of one (task, seed, run_id, label, granularity) in the
`reward_streams` table (`rts_dagster.schema.REWARD_STREAMS`). Everything here is a pure
function of that table (no I/O) and is vectorised: numpy on contiguous per-series slices
of one flat array, polars for the per-series order statistics.

Cleaning (recorded in the outputs): rows whose reward is NaN, +-inf or null are dropped
and counted (`n_nonfinite`); with `destale=True` (default) rows flagged `is_stale` (epoch
re-emissions of an old value, see DOMAIN.md) are dropped as well. The remaining samples
of a series are re-indexed 0, 1, 2, ...: `sample_index` in the outputs is that position
(the x of every slope), `raw_sample_index` the input's.

Definitions (all per series, on the cleaned samples y_0 .. y_{n-1}):

- rolling slope at t: OLS slope of y on the sample index over the trailing window
  y_{t-w+1} .. y_t (w = `slope_window`), reward per sample; NaN for t < w - 1.
- EMA slope at t: exponentially weighted mean of the first differences
  d_s = y_s - y_{s-1}, s = 1..t, with weights r^(t-s), r = 2^(-1/ema_halflife),
  normalised by the sum of the weights used (the "adjusted" EMA, so early values are
  plain averages). Reward per sample; NaN at t = 0. Its effective memory is
  1/(1-r) ~ 1.44 * ema_halflife samples; with the default half-life of 25 samples its
  noise on white noise is close to that of the 25-sample OLS slope.
- rolling std at t: sample std (ddof=1) of the trailing `noise_window` samples; NaN for
  t < noise_window - 1. It includes the trend inside the window.
- noise_diff = std(d, ddof=1) / sqrt(2) and noise_mad = 1.4826 * median(|d - median(d)|)
  / sqrt(2): trend-robust estimates of the per-sample noise sigma (for y = smooth trend +
  iid noise, Var(d) ~ 2 sigma^2 while the trend contributes only its squared slope).

Undefined numbers are NaN (too few samples, zero variance) and the `note` column says
why; null means "not computed" (`sps_reward_spearman` unless `spearman=True`).

Numerics: windowed sums are exact dot products of each window (no running or global
cumulative sums), taken on values re-anchored per block of 64 samples (y minus the first
value of its block), which keeps the rolling variance free of cancellation when rewards
sit far from zero. Blocks that contain the start of a series are recomputed window by
window with a per-window anchor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from rts_dagster.analysis import recurrence
from rts_dagster.schema import (
    NOISE_BY_PROGRESS,
    REWARD_STREAMS,
    ROLLING_METRICS,
    SERIES_KEYS,
    SERIES_METRICS,
    conform,
)

MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD of a normal variable -> its sigma
_SQRT2 = math.sqrt(2.0)
_BLOCK = 64  # outputs per block of the windowed dot products (one BLAS row)
_CHUNK_ROWS = 8192  # blocks per matmul call: bounds the temporaries to ~4 MB each
_EXACT_CHUNK = 1 << 16  # windows per chunk on the window-by-window path
_EMA_TAIL_BITS = 60  # EMA carry-over across series is corrected while r^k > 2^-60


class MetricsConfig(BaseModel):
    """Settings of the per-series metrics. Windows and half-lives are in samples."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slope_window: int = Field(25, ge=2, description="trailing window of the OLS slope")
    noise_window: int = Field(10, ge=2, description="trailing window of the rolling std")
    ema_halflife: float = Field(
        25.0, gt=0.0, description="half-life of the EMA of first differences (samples)"
    )
    noise_bins: int = Field(10, ge=1, description="equal-count bins of noise_by_progress")
    destale: bool = Field(True, description="drop is_stale rows before computing metrics")
    min_samples: int = Field(3, ge=1, description="fewer samples: summary stats are NaN")
    final_fraction: float = Field(0.1, gt=0.0, le=1.0, description="tail for final_reward")
    sps_dip_threshold: float = Field(
        0.2, gt=0.0, lt=1.0, description="dip: sps below (1 - t) x the series' median sps"
    )
    spearman: bool = Field(
        False, description="also compute Spearman(sps, reward): ranks per series, ~0.2 us/sample"
    )


def _config(config: MetricsConfig | None) -> MetricsConfig:
    return config if config is not None else MetricsConfig()


class MetricsResult(NamedTuple):
    """The three metric tables of one `compute_metrics` call."""

    series: pl.DataFrame  # schema.SERIES_METRICS
    rolling: pl.DataFrame  # schema.ROLLING_METRICS
    progress: pl.DataFrame  # schema.NOISE_BY_PROGRESS


# --- segment helpers ------------------------------------------------------------------------


def _as_starts(starts: np.ndarray | None, n: int) -> np.ndarray:
    """Validated int64 series start offsets (a single series when None)."""
    if starts is None or len(starts) == 0:
        return np.zeros(1 if n else 0, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= max(n, 1):
        raise ValueError("starts must begin at 0, increase strictly and stay below len(y)")
    return starts


def _lengths(starts: np.ndarray, n: int) -> np.ndarray:
    return np.diff(np.append(starts, n))


def _head_indices(
    starts: np.ndarray, lengths: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices and in-series positions of the first min(k, length) samples of every
    series, with how many were taken per series."""
    take = np.minimum(lengths, k)
    total = int(take.sum())
    offsets = np.repeat(np.cumsum(take) - take, take)
    pos = np.arange(total, dtype=np.int64) - offsets
    return np.repeat(starts, take) + pos, pos, take


def segment_sums(a: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """sum(a[lo_i:hi_i]) for ordered, non-overlapping ranges (lo_i <= hi_i <= lo_{i+1}),
    as float64 (booleans count). Empty ranges give 0. One `np.add.reduceat` over the
    interleaved bounds."""
    out = np.zeros(len(lo), dtype=np.float64)
    nonempty = hi > lo
    if not nonempty.any():
        return out
    bounds = np.column_stack((lo[nonempty], hi[nonempty])).ravel()
    if bounds[-1] >= len(a):  # reduceat sums the last index to the end of the array
        bounds = bounds[:-1]
    out[nonempty] = np.add.reduceat(a, bounds, dtype=np.float64)[::2]
    return out


# --- windowed sums ---------------------------------------------------------------------------


def _band(kernel: np.ndarray, halo: int, block: int) -> np.ndarray:
    """(halo + block) x block matrix whose column o holds `kernel` aligned to end at row
    halo + o: a row of values [halo previous | block current] @ band = trailing dots."""
    w = len(kernel)
    band = np.zeros((halo + block, block))
    for o in range(block):
        band[halo + o - w + 1 : halo + o + 1, o] = kernel
    return band


def _slope_kernel(w: int) -> tuple[np.ndarray, float]:
    """Centred sample-index weights of the OLS slope and their sum of squares."""
    k = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    return k, w * (w * w - 1) / 12.0


def _exact_windows(
    y: np.ndarray, t: np.ndarray, slope_w: int | None, noise_w: int | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Rolling slope / std at the outputs `t` (each with a full window inside its series),
    window by window: values anchored on the window's last sample, two-pass variance."""
    slope = np.empty(len(t)) if slope_w else None
    std = np.empty(len(t)) if noise_w else None
    for lo in range(0, len(t), _EXACT_CHUNK):
        tt = t[lo : lo + _EXACT_CHUNK]
        anchor = y[tt][:, None]
        if slope_w:
            k, sxx = _slope_kernel(slope_w)
            win = y[tt[:, None] - np.arange(slope_w - 1, -1, -1)] - anchor
            slope[lo : lo + len(tt)] = win @ k / sxx
        if noise_w:
            win = y[tt[:, None] - np.arange(noise_w - 1, -1, -1)] - anchor
            win -= win.mean(axis=1, keepdims=True)
            std[lo : lo + len(tt)] = np.sqrt(np.einsum("ij,ij->i", win, win) / (noise_w - 1))
    return slope, std


def _rolling_core(
    y: np.ndarray, starts: np.ndarray, slope_w: int | None, noise_w: int | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Trailing-window OLS slope and std (ddof=1) of every series of the flat array `y`.

    Bulk: blocks of B outputs; each block row holds [halo previous | B current] values
    minus an anchor (the block's first value), so every trailing window is one row @ a
    banded matrix (BLAS), an exact dot product of that window. Blocks that contain a
    series start, and the ragged tail, are recomputed by `_exact_windows`. Outputs whose
    window does not fit inside the series are NaN."""
    n = len(y)
    lengths = _lengths(starts, n)
    halo = max(slope_w or 0, noise_w or 0) - 1
    block = max(_BLOCK, halo)
    nfull = n // block
    slope = np.empty(n) if slope_w else None
    std = np.empty(n) if noise_w else None
    if nfull:
        bands = {}
        if slope_w:
            k, sxx = _slope_kernel(slope_w)
            bands["slope"] = _band(k / sxx, halo, block)
        if noise_w:
            bands["sum"] = _band(np.ones(noise_w), halo, block)
            h0 = halo - (noise_w - 1)  # the noise window needs only the last noise_w-1 halo
        rows = y[: nfull * block].reshape(nfull, block)
        for r0 in range(0, nfull, _CHUNK_ROWS):
            r1 = min(r0 + _CHUNK_ROWS, nfull)
            anchor = rows[r0:r1, :1]
            z = rows[r0:r1] - anchor
            prev = np.zeros((r1 - r0, halo))
            lo = max(r0, 1)
            prev[lo - r0 :] = rows[lo - 1 : r1 - 1, block - halo :] - anchor[lo - r0 :]
            out = slice(r0 * block, r1 * block)
            if slope_w:
                b = bands["slope"]
                slope[out] = (z @ b[halo:] + prev @ b[:halo]).ravel()
            if noise_w:
                b = bands["sum"]
                p = prev[:, h0:]
                s1 = z @ b[halo:] + p @ b[h0:halo]
                np.square(z, out=z)
                np.square(p, out=p)
                s2 = z @ b[halo:] + p @ b[h0:halo]
                s1 *= s1
                s1 /= noise_w
                s2 -= s1
                s2 /= noise_w - 1
                np.maximum(s2, 0.0, out=s2)
                std[out] = np.sqrt(s2, out=s2).ravel()
    # Blocks whose span [b*B - halo, b*B + B) contains a series start after its first
    # value mix two series (or reach before the array): redo them window by window.
    redo = np.zeros(nfull + 1, dtype=bool)
    redo[np.minimum(starts // block, nfull)] = True
    redo[np.minimum((starts + halo - 1) // block, nfull)] = True
    redo[nfull] = n > nfull * block  # ragged tail
    redo_rows = np.flatnonzero(redo)
    if len(redo_rows):
        t = (redo_rows[:, None] * block + np.arange(block)).ravel()
        t = t[t < n]
        seg = np.searchsorted(starts, t, side="right") - 1
        pos = t - starts[seg]
        if slope_w:
            ok = t[pos >= slope_w - 1]
            slope[ok] = _exact_windows(y, ok, slope_w, None)[0]
        if noise_w:
            ok = t[pos >= noise_w - 1]
            std[ok] = _exact_windows(y, ok, None, noise_w)[1]
    if slope_w:
        slope[_head_indices(starts, lengths, slope_w - 1)[0]] = np.nan
    if noise_w:
        std[_head_indices(starts, lengths, noise_w - 1)[0]] = np.nan
    return slope, std


def _check_y(y: np.ndarray) -> np.ndarray:
    y = np.ascontiguousarray(y, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError("y must be one-dimensional")
    if not np.isfinite(y).all():
        raise ValueError("y must be finite (drop NaN/inf first; series_metrics does)")
    return y


def rolling_ols_slope(y: np.ndarray, window: int, starts: np.ndarray | None = None) -> np.ndarray:
    """OLS slope of y on the sample index over each trailing `window` (reward per sample).

    `y` holds one or more series back to back; `starts` are their first indices (None:
    one series). NaN where the window reaches before the start of its series."""
    y = _check_y(y)
    if window < 2:
        raise ValueError("window must be >= 2")
    return _rolling_core(y, _as_starts(starts, len(y)), window, None)[0]


def rolling_std(y: np.ndarray, window: int, starts: np.ndarray | None = None) -> np.ndarray:
    """Sample std (ddof=1) over each trailing `window`; NaN until the window is full."""
    y = _check_y(y)
    if window < 2:
        raise ValueError("window must be >= 2")
    return _rolling_core(y, _as_starts(starts, len(y)), None, window)[1]


def first_differences(y: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """d_t = y_t - y_{t-1} inside each series of the flat array `y`; 0 at every series
    start (where it is undefined)."""
    d = np.empty_like(y)
    if len(y):
        d[0] = 0.0
        np.subtract(y[1:], y[:-1], out=d[1:])
        d[starts] = 0.0
    return d


def iir_with_resets(
    x: np.ndarray, starts: np.ndarray, lengths: np.ndarray, pole: float
) -> np.ndarray:
    """acc_t = pole * acc_{t-1} + x_t, restarted from 0 at every series start.

    One recurrence pass over all series (`recurrence.first_order`); the state a series inherits from
    the one before it decays as pole^(k+1) and is subtracted for its first samples until
    pole^k < 2^-60 (beyond that its effect is below 2^-60 of the inherited state)."""
    if not 0.0 <= pole <= 1.0:
        raise ValueError("pole must be in [0, 1]")
    acc = recurrence.first_order(x, pole)
    if len(starts) > 1 and pole > 0.0:
        head = len(x) if pole == 1.0 else math.ceil(_EMA_TAIL_BITS / -math.log2(pole)) + 1
        head = max(2, min(head, len(x)))
        idx, pos, take = _head_indices(starts[1:], lengths[1:], head)
        inherited = acc[starts[1:] - 1]
        acc[idx] -= np.repeat(inherited, take) * pole ** (pos + 1.0)
    return acc


def _ema_of_differences(
    d: np.ndarray, starts: np.ndarray, lengths: np.ndarray, halflife: float
) -> np.ndarray:
    """Adjusted EMA of the first differences (see module docstring), one IIR pass.

    `d` must be 0 at every series start."""
    if len(d) == 0:
        return d.copy()
    r = 2.0 ** (-1.0 / halflife)
    ema = iir_with_resets(d, starts, lengths, r)
    head = max(2, math.ceil(_EMA_TAIL_BITS * halflife) + 1)
    idx, pos, _ = _head_indices(starts, lengths, head)
    with np.errstate(divide="ignore", invalid="ignore"):
        head_values = ema[idx] * ((1.0 - r) / (1.0 - r**pos))
    ema *= 1.0 - r  # the weights sum to 1/(1-r) once the head has passed
    ema[idx] = head_values
    ema[idx[pos == 0]] = np.nan
    return ema


def ema_slope(y: np.ndarray, halflife: float, starts: np.ndarray | None = None) -> np.ndarray:
    """Adjusted EMA (half-life in samples) of the first differences: reward per sample.

    NaN at the first sample of each series (no difference yet)."""
    y = _check_y(y)
    if halflife <= 0:
        raise ValueError("halflife must be > 0")
    starts = _as_starts(starts, len(y))
    lengths = _lengths(starts, len(y))
    return _ema_of_differences(first_differences(y, starts), starts, lengths, halflife)


def diff_noise(y: np.ndarray) -> tuple[float, float]:
    """Trend-robust noise sigma of one series: (std(diff, ddof=1)/sqrt(2), 1.4826 *
    MAD(diff)/sqrt(2)). NaN for fewer than 3 finite samples."""
    y = np.asarray(y, dtype=np.float64)
    y = y[np.isfinite(y)]
    if len(y) < 3:
        return math.nan, math.nan
    d = np.diff(y)
    mad = np.median(np.abs(d - np.median(d)))
    return float(d.std(ddof=1) / _SQRT2), float(MAD_TO_SIGMA * mad / _SQRT2)


# --- preparing the streams table -------------------------------------------------------------

_INPUT = pl.Schema(
    {
        **{k: REWARD_STREAMS[k] for k in SERIES_KEYS},
        "sample_index": pl.Int64,
        "agent_step": pl.Int64,
        "reward": pl.Float64,
        "sps": pl.Float64,
        "is_stale": pl.Boolean,
    }
)


def _run_starts(df: pl.DataFrame) -> np.ndarray:
    """Row offsets where any series key differs from the previous row."""
    if df.height == 0:
        return np.zeros(0, dtype=np.int64)
    changed = df.select(
        pl.any_horizontal(pl.col(k).ne_missing(pl.col(k).shift(1)) for k in SERIES_KEYS)
    ).to_series()
    starts = np.flatnonzero(changed.to_numpy())
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate(([0], starts))
    return starts.astype(np.int64)


def _is_contiguous(df: pl.DataFrame, starts: np.ndarray) -> bool:
    """Every series is one block of rows with a strictly increasing sample_index."""
    if df.select(SERIES_KEYS)[starts].is_duplicated().any():
        return False
    si = df["sample_index"].to_numpy()
    falls = np.diff(si) <= 0
    falls[starts[1:] - 1] = False
    return not falls.any()


@dataclass(frozen=True)
class PreparedSeries:
    """Cleaned, contiguous series: flat numpy arrays plus per-series offsets."""

    df: pl.DataFrame  # the input columns, every series one block of rows
    keep: np.ndarray | None  # rows of `df` used (None: all of them)
    keys: pl.DataFrame  # one row per series (SERIES_KEYS), in storage order
    starts: np.ndarray  # first sample of each non-empty series in the clean arrays
    lengths: np.ndarray  # kept samples per series (may be 0), one per row of `keys`
    n_rows: np.ndarray  # input rows per series
    n_nonfinite: np.ndarray
    n_stale: np.ndarray
    y: np.ndarray  # clean rewards
    sps: np.ndarray  # clean sps (NaN where unknown)

    @property
    def nonempty_lengths(self) -> np.ndarray:
        return self.lengths[self.lengths > 0]

    def series_ids(self) -> np.ndarray:
        """Index into `keys` of every clean sample (int32, sorted)."""
        return np.repeat(np.arange(len(self.lengths), dtype=np.int32), self.lengths)


def prepare_series(streams: pl.DataFrame, config: MetricsConfig | None = None) -> PreparedSeries:
    """Clean and lay out `streams` (REWARD_STREAMS columns) as contiguous flat arrays.

    Groups rows by series (sorting only when the input is not already one block per
    series with increasing sample_index), drops non-finite rewards and, with
    `config.destale`, stale rows. Shared by the metrics and the Kalman estimates."""
    config = _config(config)
    df = conform(streams, _INPUT, "reward_streams")
    if df["sample_index"].null_count():
        raise ValueError("reward_streams: sample_index must not be null")
    starts = _run_starts(df)
    if len(starts) and not _is_contiguous(df, starts):
        df = df.sort([*SERIES_KEYS, "sample_index"], maintain_order=True, nulls_last=True)
        starts = _run_starts(df)
    n = df.height
    reward = df["reward"].to_numpy()  # nulls -> NaN
    sps = df["sps"].to_numpy()
    finite = np.isfinite(reward)
    stale = df["is_stale"].fill_null(False).to_numpy()
    keep = finite & ~stale if config.destale else finite
    if n:
        n_rows = _lengths(starts, n)
        n_nonfinite = np.add.reduceat(~finite, starts, dtype=np.int64)
        n_stale = np.add.reduceat(stale, starts, dtype=np.int64)
        kept = np.add.reduceat(keep, starts, dtype=np.int64)
    else:
        n_rows = n_nonfinite = n_stale = kept = np.zeros(0, dtype=np.int64)
    if keep.all():
        keep = None
    else:
        reward, sps = reward[keep], sps[keep]
    clean_starts = np.cumsum(kept) - kept
    return PreparedSeries(
        df=df,
        keep=keep,
        keys=df.select(SERIES_KEYS)[starts],
        starts=clean_starts[kept > 0],
        lengths=kept,
        n_rows=n_rows,
        n_nonfinite=n_nonfinite,
        n_stale=n_stale,
        y=np.ascontiguousarray(reward, dtype=np.float64),
        sps=np.ascontiguousarray(sps, dtype=np.float64),
    )


@dataclass(frozen=True)
class _PerSample:
    slope: np.ndarray
    ema: np.ndarray
    std: np.ndarray
    d: np.ndarray  # first differences, 0 at series starts


def _per_sample(prep: PreparedSeries, config: MetricsConfig) -> _PerSample:
    lengths = prep.nonempty_lengths
    slope, std = _rolling_core(prep.y, prep.starts, config.slope_window, config.noise_window)
    d = first_differences(prep.y, prep.starts)
    ema = _ema_of_differences(d, prep.starts, lengths, config.ema_halflife)
    return _PerSample(slope=slope, ema=ema, std=std, d=d)


# --- tables ----------------------------------------------------------------------------------


def _positions(starts: np.ndarray, lengths: np.ndarray, n: int) -> np.ndarray:
    pos = np.arange(n, dtype=np.int64)
    pos -= np.repeat(starts, lengths)
    return pos


def _rolling_frame(prep: PreparedSeries, ps: _PerSample) -> pl.DataFrame:
    n = len(prep.y)
    if prep.keep is None:  # nothing dropped: reuse the input columns (no copy)
        base = prep.df.select(*SERIES_KEYS, "sample_index", "agent_step")
        raw_index, agent_step = base["sample_index"], base["agent_step"]
        base = base.select(SERIES_KEYS)
    else:  # gathering the keys from the per-series table beats filtering 1e7 strings
        base = prep.keys[prep.series_ids()]
        raw_index = pl.Series(prep.df["sample_index"].to_numpy()[prep.keep])
        agent_step = pl.Series(prep.df["agent_step"].to_numpy()[prep.keep])
    frame = base.with_columns(
        pl.Series("sample_index", _positions(prep.starts, prep.nonempty_lengths, n)),
        raw_index.alias("raw_sample_index"),
        agent_step.alias("agent_step"),
        pl.Series("reward", prep.y),
        pl.Series("sps", prep.sps),
        pl.Series("rolling_slope", ps.slope),
        pl.Series("ema_slope", ps.ema),
        pl.Series("rolling_std", ps.std),
    )
    return conform(frame, ROLLING_METRICS, "rolling_metrics")


def _group_stats(
    starts: np.ndarray,
    lengths: np.ndarray,
    columns: dict[str, np.ndarray],
    aggs: list[pl.Expr],
    head: int = 0,
    keep: np.ndarray | None = None,
) -> pl.DataFrame:
    """`aggs` per series (given by `starts`/`lengths` in the flat arrays of `columns`),
    one row per series in order (null where a series has no row used).

    The first `head` rows of each series are left out by giving them groups of their
    own (no copy of the columns); rows where `keep` is False are left out by a gather.
    Polars then sees sorted group keys (each group a slice) and no nulls, its fast path."""
    n_series = len(lengths)
    gid = np.repeat(np.arange(1, 2 * n_series, 2, dtype=np.int32), lengths)
    if head:
        gid[_head_indices(starts, lengths, head)[0]] -= 1
    if keep is not None and not keep.all():
        gid = gid[keep]
        columns = {name: values[keep] for name, values in columns.items()}
    frame = pl.DataFrame(
        [pl.Series("gid", gid).set_sorted(), *(pl.Series(k, v) for k, v in columns.items())]
    )
    stats = frame.group_by("gid", maintain_order=True).agg(aggs)
    every = pl.DataFrame({"gid": np.arange(1, 2 * n_series, 2, dtype=np.int32)})
    return every.join(stats, on="gid", how="left", maintain_order="left").drop("gid")


def _series_frame(prep: PreparedSeries, ps: _PerSample, config: MetricsConfig) -> pl.DataFrame:
    nonempty = prep.lengths > 0
    lengths = prep.lengths[nonempty]
    n_seg = len(lengths)
    starts, ends = prep.starts, prep.starts + lengths
    nan = np.full(n_seg, np.nan)

    # Sums over known ranges (exact bounds, no NaN masks): means and the final tail.
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_reward = segment_sums(prep.y, starts, ends) / lengths
        k_final = np.maximum(1, np.ceil(config.final_fraction * lengths)).astype(np.int64)
        final_reward = segment_sums(prep.y, ends - k_final, ends) / k_final
        lo_s = starts + config.slope_window - 1
        n_slope = np.maximum(ends - lo_s, 0)
        mean_slope = np.where(n_slope > 0, segment_sums(ps.slope, lo_s, ends) / n_slope, nan)
        lo_n = starts + config.noise_window - 1
        n_noise = np.maximum(ends - lo_n, 0)
        noise_mean = np.where(n_noise > 0, segment_sums(ps.std, lo_n, ends) / n_noise, nan)
    ema_final = ps.ema[ends - 1] if n_seg else nan

    # Order statistics and correlations: polars over the sorted series id (each group a
    # slice), fed only the defined values (polars' null-aware group paths are far slower).
    sps_ok = np.isfinite(prep.sps)
    all_sps = bool(sps_ok.all())
    std_ok = np.isfinite(ps.std)
    sps_col = pl.col("sps")
    sps_aggs = [
        sps_col.mean().alias("sps_mean"),
        sps_col.median().alias("sps_median"),
        pl.corr(sps_col, "y").alias("sps_reward_corr"),
    ]
    if config.spearman:
        sps_aggs.append(pl.corr(sps_col, "y", method="spearman").alias("sps_reward_spearman"))
    d_dev = (pl.col("d") - pl.col("d").median()).abs()
    quantiles = [
        pl.col("slope").quantile(q, "linear").alias(f"slope_p{round(q * 100)}")
        for q in (0.1, 0.5, 0.9)
    ]
    noise = [
        (pl.col("d").std(ddof=1) / _SQRT2).alias("noise_diff"),
        (d_dev.median() * (MAD_TO_SIGMA / _SQRT2)).alias("noise_mad"),
    ]
    sps_noise = [pl.corr(sps_col, "std").alias("sps_noise_corr")]
    stats = [
        _group_stats(starts, lengths, {"slope": ps.slope}, quantiles, config.slope_window - 1),
        _group_stats(starts, lengths, {"d": ps.d}, noise, head=1),
        _group_stats(starts, lengths, {"sps": prep.sps, "y": prep.y}, sps_aggs, keep=sps_ok),
        _group_stats(
            starts,
            lengths,
            {"sps": prep.sps, "std": ps.std},
            sps_noise,
            head=config.noise_window - 1 if all_sps else 0,
            keep=None if all_sps else sps_ok & std_ok,
        ),
    ]
    stats = pl.concat(stats, how="horizontal")
    if not config.spearman:
        stats = stats.with_columns(pl.lit(None, pl.Float64).alias("sps_reward_spearman"))

    # SPS dips: samples whose sps is below (1 - threshold) x the series' median sps.
    threshold = (1.0 - config.sps_dip_threshold) * stats["sps_median"].fill_null(np.nan).to_numpy()
    with np.errstate(invalid="ignore"):
        dip = prep.sps < np.repeat(threshold, lengths)  # False where sps is NaN
    std0 = np.where(std_ok, ps.std, 0.0)
    noise_ok = std_ok if all_sps else std_ok & sps_ok  # rolling std and sps both known
    with np.errstate(divide="ignore", invalid="ignore"):
        dip_fraction = segment_sums(dip, starts, ends) / segment_sums(sps_ok, starts, ends)
        dip &= std_ok
        dip_sum = segment_sums(np.where(dip, std0, 0.0), starts, ends)
        dip_n = segment_sums(dip, starts, ends)
        all_sum = segment_sums(std0 if all_sps else np.where(noise_ok, std0, 0.0), starts, ends)
        all_n = segment_sums(noise_ok, starts, ends)
        dip_ratio = (dip_sum / dip_n) / ((all_sum - dip_sum) / (all_n - dip_n))
    per_series = stats.drop("sps_median").with_columns(
        pl.Series("sid", np.arange(n_seg, dtype=np.int32)),
        pl.Series("sps_dip_fraction", dip_fraction),
        pl.Series("noise_dip_ratio", dip_ratio),
        pl.Series("mean_reward", mean_reward),
        pl.Series("final_reward", final_reward),
        pl.Series("mean_slope", mean_slope),
        pl.Series("ema_slope_final", ema_final),
        pl.Series("noise_rolling_mean", noise_mean),
    )
    # Back to one row per input series (series left with no sample get all-NaN stats).
    sid_all = np.full(len(prep.lengths), -1, dtype=np.int32)
    sid_all[nonempty] = np.arange(n_seg, dtype=np.int32)
    out = prep.keys.with_columns(
        pl.Series("sid", sid_all),
        pl.Series("n_rows", prep.n_rows),
        pl.Series("n_samples", prep.lengths),
        pl.Series("n_nonfinite", prep.n_nonfinite),
        pl.Series("n_stale", prep.n_stale),
        pl.lit(config.destale).alias("destaled"),
    ).join(per_series, on="sid", how="left", maintain_order="left")
    floats = [c for c, t in SERIES_METRICS.items() if t == pl.Float64]
    small = pl.col("n_samples") < config.min_samples
    summary = [c for c in floats if c not in ("stale_fraction", "sps_reward_spearman")]
    nan = float("nan")
    spearman = pl.col("sps_reward_spearman")
    out = out.with_columns(
        (pl.col("n_stale") / pl.col("n_rows")).alias("stale_fraction"),
        *[pl.when(small).then(nan).otherwise(pl.col(c).fill_null(nan)).alias(c) for c in summary],
        pl.when(small)
        .then(nan)
        .otherwise(spearman.fill_null(nan))
        .alias(spearman.meta.output_name())
        if config.spearman
        else spearman,
    ).with_columns(_note_expr(config))
    return conform(out, SERIES_METRICS, "series_metrics")


def _note_expr(config: MetricsConfig) -> pl.Expr:
    """Plain-words reasons for NaN statistics, joined by '; '."""
    n = pl.col("n_samples")
    parts = [
        pl.when(n == 0).then(pl.lit("no finite sample")),
        pl.when((n > 0) & (n < config.min_samples)).then(
            pl.lit(f"fewer than min_samples={config.min_samples} samples: statistics are NaN")
        ),
        pl.when((n >= config.min_samples) & (n < config.slope_window)).then(
            pl.lit(f"shorter than slope_window={config.slope_window}: no rolling slope")
        ),
        pl.when((n >= config.min_samples) & (n < config.noise_window)).then(
            pl.lit(f"shorter than noise_window={config.noise_window}: no rolling std")
        ),
        pl.when((n >= config.min_samples) & (pl.col("noise_diff") == 0.0)).then(
            pl.lit(
                "zero noise: all first differences are equal (constant or exactly linear reward)"
            )
        ),
        pl.when((n >= config.min_samples) & pl.col("sps_mean").is_nan()).then(
            pl.lit("no finite sps: SPS correlations undefined")
        ),
        pl.when(pl.col("n_nonfinite") > 0).then(
            pl.format("{} non-finite reward(s) dropped", pl.col("n_nonfinite"))
        ),
    ]
    return pl.concat_str(parts, separator="; ", ignore_nulls=True).fill_null("").alias("note")


def _progress_frame(prep: PreparedSeries, ps: _PerSample, config: MetricsConfig) -> pl.DataFrame:
    nonempty = prep.lengths > 0
    lengths = prep.lengths[nonempty]
    nb = config.noise_bins
    edges = prep.starts[:, None] + (np.arange(nb + 1)[None, :] * lengths[:, None]) // nb
    lo, hi = edges[:, :-1].ravel(), edges[:, 1:].ravel()
    seg_start = np.repeat(prep.starts, nb)
    bins = np.tile(np.arange(nb, dtype=np.int64), len(lengths))
    keep = hi > lo
    lo, hi, seg_start, bins = lo[keep], hi[keep], seg_start[keep], bins[keep]
    count = hi - lo
    seg_len = np.repeat(lengths, nb)[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_reward = segment_sums(prep.y, lo, hi) / count
        lo_n = np.maximum(lo, seg_start + config.noise_window - 1)
        n_noise = np.maximum(hi - lo_n, 0)
        noise_mean = np.where(n_noise > 0, segment_sums(ps.std, lo_n, hi) / n_noise, np.nan)
        # Differences inside the bin (both samples in it), two-pass variance.
        m = count - 1
        d_mean = segment_sums(ps.d, lo + 1, hi) / m
        resid = ps.d - np.repeat(np.where(m > 0, d_mean, 0.0), np.diff(np.append(lo, len(ps.d))))
        ss = segment_sums(resid * resid, lo + 1, hi)
        noise_diff = np.where(m >= 2, np.sqrt(ss / (m - 1)) / _SQRT2, np.nan)
    sid = np.repeat(np.flatnonzero(nonempty), nb)[keep]
    out = prep.keys[sid].with_columns(
        pl.Series("bin", bins),
        pl.Series("sample_index_start", lo - seg_start),
        pl.Series("sample_index_end", hi - 1 - seg_start),
        pl.Series("progress", ((lo + hi) / 2.0 - seg_start) / seg_len),
        pl.Series("n_samples", count),
        pl.Series("mean_reward", mean_reward),
        pl.Series("noise_rolling_mean", noise_mean),
        pl.Series("noise_diff", noise_diff),
    )
    return conform(out, NOISE_BY_PROGRESS, "noise_by_progress")


def compute_metrics(streams: pl.DataFrame, config: MetricsConfig | None = None) -> MetricsResult:
    """All three metric tables from one pass over `streams` (REWARD_STREAMS shape).

    Cheaper than calling `series_metrics`, `rolling_metrics` and `noise_by_progress`
    separately, which each redo the cleaning and the windowed sums."""
    config = _config(config)
    prep = prepare_series(streams, config)
    ps = _per_sample(prep, config)
    return MetricsResult(
        series=_series_frame(prep, ps, config),
        rolling=_rolling_frame(prep, ps),
        progress=_progress_frame(prep, ps, config),
    )


def series_metrics(streams: pl.DataFrame, config: MetricsConfig | None = None) -> pl.DataFrame:
    """One row per series: counts, cleaning, level, slope, noise and SPS coupling.

    Columns: `schema.SERIES_METRICS`. Rows follow the order of first appearance of the
    series in `streams` (or key order if the input was not grouped by series)."""
    config = _config(config)
    prep = prepare_series(streams, config)
    return _series_frame(prep, _per_sample(prep, config), config)


def rolling_metrics(streams: pl.DataFrame, config: MetricsConfig | None = None) -> pl.DataFrame:
    """One row per cleaned sample with its rolling slope, EMA slope and rolling std.

    Columns: `schema.ROLLING_METRICS`; `sample_index` is the cleaned position (the x of
    the slopes), `raw_sample_index` the input's."""
    config = _config(config)
    prep = prepare_series(streams, config)
    return _rolling_frame(prep, _per_sample(prep, config))


def noise_by_progress(streams: pl.DataFrame, config: MetricsConfig | None = None) -> pl.DataFrame:
    """Noise vs progress through each series: `noise_bins` equal-count bins of the cleaned
    sample index, each with its mean reward, mean rolling std and diff-based noise.

    A falling `noise_diff` over the bins means the reward gets less noisy as the task is
    learned. Columns: `schema.NOISE_BY_PROGRESS` (bins of series shorter than
    `noise_bins` samples may be missing)."""
    config = _config(config)
    prep = prepare_series(streams, config)
    return _progress_frame(prep, _per_sample(prep, config), config)
