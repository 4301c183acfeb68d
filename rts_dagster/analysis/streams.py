"""Turn a run's logged data into per-label reward series (the `reward_streams` table).

Two granularities (DOMAIN.md): `epoch` rows come from the per-label epoch means Metta
logs as `env_per_label_rewards/<label>`; `completion` rows come from the per-completion
stream of `RewardStreamRecorder` (docs/reward_stream_format.md). Pure polars.
"""

from __future__ import annotations

import polars as pl

from rts_dagster.schema import (
    COMPLETION_RECORD,
    GRANULARITY_COMPLETION,
    GRANULARITY_EPOCH,
    REWARD_STREAMS,
    conform,
    empty,
)

LABEL_REWARD_PREFIX = "env_per_label_rewards/"
AGENT_STEP_KEYS = ("metric/agent_step",)
EPOCH_KEYS = ("metric/epoch",)
# First present wins: Metta logs epoch SPS as overview/sps; the others are fallbacks.
SPS_KEYS = ("overview/sps", "overview/steps_per_second", "metric/sps", "timing_cumulative/sps")

# Only these history keys are needed to build reward streams (read no more than that).
HISTORY_PREFIXES = (LABEL_REWARD_PREFIX, *AGENT_STEP_KEYS, *EPOCH_KEYS, *SPS_KEYS)

# A logged agent_step or epoch beyond this magnitude is a corrupt value, not a counter:
# Metta runs reach ~1e10 agent steps, and below 2**53 (~9e15) a float step converts to
# Int64 exactly. Such a value (and a NaN or +-inf) is read as "not logged on this row", so
# the row keeps its reward and takes the previous row's step; `step_issues` counts them.
MAX_STEP = 1e15


def _valid_counter(col: str) -> pl.Expr:
    """`col` as Float64 with NaN, +-inf and |value| > MAX_STEP turned into null."""
    value = pl.col(col).cast(pl.Float64)
    return pl.when(value.is_finite() & (value.abs() <= MAX_STEP)).then(value)


