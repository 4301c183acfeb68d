"""The analysis assets end to end on the tiny offline runs: per-partition metrics, the
aggregates, the report, and eager automation of the aggregates."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from rts_dagster.definitions import ASSETS
from rts_dagster.escape import md as md_escape
from rts_dagster.report.document import find_browser
from rts_dagster_tests.conftest import TINY_SEEDS, TINY_TASKS
from rts_dagster_tests.defs.pipeline import materialized


@pytest.fixture(scope="module")
def pipeline(tiny_offline_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with materialized(
        tiny_offline_dir,
        data,
        per_run=["reward_streams", "series_metrics"],
        aggregates=[
            "data_quality",
            "variance_table",
            "timescale_recommendations",
            "verdicts",
            "report",
        ],
    ) as (instance, resources):
        yield data, instance, resources


def test_series_metrics_files_per_partition(pipeline):
    data, _, _ = pipeline
    for task, labels in TINY_TASKS.items():
        for seed in TINY_SEEDS:
            series = pl.read_parquet(data / "metrics" / task / f"{seed}.series.parquet")
            assert sorted(series["label"].to_list()) == sorted(labels)
            # every third epoch was a stale re-emission in the fixture
            assert series["stale_fraction"].to_list() == pytest.approx([10 / 30] * len(labels))
            assert series["destaled"].all()
            assert (series["n_samples"] == 20).all()


def test_report_numbers_come_from_the_tables(pipeline):
    data, _, _ = pipeline
    md = (data / "report" / "report.md").read_text()
    html = (data / "report" / "report.html").read_text()
    variance = pl.read_parquet(data / "metrics" / "variance_table.parquet")
    across = variance.filter(pl.col("scope") == "across_tasks").row(0, named=True)
    ratio = f"{across['ratio']:.3g} [{across['ratio_ci_low']:.3g}, {across['ratio_ci_high']:.3g}]"
    assert md_escape(ratio) in md and ratio in html
    series = pl.concat(
        pl.read_parquet(p) for p in sorted((data / "metrics").rglob("*.series.parquet"))
    )
    label = "site.extractor_hub_30"
    noise = series.filter(pl.col("label") == label)["noise_diff"].mean()
    noise_section = md.split("## Noise across tasks")[1]
    row = next(line for line in noise_section.splitlines() if "site.extractor\\_hub\\_30 |" in line)
    assert f"{noise:.4g}" in row
    if find_browser() is not None:
        assert (data / "report" / "figures" / "reward_curves.png").exists()
        assert "](figures/reward_curves.png)" in md


def test_aggregates_are_eager_on_new_partition_data(pipeline):
    _, instance, resources = pipeline
    from rts_dagster.definitions import defs

    key = instance.get_dynamic_partitions("runs")[0]
    # first evaluation establishes the baseline; nothing changed since the last run
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert dg.materialize(
        ASSETS,
        selection=["reward_streams"],
        partition_key=key,
        instance=instance,
        resources=resources,
    ).success
    second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert second.get_num_requested(dg.AssetKey("series_metrics")) == 1
    assert second.get_num_requested(dg.AssetKey("variance_table")) == 0
    # the aggregates wait for series_metrics; they are requested once it has run
    assert dg.materialize(
        ASSETS,
        selection=["series_metrics"],
        partition_key=key,
        instance=instance,
        resources=resources,
    ).success
    third = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor)
    assert third.get_num_requested(dg.AssetKey("variance_table")) == 1
    assert third.get_num_requested(dg.AssetKey("timescale_recommendations")) == 1


def test_report_links_each_run_to_wandb(pipeline):
    data, _, _ = pipeline
    md = (data / "report" / "report.md").read_text().replace("\\_", "_")
    discovered = pl.read_parquet(data / "discovered_runs.parquet").filter(
        pl.col("status") == "matched"
    )
    assert discovered["url"].null_count() == 0
    for url in discovered["url"].to_list():
        assert url.startswith("https://wandb.ai/tests/rts-test/runs/")
        assert url in md
