"""Replay a recorded reward stream through an LP curriculum configuration, vectorised.

LP's state per label is a set of independent recursions (EMAs of that label's own
outcomes), so a whole stream is replayed without one Python step per completion:
completions are grouped by label (one stable sort), each label's EMAs are one
first-order recurrence (`recurrence.first_order`), and the state of every label at the evaluation instants is
gathered with `searchsorted`. The sampling distribution (which couples the labels) is then
computed for all instants at once on a (instants x labels) matrix.

A `CurriculumConfig` is an LP variant (`lp.LPConfig`: Metta main; `lp.ZScoreLPConfig`: the
z-score-amplification branch) plus the study plan's experiment knobs:
- `z_anneal = (Z_start, Z_end)`: Z moves linearly with the fraction of the stream done;
- `pool_cap = k`: only the k labels with the highest sampling weight can be drawn;
- `sps_weight = gamma`: weights times (label SPS / mean label SPS)^gamma, where a label's SPS
  is an EMA (weight `sps_ema`) of the throughput at its completions: labels whose episodes
  coincide with slow training are drawn less (SPS-aware gating).

Replay is open-loop: the recorded stream's label order came from the curriculum that ran,
not from the replayed one, so it shows how a configuration *reacts* to the rewards, not
what it would have made the learner practise (the simulator's closed loop does that).
Labels are LP's tasks here: eviction of task instances is not modelled.

`StepwiseCurriculum` is the straightforward version fed one completion at a time: the
simulator's curriculum, and the reference `replay` is tested and benchmarked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rts_dagster.analysis import recurrence
from rts_dagster.analysis.lp import (
    BASELINE_CAP,
    LearningProgress,
    LPConfig,
    ZScoreLearningProgress,
    ZScoreLPConfig,
    normalise,
    raw_scores,
    sampling_probabilities,
    zscore_lp,
    zscore_probabilities,
)

DEFAULT_EVAL_POINTS = 400  # instants of a replay's time series (evenly spaced)


class CurriculumConfig(BaseModel):
    """One LP configuration to replay (or to run in the simulator)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    variant: Literal["main", "zscore"] = "main"
    main: LPConfig = LPConfig()
    zscore: ZScoreLPConfig = ZScoreLPConfig()
    z_anneal: tuple[float, float] | None = None
    pool_cap: int | None = Field(None, ge=1)
    sps_weight: float = 0.0
    sps_ema: float = Field(0.05, gt=0.0, le=1.0)
    description: str = ""

    @model_validator(mode="after")
    def _anneal_needs_zscore(self) -> CurriculumConfig:
        if self.z_anneal is not None and self.variant != "zscore":
            raise ValueError(f"{self.name}: z_anneal applies to the zscore variant only")
        return self

    def amplification(self, progress: float | np.ndarray) -> float | np.ndarray | None:
        """Z at `progress` (fraction of the stream done) when annealed, else None (the
        variant's own `z_score_amplification`)."""
        if self.z_anneal is None:
            return None
        z_start, z_end = self.z_anneal
        return z_start + (z_end - z_start) * np.asarray(progress, dtype=np.float64)

    @property
    def ema_timescale(self) -> float:
        return (self.main if self.variant == "main" else self.zscore).ema_timescale

    def settings(self) -> dict[str, float | int | str | None]:
        """The knobs that differ between sweep entries, flat (for tables)."""
        lp = self.main if self.variant == "main" else self.zscore
        z_start, z_end = self.z_anneal or (None, None)
        return {
            "variant": self.variant,
            "ema_timescale": lp.ema_timescale,
            "slow_timescale_factor": lp.slow_timescale_factor,
            "z_score_amplification": (
                self.zscore.z_score_amplification if self.variant == "zscore" else None
            ),
            "z_anneal_start": z_start,
            "z_anneal_end": z_end,
            "pool_cap": self.pool_cap,
            "sps_weight": self.sps_weight,
        }


