"""The closed-loop check of LP settings on real MettaGrid learning (opt-in: minutes per run).

`lp_recommendations` with `closed_loop_engine: mettagrid` trains the engine's PPO under
Metta's default LP and each candidate, on the same seeds (the environments, maps and
policy initialisation depend on the seed only, so runs are paired by seed), and compares
outcomes like the simulator's closed loop does. There is no latent competence here, so:

- `competence_final`: mean over labels of the label's mean episode reward over the last
  25% of epochs (every label weighted alike, whatever the curriculum sampled);
- `time_to_competence`: epochs until the label-mean reward (each label's latest epoch
  mean carried forward) first reaches `COMPETENCE_REWARD`; the run's epochs if never
  (censored);
- `final_reward`: mean reward of all episodes of the last 10% of epochs (depends on what
  the curriculum samples: secondary, as in the simulator).

Only Metta-main LP configurations run here (the engine's workers hold that LP); others
are reported as skipped.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from rts_dagster.analysis.lp_replay import CurriculumConfig

TASK_PREFIX = "mettagrid_"  # run names alice.mettagrid_<task set>.seed<N>
COMPETENCE_REWARD = 0.8
COMPETENCE_TAIL = 0.25
FINAL_TAIL = 0.1


def task_set_of(task: str) -> str | None:
    """The engine's task set a task name stands for (`mettagrid_nav` -> `nav`), or None."""
    from rts_dagster.mettagrid_engine.run import TASK_SETS

    if not task.startswith(TASK_PREFIX):
        return None
    name = task[len(TASK_PREFIX) :]
    return name if name in TASK_SETS else None


def runnable(config: CurriculumConfig) -> str | None:
    """None if the engine can train under `config`, else why not."""
    if config.variant != "main":
        return "the engine's workers run Metta-main LP only"
    if config.pool_cap is not None or config.sps_weight or config.z_anneal is not None:
        return "pool caps, SPS weighting and annealing are not modelled by the engine"
    return None


def outcomes_from_episodes(
    labels: list[str], scores: np.ndarray, epoch_of: np.ndarray, n_epochs: int
) -> dict:
    """The outcomes (module docstring) from each episode's label, score and epoch."""
    index = {label: i for i, label in enumerate(sorted(set(labels)))}
    lab = np.array([index[x] for x in labels], dtype=np.int64)
    n_labels = len(index)
    sums = np.zeros((n_epochs, n_labels))
    counts = np.zeros((n_epochs, n_labels))
    np.add.at(sums, (epoch_of, lab), scores)
    np.add.at(counts, (epoch_of, lab), 1.0)
    with np.errstate(invalid="ignore"):
        means = sums / counts
    # carry each label's latest epoch mean forward (a label not played keeps its level)
    filled = means.copy()
    for e in range(1, n_epochs):  # epochs, not samples
        gap = np.isnan(filled[e])
        filled[e, gap] = filled[e - 1, gap]
    curve = np.nanmean(np.where(np.isnan(filled), np.nan, filled), axis=1)
    reached = np.flatnonzero(np.nan_to_num(curve, nan=-np.inf) >= COMPETENCE_REWARD)
    tail = epoch_of >= n_epochs - max(1, math.ceil(COMPETENCE_TAIL * n_epochs))
    per_label = [
        scores[tail & (lab == i)].mean() for i in range(n_labels) if (tail & (lab == i)).any()
    ]
    final = epoch_of >= n_epochs - max(1, math.ceil(FINAL_TAIL * n_epochs))
    return {
        "epochs": n_epochs,
        "time_to_competence": float(reached[0] + 1) if reached.size else float(n_epochs),
        "reached_competence": bool(reached.size),
        "final_reward": float(scores[final].mean()) if final.any() else math.nan,
        "competence_final": float(np.mean(per_label)) if per_label else math.nan,
    }


def train_outcomes(
    task: str, seed: int, epochs: int, config: CurriculumConfig, policy: str = "ppo"
) -> dict:
    """Train one run of `task` under `config` (in a temp dir, deleted after) and return
    its outcomes. Needs the engine's extra (torch)."""
    from rts_dagster.mettagrid_engine.run import train_run

    task_set = task_set_of(task)
    if task_set is None:
        raise ValueError(f"{task!r} is not a MettaGrid engine task")
    with tempfile.TemporaryDirectory(prefix="rts_mg_closed_loop_") as tmp:
        result = train_run(
            seed,
            Path(tmp),
            task_set=task_set,
            policy=policy,
            epochs=epochs,
            lp=config.main,
            arm=None,
            progress=None,
            threads=1,
            keep_episodes=True,
        )
    steps = np.array([int(r["metric/agent_step"]) for r in result.rows], dtype=np.int64)
    episodes = result.episodes
    agent_step = np.array([e.agent_step for e in episodes], dtype=np.int64)
    epoch_of = np.clip(np.searchsorted(steps, agent_step, side="left"), 0, len(steps) - 1)
    scores = np.array([e.score for e in episodes], dtype=np.float64)
    return outcomes_from_episodes([e.label for e in episodes], scores, epoch_of, len(steps))
