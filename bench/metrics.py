"""Benchmark the per-series metrics (`compute_metrics`) on a synthetic reward_streams table.

Builds `--samples` samples over `--series` series in the REWARD_STREAMS shape (sigmoid
learning curves + noise, a tenth of the series at epoch granularity with stale repeats,
a few non-finite rewards, SPS with dips), then reports:

- our time: best of `--repeats` for `compute_metrics(streams)`, the one pass the
  `series_metrics` asset runs (all three tables: per-series, per-sample rolling and
  noise-by-progress); the separate `series_metrics` and `rolling_metrics` calls, which
  each redo the pass, are timed too, for information;
- (a) the notebook way: pandas `groupby(...).rolling(25).apply(np.polyfit(...)[0])` for
  the slope plus `groupby(...).rolling(10).std()`, timed on the first `--pandas-series`
  series and scaled linearly to all samples (it only computes those two columns);
- (b) the memory-bandwidth floor: one numpy pass over the reward column
  (`np.add.reduceat` per series);
- peak memory, in a fresh subprocess: the peak RSS increase while `compute_metrics` runs
  (outputs kept alive), divided by the input table's in-memory size. tracemalloc cannot
  see polars' (Rust) or BLAS allocations, so RSS is read from /proc: VmHWM after
  resetting it through /proc/self/clear_refs, or ru_maxrss when that is unavailable.

The last lines follow the project's `BENCH <name> <value> <unit> target ...` convention.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from _bench import bench_line, best_of

from rts_dagster.analysis.metrics import (
    compute_metrics,
    rolling_metrics,
    series_metrics,
)
from rts_dagster.schema import (
    REWARD_STREAMS,
    SERIES_KEYS,
    conform,
)

SAMPLES_FLOOR = 2e6  # samples/s we promise for series_metrics + rolling_metrics (2 cores)
TASKS = (
    "recipes.prod.cvc.fixed_maps.train",
    "recipes.experiment.assembly_lines.train",
    "recipes.experiment.cvc.variants_curriculum.train",
    "recipes.experiment.density_curriculum.train",
)
SEEDS = (1, 2, 3)


def make_streams(samples: int, series: int, seed: int = 0) -> pl.DataFrame:
    """A synthetic reward_streams table: `series` contiguous series, `samples` rows."""
    rng = np.random.default_rng(seed)
    series = max(1, min(series, samples))
    lengths = np.full(series, samples // series, dtype=np.int64)
    lengths[: samples % series] += 1
    sid = np.repeat(np.arange(series), lengths)
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(samples) - starts[sid]
    progress = pos / lengths[sid]

    # Series -> (task, seed, label); 1 in 10 series is an epoch series.
    task_of = np.arange(series) % len(TASKS)
    seed_of = (np.arange(series) // len(TASKS)) % len(SEEDS)
    label_of = np.arange(series) // (len(TASKS) * len(SEEDS))
    epoch = rng.random(series) < 0.1
    labels = [f"training_facility.mission_{i:03d}" for i in range(int(label_of.max()) + 1)]
    runs = [f"bench.{t.split('.')[-2]}.seed{s}" for t in TASKS for s in SEEDS]

    amp = rng.uniform(0.2, 1.0, series)[sid]
    mid = rng.uniform(0.2, 0.8, series)[sid]
    width = rng.uniform(0.03, 0.2, series)[sid]
    sigma = rng.uniform(0.05, 0.3, series)[sid] * (1.0 - 0.5 * progress)
    reward = amp / (1.0 + np.exp(-(progress - mid) / width)) + rng.normal(0.0, 1.0, samples) * sigma
    # SPS: one value per block of 100 samples ("epochs"), with 5% dips to 60%.
    block = np.arange(samples) // 100
    n_blocks = int(block[-1]) + 1
    sps = rng.normal(5000.0, 150.0, n_blocks) * np.where(rng.random(n_blocks) < 0.05, 0.6, 1.0)
    sps = sps[block]
    reward[rng.random(samples) < 1e-5] = np.nan
    is_stale = epoch[sid] & (rng.random(samples) < 0.2) & (pos > 0)
    prev = np.concatenate(([0.0], reward[:-1]))
    reward = np.where(is_stale, prev, reward)

    def strings(values: list[str], idx: np.ndarray) -> pl.Series:
        return pl.Series(values).gather(pl.Series(idx, dtype=pl.UInt32))

    frame = pl.DataFrame(
        {
            "task": strings(list(TASKS), task_of[sid]),
            "seed": np.asarray(SEEDS)[seed_of][sid],
            "run_id": strings(runs, (task_of * len(SEEDS) + seed_of)[sid]),
            "label": strings(labels, label_of[sid]),
            "granularity": strings(["completion", "epoch"], epoch[sid].astype(np.int64)),
            "sample_index": pos,
            "agent_step": pos * 2048,
            "epoch": block,
            "reward": reward,
            "sps": sps,
            "is_stale": is_stale,
        }
    )
    return conform(frame, REWARD_STREAMS, "bench streams")


def pandas_reference(streams: pl.DataFrame, n_series: int) -> tuple[float, int]:
    """Seconds and samples of the notebook computation on the first `n_series` series."""
    keys = streams.select(SERIES_KEYS).unique(maintain_order=True).head(n_series)
    part = streams.join(keys, on=list(SERIES_KEYS), how="semi").filter(
        pl.col("reward").is_finite() & ~pl.col("is_stale")
    )
    pdf = part.to_pandas()
    x = np.arange(25, dtype=np.float64)
    t0 = time.perf_counter()
    grouped = pdf.groupby(list(SERIES_KEYS), sort=False)["reward"]
    slope = grouped.rolling(25).apply(lambda w: np.polyfit(x, w, 1)[0], raw=True)
    std = grouped.rolling(10).std()
    elapsed = time.perf_counter() - t0
    assert len(slope) == len(std) == len(pdf)
    return elapsed, len(pdf)


def numpy_floor(streams: pl.DataFrame, repeats: int) -> float:
    """One pass over the reward column: per-series sums with np.add.reduceat."""
    reward = streams["reward"].to_numpy()
    starts = np.flatnonzero(streams["sample_index"].to_numpy() == 0)
    return best_of(lambda: np.add.reduceat(reward, starts), repeats)


def _rss_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def memory_child(samples: int, series: int, seed: int) -> None:
    """Run in a fresh process: print JSON with the input size and the peak RSS increase."""
    streams = make_streams(samples, series, seed)
    gc.collect()
    input_bytes = streams.estimated_size()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        method = "VmHWM after clear_refs"
        before = _rss_kib()["VmRSS"]
    except OSError:
        method = "ru_maxrss (includes the input generation peak: a lower bound)"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = compute_metrics(streams)
    if method.startswith("VmHWM"):
        peak = _rss_kib()["VmHWM"]
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "input_bytes": input_bytes,
        "peak_extra_bytes": (peak - before) * 1024,
        "output_bytes": sum(t.estimated_size() for t in result),
        "method": method,
    }
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000_000, help="total samples")
    parser.add_argument("--series", type=int, default=1000, help="number of series")
    parser.add_argument(
        "--pandas-series", type=int, default=20, help="series timed with the pandas reference"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best-of repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-memory", action="store_true", help="no memory subprocess")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.samples, args.series, args.seed)
        return 0

    t0 = time.perf_counter()
    streams = make_streams(args.samples, args.series, args.seed)
    n = streams.height
    print(
        f"synthetic streams: {n} samples, {args.series} series, "
        f"{streams.estimated_size() / 2**20:.0f} MiB in memory "
        f"(built in {time.perf_counter() - t0:.1f} s)"
    )

    t_series = best_of(lambda: series_metrics(streams), args.repeats)
    t_rolling = best_of(lambda: rolling_metrics(streams), args.repeats)
    t_ours = best_of(lambda: compute_metrics(streams), args.repeats)
    print(f"series_metrics alone   {t_series * 1e3:9.1f} ms  (info)")
    print(f"rolling_metrics alone  {t_rolling * 1e3:9.1f} ms  (info)")
    print(
        f"compute_metrics        {t_ours * 1e3:9.1f} ms  ({n / t_ours / 1e6:.1f} M samples/s; "
        "all three tables in one pass, as the asset runs it)"
    )

    t_pd, n_pd = pandas_reference(streams, args.pandas_series)
    t_pd_scaled = t_pd * n / n_pd
    print(
        f"(a) pandas groupby-rolling-apply(polyfit) + rolling std: {t_pd:.2f} s on "
        f"{args.pandas_series} series ({n_pd} samples), scaled linearly to {n} samples: "
        f"{t_pd_scaled:.1f} s"
    )
    t_floor = numpy_floor(streams, max(args.repeats, 5))
    print(f"(b) numpy floor, np.add.reduceat over the reward column: {t_floor * 1e3:.2f} ms")

    speedup = t_pd_scaled / t_ours
    slowdown = t_ours / t_floor
    rate = n / t_ours
    print(f"ratio vs pandas (a): {speedup:.0f}x faster")
    print(f"ratio vs numpy floor (b): {slowdown:.0f}x slower")

    mem_ratio = float("nan")
    if not args.skip_memory:
        del streams
        gc.collect()
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-child",
            f"--samples={args.samples}",
            f"--series={args.series}",
            f"--seed={args.seed}",
        ]
        child = subprocess.run(cmd, capture_output=True, text=True, check=True)
        mem = json.loads(child.stdout.strip().splitlines()[-1])
        mem_ratio = mem["peak_extra_bytes"] / mem["input_bytes"]
        print(
            f"peak memory: +{mem['peak_extra_bytes'] / 2**20:.0f} MiB RSS over an input of "
            f"{mem['input_bytes'] / 2**20:.0f} MiB (outputs kept: "
            f"{mem['output_bytes'] / 2**20:.0f} MiB; {mem['method']})"
        )
        print(f"ratio peak extra memory / input: {mem_ratio:.2f}x")

    floor = f"{SAMPLES_FLOOR:.0g}"
    ok = rate >= SAMPLES_FLOOR
    print(bench_line("metrics_samples_per_s", f"{rate:.3g}", "samples/s", ">=", floor, ok))
    ok = speedup >= 100
    print(bench_line("metrics_vs_pandas_speedup", f"{speedup:.0f}", "x", ">=", "100", ok))
    ok = slowdown <= 30
    print(bench_line("metrics_vs_numpy_floor_slowdown", f"{slowdown:.1f}", "x", "<=", "30", ok))
    mem_text = "n/a" if mem_ratio != mem_ratio else f"{mem_ratio:.2f}"
    print(bench_line("metrics_peak_memory_ratio", mem_text, "x", "<=", "3", mem_ratio <= 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
