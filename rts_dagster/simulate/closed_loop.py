"""Closed-loop check: run the simulator under LP configurations and measure outcomes.

Replay is open-loop (the recorded label order came from the curriculum that ran); here the
learner reacts to the curriculum: a configuration changes what is practised and so what
is learnt. Each (task, seed) gives the same learner and the same random draws to every
configuration, so outcomes are compared paired by seed.

Outcomes per run:
- `time_to_competence`: epochs until the mean latent competence over the task's labels
  reaches `competence_fraction` of the way from its mean floor to its mean ceiling (the
  seed's ground-truth parameters); the run's epoch count if never (censored);
- `final_reward`: mean episode reward over the last 10% of epochs;
- `competence_final`: mean latent competence at the end.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import polars as pl

from rts_dagster.analysis.lp_replay import CurriculumConfig
from rts_dagster.analysis.lp_sweep import (
    KALMAN_MATCHED,
    METTA_DEFAULT,
    SEPARATION_MATCHED,
    default_sweep,
)
from rts_dagster.parallel import run_spawned
from rts_dagster.schema import GRANULARITY_COMPLETION, LP_CLOSED_LOOP, conform, empty
from rts_dagster.simulate.model import TASKS, SimulatedRun, simulate

COMPETENCE_FRACTION = 0.8
FINAL_FRACTION = 0.1


def outcomes(run: SimulatedRun, competence_fraction: float = COMPETENCE_FRACTION) -> dict:
    """The closed-loop outcomes of one simulated run (module docstring)."""
    floor = float(run.params.floor.mean())
    ceiling = float(run.params.ceiling.mean())
    target = floor + competence_fraction * (ceiling - floor)
    mean_competence = run.epoch_competence.mean(axis=1)
    reached = np.flatnonzero(mean_competence >= target)
    epochs = run.n_epochs
    tail = max(1, math.ceil(FINAL_FRACTION * epochs))
    final = run.reward_mean[-tail:]
    return {
        "epochs": epochs,
        "time_to_competence": float(reached[0] + 1) if reached.size else float(epochs),
        "reached_competence": bool(reached.size),
        "final_reward": float(np.nanmean(final)) if np.isfinite(final).any() else math.nan,
        "competence_final": float(mean_competence[-1]),
    }


Job = tuple[str, int, int, CurriculumConfig]  # (task, seed, epochs, configuration)


def _geometric_mean(values: pl.Series) -> float:
    """Of the values in sorted order: a mean in another row order (the metrics' order
    follows joins) differs in the last bit, and so would the config's hash, the key that
    lets an identical earlier closed-loop run be reused."""
    return math.exp(float(values.sort().log().mean()))


def plan_closed_loop(
    candidates: Mapping[str, Sequence[tuple[str, str]]],
    metrics: pl.DataFrame,
    seeds: Sequence[int],
    epochs: int,
    engine: str = "simulator",
    mettagrid_epochs: int = 60,
) -> tuple[list[Job], list[str]]:
    """Simulator jobs comparing each task's candidate configurations (names from
    `lp_sweep.closed_loop_candidates`) with Metta's default on `seeds` (each once), and one
    line per candidate or task left out (no simulator model of the task, or a name the
    simulator's sweep does not have: the runs logged another number of labels).
    `kalman_matched` and `separation_matched` take the geometric mean of the settings of
    their runs replayed per completion (`metrics`; a weight fitted to epoch means is not a
    per-completion EMA weight)."""
    from rts_dagster.mettagrid_engine.closed_loop import runnable, task_set_of

    jobs: list[Job] = []
    notes: list[str] = []
    for task, pairs in candidates.items():
        task_set = task_set_of(task)
        on_mettagrid = engine == "mettagrid" and task_set is not None
        if task not in TASKS and not on_mettagrid:
            hint = (
                " (a MettaGrid engine task: set closed_loop_engine=mettagrid to train it, "
                "minutes per run)"
                if task_set is not None
                else ""
            )
            notes.append(f"no simulator model of task {task!r}: skipped{hint}")
            continue
        if on_mettagrid:
            from rts_dagster.mettagrid_engine.run import TASK_SETS

            n_labels, run_epochs = len(TASK_SETS[task_set]), mettagrid_epochs
        else:
            n_labels, run_epochs = len(TASKS[task].labels), epochs
        gains = metrics.filter(
            (pl.col("task") == task)
            & (pl.col("config") == KALMAN_MATCHED)
            & (pl.col("granularity") == GRANULARITY_COMPLETION)  # a gain per completion only
        )
        gain = _geometric_mean(gains["ema_timescale"]) if gains.height else None
        pairs_run = metrics.filter(
            (pl.col("task") == task)
            & (pl.col("config") == SEPARATION_MATCHED)
            & (pl.col("granularity") == GRANULARITY_COMPLETION)
        )
        separation = (
            (
                _geometric_mean(pairs_run["ema_timescale"]),
                _geometric_mean(pairs_run["slow_timescale_factor"]),
            )
            if pairs_run.height
            else None
        )
        sweep = {
            c.name: c for c in default_sweep(n_labels, matched_gain=gain, separation=separation)
        }
        if on_mettagrid:
            for name in [n for n, _ in pairs if n in sweep and runnable(sweep[n])]:
                notes.append(f"task {task!r}: {name} skipped ({runnable(sweep[name])})")
                del sweep[name]
        missing = [name for name, _ in pairs if name not in sweep]
        if missing:
            notes.append(f"task {task!r}: {missing} not in the simulator's sweep: skipped")
        names = [name for name, _ in pairs if name in sweep]
        if names:
            for seed in dict.fromkeys(seeds):
                jobs.extend((task, seed, run_epochs, sweep[n]) for n in (METTA_DEFAULT, *names))
    return jobs, notes


def config_key(config: CurriculumConfig) -> str:
    """Identity of a configuration's behaviour (its settings, not just its name)."""
    return hashlib.sha256(config.model_dump_json(exclude={"description"}).encode()).hexdigest()[:16]


def _one(job: Job) -> dict:
    from rts_dagster.mettagrid_engine.closed_loop import task_set_of, train_outcomes

    task, seed, epochs, config = job
    if task not in TASKS and task_set_of(task) is not None:
        return {
            "task": task,
            "config": config.name,
            "config_key": config_key(config),
            "seed": seed,
            **train_outcomes(task, seed, epochs, config),
            "engine": "mettagrid",
        }
    run = simulate(task, seed, epochs, curriculum=config)
    return {
        "task": task,
        "config": config.name,
        "config_key": config_key(config),
        "seed": seed,
        **outcomes(run),
        "engine": "simulator",
    }


def run_closed_loop(
    jobs: Sequence[Job],
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    reuse: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """LP_CLOSED_LOOP rows for (task, seed, epochs, config) jobs, in parallel processes
    (spawned: the caller may hold threads, e.g. a Dagster run). A simulation is a
    deterministic function of (task, seed, epochs, config), so rows of `reuse` (an earlier
    result) with the same (task, config_key, seed, epochs) are taken instead of re-run."""
    if not jobs:
        return empty(LP_CLOSED_LOOP)
    done: dict[tuple, dict] = {}
    if reuse is not None and reuse.height and set(LP_CLOSED_LOOP.names()) <= set(reuse.columns):
        for row in conform(reuse, LP_CLOSED_LOOP).iter_rows(named=True):
            done[(row["task"], row["config_key"], row["seed"], row["epochs"])] = row
    reused = []
    todo = []
    for job in jobs:
        task, seed, epochs, config = job
        row = done.get((task, config_key(config), seed, epochs))
        if row is not None:
            reused.append({**row, "config": config.name})
        else:
            todo.append(job)
    fresh = _simulate_all(todo, workers, progress)
    if not reused:
        return fresh
    return pl.concat(
        [conform(pl.DataFrame(reused, infer_schema_length=None), LP_CLOSED_LOOP), fresh]
    )


def _simulate_all(
    jobs: Sequence[Job],
    workers: int | None,
    progress: Callable[[int, int], None] | None,
) -> pl.DataFrame:
    if not jobs:
        return empty(LP_CLOSED_LOOP)
    n_workers = workers or os.cpu_count() or 1
    rows: list[dict | None] = [None] * len(jobs)
    for done, (index, row) in enumerate(run_spawned(_one, [(job,) for job in jobs], n_workers), 1):
        rows[index] = row
        if progress:
            progress(done, len(jobs))
    return conform(pl.DataFrame(rows, infer_schema_length=None), LP_CLOSED_LOOP, "closed loop")