def _first_present(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def epoch_progress(history: pl.DataFrame) -> pl.DataFrame:
    """Per logged row: agent_step (from `metric/agent_step`, else `_step`), epoch (-1 if
    never logged) and sps, forward-filled in log order so keys logged on separate rows
    still line up. Corrupt step/epoch values (see MAX_STEP) count as not logged."""
    cols = history.columns
    step_col = _first_present(cols, AGENT_STEP_KEYS)
    epoch_col = _first_present(cols, EPOCH_KEYS)
    sps_col = _first_present(cols, SPS_KEYS)
    step = pl.col("_step").cast(pl.Float64)
    if step_col:
        step = _valid_counter(step_col).forward_fill().fill_null(step)
    epoch = _valid_counter(epoch_col).forward_fill().fill_null(-1) if epoch_col else pl.lit(-1.0)
    sps = pl.col(sps_col).forward_fill() if sps_col else pl.lit(None, dtype=pl.Float64)
    return history.select(
        pl.int_range(pl.len()).alias("_row"),
        step.round().cast(pl.Int64).alias("agent_step"),
        epoch.round().cast(pl.Int64).alias("epoch"),
        sps.cast(pl.Float64).alias("sps"),
    )


def epoch_streams(history: pl.DataFrame, task: str, seed: int, run_id: str) -> pl.DataFrame:
    """Long per-label epoch series from a wide history frame (see `RunSource.read_history`).

    A null cell means the label was not logged on that row (not a sample); a logged NaN is
    kept as a sample. `is_stale` marks an exact repeat of the label's previous value: Metta
    re-emits a label's last reward in epochs where it was not completed.
    """
    label_cols = [c for c in history.columns if c.startswith(LABEL_REWARD_PREFIX)]
    if not label_cols or history.height == 0:
        return empty(REWARD_STREAMS)
    progress = epoch_progress(history)
    long = (
        history.select(pl.int_range(pl.len()).alias("_row"), *label_cols)
        .unpivot(index="_row", variable_name="label", value_name="reward")
        .drop_nulls("reward")
        .with_columns(pl.col("label").str.slice(len(LABEL_REWARD_PREFIX)))
        .join(progress, on="_row", how="left")
        .sort("label", "_row")
    )
    by_label = pl.col("reward").shift(1).over("label")
    return conform(
        long.with_columns(
            pl.lit(task).alias("task"),
            pl.lit(seed).alias("seed"),
            pl.lit(run_id).alias("run_id"),
            pl.lit(GRANULARITY_EPOCH).alias("granularity"),
            pl.int_range(pl.len()).over("label").alias("sample_index"),
            (pl.col("reward") == by_label).fill_null(False).alias("is_stale"),
        ),
        REWARD_STREAMS,
        "reward_streams",
    )


def completion_streams(
    completions: pl.DataFrame,
    history: pl.DataFrame | None,
    task: str,
    seed: int,
    run_id: str,
) -> pl.DataFrame:
    """Long per-label completion series from the recorder's stream.

    Completion order across workers is (agent_step, wall_time, worker, completion_index).
    SPS (and the epoch, when the recorder did not know it) come from the epoch the
    completion happened in: the first history row logged at or after its agent_step.
    """
    if completions.height == 0:
        return empty(REWARD_STREAMS)
    stream = conform(completions, COMPLETION_RECORD, "completion stream").sort(
        "agent_step", "wall_time", "worker", "completion_index"
    )
    if history is not None and history.height:
        progress = (
            epoch_progress(history)
            .drop("_row")
            .rename({"epoch": "_hist_epoch"})
            .unique("agent_step", keep="last", maintain_order=True)
            .sort("agent_step")
        )
        # Metta logs an epoch's row at the agent_step reached at its end, so a completion
        # belongs to the first logged row at or after its agent_step; completions after the
        # last logged row (a run killed mid-epoch) take the last row's values.
        last = progress.tail(1)
        stream = stream.join_asof(progress, on="agent_step", strategy="forward").with_columns(
            pl.col("sps").fill_null(last["sps"].item()),
            pl.col("_hist_epoch").fill_null(last["_hist_epoch"].item()),
        )
        stream = stream.with_columns(
            pl.when(pl.col("epoch") >= 0)
            .then(pl.col("epoch"))
            .otherwise(pl.col("_hist_epoch").fill_null(-1))
            .alias("epoch")
        )
    else:
        stream = stream.with_columns(pl.lit(None, dtype=pl.Float64).alias("sps"))
    return conform(
        stream.with_columns(
            pl.lit(task).alias("task"),
            pl.lit(seed).alias("seed"),
            pl.lit(run_id).alias("run_id"),
            pl.lit(GRANULARITY_COMPLETION).alias("granularity"),
            pl.int_range(pl.len()).over("label").alias("sample_index"),
            pl.lit(False).alias("is_stale"),
        ).sort("label", "sample_index"),
        REWARD_STREAMS,
        "reward_streams",
    )


def build_reward_streams(
    history: pl.DataFrame,
    completions: pl.DataFrame | None,
    task: str,
    seed: int,
    run_id: str,
) -> pl.DataFrame:
    """Both granularities of one run, epoch rows first, each sorted by label and sample."""
    parts = [epoch_streams(history, task, seed, run_id)]
    if completions is not None:
        parts.append(completion_streams(completions, history, task, seed, run_id))
    return pl.concat(parts, how="vertical")


def step_issues(history: pl.DataFrame, completions: pl.DataFrame | None = None) -> dict[str, int]:
    """Counts of suspect progress values in one run, for the partition's metadata and the
    report (the rows themselves are kept: their rewards are valid samples).

    - `agent_step_invalid` / `epoch_invalid`: history rows whose logged value is NaN, +-inf
      or beyond +-MAX_STEP; `epoch_progress` reads them as not logged on that row.
    - `agent_step_negative`: history and completion rows with a (valid) agent_step < 0,
      which no trainer counter produces; kept as logged.
    - `agent_step_backward`: history rows whose agent_step is below the previous logged one,
      and completion rows below the previous completion of the same worker. A resumed run
      legitimately goes back to its checkpoint's step, so this is a note, not an error.
    """
    cols = history.columns
    counts = {
        "agent_step_invalid": 0,
        "epoch_invalid": 0,
        "agent_step_negative": 0,
        "agent_step_backward": 0,
    }
    for name, key_col in (
        ("agent_step_invalid", _first_present(cols, AGENT_STEP_KEYS)),
        ("epoch_invalid", _first_present(cols, EPOCH_KEYS)),
    ):
        if key_col and history.height:
            logged = pl.col(key_col).is_not_null()
            counts[name] = int(
                history.select((logged & _valid_counter(key_col).is_null()).sum()).item()
            )
    step_col = _first_present(cols, AGENT_STEP_KEYS) or _first_present(cols, ("_step",))
    if step_col and history.height:
        steps = _valid_counter(step_col).drop_nulls()
        row = history.select(
            (steps < 0).sum().alias("negative"), (steps.diff() < 0).sum().alias("backward")
        ).row(0, named=True)
        counts["agent_step_negative"] += int(row["negative"])
        counts["agent_step_backward"] += int(row["backward"])
    if completions is not None and completions.height:
        step = pl.col("agent_step")
        row = (
            conform(completions, COMPLETION_RECORD, "completion stream")
            .sort("worker", "completion_index")
            .select(
                (step < 0).sum().alias("negative"),
                (step.diff().over("worker") < 0).sum().alias("backward"),
            )
            .row(0, named=True)
        )
        counts["agent_step_negative"] += int(row["negative"])
        counts["agent_step_backward"] += int(row["backward"])
    return counts


def describe_step_issues(issues: dict[str, int]) -> list[str]:
    """Plain sentences for the non-zero counts of `step_issues` (empty when all are 0)."""
    words = {
        "agent_step_invalid": "rows with a corrupt metric/agent_step (NaN, inf or beyond "
        f"{MAX_STEP:.0e}); their step was taken from the previous row",
        "epoch_invalid": "rows with a corrupt metric/epoch (NaN, inf or beyond "
        f"{MAX_STEP:.0e}); their epoch was taken from the previous row",
        "agent_step_negative": "rows with a negative agent_step (kept as logged; no trainer "
        "counter is negative, so check the logging)",
        "agent_step_backward": "rows where agent_step goes back (normal for a resumed run, "
        "which restarts from its checkpoint's step)",
    }
    return [f"{issues[k]} {text}" for k, text in words.items() if issues.get(k, 0)]
