"""Writing offline WandB runs with the real `wandb` library: the environment, settings and
rewrite rule shared by every writer (the simulator, the MettaGrid engine, the benchmarks)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

OFFLINE_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_ERROR_REPORTING": "false",
    "WANDB_CONSOLE": "off",
}


@contextmanager
def offline_wandb_env() -> Iterator[None]:
    """Offline, silent wandb while inside; the caller's environment is restored after."""
    saved = {key: os.environ.get(key) for key in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def offline_settings() -> Any:
    """`wandb.Settings` for a quiet offline run: no console capture, system stats,
    machine info, requirements, git or code saving."""
    import wandb

    return wandb.Settings(
        silent=True,
        console="off",
        x_disable_stats=True,
        x_disable_meta=True,
        x_disable_machine_info=True,
        x_save_requirements=False,
        disable_git=True,
        save_code=False,
    )


def remove_previous(wandb_dir: Path, run_id: str) -> None:
    """Delete earlier offline folders of `run_id`, so a rewrite replaces them."""
    pattern = re.compile(r"^offline-run-\d{8}_\d{6}-" + re.escape(run_id) + "$")
    if wandb_dir.is_dir():
        for entry in wandb_dir.iterdir():
            if entry.is_dir() and pattern.match(entry.name):
                shutil.rmtree(entry)
