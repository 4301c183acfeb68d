"""The one interface every run source implements (offline files today, WandB API next).

A source lists runs and reads their data; it returns the project's own types and
schemas, never library objects, so the Dagster wiring and the analysis never know
where a run came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import polars as pl


@dataclass(frozen=True)
class RunRecord:
    """What a source knows about one run before any task/seed rule is applied."""

    run_id: str
    run_name: str
    project: str
    entity: str
    tags: tuple[str, ...]
    config: dict[str, Any]  # the run config, nested dicts as logged
    state: str  # finished | failed | crashed | running | ...
    created_at: datetime | None  # tz-aware UTC
    heartbeat_at: datetime | None  # tz-aware UTC: last sign of life
    source: str  # "offline" | "wandb"
    location: str  # file path, or entity/project/run_id
    fingerprint: str  # changes whenever the run's data may have changed
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class UnreadableRun:
    """A run (file) the source found but could not read; `error` names file and offset."""

    location: str
    error: str
    source: str


class RunSource(Protocol):
    """Lists runs and reads their history and per-completion stream."""

    name: str

    def list_runs(
        self, updated_since: datetime | None = None
    ) -> tuple[list[RunRecord], list[UnreadableRun]]:
        """Every run the source can see, plus the ones it found but could not read.

        With `updated_since`, only runs whose `heartbeat_at` is at or after it are needed
        (a source may return more; a sensor uses this to poll cheaply). A run whose data
        changed after its last heartbeat (a WandB export completing) is listed too, with
        `extra["late_data"] = True`."""
        ...

    def get_run(self, location: str) -> RunRecord:
        """The current record of the run at `location` (as listed by `list_runs`).
        Raises `RunReadError` if it is gone or unreadable."""
        ...

    def read_history(
        self, run: RunRecord, key_prefixes: Sequence[str] | None = None
    ) -> pl.DataFrame:
        """Wide history: `_step` (Int64), `_timestamp` (Float64) and one Float64 column
        per logged numeric key (restricted to keys starting with one of `key_prefixes`
        when given), one row per logged step, in log order. Missing values are null;
        a logged NaN stays NaN. Raises `RunReadError` naming the file/key at fault."""
        ...

    def read_completions(self, run: RunRecord) -> pl.DataFrame | None:
        """The per-completion stream (`schema.COMPLETION_RECORD`), or None if the run
        did not record one."""
        ...

    def data_fingerprint(self, run: RunRecord) -> str:
        """The fingerprint of the data the reads of `run` returned: `run.fingerprint`,
        unless reading taught the source more (a WandB run never read is listed as
        exported; its first read may find the export incomplete). Stored with the
        partition, so the next listing's fingerprint tells whether it is current."""
        ...


class RunReadError(RuntimeError):
    """A run's data cannot be read. The message names the run/file and where."""
