"""End to end on a task whose seeds mix granularities: two runs recorded the per-completion
stream, one has Metta's epoch means only. Nothing may pool the two, every row says which
runs fed it, and no section but the verdict advises."""

from __future__ import annotations

import re
import shutil

import polars as pl
import pytest

from rts_dagster import storage
from rts_dagster.recorder import STREAM_DIRNAME
from rts_dagster.simulate.writer import run_id, simulate_run
from rts_dagster_tests.defs.pipeline import FAST_CLOSED_LOOP, materialized

EPOCHS = 120
TASK = "assembly_lines"
EPOCH_ONLY = run_id(TASK, 3)
ADVICE = re.compile(
    r"\b(set|use|switch to|change to|increase|decrease|keep)\b[^.\n|]{0,40}"
    r"(ema_timescale|default|configuration|setting)",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    offline = tmp_path_factory.mktemp("offline_mixed")
    for seed in (1, 2, 3):
        path = simulate_run(TASK, seed, offline, epochs=EPOCHS)
        if seed == 3:
            shutil.rmtree(path.parent / "files" / STREAM_DIRNAME)
    data = tmp_path_factory.mktemp("data_mixed")
    with materialized(offline, data, run_config=FAST_CLOSED_LOOP):
        pass
    return data


def test_granularities_are_never_pooled(mixed):
    variance = pl.read_parquet(storage.variance_table_path(mixed))
    completion = variance.filter(pl.col("granularity") == "completion")
    epoch = variance.filter(pl.col("granularity") == "epoch")
    assert completion.height and epoch.height
    for runs in completion["runs"].to_list():
        assert EPOCH_ONLY not in runs and len(runs) == 2
    assert any(EPOCH_ONLY in runs for runs in epoch["runs"].to_list())
    recs = pl.read_parquet(storage.lp_aggregate_paths(mixed)["recommendations"])
    by_gran = {r["granularity"]: r for r in recs.iter_rows(named=True)}
    assert set(by_gran) == {"completion", "epoch"}
    assert EPOCH_ONLY not in by_gran["completion"]["runs"]
    assert by_gran["epoch"]["runs"] == [EPOCH_ONLY]
    assert not by_gran["epoch"]["actionable"]
    units = set(pl.read_parquet(storage.timescales_path(mixed))["unit"])
    assert units == {"completions", "epochs"}


def test_the_epoch_only_run_is_named_not_dropped(mixed):
    md = (mixed / "report" / "report.md").read_text().replace("\\_", "_").replace("\\.", ".")
    data_section = md.split("## Data used and left out")[1].split("\n## ")[0]
    epoch_row = next(line for line in data_section.splitlines() if "| epoch |" in line)
    assert EPOCH_ONLY in epoch_row
    # sections drawn from the completion stream say which run they do not show
    assert (
        f"Not shown (no usable completion series; see 'Data used and left out'): {EPOCH_ONLY}" in md
    )


def test_only_the_verdict_advises(mixed):
    md = (mixed / "report" / "report.md").read_text().replace("\\_", "_")
    head, rest = md.split("## Verdict per task", 1)
    _verdict, after = rest.split("\n## ", 1)
    for section in (head, after):
        hits = [m.group(0) for m in ADVICE.finditer(section)]
        assert not hits, hits
    verdicts = pl.read_parquet(storage.verdicts_path(mixed))
    assert verdicts["task"].to_list() == [TASK]
