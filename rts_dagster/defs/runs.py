"""Assets `discovered_runs` and `reward_streams`: from a run source to per-run parquet."""

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from rts_dagster import storage
from rts_dagster.analysis.streams import HISTORY_PREFIXES, build_reward_streams
from rts_dagster.defs.partitions import runs_partitions
from rts_dagster.defs.resources import RtsStorage, RunSourceResource
from rts_dagster.discovery import DiscoveryRules, classify_runs, row_files
from rts_dagster.escape import md_table
from rts_dagster.schema import (
    DISCOVERED_RUNS,
    GRANULARITY_COMPLETION,
    GRANULARITY_EPOCH,
    LP_REPLAY_METRICS,
    REWARD_STREAMS,
    RUN_STATUS_MATCHED,
    SERIES_METRICS,
    conform,
)
from rts_dagster.sources.base import RunRecord, UnreadableRun

# Bump when reward_streams' content changes for the same input: `rts refresh` rebuilds.
STREAMS_VERSION = "1"

_SECRET_HINTS = ("key", "token", "secret", "password", "passwd", "credential")


@dg.asset(
    group_name="runs",
    pool="wandb_api",
    description="Every run the configured source can see, with its task, seed and partition "
    "key, or why it was ignored/unreadable. Registers new runs as `reward_streams` partitions.",
)
def discovered_runs(
    context: dg.AssetExecutionContext, run_source: RunSourceResource, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    runs, unreadable = run_source.source().list_runs()
    known = set(context.instance.get_dynamic_partitions(runs_partitions.name))
    table, path, new_keys = write_discovered(
        runs, unreadable, run_source.rules(), rts_storage.root(), known
    )
    if new_keys:
        context.instance.add_dynamic_partitions(runs_partitions.name, new_keys)
    for row in table.filter(pl.col("status") != RUN_STATUS_MATCHED).iter_rows(named=True):
        context.log.warning(f"{row['status']} run {row['location']}: {row['reason']}")

    return dg.MaterializeResult(
        metadata={
            **discovery_metadata(table, path, new_keys),
            "preview": dg.MetadataValue.md(_runs_preview(table)),
        }
    )


def write_discovered(
    runs: list[RunRecord],
    unreadable: list[UnreadableRun],
    rules: DiscoveryRules,
    root: Path,
    known_keys: set[str],
) -> tuple[pl.DataFrame, Path, list[str]]:
    """Classify every listed run, write discovered_runs.parquet (atomically) and return
    (table, path, partition keys not in `known_keys`). The asset and the sensor both
    discover through here, so they cannot assign different keys."""
    table = classify_runs(runs, unreadable, rules)
    path = storage.write_parquet(table, storage.discovered_runs_path(root))
    matched = table.filter(pl.col("status") == RUN_STATUS_MATCHED)
    new_keys = list(dict.fromkeys(k for k in matched["partition_key"] if k not in known_keys))
    return table, path, new_keys


def discovery_metadata(table: pl.DataFrame, path: Path, new_keys: list[str]) -> dict[str, Any]:
    """Counts and path of a discovered_runs table (shared by the asset and the sensor)."""
    counts = dict(table.group_by("status").len().iter_rows())
    return {
        "dagster/row_count": table.height,
        "matched": counts.get(RUN_STATUS_MATCHED, 0),
        "ignored": counts.get("ignored", 0),
        "unreadable": counts.get("unreadable", 0),
        "new_partitions": len(new_keys),
        "path": dg.MetadataValue.path(str(path)),
    }


def _runs_preview(table: pl.DataFrame, limit: int = 30) -> str:
    cols = ["partition_key", "run_name", "state", "status", "reason"]
    rows = [
        [r[c] if r[c] is not None else "" for c in cols]
        for r in table.head(limit).iter_rows(named=True)
    ]
    more = f"\n\n… and {table.height - limit} more" if table.height > limit else ""
    return md_table(cols, rows) + more


def read_discovered(rts_storage: RtsStorage) -> pl.DataFrame:
    path = storage.discovered_runs_path(rts_storage.root())
    if not path.exists():
        raise dg.Failure(f"{path} does not exist: materialize `discovered_runs` first")
    return conform(pl.read_parquet(path), DISCOVERED_RUNS, "discovered_runs")


def run_for_partition(discovered: pl.DataFrame, key: str) -> dict[str, Any]:
    rows = discovered.filter(
        (pl.col("partition_key") == key) & (pl.col("status") == RUN_STATUS_MATCHED)
    )
    if rows.height == 0:
        raise dg.Failure(
            f"partition {key!r} is not in discovered_runs: the run is gone from the source "
            "or discovered_runs is out of date (re-materialize it)"
        )
    return rows.row(0, named=True)


@dataclass(frozen=True)
class PartitionStreams:
    """One materialized reward_streams partition, as the per-run assets downstream read it."""

    row: dict[str, Any]  # its discovered_runs row
    folder: str  # task folder (slug) of its files
    stem: str  # file stem (seed, plus the run id for a duplicate claim)
    path: Path  # <task>/<seed>.parquet
    streams: pl.DataFrame  # REWARD_STREAMS


def load_partition_streams(rts_storage: RtsStorage, key: str) -> PartitionStreams:
    """The reward_streams data of partition `key`; a clear Failure if it is not there."""
    row = run_for_partition(read_discovered(rts_storage), key)
    folder, stem = row_files(row)
    path = storage.stream_paths(rts_storage.root(), folder, stem)[0]
    if not path.exists():
        raise dg.Failure(f"{path} is missing: materialize reward_streams[{key}]")
    streams = conform(pl.read_parquet(path), REWARD_STREAMS, str(path))
    return PartitionStreams(row, folder, stem, path, streams)


def partition_is_current(root: Path, row: dict[str, Any]) -> bool:
    """True if the partition of `row` (a matched discovered_runs row) already holds this
    run's data: metadata.json of the same run, fingerprint and STREAMS_VERSION, and the
    series_metrics and lp_replay files, in the current table schemas."""
    folder, stem = row_files(row)
    _, meta_path = storage.stream_paths(root, folder, stem)
    derived = (
        (storage.metrics_paths(root, folder, stem)["series"], SERIES_METRICS),
        (storage.lp_replay_paths(root, folder, stem)["metrics"], LP_REPLAY_METRICS),
    )
    if not meta_path.exists() or not all(_has_schema(p, schema) for p, schema in derived):
        return False
    try:
        meta = storage.read_json(meta_path)
    except (OSError, ValueError):
        return False
    return (
        meta.get("run_id") == row["run_id"]
        and meta.get("fingerprint") == row["fingerprint"]
        and meta.get("streams_version") == STREAMS_VERSION
    )


def _has_schema(path: Path, schema: pl.Schema) -> bool:
    """The file exists and holds exactly `schema` (a file from an older version does not)."""
    try:
        return pl.read_parquet_schema(path) == dict(schema)
    except (OSError, pl.exceptions.PolarsError):
        return False


def redact(config: Any) -> Any:
    """The run config with values of secret-looking keys replaced (never store secrets)."""
    if isinstance(config, dict):
        return {
            k: "<redacted>" if any(h in str(k).lower() for h in _SECRET_HINTS) else redact(v)
            for k, v in config.items()
        }
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


# Thresholds of the reward_streams checks (WARN: the data is usable but read with care).
MAX_NONFINITE_FRACTION = 0.01
MAX_STALE_FRACTION = 0.5
MIN_SERIES_SAMPLES = 25  # the default rolling-slope window


@dg.asset(
    group_name="runs",
    partitions_def=runs_partitions,
    deps=[discovered_runs],
    pool="wandb_api",
    check_specs=[
        dg.AssetCheckSpec("schema_round_trip", asset="reward_streams"),
        dg.AssetCheckSpec("finite_rewards", asset="reward_streams"),
        dg.AssetCheckSpec("stale_fraction", asset="reward_streams"),
        dg.AssetCheckSpec("series_long_enough", asset="reward_streams"),
    ],
    description="Every label's reward series of one training run (epoch means and, when "
    "recorded, the per-completion stream), in sample order. "
    "File: $RTS_DATA_DIR/<task>/<seed>.parquet (+ .metadata.json).",
)
def reward_streams(
    context: dg.AssetExecutionContext, run_source: RunSourceResource, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    key = context.partition_key
    row = run_for_partition(read_discovered(rts_storage), key)
    source = run_source.source()
    run = source.get_run(row["location"])

    started = time.perf_counter()
    history = source.read_history(run, key_prefixes=HISTORY_PREFIXES)
    completions = source.read_completions(run)
    streams = build_reward_streams(history, completions, row["task"], row["seed"], row["run_id"])
    if streams.height == 0:
        raise dg.Failure(
            f"run {row['run_id']!r} ({row['location']}) has no `env_per_label_rewards/*` "
            "history and no per-completion stream: nothing to analyse"
        )
    folder, stem = row_files(row)
    parquet_path, meta_path = storage.stream_paths(rts_storage.root(), folder, stem)

    counts = {
        g: int(streams.filter(pl.col("granularity") == g).height)
        for g in (GRANULARITY_EPOCH, GRANULARITY_COMPLETION)
    }
    labels = streams["label"].unique().sort().to_list()
    metadata = {
        "partition_key": key,
        "streams_version": STREAMS_VERSION,
        "task": row["task"],
        "seed": row["seed"],
        "run_id": row["run_id"],
        "run_name": row["run_name"],
        "project": row["project"],
        "entity": row["entity"],
        "state": row["state"],
        "source": row["source"],
        "location": row["location"],
        # What the data was read at (may differ from discovered_runs': the run moved on
        # since discovery, or the read found a WandB export incomplete).
        "fingerprint": source.data_fingerprint(run),
        "discovered_fingerprint": row["fingerprint"],
        "created_at": row["created_at"],
        "heartbeat_at": row["heartbeat_at"],
        "materialized_at": datetime.now(UTC).isoformat(),
        "env_config": redact(run.config),
        "lp_config": json.loads(row["lp_config"] or "{}"),
        "agent_version": _agent_version(run),
        "row_counts": {"total": streams.height, **counts},
        "history_rows": history.height,
        "labels": labels,
        "stale_fraction_epoch": _stale_fraction(streams),
        "schema": {name: str(dtype) for name, dtype in REWARD_STREAMS.items()},
    }
    # Parquet first, metadata last: metadata.json is the "this partition is complete" mark.
    storage.write_parquet(streams, parquet_path)
    storage.write_json(metadata, meta_path)
    context.log.info(
        f"{key}: {streams.height} rows ({counts}) over {len(labels)} labels "
        f"in {time.perf_counter() - started:.2f}s -> {parquet_path}"
    )
    return dg.MaterializeResult(
        check_results=stream_checks(streams, parquet_path),
        metadata={
            "dagster/row_count": streams.height,
            "epoch_rows": counts[GRANULARITY_EPOCH],
            "completion_rows": counts[GRANULARITY_COMPLETION],
            "labels": len(labels),
            "run_id": row["run_id"],
            "stale_fraction_epoch": metadata["stale_fraction_epoch"],
            "path": dg.MetadataValue.path(str(parquet_path)),
            "metadata_path": dg.MetadataValue.path(str(meta_path)),
        },
    )


def stream_checks(streams: pl.DataFrame, parquet_path: Path) -> list[dg.AssetCheckResult]:
    """Data-quality checks of one partition, run inside its materialization."""
    warn = dg.AssetCheckSeverity.WARN
    written = pl.read_parquet_schema(parquet_path)
    mismatched = {
        name: str(written.get(name))
        for name, dtype in REWARD_STREAMS.items()
        if written.get(name) != dtype
    }
    n_bad = int(streams.filter(~pl.col("reward").is_finite()).height)
    bad_fraction = n_bad / max(streams.height, 1)
    stale = _stale_fraction(streams)
    lengths = streams.group_by("granularity", "label").len()
    short = lengths.filter(pl.col("len") < MIN_SERIES_SAMPLES)
    short_names = [f"{g}:{lab} ({n})" for g, lab, n in short.head(10).iter_rows()]
    return [
        dg.AssetCheckResult(
            check_name="schema_round_trip",
            passed=not mismatched,
            metadata={"mismatched_columns": str(mismatched or "none")},
        ),
        dg.AssetCheckResult(
            check_name="finite_rewards",
            passed=bad_fraction <= MAX_NONFINITE_FRACTION,
            severity=warn,
            metadata={"nonfinite_rows": n_bad, "fraction": bad_fraction},
        ),
        dg.AssetCheckResult(
            check_name="stale_fraction",
            passed=stale is None or stale <= MAX_STALE_FRACTION,
            severity=warn,
            metadata={"stale_fraction_epoch": stale, "threshold": MAX_STALE_FRACTION},
        ),
        dg.AssetCheckResult(
            check_name="series_long_enough",
            passed=short.height == 0,
            severity=warn,
            metadata={
                "short_series": short.height,
                "min_samples": MIN_SERIES_SAMPLES,
                "examples": ", ".join(short_names) or "none",
            },
        ),
    ]


def _stale_fraction(streams: pl.DataFrame) -> float | None:
    epoch = streams.filter(pl.col("granularity") == GRANULARITY_EPOCH)
    return float(epoch["is_stale"].mean()) if epoch.height else None


def _agent_version(run: RunRecord) -> str | None:
    for key in ("agent_version", "policy_version", "git_hash", "metta_git_hash"):
        value = run.config.get(key)
        if isinstance(value, str | int):
            return str(value)
    return run.extra.get("agent_version")