@dataclass(frozen=True)
class Replay:
    """LP state over time. Shapes: G evaluation instants x L labels."""

    config: CurriculumConfig
    eval_index: np.ndarray  # (G,) state after this completion (0-based) was fed
    progress: np.ndarray  # (G,) eval_index / (n - 1): fraction of the stream done
    counts: np.ndarray  # (G, L) completions fed per label
    fast: np.ndarray  # (G, L) F (main: NaN before a label's first completion)
    slow: np.ndarray  # (G, L) S
    score: np.ndarray  # (G, L) main: raw LP score; zscore: LP_i = |R(F) - R(S)|
    probability: np.ndarray  # (G, L) sampling distribution over labels (rows sum to 1)

    @property
    def n_labels(self) -> int:
        return int(self.counts.shape[1])


def evaluation_points(n: int, n_eval: int = DEFAULT_EVAL_POINTS) -> np.ndarray:
    """`n_eval` completion indices evenly spread over a stream of n (always the last)."""
    if n < 1:
        raise ValueError("the stream is empty")
    if n_eval < 1:
        raise ValueError(f"n_eval must be >= 1, got {n_eval}")
    if n_eval == 1:
        return np.array([n - 1], dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, min(n_eval, n)).round().astype(np.int64))


def replay(
    label_index: np.ndarray,
    reward: np.ndarray,
    n_labels: int,
    config: CurriculumConfig,
    *,
    eval_index: np.ndarray | None = None,
    n_eval: int = DEFAULT_EVAL_POINTS,
    sps: np.ndarray | None = None,
    groups: LabelGroups | None = None,
) -> Replay:
    """Feed the completions (label, reward[, SPS at that time]) in order through `config`;
    return the state at `eval_index` (default: `n_eval` evenly spaced instants).
    `groups`: `LabelGroups(label_index, n_labels)` when replaying one stream many times."""
    labels, rewards = _check_stream(label_index, reward, n_labels)
    n = labels.size
    if sps is not None and np.shape(sps) != (n,):
        raise ValueError(f"sps has shape {np.shape(sps)}; expected ({n},), one per completion")
    points = evaluation_points(n, n_eval) if eval_index is None else _check_points(eval_index, n)
    progress = points / max(n - 1, 1)
    if groups is None:
        groups = LabelGroups(labels, n_labels)
    elif groups.n != n or groups.n_labels != n_labels:
        raise ValueError("groups were built for another stream")

    if config.variant == "main":
        lp = config.main
        x = (np.clip(rewards, 0.0, 1.0) - 0.5) / 0.5
        xs = np.take(x, groups.order)  # take: faster than fancy indexing here
        fast = groups.at(points, groups.ema(xs, lp.ema_timescale), np.nan)
        slow = groups.at(points, groups.ema(xs, lp.slow_timescale), np.nan)
        counts = groups.counts_at(points)
        score = raw_scores(fast, slow, np.minimum(counts, lp.memory), lp)
        probability = sampling_probabilities(score)
    else:
        zc = config.zscore
        rs = np.take(rewards, groups.order)
        xs = _zscore_inputs(rs, groups, zc)
        started = groups.first_nonzero(xs)  # per completion: F/S have left exactly 0
        f_all = groups.ema(xs, zc.ema_timescale, started)
        s_all = groups.ema(xs, zc.slow_timescale, started)
        t_all = groups.ema(rs, zc.ema_timescale, started)
        _restart_at_exact_zero(groups, started, xs, rs, f_all, s_all, t_all, zc)
        fast = groups.at(points, f_all, 0.0)
        slow = groups.at(points, s_all, 0.0)
        perf = groups.at(points, t_all, 0.0)
        counts = groups.counts_at(points)
        score = zscore_lp(fast, slow, zc)
        probability = zscore_probabilities(
            fast, slow, perf, counts, zc, config.amplification(progress)
        )

    label_sps = None
    if config.sps_weight != 0.0 and sps is not None:
        label_sps = _label_sps(groups, np.asarray(sps, dtype=np.float64), config.sps_ema, points)
    probability = apply_knobs(probability, config, label_sps)
    return Replay(config, points, progress, counts, fast, slow, score, probability)


# --- the experiment knobs, on the last axis (shared with StepwiseCurriculum) -----------------
def apply_knobs(
    probability: np.ndarray, config: CurriculumConfig, label_sps: np.ndarray | None
) -> np.ndarray:
    """The SPS gate (when `label_sps` is given) and then the pool cap of `config`."""
    if config.sps_weight != 0.0 and label_sps is not None:
        probability = sps_gate(probability, label_sps, config.sps_weight)
    if config.pool_cap is not None:
        probability = cap_pool(probability, config.pool_cap)
    return probability


