"""Vectorised LP replay: hand-computed replays, equality with the stepwise reference,
invariants (normalisation, relabelling, pool cap, SPS gate) and input validation."""

from __future__ import annotations

import numpy as np
import pytest

from rts_dagster.analysis.lp import LPConfig, ZScoreLPConfig
from rts_dagster.analysis.lp_replay import (
    CurriculumConfig,
    Replay,
    StepwiseCurriculum,
    cap_pool,
    evaluation_points,
    replay,
    sps_gate,
)

TIGHT = {"rtol": 1e-12, "atol": 1e-12}

# Large timescales so a few completions move the EMAs visibly (a = 0.5, b = 0.1).
MAIN_FAST = LPConfig(ema_timescale=0.5, slow_timescale_factor=0.2)
Z_FAST = ZScoreLPConfig(ema_timescale=0.5, slow_timescale_factor=0.2, min_samples_for_lp=2)

# p of sampling_probabilities for raw scores [a, b, b] with a > b (> 2 labels): the deviations
# are [2c, -c, -c], population std c sqrt(2), z = [sqrt(2), -1/sqrt(2), -1/sqrt(2)] whatever
# a and b; sigmoid = [0.8044297, 0.3302320, 0.3302320], sum 1.4648937.
ABB = [0.5491337751, 0.2254331125, 0.2254331125]


