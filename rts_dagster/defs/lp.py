"""Assets `lp_replay` (per run) and `lp_recommendations` (across runs): LP configurations
replayed on the recorded reward streams, a recommendation per task, and a closed-loop
check in the simulator. Thin: the science is in rts_dagster.analysis.lp_*."""

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from rts_dagster import storage
from rts_dagster.analysis import lp_sweep
from rts_dagster.analysis.lp_replay import stepwise_deviation
from rts_dagster.analysis.lp_signal import TrendSettings
from rts_dagster.defs.analysis import _matched_rows, _preview, data_quality, read_quality
from rts_dagster.defs.batches import (
    BACKFILL_POLICY,
    PartitionOutcome,
    materialize_partitions,
    partition_log,
)
from rts_dagster.defs.partitions import runs_partitions
from rts_dagster.defs.per_run import per_run_files
from rts_dagster.defs.resources import RtsStorage
from rts_dagster.defs.runs import load_partition_streams, read_discovered, reward_streams
from rts_dagster.discovery import row_files
from rts_dagster.escape import md
from rts_dagster.schema import (
    LP_CLOSED_LOOP,
    LP_CLOSED_LOOP_SUMMARY,
    LP_RECOMMENDATIONS,
    LP_REPLAY_METRICS,
    LP_REPLAY_TRACE,
    LP_SWEEP_SUMMARY,
    conform,
    empty,
)


class LPReplayConfig(dg.Config):
    """How replays are evaluated (defaults: the analysis core's slope window)."""

    n_eval: int = 400  # evaluation instants per replay
    trend_window: int = 25  # samples of a label in its rolling slope
    t_improving: float = 2.0  # slope / se above this: improving
    t_flat: float = 1.0  # |slope / se| below this: plateaued


MAX_REFERENCE_DEVIATION = 1e-9  # replay vs the stepwise reference, probability units
# The per-completion reference is a Python loop (by design): checked on the first
# completions of every run, 40 per label (at least 250, at most 2,000): enough for every
# label to pass min_samples_for_lp (10) and wrap its outcome memory (25) when labels are
# drawn evenly, which exercises every code path (first completions, memory, z-score
# switch-on), without costing more than the replay itself.
REFERENCE_CHECK_PER_LABEL = 40
REFERENCE_CHECK_MIN, REFERENCE_CHECK_MAX = 250, 2000


def reference_check_completions(n_labels: int) -> int:
    """Completions of a run checked against the stepwise reference."""
    return min(REFERENCE_CHECK_MAX, max(REFERENCE_CHECK_MIN, REFERENCE_CHECK_PER_LABEL * n_labels))


