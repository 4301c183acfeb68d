"""Metta's logging path for MettaGrid runs: epoch means of episode-end infos, logged with
the real wandb library (offline), and the per-completion stream beside them.

Metta's trainer collects every episode-end info of an epoch (from every environment) and
logs, per key, the mean over the infos that carry the key, prefixed `env_`. Because each
stats tracker attaches its whole held dict of last per-label rewards to every episode end,
`env_per_label_rewards/<label>` is the mean of the workers' held last values, not the mean
of the epoch's completions of that label. `EpochAccumulator` reproduces that; `MettaRun`
logs it once per epoch at `step = agent_step` and records every completion through
`RewardStreamRecorder` (one recorder per environment worker: the stream's `worker`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rts_dagster.mettagrid_engine.vec import EpisodeEnd
from rts_dagster.offline_wandb import offline_settings, offline_wandb_env, remove_previous
from rts_dagster.recorder import RewardStreamRecorder
from rts_dagster.sources.wandb_file import wait_for_exit_record

ENV_PREFIX = "env_"
CURRICULUM_PREFIX = "env_env_curriculum/"
PROJECT = "metta"


def epoch_means(infos: Sequence[dict[str, float]]) -> dict[str, float]:
    """`env_<key>` -> mean over the infos of the epoch that carry `key` (Metta's
    accumulate-then-average; keys absent from an episode's info do not count as 0)."""
    collected: dict[str, list[float]] = {}
    for info in infos:
        for key, value in info.items():
            collected.setdefault(key, []).append(value)
    return {ENV_PREFIX + key: float(np.mean(values)) for key, values in collected.items()}


def epoch_row(
    epoch: int,
    agent_step: int,
    sps: float,
    total_time: float,
    episodes: Sequence[EpisodeEnd],
    curriculum: dict[str, float],
    extra: dict[str, float] | None = None,
) -> dict[str, float | int]:
    """One wandb.log payload: the env_ epoch means, curriculum stats, throughput, progress."""
    row: dict[str, float | int] = dict(epoch_means([end.info for end in episodes]))
    row.update({CURRICULUM_PREFIX + key: value for key, value in curriculum.items()})
    if episodes:
        row["overview/reward"] = float(np.mean([end.score for end in episodes]))
    row["overview/sps"] = float(sps)
    row["metric/agent_step"] = int(agent_step)
    row["metric/epoch"] = int(epoch)
    row["metric/total_time"] = float(total_time)
    row.update(extra or {})
    return row


class MettaRun:
    """An offline wandb run logged the way Metta logs: `log_epoch` once per epoch, with the
    epoch's completions recorded (per worker) before the epoch's log line."""

    def __init__(
        self,
        run_id: str,
        out_dir: Path,
        config: dict[str, Any],
        tags: Sequence[str],
        n_workers: int,
        replace: bool = True,
    ) -> None:
        self.run_id = run_id
        self.out_dir = Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if replace:
            remove_previous(self.out_dir / "wandb", run_id)
        self._env = offline_wandb_env()
        self._env.__enter__()
        try:
            self.run = self._init(run_id, config, tags)
        except BaseException:
            self._env.__exit__(None, None, None)
            raise
        self.run.define_metric("metric/agent_step")
        self.run.define_metric("*", step_metric="metric/agent_step")
        # the whole stream is written at the end: a few chunk files per worker at most
        self.recorders = [
            RewardStreamRecorder(run=self.run, worker=w, flush_every=1 << 20, flush_seconds=None)
            for w in range(n_workers)
        ]
        self.path = Path(self.run.dir).parent / f"run-{run_id}.wandb"

    def _init(self, run_id: str, config: dict[str, Any], tags: Sequence[str]) -> Any:
        import wandb  # deferred: ~1 s to import

        return wandb.init(
            project=PROJECT,
            id=run_id,
            name=run_id,
            dir=str(self.out_dir),
            tags=list(tags),
            config=config,
            mode="offline",
            settings=offline_settings(),
        )

    def log_epoch(self, row: dict[str, float | int], episodes: Sequence[EpisodeEnd]) -> None:
        """Record the epoch's completions, then log its row at step = agent_step."""
        epoch = int(row["metric/epoch"])
        for end in episodes:
            self.recorders[end.worker].record(
                end.label,
                end.score,
                end.agent_step,
                epoch=epoch,
                task_id=end.task_id,
                wall_time=end.wall_time,
            )
        self.run.log(dict(row), step=int(row["metric/agent_step"]))

    def finish(self, exit_code: int = 0) -> Path:
        """Flush the stream, finish the run and wait for its exit record; return the file."""
        try:
            for recorder in self.recorders:
                recorder.close()
            self.run.finish(exit_code=exit_code)
        finally:
            self._env.__exit__(None, None, None)
        # wandb 0.31 returns from finish() before the last block is written: wait for it
        wait_for_exit_record(self.path, timeout_s=60.0)
        return self.path
