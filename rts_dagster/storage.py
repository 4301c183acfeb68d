"""Atomic file writes and the on-disk layout of everything we write.

Every write goes to a temporary file in the destination directory and is renamed over
the target, so a crash or a bad input never leaves a half-written file and never
destroys what was stored before. Files get the umask's mode, as a plain open() would.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

# Names under the data dir that are ours; a task slug never takes one of them.
RESERVED_NAMES = frozenset(
    {
        "wandb",
        "report",
        "dagster_home",
        "bench",
        "cache",
        "discovered_runs",
        "metrics",
        "lp",
        "experiments",
    }
    # aggregate files sharing a folder with task folders (metrics/, lp/)
    | {
        "discovered_runs.parquet",
        "variance_table.parquet",
        "timescale_recommendations.parquet",
        "sweep_summary.parquet",
        "recommendations.parquet",
        "closed_loop.parquet",
        "closed_loop_runs.parquet",
        "aggregates_manifest.json",
        "series_quality.parquet",
        "run_quality.parquet",
        "lp_timescales.parquet",
        "epoch_view.parquet",
        "verdicts.parquet",
    }
)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


STALE_TMP_AGE_S = 3600.0  # an unnamed (pre-pid) temp file older than this is ours and dead


def pid_alive(pid: int) -> bool:
    """Is process `pid` running (ours or someone else's)? Used to tell a live writer's
    temp files from a killed one's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # someone else's, or not a pid
        return pid > 0
    return True


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Delete temp files of `path` left by a killed writer: `.<name>.<pid>.*.tmp` whose pid
    is gone, or an older-format `.<name>.*.tmp` older than an hour. Returns what went."""
    removed = []
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        middle = tmp.name[len(path.name) + 2 : -len(".tmp")]
        head = middle.split(".", 1)[0]
        try:
            stale = (
                not pid_alive(int(head))
                if head.isdigit()
                else now - tmp.stat().st_mtime > STALE_TMP_AGE_S
            )
        except OSError:
            continue
        if stale:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    # mkstemp creates 0600 whatever the umask; give the file the mode open() would have
    # given it (0644 under umask 022), so others on a shared machine can read reports.
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    remove_stale_temp_files(path)  # a SIGKILLed earlier writer left its temp file behind
    return path


def write_parquet(df: pl.DataFrame, path: Path) -> Path:
    """Write `df` to `path` atomically (zstd-compressed parquet)."""
    return _atomic_write(path, lambda tmp: df.write_parquet(tmp, compression="zstd"))


def write_json(obj: Any, path: Path) -> Path:
    """Write `obj` as indented JSON atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text(text: str, path: Path) -> Path:
    """Write UTF-8 text atomically."""
    return _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(data: bytes, path: Path) -> Path:
    """Write bytes atomically."""
    return _atomic_write(path, lambda tmp: tmp.write_bytes(data))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --- layout -------------------------------------------------------------------------------
def discovered_runs_path(data_dir: Path) -> Path:
    return data_dir / "discovered_runs.parquet"


def stream_paths(data_dir: Path, task_slug: str, file_stem: str) -> tuple[Path, Path]:
    """(parquet, metadata.json) of one reward_streams partition: `<task>/<seed>.*`."""
    base = data_dir / task_slug
    return base / f"{file_stem}.parquet", base / f"{file_stem}.metadata.json"


def metrics_dir(data_dir: Path) -> Path:
    return data_dir / "metrics"


METRIC_TABLES = ("series", "rolling", "progress")


def metrics_paths(data_dir: Path, task_slug: str, file_stem: str) -> dict[str, Path]:
    """The series_metrics files of one partition: `metrics/<task>/<seed>.<table>.parquet`."""
    base = metrics_dir(data_dir) / task_slug
    return {name: base / f"{file_stem}.{name}.parquet" for name in METRIC_TABLES}


def variance_table_path(data_dir: Path) -> Path:
    return metrics_dir(data_dir) / "variance_table.parquet"


def timescales_path(data_dir: Path) -> Path:
    return metrics_dir(data_dir) / "timescale_recommendations.parquet"


def quality_paths(data_dir: Path) -> dict[str, Path]:
    """The data_quality files: one row per series, one per (run, granularity)."""
    base = metrics_dir(data_dir)
    return {"series": base / "series_quality.parquet", "runs": base / "run_quality.parquet"}


def lp_timescales_path(data_dir: Path) -> Path:
    return metrics_dir(data_dir) / "lp_timescales.parquet"


def epoch_view_path(data_dir: Path) -> Path:
    return metrics_dir(data_dir) / "epoch_view.parquet"


def aggregates_manifest_path(data_dir: Path) -> Path:
    """What the aggregates (tables, verdicts, report) were last built from, written only
    after they all succeeded; `rts refresh` rebuilds them whenever it differs."""
    return data_dir / "aggregates_manifest.json"


def verdicts_path(data_dir: Path) -> Path:
    return data_dir / "verdicts.parquet"


def lp_dir(data_dir: Path) -> Path:
    return data_dir / "lp"


LP_TABLES = ("metrics", "trace")


def lp_replay_paths(data_dir: Path, task_slug: str, file_stem: str) -> dict[str, Path]:
    """The lp_replay files of one partition: `lp/<task>/<seed>.<table>.parquet`."""
    base = lp_dir(data_dir) / task_slug
    return {name: base / f"{file_stem}.{name}.parquet" for name in LP_TABLES}


def lp_aggregate_paths(data_dir: Path) -> dict[str, Path]:
    """The lp_recommendations files: sweep summary, recommendations, closed loop."""
    base = lp_dir(data_dir)
    return {
        "summary": base / "sweep_summary.parquet",
        "recommendations": base / "recommendations.parquet",
        "closed_loop_runs": base / "closed_loop_runs.parquet",
        "closed_loop": base / "closed_loop.parquet",
    }


def experiments_dir(data_dir: Path) -> Path:
    return data_dir / "experiments"


EXPERIMENT_TABLES = ("comparison", "run_metrics", "curves", "difference")


def experiment_paths(data_dir: Path) -> dict[str, Path]:
    """experiment_comparison's tables (`experiments/<name>.parquet`) and the plan's files."""
    base = experiments_dir(data_dir)
    paths = {name: base / f"{name}.parquet" for name in EXPERIMENT_TABLES}
    paths.update(plan=base / "plan.parquet", plan_json=base / "plan.json", plan_md=base / "plan.md")
    return paths


def report_dir(data_dir: Path) -> Path:
    return data_dir / "report"


def file_stamp(path: Path) -> list[int] | None:
    """[size, mtime_ns] of a file, None if it is absent: what the caches key a file's
    version by (a rewrite through `_atomic_write` changes the mtime)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def cache_dir(data_dir: Path) -> Path:
    """Per-run results of the aggregates (`defs/per_run.py`): derived, safe to delete."""
    return data_dir / "cache"
