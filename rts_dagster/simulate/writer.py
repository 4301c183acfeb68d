"""Write simulated training runs through the real wandb library, in offline mode.

`simulate_default(out_dir)` writes the default set: every task of `model.TASKS` x seeds
1, 2, 3 under the task's baseline LP, plus every arm of `model.DEFAULT_ARMS` (an LP
experiment on one task) on the same seeds, so arm and baseline pair by seed. Each run is
`<out_dir>/wandb/offline-run-<time>-<run id>/run-<run id>.wandb` with the per-completion
stream as parquet chunks in that run's `files/reward_stream/`. The logged
keys mirror what Metta logs once per epoch (see DOMAIN.md); docs/simulator.md lists them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rts_dagster.analysis.lp_replay import CurriculumConfig
from rts_dagster.offline_wandb import offline_settings, offline_wandb_env, remove_previous
from rts_dagster.parallel import run_spawned
from rts_dagster.recorder import RewardStreamRecorder
from rts_dagster.simulate.model import (
    DEFAULT_ARMS,
    DEFAULT_EPOCHS,
    SHARED_LP_KEYS,
    TASKS,
    LPArm,
    SimulatedRun,
    TaskSpec,
    simulate,
)
from rts_dagster.sources.wandb_file import wait_for_exit_record

DEFAULT_USER = "alice"
# Every run says what produced it; the report names the engine (`engine:<name>` tag).
ENGINE_TAG = "engine:rts-simulator"
DEFAULT_SEEDS = (1, 2, 3)
DEFAULT_PROJECT = "metta"
# Several chunks per run (~2-3 at the default length), so readers meet multi-chunk streams.
RECORDER_FLUSH_EVERY = 8192

LABEL_PREFIX = "env_per_label_rewards/"
CURRICULUM_PREFIX = "env_env_curriculum/"
KEY_MEAN_LP = CURRICULUM_PREFIX + "algorithm/lp/mean_learning_progress"
KEY_EVICTED = CURRICULUM_PREFIX + "num_evicted"
KEY_RECENT_SCORE = CURRICULUM_PREFIX + "algorithm/tracker/mean_recent_score"


def run_id(task: str, seed: int, user: str = DEFAULT_USER, arm: str | None = None) -> str:
    """Run id == run name == SkyPilot job name: `<user>.<task>.seed<N>`, or
    `<user>.<task>.<arm tag>.seed<N>` for a run of an LP arm."""
    return f"{user}.{task}.seed{seed}" if arm is None else f"{user}.{task}.{arm}.seed{seed}"


def task_generator(spec: TaskSpec) -> dict[str, Any]:
    """The task family of a recipe, deterministic and the same for every run of the task
    (any seed, any LP arm): what Metta runs of one recipe share, and so a task's identity."""
    return {
        "type": "simulated",
        "recipe": spec.recipe,
        "labels": sorted(spec.labels),
        "instances_per_label": spec.n_buckets,
    }


def algorithm_config(curriculum: CurriculumConfig) -> dict[str, Any]:
    """`trainer.curriculum.algorithm` for the LP a run was driven by. The z-score variant
    writes the settings it shares with main (SHARED_LP_KEYS) under the same keys, then its
    own; main's own keys (lp_gain, memory, use_bidirectional) mean nothing to it and are
    left out. Experiment knobs Metta has no setting for are refused rather than hidden."""
    if curriculum.z_anneal is not None or curriculum.pool_cap is not None:
        raise ValueError(f"{curriculum.name}: z_anneal / pool_cap have no Metta config key")
    if curriculum.sps_weight != 0.0:
        raise ValueError(f"{curriculum.name}: sps_weight has no Metta config key")
    if curriculum.variant == "main":
        return {"type": "learning_progress", **curriculum.main.model_dump()}
    settings = curriculum.zscore.model_dump()
    shared = {key: settings.pop(key) for key in SHARED_LP_KEYS}
    return {"type": "learning_progress", **shared, **settings}


def run_config(
    sim: SimulatedRun, user: str = DEFAULT_USER, arm: str | None = None
) -> dict[str, Any]:
    """The run config, with the LP settings the run was driven by (`sim.curriculum`)
    nested where Metta keeps them, the task family at `training_env.curriculum.
    task_generator` and the number of environments (each with its own stats tracker) at
    `training_env.num_envs`. `arm`: the LP arm's tag, for the run name."""
    spec = sim.task
    return {
        "run": run_id(spec.name, sim.seed, user, arm),
        "seed": sim.seed,
        "recipe": spec.recipe,
        "simulated": True,
        "training_env": {
            "num_envs": spec.n_envs,
            "curriculum": {"task_generator": task_generator(spec)},
        },
        "trainer": {
            "total_timesteps": int(sim.epoch_agent_step[-1]),
            "batch_size": spec.steps_per_epoch,
            "curriculum": {
                "num_active_tasks": spec.num_active_tasks,
                "algorithm": algorithm_config(sim.curriculum),
            },
        },
    }


