"""Signal-quality metrics of a replay, on constructed inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rts_dagster.analysis.lp_replay import CurriculumConfig, Replay
from rts_dagster.analysis.lp_signal import (
    DECLINING,
    IMPROVING,
    PLATEAUED,
    UNDECIDED,
    TrendSettings,
    gini,
    label_trends,
    normalised_entropy,
    ranks,
    signal_quality,
)


def _replay(probability: np.ndarray, eval_index: np.ndarray, variant: str = "zscore") -> Replay:
    g, n = probability.shape
    zeros = np.zeros((g, n))
    return Replay(
        config=CurriculumConfig(name="c", variant=variant),
        eval_index=eval_index,
        progress=eval_index / max(eval_index[-1], 1),
        counts=np.ones((g, n), dtype=np.int64),
        fast=zeros,
        slow=zeros,
        score=zeros,
        probability=probability,
    )


def test_gini_and_entropy_by_hand() -> None:
    # Gini of [0.1, 0.2, 0.3, 0.4]: sum of |xi - xj| over ordered pairs = 2.0;
    # G = 2.0 / (2 n^2 mean) = 2 / (2 * 16 * 0.25) = 0.25
    assert gini(np.array([[0.1, 0.2, 0.3, 0.4]]))[0] == pytest.approx(0.25)
    assert gini(np.full((1, 5), 0.2))[0] == pytest.approx(0.0, abs=1e-15)
    assert gini(np.array([[0.0, 0.0, 1.0, 0.0]]))[0] == pytest.approx(0.75)  # (L-1)/L
    assert normalised_entropy(np.full((1, 8), 0.125))[0] == pytest.approx(1.0)
    assert normalised_entropy(np.array([[0.0, 1.0, 0.0]]))[0] == pytest.approx(0.0)
    # H([0.5, 0.25, 0.25]) = 1.5 ln 2 ... / ln 3
    expected = (0.5 * math.log(2) + 2 * 0.25 * math.log(4)) / math.log(3)
    assert normalised_entropy(np.array([[0.5, 0.25, 0.25]]))[0] == pytest.approx(expected)


def test_ranks_break_ties_by_label() -> None:
    np.testing.assert_array_equal(ranks(np.array([[0.2, 0.5, 0.2, 0.1]])), [[1, 0, 2, 3]])


def test_label_trends_find_rising_flat_and_falling_labels() -> None:
    rng = np.random.default_rng(7)
    n_per = 400
    labels = np.tile(np.arange(3), n_per)
    k = np.repeat(np.arange(n_per), 3).astype(float)
    noise = rng.normal(0, 0.05, labels.size)
    # slope 0.01 per sample over a 25-sample window: t ~ 0.01 / (0.05 * 0.0139) ~ 14
    reward = np.where(labels == 0, 0.01 * k, np.where(labels == 1, 0.5, 4 - 0.01 * k)) + noise
    points = np.array([10, 3 * 30, labels.size - 1])
    states = label_trends(labels, reward, 3, points, TrendSettings(window=25))
    assert states[0].tolist() == [UNDECIDED] * 3  # fewer than 25 samples per label yet
    assert (states[-1][0], states[-1][2]) == (IMPROVING, DECLINING)
    # the flat label: |t| < 1 about 68% of the time for white noise (overlapping windows
    # make the fraction vary), t > 2 about 2%; the trending labels always cross t = 2
    every = np.arange(75, labels.size, 3)
    states = label_trends(labels, reward, 3, every)
    assert (states[:, 1] == PLATEAUED).mean() > 0.45
    assert (states[:, 1] == IMPROVING).mean() < 0.1
    assert (states[:, 0] == IMPROVING).all() and (states[:, 2] == DECLINING).all()


def test_noiseless_labels() -> None:
    labels = np.zeros(60, dtype=np.int64)
    rising = label_trends(labels, np.arange(60) * 0.01, 1, np.array([59]))
    flat = label_trends(labels, np.full(60, 0.3), 1, np.array([59]))
    assert rising[0, 0] == IMPROVING and flat[0, 0] == PLATEAUED


def test_signal_quality_by_hand() -> None:
    # 4 labels, 5 instants 10 completions apart; label 0 improving throughout, label 1
    # turns improving at instant 2, labels 2 and 3 plateaued.
    eval_index = np.array([0, 10, 20, 30, 40])
    p = np.array(
        [
            [0.4, 0.1, 0.25, 0.25],
            [0.4, 0.1, 0.25, 0.25],
            [0.4, 0.1, 0.3, 0.2],  # label 1 improving but ranked last
            [0.3, 0.2, 0.3, 0.2],
            [0.2, 0.5, 0.2, 0.1],  # label 1 reaches the top k = ceil(4/4) = 1
        ]
    )
    trends = np.full((5, 4), PLATEAUED, dtype=np.int8)
    trends[:, 0] = IMPROVING
    trends[2:, 1] = IMPROVING
    q = signal_quality(_replay(p, eval_index), trends)
    # per-instant ratio: per improving label / per plateaued label
    ratios = [0.4 / 0.2, 0.4 / 0.2, 0.25 / 0.25, 0.25 / 0.25, 0.35 / 0.15]
    assert q["lp_snr"] == pytest.approx(math.exp(np.mean(np.log(ratios))))
    assert q["improving_mass"] == pytest.approx(np.mean([0.4, 0.4, 0.5, 0.5, 0.7]))
    assert q["top_k"] == 1
    assert q["n_improving_events"] == 1  # label 1 at instant 2 (label 0 improving from 0)
    assert q["lag_median"] == 20.0 and q["lag_censored"] == 0.0
    # churn: plateaued at consecutive instants: labels 2, 3 (all steps), label 1 (0->1)
    # ranks: i0 [0,3,1,2] i1 same; i2 [0,3,1,2]; i3 [0,2,1,3]; i4 [1,0,2,3]
    # |moves| for (l1: 0->1): 0; l2: 0,0,0,1; l3: 0,0,1,0 -> sum 2 over 9 pairs
    assert q["churn_plateau"] == pytest.approx(2 / 3 / 9 * 1000 / 10)
    assert q["starved_fraction"] == 0.0  # nothing below 0.1 / 4 = 0.025
    assert math.isnan(q["pole_fraction"])  # zscore variant: R is not used


def test_never_reaching_the_top_is_an_infinite_lag() -> None:
    p = np.array([[0.7, 0.1, 0.2], [0.7, 0.1, 0.2], [0.7, 0.1, 0.2]])
    trends = np.full((3, 3), PLATEAUED, dtype=np.int8)
    trends[1:, 1] = IMPROVING
    q = signal_quality(_replay(p, np.array([0, 5, 9])), trends)
    assert q["lag_median"] == math.inf and q["lag_censored"] == 1.0


def test_saturated_distributions_have_a_bounded_snr() -> None:
    p = np.array([[1.0, 0.0]])
    trends = np.array([[IMPROVING, PLATEAUED]], dtype=np.int8)
    q = signal_quality(_replay(p, np.array([3])), trends)
    assert q["lp_snr"] == pytest.approx(1.0 / (1e-4 / 2))
    assert q["starved_fraction"] == 0.5


def test_pole_fraction_of_main_variant() -> None:
    # x just above the pole -t/(1-2t) ~ -0.0556 for t = 0.05: R(-0.05) = -0.0475 / 0.0 ...
    # denominator -0.05 + 0.05 * 1.1 = 0.005 -> R = -9.5: outside [-1, 1]
    replay = _replay(np.full((1, 2), 0.5), np.array([0]), variant="main")
    replay = Replay(
        replay.config,
        replay.eval_index,
        replay.progress,
        replay.counts,
        fast=np.array([[-0.05, 0.5]]),
        slow=np.array([[0.1, 0.5]]),
        score=replay.score,
        probability=replay.probability,
    )
    trends = np.full((1, 2), PLATEAUED, dtype=np.int8)
    assert signal_quality(replay, trends)["pole_fraction"] == 0.5


def _loop_trends(labels, reward, n_labels, settings: TrendSettings) -> np.ndarray:
    """Reference: per sample, the OLS slope of the label's last `window` samples (polyfit)
    over its noise sigma from that label's samples up to that one only (diff_noise)."""
    from rts_dagster.analysis.metrics import diff_noise

    w = settings.window
    se_unit = 1.0 / math.sqrt(w * (w * w - 1) / 12.0)
    seen: dict[int, list[float]] = {lab: [] for lab in range(n_labels)}
    out = np.full(labels.size, UNDECIDED, dtype=np.int8)
    for i, (lab, r) in enumerate(zip(labels.tolist(), reward.tolist(), strict=True)):
        seen[lab].append(r)
        ys = np.array(seen[lab])
        if ys.size < w:
            continue
        slope = np.polyfit(np.arange(w), ys[-w:], 1)[0]
        sigma = diff_noise(ys)[0]
        t = slope / (sigma * se_unit) if sigma > 0 else math.copysign(math.inf, slope)
        if abs(t) < settings.t_flat:
            out[i] = PLATEAUED
        elif t > settings.t_improving:
            out[i] = IMPROVING
        elif t < -settings.t_improving:
            out[i] = DECLINING
    return out


