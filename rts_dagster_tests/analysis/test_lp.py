"""Metta main's bidirectional LP: hand-computed values and invariants."""

from __future__ import annotations

import numpy as np
import pytest

from rts_dagster.analysis.lp import (
    LearningProgress,
    LPConfig,
    progress_transform,
    raw_scores,
    sampling_probabilities,
)

# Large timescales so two or three completions move the EMAs visibly: a = 0.5, b = 0.1.
FAST = LPConfig(ema_timescale=0.5, slow_timescale_factor=0.2)


def test_defaults_match_metta_main() -> None:
    config = LPConfig()
    assert (config.ema_timescale, config.slow_timescale_factor) == (0.001, 0.2)
    assert (config.exploration_bonus, config.progress_smoothing) == (0.1, 0.05)
    assert (config.lp_gain, config.memory) == (0.1, 25)
    assert config.slow_timescale == pytest.approx(0.0002)


def test_config_reads_a_metta_algorithm_block() -> None:
    block = {"type": "learning_progress", "ema_timescale": 0.01, "rand_task_rate": 0.0}
    assert LPConfig.model_validate(block).ema_timescale == 0.01
    with pytest.raises(ValueError):
        LPConfig(use_bidirectional=False)


def test_first_completion_sets_both_emas_and_scores_the_bonus() -> None:
    lp = LearningProgress(3, FAST)
    lp.update(1, 0.8)  # s = 0.8, x = 0.6
    assert lp.F[1] == pytest.approx(0.6) and lp.S[1] == pytest.approx(0.6)
    assert np.isnan(lp.F[0]) and np.isnan(lp.S[2])
    assert lp.counts.tolist() == [0, 1, 0]
    # Fewer than 2 outcomes: every label scores exactly the exploration bonus.
    np.testing.assert_array_equal(lp.scores(), [0.1, 0.1, 0.1])
    np.testing.assert_allclose(lp.probabilities(), [1 / 3] * 3)


def test_ema_updates_and_score_by_hand() -> None:
    lp = LearningProgress(3, FAST)
    lp.update(0, 0.8)  # F = S = 0.6
    lp.update(0, 0.2)  # x = -0.6: F = 0.5*-0.6 + 0.5*0.6 = 0.0; S = 0.1*-0.6 + 0.9*0.6 = 0.48
    assert lp.F[0] == pytest.approx(0.0, abs=1e-15)
    assert lp.S[0] == pytest.approx(0.48)
    # R(0) = 0; R(0.48) = 0.48*0.95 / (0.48 + 0.05*0.04) = 0.456 / 0.482 = 0.9460580913
    # raw = |0 - 0.946058| + 0.1 * max(0, 0) = 0.946058 (above the 0.1 floor)
    assert lp.scores()[0] == pytest.approx(0.9460580913, rel=1e-9)
    lp.update(0, 1.3)  # clipped: s = 1, x = 1: F = 0.5; S = 0.1 + 0.9*0.48 = 0.532
    assert (lp.F[0], lp.S[0]) == pytest.approx((0.5, 0.532))
    # R(0.5) = 0.95; R(0.532) = 0.5054 / 0.5288 = 0.9557488654
    # raw = 0.0057488654 + 0.1*0.95 = 0.1007488654
    assert lp.scores()[0] == pytest.approx(0.1007488654, rel=1e-9)
    assert lp.scores()[1:].tolist() == [0.1, 0.1]


def test_negative_rewards_are_clipped_to_zero() -> None:
    lp = LearningProgress(1, FAST)
    lp.update(0, -3.0)
    assert lp.F[0] == -1.0 and lp.outcomes[0, 0] == 0.0


def test_score_floor_is_the_exploration_bonus() -> None:
    lp = LearningProgress(1, FAST)
    lp.update(0, 0.0)
    lp.update(0, 0.0)  # F = S = -1: R = -0.95 for both (denominator -0.85 -> 1); LP = 0
    assert lp.scores()[0] == 0.1