def sps_gate(probability: np.ndarray, label_sps: np.ndarray, gamma: float) -> np.ndarray:
    """Weights times (label SPS / mean label SPS)^gamma, renormalised; labels without an SPS
    (NaN) keep factor 1."""
    have = np.isfinite(label_sps) & (label_sps > 0)
    n_have = have.sum(axis=-1, keepdims=True)
    mean = np.where(have, label_sps, 0.0).sum(axis=-1, keepdims=True) / np.maximum(n_have, 1)
    ratio = np.divide(label_sps, mean, out=np.ones_like(probability), where=have & (mean > 0))
    return normalise(probability * ratio**gamma)


def cap_pool(probability: np.ndarray, k: int) -> np.ndarray:
    """Keep the labels whose weight is among the k largest, renormalised. Labels tied
    with the k-th largest weight all stay (so all of them while scores are still equal,
    e.g. before any completion): a tie never decides by label order."""
    n_labels = probability.shape[-1]
    if k >= n_labels:
        return probability
    kth = -np.partition(-probability, k - 1, axis=-1)[..., k - 1 : k]
    return normalise(np.where(probability >= kth, probability, 0.0))


# --- vectorised per-label recursions ----------------------------------------------------------
class LabelGroups:
    """Completions grouped by label: `order` sorts time order into label order (stable, so
    each label's completions stay in time order); label l is `order[lo[l]:hi[l]]`. Build
    it once per stream and pass it to `replay` (and `lp_signal.label_trends`) to sort once."""

    def __init__(self, labels: np.ndarray, n_labels: int) -> None:
        # int16 keys let numpy use its O(n) radix sort (labels < 32768 in practice)
        keys = labels.astype(np.int16) if n_labels < 2**15 else labels
        self.order = np.argsort(keys, kind="stable")
        bounds = np.zeros(n_labels + 1, dtype=np.int64)
        np.cumsum(np.bincount(labels, minlength=n_labels), out=bounds[1:])
        self.lo, self.hi = bounds[:-1], bounds[1:]
        self.n_labels = n_labels
        self.present = np.flatnonzero(self.hi > self.lo)
        self.n = int(labels.size)

    @cached_property
    def label_of(self) -> np.ndarray:
        """Label of each position in label order."""
        return np.repeat(np.arange(self.n_labels), self.hi - self.lo)

    @cached_property
    def offset(self) -> np.ndarray:
        """Position of each completion among its label's completions (0, 1, ...)."""
        return np.arange(self.n) - np.repeat(self.lo, self.hi - self.lo)

    def ema(
        self, values: np.ndarray, weight: float, started: np.ndarray | None = None
    ) -> np.ndarray:
        """Per label (label order): y = values until the label's start (inclusive), then
        y_k = w v_k + (1 - w) y_{k-1}. `started` is each label's start offset (default 0:
        y_0 = v_0)."""
        out = values.copy()
        for lab in self.present:  # one C call per label, none per completion
            lo, hi = int(self.lo[lab]), int(self.hi[lab])
            m = lo + (0 if started is None else int(started[lab]))
            out[m:hi] = seeded_ema(values[m:hi], weight)
        return out

    def first_nonzero(self, values: np.ndarray) -> np.ndarray:
        """Per label: offset of its first non-zero value (its count if none)."""
        nonzero = values != 0.0
        index = np.where(nonzero, np.arange(values.size), values.size)
        first = np.minimum.reduceat(index, self.lo[self.present]) if self.present.size else []
        out = (self.hi - self.lo).copy()
        out[self.present] = np.minimum(np.asarray(first) - self.lo[self.present], out[self.present])
        return out

    def at(self, points: np.ndarray, per_completion: np.ndarray, before: float) -> np.ndarray:
        """(G, L): each label's value after its last completion at or before each point
        (`before` until its first; the dtype of `per_completion`)."""
        out = np.full((points.size, self.n_labels), before, dtype=per_completion.dtype)
        for lab in self.present:
            lo, hi = int(self.lo[lab]), int(self.hi[lab])
            k = np.searchsorted(self.order[lo:hi], points, side="right") - 1
            seen = k >= 0
            out[seen, lab] = per_completion[lo + k[seen]]
        return out

    def counts_at(self, points: np.ndarray) -> np.ndarray:
        out = np.zeros((points.size, self.n_labels), dtype=np.int64)
        for lab in self.present:
            lo, hi = int(self.lo[lab]), int(self.hi[lab])
            out[:, lab] = np.searchsorted(self.order[lo:hi], points, side="right")
        return out


