"""End to end on what most users have: offline runs with Metta's keys and no recorded
per-completion stream, plus runs that contribute nothing (stuck at one held value, died
after a few epochs). Real wandb files, a real Dagster instance, every asset.

What a researcher relies on here:
- no sentence recommends an absolute ema_timescale (an epoch mean averages held values
  over environments; nothing per completion follows from it);
- every timescale names its unit;
- a run that contributes nothing is named where it is left out and changes no verdict.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from rts_dagster import storage
from rts_dagster.recorder import STREAM_DIRNAME
from rts_dagster.simulate.model import TASKS
from rts_dagster.simulate.writer import simulate_run
from rts_dagster_tests.defs.pipeline import FAST_CLOSED_LOOP, materialized

EPOCHS = 120
TASK_NAMES = ("fixed_maps", "assembly_lines")
SEEDS = (1, 2, 3)


def _epoch_only_runs(root: Path) -> None:
    """Simulated runs with the recorder's stream deleted: Metta's epoch keys only."""
    for task in TASK_NAMES:
        for seed in SEEDS:
            path = simulate_run(task, seed, root, epochs=EPOCHS)
            shutil.rmtree(path.parent / "files" / STREAM_DIRNAME)


def _degenerate_run(root: Path, name: str, task: str, epochs: int, stuck: bool) -> None:
    """A run logging Metta's keys that carries nothing: every label stuck at one held value
    after its first epoch (`stuck`), or a run killed after `epochs` epochs."""
    import wandb

    from rts_dagster.sources.wandb_file import wait_for_exit_record

    run = wandb.init(project="metta", name=name, id=name, dir=str(root), config={"seed": 9})
    run.define_metric("metric/agent_step")
    run.define_metric("*", step_metric="metric/agent_step")
    for epoch in range(epochs):
        step = (epoch + 1) * 262_144
        row = {"metric/agent_step": step, "metric/epoch": epoch, "overview/sps": 40_000.0}
        for i, label in enumerate(TASKS[task].labels):
            row[f"env_per_label_rewards/{label}"] = (
                (0.3 if epoch == 0 else 0.5) if stuck else 0.1 * i + 0.01 * epoch
            )
        run.log(row, step=step)
    run.finish()
    wait_for_exit_record(next(Path(run.dir).parent.glob("run-*.wandb")))


def _pipeline(offline: Path, data: Path) -> None:
    with materialized(offline, data, run_config=FAST_CLOSED_LOOP):
        pass


@pytest.fixture(scope="module")
def two_pipelines(tmp_path_factory):
    """The same epoch-only runs analysed without and with two runs that carry nothing."""
    clean = tmp_path_factory.mktemp("offline_clean")
    _epoch_only_runs(clean)
    dirty = tmp_path_factory.mktemp("offline_dirty")
    # symlinks=True: wandb's `latest-run` link must stay a link, not become a second copy
    shutil.copytree(clean, dirty, symlinks=True, dirs_exist_ok=True)
    _degenerate_run(dirty, "bob.assembly_lines.seed4", "assembly_lines", 200, stuck=True)
    _degenerate_run(dirty, "bob.fixed_maps.seed5", "fixed_maps", 6, stuck=False)
    out = {}
    for name, offline in (("clean", clean), ("dirty", dirty)):
        data = tmp_path_factory.mktemp(f"data_{name}")
        _pipeline(offline, data)
        out[name] = data
    return out


ADVICE = re.compile(r"\b(set|use|change to|switch to|increase|decrease)\b[^.\n|]*ema_timescale")


def test_no_sentence_recommends_an_absolute_ema_timescale(two_pipelines):
    for data in two_pipelines.values():
        md = (data / "report" / "report.md").read_text()
        assert not ADVICE.search(md.replace("\\_", "_")), ADVICE.search(md.replace("\\_", "_"))
        verdicts = pl.read_parquet(storage.verdicts_path(data))
        assert sorted(verdicts["task"]) == sorted(TASK_NAMES)
        assert (verdicts["action"] == "keep_default").all()
        assert (verdicts["confidence"] == "none").all()
        assert "RewardStreamRecorder" in md


def test_every_timescale_names_its_unit(two_pipelines):
    data = two_pipelines["clean"]
    recs = pl.read_parquet(storage.timescales_path(data))
    assert recs.height and set(recs["unit"]) == {"epochs"}
    assert recs["lp_timescale"].is_null().all()  # no comparison with a per-completion weight
    md = (data / "report" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| task | label | regime"))
    assert "| unit |" in header
    local = pl.read_parquet(storage.lp_timescales_path(data))
    assert local.filter(pl.col("best_ema_timescale").is_not_null()).height == 0


def test_runs_that_carry_nothing_are_named_and_change_no_verdict(two_pipelines):
    dirty = two_pipelines["dirty"]
    md = (dirty / "report" / "report.md").read_text().replace("\\_", "_").replace("\\.", ".")
    section = md.split("## Data used and left out")[1].split("\n## ")[0]
    assert "bob.assembly_lines.seed4" in section and "repeat the previous value" in section
    assert "bob.fixed_maps.seed5" in section and "usable samples" in section
    runs = pl.read_parquet(storage.quality_paths(dirty)["runs"])
    bad = runs.filter(pl.col("run_id").str.starts_with("bob."))
    assert not bad["contributes_dynamics"].any()

    def decisions(data: Path) -> list[tuple]:
        table = pl.read_parquet(storage.verdicts_path(data)).sort("task")
        return table.select("task", "action", "proposal", "confidence", "conflict").rows()

    assert decisions(dirty) == decisions(two_pipelines["clean"])
    # the seeds behind the variance rows are the contributing runs only
    variance = pl.read_parquet(storage.variance_table_path(dirty))
    for runs_used in variance["runs"].to_list():
        assert "bob.assembly_lines.seed4" not in runs_used
        assert "bob.fixed_maps.seed5" not in runs_used


def test_runs_that_carry_nothing_leave_every_aggregate_unchanged(two_pipelines):
    clean, dirty = two_pipelines["clean"], two_pipelines["dirty"]

    def table(path) -> pl.DataFrame:  # row order follows the runs' discovery order
        df = pl.read_parquet(path)
        keys = [
            c
            for c in ("task", "group", "label", "regime", "unit", "scope", "seed")
            if c in df.columns
        ]
        return df.sort(keys, nulls_last=True)

    for path in (storage.timescales_path, storage.lp_timescales_path):
        assert table(path(dirty)).equals(table(path(clean)))
    variance = [pl.read_parquet(storage.variance_table_path(d)) for d in (clean, dirty)]
    assert variance[1].equals(variance[0])
    recs = [
        pl.read_parquet(storage.lp_aggregate_paths(d)["recommendations"]).drop("sentence")
        for d in (clean, dirty)
    ]
    assert recs[1].equals(recs[0])
