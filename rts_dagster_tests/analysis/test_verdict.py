"""The verdict rules: one decision per task from evidence that may conflict."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from statsmodels.stats.power import TTestPower

from rts_dagster.analysis.verdict import Evidence, closed_loop_reading, decide, seeds_needed


@pytest.mark.parametrize("effect,sd", [(0.1, 0.1), (0.05, 0.1), (0.3, 0.2), (0.03, 0.05)])
def test_seeds_needed_matches_statsmodels_power(effect, sd):
    # paired t test = one-sample t test on the differences
    reference = TTestPower().solve_power(effect_size=effect / sd, alpha=0.05, power=0.8)
    assert seeds_needed(effect, sd) == max(2, math.ceil(reference))


def test_seeds_needed_is_none_when_unknowable():
    assert seeds_needed(0.0, 1.0) is None
    assert seeds_needed(math.nan, 1.0) is None
    assert seeds_needed(0.001, 1.0) is None  # > 50 seeds


def _replay(supports=True, direction=-1, est=0.2, low=0.05, high=0.35):
    return Evidence(
        "replay",
        "replay winner",
        supports,
        proposal="ema_timescale=0.0003",
        config="main_ema_0.0003",
        metric="log_snr_ratio",
        estimate=est,
        low=low,
        high=high,
        n=3,
        sd=0.05,
        better=1,
        direction=direction,
    )


def _closed(low, high, metric="competence_final", config="main_ema_0.0003", better=1):
    return Evidence(
        "closed_loop",
        "closed loop",
        None,
        config=config,
        metric=metric,
        estimate=(low + high) / 2,
        low=low,
        high=high,
        n=3,
        sd=0.02,
        better=better,
    )


def test_epoch_only_data_never_changes_a_setting():
    data = Evidence("data", "epoch means only", None, metric="granularity")
    v = decide("t", [data], n_runs=3)
    assert v.action == "keep_default" and v.confidence == "none"
    assert "RewardStreamRecorder" in v.settle_with.reason


def test_closed_loop_reading_puts_competence_first():
    harm = _closed(-0.07, -0.001)
    good = _closed(0.002, 0.016)
    reward_down = _closed(-0.05, -0.03, metric="final_reward")
    slower = _closed(2.0, 9.0, metric="time_to_competence", better=-1)
    assert closed_loop_reading([]) is None
    assert closed_loop_reading([harm]) == "harmful"
    assert closed_loop_reading([slower]) == "harmful"
    assert closed_loop_reading([good]) == "helpful"
    # competence up while the secondary final reward falls: mixed, not harmful
    assert closed_loop_reading([good, reward_down]) == "mixed"
    assert closed_loop_reading([reward_down]) == "inconclusive"
    # higher final competence but slower to get there: mixed
    assert closed_loop_reading([good, slower]) == "mixed"


def test_replay_winner_harmful_in_closed_loop_keeps_default_and_names_the_experiment():
    v = decide("t", [_replay(), _closed(-0.07, -0.001)], n_runs=3)
    assert (v.action, v.confidence, v.conflict) == ("keep_default", "low", True)
    assert v.settle_with.arms == ("metta_default", "ema_timescale=0.0003")
    # sized on final competence, the pre-declared outcome
    assert v.settle_with.seeds_per_arm == seeds_needed(-0.0355, 0.02)


def test_replay_winner_confirmed_in_closed_loop_is_a_confident_change():
    v = decide("t", [_replay(), _closed(0.01, 0.05)], n_runs=3)
    assert (v.action, v.confidence, v.conflict) == ("change", "high", False)
    mixed = [_closed(0.01, 0.05), _closed(-0.05, -0.03, metric="final_reward")]
    v = decide("t", [_replay(), *mixed], n_runs=3)
    assert (v.action, v.confidence, v.conflict) == ("change", "low", True)


def test_replay_winner_without_closed_loop_is_moderate_and_opposite_noise_lowers_it():
    assert decide("t", [_replay()], n_runs=3).confidence == "moderate"
    noise = Evidence("noise", "faster pair", True, proposal="ema_timescale=0.03", direction=1)
    v = decide("t", [_replay(direction=-1), noise], n_runs=3)
    assert (v.action, v.confidence, v.conflict) == ("change", "low", True)


def _noise():
    return Evidence(
        "noise",
        "faster pair",
        True,
        proposal="ema_timescale=0.03",
        config="separation_matched",
        estimate=0.4,
        sd=0.3,
    )


def _check(low, high):
    return Evidence(
        "replay", "check", None, config="separation_matched", metric="snr_check", low=low, high=high
    )


def test_noise_proposal_alone_cannot_decide():
    v = decide("t", [_replay(supports=False), _noise()], n_runs=3)
    assert (v.action, v.confidence, v.conflict) == ("keep_default", "low", False)
    assert v.proposal == "ema_timescale=0.03"
    # a d' ratio says nothing about a training outcome: no seed count from it
    assert v.settle_with.seeds_per_arm is None


def test_noise_proposal_is_settled_by_its_own_replay_and_closed_loop():
    harmful = _closed(-0.05, -0.01, config="separation_matched")
    v = decide("t", [_replay(supports=False), _noise(), harmful], n_runs=3)
    assert (v.action, v.confidence, v.conflict) == ("keep_default", "low", True)
    assert v.settle_with.seeds_per_arm == seeds_needed(-0.03, 0.02)
    helpful = _closed(0.01, 0.05, config="separation_matched")
    v = decide("t", [_replay(supports=False), _noise(), helpful], n_runs=3)
    assert (v.action, v.proposal, v.confidence) == ("change", "ema_timescale=0.03", "moderate")
    # its own replay check, significantly worse: contradicted
    worse = replace(_check(-0.5, -0.1), supports=False)
    v = decide("t", [_noise(), worse], n_runs=3)
    assert (v.action, v.conflict) == ("keep_default", True)
    better = replace(_check(0.1, 0.5), supports=True)
    assert decide("t", [_noise(), better], n_runs=3).action == "change"
    # another configuration's closed loop does not bear on the noise analysis' pair
    other = _closed(-0.05, -0.01, config="kalman_matched")
    v = decide("t", [_replay(supports=False), _noise(), other], n_runs=3)
    assert (v.action, v.confidence) == ("keep_default", "low")


def test_nothing_supports_a_change():
    assert decide("t", [_replay(supports=False)], n_runs=3).confidence == "moderate"
    assert decide("t", [_replay(supports=False)], n_runs=2).confidence == "low"


def test_verdicts_survive_the_table_round_trip():
    from rts_dagster.analysis.verdict import verdicts_from_table, verdicts_table

    verdicts = [
        decide("a", [_replay(), _closed(-0.07, -0.001)], n_runs=3),
        decide("b", [Evidence("data", "epoch means only", None, metric="granularity")]),
        decide("c", [_replay(supports=False)], n_runs=3),
    ]
    back = verdicts_from_table(verdicts_table(verdicts))
    assert [(v.task, v.action, v.confidence, v.conflict, v.proposal) for v in back] == [
        (v.task, v.action, v.confidence, v.conflict, v.proposal) for v in verdicts
    ]
    assert back[0].settle_with == verdicts[0].settle_with
    assert back[0].evidence[1].low == -0.07 and back[0].evidence[1].metric == "competence_final"


def test_an_inconclusive_closed_loop_sizes_the_experiment_on_competence():
    comp = _closed(-0.02, 0.03, config="separation_matched")
    wide = _closed(-1.0, 3.0, metric="time_to_competence", config="separation_matched", better=-1)
    v = decide("t", [_replay(supports=False), _noise(), comp, wide], n_runs=3)
    assert (v.action, v.confidence, v.conflict) == ("keep_default", "low", False)
    assert v.settle_with.seeds_per_arm == seeds_needed(0.005, 0.02)
