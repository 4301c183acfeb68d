"""How good is the LP signal of a replay? Selectivity, signal-to-noise, response lag, churn.

"Improving" and "plateaued" come from the analysis core's per-series metrics, applied to
each label's own completions in the replayed stream: the trailing OLS slope over
`window` samples (`metrics.rolling_ols_slope`) divided by its standard error under the
label's trend-robust noise sigma (std of first differences, ddof 1, / sqrt 2, as
`metrics.diff_noise`): se = sigma / sqrt(w (w^2 - 1) / 12). The sigma is causal: at each
sample it uses only that label's samples up to it (an expanding estimate), so a trend
state never depends on rewards that LP had not yet seen. A label is *improving* when t = slope / se > `t_improving`
(2: the rise is well above what noise alone gives), *plateaued* when |t| < `t_flat` (1),
*declining* when t < -t_improving, and undecided otherwise or before `window` samples.

Metrics of one replay (all over its evaluation instants):
- `gini_mean`, `entropy_mean`: selectivity of the sampling distribution (Gini 0 = uniform;
  entropy normalised by log L, 1 = uniform);
- `lp_snr`: probability per improving label / probability per plateaued label, geometric
  mean over instants having both (> 1: LP favours labels that are learning; both
  per-label means are floored at 1e-4 / L, so one instant's ratio is at most 1e4 L);
  `improving_mass`: mean total probability on improving labels;
- `lag_median`: completions from a label turning improving until LP puts it in its top k
  (k = ceil(L / 4)), median over such events, an event never followed by a top-k rank
  before the stream ends counting as infinite (so +inf when most never get there);
  `lag_censored`: the fraction of such events;
- `starved_fraction`: fraction of label-instants with less than a tenth of the uniform
  probability (1 / (10 L)). Replay is open-loop: in training a label LP stops drawing
  produces no new data, so its LP score cannot recover; a high value warns of that;
- `churn_plateau`: mean |rank change| of plateaued labels between consecutive instants,
  per 1000 completions, as a fraction of the L - 1 possible positions (noise-driven
  reshuffling of labels that are not learning);
- `pole_fraction` (main variant): fraction of label-instants where the progress-smoothing
  transform left [-1, 1] (F or S just above the zero of its denominator, where R tends
  to -inf and inflates the LP score).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rts_dagster.analysis.lp import progress_transform
from rts_dagster.analysis.lp_replay import LabelGroups, Replay
from rts_dagster.analysis.metrics import first_differences, rolling_ols_slope

IMPROVING, PLATEAUED, DECLINING, UNDECIDED = 1, 0, -1, -2
SNR_FLOOR = 1e-4  # per-label probability floor of lp_snr, times 1 / L
STARVED_SHARE = 0.1  # below this fraction of the uniform probability a label is starved


@dataclass(frozen=True)
class TrendSettings:
    window: int = 25  # the analysis core's default rolling-slope window
    t_improving: float = 2.0
    t_flat: float = 1.0


def label_trends(
    label_index: np.ndarray,
    reward: np.ndarray,
    n_labels: int,
    eval_index: np.ndarray,
    settings: TrendSettings | None = None,
    groups: LabelGroups | None = None,
) -> np.ndarray:
    """(G, L) int8 trend state of every label at every evaluation instant. `groups`: the
    stream's `LabelGroups`, when the caller has them already."""
    settings = settings or TrendSettings()
    w = settings.window
    if groups is None:
        groups = LabelGroups(np.asarray(label_index, dtype=np.int64), n_labels)
    ys = np.take(np.asarray(reward, dtype=np.float64), groups.order)
    slope = rolling_ols_slope(ys, w, groups.lo[groups.present]) if ys.size else ys
    sigma = causal_diff_noise(ys, groups)
    se_unit = 1.0 / math.sqrt(w * (w * w - 1) / 12.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(
            sigma > 0,
            slope / (sigma * se_unit),
            # a label noiseless so far: any rise is real; NaN (window not full) stays NaN
            np.where(slope > 0, np.inf, np.where(slope < 0, -np.inf, slope)),
        )
    t[np.isnan(sigma)] = np.nan
    state = np.full(ys.size, UNDECIDED, dtype=np.int8)
    state[np.abs(t) < settings.t_flat] = PLATEAUED
    state[t > settings.t_improving] = IMPROVING
    state[t < -settings.t_improving] = DECLINING
    return groups.at(np.asarray(eval_index, dtype=np.int64), state, UNDECIDED)


def causal_diff_noise(ys: np.ndarray, groups: LabelGroups) -> np.ndarray:
    """Expanding std(first differences, ddof=1) / sqrt 2 of each label's samples up to and
    including each one (`ys` in label order, as `groups.order` sorts it); NaN before a
    label's 3rd sample (fewer than 2 differences). Cumulative sums per label, shifted by
    the label's first difference (known by then) to keep the sum of squares accurate."""
    n = ys.size
    sigma = np.full(n, np.nan)
    if n == 0:
        return sigma
    offset = groups.offset  # number of differences seen at each sample
    label = groups.label_of
    diffs = first_differences(ys, groups.lo[groups.present])  # 0 at each label's start
    first = np.zeros(groups.n_labels)
    has_diff = groups.hi - groups.lo >= 2
    first[has_diff] = diffs[groups.lo[has_diff] + 1]
    centred = np.where(offset >= 1, diffs - first[label], 0.0)
    total = np.cumsum(centred)
    squares = np.cumsum(centred * centred)
    # within-label sums: subtract the running total at the label's start (centred is 0 there)
    total -= total[groups.lo[label]]
    squares -= squares[groups.lo[label]]
    k = offset.astype(np.float64)
    ok = offset >= 2
    var = (squares[ok] - total[ok] ** 2 / k[ok]) / (k[ok] - 1.0)
    sigma[ok] = np.sqrt(np.maximum(var, 0.0)) / math.sqrt(2.0)
    return sigma


def gini(p: np.ndarray) -> np.ndarray:
    """Gini coefficient of each row (0: uniform; (L-1)/L: all mass on one label)."""
    sorted_p = np.sort(p, axis=-1)
    n = p.shape[-1]
    ranks = np.arange(1, n + 1)
    total = sorted_p.sum(axis=-1)
    return (2.0 * (sorted_p * ranks).sum(axis=-1) / (n * total)) - (n + 1.0) / n


def normalised_entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row divided by log L (1: uniform)."""
    n = p.shape[-1]
    if n < 2:
        return np.ones(p.shape[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=-1) / math.log(n)


def ranks(p: np.ndarray) -> np.ndarray:
    """Rank of each label per row, 0 = highest probability (ties: lower label first)."""
    order = np.argsort(-p, axis=-1, kind="stable")
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.arange(p.shape[-1])[None, :], axis=-1)
    return out


def signal_quality(
    replay: Replay, trends: np.ndarray, top_k: int | None = None
) -> dict[str, float]:
    """The metrics of the module docstring for one replay and its (G, L) trend states."""
    p = replay.probability
    n_eval, n_labels = p.shape
    k = top_k or max(1, math.ceil(n_labels / 4))
    improving = trends == IMPROVING
    flat = trends == PLATEAUED

    n_imp = improving.sum(axis=1)
    n_flat = flat.sum(axis=1)
    both = (n_imp > 0) & (n_flat > 0)
    improving_mass = np.where(improving, p, 0.0).sum(axis=1)
    per_imp = improving_mass / np.maximum(n_imp, 1)
    per_flat = np.where(flat, p, 0.0).sum(axis=1) / np.maximum(n_flat, 1)
    # Floored so that a group LP never draws counts as 1e-4 / L, not 0: a saturated
    # distribution gives a large but finite ratio instead of dominating the mean.
    floor = SNR_FLOOR / n_labels
    ratio = np.maximum(per_imp, floor) / np.maximum(per_flat, floor)
    snr = float(np.exp(np.mean(np.log(ratio[both])))) if both.any() else math.nan

    rank = ranks(p)
    in_top = rank < k
    # next instant (>= g) at which each label is in the top k; n_eval if never
    idx = np.where(in_top, np.arange(n_eval)[:, None], n_eval)
    next_top = np.minimum.accumulate(idx[::-1], axis=0)[::-1]
    turned = improving.copy()
    turned[1:] &= ~improving[:-1]
    turned[0] = False  # a label improving at the first instant has no observed change
    g_ev, l_ev = np.nonzero(turned)
    reached = next_top[g_ev, l_ev]
    resolved = reached < n_eval
    lags = np.full(g_ev.size, np.inf)
    lags[resolved] = replay.eval_index[reached[resolved]] - replay.eval_index[g_ev[resolved]]

    both_flat = flat[1:] & flat[:-1]
    steps = np.diff(replay.eval_index).astype(np.float64)
    moves = np.abs(np.diff(rank, axis=0)) / max(n_labels - 1, 1)
    per_1000 = moves * (1000.0 / np.maximum(steps, 1.0))[:, None]
    churn = float(per_1000[both_flat].mean()) if both_flat.any() else math.nan

    pole = math.nan
    if replay.config.variant == "main":
        t = replay.config.main.progress_smoothing
        seen = replay.counts > 0
        r_f = progress_transform(np.where(seen, replay.fast, 0.0), t)
        r_s = progress_transform(np.where(seen, replay.slow, 0.0), t)
        outside = (np.abs(r_f) > 1.0) | (np.abs(r_s) > 1.0)
        pole = float(outside[seen].mean()) if seen.any() else math.nan

    return {
        "gini_mean": float(gini(p).mean()),
        "entropy_mean": float(normalised_entropy(p).mean()),
        "lp_snr": snr,
        "improving_mass": float(improving_mass.mean()),
        "improving_fraction": float(improving.mean()),
        "plateaued_fraction": float(flat.mean()),
        "lag_median": float(np.median(lags)) if lags.size else math.nan,
        "lag_censored": float(1.0 - resolved.mean()) if resolved.size else math.nan,
        "n_improving_events": int(g_ev.size),
        "churn_plateau": churn,
        "starved_fraction": float((p < STARVED_SHARE / n_labels).mean()),
        "pole_fraction": pole,
        "top_k": int(k),
    }
