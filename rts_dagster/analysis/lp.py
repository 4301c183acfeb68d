"""Learning Progress (LP) curriculum scores in numpy: Metta main's bidirectional LP and the
z-score-amplification variant of the `msb_curr_min_v2` branch (`ZScoreLPConfig`).

This module holds the configs, the score and distribution math (vectorised over labels,
and over time where `lp_replay` evaluates many instants at once) and the straightforward
stateful versions fed one completion at a time (`LearningProgress`,
`ZScoreLearningProgress`): the simulator's curriculum and the reference the vectorised
replay (`analysis/lp_replay.py`) is tested against.

Written from the description in DOMAIN.md ("The LP algorithm on Metta main"). A *label*
here plays the role of one LP task: the simulator and the replay checks track one LP entry
per curriculum label (Metta tracks task instances; a label groups many of them).

Per completion of label i with reward r:
    s = clip(r, 0, 1) (kept in a ring buffer of the last `memory` outcomes),
    x = (s - 0.5) / 0.5,
    first completion: F_i = S_i = x; afterwards F_i <- a x + (1 - a) F_i and
    S_i <- b x + (1 - b) S_i with a = ema_timescale, b = a * slow_timescale_factor.
Score: the exploration bonus while a label has < 2 outcomes, else
    max(|R(F) - R(S)| + lp_gain * max(R(F), 0), exploration_bonus)
with R the progress-smoothing transform (`progress_transform`).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


class LPConfig(BaseModel):
    """LP hyperparameters, defaults of Metta main.

    Unknown keys are ignored, so the `algorithm` block of a Metta run config (which also
    carries `type`, `rand_task_rate`, `sample_threshold`, ...) validates directly.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    ema_timescale: float = Field(0.001, gt=0.0, le=1.0)
    slow_timescale_factor: float = Field(0.2, gt=0.0)
    exploration_bonus: float = 0.1
    progress_smoothing: float = Field(0.05, ge=0.0)
    lp_gain: float = 0.1
    memory: int = Field(25, ge=1)
    use_bidirectional: bool = True

    @field_validator("use_bidirectional")
    @classmethod
    def _only_bidirectional(cls, value: bool) -> bool:
        if not value:
            raise ValueError("only the bidirectional LP variant is implemented")
        return value

    @property
    def slow_timescale(self) -> float:
        """The slow EMA weight b = ema_timescale * slow_timescale_factor."""
        return self.ema_timescale * self.slow_timescale_factor


def progress_transform(p: np.ndarray | float, smoothing: float) -> np.ndarray:
    """R(p) = p (1 - t) / (p + t (1 - 2p)), with a denominator <= 0 replaced by 1.

    Identity when t == 0. R is meant for p in [0, 1] but LP applies it to x in [-1, 1]:
    for t = 0.05 the denominator is zero at x = -t / (1 - 2t) ~ -0.0556, so R tends to
    -inf just above that point and jumps to x (1 - t) just below it.
    """
    p = np.asarray(p, dtype=np.float64)
    if smoothing == 0.0:
        return p.copy()
    denominator = p + smoothing * (1.0 - 2.0 * p)
    denominator = np.where(denominator <= 0.0, 1.0, denominator)
    return p * (1.0 - smoothing) / denominator


def raw_scores(
    fast: np.ndarray, slow: np.ndarray, n_outcomes: np.ndarray, config: LPConfig
) -> np.ndarray:
    """Per-label LP score (before the sampling normalisation), vectorised over labels."""
    r_fast = progress_transform(fast, config.progress_smoothing)
    r_slow = progress_transform(slow, config.progress_smoothing)
    progress = np.abs(r_fast - r_slow) + config.lp_gain * np.maximum(r_fast, 0.0)
    scores = np.maximum(progress, config.exploration_bonus)
    # F and S are NaN before the first completion: those labels take the bonus branch.
    return np.where(np.asarray(n_outcomes) < 2, config.exploration_bonus, scores)