def epoch_rows(sim: SimulatedRun) -> Iterator[dict[str, float | int]]:
    """One wandb.log payload per epoch. A label is absent while no episode end of the epoch
    comes from an environment that has seen it (`SimulatedRun.label_means` NaN); NaN
    statistics (an epoch without completions) are left out rather than logged."""
    keys = [LABEL_PREFIX + label for label in sim.labels]
    start = sim.epoch_wall_time[0] - sim.task.steps_per_epoch / sim.sps[0]
    for e in range(sim.n_epochs):
        row: dict[str, float | int] = {
            key: float(value)
            for key, value in zip(keys, sim.label_means[e], strict=True)
            if not np.isnan(value)
        }
        row["overview/sps"] = float(sim.sps[e])
        if not np.isnan(sim.reward_mean[e]):
            row["overview/reward"] = float(sim.reward_mean[e])
        row["metric/agent_step"] = int(sim.epoch_agent_step[e])
        row["metric/epoch"] = e
        row["metric/total_time"] = float(sim.epoch_wall_time[e] - start)
        row[KEY_MEAN_LP] = float(sim.mean_learning_progress[e])
        row[KEY_EVICTED] = int(sim.num_evicted[e])
        if not np.isnan(sim.mean_recent_score[e]):
            row[KEY_RECENT_SCORE] = float(sim.mean_recent_score[e])
        yield row


def simulate_run(
    task: str,
    seed: int,
    out_dir: Path,
    epochs: int | None = None,
    user: str = DEFAULT_USER,
    replace: bool = True,
    arm: LPArm | None = None,
) -> Path:
    """Simulate one run and write it as an offline wandb run; return its .wandb file.

    `arm`: an LP arm of `task` (default: the task's baseline LP). With `replace`, earlier
    offline folders of the same run id under `out_dir/wandb` are deleted first, so
    re-running gives one folder per run id.
    """
    if arm is not None and arm.task != task:
        raise ValueError(f"arm {arm.tag!r} is an arm of {arm.task!r}, not of {task!r}")
    curriculum = None if arm is None else arm.curriculum()
    tag = None if arm is None else arm.tag
    sim = simulate(task, seed, epochs, curriculum=curriculum)
    rid = run_id(task, seed, user, tag)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if replace:
        remove_previous(out_dir / "wandb", rid)
    with offline_wandb_env():
        import wandb  # deferred: ~1 s to import, not needed by the model

        run = wandb.init(
            project=DEFAULT_PROJECT,
            id=rid,
            name=rid,
            dir=str(out_dir),
            tags=[f"user:{user}", ENGINE_TAG],
            config=run_config(sim, user, tag),
            mode="offline",
            settings=offline_settings(),
        )
        try:
            run.define_metric("metric/agent_step")
            run.define_metric("*", step_metric="metric/agent_step")
            bounds = sim.epoch_bounds
            with RewardStreamRecorder(
                run=run, worker=0, flush_every=RECORDER_FLUSH_EVERY, flush_seconds=None
            ) as recorder:
                labels = np.asarray(sim.labels, dtype=object)
                for e, row in enumerate(epoch_rows(sim)):
                    lo, hi = int(bounds[e]), int(bounds[e + 1])
                    # The epoch's completions happen before its end-of-epoch log line.
                    recorder.record_many(
                        labels[sim.label_index[lo:hi]],
                        sim.reward[lo:hi],
                        sim.agent_step[lo:hi],
                        epochs=sim.epoch[lo:hi],
                        task_ids=sim.task_id[lo:hi],
                        wall_times=sim.wall_time[lo:hi],
                    )
                    run.log(row, step=int(row["metric/agent_step"]))
            run.finish()
        except BaseException:
            run.finish(exit_code=1)
            raise
    path = Path(run.dir).parent / f"run-{rid}.wandb"
    # wandb 0.31 returns from finish() before its writer flushed the last block: wait for
    # the exit record so a reader started right after us sees the whole run.
    wait_for_exit_record(path, timeout_s=60.0)
    return path


def _job(
    task: str, seed: int, out_dir: Path, epochs: int | None, user: str, arm: LPArm | None
) -> tuple[Path, float]:
    started = time.perf_counter()
    path = simulate_run(task, seed, out_dir, epochs=epochs, user=user, arm=arm)
    return path, time.perf_counter() - started


def simulate_default(
    out_dir: Path,
    n_jobs: int = 2,
    epochs: int | None = None,
    quiet: bool = False,
    user: str = DEFAULT_USER,
    arms: Sequence[LPArm] = DEFAULT_ARMS,
) -> list[Path]:
    """Write every task x seeds 1-3 (baseline LP), then every arm x seeds 1-3, under
    `out_dir/wandb/`; return the .wandb paths.

    Runs go to `n_jobs` worker processes (spawned: wandb and fork do not mix); one line
    is printed per finished run unless `quiet`. The returned list is in (task, seed) order
    for the baselines, then (arm, seed), whatever the finishing order.
    """
    jobs: list[tuple[str, int, LPArm | None]] = [
        (task, seed, None) for task in TASKS for seed in DEFAULT_SEEDS
    ]
    jobs += [(arm.task, seed, arm) for arm in arms for seed in DEFAULT_SEEDS]
    n_epochs = DEFAULT_EPOCHS if epochs is None else epochs
    out_dir = Path(out_dir).resolve()
    paths: list[Path | None] = [None] * len(jobs)

    def report(done: int, index: int, path: Path, seconds: float) -> None:
        if not quiet:
            task, seed, arm = jobs[index]
            name = run_id(task, seed, user, None if arm is None else arm.tag)
            print(
                f"[{done}/{len(jobs)}] {name}: {n_epochs} epochs in {seconds:.1f}s -> {path}",
                flush=True,
            )

    args = [(task, seed, out_dir, epochs, user, arm) for task, seed, arm in jobs]
    for done, (index, (path, seconds)) in enumerate(run_spawned(_job, args, n_jobs), start=1):
        paths[index] = path
        report(done, index, path, seconds)
    return [path for path in paths if path is not None]