def test_progress_transform_denominator_crossing() -> None:
    t = 0.05
    # Just above x = -t/(1-2t) ~ -0.0556 the denominator is tiny and positive:
    # R(-0.05) = -0.0475 / 0.005 = -9.5.
    assert progress_transform(-0.05, t) == pytest.approx(-9.5)
    # Just below it the denominator is negative and replaced by 1: R(-0.06) = -0.057.
    assert progress_transform(-0.06, t) == pytest.approx(-0.057)
    # So two nearly equal EMAs on either side of the pole give a huge LP score.
    config = LPConfig()
    score = raw_scores(np.array([-0.05]), np.array([-0.06]), np.array([5]), config)
    assert score[0] == pytest.approx(9.443)
    # Inside [0, 1]: R(0) = 0 and R(0.5) = 1 - t; t = 0 is the identity.
    assert progress_transform(0.0, t) == 0.0
    assert progress_transform(0.5, t) == pytest.approx(0.95)
    np.testing.assert_array_equal(progress_transform(np.array([-0.3, 0.7]), 0.0), [-0.3, 0.7])


def test_sampling_probabilities_zscore_by_hand() -> None:
    # mean 0.2, population std sqrt(0.02); z = [-1/sqrt2, -1/sqrt2, sqrt2]
    p = sampling_probabilities(np.array([0.1, 0.1, 0.4]))
    np.testing.assert_allclose(p, [0.2254331125, 0.2254331125, 0.5491337751], rtol=1e-9)


def test_sampling_probabilities_std_zero_is_uniform() -> None:
    np.testing.assert_allclose(sampling_probabilities(np.full(4, 0.1)), [0.25] * 4)


def test_sampling_probabilities_two_labels_use_raw_weights() -> None:
    np.testing.assert_allclose(sampling_probabilities(np.array([0.1, 0.3])), [0.25, 0.75])
    np.testing.assert_allclose(sampling_probabilities(np.array([0.2])), [1.0])


def test_sampling_probabilities_drop_non_positive_scores() -> None:
    p = sampling_probabilities(np.array([0.0, 0.1, -1.0, 0.4, 0.1]))
    assert p[0] == 0.0 and p[2] == 0.0
    np.testing.assert_allclose(p[[1, 4, 3]], [0.2254331125, 0.2254331125, 0.5491337751])
    # Two positive scores left: proportional weights.
    np.testing.assert_allclose(sampling_probabilities(np.array([0.0, 0.1, 0.3])), [0, 0.25, 0.75])
    np.testing.assert_allclose(sampling_probabilities(np.zeros(4)), [0.25] * 4)


def test_outcome_memory_is_a_ring_buffer() -> None:
    lp = LearningProgress(2, LPConfig(memory=3))
    for reward in (0.1, 0.2, 0.3, 0.4, 1.5):
        lp.update(0, reward)
    assert lp.counts[0] == 5 and lp.n_outcomes.tolist() == [3, 0]
    assert sorted(lp.outcomes[0].tolist()) == pytest.approx([0.3, 0.4, 1.0])
    means = lp.recent_means()
    assert means[0] == pytest.approx(np.mean([0.3, 0.4, 1.0])) and np.isnan(means[1])


def test_nan_reward_is_rejected() -> None:
    with pytest.raises(ValueError):
        LearningProgress(1).update(0, float("nan"))


def _feed(n_labels: int, labels: np.ndarray, rewards: np.ndarray, config: LPConfig):
    lp = LearningProgress(n_labels, config)
    for label, reward in zip(labels, rewards, strict=True):
        lp.update(label, reward)
    return lp


@pytest.mark.parametrize("n_labels", [2, 3, 7])
def test_invariants_on_random_sequences(n_labels: int) -> None:
    rng = np.random.default_rng(n_labels)
    labels = rng.integers(0, n_labels, 400)
    rewards = rng.normal(0.4, 0.3, 400) + np.linspace(0, 0.5, 400)
    config = LPConfig(ema_timescale=0.05)
    lp = _feed(n_labels, labels, rewards, config)
    p = lp.probabilities()
    assert p.shape == (n_labels,)
    assert np.all(p >= 0) and p.sum() == pytest.approx(1.0)
    assert np.all(lp.scores() >= config.exploration_bonus)
    # Relabelling the labels relabels the probabilities: label i of A is label perm[i] of B.
    perm = rng.permutation(n_labels)
    lp_b = _feed(n_labels, perm[labels], rewards, config)
    np.testing.assert_allclose(lp_b.probabilities()[perm], p, rtol=1e-12)
    np.testing.assert_allclose(lp_b.F[perm], lp.F, rtol=1e-12)
