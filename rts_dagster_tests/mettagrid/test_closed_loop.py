"""The closed loop on the MettaGrid engine: outcomes from episodes (vs a loop reference),
the plan (engine tasks trained only when asked, Metta-main configurations only), a short
real run with the random policy, and the verdict naming the engine."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from rts_dagster.analysis.lp_replay import CurriculumConfig
from rts_dagster.analysis.lp_sweep import METTA_DEFAULT
from rts_dagster.analysis.verdict import closed_loop_evidence, closed_loop_name
from rts_dagster.mettagrid_engine.closed_loop import (
    COMPETENCE_REWARD,
    outcomes_from_episodes,
    task_set_of,
    train_outcomes,
)
from rts_dagster.schema import LP_REPLAY_METRICS
from rts_dagster.simulate.closed_loop import plan_closed_loop


def _reference(labels, scores, epoch_of, n_epochs):
    names = sorted(set(labels))
    latest = {}
    curve = []
    for e in range(n_epochs):
        for name in names:
            vals = [
                s
                for lab, s, ep in zip(labels, scores, epoch_of, strict=True)
                if lab == name and ep == e
            ]
            if vals:
                latest[name] = sum(vals) / len(vals)
        curve.append(sum(latest.values()) / len(latest) if latest else math.nan)
    reached = next((e + 1 for e, c in enumerate(curve) if c >= COMPETENCE_REWARD), n_epochs)
    tail = n_epochs - max(1, math.ceil(0.25 * n_epochs))
    per_label = []
    for name in names:
        vals = [
            s
            for lab, s, ep in zip(labels, scores, epoch_of, strict=True)
            if lab == name and ep >= tail
        ]
        if vals:
            per_label.append(sum(vals) / len(vals))
    return float(reached), sum(per_label) / len(per_label)


def test_outcomes_match_a_loop_reference():
    rng = np.random.default_rng(5)
    n = 400
    labels = list(rng.choice(["a", "b", "c"], n))
    epoch_of = np.sort(rng.integers(0, 20, n))
    scores = (rng.random(n) < np.clip(epoch_of / 15, 0, 1)).astype(float)
    got = outcomes_from_episodes(labels, scores, epoch_of, 20)
    time, competence = _reference(labels, scores, epoch_of, 20)
    assert got["time_to_competence"] == time
    assert got["competence_final"] == pytest.approx(competence, rel=1e-12)
    final = epoch_of >= 18
    assert got["final_reward"] == pytest.approx(scores[final].mean(), rel=1e-12)


def test_plan_trains_engine_tasks_only_when_asked():
    candidates = {
        "mettagrid_nav": [("main_ema_0.01", "recommended"), ("zscore_z30", "replay_best")]
    }
    metrics = pl.DataFrame(schema=LP_REPLAY_METRICS)
    jobs, notes = plan_closed_loop(candidates, metrics, [1, 2], 10)
    assert jobs == [] and "closed_loop_engine=mettagrid" in notes[0]
    jobs, notes = plan_closed_loop(
        candidates, metrics, [1, 2], 10, engine="mettagrid", mettagrid_epochs=7
    )
    names = sorted({(j[0], j[1], j[2], j[3].name) for j in jobs})
    assert names == [
        ("mettagrid_nav", s, 7, c) for s in (1, 2) for c in sorted((METTA_DEFAULT, "main_ema_0.01"))
    ]
    assert any("zscore_z30 skipped" in n for n in notes)
    assert task_set_of("mettagrid_nav") == "nav" and task_set_of("fixed_maps") is None


def test_a_short_real_run_gives_outcomes():
    out = train_outcomes(
        "mettagrid_reach", 3, 3, CurriculumConfig(name=METTA_DEFAULT), policy="random"
    )
    assert out["epochs"] == 3
    assert 0.0 <= out["competence_final"] <= 1.0 and 0.0 <= out["final_reward"] <= 1.0
    assert 1.0 <= out["time_to_competence"] <= 3.0


def test_the_verdict_names_the_engine():
    rows = [
        {
            "config": "main_ema_0.01",
            "metric": "competence_final",
            "diff": 0.1,
            "diff_ci_low": 0.05,
            "diff_ci_high": 0.15,
            "ci_method": "paired t",
            "n_pairs": 3,
            "engine": "mettagrid",
        }
    ]
    evidence = closed_loop_evidence(rows)
    assert closed_loop_name(evidence) == "closed loop (MettaGrid PPO)"
    assert closed_loop_name(closed_loop_evidence([{**rows[0], "engine": None}])) == (
        "closed loop (simulator)"
    )
