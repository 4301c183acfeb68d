"""Shared fixtures: tiny offline WandB runs written by the real wandb library."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")

TINY_TASKS = {
    "fixed_maps": ["site.extractor_hub_30", "site.collect_far"],
    "assembly_lines": ["tiny_2chain_1sinks_dense"],
}
TINY_SEEDS = (1, 2)
TINY_EPOCHS = 30


def tiny_label_reward(task: str, label: str, seed: int, epoch: int) -> float:
    """The value logged for (task, label, seed, epoch): the tests' ground truth.
    Every third epoch repeats the previous value (a stale re-emission)."""
    e = epoch - (epoch % 3 == 2)
    return round(0.1 * seed + 0.01 * e + 0.001 * (len(label) + len(task)), 6)


def write_tiny_run(root: Path, task: str, seed: int, name: str | None = None) -> None:
    import wandb

    name = name or f"alice.{task}.seed{seed}"
    run = wandb.init(
        project="rts-test",
        entity="tests",
        name=name,
        id=name,
        dir=str(root),
        tags=["user:alice"],
        config={"seed": seed, "trainer": {"curriculum": {"algorithm": {"ema_timescale": 0.001}}}},
    )
    run.define_metric("metric/agent_step")
    run.define_metric("*", step_metric="metric/agent_step")
    for epoch in range(TINY_EPOCHS):
        step = (epoch + 1) * 1000
        row = {
            "metric/agent_step": step,
            "metric/epoch": epoch,
            "overview/sps": 5000.0 + 10 * epoch,
            "overview/reward": 0.5,
        }
        for label in TINY_TASKS.get(task, ["only"]):
            row[f"env_per_label_rewards/{label}"] = tiny_label_reward(task, label, seed, epoch)
        run.log(row, step=step)
    run.finish()
    from rts_dagster.sources.wandb_file import wait_for_exit_record

    # finish() returns before wandb-core flushed the file's last block (wandb 0.31)
    wait_for_exit_record(next(Path(run.dir).parent.glob("run-*.wandb")))


@pytest.fixture(scope="session")
def tiny_offline_dir(tmp_path_factory) -> Path:
    """2 tasks x 2 seeds of tiny offline runs plus one run no rule matches."""
    root = tmp_path_factory.mktemp("offline")
    for task in TINY_TASKS:
        for seed in TINY_SEEDS:
            write_tiny_run(root, task, seed)
    write_tiny_run(root, "fixed_maps", 1, name="unmatched-run-name")
    return root


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
