"""Assets `discovered_runs` and `reward_streams`: from a run source to per-run parquet."""

import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from rts_dagster import storage
from rts_dagster.analysis.streams import (
    HISTORY_PREFIXES,
    build_reward_streams,
    describe_step_issues,
    step_issues,
)
from rts_dagster.defs.batches import (
    BACKFILL_POLICY,
    PartitionOutcome,
    materialize_partitions,
    partition_log,
)
from rts_dagster.defs.partitions import runs_partitions
from rts_dagster.defs.resources import RtsStorage, RunSourceResource
from rts_dagster.discovery import DiscoveryRules, classify_runs, row_files, upgrade_discovered
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
STREAMS_VERSION = "2"  # 2: corrupt agent steps held, not fatal

REDACTED = "<redacted>"
# Config keys whose values are never stored (matched anywhere in the lower-cased key).
_SECRET_KEY = re.compile(
    r"key|token|secret|passw|pwd|passphrase|credential|auth|cookie|session|private|signature"
)
# Keys whose values are identifiers, not secrets: exempt from the high-entropy rule only.
_IDENTIFIER_KEY = re.compile(r"hash|commit|sha|version|uuid|checksum|digest|md5|(^|_)id$")
_SECRET_WORD = r"(?:key|token|secret|passw(?:or)?d|pwd|passphrase|credential|auth)"
# Secrets inside string values (any key): each keeps its label and loses the secret.
_SECRET_VALUES = (
    # scheme://user:password@host -> scheme://user:<redacted>@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(@)"), rf"\g<1>{REDACTED}\g<2>"),
    # Authorization: Bearer xyz / Basic xyz / token xyz
    (re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]{8,}"), rf"\1\2{REDACTED}"),
    # --wandb-api-key=xyz, --token xyz, -password=xyz
    (
        re.compile(rf"(?i)(--?[\w.-]*{_SECRET_WORD}[\w.-]*)(=|\s+)(?!-)\S+"),
        rf"\1\2{REDACTED}",
    ),
    # WANDB_API_KEY=xyz, db_password=xyz (env-style assignments)
    (re.compile(rf"(?i)\b(\w*{_SECRET_WORD}\w*=)\S+"), rf"\1{REDACTED}"),
)
_SECRET_FLAG = re.compile(rf"(?i)--?[\w.-]*{_SECRET_WORD}[\w.-]*")
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/_=-]{32,}")
_MIN_TOKEN_ENTROPY_BITS = 4.0  # per character (random base64: ~5; 32 distinct symbols: 5)