@dg.asset(
    group_name="lp",
    partitions_def=runs_partitions,
    deps=[reward_streams],
    backfill_policy=BACKFILL_POLICY,
    check_specs=[
        dg.AssetCheckSpec(
            "distributions_valid",
            asset="lp_replay",
            description="Every replayed sampling distribution is non-negative and sums to 1 "
            "(within 1e-9).",
        ),
        dg.AssetCheckSpec(
            "matches_stepwise_reference",
            asset="lp_replay",
            description="The vectorised replay equals the per-completion reference "
            f"(StepwiseCurriculum) on the run's first {REFERENCE_CHECK_PER_LABEL} completions per "
            f"label ({REFERENCE_CHECK_MIN} to {REFERENCE_CHECK_MAX}) within "
            f"{MAX_REFERENCE_DEVIATION:g} probability.",
        ),
    ],
    automation_condition=dg.AutomationCondition.eager(),
    description="One run's reward stream replayed through the default LP experiments matrix "
    "(ema_timescale grid, dual timescales, z-score Z 10/20/30 and annealed, pool cap, "
    "SPS-aware weighting): signal-quality metrics per configuration and the LP state over "
    "time. Files: lp/TASK/SEED.{metrics,trace}.parquet.",
)
def lp_replay(
    context: dg.AssetExecutionContext, config: LPReplayConfig, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    discovered = read_discovered(rts_storage)
    info = partition_log(context)
    return materialize_partitions(
        context, lambda key: _replay_partition(context, info, config, rts_storage, discovered, key)
    )


def _replay_partition(
    context: dg.AssetExecutionContext,
    info: Callable[[str], None],
    config: LPReplayConfig,
    rts_storage: RtsStorage,
    discovered: pl.DataFrame,
    key: str,
) -> PartitionOutcome:
    part = load_partition_streams(rts_storage, key, discovered)
    row = part.row
    try:
        stream = lp_sweep.replay_stream(part.streams)
    except ValueError as exc:
        raise dg.Failure(f"{part.path}: {exc}") from exc
    gain = lp_sweep.matched_gain(part.streams, stream.granularity)
    separation = lp_sweep.separation_pair(part.streams, stream.granularity)
    configs = lp_sweep.default_sweep(len(stream.labels), matched_gain=gain, separation=separation)
    started = time.perf_counter()
    metrics, trace = lp_sweep.sweep_run(
        stream,
        configs,
        task=row["task"],
        seed=row["seed"],
        run_id=row["run_id"],
        trend_settings=TrendSettings(config.trend_window, config.t_improving, config.t_flat),
        n_eval=config.n_eval,
    )
    elapsed = time.perf_counter() - started
    paths = storage.lp_replay_paths(rts_storage.root(), part.folder, part.stem)
    storage.write_parquet(metrics, paths["metrics"])
    storage.write_parquet(trace, paths["trace"])
    if stream.n_dropped:
        context.log.warning(f"{stream.n_dropped} rows without a finite reward not replayed")
    info(
        f"{len(configs)} configurations x {stream.reward.size} {stream.granularity} samples "
        f"replayed in {elapsed:.2f}s"
    )
    sums = trace.group_by("config", "eval_index").agg(pl.col("probability").sum())
    sum_error = float((sums["probability"] - 1.0).abs().max())
    lowest = float(trace["probability"].min())
    check_limit = reference_check_completions(len(stream.labels))
    deviation = max(
        stepwise_deviation(
            stream.label_index,
            stream.reward,
            len(stream.labels),
            c,
            sps=stream.sps,
            limit=check_limit,
        )
        for c in configs
        if c.name in (lp_sweep.METTA_DEFAULT, "zscore_z30_to_10")
    )
    checks = [
        dg.AssetCheckResult(
            check_name="distributions_valid",
            passed=sum_error <= 1e-9 and lowest >= 0.0,
            metadata={
                "partition": str(key),
                "max_sum_error": sum_error,
                "min_probability": lowest,
            },
        ),
        dg.AssetCheckResult(
            check_name="matches_stepwise_reference",
            passed=deviation <= MAX_REFERENCE_DEVIATION,
            metadata={
                "partition": str(key),
                "max_probability_deviation": deviation,
                "configs": "metta_default, zscore_z30_to_10",
                "completions_checked": min(check_limit, int(stream.reward.size)),
            },
        ),
    ]
    return PartitionOutcome(
        checks=checks,
        summary={
            "configs": len(configs),
            "samples": int(stream.reward.size),
            "replay_s": round(elapsed, 3),
        },
        metadata={
            "dagster/row_count": metrics.height,
            "granularity": stream.granularity,
            "completions": int(stream.reward.size),
            "labels": len(stream.labels),
            "dropped_nonfinite": stream.n_dropped,
            "seconds": round(elapsed, 3),
            "path": dg.MetadataValue.path(str(paths["metrics"])),
            "preview": dg.MetadataValue.md(
                _preview(
                    metrics.sort("lp_snr", descending=True, nulls_last=True),
                    ["config", "lp_snr", "lag_median", "churn_plateau", "gini_mean"],
                    limit=30,
                )
            ),
        },
    )


class LPRecommendationsConfig(dg.Config):
    """Recommendation rule and closed-loop check settings."""

    tolerance: float = 1.5  # max lag / churn relative to Metta's default (plus the floors)
    churn_floor: float = lp_sweep.CHURN_FLOOR  # absolute churn allowance (lp_sweep docstring)
    closed_loop: bool = True  # run the simulator check (embedded demo tasks only)
    closed_loop_seeds: list[int] = [101, 102, 103]  # noqa: RUF012  (fresh seeds, not the demo's)
    closed_loop_epochs: int = 300
    workers: int = 2  # simulator processes
    # "mettagrid": also train MettaGrid engine tasks (mettagrid_*) under the candidates with
    # the engine's PPO (needs the `mettagrid` extra; minutes per run, so opt-in)
    closed_loop_engine: str = "simulator"
    closed_loop_mettagrid_epochs: int = 60


@dg.asset(
    group_name="lp",
    deps=[lp_replay, data_quality],
    automation_condition=dg.AutomationCondition.eager(),
    description="Per (task, granularity): the replay evidence of every LP configuration "
    "against Metta's default (signal-to-noise ratio paired by run, interval adjusted for "
    "the number of configurations compared; lag, churn and starvation guards), the sweep "
    "summary, and a closed-loop comparison in the simulator (time-to-competence, final "
    "reward) for completion-granularity tasks it models. Descriptive: the report's verdict "
    "gives the advice. Files: lp/{sweep_summary,recommendations,closed_loop*}.parquet.",
)
def lp_recommendations(
    context: dg.AssetExecutionContext, config: LPRecommendationsConfig, rts_storage: RtsStorage
) -> dg.MaterializeResult:
    from rts_dagster.simulate.closed_loop import plan_closed_loop, run_closed_loop

    root = rts_storage.root()
    metrics = _load_lp_metrics(rts_storage, context)
    # a run whose replayed series carry no signal (all stale, constant or too short) adds
    # no evidence: it is left out by name, so it cannot move a recommendation
    runs_q = read_quality(rts_storage, "runs")
    usable = runs_q.filter(pl.col("contributes_dynamics")).select("run_id", "granularity")
    dropped = metrics.join(usable, on=["run_id", "granularity"], how="anti")
    if dropped.height:
        names = sorted(set(dropped["run_id"].to_list()))
        context.log.warning(
            f"left out of the LP recommendations (no usable series of a baseline arm): "
            f"{', '.join(names)}"
        )
    metrics = metrics.join(usable, on=["run_id", "granularity"], how="semi")
    summary = lp_sweep.summarise_sweep(metrics)
    recs = lp_sweep.recommend(metrics, tolerance=config.tolerance, churn_floor=config.churn_floor)
    paths = storage.lp_aggregate_paths(root)

    outcomes = empty(LP_CLOSED_LOOP)
    closed = empty(LP_CLOSED_LOOP_SUMMARY)
    if config.closed_loop:
        candidates = lp_sweep.closed_loop_candidates(recs, metrics)
        jobs, notes = plan_closed_loop(
            candidates,
            metrics,
            config.closed_loop_seeds,
            config.closed_loop_epochs,
            engine=config.closed_loop_engine,
            mettagrid_epochs=config.closed_loop_mettagrid_epochs,
        )
        for note in notes:
            context.log.info(f"closed loop: {note}")
        if jobs:
            context.log.info(
                f"closed loop: {len(jobs)} simulator runs on {config.workers} workers "
                "(identical earlier runs are reused)"
            )
            started = time.perf_counter()
            simulated = [0]

            def progress(done: int, total: int) -> None:
                simulated[0] = done
                if done == total or done % max(1, total // 4) == 0:
                    context.log.info(
                        f"closed loop: {done}/{total} runs ({time.perf_counter() - started:.0f}s)"
                    )

            previous = (
                pl.read_parquet(paths["closed_loop_runs"])
                if paths["closed_loop_runs"].exists()
                else None
            )
            outcomes = run_closed_loop(
                jobs, workers=config.workers, progress=progress, reuse=previous
            )
            closed = lp_sweep.summarise_closed_loop(outcomes, candidates)
            context.log.info(
                f"closed loop: {simulated[0]} simulated, {len(jobs) - simulated[0]} reused, "
                f"in {time.perf_counter() - started:.0f}s"
            )

    storage.write_parquet(conform(summary, LP_SWEEP_SUMMARY), paths["summary"])
    storage.write_parquet(conform(recs, LP_RECOMMENDATIONS), paths["recommendations"])
    storage.write_parquet(outcomes, paths["closed_loop_runs"])
    storage.write_parquet(closed, paths["closed_loop"])
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": recs.height,
            "path": dg.MetadataValue.path(str(paths["recommendations"])),
            "recommendations": dg.MetadataValue.md(
                "\n".join(f"- {md(s)}" for s in recs["sentence"].to_list()) or "none"
            ),
            "closed_loop_runs": outcomes.height,
            "config": json.dumps(config.model_dump()),
        }
    )


