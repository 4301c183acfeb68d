"""`rts refresh`: bring every asset up to date on the persistent Dagster instance.

Each step is a real Dagster run in `$DAGSTER_HOME` (so `make ui` shows the history):
discovered_runs, then one run per new or changed partition (reward_streams and its
partitioned downstream), then one run for the unpartitioned aggregates.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from rts_dagster import storage
from rts_dagster.definitions import ASSETS, RESOURCES, defs
from rts_dagster.defs.partitions import runs_partitions
from rts_dagster.defs.resources import RtsStorage
from rts_dagster.defs.runs import partition_is_current
from rts_dagster.discovery import row_files
from rts_dagster.schema import RUN_STATUS_MATCHED

_QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def _partitioned_and_aggregate_keys(
    defs: dg.Definitions,
) -> tuple[list[dg.AssetKey], list[dg.AssetKey]]:
    graph = defs.resolve_asset_graph()
    partitioned, aggregate = [], []
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.is_materializable or key == dg.AssetKey("discovered_runs"):
            continue
        if node.partitions_def == runs_partitions:
            partitioned.append(key)
        elif node.partitions_def is None:
            aggregate.append(key)
    return partitioned, aggregate


def _materialize(
    instance: dg.DagsterInstance,
    keys: list[dg.AssetKey],
    partition_key: str | None = None,
) -> tuple[bool, str]:
    result = dg.materialize(
        ASSETS,
        selection=keys,
        instance=instance,
        partition_key=partition_key,
        resources=RESOURCES,
        run_config=_QUIET_LOGS,
        raise_on_error=False,
        tags={"rts/trigger": "rts refresh"},
    )
    if result.success:
        return True, ""
    errors = [
        ev.step_failure_data.error.message.strip() if ev.step_failure_data.error else str(ev)
        for ev in result.all_events
        if ev.is_step_failure
    ]
    return False, " | ".join(errors) or "run failed"


def _partition_paths(data_dir: Path, row: dict[str, Any]) -> tuple[Path, Path]:
    folder, stem = row_files(row)
    return storage.stream_paths(data_dir, folder, stem)


def refresh(force: bool = False, quiet: bool = False) -> int:
    """Run the whole pipeline; returns a process exit code (1 if anything failed)."""

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    started = time.perf_counter()
    instance = dg.DagsterInstance.get()
    data_dir = RtsStorage().root()
    partitioned, aggregates = _partitioned_and_aggregate_keys(defs)

    say(f"rts refresh: instance {instance.root_directory}, data {data_dir}")
    say("[discover] materializing discovered_runs ...")
    ok, error = _materialize(instance, [dg.AssetKey("discovered_runs")])
    if not ok:
        print(f"rts refresh: discovered_runs failed: {error}")
        return 1
    discovered = pl.read_parquet(storage.discovered_runs_path(data_dir))
    matched = discovered.filter(pl.col("status") == RUN_STATUS_MATCHED).sort("partition_key")
    others = discovered.filter(pl.col("status") != RUN_STATUS_MATCHED)
    say(f"[discover] {discovered.height} runs: {matched.height} matched, {others.height} not")
    for row in others.iter_rows(named=True):
        print(f"  ! {row['status']}: {row['run_name'] or row['location']}: {row['reason']}")

    failures: list[tuple[str, str]] = []
    written: list[Path] = []
    todo = []
    for row in matched.iter_rows(named=True):
        parquet_path, _ = _partition_paths(data_dir, row)
        if force or not partition_is_current(data_dir, row):
            todo.append((row, parquet_path))
        else:
            written.append(parquet_path)
    say(f"[partitions] {len(todo)} new or changed, {matched.height - len(todo)} up to date")
    for i, (row, parquet_path) in enumerate(todo, 1):
        key = row["partition_key"]
        t0 = time.perf_counter()
        ok, error = _materialize(instance, partitioned, partition_key=key)
        if ok:
            written.append(parquet_path)
            say(
                f"  [{i}/{len(todo)}] {key}: ok in {time.perf_counter() - t0:.1f}s -> {parquet_path}"
            )
        else:
            failures.append((key, error))
            print(f"  [{i}/{len(todo)}] {key}: FAILED: {error}", flush=True)

    if aggregates and (todo or force or not _aggregates_exist(data_dir)):
        say(f"[aggregate] materializing {', '.join(k.to_user_string() for k in aggregates)} ...")
        ok, error = _materialize(instance, aggregates)
        if not ok:
            failures.append(("aggregates", error))
            print(f"  aggregates FAILED: {error}")

    print(f"\nrts refresh: done in {time.perf_counter() - started:.1f}s")
    print(f"reward_streams partitions ({len(written)}):")
    for path in sorted(written):
        print(f"  {path}")
    verdicts_file = storage.verdicts_path(data_dir)
    if verdicts_file.exists():
        from rts_dagster.analysis.verdict import verdicts_from_table
        from rts_dagster.report.verdicts import headline

        print("verdicts:")
        for v in verdicts_from_table(pl.read_parquet(verdicts_file)):
            print(f"  {headline(v)}")
    report = storage.report_dir(data_dir) / "report.md"
    if report.exists():
        print(f"report: {report}")
        print(f"        {report.with_suffix('.html')}")
    lp_recs = storage.lp_aggregate_paths(data_dir)["recommendations"]
    if lp_recs.exists():
        n_tasks = pl.read_parquet(lp_recs, columns=["task"])["task"].n_unique()
        print(f"LP recommendations ({n_tasks} tasks, with evidence in the report): {lp_recs}")
    if failures:
        print(f"{len(failures)} FAILED: " + ", ".join(k for k, _ in failures))
        return 1
    return 0


def _aggregates_exist(data_dir: Path) -> bool:
    return (storage.report_dir(data_dir) / "report.md").exists()
