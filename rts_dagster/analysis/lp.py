"""Learning Progress (LP) curriculum score of Metta main, bidirectional variant, in numpy.

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
    """Turn LP scores into sampling probabilities over the labels.

    Labels with a score <= 0 (or NaN) get probability 0. With more than 2 remaining
    labels the scores are z-scored with the population std (plain `raw - mean` when the
    std is 0), passed through a sigmoid and normalised.

    With 1 or 2 remaining labels the scores themselves are normalised (p = raw / sum).
    Why: DOMAIN.md specifies the z-score only for "more than 2 tasks", and a z-score of
    two values is always -1 and +1 (population std), which would fix the split at
    sigmoid(1) : sigmoid(-1) ~ 0.73 : 0.27 whatever the scores are; proportional weights
    keep the ordering and the size of the difference. If no label has a positive score
    (only possible with exploration_bonus <= 0), the distribution is uniform.
    """
    raw = np.asarray(raw, dtype=np.float64)
    keep = raw > 0.0
    n_keep = int(keep.sum())
    if n_keep == 0:
        return np.full(raw.shape, 1.0 / raw.size)
    weights = raw[keep]
    if n_keep > 2:
        centred = weights - weights.mean()
        std = weights.std()
        z = centred / std if std > 0.0 else centred
        # tanh form of the sigmoid: no overflow warning for large |z|.
        weights = 0.5 * (1.0 + np.tanh(0.5 * z))
    probabilities = np.zeros(raw.shape)
    probabilities[keep] = weights / weights.sum()
    return probabilities


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