def seeded_ema(values: np.ndarray, weight: float) -> np.ndarray:
    """y_0 = v_0, y_k = w v_k + (1 - w) y_{k-1}: one first-order recurrence on
    (v_0, w v_1, w v_2, ...) (LP's EMA, which starts at the first value instead of 0)."""
    scaled = values.astype(np.float64) * weight
    if scaled.size:
        scaled[0] = values[0]
    return recurrence.first_order(scaled, 1.0 - weight)


def _zscore_inputs(rs: np.ndarray, groups: LabelGroups, config: ZScoreLPConfig) -> np.ndarray:
    """x per completion (label order) of the z-score variant: baseline-normalised score.
    The baseline is 0 until a label's first non-zero score r*, then min(r*, 0.75)."""
    if not config.use_baseline_normalization:
        return rs.copy()
    first = groups.first_nonzero(rs)
    label_of = groups.label_of
    has = first < (groups.hi - groups.lo)
    base_value = np.zeros(groups.n_labels)
    base_value[has] = np.minimum(rs[groups.lo[has] + first[has]], BASELINE_CAP)
    baseline = np.where(groups.offset >= first[label_of], base_value[label_of], 0.0)
    return np.maximum(rs - baseline, 0.0) / np.maximum(1.0 - baseline, 1e-10)


def _restart_at_exact_zero(
    groups: LabelGroups,
    started: np.ndarray,
    xs: np.ndarray,
    rs: np.ndarray,
    fast: np.ndarray,
    slow: np.ndarray,
    perf: np.ndarray,
    config: ZScoreLPConfig,
) -> None:
    """The variant restarts F = S = x (T = r) whenever F and S are both exactly 0, not
    only before a label's first non-zero x. The EMAs return to exactly 0 only in corner
    cases (no baseline normalisation, rewards cancelling out exactly); the labels where it
    happens are recomputed step by step, in place."""
    label_of = groups.label_of
    back = (fast == 0.0) & (slow == 0.0) & (groups.offset > started[label_of])
    a, b = config.ema_timescale, config.slow_timescale
    for lab in np.unique(label_of[back]):
        f = s_ = t = 0.0
        for k in range(int(groups.lo[lab]), int(groups.hi[lab])):
            x, r = float(xs[k]), float(rs[k])
            if f == 0.0 and s_ == 0.0:
                f = s_ = x
                t = r
            else:
                f, s_, t = a * x + (1 - a) * f, b * x + (1 - b) * s_, a * r + (1 - a) * t
            fast[k], slow[k], perf[k] = f, s_, t


def _label_sps(
    groups: LabelGroups, sps: np.ndarray, weight: float, points: np.ndarray
) -> np.ndarray:
    """(G, L) EMA of the SPS at each label's completions (NaN SPS samples are skipped)."""
    out = np.full((points.size, groups.n_labels), np.nan)
    ordered = sps[groups.order]
    for lab in groups.present:
        lo, hi = int(groups.lo[lab]), int(groups.hi[lab])
        finite = np.isfinite(ordered[lo:hi])
        if not finite.any():
            continue
        level = seeded_ema(ordered[lo:hi][finite], weight)
        times = groups.order[lo:hi][finite]
        k = np.searchsorted(times, points, side="right") - 1
        out[k >= 0, lab] = level[k[k >= 0]]
    return out