@dg.asset(
    group_name="runs",
    pool="wandb_api",
    description="Every run the configured source can see, with its task (recipe, from the "
    "config or an alias), arm (runs differing from the task's baseline in a config value), "
    "seed, the rule that decided and its partition key, or why it was ignored/unreadable. "
    "Registers new runs as `reward_streams` partitions.",
)
def discovered_runs(
    context: dg.AssetExecutionContext, run_source: RunSourceResource, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    table, path, new_keys = discover_runs(context.instance, run_source, rts_storage.root())
    for row in table.filter(pl.col("status") != RUN_STATUS_MATCHED).iter_rows(named=True):
        context.log.warning(f"{row['status']} run {row['location']}: {row['reason']}")
    return dg.MaterializeResult(metadata=discovered_runs_metadata(table, path, new_keys))


def discover_runs(
    instance: dg.DagsterInstance, run_source: RunSourceResource, root: Path
) -> tuple[pl.DataFrame, Path, list[str]]:
    """What the `discovered_runs` asset does, callable outside a run (`rts refresh`): list
    the runs, write discovered_runs.parquet, register new partition keys. Returns
    (table, path, new keys)."""
    runs, unreadable = run_source.source().list_runs()
    known = set(instance.get_dynamic_partitions(runs_partitions.name))
    table, path, new_keys = write_discovered(runs, unreadable, run_source.rules(), root, known)
    if new_keys:
        instance.add_dynamic_partitions(runs_partitions.name, new_keys)
    return table, path, new_keys


def discovered_runs_metadata(
    table: pl.DataFrame, path: Path, new_keys: list[str]
) -> dict[str, Any]:
    """The asset's metadata: counts, path and a preview of the runs."""
    return {
        **discovery_metadata(table, path, new_keys),
        "preview": dg.MetadataValue.md(_runs_preview(table)),
    }


def discovered_runs_event(
    metadata: dict[str, Any], written_by: str, description: str
) -> dg.AssetMaterialization:
    """discovered_runs written outside a Dagster run (the sensor, `rts refresh`), as a
    runless materialization for the instance, so the UI shows every discovery."""
    return dg.AssetMaterialization(
        asset_key=discovered_runs.key,
        description=description,
        metadata={**metadata, "written_by": written_by},
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
    discover through here, so they cannot assign different keys.

    The previous discovered_runs.parquet keeps every run's key across refreshes; when it
    exists, `known_keys` (registered partitions, e.g. of runs gone since) are reserved so
    no new run takes one over. Without it (first discovery, or the file was removed) keys
    follow from the runs alone, and `reward_streams` refuses to overwrite another run's file.
    """
    previous = _previous_discovered(storage.discovered_runs_path(root))
    reserved = known_keys if previous is not None else set()
    table = classify_runs(runs, unreadable, rules, previous=previous, reserved_keys=reserved)
    path = storage.write_parquet(table, storage.discovered_runs_path(root))
    matched = table.filter(pl.col("status") == RUN_STATUS_MATCHED)
    new_keys = list(dict.fromkeys(k for k in matched["partition_key"] if k not in known_keys))
    return table, path, new_keys


def _previous_discovered(path: Path) -> pl.DataFrame | None:
    """The last discovered_runs table, or None if absent or unreadable (keys then start
    afresh; the file guard in `reward_streams` still protects existing partitions)."""
    if not path.exists():
        return None
    try:
        return _read_discovered_file(path)
    except Exception:
        return None


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
    cols = ["partition_key", "run_name", "task", "arm", "seed", "state", "status", "reason"]
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
    return _read_discovered_file(path)


def _read_discovered_file(path: Path) -> pl.DataFrame:
    # tables written before the `url` column get it filled in (no rediscovery needed)
    return conform(upgrade_discovered(pl.read_parquet(path)), DISCOVERED_RUNS, str(path))


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


def load_partition_streams(
    rts_storage: RtsStorage, key: str, discovered: pl.DataFrame | None = None
) -> PartitionStreams:
    """The reward_streams data of partition `key`; a clear Failure if it is not there.
    `discovered`: the discovered_runs table when the caller has read it (batches)."""
    table = read_discovered(rts_storage) if discovered is None else discovered
    row = run_for_partition(table, key)
    folder, stem = row_files(row)
    path = storage.stream_paths(rts_storage.root(), folder, stem)[0]
    if not path.exists():
        raise dg.Failure(f"{path} is missing: materialize reward_streams[{key}]")
    streams = conform(pl.read_parquet(path), REWARD_STREAMS, str(path))
    return PartitionStreams(row, folder, stem, path, streams)


def partition_is_current(
    root: Path, row: dict[str, Any], schemas: "SchemaMemo | None" = None
) -> bool:
    """True if the partition of `row` (a matched discovered_runs row) already holds this
    run's data: metadata.json of the same run, fingerprint and STREAMS_VERSION, and the
    series_metrics and lp_replay files, in the current table schemas. `schemas`: a memo
    of the files' schemas (checking a thousand partitions reads a thousand footers)."""
    folder, stem = row_files(row)
    _, meta_path = storage.stream_paths(root, folder, stem)
    derived = (
        (storage.metrics_paths(root, folder, stem)["series"], SERIES_METRICS),
        (storage.lp_replay_paths(root, folder, stem)["metrics"], LP_REPLAY_METRICS),
    )
    has_schema = schemas.has_schema if schemas is not None else _has_schema
    if not meta_path.exists() or not all(has_schema(p, schema) for p, schema in derived):
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


def _schema_digest(schema: dict[str, Any]) -> str:
    return hashlib.sha256(repr(sorted(schema.items())).encode()).hexdigest()[:16]


class SchemaMemo:
    """The schema of each parquet file checked, by path, size and mtime, kept in
    `cache/partition_schemas.json` between processes: an unchanged file's footer is not
    read again. Derived, safe to delete; `save` writes it when it changed."""

    def __init__(self, root: Path) -> None:
        self.path = storage.cache_dir(root) / "partition_schemas.json"
        try:
            saved = storage.read_json(self.path)
            self.entries: dict[str, list] = saved if isinstance(saved, dict) else {}
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False
        self.seen: set[str] = set()

    def has_schema(self, path: Path, schema: pl.Schema) -> bool:
        """`_has_schema`, from the memo when the file's size and mtime are unchanged."""
        try:
            stamp = storage.file_stamp(path)
        except OSError:
            return False
        if stamp is None:
            return False
        self.seen.add(str(path))
        entry = self.entries.get(str(path))
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp:
            return entry[2] == _schema_digest(dict(schema))
        try:
            digest = _schema_digest(dict(pl.read_parquet_schema(path)))
        except (OSError, pl.exceptions.PolarsError):
            return False
        self.entries[str(path)] = [*stamp, digest]
        self.changed = True
        return digest == _schema_digest(dict(schema))

    def save(self, forget_unseen: bool = False) -> None:
        """Write the memo if it changed; `forget_unseen`: drop the files not checked by this
        memo (a refresh checks every partition: the others are gone)."""
        if forget_unseen and set(self.entries) - self.seen:
            self.entries = {k: v for k, v in self.entries.items() if k in self.seen}
            self.changed = True
        if self.changed:
            storage.write_json(self.entries, self.path)
            self.changed = False


def redact(config: Any, key: str = "") -> Any:
    """The run config with secrets replaced by `<redacted>` (never store secrets).

    By key: the whole value of a secret-looking key (`api_key`, `pwd`, `passphrase`,
    `Authorization`, ...). By value, in every string: credentials in URLs, bearer/basic
    tokens, `--*key=`/`--*token=` style arguments, `*_KEY=` assignments, and long
    high-entropy tokens (except under identifier keys such as `git_hash`)."""
    if isinstance(config, dict):
        return {
            k: REDACTED if _SECRET_KEY.search(str(k).lower()) else redact(v, str(k))
            for k, v in config.items()
        }
    if isinstance(config, list | tuple):  # an argv: `--token`, `<secret>` as two items
        after_flag = [False] + [
            isinstance(v, str) and bool(_SECRET_FLAG.fullmatch(v)) for v in config[:-1]
        ]
        return [
            REDACTED if flag else redact(v, key)
            for v, flag in zip(config, after_flag, strict=False)
        ]
    if isinstance(config, str):
        return redact_text(config, identifier=bool(_IDENTIFIER_KEY.search(key.lower())))
    return config


def redact_text(text: str, identifier: bool = False) -> str:
    """`text` with the secrets `redact` recognises in values replaced by `<redacted>`."""
    for pattern, replacement in _SECRET_VALUES:
        text = pattern.sub(replacement, text)
    if identifier:
        return text
    return _LONG_TOKEN.sub(lambda m: REDACTED if _looks_random(m.group(0)) else m.group(0), text)


def _looks_random(token: str) -> bool:
    """A long hex string (API keys), or a long token mixing upper case, lower case and
    digits with the character entropy of a random key (base64/alphanumeric secrets)."""
    if set(token) <= set("0123456789abcdef") or set(token) <= set("0123456789ABCDEF"):
        return len(token) >= 32 and not token.isdigit() and not token.isalpha()
    if not (
        any(c.isupper() for c in token)
        and any(c.islower() for c in token)
        and any(c.isdigit() for c in token)
    ):
        return False
    counts = Counter(token)
    entropy = -sum(n / len(token) * math.log2(n / len(token)) for n in counts.values())
    return entropy >= _MIN_TOKEN_ENTROPY_BITS


# Thresholds of the reward_streams checks (WARN: the data is usable but read with care).
MAX_NONFINITE_FRACTION = 0.01
MAX_STALE_FRACTION = 0.5
MIN_SERIES_SAMPLES = 25  # the default rolling-slope window


@dg.asset(
    group_name="runs",
    partitions_def=runs_partitions,
    deps=[discovered_runs],
    pool="wandb_api",
    backfill_policy=BACKFILL_POLICY,
    check_specs=[
        dg.AssetCheckSpec(
            "schema_round_trip",
            asset="reward_streams",
            description="The parquet written for this run reads back with exactly the "
            "REWARD_STREAMS columns and dtypes (rts_dagster/schema.py).",
        ),
        dg.AssetCheckSpec(
            "finite_rewards",
            asset="reward_streams",
            description=f"At most {MAX_NONFINITE_FRACTION:.0%} of rows have a NaN or infinite "
            "reward (warning: such rows are dropped from every metric).",
        ),
        dg.AssetCheckSpec(
            "stale_fraction",
            asset="reward_streams",
            description=f"At most {MAX_STALE_FRACTION:.0%} of epoch rows repeat the label's "
            "previous value exactly (Metta's held values make exact repeats rare; many "
            "repeats mean the label was hardly logged anew).",
        ),
        dg.AssetCheckSpec(
            "series_long_enough",
            asset="reward_streams",
            description=f"Every label has at least {MIN_SERIES_SAMPLES} samples per "
            "granularity (the rolling-slope window).",
        ),
    ],
    description="Every label's reward series of one training run (epoch means and, when "
    "recorded, the per-completion stream), in sample order. "
    "File: $RTS_DATA_DIR/TASK/SEED.parquet (+ .metadata.json).",
)
def reward_streams(
    context: dg.AssetExecutionContext, run_source: RunSourceResource, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    discovered = read_discovered(rts_storage)
    source = run_source.source()
    info = partition_log(context)
    return materialize_partitions(
        context, lambda key: _read_partition(context, info, source, rts_storage, discovered, key)
    )


def _read_partition(
    context: dg.AssetExecutionContext,
    info: Callable[[str], None],
    source: Any,
    rts_storage: RtsStorage,
    discovered: pl.DataFrame,
    key: str,
) -> PartitionOutcome:
    """One partition of reward_streams: read the run, write its parquet and metadata."""
    row = run_for_partition(discovered, key)
    run = source.get_run(row["location"])

    started = time.perf_counter()
    history = source.read_history(run, key_prefixes=HISTORY_PREFIXES)
    completions = source.read_completions(run)
    streams = build_reward_streams(history, completions, row["task"], row["seed"], row["run_id"])
    issues = step_issues(history, completions)
    for note in describe_step_issues(issues):
        context.log.warning(f"{row['run_id']}: {note}")
    if streams.height == 0:
        raise dg.Failure(
            f"run {row['run_id']!r} ({row['location']}) has no `env_per_label_rewards/*` "
            "history and no per-completion stream: nothing to analyse"
        )
    folder, stem = row_files(row)
    parquet_path, meta_path = storage.stream_paths(rts_storage.root(), folder, stem)
    _refuse_other_runs_files(meta_path, row, key)

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
        "step_issues": issues,
        "step_notes": describe_step_issues(issues),
        "schema": {name: str(dtype) for name, dtype in REWARD_STREAMS.items()},
    }
    # Parquet first, metadata last: metadata.json is the "this partition is complete" mark.
    storage.write_parquet(streams, parquet_path)
    storage.write_json(metadata, meta_path)
    info(
        f"{key}: {streams.height} rows ({counts}) over {len(labels)} labels "
        f"in {time.perf_counter() - started:.2f}s -> {parquet_path}"
    )
    return PartitionOutcome(
        checks=stream_checks(streams, parquet_path, str(key)),
        summary={"rows": streams.height, "labels": len(labels), "run_id": row["run_id"]},
        metadata={
            "dagster/row_count": streams.height,
            "epoch_rows": counts[GRANULARITY_EPOCH],
            "completion_rows": counts[GRANULARITY_COMPLETION],
            "labels": len(labels),
            "run_id": row["run_id"],
            **({"wandb_url": dg.MetadataValue.url(row["url"])} if row.get("url") else {}),
            "stale_fraction_epoch": metadata["stale_fraction_epoch"],
            "agent_step_invalid": issues["agent_step_invalid"],
            "agent_step_negative": issues["agent_step_negative"],
            "agent_step_backward": issues["agent_step_backward"],
            "path": dg.MetadataValue.path(str(parquet_path)),
            "metadata_path": dg.MetadataValue.path(str(meta_path)),
        },
    )


def _refuse_other_runs_files(meta_path: Path, row: dict[str, Any], key: str) -> None:
    """Fail instead of overwriting a partition file written for a different run (its key
    history was lost, e.g. discovered_runs.parquet deleted): data is never swapped silently."""
    try:
        owner = storage.read_json(meta_path).get("run_id") if meta_path.exists() else None
    except (OSError, ValueError):
        owner = None  # a damaged metadata file marks an incomplete partition: rewrite it
    if owner is not None and owner != row["run_id"]:
        raise dg.Failure(
            f"partition {key!r}: {meta_path} holds run {owner!r}, not run {row['run_id']!r}; "
            "not overwriting it. Move that file away (or restore discovered_runs.parquet) "
            "and materialize again."
        )


def stream_checks(
    streams: pl.DataFrame, parquet_path: Path, partition_key: str = ""
) -> list[dg.AssetCheckResult]:
    """Data-quality checks of one partition, run inside its materialization; every result
    names the partition it ran on."""
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
            metadata={"partition": partition_key, "mismatched_columns": str(mismatched or "none")},
        ),
        dg.AssetCheckResult(
            check_name="finite_rewards",
            passed=bad_fraction <= MAX_NONFINITE_FRACTION,
            severity=warn,
            metadata={
                "partition": partition_key,
                "nonfinite_rows": n_bad,
                "fraction": bad_fraction,
            },
        ),
        dg.AssetCheckResult(
            check_name="stale_fraction",
            passed=stale is None or stale <= MAX_STALE_FRACTION,
            severity=warn,
            metadata={
                "partition": partition_key,
                "stale_fraction_epoch": stale,
                "threshold": MAX_STALE_FRACTION,
            },
        ),
        dg.AssetCheckResult(
            check_name="series_long_enough",
            passed=short.height == 0,
            severity=warn,
            metadata={
                "partition": partition_key,
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
