"""`rts refresh`: bring every asset up to date on the persistent Dagster instance.

Everything is recorded on the instance in `$DAGSTER_HOME` (so `make ui` shows the
history). discovered_runs is written in this process and reported as a runless
materialization, as the sensor does (a Dagster run for it cost ~0.6 s of fixed overhead
per refresh). Then one Dagster run per batch of new or changed partitions (reward_streams
and its partitioned downstream), then one run for the unpartitioned aggregates; one new
partition and the aggregates share a run.

The aggregates are rebuilt whenever what they were built from (the partitions' runs and
fingerprints, and the code) differs from the manifest written after their last complete
build, so a failed or killed aggregate step is redone by the next refresh. Every untrusted
string printed (run names, keys, errors) has its control characters escaped.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from rts_dagster import storage
from rts_dagster.definitions import ASSETS, RESOURCES, defs
from rts_dagster.defs.partitions import runs_partitions
from rts_dagster.defs.per_run import code_fingerprint
from rts_dagster.defs.resources import RtsStorage
from rts_dagster.defs.runs import (
    SchemaMemo,
    discover_runs,
    discovered_runs_event,
    discovered_runs_metadata,
    partition_is_current,
)
from rts_dagster.discovery import row_files
from rts_dagster.escape import terminal_text as tt
from rts_dagster.parallel import run_spawned
from rts_dagster.schema import RUN_STATUS_MATCHED
from rts_dagster.settings import REFRESH_BATCH

_QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
# Seconds between "still running" lines while one Dagster run is in progress.
HEARTBEAT_S = 10.0
_MANIFEST_VERSION = 1


def aggregate_inputs(matched: pl.DataFrame) -> dict[str, Any]:
    """What the aggregates are built from: each matched partition's key, run id and
    fingerprint, and the code version."""
    partitions = sorted(
        [row["partition_key"], row["run_id"], row["fingerprint"]]
        for row in matched.select("partition_key", "run_id", "fingerprint").iter_rows(named=True)
    )
    return {"version": _MANIFEST_VERSION, "code": code_fingerprint(), "partitions": partitions}


def aggregates_current(data_dir: Path, inputs: dict[str, Any]) -> bool:
    """True if the last complete aggregate build was from exactly `inputs` and its report
    is still there."""
    if not (storage.report_dir(data_dir) / "report.md").exists():
        return False
    try:
        return storage.read_json(storage.aggregates_manifest_path(data_dir)) == inputs
    except (OSError, ValueError):
        return False


def _running_steps(instance: dg.DagsterInstance, run_id: str | None) -> list[str]:
    """Steps of the Dagster run `run_id` that started and have not ended yet."""
    if run_id is None:
        return []

    started: dict[str, None] = {}
    ended: set[str] = set()
    step_events = {
        dg.DagsterEventType.STEP_START,
        dg.DagsterEventType.STEP_SUCCESS,
        dg.DagsterEventType.STEP_FAILURE,
    }
    # only the step events (filtered in the event log's SQL): this runs beside the steps
    for record in instance.all_logs(run_id, of_type=step_events):
        event = record.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            started[event.step_key] = None
        elif event.event_type in (
            dg.DagsterEventType.STEP_SUCCESS,
            dg.DagsterEventType.STEP_FAILURE,
        ):
            ended.add(event.step_key)
    return [step for step in started if step not in ended]


@contextmanager
def _heartbeat(
    say: Callable[[str], None], what: str, instance: dg.DagsterInstance | None
) -> Iterator[None]:
    """Print a line every `HEARTBEAT_S` seconds while the block runs, naming the steps
    (assets) of the newest Dagster run that are running."""
    stop = threading.Event()
    started = time.perf_counter()
    before = _newest_run_id(instance)

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            run_id = _newest_run_id(instance)
            try:
                steps = _running_steps(instance, run_id) if run_id != before else []
            except Exception:  # progress is best effort, never a failure
                steps = []
            running = f" (running: {', '.join(steps)})" if steps else ""
            say(f"  ... {what}: still running after {time.perf_counter() - started:.0f}s{running}")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def _warm_renderer() -> Iterator[None]:
    """The report's browser boots in the background while the steps before it run (the
    aggregates run in this process): its PNGs then take ~0.1 s each, not a ~1.5 s boot
    first. Closed at the end."""
    from rts_dagster.report.document import stop_renderer, warm_renderer

    try:
        warm_renderer()
    except Exception as exc:  # the report renders the usual way, and says so if it fails
        print(f"  (figure renderer not started ahead: {tt(str(exc))})", flush=True)
    try:
        yield
    finally:
        stop_renderer()


def _newest_run_id(instance: dg.DagsterInstance | None) -> str | None:
    if instance is None:
        return None
    try:
        runs = instance.get_runs(limit=1)
    except Exception:  # progress is best effort
        return None
    return runs[0].run_id if runs else None


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
    partition_range: tuple[str, str] | None = None,
) -> tuple[bool, str]:
    tags = {"rts/trigger": "rts refresh"}
    if partition_range is not None:
        tags["dagster/asset_partition_range_start"] = partition_range[0]
        tags["dagster/asset_partition_range_end"] = partition_range[1]
    result = dg.materialize(
        ASSETS,
        selection=keys,
        instance=instance,
        partition_key=partition_key,
        resources=RESOURCES,
        run_config=_QUIET_LOGS,
        raise_on_error=False,
        tags=tags,
    )
    if result.success:
        return True, ""
    errors = [
        ev.step_failure_data.error.message.strip() if ev.step_failure_data.error else str(ev)
        for ev in result.all_events
        if ev.is_step_failure
    ]
    return False, " | ".join(errors) or "run failed"


def _discover(instance: dg.DagsterInstance) -> tuple[bool, str]:
    """discovered_runs without a Dagster run: the asset's own function, then a runless
    materialization on the instance, so the UI shows when and what was discovered."""
    try:
        table, path, new_keys = discover_runs(
            instance, RESOURCES["run_source"], RESOURCES["rts_storage"].root()
        )
    except Exception as exc:  # a source error: reported, the refresh stops (exit 1)
        return False, f"{type(exc).__name__}: {exc}"
    instance.report_runless_asset_event(
        discovered_runs_event(
            discovered_runs_metadata(table, path, new_keys),
            "rts refresh",
            "Written by rts refresh.",
        )
    )
    return True, ""


def partition_batches(
    todo: list[str], order: list[str], batch_size: int, jobs: int = 1
) -> list[list[str]]:
    """`todo` keys as batches Dagster can run as one partition range: consecutive in the
    instance's partition `order` (a range covers every key between its ends), at most
    `batch_size` keys, and split so that `jobs` workers get work of similar size."""
    position = {key: i for i, key in enumerate(order)}
    # a key the instance does not list (yet) can only run alone
    alone = [[k] for k in todo if k not in position]
    ordered = sorted((k for k in todo if k in position), key=lambda k: position[k])
    stretches: list[list[str]] = []
    for key in ordered:
        if stretches and position[key] == position[stretches[-1][-1]] + 1:
            stretches[-1].append(key)
        else:
            stretches.append([key])
    size = max(1, min(batch_size, -(-len(ordered) // max(jobs, 1))))
    return [s[i : i + size] for s in stretches for i in range(0, len(s), size)] + alone


def materialize_batch(keys: list[str]) -> list[tuple[str, bool, str, float]]:
    """Materialize the per-run assets for `keys` (a partition range) in one run on this
    process' instance; if that run fails, every key again in a run of its own, so each
    failure is reported alone and each good partition is materialized. Returns
    (key, ok, error, seconds) per key. Importable: `--jobs` runs it in worker processes."""
    partitioned, _ = _partitioned_and_aggregate_keys(defs)
    instance = dg.DagsterInstance.get()
    started = time.perf_counter()
    if len(keys) == 1:
        ok, error = _materialize(instance, partitioned, partition_key=keys[0])
        return [(keys[0], ok, error, time.perf_counter() - started)]
    ok, error = _materialize(instance, partitioned, partition_range=(keys[0], keys[-1]))
    if ok:
        each = (time.perf_counter() - started) / len(keys)
        return [(key, True, "", each) for key in keys]
    out = []
    for key in keys:
        t0 = time.perf_counter()
        ok, error = _materialize(instance, partitioned, partition_key=key)
        out.append((key, ok, error, time.perf_counter() - t0))
    return out


def _partition_paths(data_dir: Path, row: dict[str, Any]) -> tuple[Path, Path]:
    folder, stem = row_files(row)
    return storage.stream_paths(data_dir, folder, stem)


# Up to this many partitions, one line each (progress and the final list); beyond, a line
# per batch and the folder: a refresh of a thousand runs stays readable.
LIST_PARTITIONS_UP_TO = 50


def verdict_lines(verdicts: list[Any], limit: int = LIST_PARTITIONS_UP_TO) -> list[str]:
    """What the terminal shows of the verdicts: each one's headline, or beyond `limit`
    tasks the headlines of those that change a setting (at most `limit`) and counts of the
    others by confidence; every verdict is in the report and verdicts.parquet."""
    from rts_dagster.report.verdicts import headline

    if len(verdicts) <= limit:
        return ["verdicts:", *(f"  {tt(headline(v))}" for v in verdicts)]
    changes = [v for v in verdicts if v.action == "change"]
    lines = [f"verdicts ({len(verdicts)} tasks; every one in the report):"]
    lines.append(f"  {len(changes)} change an LP setting" + (":" if changes else ""))
    lines += [f"    {tt(headline(v))}" for v in changes[:limit]]
    if len(changes) > limit:
        lines.append(f"    ... and {len(changes) - limit} more")
    kept: dict[str, int] = {}
    for v in verdicts:
        if v.action != "change":
            kept[v.confidence] = kept.get(v.confidence, 0) + 1
    by_confidence = ", ".join(f"{n} {tt(c)}" for c, n in sorted(kept.items()))
    lines.append(
        f"  {len(verdicts) - len(changes)} keep Metta's default LP settings"
        + (f" (confidence: {by_confidence})" if kept else "")
    )
    return lines


def default_jobs() -> int:
    return max(1, os.cpu_count() or 1)


def refresh(
    force: bool = False, quiet: bool = False, jobs: int | None = None, batch: int = REFRESH_BATCH
) -> int:
    """Run the whole pipeline; returns a process exit code (1 if anything failed).
    `jobs`: worker processes for the per-run assets (default: the machine's cores);
    `batch`: partitions per Dagster run (1 = one run per partition)."""
    return _refresh(force, quiet, jobs, batch)


def _refresh(force: bool, quiet: bool, jobs: int | None, batch: int) -> int:
    jobs = default_jobs() if jobs is None else max(1, jobs)

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    def shout(msg: str) -> None:
        print(msg, flush=True)

    started = time.perf_counter()
    instance = dg.DagsterInstance.get()
    data_dir = RtsStorage().root()
    partitioned, aggregates = _partitioned_and_aggregate_keys(defs)

    say(f"rts refresh: instance {tt(instance.root_directory)}, data {tt(data_dir)}")
    say("[discover] discovered_runs ...")
    with _heartbeat(say, "discovered_runs", instance):
        ok, error = _discover(instance)
    if not ok:
        shout(f"rts refresh: discovered_runs failed: {tt(error)}")
        return 1
    discovered = pl.read_parquet(storage.discovered_runs_path(data_dir))
    matched = discovered.filter(pl.col("status") == RUN_STATUS_MATCHED).sort("partition_key")
    others = discovered.filter(pl.col("status") != RUN_STATUS_MATCHED)
    say(f"[discover] {discovered.height} runs: {matched.height} matched, {others.height} not")
    for row in others.iter_rows(named=True):
        shout(
            f"  ! {tt(row['status'])}: {tt(row['run_name'] or row['location'])}: "
            f"{tt(row['reason'])}"
        )

    failures: list[tuple[str, str]] = []
    written: list[Path] = []
    todo = []
    schemas = SchemaMemo(data_dir)
    for row in matched.iter_rows(named=True):
        parquet_path, _ = _partition_paths(data_dir, row)
        if force or not partition_is_current(data_dir, row, schemas):
            todo.append((row, parquet_path))
        else:
            written.append(parquet_path)
    schemas.save(forget_unseen=not force)
    say(f"[partitions] {len(todo)} new or changed, {matched.height - len(todo)} up to date")
    paths_of = {row["partition_key"]: path for row, path in todo}
    order = list(instance.get_dynamic_partitions(runs_partitions.name))
    batches = partition_batches(list(paths_of), order, max(1, batch), jobs)
    done = 0
    t_partitions = time.perf_counter()
    one_line_each = len(todo) <= LIST_PARTITIONS_UP_TO
    inputs = aggregate_inputs(matched)
    rebuild = bool(aggregates) and bool(todo or force or not aggregates_current(data_dir, inputs))
    aggregated: tuple[bool, str] | None = None  # the aggregates' outcome, once they ran
    combined: list[tuple[str, bool, str, float]] = []  # the partition run with them
    if rebuild and len(batches) == 1 and len(batches[0]) == 1:
        # one new run (the usual refresh): its per-run assets and the aggregates in one
        # Dagster run, which saves a run's fixed cost; if it fails, both run apart below
        (key,) = batches[0]
        say(f"[partitions+aggregate] {tt(key)} and the aggregates in one Dagster run ...")
        storage.aggregates_manifest_path(data_dir).unlink(missing_ok=True)
        with _heartbeat(say, "[partitions+aggregate]", instance), _warm_renderer():
            t0 = time.perf_counter()
            ok, error = _materialize(instance, [*partitioned, *aggregates], partition_key=key)
        if ok:
            batches, aggregated = [], (True, "")
            combined.append((key, True, "", time.perf_counter() - t0))
        else:
            say(f"  that run failed ({tt(error)}): the partition and the aggregates apart")
    if batches:
        say(
            f"[partitions] {len(batches)} Dagster run(s) of up to {max(map(len, batches))} "
            f"partitions on {min(jobs, len(batches))} worker process(es)"
        )
    spawned = (
        results for _, results in run_spawned(materialize_batch, [(b,) for b in batches], jobs)
    )
    with _heartbeat(say, "[partitions]", instance):
        for results in itertools.chain([combined] if combined else [], spawned):
            good = 0
            for key, ok, error, seconds in results:
                done += 1
                if ok:
                    good += 1
                    written.append(paths_of[key])
                    if one_line_each:
                        say(
                            f"  [{done}/{len(todo)}] {tt(key)}: ok ({seconds:.2f}s per "
                            f"partition) -> {tt(paths_of[key])}"
                        )
                else:
                    failures.append((key, error))
                    shout(f"  [{done}/{len(todo)}] {tt(key)}: FAILED: {tt(error)}")
            if not one_line_each and results:
                first, last, seconds = results[0][0], results[-1][0], results[-1][3]
                say(
                    f"  [{done}/{len(todo)}] {tt(first)} .. {tt(last)}: {good} of "
                    f"{len(results)} ok ({seconds:.2f}s per partition)"
                )
    if todo:
        say(f"[partitions] {len(todo)} in {time.perf_counter() - t_partitions:.1f}s")

    if rebuild:
        if aggregated is None:
            names = ", ".join(k.to_user_string() for k in aggregates)
            say(f"[aggregate] materializing {names} ...")
            # no manifest while they are rebuilt: a kill or a failure leaves them out of date
            storage.aggregates_manifest_path(data_dir).unlink(missing_ok=True)
            with _heartbeat(say, "[aggregate]", instance), _warm_renderer():
                aggregated = _materialize(instance, aggregates)
        ok, error = aggregated
        if not ok:
            failures.append(("aggregates", error))
            shout(f"  aggregates FAILED: {tt(error)}")
        elif not failures:
            # built from every current partition: record from what
            storage.write_json(inputs, storage.aggregates_manifest_path(data_dir))

    print(f"\nrts refresh: done in {time.perf_counter() - started:.1f}s")
    if len(written) <= LIST_PARTITIONS_UP_TO:
        print(f"reward_streams partitions ({len(written)}):")
        for path in sorted(written):
            print(f"  {tt(path)}")
    else:  # a path per run is a thousand lines: where they are and where the list is
        print(
            f"reward_streams partitions ({len(written)}): {tt(data_dir)}/<task>/<seed>.parquet "
            f"(partition_key and run of each: {tt(storage.discovered_runs_path(data_dir))})"
        )
    verdicts_file = storage.verdicts_path(data_dir)
    if verdicts_file.exists():
        from rts_dagster.analysis.verdict import verdicts_from_table

        for line in verdict_lines(verdicts_from_table(pl.read_parquet(verdicts_file))):
            print(line)
    report = storage.report_dir(data_dir) / "report.md"
    if report.exists():
        print(f"report: {tt(report)}")
        print(f"        {tt(report.with_suffix('.html'))}")
    lp_recs = storage.lp_aggregate_paths(data_dir)["recommendations"]
    if lp_recs.exists():
        n_tasks = pl.read_parquet(lp_recs, columns=["task"])["task"].n_unique()
        print(f"LP recommendations ({n_tasks} tasks, with evidence in the report): {tt(lp_recs)}")
    experiment = storage.experiment_paths(data_dir)
    if experiment["comparison"].exists():
        compared = pl.read_parquet(experiment["comparison"], columns=["task", "arm"]).unique()
        print(
            f"experiments ({compared.height} arms compared with their baseline): "
            f"{tt(experiment['comparison'])}"
        )
    if experiment["plan_md"].exists():
        print(f"experiment plan: {tt(experiment['plan_md'])}")
    if failures:
        print(f"{len(failures)} FAILED: " + ", ".join(tt(k) for k, _ in failures))
        return 1
    return 0
