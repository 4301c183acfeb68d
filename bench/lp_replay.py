"""Benchmark the vectorised LP replay (`replay`) against `StepwiseCurriculum` (stepwise).

`StepwiseCurriculum` is the same algorithm fed one completion at a time.

Builds a synthetic stream of `--completions` completions over `--labels` labels (labels drawn
with Dirichlet weights, so a few labels are common and many are rare; rewards in [0, 1] from
per-label sigmoid learning curves + noise, with a share of exact zeros; an SPS array with
dips), then reports:

- vectorised: best of `--repeats` for `replay(label_index, reward, L, config, sps=sps)` with
  `config = CurriculumConfig(name="metta_default")` (Metta main's LP defaults) at the default
  `DEFAULT_EVAL_POINTS` evaluation instants;
- the straightforward baseline: `StepwiseCurriculum(config, L)` fed `update(label, reward)`
  for every completion (plain Python ints/floats from `.tolist()`, one loop, no per-step
  numpy indexing by the caller) and asked for `probabilities()` at the same number of
  evaluation instants (`evaluation_points(n)`), so it produces the same (instants x labels)
  matrix. This is the code one writes first, and the simulator's curriculum: its per-step
  cost is the LP update itself (two EMAs, a ring buffer write), not overhead added by the
  benchmark. It is slow (a few us per completion), so it runs on the first
  `--baseline-completions` completions (best of `--repeats`) and is scaled to the full
  stream: the update part linearly, the `probabilities()` part by the number of instants
  (both runs evaluate `DEFAULT_EVAL_POINTS` instants, so that part does not grow with n).
  SPS is not fed to it: `metta_default` has `sps_weight = 0`, so neither side uses it;
- a correctness check: `replay` on the same prefix at the baseline's instants must give the
  baseline's probability matrix (`np.allclose`), else the benchmark fails;
- for information, the z-score variant (`CurriculumConfig(name="zscore_z10",
  variant="zscore")`) replayed vectorised on the full stream (checked against its stepwise
  version on the same prefix too).

The last lines follow the project's `BENCH <name> <value> <unit> target ...` convention.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import polars as pl
from _bench import bench_line, best_of

from rts_dagster import settings, storage
from rts_dagster.analysis.lp_replay import (
    DEFAULT_EVAL_POINTS,
    CurriculumConfig,
    Replay,
    StepwiseCurriculum,
    evaluation_points,
    replay,
)
from rts_dagster.discovery import row_files

RATE_TARGET = 1_000_000.0  # completions/s of the vectorised replay
SPEEDUP_TARGET = 30.0  # vectorised vs stepwise, per completion
SWEEP_TARGET_S = 60.0  # the full default sweep over the demo data


def make_stream(n: int, n_labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label_index int64, reward float64 in [0, 1], sps float64), each of length n."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(n_labels, 0.3))  # skewed: many rare labels
    labels = rng.choice(n_labels, size=n, p=weights).astype(np.int64)
    progress = np.arange(n) / max(n - 1, 1)

    amp = rng.uniform(0.2, 1.0, n_labels)[labels]
    mid = rng.uniform(0.1, 0.9, n_labels)[labels]
    width = rng.uniform(0.03, 0.2, n_labels)[labels]
    sigma = rng.uniform(0.02, 0.2, n_labels)[labels]
    curve = amp / (1.0 + np.exp(-(progress - mid) / width))
    reward = np.clip(curve + rng.normal(0.0, 1.0, n) * sigma, 0.0, 1.0)
    # Exact zeros (failed episodes), more often before a label's curve takes off.
    zero_rate = rng.uniform(0.0, 0.3, n_labels)[labels] * (1.0 - curve / np.maximum(amp, 1e-9))
    reward[rng.random(n) < zero_rate] = 0.0
    # SPS: one value per block of 100 completions, 5% of blocks dip to 60%.
    block = np.arange(n) // 100
    n_blocks = int(block[-1]) + 1
    sps = rng.normal(5000.0, 150.0, n_blocks) * np.where(rng.random(n_blocks) < 0.05, 0.6, 1.0)
    return labels, reward, sps[block]


def stepwise(
    labels: np.ndarray, rewards: np.ndarray, n_labels: int, config: CurriculumConfig
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Feed the stream one completion at a time; return (instants, probabilities (G x L),
    total seconds, seconds spent in `probabilities()`)."""
    n = labels.size
    points = evaluation_points(n)
    out = np.empty((points.size, n_labels))
    eval_s = 0.0
    t0 = time.perf_counter()
    curriculum = StepwiseCurriculum(config, n_labels)
    update = curriculum.update
    point_list = points.tolist()
    k = 0
    next_point = point_list[0]
    last = max(n - 1, 1)
    for j, (label, reward) in enumerate(zip(labels.tolist(), rewards.tolist(), strict=True)):
        update(label, reward)
        if j == next_point:
            te = time.perf_counter()
            out[k] = curriculum.probabilities(j / last)
            eval_s += time.perf_counter() - te
            k += 1
            next_point = point_list[k] if k < len(point_list) else -1
    total_s = time.perf_counter() - t0
    return points, out, total_s, eval_s


