"""Benchmark the offline `.wandb` reader against `wandb leet inspect --json`.

Generates (once, cached under `$RTS_DATA_DIR/bench/`) an offline run written by the real
wandb library with `--rows` history rows of `--keys` numeric keys, then times
`read_run_file` (best of 3) and `wandb leet inspect --json` (once, the baseline).
The last two lines follow the project's `BENCH <name> <value> <unit> target ...` convention.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import bench_line

from rts_dagster.settings import data_dir
from rts_dagster.sources.wandb_file import read_run_file, wait_for_exit_record

ROWS_TARGET = 100_000
LEET_TIMEOUT_S = 300


def bench_keys(n: int) -> list[str]:
    """Metric names shaped like Metta's (slashes, dots, long label names)."""
    fixed = [
        "overview/sps",
        "overview/reward",
        "metric/agent_step",
        "metric/epoch",
        "env_agent/heart.amount",
        "experience/rewards",
        "env_env_curriculum/algorithm/lp/mean_learning_progress",
    ]
    labels = [f"env_per_label_rewards/training_facility.extractor_hub_{i}" for i in range(n)]
    return (fixed + labels)[:n]


def generate(path: Path, rows: int, n_keys: int) -> None:
    """Write an offline run with the real wandb library and move its .wandb file to `path`."""
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_ERROR_REPORTING="false")
    import wandb

    keys = bench_keys(n_keys)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="rts_bench_") as tmp:
        run = wandb.init(
            project="bench",
            name="bench",
            id="bench",
            dir=tmp,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        t0 = time.perf_counter()
        for step in range(rows):
            run.log({k: rng.random() for k in keys}, step=step * 1000)
            if step and step % 10_000 == 0:
                rate = step / (time.perf_counter() - t0)
                print(f"  generated {step}/{rows} rows ({rate:.0f} rows/s)", flush=True)
        run.finish()
        (src,) = Path(tmp).glob("wandb/offline-run-*/run-*.wandb")
        wait_for_exit_record(src, timeout_s=120)  # finish() returns before the last block
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        shutil.copyfile(src, partial)
        partial.replace(path)  # atomic: an interrupted run never leaves a half file in the cache


def time_reader(path: Path, repeats: int = 3) -> tuple[float, int, int]:
    """Best wall time of `read_run_file`, with the row and numeric column counts."""
    best = float("inf")
    rows = cols = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        run = read_run_file(path)
        best = min(best, time.perf_counter() - t0)
        rows, cols = run.history.height, run.history.width
    return best, rows, cols


def time_leet(path: Path) -> float | None:
    """Wall time of `wandb leet inspect --json PATH` (output discarded); None on timeout."""
    exe = Path(sys.executable).with_name("wandb")
    cmd = [str(exe) if exe.exists() else "wandb", "leet", "inspect", "--json", str(path)]
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True, timeout=LEET_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS_TARGET, help="history rows (100000)")
    parser.add_argument("--keys", type=int, default=30, help="numeric keys per row (30)")
    args = parser.parse_args(argv)

    path = data_dir() / "bench" / f"reader_rows{args.rows}_keys{args.keys}_v1.wandb"
    if path.exists():
        print(f"using cached run file {path}")
    else:
        print(f"generating {args.rows} rows x {args.keys} keys with wandb (offline) -> {path}")
        t0 = time.perf_counter()
        generate(path, args.rows, args.keys)
        print(f"  generated in {time.perf_counter() - t0:.1f} s")
    size_mb = path.stat().st_size / 1e6

    secs, rows, cols = time_reader(path)
    rate = rows / secs
    print(
        f"reader: {rows} rows x {cols} columns ({size_mb:.0f} MB file) in {secs:.2f} s "
        f"= {rate:.0f} rows/s"
    )
    leet = time_leet(path)
    if leet is None:
        speedup = LEET_TIMEOUT_S / secs
        print(f"wandb leet inspect: timed out after {LEET_TIMEOUT_S} s (> {speedup:.1f}x slower)")
    else:
        speedup = leet / secs
        print(f"wandb leet inspect: {leet:.2f} s ({speedup:.1f}x slower)")

    ok = rate >= ROWS_TARGET
    print(bench_line("reader_rows_per_s", f"{rate:.0f}", "rows/s", ">=", f"{ROWS_TARGET}", ok))
    ok = speedup >= 1
    print(bench_line("reader_vs_leet_inspect_speedup", f"{speedup:.1f}", "x", ">=", "1", ok))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
