"""Metta main's bidirectional LP: hand-computed values and invariants."""

from __future__ import annotations

import numpy as np
import pytest

from rts_dagster.analysis.lp import (
    LearningProgress,
    LPConfig,
    ZScoreLearningProgress,
    ZScoreLPConfig,
    progress_transform,
    raw_scores,
    reweight,
    sampling_probabilities,
    zscore_lp,
    zscore_probabilities,
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


def test_sampling_probabilities_two_labels_take_the_sigmoid_of_raw_scores() -> None:
    # No z-score with <= 2 labels: sigmoid(0.1) = 0.5249791875, sigmoid(0.3) = 0.5744425168;
    # sum 1.0994217043 -> [0.4775048, 0.5224952]
    np.testing.assert_allclose(
        sampling_probabilities(np.array([0.1, 0.3])), [0.4775048, 0.5224952], rtol=1e-6
    )
    np.testing.assert_allclose(sampling_probabilities(np.array([0.2])), [1.0])


def test_sampling_probabilities_drop_non_positive_scores() -> None:
    p = sampling_probabilities(np.array([0.0, 0.1, -1.0, 0.4, 0.1]))
    assert p[0] == 0.0 and p[2] == 0.0
    np.testing.assert_allclose(p[[1, 4, 3]], [0.2254331125, 0.2254331125, 0.5491337751])
    # Two positive scores left: sigmoid of the raw scores, the dropped one stays at 0.
    np.testing.assert_allclose(
        sampling_probabilities(np.array([0.0, 0.1, 0.3])), [0, 0.4775048, 0.5224952], rtol=1e-6
    )
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


# --- the z-score-amplification variant (branch msb_curr_min_v2) ---------------------------------
# a = 0.5, b = a * 0.2 = 0.1 so two or three completions move F and S visibly.
ZFAST = ZScoreLPConfig(ema_timescale=0.5, slow_timescale_factor=0.2)

# sqrt(1.5): the population z-score of any u = [m + c, m, m - c] is [sqrt(1.5), 0, -sqrt(1.5)]
# (mean m, variance 2c^2/3, so z = c / (c sqrt(2/3)) = sqrt(1.5)).
SQRT_1_5 = 1.224744871391589
# sigmoid(10 sqrt(1.5)) = 1 / (1 + exp(-12.24744871)) = 1 / (1 + 4.797341182e-06)
SIG_10_SQRT_1_5 = 0.9999952026818323


def _zfeed(n_labels: int, completions: list[tuple[int, float]], config: ZScoreLPConfig):
    lp = ZScoreLearningProgress(n_labels, config)
    for label, reward in completions:
        lp.update(label, reward)
    return lp


def test_zscore_defaults_match_the_branch() -> None:
    c = ZScoreLPConfig()
    assert (c.ema_timescale, c.slow_timescale_factor, c.exploration_bonus) == (0.1, 0.2, 0.1)
    assert (c.progress_smoothing, c.performance_bonus_weight, c.lp_score_temperature) == (0, 0, 0)
    assert (c.z_score_amplification, c.early_progress_amplification) == (10.0, 0.5)
    assert c.use_baseline_normalization is True and c.min_samples_for_lp == 10
    assert c.slow_timescale == pytest.approx(0.02)


def test_zscore_first_score_below_cap_sets_baseline_and_zero_x() -> None:
    lp = _zfeed(2, [(0, 0.6)], ZFAST)
    # B = min(0.6, 0.75) = 0.6; x = max(0.6 - 0.6, 0) / 0.4 = 0, so F = S = 0 and T = r = 0.6.
    assert lp.B[0] == 0.6 and lp.F[0] == 0.0 and lp.S[0] == 0.0 and lp.T[0] == 0.6
    assert lp.counts.tolist() == [1, 0] and lp.B[1] == 0.0


def test_zscore_first_score_above_cap_uses_capped_baseline() -> None:
    lp = _zfeed(1, [(0, 0.9)], ZFAST)
    # B = min(0.9, 0.75) = 0.75; x = (0.9 - 0.75) / (1 - 0.75) = 0.15 / 0.25 = 0.6 = F = S.
    assert lp.B[0] == 0.75
    assert (lp.F[0], lp.S[0], lp.T[0]) == pytest.approx((0.6, 0.6, 0.9), rel=1e-12)


def test_zscore_emas_start_at_first_non_zero_x_then_update() -> None:
    lp = _zfeed(1, [(0, 0.6)], ZFAST)  # B = 0.6, x = 0: F = S = 0, T = 0.6
    lp.update(0, 0.8)
    # B stays 0.6; x = 0.2 / 0.4 = 0.5. F and S are both exactly 0, so F = S = 0.5, T = 0.8.
    assert (lp.F[0], lp.S[0], lp.T[0]) == pytest.approx((0.5, 0.5, 0.8), rel=1e-12)
    lp.update(0, 1.0)
    # x = 0.4 / 0.4 = 1: F = 0.5*1 + 0.5*0.5 = 0.75; S = 0.1*1 + 0.9*0.5 = 0.55;
    # T = 0.5*1.0 + 0.5*0.8 = 0.9; LP = |0.75 - 0.55| = 0.2 (theta = 0.5: no reweighting).
    assert (lp.F[0], lp.S[0], lp.T[0]) == pytest.approx((0.75, 0.55, 0.9), rel=1e-12)
    assert lp.scores()[0] == pytest.approx(0.2, rel=1e-12)
    assert lp.B[0] == 0.6 and lp.counts[0] == 3


def test_zscore_first_zero_score_leaves_baseline_unset() -> None:
    lp = _zfeed(1, [(0, 0.0)], ZFAST)
    # B = min(0, 0.75) = 0 ("still unset"); x = 0 / 1 = 0; F = S = T = 0.
    assert (lp.B[0], lp.F[0], lp.S[0], lp.T[0]) == (0.0, 0.0, 0.0, 0.0)
    lp.update(0, 0.4)  # B is 0, so it is set now: B = 0.4, x = 0; T = r = 0.4 (F, S still 0)
    assert (lp.B[0], lp.F[0], lp.S[0], lp.T[0]) == (0.4, 0.0, 0.0, 0.4)
    lp.update(0, 0.7)  # x = 0.3 / 0.6 = 0.5: F = S = 0.5, T = 0.7
    assert (lp.F[0], lp.S[0], lp.T[0]) == pytest.approx((0.5, 0.5, 0.7), rel=1e-12)


def test_zscore_negative_first_score_is_a_negative_baseline() -> None:
    lp = _zfeed(1, [(0, -0.5)], ZFAST)
    # B = min(-0.5, 0.75) = -0.5 (non-zero: kept for good); x = max(0, 0) / 1.5 = 0.
    assert lp.B[0] == -0.5 and lp.F[0] == 0.0
    lp.update(0, 1.0)  # x = (1 + 0.5) / (1 + 0.5) = 1: F = S = 1
    lp.update(0, 0.25)  # x = 0.75 / 1.5 = 0.5: F = 0.25 + 0.5 = 0.75; S = 0.05 + 0.9 = 0.95
    assert lp.B[0] == -0.5
    assert (lp.F[0], lp.S[0]) == pytest.approx((0.75, 0.95), rel=1e-12)


def test_zscore_without_baseline_normalisation_x_is_the_raw_score() -> None:
    config = ZScoreLPConfig(ema_timescale=0.5, use_baseline_normalization=False)
    lp = _zfeed(2, [(0, 1.5), (1, -0.5)], config)
    # x = r, neither clipped nor normalised: F = S = 1.5 and F = S = -0.5; B never moves.
    assert (lp.F.tolist(), lp.S.tolist(), lp.B.tolist()) == ([1.5, -0.5], [1.5, -0.5], [0, 0])
    lp.update(0, -0.5)
    # F = 0.5*-0.5 + 0.5*1.5 = 0.5; S = 0.1*-0.5 + 0.9*1.5 = 1.3; T = 0.5*-0.5 + 0.5*1.5 = 0.5
    assert (lp.F[0], lp.S[0], lp.T[0]) == pytest.approx((0.5, 1.3, 0.5), rel=1e-12)
    assert lp.scores()[0] == pytest.approx(0.8, rel=1e-12)


def test_zscore_probabilities_by_hand_z10() -> None:
    # u = |F - S| = [0.5, 0.25, 0]: mean 0.25, population std sqrt((0.0625*2)/3) = 0.2041241,
    # z = [sqrt(1.5), 0, -sqrt(1.5)]; Z = 10: u = [12.2474487, 0, -12.2474487].
    # sigmoid: [0.9999952027, 0.5, 0.0000047973]; their sum is exactly 1.5
    # (sigmoid(a) + sigmoid(-a) = 1), so p = [0.9999952027/1.5, 1/3, 0.0000047973/1.5].
    fast = np.array([0.75, 0.5, 0.25])
    slow = np.full(3, 0.25)
    p = zscore_probabilities(fast, slow, np.zeros(3), np.full(3, 10), ZScoreLPConfig())
    expected = [SIG_10_SQRT_1_5 / 1.5, 1 / 3, (1 - SIG_10_SQRT_1_5) / 1.5]
    np.testing.assert_allclose(p, expected, rtol=1e-9, atol=1e-15)
    assert p[2] == pytest.approx(3.1982121e-06, rel=1e-7)
    # Z = 1 through `amplification`: sigmoid(1.2247449) = 0.7728975, p = [0.5152650, 1/3, 0.1514017]
    p1 = zscore_probabilities(fast, slow, np.zeros(3), np.full(3, 10), ZScoreLPConfig(), 1.0)
    np.testing.assert_allclose(p1, [0.5152649870, 1 / 3, 0.1514016796], rtol=1e-9)


def test_zscore_probabilities_annealed_z_is_one_per_row() -> None:
    fast = np.tile([0.75, 0.5, 0.25], (2, 1))
    slow = np.full((2, 3), 0.25)
    p = zscore_probabilities(
        fast, slow, np.zeros((2, 3)), np.full((2, 3), 10), ZScoreLPConfig(), np.array([10.0, 1.0])
    )
    # Same rows as the two cases above: row 0 with Z = 10, row 1 with Z = 1.
    np.testing.assert_allclose(p[0], [SIG_10_SQRT_1_5 / 1.5, 1 / 3, (1 - SIG_10_SQRT_1_5) / 1.5])
    np.testing.assert_allclose(p[1], [0.5152649870, 1 / 3, 0.1514016796], rtol=1e-9)


def test_zscore_stepwise_mix_of_bonus_and_lp_weights_by_hand() -> None:
    config = ZScoreLPConfig(ema_timescale=0.5, min_samples_for_lp=2)
    completions = [(0, 0.6), (0, 0.8), (0, 1.0), (1, 0.6), (1, 0.8), (1, 0.9), (2, 0.3)]
    lp = _zfeed(3, completions, config)
    # Label 0: as above, F = 0.75, S = 0.55, LP = 0.2 (3 completions).
    # Label 1: B = 0.6; x = 0 then 0.5 (F = S = 0.5) then 0.3/0.4 = 0.75:
    #   F = 0.375 + 0.25 = 0.625, S = 0.075 + 0.45 = 0.525, LP = 0.1 (3 completions).
    # Label 2: B = 0.3, x = 0, F = S = 0, LP = 0 but 1 completion < 2: weight = bonus 0.1.
    np.testing.assert_allclose(lp.scores(), [0.2, 0.1, 0.0], atol=1e-12)
    # u = [0.2, 0.1, 0] -> z = [sqrt(1.5), 0, -sqrt(1.5)], Z = 10:
    # p = [0.9999952027/1.5, 1/3, 0.0000047973/1.5] = [0.6666634685, 0.3333333333, 0.0000031982]
    # weights = [0.6666634685, 0.3333333333, 0.1] (label 2 takes the bonus), sum 1.0999968018
    # -> [0.6060594607, 0.3030311841, 0.0909093552]
    np.testing.assert_allclose(
        lp.probabilities(), [0.6060594607, 0.3030311841, 0.0909093552], rtol=1e-9
    )


def test_zscore_all_labels_below_min_samples_is_uniform() -> None:
    lp = _zfeed(3, [(0, 0.6), (0, 0.8), (0, 1.0)], ZFAST)  # min_samples_for_lp = 10
    np.testing.assert_allclose(lp.probabilities(), [1 / 3] * 3, rtol=1e-12)


def test_zscore_equal_u_is_not_zscored_and_gives_uniform() -> None:
    # progress_smoothing 0.3 and F = S: u = [0.3, 0.3, 0.3], std 0 -> u kept, sigmoid(0.3) each.
    config = ZScoreLPConfig(progress_smoothing=0.3, min_samples_for_lp=0)
    p = zscore_probabilities(np.full(3, 0.4), np.full(3, 0.4), np.zeros(3), np.zeros(3), config)
    np.testing.assert_allclose(p, [1 / 3] * 3, rtol=1e-12)


def test_zscore_tiny_std_leaves_u_unscaled() -> None:
    # u = [2e-11, 0, 0]: population std = 2e-11 * sqrt(2)/3 = 9.4e-12 <= 1e-10, so u is not
    # z-scored (z-scoring would give z = sqrt(2) * 10 and p[0] ~ 1): p = sigmoid(u) / sum, and
    # sigmoid(2e-11) = 0.5 + 5e-12, sum 1.5 + 5e-12, so p = [1/3 + 2.2e-12, 1/3 - 1.1e-12, ...].
    config = ZScoreLPConfig(min_samples_for_lp=0)
    p = zscore_probabilities(np.array([2e-11, 0, 0]), np.zeros(3), np.zeros(3), np.zeros(3), config)
    np.testing.assert_allclose(p, [1 / 3] * 3, rtol=1e-10)
    assert p[0] > p[1] == p[2]


def test_zscore_temperature_divides_u_instead_of_zscoring() -> None:
    # u = [0.25, 0, 0] / 0.5 = [0.5, 0, 0]; sigmoid(0.5) = 0.6224593312, sigmoid(0) = 0.5;
    # sum = 1.6224593312: p = [0.3836517312, 0.3081741344, 0.3081741344].
    config = ZScoreLPConfig(lp_score_temperature=0.5, min_samples_for_lp=0)
    fast = np.array([0.5, 0.25, 0.25])
    p = zscore_probabilities(fast, np.full(3, 0.25), np.zeros(3), np.zeros(3), config)
    np.testing.assert_allclose(p, [0.3836517312, 0.3081741344, 0.3081741344], rtol=1e-9)


def test_zscore_performance_bonus_and_smoothing_enter_u() -> None:
    # u = LP + 0.1 + 2 T = [0.25 + 0.1 + 0.4, 0 + 0.1 - 0.2] = [0.75, -0.1]; temperature 1:
    # sigmoid = [0.6791786992, 0.4750208125], sum 1.1541995117 -> [0.5884413330, 0.4115586670]
    config = ZScoreLPConfig(
        progress_smoothing=0.1,
        performance_bonus_weight=2.0,
        lp_score_temperature=1.0,
        min_samples_for_lp=0,
    )
    fast, slow, perf = np.array([0.5, 0.25]), np.array([0.25, 0.25]), np.array([0.2, -0.1])
    p = zscore_probabilities(fast, slow, perf, np.zeros(2), config)
    np.testing.assert_allclose(p, [0.5884413330, 0.4115586670], rtol=1e-9)


def test_reweight_by_hand() -> None:
    theta = 0.25
    # R(0.5) = 0.5*0.75 / (0.5 + 0.25*0) = 0.75; R(0.25) = 0.1875 / (0.25 + 0.125) = 0.5;
    # R(1) = 0.75 / (1 - 0.25) = 1; R(0) = 0. Inputs are clipped to [0, 1] first.
    np.testing.assert_allclose(
        reweight(np.array([0.5, 0.25, 1.0, 0.0, 1.5, -0.3]), theta), [0.75, 0.5, 1, 0, 1, 0]
    )
    config = ZScoreLPConfig(early_progress_amplification=theta)
    # LP = |R(clip 1.5) - R(clip -0.3)| = |1 - 0| = 1, and |0.75 - 0.5| = 0.25.
    np.testing.assert_allclose(
        zscore_lp(np.array([1.5, 0.5]), np.array([-0.3, 0.25]), config), [1.0, 0.25]
    )
    # theta = 0.5 is "off": |F - S| of the unclipped values, 1.8 and 0.25.
    np.testing.assert_allclose(
        zscore_lp(np.array([1.5, 0.5]), np.array([-0.3, 0.25]), ZScoreLPConfig()), [1.8, 0.25]
    )


def test_reweight_tiny_denominator_branch() -> None:
    # theta = 1: denominator p + (1 - 2p) = 1 - p, R = p*0/(1 - p) = 0 for p < 1; at p = 1 the
    # denominator is 0 (< 1e-10) and p >= 0.5, so R = 1. 1 - 5e-11 is inside the branch (1),
    # 1 - 2e-10 is outside (0 / 2e-10 = 0).
    np.testing.assert_array_equal(
        reweight(np.array([1.0, 1.2, 1 - 5e-11, 1 - 2e-10, 0.7]), 1.0), [1, 1, 1, 0, 0]
    )
    # theta = 0: denominator p, R = p/p = 1 for p > 0; at p = 0 (and below, clipped) the branch
    # gives 0 (p < 0.5). 5e-11 is inside the branch (0), 2e-10 outside (1).
    np.testing.assert_array_equal(
        reweight(np.array([0.0, -0.4, 5e-11, 2e-10, 0.3]), 0.0), [0, 0, 0, 1, 1]
    )
    # LP with theta = 1: |R(1) - R(0.9)| = 1; theta = 0: |R(0.3) - R(0)| = 1.
    config1 = ZScoreLPConfig(early_progress_amplification=1.0)
    config0 = ZScoreLPConfig(early_progress_amplification=0.0)
    assert zscore_lp(np.array([1.0]), np.array([0.9]), config1)[0] == 1.0
    assert zscore_lp(np.array([0.3]), np.array([0.0]), config0)[0] == 1.0


def test_zscore_stepwise_with_reweighting() -> None:
    config = ZScoreLPConfig(ema_timescale=0.5, early_progress_amplification=0.25)
    lp = _zfeed(1, [(0, 0.6), (0, 0.8), (0, 1.0)], config)  # F = 0.75, S = 0.55
    # R(0.75) = 0.5625 / (0.75 + 0.25*-0.5) = 0.5625 / 0.625 = 0.9;
    # R(0.55) = 0.4125 / (0.55 + 0.25*-0.1) = 0.4125 / 0.525 = 0.7857142857; LP = 0.1142857143
    assert lp.scores()[0] == pytest.approx(0.1142857143, rel=1e-9)


def test_zscore_nan_reward_is_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        ZScoreLearningProgress(1).update(0, float("nan"))