def time_stepwise(
    labels: np.ndarray, rewards: np.ndarray, n_labels: int, config: CurriculumConfig, repeats: int
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Best of `repeats` stepwise runs (by total time): (instants, probabilities, total, eval)."""
    best: tuple[np.ndarray, np.ndarray, float, float] | None = None
    for _ in range(repeats):
        gc.collect()
        run = stepwise(labels, rewards, n_labels, config)
        if best is None or run[2] < best[2]:
            best = run
    assert best is not None
    return best


def check_agreement(
    what: str,
    labels: np.ndarray,
    rewards: np.ndarray,
    n_labels: int,
    config: CurriculumConfig,
    points: np.ndarray,
    expected: np.ndarray,
) -> float:
    """Replay the prefix at the stepwise instants; exit non-zero unless the matrices agree.
    Returns the largest absolute difference."""
    result: Replay = replay(labels, rewards, n_labels, config, eval_index=points)
    got = result.probability
    if got.shape != expected.shape or not np.allclose(got, expected):
        diff = np.abs(got - expected) if got.shape == expected.shape else np.array([np.inf])
        raise SystemExit(
            f"FAIL {what}: replay and StepwiseCurriculum disagree on {labels.size} completions "
            f"(shapes {got.shape} vs {expected.shape}, max |diff| {np.nanmax(diff):.3g})"
        )
    return float(np.max(np.abs(got - expected)))


def time_demo_sweep(data_dir: Path) -> tuple[float, int, int, str]:
    """Seconds for the full default sweep (what `lp_replay` computes) over every run of
    the demo data: (seconds, runs, replays, where the streams came from). Uses the
    reward_streams files under `data_dir` when `rts refresh` wrote them, else simulates
    the nine demo runs (3 tasks x 3 seeds, not timed) and builds their streams."""
    from rts_dagster.analysis.lp_sweep import default_sweep, replay_stream, sweep_run

    frames: list[pl.DataFrame] = []
    discovered = data_dir / "discovered_runs.parquet"
    if discovered.exists():
        matched = pl.read_parquet(discovered).filter(pl.col("status") == "matched")
        for row in matched.iter_rows(named=True):
            folder, stem = row_files(row)
            path = storage.stream_paths(data_dir, folder, stem)[0]
            if path.exists():
                frames.append(pl.read_parquet(path))
    origin = f"reward_streams under {data_dir}"
    if not frames:
        from rts_dagster.analysis.streams import completion_streams
        from rts_dagster.simulate.model import TASKS, simulate

        origin = "simulated demo runs (no reward_streams found)"
        for task in TASKS:
            for seed in (1, 2, 3):
                run = simulate(task, seed)
                labels = np.array(run.labels, dtype=object)[run.label_index]
                record = pl.DataFrame(
                    {
                        "completion_index": np.arange(run.reward.size),
                        "worker": np.zeros(run.reward.size, dtype=np.int32),
                        "label": labels.tolist(),
                        "task_id": run.task_id,
                        "reward": run.reward,
                        "agent_step": run.agent_step,
                        "epoch": run.epoch,
                        "wall_time": run.wall_time,
                    }
                )
                frames.append(completion_streams(record, None, task, seed, f"{task}.{seed}"))
    started = time.perf_counter()
    replays = 0
    for streams in frames:
        first = streams.row(0, named=True)
        stream = replay_stream(streams)
        configs = default_sweep(len(stream.labels))
        sweep_run(stream, configs, task=first["task"], seed=first["seed"], run_id=first["run_id"])
        replays += len(configs)
    return time.perf_counter() - started, len(frames), replays, origin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=1_000_000, help="stream length")
    parser.add_argument("--labels", type=int, default=200, help="number of labels")
    parser.add_argument("--repeats", type=int, default=3, help="best-of repeats")
    parser.add_argument(
        "--baseline-completions",
        type=int,
        default=200_000,
        help="prefix fed to the stepwise baseline (scaled to --completions)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=settings.data_dir(),
        help="demo output root for the sweep timing (default $RTS_DATA_DIR or ./data)",
    )
    args = parser.parse_args(argv)
    if args.completions < 2 or args.labels < 1 or args.repeats < 1:
        parser.error("need --completions >= 2, --labels >= 1, --repeats >= 1")
    n, n_labels = args.completions, args.labels
    m = max(2, min(args.baseline_completions, n))

    t0 = time.perf_counter()
    labels, rewards, sps = make_stream(n, n_labels, args.seed)
    counts = np.bincount(labels, minlength=n_labels)
    print(
        f"synthetic stream: {n} completions over {n_labels} labels "
        f"(per label: min {counts.min()}, median {int(np.median(counts))}, max {counts.max()}; "
        f"{(rewards == 0).mean():.1%} exact zeros; built in {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )

    main_config = CurriculumConfig(name="metta_default")
    zscore_config = CurriculumConfig(name="zscore_z10", variant="zscore")
    n_points = evaluation_points(n).size

    def run_main() -> Replay:
        return replay(labels, rewards, n_labels, main_config, sps=sps)

    def run_zscore() -> Replay:
        return replay(labels, rewards, n_labels, zscore_config, sps=sps)

    t_main = best_of(run_main, args.repeats)
    print(f"vectorised replay (main): {t_main * 1e3:.1f} ms, best of {args.repeats}", flush=True)
    t_zscore = best_of(run_zscore, args.repeats)
    print(
        f"vectorised replay (zscore): {t_zscore * 1e3:.1f} ms, best of {args.repeats}", flush=True
    )

    print(
        f"stepwise baseline on the first {m} completions (best of {args.repeats}) ...", flush=True
    )
    prefix_labels, prefix_rewards = labels[:m], rewards[:m]
    points_m, probs_m, t_step, t_step_eval = time_stepwise(
        prefix_labels, prefix_rewards, n_labels, main_config, args.repeats
    )
    max_diff = check_agreement(
        "main", prefix_labels, prefix_rewards, n_labels, main_config, points_m, probs_m
    )
    print(
        f"  main: {t_step:.2f} s ({t_step_eval * 1e3:.0f} ms of it in {points_m.size} "
        f"probabilities() calls); agrees with replay on that prefix (max |diff| {max_diff:.1e})",
        flush=True,
    )
    zpoints_m, zprobs_m, t_zstep, _ = stepwise(
        prefix_labels, prefix_rewards, n_labels, zscore_config
    )
    zmax_diff = check_agreement(
        "zscore", prefix_labels, prefix_rewards, n_labels, zscore_config, zpoints_m, zprobs_m
    )
    print(
        f"  zscore (once, check only): {t_zstep:.2f} s; agrees with replay "
        f"(max |diff| {zmax_diff:.1e})",
        flush=True,
    )

    # Scale the baseline to n: updates linearly, probabilities() by the number of instants.
    t_step_full = (t_step - t_step_eval) * n / m + t_step_eval * n_points / points_m.size
    rate_main = n / t_main
    rate_zscore = n / t_zscore
    speedup = t_step_full / t_main
    scaled = "" if m == n else f" (measured on {m}, scaled)"

    print()
    print(f"{'method':<34}{'completions':>12}{'seconds':>10}{'completions/s':>15}{'us/compl.':>11}")
    rows = [
        ("replay, main (metta_default)", n, t_main),
        ("replay, zscore (zscore_z10)", n, t_zscore),
        ("StepwiseCurriculum, main" + ("*" if m != n else ""), n, t_step_full),
    ]
    for name, count, secs in rows:
        print(f"{name:<34}{count:>12}{secs:>10.3f}{count / secs:>15.0f}{secs / count * 1e6:>11.3f}")
    if m != n:
        print(
            f"* measured on the first {m} completions ({t_step:.2f} s, {points_m.size} "
            f"instants) and scaled to {n} ({n_points} instants)"
        )
    print(f"evaluation instants: {n_points} (DEFAULT_EVAL_POINTS = {DEFAULT_EVAL_POINTS})")
    print(f"zscore variant: {rate_zscore:.0f} completions/s (info)")
    print(f"speedup replay vs stepwise (main){scaled}: {speedup:.1f}x")
    print()

    print("full default sweep on the demo data ...", flush=True)
    sweep_s, n_runs, n_replays, origin = time_demo_sweep(args.data_dir)
    print(f"  {n_replays} replays over {n_runs} runs from {origin}: {sweep_s:.1f} s")
    print()

    rate_target = f"{RATE_TARGET:.0f}"
    for name, rate in (
        ("lp_replay_completions_per_s", rate_main),
        ("lp_replay_zscore_completions_per_s", rate_zscore),
    ):
        ok = rate >= RATE_TARGET
        print(bench_line(name, f"{rate:.0f}", "completions/s", ">=", rate_target, ok))
    ok = speedup >= SPEEDUP_TARGET
    print(
        bench_line(
            "lp_replay_vs_stepwise_speedup", f"{speedup:.1f}", "x", ">=", f"{SPEEDUP_TARGET:g}", ok
        )
    )
    ok = sweep_s <= SWEEP_TARGET_S
    print(
        bench_line("lp_sweep_demo_seconds", f"{sweep_s:.1f}", "s", "<=", f"{SWEEP_TARGET_S:g}", ok)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
