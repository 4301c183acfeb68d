"""Resources: where outputs go and which source runs come from."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import dagster as dg

from rts_dagster import settings, storage
from rts_dagster.discovery import DiscoveryRules, load_rules
from rts_dagster.sources.base import RunSource


class RtsStorage(dg.ConfigurableResource):
    """Output root; empty means `$RTS_DATA_DIR` (default ./data)."""

    data_dir: str = ""

    def root(self) -> Path:
        return Path(self.data_dir).resolve() if self.data_dir else settings.data_dir()


class RunSourceResource(dg.ConfigurableResource):
    """The `run_source` resource: a `RunSource` plus the task/seed rules applied to it.

    Assets and sensors annotate `run_source` with this base class; the concrete resource
    (offline files or a WandB project) is chosen in `definitions.py` by `RTS_SOURCE`.
    `rules_file` empty means `$RTS_RULES`, else the default `<user>.<task>.seed<N>` rule.
    """

    rules_file: str = ""

    def source(self) -> RunSource:
        raise NotImplementedError(f"{type(self).__name__} does not define source()")

    def rules(self) -> DiscoveryRules:
        path = Path(self.rules_file) if self.rules_file else settings.rules_file()
        return load_rules(path)


# One OfflineRunSource per directory: its scan cache then survives across
# materializations and sensor ticks in one process (a rescan of a 463 MB file costs ~0.5 s).
_OFFLINE_SOURCES: dict[Path, RunSource] = {}
_OFFLINE_LOCK = threading.Lock()


class OfflineRunsSource(RunSourceResource):
    """The embedded default source: offline WandB run files on disk.

    `directory` empty means `$RTS_OFFLINE_DIR` (default `$RTS_DATA_DIR/wandb`).
    """

    directory: str = ""

    def source(self) -> RunSource:
        from rts_dagster.sources.offline import OfflineRunSource

        root = Path(self.directory).resolve() if self.directory else settings.offline_dir()
        with _OFFLINE_LOCK:
            if root not in _OFFLINE_SOURCES:
                _OFFLINE_SOURCES[root] = OfflineRunSource(
                    root, scan_cache=storage.cache_dir(settings.data_dir()) / "offline_scans.json"
                )
            return _OFFLINE_SOURCES[root]


class WandbRunsSource(RunSourceResource):
    """Runs of one WandB project, read live through `wandb.Api` (sources/wandb_api.py).

    The API key is read from the `WANDB_API_KEY` environment variable when the client is
    created and is deliberately not a field: a resolved `EnvVar` field would hold the key as
    plain text on the resource (printed by its repr). The server-side filters below only
    narrow the listing; `rules_file` (same as `OfflineRunsSource`) still decides task/seed.
    `cache_dir` empty means `$RTS_DATA_DIR/cache/wandb`.
    """

    entity: str
    project: str
    base_url: str = ""  # empty: wandb's default (or WANDB_BASE_URL)
    cache_dir: str = ""
    name_regex: str = ""  # RE2 on the display name, e.g. "^alice\\."
    # pydantic copies field defaults per instance, so these lists are not shared
    tags_any: list[str] = []  # noqa: RUF012  (at least one of these tags)
    states: list[str] = []  # noqa: RUF012  (empty = any state)
    config_equals_json: str = ""  # JSON object of dotted config key -> value
    timeout_s: float = 30.0
    # How often a finished run whose export is incomplete is asked again (seconds).
    export_probe_interval_s: float = 300.0

    def source(self) -> RunSource:
        import json

        from rts_dagster.sources.wandb_api import RunFilters, WandbRunSource

        config_equals = json.loads(self.config_equals_json) if self.config_equals_json else {}
        filters = RunFilters(
            name_regex=self.name_regex or None,
            tags_any=tuple(self.tags_any),
            states=tuple(self.states),
            config_equals=config_equals,
        )
        return WandbRunSource(
            self.entity,
            self.project,
            base_url=self.base_url or None,
            cache_dir=Path(self.cache_dir).resolve() if self.cache_dir else None,
            filters=filters,
            timeout_s=self.timeout_s,
            export_probe_interval_s=self.export_probe_interval_s,
        )


def run_source_from_env() -> RunSourceResource:
    """The `run_source` resource chosen by `RTS_SOURCE` (`offline`, the default, or
    `wandb`, with `RTS_WANDB_ENTITY`/`RTS_WANDB_PROJECT`, default metta-research/metta).
    Both resources offer the same `source()` and `rules()`."""
    kind = os.environ.get("RTS_SOURCE", "offline").strip().lower()
    if kind == "offline":
        return OfflineRunsSource()
    if kind == "wandb":
        return WandbRunsSource(
            entity=os.environ.get("RTS_WANDB_ENTITY", "metta-research"),
            project=os.environ.get("RTS_WANDB_PROJECT", "metta"),
        )
    raise ValueError(f"RTS_SOURCE={kind!r}: expected 'offline' or 'wandb'")
