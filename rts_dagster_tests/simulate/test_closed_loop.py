"""Closed-loop outcomes of simulated runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rts_dagster.analysis.lp_replay import CurriculumConfig
from rts_dagster.simulate.closed_loop import outcomes, run_closed_loop
from rts_dagster.simulate.model import simulate

EPOCHS = 30


@pytest.fixture(scope="module")
def short_run():
    return simulate("assembly_lines", 5, epochs=EPOCHS)


def test_outcomes_by_hand(short_run) -> None:
    # two labels: floor mean 0.1, ceiling mean 0.6 -> target 0.1 + 0.8 * 0.5 = 0.5
    params = dataclasses.replace(
        short_run.params, floor=np.array([0.0, 0.2]), ceiling=np.array([0.5, 0.7])
    )
    competence = np.linspace(0.0, 0.9, EPOCHS)[:, None] * np.ones((1, 2))
    rewards = np.arange(EPOCHS, dtype=float)
    run = dataclasses.replace(
        short_run, params=params, epoch_competence=competence, reward_mean=rewards
    )
    out = outcomes(run)
    first = int(np.flatnonzero(competence.mean(axis=1) >= 0.5)[0])
    assert out["time_to_competence"] == first + 1  # epochs, 1-based
    assert out["final_reward"] == pytest.approx(np.mean(rewards[-3:]))  # last 10% of 30
    assert out["competence_final"] == pytest.approx(0.9)
    never = dataclasses.replace(run, epoch_competence=np.zeros((EPOCHS, 2)))
    assert outcomes(never)["time_to_competence"] == EPOCHS  # censored at the run length
    assert outcomes(never)["reached_competence"] is False and out["reached_competence"] is True
    # reaching competence exactly at the last epoch is not censored
    late = np.zeros((EPOCHS, 2))
    late[-1] = 0.9
    at_end = outcomes(dataclasses.replace(run, epoch_competence=late))
    assert at_end["time_to_competence"] == EPOCHS and at_end["reached_competence"] is True


def test_curricula_share_the_learner_and_differ_by_what_is_practised() -> None:
    default = simulate("assembly_lines", 5, epochs=EPOCHS)
    zscore = simulate(
        "assembly_lines",
        5,
        epochs=EPOCHS,
        curriculum=CurriculumConfig(name="z", variant="zscore"),
    )
    np.testing.assert_array_equal(default.params.floor, zscore.params.floor)
    np.testing.assert_array_equal(default.sps, zscore.sps)
    assert not np.array_equal(default.label_index, zscore.label_index)


def test_parallel_and_serial_runs_agree() -> None:
    jobs = [
        ("assembly_lines", 5, EPOCHS, CurriculumConfig(name="metta_default")),
        ("assembly_lines", 5, EPOCHS, CurriculumConfig(name="z", variant="zscore")),
    ]
    seen = []
    serial = run_closed_loop(jobs, workers=1, progress=lambda d, t: seen.append((d, t)))
    parallel = run_closed_loop(jobs, workers=2)
    assert serial.equals(parallel)
    assert seen == [(1, 2), (2, 2)]
    assert serial["config"].to_list() == ["metta_default", "z"]


def test_identical_simulations_are_reused() -> None:
    default = CurriculumConfig(name="metta_default")
    jobs = [("assembly_lines", 5, EPOCHS, default), ("assembly_lines", 6, EPOCHS, default)]
    first = run_closed_loop(jobs, workers=1)
    calls = []
    again = run_closed_loop(jobs, workers=1, progress=lambda d, t: calls.append(d), reuse=first)
    assert calls == [] and again.sort("seed").equals(first.sort("seed"))
    # same name, other settings: simulated again
    changed = CurriculumConfig(name="metta_default", sps_weight=1.0)
    other = run_closed_loop(
        [("assembly_lines", 5, EPOCHS, changed)],
        workers=1,
        progress=lambda d, t: calls.append(d),
        reuse=first,
    )
    assert calls == [1] and other["config_key"].item() != first["config_key"][0]


def test_plan_closed_loop() -> None:
    import math

    import polars as pl

    from rts_dagster.simulate.closed_loop import plan_closed_loop

    metrics = pl.DataFrame(
        {
            "task": ["fixed_maps", "fixed_maps", "fixed_maps", "assembly_lines"],
            "granularity": ["completion", "completion", "epoch", "completion"],
            "config": ["kalman_matched", "kalman_matched", "kalman_matched", "metta_default"],
            "ema_timescale": [0.01, 0.04, 0.5, 0.001],  # 0.5: fitted to epoch means, unused
        }
    )
    candidates = {
        "fixed_maps": [("kalman_matched", "local_level_gain"), ("metta_default_cap_9", "x")],
        "assembly_lines": [("zscore_z10", "replay_best")],
        "not_simulated": [("zscore_z10", "replay_best")],
    }
    jobs, notes = plan_closed_loop(candidates, metrics, seeds=[7, 8, 7], epochs=12)
    assert [(t, s, e, c.name) for t, s, e, c in jobs] == [
        ("fixed_maps", 7, 12, "metta_default"),
        ("fixed_maps", 7, 12, "kalman_matched"),
        ("fixed_maps", 8, 12, "metta_default"),
        ("fixed_maps", 8, 12, "kalman_matched"),
        ("assembly_lines", 7, 12, "metta_default"),
        ("assembly_lines", 7, 12, "zscore_z10"),
        ("assembly_lines", 8, 12, "metta_default"),
        ("assembly_lines", 8, 12, "zscore_z10"),
    ]
    matched = next(c for _, _, _, c in jobs if c.name == "kalman_matched")
    assert matched.main.ema_timescale == pytest.approx(math.sqrt(0.01 * 0.04))  # geometric mean
    assert notes == [
        "task 'fixed_maps': ['metta_default_cap_9'] not in the simulator's sweep: skipped",
        "no simulator model of task 'not_simulated': skipped",
    ]
    # the same runs in another row order plan configs with the same keys (reuse)
    from rts_dagster.simulate.closed_loop import config_key

    rng = np.random.default_rng(5)
    many = pl.DataFrame(
        {
            "task": ["fixed_maps"] * 7,
            "granularity": ["completion"] * 7,
            "config": ["kalman_matched"] * 7,
            "ema_timescale": rng.lognormal(-4.0, 1.0, 7),
        }
    )
    keys = set()
    for order in range(5):
        shuffled = many.sample(fraction=1.0, shuffle=True, seed=order)
        planned, _ = plan_closed_loop(
            {"fixed_maps": [("kalman_matched", "x")]}, shuffled, seeds=[1], epochs=5
        )
        keys.add(config_key(next(c for _, _, _, c in planned if c.name == "kalman_matched")))
    assert len(keys) == 1
