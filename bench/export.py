"""Benchmark WandB history reading: parquet export vs `scan_history`, real client, fake server.

Starts the local fake backend (`rts_dagster_tests/fakes/wandb_server.py`) with one run of
`--rows` history rows and `--keys` numeric keys (dense steps 0, 1, 2, ...), then times with the
real `wandb.Api` 0.31:

- export: `run.download_history_exports(dir)` + `pl.scan_parquet(paths).select([...])`
  (best of `--repeat`, a fresh download each time);
- scan_history: `list(run.scan_history(keys=<the same keys>, page_size=10000))` on the same
  (fully exported) run, once; wandb-core reads the export with ranged GETs and hands rows
  to Python one page at a time;
- with `--live`, for information, `scan_history` of the same history while nothing is exported
  yet (every page a `SampledHistoryPage` GraphQL query): the fallback `WandbRunSource` uses.
  The fake server shares the process (and the GIL) with the client, so this figure includes
  the fake's own JSON encoding.

The last line follows the project's `BENCH <name> <value> <unit> target ...` convention.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from _bench import bench_line

from rts_dagster_tests.fakes.wandb_server import (
    DEFAULT_API_KEY,
    FakeRun,
    FakeWandbServer,
)

SPEEDUP_TARGET = 20.0
ROWS_PER_S_TARGET = 1_000_000.0
PAGE_SIZE = 10_000


def bench_keys(n: int) -> list[str]:
    """Metric names shaped like Metta's (slashes, dots, long label names)."""
    fixed = ["metric/agent_step", "metric/epoch", "overview/sps", "overview/reward"]
    labels = [f"env_per_label_rewards/training_facility.extractor_hub_{i}" for i in range(n)]
    return (fixed + labels)[:n]


def make_history(rows: int, keys: list[str], seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    columns = {"_step": np.arange(rows, dtype=np.int64), "_timestamp": 1.7e9 + np.arange(rows)}
    columns.update({key: rng.random(rows) for key in keys})
    return pl.DataFrame(columns)


def time_export(run: Any, keys: list[str], repeat: int) -> tuple[float, pl.DataFrame]:
    best, frame = float("inf"), pl.DataFrame()
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="rts_bench_export_") as tmp:
            started = time.perf_counter()
            result = run.download_history_exports(tmp, require_complete_history=True)
            frame = pl.scan_parquet(result.paths).select(["_step", *keys]).collect()
            best = min(best, time.perf_counter() - started)
    return best, frame


def time_scan(run: Any, keys: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    rows = list(run.scan_history(keys=keys, page_size=PAGE_SIZE))
    return time.perf_counter() - started, len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="history rows (default 200000)")
    parser.add_argument("--keys", type=int, default=40, help="numeric keys (default 40)")
    parser.add_argument("--repeat", type=int, default=3, help="export timings, best of N")
    parser.add_argument(
        "--live",
        action="store_true",
        help="also time scan_history of a run with nothing exported (slow: minutes at 200k rows)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="rts_bench_wandb_") as tmp:
        os.environ.update(
            WANDB_ERROR_REPORTING="false",
            WANDB_SILENT="true",
            WANDB_DIR=str(Path(tmp) / "wandb_dir"),
            WANDB_CACHE_DIR=str(Path(tmp) / "wandb_cache"),
        )
        import wandb

        keys = bench_keys(args.keys)
        history = make_history(args.rows, keys)
        with FakeWandbServer() as server:
            server.add_run(FakeRun("bench", history=history))
            server.add_run(FakeRun("bench-live", history=history, exported_rows=0))
            api = wandb.Api(
                api_key=DEFAULT_API_KEY,
                overrides={
                    "base_url": server.base_url,
                    "entity": server.entity,
                    "project": server.project,
                },
                timeout=120,
            )
            run = api.run(f"{server.entity}/{server.project}/bench")
            export_s, frame = time_export(run, keys, args.repeat)
            if frame.height != args.rows or frame.width != len(keys) + 1:
                raise SystemExit(
                    f"export read {frame.shape}, expected ({args.rows}, {len(keys) + 1})"
                )
            scan_s, scanned = time_scan(run, keys)
            if scanned != args.rows:
                raise SystemExit(f"scan_history returned {scanned} rows, expected {args.rows}")
            live_s = None
            if args.live:
                live_run = api.run(f"{server.entity}/{server.project}/bench-live")
                live_s, live_rows = time_scan(live_run, keys)
                if live_rows != args.rows:
                    raise SystemExit(f"live scan returned {live_rows} rows, expected {args.rows}")

    speedup = scan_s / export_s
    rows_per_s = args.rows / export_s
    print(f"run: {args.rows} rows x {len(keys)} keys, page_size {PAGE_SIZE}")
    print(f"export (download + polars read, best of {args.repeat}): {export_s:.3f} s")
    print(f"scan_history, exported run (ranged parquet reads): {scan_s:.3f} s")
    if live_s is not None:
        print(f"scan_history, nothing exported (SampledHistoryPage queries): {live_s:.3f} s")
    print(f"speedup export vs scan_history: {speedup:.1f} x")
    ok = rows_per_s >= ROWS_PER_S_TARGET
    print(
        bench_line(
            "export_rows_per_s", f"{rows_per_s:.0f}", "rows/s", ">=", f"{ROWS_PER_S_TARGET:.0f}", ok
        )
    )
    ok = speedup >= SPEEDUP_TARGET
    print(
        bench_line(
            "export_vs_scan_history_speedup", f"{speedup:.1f}", "x", ">=", f"{SPEEDUP_TARGET:g}", ok
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
