"""Test data shaped like Metta's WandB runs, and the environment the real client needs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from rts_dagster_tests.fakes.wandb_server import DEFAULT_API_KEY

LABELS = ("training_facility.extractor_hub_30", "machina_1.collect_far", "late.label")


def metta_history(epochs: int, seed: int, steps_per_epoch: int = 1000) -> pl.DataFrame:
    """A history shaped like Metta's: per-label rewards (one label appears late, one NaN,
    one +inf, stale repeats), progress keys, plus keys the reward streams do not need."""
    rng = np.random.default_rng(seed)
    step = np.arange(1, epochs + 1, dtype=np.int64) * steps_per_epoch
    data: dict[str, Any] = {
        "_step": step,
        "_timestamp": 1.7e9 + 3.5 * np.arange(epochs),
        "_runtime": 3.5 * np.arange(epochs),
        "metric/agent_step": step.astype(float),
        "metric/epoch": np.arange(epochs, dtype=float),
        "overview/sps": rng.normal(5000, 100, epochs),
        "overview/reward": rng.random(epochs),
        "env_agent/heart.amount": rng.random(epochs),
    }
    for i, label in enumerate(LABELS):
        values: list[float | None] = list(np.round(rng.random(epochs), 4))
        if label == "late.label":
            values[: epochs // 3] = [None] * (epochs // 3)
        values[epochs // 2] = values[epochs // 2 - 1]  # a stale re-emission
        if i == 0:
            values[5] = math.nan
            values[7] = math.inf
        data[f"env_per_label_rewards/{label}"] = values
    return pl.DataFrame(data, schema_overrides={"_step": pl.Int64})


def wandb_client_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point the real wandb client's directories at `tmp_path` and give it the fake's key."""
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))  # Run objects mkdir here
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_API_KEY", DEFAULT_API_KEY)
