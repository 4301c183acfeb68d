"""Per-run results of the aggregate assets, computed once per version of a partition.

Several aggregates start with work that is done run by run: the series quality of
`data_quality`, the local-level fits and epoch view of `timescale_recommendations`, the
learning slopes of `report`; and several read a small table of every partition (its
series metrics, noise bins, LP replay metrics). `per_run_table` computes such a table a few
runs at a time (so no step holds every partition's streams in memory), `per_run_files`
reads the partitions' files; both keep every run's rows in one file per table,
`cache/tables/<name>.parquet`, so the next refresh reads that one file and works only on
the runs that changed (a thousand small reads cost more than the work they save).

Each run's rows carry its partition key and a key naming its version: a hash of the code,
the table's name and settings, and the size and mtime of the run's input files (stream and
metadata, or the file read). A re-materialized partition, other settings or other code
compute it again; runs no longer asked for are dropped when the file is rewritten. Each run
also has one marker row (data columns null), so a run whose result has no rows is known as
computed. The file is replaced atomically: a killed step leaves the previous one.

Results are those of computing the table on every run at once (each compute function works
series by series or run by run; tested), up to float rounding in the last digits: some
vectorised kernels sum over a chunk's concatenated series.
"""

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import polars as pl

from rts_dagster import storage
from rts_dagster.discovery import row_files
from rts_dagster.schema import REWARD_STREAMS, conform

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
CHUNK_RUNS = 32  # runs whose streams are in memory at once
# bookkeeping columns of a cache file (never in a returned table)
_PARTITION, _KEY, _MARKER, _ORDER = "_cache_partition", "_cache_key", "_cache_marker", "_order"


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of every module of the package (schemas, analysis, report): tables built by
    other code are out of date. Read once per process (the code does not change under it)."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE_DIR).as_posix().encode())
        digest.update(b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(name: str, settings: object, inputs: Sequence[Path]) -> str:
    """16 hex digits naming one run's version of table `name`, from its input files."""
    text = json.dumps(
        [code_fingerprint(), name, settings, [storage.file_stamp(p) for p in inputs]],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_file(root: Path, name: str) -> Path:
    """The one file holding every run's rows of table `name` (a fixed, code-given name)."""
    return storage.cache_dir(root) / "tables" / f"{name}.parquet"


def _read_store(path: Path, schema: pl.Schema) -> pl.DataFrame | None:
    """The cache file, or None when it is absent or unreadable (then everything is
    computed again: the cache is derived)."""
    if not path.exists():
        return None
    try:
        stored = pl.read_parquet(path)
        return stored.select(
            pl.col(_PARTITION).cast(pl.String),
            pl.col(_KEY).cast(pl.String),
            pl.col(_MARKER).cast(pl.Boolean),
            *[pl.col(c).cast(t) for c, t in schema.items()],
        )
    except (OSError, pl.exceptions.PolarsError, ValueError):
        return None


def _markers(entries: list[tuple[dict[str, Any], str]], schema: pl.Schema) -> pl.DataFrame:
    """One marker row per run: its partition and key, data columns null."""
    return pl.DataFrame(
        {
            _PARTITION: [row["partition_key"] for row, _ in entries],
            _KEY: [key for _, key in entries],
            _MARKER: [True] * len(entries),
        },
        schema={_PARTITION: pl.String, _KEY: pl.String, _MARKER: pl.Boolean},
    ).with_columns(pl.lit(None, dtype=t).alias(c) for c, t in schema.items())


def cached_runs(
    root: Path,
    rows: list[dict[str, Any]],
    name: str,
    inputs_of: Callable[[dict[str, Any]], list[Path]],
    compute: Callable[[list[dict[str, Any]]], pl.DataFrame],
    schema: pl.Schema,
    settings: object = None,
    chunk: int = CHUNK_RUNS,
    log: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """Table `name` (columns `schema`) over the runs of `rows` (matched discovered_runs
    rows) whose first input file exists, concatenated in the order of `rows`.
    `inputs_of(row)`: the files a run's result is made from (the first must exist);
    `compute(rows)`: the rows of a few runs, each tagged with its partition key in column
    `_cache_partition`; only the runs not cached under their current key are computed,
    `chunk` at a time. `settings`: whatever else the result depends on (JSON-able)."""
    entries: list[tuple[dict[str, Any], str]] = []
    for row in rows:
        inputs = inputs_of(row)
        if inputs and inputs[0].exists():
            entries.append((row, cache_key(name, settings, inputs)))
    path = cache_file(root, name)
    stored = _read_store(path, schema)
    wanted = pl.DataFrame(
        {
            _PARTITION: [row["partition_key"] for row, _ in entries],
            _KEY: [key for _, key in entries],
            _ORDER: list(range(len(entries))),
        },
        schema={_PARTITION: pl.String, _KEY: pl.String, _ORDER: pl.Int64},
    )
    kept = (
        stored.join(wanted.select(_PARTITION, _KEY), on=[_PARTITION, _KEY], how="semi")
        if stored is not None
        else None
    )
    have = set() if kept is None else set(kept.filter(pl.col(_MARKER))[_PARTITION].to_list())
    todo = [entry for entry in entries if entry[0]["partition_key"] not in have]
    frames = [] if kept is None else [kept]
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        result = compute([row for row, _ in part])
        keys = pl.DataFrame(
            {_PARTITION: [row["partition_key"] for row, _ in part], _KEY: [k for _, k in part]},
            schema={_PARTITION: pl.String, _KEY: pl.String},
        )
        data = conform(result.drop(_PARTITION), schema, name).with_columns(
            result[_PARTITION].cast(pl.String)
        )
        data = data.join(keys, on=_PARTITION, how="inner", maintain_order="left")
        frames.append(_markers(part, schema))
        frames.append(data.with_columns(pl.lit(False).alias(_MARKER)).select(frames[-1].columns))
    if log is not None and entries:
        log(f"{name}: {len(todo)} run(s) computed, {len(entries) - len(todo)} from the cache")
    if not entries:
        return pl.DataFrame(schema=schema)
    store = pl.concat(frames, how="vertical") if frames else _markers([], schema)
    if todo or stored is None or store.height != stored.height:
        storage.write_parquet(store, path)
        legacy = storage.cache_dir(root) / name  # per-run files of earlier versions
        if legacy.is_dir():
            shutil.rmtree(legacy, ignore_errors=True)
    out = (
        store.filter(~pl.col(_MARKER))
        .join(wanted.select(_PARTITION, _ORDER), on=_PARTITION, how="inner")
        .sort(_ORDER, maintain_order=True)
    )
    return conform(out.select(schema.names()), schema, name)


def _stream_inputs(root: Path) -> Callable[[dict[str, Any]], list[Path]]:
    def inputs_of(row: dict[str, Any]) -> list[Path]:
        return list(storage.stream_paths(root, *row_files(row)))

    return inputs_of


def per_run_table(
    root: Path,
    rows: list[dict[str, Any]],
    name: str,
    compute: Callable[[pl.DataFrame], pl.DataFrame],
    schema: pl.Schema,
    settings: object = None,
    chunk: int = CHUNK_RUNS,
    log: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """`compute` (REWARD_STREAMS rows of some runs -> rows with a `run_id` column, computed
    run by run) over the runs of `rows` (matched discovered_runs rows) whose stream file
    exists, concatenated in the order of `rows`. Cached per run (module docstring);
    `settings`: whatever else the result depends on (JSON-able)."""
    inputs_of = _stream_inputs(root)

    def compute_runs(part: list[dict[str, Any]]) -> pl.DataFrame:
        streams = pl.concat(
            [
                conform(pl.read_parquet(path), REWARD_STREAMS, str(path))
                for path in (inputs_of(row)[0] for row in part)
            ]
        )
        result = conform(compute(streams), schema, name)
        partition_of = pl.DataFrame(
            {"run_id": [r["run_id"] for r in part], _PARTITION: [r["partition_key"] for r in part]},
            schema={"run_id": pl.String, _PARTITION: pl.String},
        )
        return result.join(partition_of, on="run_id", how="inner", maintain_order="left")

    return cached_runs(root, rows, name, inputs_of, compute_runs, schema, settings, chunk, log)


def per_run_files(
    root: Path,
    rows: list[dict[str, Any]],
    name: str,
    path_of: Callable[[dict[str, Any]], Path],
    schema: pl.Schema,
    log: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """The file `path_of(row)` of every run of `rows` that has it, conformed to `schema`
    and concatenated in the order of `rows`: read from the cache file, and from disk only
    for runs whose file changed since (module docstring)."""

    def read_runs(part: list[dict[str, Any]]) -> pl.DataFrame:
        files = [str(path_of(row)) for row in part]
        partition_of = pl.DataFrame(
            {"_file": files, _PARTITION: [row["partition_key"] for row in part]},
            schema={"_file": pl.String, _PARTITION: pl.String},
        )
        try:  # one multi-file read (in parallel), tagged by file
            both = pl.read_parquet(files, include_file_paths="_file")
            read = conform(both.drop("_file"), schema).with_columns(both["_file"])
        except (pl.exceptions.PolarsError, ValueError):  # schemas differ (older files)
            read = pl.concat(
                [
                    conform(pl.read_parquet(f), schema, f).with_columns(pl.lit(f).alias("_file"))
                    for f in files
                ]
            )
        return read.join(partition_of, on="_file", how="inner", maintain_order="left").drop("_file")

    return cached_runs(
        root, rows, name, lambda row: [path_of(row)], read_runs, schema, chunk=256, log=log
    )