def sampling_probabilities(raw: np.ndarray) -> np.ndarray:
    """Turn LP scores into sampling probabilities over the labels (the last axis; a 2-D
    input is one distribution per row).

    Labels with a score <= 0 (or NaN) get probability 0. With more than 2 remaining
    labels the scores are z-scored with the population std (plain `raw - mean` when the
    std is 0), passed through a sigmoid and normalised.

    With 1 or 2 remaining labels there is no z-score (DOMAIN.md: only for "more than 2
    tasks"): the sigmoid applies to the raw scores themselves, p = sigmoid(raw) / sum.
    Raw scores are small (>= exploration_bonus, typically < 1), so this split stays close
    to even: [0.1, 0.3] gives [0.4775, 0.5225]. If no label has a positive score (only
    possible with exploration_bonus <= 0), the distribution is uniform.
    """
    raw = np.asarray(raw, dtype=np.float64)
    rows = np.atleast_2d(raw)
    keep = rows > 0.0  # NaN compares False
    n_keep = keep.sum(axis=-1, keepdims=True)
    kept = np.where(keep, rows, 0.0)
    safe_n = np.maximum(n_keep, 1)
    mean = kept.sum(axis=-1, keepdims=True) / safe_n
    centred = np.where(keep, rows - mean, 0.0)
    std = np.sqrt((centred**2).sum(axis=-1, keepdims=True) / safe_n)
    z = np.divide(centred, std, out=centred.copy(), where=std > 0.0)
    weights = sigmoid(np.where(n_keep > 2, z, kept))
    weights = np.where(keep, weights, 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    uniform = np.full(rows.shape, 1.0 / rows.shape[-1])
    out = np.where(n_keep > 0, weights / np.where(total > 0.0, total, 1.0), uniform)
    return out.reshape(raw.shape)


def normalise(weights: np.ndarray) -> np.ndarray:
    """Weights divided by their sum along the last axis; uniform where the sum is <= 0."""
    total = weights.sum(axis=-1, keepdims=True)
    uniform = np.full(weights.shape, 1.0 / weights.shape[-1])
    return np.where(total > 0.0, weights / np.where(total > 0.0, total, 1.0), uniform)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) in its tanh form: no overflow warning for large |z|."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


class LearningProgress:
    """Stateful LP over `n_labels` labels, fed one completion at a time.

    Attributes: `F`, `S` (fast/slow EMAs of x, NaN before a label's first completion),
    `counts` (completions per label), `outcomes` (ring buffer of the last `memory`
    clipped scores per label, NaN where unused).
    """

    def __init__(self, n_labels: int, config: LPConfig | None = None) -> None:
        if n_labels < 1:
            raise ValueError("n_labels must be >= 1")
        self.config = config or LPConfig()
        self.n_labels = n_labels
        self.F = np.full(n_labels, np.nan)
        self.S = np.full(n_labels, np.nan)
        self.counts = np.zeros(n_labels, dtype=np.int64)
        self.outcomes = np.full((n_labels, self.config.memory), np.nan)
        self._a = self.config.ema_timescale
        self._b = self.config.slow_timescale

    def update(self, label_index: int, reward: float) -> None:
        """Feed the score of one finished episode of label `label_index`."""
        i = int(label_index)
        r = float(reward)
        if r != r:  # NaN would poison both EMAs for good
            raise ValueError("reward is NaN")
        s = min(max(r, 0.0), 1.0)
        x = (s - 0.5) / 0.5
        count = int(self.counts[i])
        self.outcomes[i, count % self.config.memory] = s
        if count == 0:
            self.F[i] = x
            self.S[i] = x
        else:
            self.F[i] = self._a * x + (1.0 - self._a) * self.F[i]
            self.S[i] = self._b * x + (1.0 - self._b) * self.S[i]
        self.counts[i] = count + 1

    @property
    def n_outcomes(self) -> np.ndarray:
        """Outcomes currently held per label (counts capped at `memory`)."""
        return np.minimum(self.counts, self.config.memory)

    def scores(self) -> np.ndarray:
        """Raw LP score per label (see `raw_scores`)."""
        return raw_scores(self.F, self.S, self.n_outcomes, self.config)

    def probabilities(self) -> np.ndarray:
        """Sampling probability per label (see `sampling_probabilities`)."""
        return sampling_probabilities(self.scores())

    def recent_means(self) -> np.ndarray:
        """Mean of each label's outcome memory (clipped scores); NaN for unseen labels."""
        held = self.n_outcomes
        sums = np.nansum(self.outcomes, axis=1)
        return np.divide(sums, held, out=np.full(self.n_labels, np.nan), where=held > 0)


# --- the z-score-amplification variant (branch msb_curr_min_v2) --------------------------------
class ZScoreLPConfig(BaseModel):
    """LP hyperparameters of the z-score-amplification variant, defaults of its branch.

    `rand_task_rate` and the eviction percentile exist there too; DOMAIN.md's sampling
    rule does not use them and neither does this module.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    ema_timescale: float = Field(0.1, gt=0.0, le=1.0)
    slow_timescale_factor: float = Field(0.2, gt=0.0)
    exploration_bonus: float = Field(0.1, ge=0.0)  # a weight: negative is meaningless
    progress_smoothing: float = 0.0
    performance_bonus_weight: float = 0.0
    lp_score_temperature: float = Field(0.0, ge=0.0)  # 0 means z-score mode
    z_score_amplification: float = 10.0
    early_progress_amplification: float = Field(0.5, ge=0.0, le=1.0)  # 0.5: reweighting off
    use_baseline_normalization: bool = True
    min_samples_for_lp: int = Field(10, ge=0)

    @property
    def slow_timescale(self) -> float:
        return self.ema_timescale * self.slow_timescale_factor


BASELINE_CAP = 0.75  # the baseline is the first non-zero score, capped here


def reweight(p: np.ndarray, theta: float) -> np.ndarray:
    """R_theta(p) = p (1 - theta) / (p + theta (1 - 2p)) of the z-score variant, applied to p
    clipped to [0, 1]; where |denominator| < 1e-10 the result is 0 for p < 0.5, else 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    denominator = p + theta * (1.0 - 2.0 * p)
    tiny = np.abs(denominator) < 1e-10
    value = p * (1.0 - theta) / np.where(tiny, 1.0, denominator)
    return np.where(tiny, np.where(p < 0.5, 0.0, 1.0), value)