def _stream(rng: np.random.Generator, n: int = 900, n_labels: int = 3):
    labels = rng.integers(0, n_labels, n)
    k = np.arange(n) / n
    slopes = np.array([0.0, 0.4, -0.3])[:n_labels]
    reward = 0.5 + slopes[labels] * k + rng.normal(0, 0.05, n)
    return labels, reward


def test_label_trends_equal_a_per_sample_loop() -> None:
    rng = np.random.default_rng(21)
    labels, reward = _stream(rng)
    settings = TrendSettings(window=10)
    every = np.arange(labels.size)
    states = label_trends(labels, reward, 3, every, settings)
    reference = _loop_trends(labels, reward, 3, settings)
    # state after each completion, of the label just completed
    np.testing.assert_array_equal(states[every, labels], reference)
    assert {IMPROVING, PLATEAUED, DECLINING} <= set(reference.tolist())


def test_label_trends_do_not_look_ahead() -> None:
    """Doubling (then 10x) the noise after instant g leaves every state before g as it was;
    with a whole-series sigma the flat label's states before g would change."""
    rng = np.random.default_rng(5)
    labels, reward = _stream(rng, n=1200)
    g = 700
    noisier = reward.copy()
    extra = rng.normal(0, 0.5, labels.size - g)
    noisier[g:] += extra
    every = np.arange(labels.size)
    before = label_trends(labels, reward, 3, every)
    after = label_trends(labels, noisier, 3, every)
    np.testing.assert_array_equal(before[:g], after[:g])
    assert not np.array_equal(before[g:], after[g:])  # the change does show after g