# --- helpers ------------------------------------------------------------------------------------
def _stream(
    seed: int, n: int, n_labels: int, n_seen: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random completion stream: labels n_seen.. never appear, rewards are continuous with
    negatives and values > 1, 15% exact zeros (so z-score baselines start late), label
    n_seen - 1 scores exactly 0 throughout (its F/S never leave 0), SPS with 10% NaN."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_seen, n)
    rewards = rng.normal(0.5, 0.5, n) + np.linspace(0.0, 0.4, n)
    rewards[rng.random(n) < 0.15] = 0.0
    rewards[labels == n_seen - 1] = 0.0
    first_of_0 = np.flatnonzero(labels == 0)[:3]
    rewards[first_of_0] = 0.0
    sps = rng.uniform(500.0, 1500.0, n)
    sps[rng.random(n) < 0.1] = np.nan
    assert n_seen < n_labels and (rewards < 0).any() and (rewards > 1).any()
    return labels, rewards, sps


def _stepwise(
    config: CurriculumConfig,
    labels: np.ndarray,
    rewards: np.ndarray,
    n_labels: int,
    sps: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The reference: StepwiseCurriculum fed one completion at a time, state after each."""
    curriculum = StepwiseCurriculum(config, n_labels)
    n = labels.size
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("fast", "slow", "counts", "score", "p")}
    for j in range(n):
        curriculum.update(int(labels[j]), float(rewards[j]), None if sps is None else sps[j])
        rows["fast"].append(curriculum.F.copy())
        rows["slow"].append(curriculum.S.copy())
        rows["counts"].append(curriculum.counts.copy())
        rows["score"].append(curriculum.scores())
        rows["p"].append(curriculum.probabilities(progress=j / max(n - 1, 1)))
    return {k: np.array(v) for k, v in rows.items()}


def _replay_all(
    config: CurriculumConfig,
    labels: np.ndarray,
    rewards: np.ndarray,
    n_labels: int,
    sps: np.ndarray | None = None,
) -> Replay:
    return replay(labels, rewards, n_labels, config, eval_index=np.arange(labels.size), sps=sps)


CONFIGS = {
    "main": CurriculumConfig(name="main", main=LPConfig(ema_timescale=0.3, memory=3)),
    "main_knobs": CurriculumConfig(
        name="main_knobs",
        main=LPConfig(ema_timescale=0.2, progress_smoothing=0.0, exploration_bonus=0.05),
        pool_cap=3,
        sps_weight=1.0,
        sps_ema=0.3,
    ),
    "zscore": CurriculumConfig(
        name="zscore",
        variant="zscore",
        zscore=ZScoreLPConfig(ema_timescale=0.3, min_samples_for_lp=4),
    ),
    "zscore_reweight_perf": CurriculumConfig(
        name="zscore_reweight_perf",
        variant="zscore",
        zscore=ZScoreLPConfig(
            ema_timescale=0.3,
            early_progress_amplification=0.8,
            progress_smoothing=0.05,
            performance_bonus_weight=0.5,
            min_samples_for_lp=3,
        ),
    ),
    "zscore_temperature_no_baseline": CurriculumConfig(
        name="zscore_temperature_no_baseline",
        variant="zscore",
        zscore=ZScoreLPConfig(
            ema_timescale=0.25,
            lp_score_temperature=0.2,
            use_baseline_normalization=False,
            min_samples_for_lp=5,
        ),
    ),
    "zscore_knobs": CurriculumConfig(
        name="zscore_knobs",
        variant="zscore",
        zscore=ZScoreLPConfig(ema_timescale=0.3, min_samples_for_lp=4),
        z_anneal=(30.0, 10.0),
        pool_cap=2,
        sps_weight=2.0,
        sps_ema=0.2,
    ),
}


# --- replay == stepwise reference ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [1, 2])
def test_replay_equals_stepwise_reference(name: str, seed: int) -> None:
    config = CONFIGS[name]
    n_labels = 6
    labels, rewards, sps = _stream(seed, 250, n_labels, n_seen=5)
    result = _replay_all(config, labels, rewards, n_labels, sps)
    ref = _stepwise(config, labels, rewards, n_labels, sps)
    np.testing.assert_array_equal(result.eval_index, np.arange(250))
    np.testing.assert_allclose(result.progress, np.arange(250) / 249, **TIGHT)
    np.testing.assert_array_equal(result.counts, ref["counts"])
    # assert_allclose treats NaN == NaN: main's F and S are NaN for unseen labels.
    np.testing.assert_allclose(result.fast, ref["fast"], **TIGHT)
    np.testing.assert_allclose(result.slow, ref["slow"], **TIGHT)
    np.testing.assert_allclose(result.score, ref["score"], **TIGHT)
    np.testing.assert_allclose(result.probability, ref["p"], **TIGHT)
    if config.variant == "main":
        assert np.isnan(result.fast[:, 5]).all()  # label 5 is never seen
    assert result.n_labels == n_labels


def test_replay_at_sparse_points_is_the_full_replay_subsampled() -> None:
    config = CONFIGS["zscore_knobs"]
    labels, rewards, sps = _stream(3, 200, 6, n_seen=5)
    full = _replay_all(config, labels, rewards, 6, sps)
    points = evaluation_points(200, 17)
    sparse = replay(labels, rewards, 6, config, n_eval=17, sps=sps)
    np.testing.assert_array_equal(sparse.eval_index, points)
    # z_anneal depends on the progress j / (n - 1) only, not on which points are evaluated.
    np.testing.assert_allclose(sparse.probability, full.probability[points], **TIGHT)
    np.testing.assert_allclose(sparse.fast, full.fast[points], **TIGHT)


# --- hand-computed replays ----------------------------------------------------------------------
def test_main_replay_by_hand() -> None:
    config = CurriculumConfig(name="m", main=MAIN_FAST)
    labels = np.array([0, 0, 1, 0, 1])
    rewards = np.array([0.8, 0.2, 0.5, 1.3, 0.9])
    result = _replay_all(config, labels, rewards, 3)
    # Label 0: x = 0.6 (F = S = 0.6), x = -0.6 (F = 0, S = 0.48), x = 1 (clipped: F = 0.5,
    # S = 0.532). Label 1: x = 0 (F = S = 0), x = 0.8 (F = 0.4, S = 0.08). Label 2: unseen.
    nan = np.nan
    np.testing.assert_allclose(
        result.fast,
        [[0.6, nan, nan], [0, nan, nan], [0, 0, nan], [0.5, 0, nan], [0.5, 0.4, nan]],
        atol=1e-15,
    )
    np.testing.assert_allclose(result.slow[:, 0], [0.6, 0.48, 0.48, 0.532, 0.532], rtol=1e-12)
    np.testing.assert_allclose(result.slow[:, 1], [nan, nan, 0, 0, 0.08], atol=1e-15)
    np.testing.assert_array_equal(result.counts[:, :2], [[1, 0], [2, 0], [2, 1], [3, 1], [3, 2]])
    # Scores (t = 0.05, gain 0.1, R(p) = 0.95 p / (p + 0.05 (1 - 2p))):
    #  row 1: |R(0) - R(0.48)| = 0.456/0.482 = 0.9460580913; label 1 has < 2 outcomes: 0.1;
    #  row 3: |R(0.5) - R(0.532)| + 0.1 R(0.5) = |0.95 - 0.5054/0.5288| + 0.095 = 0.1007488654;
    #  row 4: label 1: R(0.4) = 0.38/0.41 = 0.9268292683, R(0.08) = 0.076/0.122 = 0.6229508197,
    #         |diff| + 0.1*0.9268292683 = 0.3038784486 + 0.0926829268 = 0.3965613754.
    np.testing.assert_allclose(
        result.score,
        [
            [0.1, 0.1, 0.1],
            [0.9460580913, 0.1, 0.1],
            [0.9460580913, 0.1, 0.1],
            [0.1007488654, 0.1, 0.1],
            [0.1007488654, 0.3965613754, 0.1],
        ],
        rtol=1e-9,
    )
    # Probabilities: row 0 all scores equal (std 0): uniform. Rows 1-3 are [a, b, b]: ABB.
    # Row 4: raw = [0.1007488654, 0.3965613754, 0.1], mean 0.1991034136; deviations
    # [-0.0983545482, 0.1974579618, -0.0991034136], variance (0.0096736171 + 0.0389896465 +
    # 0.0098214866)/3 = 0.0194949167, std 0.1396241985; z = [-0.7044233685, 1.4142101722,
    # -0.7097868038]; sigmoid = [0.3308322408, 0.8044291492, 0.3296459505], sum 1.4649073405
    # -> p = [0.2258383392, 0.5491331274, 0.2250285335].
    np.testing.assert_allclose(result.probability[0], [1 / 3] * 3, rtol=1e-12)
    np.testing.assert_allclose(result.probability[1:4], [ABB] * 3, rtol=1e-9)
    np.testing.assert_allclose(
        result.probability[4], [0.2258383392, 0.5491331274, 0.2250285335], rtol=1e-9
    )


def test_zscore_replay_by_hand() -> None:
    config = CurriculumConfig(name="z", variant="zscore", zscore=Z_FAST)  # min_samples 2, Z 10
    labels = np.array([0, 1, 0, 0, 1])
    rewards = np.array([0.6, 0.5, 0.8, 1.0, 0.9])
    result = _replay_all(config, labels, rewards, 2)
    # Label 0: B = 0.6; x = 0 (F = S = 0), x = 0.5 (F = S = 0.5), x = 1 (F = 0.75, S = 0.55).
    # Label 1: B = 0.5; x = 0 (F = S = 0), then x = 0.4/0.5 = 0.8: F, S both 0 -> F = S = 0.8.
    np.testing.assert_allclose(
        result.fast, [[0, 0], [0, 0], [0.5, 0], [0.75, 0], [0.75, 0.8]], rtol=1e-12
    )
    np.testing.assert_allclose(
        result.slow, [[0, 0], [0, 0], [0.5, 0], [0.55, 0], [0.55, 0.8]], rtol=1e-12
    )
    np.testing.assert_allclose(result.score[:, 0], [0, 0, 0, 0.2, 0.2], atol=1e-12)
    np.testing.assert_array_equal(result.score[:, 1], 0.0)
    # Rows 0, 1: every label has < 2 completions: weights [0.1, 0.1] -> [0.5, 0.5].
    # Row 2: u = [0, 0], std 0 -> sigmoid(0) = 0.5 each; label 1 (1 completion) takes the
    #   bonus: weights [0.5, 0.1] -> [5/6, 1/6].
    # Row 3: u = [0.2, 0]: mean 0.1, std 0.1, z = [1, -1], Z = 10: sigmoid(+-10) =
    #   [0.9999546021, 0.0000453978687] (sum 1); label 1 still takes the bonus:
    #   weights [0.9999546021, 0.1], sum 1.0999546021 -> [0.9090871570, 0.0909128430].
    # Row 4: u = [0.2, 0] again and both labels have 2+ completions:
    #   [0.9999546021, 0.0000453978687].
    np.testing.assert_allclose(
        result.probability,
        [
            [0.5, 0.5],
            [0.5, 0.5],
            [5 / 6, 1 / 6],
            [0.9090871570, 0.0909128430],
            [0.9999546021, 0.0000453978687],
        ],
        rtol=1e-9,
    )


def test_main_replay_straddles_the_progress_transform_pole() -> None:
    # t = 0.05: R's denominator x + t(1 - 2x) = 0.9x + 0.05 is 0 at x = -t/(1-2t) = -0.0556.
    # Label 0 (a = 0.5, b = 0.1): r = 0.5 (x = 0, F = S = 0), then r = 0.45 (x = -0.1):
    # F = -0.05 (just above the pole), S = -0.01:
    #   R(-0.05) = -0.0475 / 0.005 = -9.5; R(-0.01) = -0.0095 / 0.041 = -0.2317073171;
    #   score = 9.2682926829 (+ 0.1 * max(-9.5, 0) = 0).
    # With r = 0.44 (x = -0.12) instead: F = -0.06 (below the pole), S = -0.012:
    #   R(-0.06) = -0.057 (denominator -0.004 -> 1); R(-0.012) = -0.0114/0.0392 = -0.2908163265;
    #   score = 0.2338163265. A 0.01 change of one reward moves the score 40-fold.
    config = CurriculumConfig(name="pole", main=MAIN_FAST)
    above = _replay_all(config, np.array([0, 0]), np.array([0.5, 0.45]), 3)
    below = _replay_all(config, np.array([0, 0]), np.array([0.5, 0.44]), 3)
    assert above.fast[-1, 0] == pytest.approx(-0.05) and below.fast[-1, 0] == pytest.approx(-0.06)
    assert above.score[-1, 0] == pytest.approx(9.2682926829, rel=1e-9)
    assert below.score[-1, 0] == pytest.approx(0.2338163265, rel=1e-9)
    # Both rows are [a, 0.1, 0.1] with a > 0.1: the sigmoid-of-z-score split is ABB either way.
    np.testing.assert_allclose(above.probability[-1], ABB, rtol=1e-9)
    np.testing.assert_allclose(below.probability[-1], ABB, rtol=1e-9)


def test_main_replay_fewer_than_two_outcomes_scores_the_bonus() -> None:
    # One completion each (x = 1 and x = -1): F is extreme but the score is the bonus 0.1.
    config = CurriculumConfig(name="m", main=MAIN_FAST)
    result = _replay_all(config, np.array([0, 1]), np.array([1.0, 0.0]), 3)
    np.testing.assert_array_equal(result.fast[-1, :2], [1.0, -1.0])
    np.testing.assert_array_equal(result.score, np.full((2, 3), 0.1))
    np.testing.assert_allclose(result.probability, np.full((2, 3), 1 / 3), rtol=1e-12)
    # memory = 1 keeps at most one outcome: every label scores the bonus for good.
    one = CurriculumConfig(name="m1", main=LPConfig(ema_timescale=0.5, memory=1))
    result = _replay_all(one, np.array([0, 0, 0, 1]), np.array([1.0, 0.0, 0.3, 0.7]), 3)
    np.testing.assert_array_equal(result.score, np.full((4, 3), 0.1))


def test_main_replay_equal_raw_scores_give_uniform() -> None:
    # Both labels: rewards 0 then 0 -> F = S = -1, LP = 0, score = the 0.1 floor. Std of the
    # scores [0.1, 0.1, 0.1] is 0: no z-score, uniform.
    config = CurriculumConfig(name="m", main=MAIN_FAST)
    result = _replay_all(config, np.array([0, 1, 0, 1]), np.zeros(4), 3)
    np.testing.assert_array_equal(result.score[-1], [0.1, 0.1, 0.1])
    np.testing.assert_allclose(result.probability[-1], [1 / 3] * 3, rtol=1e-12)


def test_sps_gated_replay_by_hand() -> None:
    # memory = 1 keeps every main score at the bonus: the LP distribution is uniform, so the
    # probabilities show the SPS gate alone (gamma = 1, sps_ema = 0.5).
    config = CurriculumConfig(name="sps", main=LPConfig(memory=1), sps_weight=1.0, sps_ema=0.5)
    labels = np.array([0, 1, 2, 0, 1])
    sps = np.array([100.0, 200.0, 300.0, 300.0, np.nan])
    result = _replay_all(config, labels, np.full(5, 0.5), 3, sps)
    # Row 0: SPS [100, -, -]: mean of known 100, ratios [1, 1 (none), 1]: uniform.
    # Row 1: [100, 200, -]: mean 150, ratios [2/3, 4/3, 1], sum 3: [2/9, 4/9, 3/9].
    # Row 2: [100, 200, 300]: mean 200, ratios [0.5, 1, 1.5]: [1/6, 1/3, 1/2].
    # Row 3: label 0's EMA 0.5*300 + 0.5*100 = 200: [200, 200, 300], mean 700/3,
    #        ratios [6/7, 6/7, 9/7], sum 3: [2/7, 2/7, 3/7].
    # Row 4: a NaN SPS sample is skipped: unchanged.
    expected = [
        [1 / 3, 1 / 3, 1 / 3],
        [2 / 9, 4 / 9, 3 / 9],
        [1 / 6, 1 / 3, 1 / 2],
        [2 / 7, 2 / 7, 3 / 7],
        [2 / 7, 2 / 7, 3 / 7],
    ]
    np.testing.assert_allclose(result.probability, expected, rtol=1e-12)


# --- the knobs on their own ---------------------------------------------------------------------
def test_sps_gate_gamma_one_by_hand() -> None:
    p = np.array([0.5, 0.3, 0.2])
    # mean SPS 200, ratios [0.5, 1, 1.5]: weights [0.25, 0.3, 0.3], sum 0.85
    # -> [0.2941176471, 0.3529411765, 0.3529411765].
    expected = [0.25 / 0.85, 0.3 / 0.85, 0.3 / 0.85]
    np.testing.assert_allclose(sps_gate(p, np.array([100.0, 200.0, 300.0]), 1.0), expected)
    # A NaN SPS keeps factor 1 and is left out of the mean: [100, NaN, 300] has mean 200 too.
    np.testing.assert_allclose(sps_gate(p, np.array([100.0, np.nan, 300.0]), 1.0), expected)
    # [NaN, 100, 300]: mean 200, ratios [1, 0.5, 1.5]: [0.5, 0.15, 0.3] / 0.95.
    np.testing.assert_allclose(
        sps_gate(p, np.array([np.nan, 100.0, 300.0]), 1.0), [0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]
    )
    # No SPS at all: unchanged.
    np.testing.assert_allclose(sps_gate(p, np.full(3, np.nan), 1.0), p, rtol=1e-15)


def test_cap_pool_keeps_the_k_largest() -> None:
    p = np.array([0.1, 0.4, 0.2, 0.3])
    np.testing.assert_allclose(cap_pool(p, 2), [0, 4 / 7, 0, 3 / 7])
    np.testing.assert_array_equal(cap_pool(p, 4), p)
    # Labels tied with the k-th largest weight all stay: no decision by label order.
    np.testing.assert_array_equal(cap_pool(np.full(4, 0.25), 2), [0.25] * 4)
    np.testing.assert_allclose(
        cap_pool(np.array([0.1, 0.4, 0.25, 0.25]), 2), [0, 0.4 / 0.9, 0.25 / 0.9, 0.25 / 0.9]
    )


def test_sps_weight_zero_equals_no_sps() -> None:
    labels, rewards, sps = _stream(4, 150, 6, n_seen=5)
    for config in (CONFIGS["main"], CONFIGS["zscore"]):
        with_sps = _replay_all(config, labels, rewards, 6, sps)
        without = _replay_all(config, labels, rewards, 6)
        np.testing.assert_array_equal(with_sps.probability, without.probability)
    # And a non-zero sps_weight without an SPS array changes nothing either.
    gated = CONFIGS["zscore"].model_copy(update={"sps_weight": 2.0})
    np.testing.assert_array_equal(
        _replay_all(gated, labels, rewards, 6).probability,
        _replay_all(CONFIGS["zscore"], labels, rewards, 6).probability,
    )


@pytest.mark.parametrize("name", ["main_knobs", "zscore_knobs"])
def test_pool_cap_leaves_at_most_k_labels(name: str) -> None:
    config = CONFIGS[name]
    labels, rewards, sps = _stream(5, 300, 6, n_seen=5)
    result = _replay_all(config, labels, rewards, 6, sps)
    k = config.pool_cap
    assert k is not None
    kept = (result.probability > 0).sum(axis=1)
    uncapped = _replay_all(config.model_copy(update={"pool_cap": None}), labels, rewards, 6, sps)
    ranked = -np.sort(-uncapped.probability, axis=1)
    tied_at_cut = ranked[:, k - 1] == ranked[:, k]
    assert ((kept <= k) | tied_at_cut).all()
    assert (kept[~tied_at_cut] <= k).all() and (~tied_at_cut).sum() > 100


# --- invariants ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_rows_are_distributions(name: str) -> None:
    labels, rewards, sps = _stream(6, 300, 7, n_seen=6)
    result = _replay_all(CONFIGS[name], labels, rewards, 7, sps)
    assert (result.probability >= 0).all()
    np.testing.assert_allclose(result.probability.sum(axis=1), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["main", "zscore", "zscore_reweight_perf", "main_knobs"])
def test_relabelling_permutes_probability_columns(name: str) -> None:
    config = CONFIGS[name].model_copy(update={"pool_cap": None, "sps_weight": 0.0})
    n_labels = 6
    labels, rewards, _ = _stream(7, 300, n_labels, n_seen=5)
    perm = np.random.default_rng(7).permutation(n_labels)
    a = _replay_all(config, labels, rewards, n_labels)
    b = _replay_all(config, perm[labels], rewards, n_labels)
    # Label i of stream A is label perm[i] of stream B.
    np.testing.assert_allclose(b.probability[:, perm], a.probability, **TIGHT)
    np.testing.assert_allclose(b.fast[:, perm], a.fast, **TIGHT)
    np.testing.assert_array_equal(b.counts[:, perm], a.counts)


@pytest.mark.parametrize("name", ["main_knobs", "zscore_knobs"])
def test_relabelling_with_pool_cap(name: str) -> None:
    # cap_pool keeps every label tied at the cut, so relabelling permutes the columns
    # exactly, ties included (exploration bonuses make exact ties common).
    config = CONFIGS[name]
    n_labels = 6
    labels, rewards, sps = _stream(8, 300, n_labels, n_seen=5)
    perm = np.random.default_rng(8).permutation(n_labels)
    a = _replay_all(config, labels, rewards, n_labels, sps)
    b = _replay_all(config, perm[labels], rewards, n_labels, sps)
    np.testing.assert_allclose(b.probability[:, perm], a.probability, **TIGHT)


# --- evaluation points --------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "n_eval"), [(10, 4), (10, 400), (1000, 7), (401, 400), (2, 2)])
def test_evaluation_points(n: int, n_eval: int) -> None:
    points = evaluation_points(n, n_eval)
    assert points[0] == 0 and points[-1] == n - 1
    assert (np.diff(points) > 0).all()
    assert points.size == min(n_eval, n)
    assert points.dtype == np.int64


def test_evaluation_points_examples() -> None:
    np.testing.assert_array_equal(evaluation_points(10, 4), [0, 3, 6, 9])  # 0, 3, 6, 9 exactly
    np.testing.assert_array_equal(evaluation_points(5), np.arange(5))
    np.testing.assert_array_equal(evaluation_points(1, 5), [0])
    with pytest.raises(ValueError, match="empty"):
        evaluation_points(0)


def test_evaluation_points_single_point_is_the_last_completion() -> None:
    assert evaluation_points(10, 1).tolist() == [9]


# --- validation ---------------------------------------------------------------------------------
MAIN = CurriculumConfig(name="main")


def test_label_out_of_range_names_the_completion() -> None:
    with pytest.raises(ValueError, match=r"completion 2: label_index 3 not in \[0, 3\)"):
        replay(np.array([0, 1, 3, 5]), np.zeros(4), 3, MAIN)
    with pytest.raises(ValueError, match=r"completion 1: label_index -1 not in \[0, 3\)"):
        replay(np.array([0, -1]), np.zeros(2), 3, MAIN)


def test_non_finite_reward_names_the_completion() -> None:
    with pytest.raises(ValueError, match="completion 1: reward nan is not finite"):
        replay(np.array([0, 1, 2]), np.array([0.5, np.nan, np.inf]), 3, MAIN)
    with pytest.raises(ValueError, match="completion 2: reward -inf is not finite"):
        replay(np.array([0, 1, 2]), np.array([0.5, 0.1, -np.inf]), 3, MAIN)


def test_empty_or_malformed_streams_are_rejected() -> None:
    with pytest.raises(ValueError, match="the stream is empty"):
        replay(np.array([], dtype=np.int64), np.array([]), 3, MAIN)
    with pytest.raises(ValueError, match="same length"):
        replay(np.array([0, 1, 2]), np.zeros(2), 3, MAIN)
    with pytest.raises(ValueError, match="must hold integers"):
        replay(np.array([0.0, 1.0]), np.zeros(2), 3, MAIN)
    with pytest.raises(ValueError, match="n_labels must be >= 1"):
        replay(np.array([0]), np.zeros(1), 0, MAIN)


@pytest.mark.parametrize("eval_index", [[0, 2, 2], [3, 1], [-1, 2], [0, 4], []])
def test_bad_eval_index_is_rejected(eval_index: list[int]) -> None:
    with pytest.raises(ValueError, match="eval_index"):
        replay(np.arange(4) % 2, np.zeros(4), 2, MAIN, eval_index=np.array(eval_index))


def test_bad_eval_index_message_names_the_entry() -> None:
    with pytest.raises(ValueError, match=r"eval_index\[2\]"):
        replay(np.arange(4) % 2, np.zeros(4), 2, MAIN, eval_index=np.array([0, 2, 2]))


def test_length_mismatch_message_names_the_lengths() -> None:
    with pytest.raises(ValueError, match=r"3.*2"):
        replay(np.array([0, 1, 2]), np.zeros(2), 3, MAIN)


def test_sps_of_the_wrong_length_is_rejected() -> None:
    config = CurriculumConfig(name="s", sps_weight=1.0)
    with pytest.raises(ValueError):
        replay(np.array([0, 1, 0]), np.array([0.1, 0.2, 0.3]), 2, config, sps=np.ones(5))


def test_z_anneal_needs_the_zscore_variant() -> None:
    # pydantic's ValidationError is a ValueError.
    with pytest.raises(ValueError, match="z_anneal applies to the zscore variant only"):
        CurriculumConfig(name="bad", z_anneal=(30.0, 10.0), variant="main")
    assert CurriculumConfig(name="ok", z_anneal=(30.0, 10.0), variant="zscore").z_anneal == (
        30.0,
        10.0,
    )


# --- disagreements between replay and the stepwise reference (reported, not fixed) ------------
def test_replay_restarts_emas_when_f_and_s_return_to_zero() -> None:
    # a = 0.5, b = 0.5 * 0.5 = 0.25, x = r: r = 1 -> F = S = 1;
    # r = -7 -> F = -3.5 + 0.5 = -3, S = -1.75 + 0.75 = -1;
    # r = 3 -> F = 1.5 - 1.5 = 0, S = 0.75 - 0.75 = 0 (both exactly 0 in binary);
    # r = 0.5 -> F and S both exactly 0: F = S = 0.5 and T = 0.5 (DOMAIN.md step 2).
    # replay gives F = 0.25, S = 0.125 (it continues the EMA).
    zscore = ZScoreLPConfig(
        ema_timescale=0.5, slow_timescale_factor=0.5, use_baseline_normalization=False
    )
    config = CurriculumConfig(name="rezero", variant="zscore", zscore=zscore)
    labels, rewards = np.zeros(4, dtype=np.int64), np.array([1.0, -7.0, 3.0, 0.5])
    ref = _stepwise(config, labels, rewards, 1)
    assert (ref["fast"][-1, 0], ref["slow"][-1, 0]) == (0.5, 0.5)  # the reference follows DOMAIN.md
    result = _replay_all(config, labels, rewards, 1)
    assert (result.fast[-1, 0], result.slow[-1, 0]) == (0.5, 0.5)


def test_replay_and_stepwise_agree_on_an_infinite_sps_sample() -> None:
    config = CurriculumConfig(name="s", sps_weight=1.0)
    labels = np.array([0, 1, 0, 1, 2])
    rewards = np.array([0.1, 0.5, 0.3, 0.9, 0.4])
    sps = np.array([100.0, np.inf, 200.0, 50.0, 80.0])
    ref = _stepwise(config, labels, rewards, 3, sps)
    result = _replay_all(config, labels, rewards, 3, sps)
    np.testing.assert_allclose(result.probability, ref["p"], **TIGHT)


def test_stepwise_deviation_is_rounding_only() -> None:
    from rts_dagster.analysis.lp_replay import stepwise_deviation

    labels, rewards, sps = _stream(21, 600, 6, n_seen=5)
    for name in ("main", "zscore_knobs"):
        assert stepwise_deviation(labels, rewards, 6, CONFIGS[name], sps=sps, limit=400) <= 1e-12