def zscore_lp(fast: np.ndarray, slow: np.ndarray, config: ZScoreLPConfig) -> np.ndarray:
    """LP_i of the variant: |R_theta(F) - R_theta(S)|, or |F - S| when theta == 0.5."""
    theta = config.early_progress_amplification
    if theta == 0.5:
        return np.abs(np.asarray(fast) - np.asarray(slow))
    return np.abs(reweight(fast, theta) - reweight(slow, theta))


def zscore_probabilities(
    fast: np.ndarray,
    slow: np.ndarray,
    perf: np.ndarray,
    counts: np.ndarray,
    config: ZScoreLPConfig,
    amplification: float | np.ndarray | None = None,
) -> np.ndarray:
    """The variant's sampling weights over all tracked labels (last axis), normalised.

    u = LP + progress_smoothing + performance_bonus_weight * T; z-score mode
    (temperature 0): u = Z (u - mean) / std when the population std exceeds 1e-10, else u
    unchanged; p = sigmoid(u) / sum (uniform if the sum is 0). Labels with fewer than
    `min_samples_for_lp` completions weigh `exploration_bonus` instead of p; the weights
    are normalised again. `amplification` overrides Z (a scalar, or one per row for an
    annealed schedule).
    """
    z_amp = config.z_score_amplification if amplification is None else amplification
    u = zscore_lp(fast, slow, config) + config.progress_smoothing
    u = np.atleast_2d(u + config.performance_bonus_weight * np.asarray(perf, dtype=np.float64))
    if config.lp_score_temperature == 0.0:
        mean = u.mean(axis=-1, keepdims=True)
        std = u.std(axis=-1, keepdims=True)
        z_amp = np.reshape(np.asarray(z_amp, dtype=np.float64), (-1, 1))
        scaled = z_amp * (u - mean) / np.where(std > 1e-10, std, 1.0)
        u = np.where(std > 1e-10, scaled, u)
    else:
        u = u / config.lp_score_temperature
    p = normalise(sigmoid(u))
    counts = np.broadcast_to(np.asarray(counts), p.shape)
    out = normalise(np.where(counts < config.min_samples_for_lp, config.exploration_bonus, p))
    return out[0] if np.ndim(fast) == 1 else out


class ZScoreLearningProgress:
    """Stateful z-score-amplification LP over `n_labels` labels, one completion at a time.

    Attributes: `F`, `S` (0 until a label's first non-zero normalised score), `T` (EMA of
    the raw score), `B` (baseline), `counts`.
    """

    def __init__(self, n_labels: int, config: ZScoreLPConfig | None = None) -> None:
        if n_labels < 1:
            raise ValueError("n_labels must be >= 1")
        self.config = config or ZScoreLPConfig()
        self.n_labels = n_labels
        self.F = np.zeros(n_labels)
        self.S = np.zeros(n_labels)
        self.T = np.zeros(n_labels)
        self.B = np.zeros(n_labels)
        self.counts = np.zeros(n_labels, dtype=np.int64)

    def update(self, label_index: int, reward: float) -> None:
        """Feed the score of one finished episode (not clipped)."""
        i = int(label_index)
        r = float(reward)
        if r != r:
            raise ValueError("reward is NaN")
        config = self.config
        if config.use_baseline_normalization:
            if self.B[i] == 0.0:
                self.B[i] = min(r, BASELINE_CAP)
            b = self.B[i]
            x = max(r - b, 0.0) / max(1.0 - b, 1e-10)
        else:
            x = r
        if self.F[i] == 0.0 and self.S[i] == 0.0:
            self.F[i] = self.S[i] = x
            self.T[i] = r
        else:
            a = config.ema_timescale
            bs = config.slow_timescale
            self.F[i] = a * x + (1.0 - a) * self.F[i]
            self.S[i] = bs * x + (1.0 - bs) * self.S[i]
            self.T[i] = a * r + (1.0 - a) * self.T[i]
        self.counts[i] += 1

    def scores(self) -> np.ndarray:
        """LP_i per label (before the distribution)."""
        return zscore_lp(self.F, self.S, self.config)

    def probabilities(self, amplification: float | None = None) -> np.ndarray:
        """Sampling probability per label (see `zscore_probabilities`)."""
        return zscore_probabilities(self.F, self.S, self.T, self.counts, self.config, amplification)