def _check_stream(
    label_index: np.ndarray, reward: np.ndarray, n_labels: int
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(label_index)
    rewards = np.asarray(reward, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != rewards.shape:
        raise ValueError(
            "label_index and reward must be 1-D arrays of the same length; got shapes "
            f"{labels.shape} and {rewards.shape}"
        )
    if labels.size == 0:
        raise ValueError("the stream is empty")
    if n_labels < 1:
        raise ValueError("n_labels must be >= 1")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("label_index must hold integers")
    bad = np.flatnonzero((labels < 0) | (labels >= n_labels))
    if bad.size:
        raise ValueError(
            f"completion {bad[0]}: label_index {labels[bad[0]]} not in [0, {n_labels})"
        )
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        raise ValueError(f"completion {bad[0]}: reward {rewards[bad[0]]} is not finite")
    return labels.astype(np.int64, copy=False), rewards


def _check_points(eval_index: np.ndarray, n: int) -> np.ndarray:
    points = np.asarray(eval_index, dtype=np.int64)
    if points.ndim != 1 or points.size == 0:
        raise ValueError("eval_index must be a non-empty 1-D array")
    outside = np.flatnonzero((points < 0) | (points >= n))
    if outside.size:
        i = int(outside[0])
        raise ValueError(f"eval_index[{i}] = {points[i]} is not a completion in [0, {n})")
    stuck = np.flatnonzero(np.diff(points) <= 0)
    if stuck.size:
        i = int(stuck[0]) + 1
        raise ValueError(
            f"eval_index must increase strictly: eval_index[{i}] = {points[i]} follows "
            f"{points[i - 1]}"
        )
    return points


# --- the straightforward reference --------------------------------------------------------------
class StepwiseCurriculum:
    """`config` fed one completion at a time (the simulator's curriculum; the reference
    of `replay`)."""

    def __init__(self, config: CurriculumConfig, n_labels: int) -> None:
        self.config = config
        self.lp: LearningProgress | ZScoreLearningProgress = (
            LearningProgress(n_labels, config.main)
            if config.variant == "main"
            else ZScoreLearningProgress(n_labels, config.zscore)
        )
        self.label_sps = np.full(n_labels, np.nan)

    @property
    def F(self) -> np.ndarray:  # DOMAIN.md's names
        return self.lp.F

    @property
    def S(self) -> np.ndarray:
        return self.lp.S

    @property
    def counts(self) -> np.ndarray:
        return self.lp.counts

    def update(self, label_index: int, reward: float, sps: float | None = None) -> None:
        self.lp.update(label_index, reward)
        if sps is not None and math.isfinite(sps):
            i = int(label_index)
            previous = self.label_sps[i]
            w = self.config.sps_ema
            self.label_sps[i] = sps if previous != previous else w * sps + (1 - w) * previous

    def scores(self) -> np.ndarray:
        return self.lp.scores()

    def recent_means(self) -> np.ndarray:
        """Mean of each label's outcome memory (main); NaN for the z-score variant,
        which keeps no outcome memory."""
        if isinstance(self.lp, LearningProgress):
            return self.lp.recent_means()
        return np.full(self.lp.n_labels, np.nan)

    def probabilities(self, progress: float = 0.0) -> np.ndarray:
        """The sampling distribution now; `progress` (0..1) drives an annealed Z."""
        if isinstance(self.lp, ZScoreLearningProgress):
            amplification = self.config.amplification(progress)
            p = self.lp.probabilities(None if amplification is None else float(amplification))
        else:
            p = self.lp.probabilities()
        return apply_knobs(p, self.config, self.label_sps)


def stepwise_deviation(
    label_index: np.ndarray,
    reward: np.ndarray,
    n_labels: int,
    config: CurriculumConfig,
    *,
    sps: np.ndarray | None = None,
    limit: int = 2000,
) -> float:
    """Largest |probability difference| between `replay` and `StepwiseCurriculum` over the
    first `limit` completions, every instant (a self-check run on real data: the two must
    agree to rounding, ~1e-12)."""
    n = min(int(limit), int(np.asarray(label_index).size))
    labels = np.asarray(label_index)[:n]
    rewards = np.asarray(reward, dtype=np.float64)[:n]
    speeds = None if sps is None else np.asarray(sps, dtype=np.float64)[:n]
    fast = replay(labels, rewards, n_labels, config, eval_index=np.arange(n), sps=speeds)
    reference = StepwiseCurriculum(config, n_labels)
    worst = 0.0
    for j in range(n):  # the reference is per completion by design
        reference.update(
            int(labels[j]), float(rewards[j]), None if speeds is None else float(speeds[j])
        )
        p = reference.probabilities(j / max(n - 1, 1))
        worst = max(worst, float(np.max(np.abs(p - fast.probability[j]))))
    return worst
