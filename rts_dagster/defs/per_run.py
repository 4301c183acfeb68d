"""Per-run results of the aggregate assets, computed once per version of a partition.

Several aggregates start with work that is done run by run: the series quality of
`data_quality`, the local-level fits and epoch view of `timescale_recommendations`, the
learning slopes of `report`. `per_run_table` computes such a table a few runs at a time (so
no step holds every partition's streams in memory) and keeps each run's rows under
`cache/<name>/<task>/<seed>.<key>.parquet`, so the next refresh reads them instead of the
streams. The key is a hash of the code, the table's name and settings, and the size and
mtime of the run's stream and metadata files: a re-materialized partition, other settings
or other code compute it again. Results are those of computing the table on every run at
once (each compute function works series by series or run by run; tested), up to float
rounding in the last digits: some vectorised kernels sum over a chunk's concatenated series.
"""

import hashlib
import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import polars as pl

from rts_dagster import storage
from rts_dagster.discovery import row_files
from rts_dagster.schema import REWARD_STREAMS, conform

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
CHUNK_RUNS = 32  # runs whose streams are in memory at once


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of every module of the package (schemas, analysis, report): tables built by
    other code are out of date. Read once per process (the code does not change under it)."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE_DIR).as_posix().encode())
        digest.update(b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _file_stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def cache_key(name: str, settings: object, stream_path: Path, metadata_path: Path) -> str:
    """16 hex digits naming one run's version of table `name`."""
    text = json.dumps(
        [
            code_fingerprint(),
            name,
            settings,
            _file_stamp(stream_path),
            _file_stamp(metadata_path) if metadata_path.exists() else None,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(root: Path, name: str, row: dict[str, Any], key: str) -> Path:
    folder, stem = row_files(row)
    return storage.cache_dir(root) / name / folder / f"{stem}.{key}.parquet"


def _store(path: Path, table: pl.DataFrame) -> None:
    """Write one run's rows and drop its other versions (same stem, another key)."""
    storage.write_parquet(table, path)
    stem = path.name.rsplit(".", 2)[0]
    for old in path.parent.glob(f"{stem}.*.parquet"):
        if old != path and old.name.rsplit(".", 2)[0] == stem:
            old.unlink(missing_ok=True)


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
    present: list[tuple[dict[str, Any], Path, Path]] = []  # (row, stream file, cache file)
    for row in rows:
        stream_path, metadata_path = storage.stream_paths(root, *row_files(row))
        if stream_path.exists():
            key = cache_key(name, settings, stream_path, metadata_path)
            present.append((row, stream_path, cache_path(root, name, row, key)))
    todo = [entry for entry in present if not entry[2].exists()]
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        streams = pl.concat(
            [conform(pl.read_parquet(path), REWARD_STREAMS, str(path)) for _, path, _ in part]
        )
        result = conform(compute(streams), schema, name)
        by_run = result.partition_by("run_id", as_dict=True, maintain_order=True)
        for row, _, cached in part:
            _store(cached, by_run.get((row["run_id"],), result.clear()))
    if log is not None and present:
        log(f"{name}: {len(todo)} run(s) computed, {len(present) - len(todo)} from the cache")
    if not present:
        return pl.DataFrame(schema=schema)
    return conform(pl.read_parquet([cached for _, _, cached in present]), schema, name)
