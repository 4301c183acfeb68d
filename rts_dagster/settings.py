"""Where things live: every path setting, read from the environment in one place."""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA_DIR = "RTS_DATA_DIR"
ENV_OFFLINE_DIR = "RTS_OFFLINE_DIR"
ENV_RULES_FILE = "RTS_RULES"
# Partitions per Dagster run in `rts refresh` (Dagster's own UI/automation backfills: 100).
REFRESH_BATCH = 100


def data_dir() -> Path:
    """Output root: `$RTS_DATA_DIR`, default `./data`."""
    return Path(os.environ.get(ENV_DATA_DIR) or "data").resolve()


def offline_dir() -> Path:
    """Directory of offline WandB runs: `$RTS_OFFLINE_DIR`, default `$RTS_DATA_DIR/wandb`."""
    value = os.environ.get(ENV_OFFLINE_DIR)
    return Path(value).resolve() if value else data_dir() / "wandb"


def rules_file() -> Path | None:
    """Optional YAML file of task/seed discovery rules: `$RTS_RULES`."""
    value = os.environ.get(ENV_RULES_FILE)
    return Path(value).resolve() if value else None


def dagster_home() -> Path:
    """Persistent Dagster instance: `$DAGSTER_HOME`, default `$RTS_DATA_DIR/dagster_home`."""
    value = os.environ.get("DAGSTER_HOME")
    return Path(value).resolve() if value else data_dir() / "dagster_home"