def _load_lp_metrics(rts_storage: RtsStorage, context: dg.AssetExecutionContext) -> pl.DataFrame:
    """Every matched run's lp_replay metrics (from one cache file: `per_run_files`)."""
    root = rts_storage.root()

    def metrics_path(row: dict[str, Any]) -> Path:
        return storage.lp_replay_paths(root, *row_files(row))["metrics"]

    rows = _matched_rows(rts_storage)
    missing = [row["partition_key"] for row in rows if not metrics_path(row).exists()]
    if missing:
        context.log.warning(f"lp_replay not yet materialized, left out: {', '.join(missing)}")
    if len(missing) == len(rows):
        raise dg.Failure("no materialized lp_replay partitions yet: run `rts refresh`")
    return per_run_files(root, rows, "lp_replay_metrics", metrics_path, LP_REPLAY_METRICS)


def lp_tables(root: Path, matched: list[dict[str, Any]]) -> dict[str, pl.DataFrame] | None:
    """The lp_recommendations tables for the report, plus `traces`: the LP state over time
    of Metta's default, the row's configuration and the best-replayed one, for every run
    of `matched` (discovered_runs rows) that fed that (task, granularity) row. None if
    lp_recommendations is not materialized."""
    paths = storage.lp_aggregate_paths(root)
    if not all(p.exists() for p in paths.values()):
        return None
    tables = {name: pl.read_parquet(path) for name, path in paths.items()}
    recs = tables["recommendations"]
    if not set(LP_RECOMMENDATIONS.names()) <= set(recs.columns):
        # written before the current schema: the report says so; no traces to select
        tables["traces"] = empty(LP_REPLAY_TRACE)
        return tables
    wanted = (
        recs.select(
            "task",
            pl.col("runs").alias("run_id"),
            pl.concat_list(pl.lit(lp_sweep.METTA_DEFAULT), "config", "replay_best").alias("config"),
        )
        .explode("run_id")
        .explode("config")
        .drop_nulls()
        .unique()
    )
    traces = []
    for row in matched:
        folder, stem = row_files(row)
        path = storage.lp_replay_paths(root, folder, stem)["trace"]
        if path.exists():
            traces.append(
                pl.scan_parquet(path).join(
                    wanted.lazy(), on=["task", "run_id", "config"], how="semi"
                )
            )
    # one collect for all files (polars reads them in parallel), in the order of `matched`
    tables["traces"] = pl.concat(pl.collect_all(traces)) if traces else empty(LP_REPLAY_TRACE)
    return tables
