"""`rts simulate --engine mettagrid`: the flags reach the engine and the runs land where
`rts refresh` looks."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mettagrid", reason="needs the mettagrid package (the dev extra)")

from rts_dagster.cli import main
from rts_dagster.sources.offline import OfflineRunSource


def test_simulate_mettagrid_random_policy(tmp_path: Path) -> None:
    out = tmp_path / "wandb"
    flags = ["--engine", "mettagrid", "--policy", "random", "--epochs", "2", "--seeds", "4"]
    code = main(["simulate", *flags, "--out", str(out)])
    assert code == 0
    runs, unreadable = OfflineRunSource(out).list_runs()
    assert unreadable == []
    assert [run.run_id for run in runs] == ["alice.mettagrid_nav.seed4"]
    assert runs[0].config["trainer"]["policy"]["type"] == "random"
    history = OfflineRunSource(out).read_history(runs[0])
    assert history.height == 2


def test_mettagrid_flags_refused_by_the_simulator_engine(tmp_path: Path) -> None:
    assert main(["simulate", "--time-budget", "5", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "wandb").exists()
