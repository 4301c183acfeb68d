"""Resources: where outputs go and which source runs come from."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from rts_dagster import settings
from rts_dagster.discovery import DiscoveryRules, load_rules
from rts_dagster.sources.base import RunSource


class RtsStorage(dg.ConfigurableResource):
    """Output root; empty means `$RTS_DATA_DIR` (default ./data)."""

    data_dir: str = ""

    def root(self) -> Path:
        return Path(self.data_dir).resolve() if self.data_dir else settings.data_dir()


class OfflineRunsSource(dg.ConfigurableResource):
    """The embedded default source: offline WandB run files on disk.

    `directory` empty means `$RTS_OFFLINE_DIR` (default `$RTS_DATA_DIR/wandb`);
    `rules_file` empty means `$RTS_RULES`, else the default `<user>.<task>.seed<N>` rule.
    """

    directory: str = ""
    rules_file: str = ""

    def source(self) -> RunSource:
        from rts_dagster.sources.offline import OfflineRunSource

        root = Path(self.directory).resolve() if self.directory else settings.offline_dir()
        return OfflineRunSource(root)

    def rules(self) -> DiscoveryRules:
        path = Path(self.rules_file) if self.rules_file else settings.rules_file()
        return load_rules(path)
