"""Train MettaGrid runs and write them as offline wandb runs (docs/mettagrid_engine.md).

`train_run` trains one run (a task set x a seed x an optional LP arm) with 16 in-process
workers, each with its own LP; `train_default` writes the default set (every seed of
DEFAULT_SEEDS, in parallel processes). Runs are named `<user>.mettagrid_<set>.seed<N>`
(`<user>.mettagrid_<set>.<arm>.seed<N>` for an LP arm), tagged `engine:mettagrid`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rts_dagster.analysis.lp import LPConfig
from rts_dagster.mettagrid_engine.logging import MettaRun, epoch_row
from rts_dagster.mettagrid_engine.ppo import Policy, PPOPolicy, RandomPolicy
from rts_dagster.mettagrid_engine.tasks import (
    DEFAULT_LABELS,
    METTAGRID_VERSION,
    make_pool,
    task_generator,
)
from rts_dagster.mettagrid_engine.vec import N_ACTIONS, EpisodeEnd, VecEnv
from rts_dagster.parallel import run_spawned

TASK_SETS: dict[str, tuple[str, ...]] = {
    "nav": DEFAULT_LABELS,  # reach 5x5 / 9x9, maze, and the (hard) ore chain
    "reach": ("reach_5x5", "reach_9x9"),
}
DEFAULT_TASK_SET = "nav"
DEFAULT_USER = "alice"
DEFAULT_SEEDS = (1, 2, 3)
DEFAULT_EPOCHS = 80  # 82k agent steps per run: docs/mettagrid_engine.md has the timings
N_WORKERS = 16
STEPS_PER_WORKER = 64  # rollout length: an epoch is N_WORKERS * STEPS_PER_WORKER agent steps
# Few completions reach each (worker, task instance) in a short run (~30), so Metta main's
# ema_timescale 0.001 would leave LP flat: this engine's baseline uses 0.1.
DEFAULT_LP = LPConfig(ema_timescale=0.1)
ENGINE = f"mettagrid {METTAGRID_VERSION}"


def task_name(task_set: str) -> str:
    return f"mettagrid_{task_set}"


def run_id(task_set: str, seed: int, user: str = DEFAULT_USER, arm: str | None = None) -> str:
    """Run id == name: `<user>.mettagrid_<set>.seed<N>` (with `.<arm>` before the seed)."""
    task = task_name(task_set)
    return f"{user}.{task}.seed{seed}" if arm is None else f"{user}.{task}.{arm}.seed{seed}"


def run_config(
    task_set: str,
    seed: int,
    rid: str,
    lp: LPConfig,
    policy: Policy,
    n_workers: int,
    steps_per_epoch: int,
    n_tasks: int,
) -> dict[str, Any]:
    """The run config in the layout our readers take from Metta runs (see simulate/writer)."""
    return {
        "run": rid,
        "seed": seed,
        "engine": ENGINE,
        "recipe": f"rts.mettagrid.{task_set}",
        "training_env": {
            "num_envs": n_workers,
            "curriculum": {
                "task_generator": task_generator(TASK_SETS[task_set]),
                "num_active_tasks": n_tasks,
            },
        },
        "trainer": {
            "batch_size": steps_per_epoch,
            "policy": policy.settings(),
            "curriculum": {
                "num_active_tasks": n_tasks,
                "algorithm": {"type": "learning_progress", **lp.model_dump()},
            },
        },
    }


@dataclass
class RunResult:
    """What a run wrote, and (with keep_episodes) every episode end and logged row."""

    path: Path
    run_id: str
    epochs: int
    agent_steps: int
    seconds: float
    episodes: list[EpisodeEnd] = field(default_factory=list)
    rows: list[dict[str, float | int]] = field(default_factory=list)


def make_policy(kind: str, obs_size: int, seed: int, threads: int | None) -> Policy:
    if kind == "random":
        return RandomPolicy(N_ACTIONS, seed)
    if kind == "ppo":
        return PPOPolicy(obs_size, N_ACTIONS, seed, threads=threads)
    raise ValueError(f"unknown policy {kind!r}: 'ppo' or 'random'")


def _progress_line(
    rid: str, epoch: int, agent_step: int, sps: float, recent: list[EpisodeEnd]
) -> str:
    by_label: dict[str, list[float]] = {}
    for end in recent:
        by_label.setdefault(end.label, []).append(end.score)
    means = " ".join(f"{label}={np.mean(v):.2f}" for label, v in sorted(by_label.items()))
    return f"{rid}: epoch {epoch} agent_step {agent_step} sps {sps:.0f} | recent {means}"


def train_run(
    seed: int,
    out_dir: Path,
    task_set: str = DEFAULT_TASK_SET,
    policy: str = "ppo",
    epochs: int | None = None,
    time_budget: float | None = None,
    lp: LPConfig | None = None,
    arm: str | None = None,
    user: str = DEFAULT_USER,
    n_workers: int = N_WORKERS,
    steps_per_worker: int = STEPS_PER_WORKER,
    threads: int | None = None,
    progress: Callable[[str], None] | None = print,
    progress_every: int = 10,
    keep_episodes: bool = False,
) -> RunResult:
    """Train one run and write it under `out_dir/wandb/`; return where and what.

    Stops after `epochs` (default DEFAULT_EPOCHS unless only `time_budget` is given) or once
    `time_budget` seconds have passed, whichever comes first (a budget makes the length,
    and so the run, depend on this machine's speed). `lp`: the LP settings (default
    DEFAULT_LP); `arm` names a non-default LP in the run id.
    """
    if task_set not in TASK_SETS:
        raise ValueError(f"unknown task set {task_set!r}; known: {sorted(TASK_SETS)}")
    if epochs is None and time_budget is None:
        epochs = DEFAULT_EPOCHS
    lp_config = lp or DEFAULT_LP
    started = time.perf_counter()
    pool = make_pool(TASK_SETS[task_set])
    env = VecEnv(pool, seed, n_workers, lp_config)
    learner = make_policy(policy, env.encoder.size, seed, threads)
    rid = run_id(task_set, seed, user, arm)
    steps_per_epoch = env.n_agents * steps_per_worker
    config = run_config(
        task_set, seed, rid, lp_config, learner, n_workers, steps_per_epoch, len(pool)
    )
    tags = ["engine:mettagrid", f"user:{user}", f"policy:{learner.name}"]
    run = MettaRun(rid, Path(out_dir), config, tags, n_workers)
    result = RunResult(run.path, rid, 0, 0, 0.0)
    exit_code = 1
    try:
        obs = env.observations()
        epoch = 0
        recent: list[EpisodeEnd] = []
        while (epochs is None or epoch < epochs) and (
            time_budget is None or time.perf_counter() - started < time_budget
        ):
            epoch_start = time.perf_counter()
            episodes: list[EpisodeEnd] = []
            for _ in range(steps_per_worker):
                actions = learner.act(obs)
                obs, rewards, dones, ends = env.step(actions)
                learner.observe(rewards, dones)
                episodes.extend(ends)
            losses = learner.update(obs)
            sps = steps_per_epoch / (time.perf_counter() - epoch_start)
            row = epoch_row(
                epoch,
                env.agent_step,
                sps,
                time.perf_counter() - started,
                episodes,
                env.curriculum_stats(),
                losses,
            )
            run.log_epoch(row, episodes)
            if keep_episodes:
                result.episodes.extend(episodes)
                result.rows.append(row)
            recent.extend(episodes)
            epoch += 1
            if progress is not None and epoch % progress_every == 0:
                progress(_progress_line(rid, epoch, env.agent_step, sps, recent))
                recent = []
        result.epochs, result.agent_steps = epoch, env.agent_step
        exit_code = 0
    finally:
        env.close()
        run.finish(exit_code)
    result.seconds = time.perf_counter() - started
    return result


def _job(
    seed: int,
    out_dir: Path,
    task_set: str,
    policy: str,
    epochs: int | None,
    time_budget: float | None,
    user: str,
    threads: int,
    quiet: bool,
) -> tuple[Path, int, int, float]:
    result = train_run(
        seed,
        out_dir,
        task_set=task_set,
        policy=policy,
        epochs=epochs,
        time_budget=time_budget,
        user=user,
        threads=threads,
        progress=None if quiet else (lambda line: print(line, flush=True)),
    )
    return result.path, result.epochs, result.agent_steps, result.seconds


def train_default(
    out_dir: Path,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    task_set: str = DEFAULT_TASK_SET,
    policy: str = "ppo",
    epochs: int | None = None,
    time_budget: float | None = None,
    jobs: int | None = None,
    user: str = DEFAULT_USER,
    quiet: bool = False,
) -> list[Path]:
    """Train `task_set` x `seeds` under `out_dir/wandb/` in `jobs` spawned processes (default:
    one per seed; the default 3 seeds share 2 cores well, as env stepping is single-threaded
    Python); return the .wandb paths in seed order. torch runs one thread per process
    whatever `jobs` is, so a seed's run does not depend on it."""
    jobs = len(seeds) if jobs is None else jobs
    threads = 1
    args = [
        (seed, Path(out_dir).resolve(), task_set, policy, epochs, time_budget, user, threads, quiet)
        for seed in seeds
    ]
    paths: list[Path | None] = [None] * len(args)
    for done, (index, (path, n_epochs, steps, seconds)) in enumerate(
        run_spawned(_job, args, jobs), start=1
    ):
        paths[index] = path
        if not quiet:
            name = run_id(task_set, seeds[index], user)
            print(
                f"[{done}/{len(args)}] {name}: {n_epochs} epochs, {steps} agent steps in "
                f"{seconds:.1f}s -> {path}",
                flush=True,
            )
    return [path for path in paths if path is not None]
