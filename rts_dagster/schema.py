"""Columns of every table rts_dagster writes or exchanges between stages.

Each table is a polars schema (ordered name -> dtype). Producers build frames with
`conform(df, SCHEMA)`, which selects, orders and casts the columns and fails with the
name of any missing column; consumers can rely on the names and dtypes below.
"""

from __future__ import annotations

import polars as pl

# --- Per-completion reward stream, as written by `RewardStreamRecorder` -----------------
# See docs/reward_stream_format.md. One row per finished episode in one training process.
COMPLETION_RECORD = pl.Schema(
    {
        "completion_index": pl.Int64,  # 0, 1, 2, ... per (run, worker), in completion order
        "worker": pl.Int32,  # rank/worker id of the process that recorded it
        "label": pl.String,  # curriculum label (MettaGridConfig.label); untrusted text
        "task_id": pl.Int64,  # task instance id inside the curriculum (-1 if unknown)
        "reward": pl.Float64,  # the score LP is fed: mean over agents of the episode return
        "agent_step": pl.Int64,  # trainer agent_step when the episode finished
        "epoch": pl.Int64,  # trainer epoch when the episode finished (-1 if unknown)
        "wall_time": pl.Float64,  # seconds since the Unix epoch
    }
)

# --- discovered_runs ---------------------------------------------------------------------
RUN_STATUS_MATCHED = "matched"  # belongs to a (task, seed): has a partition
RUN_STATUS_IGNORED = "ignored"  # no rule matched: listed, no partition
RUN_STATUS_UNREADABLE = "unreadable"  # the source could not read it: listed with the error

DISCOVERED_RUNS = pl.Schema(
    {
        "run_id": pl.String,
        "run_name": pl.String,
        "project": pl.String,
        "entity": pl.String,
        "user": pl.String,  # from the `user:<name>` tag, else ""
        "tags": pl.List(pl.String),
        "state": pl.String,  # finished | failed | crashed | running | killed | ...
        "created_at": pl.Datetime("us", "UTC"),
        "heartbeat_at": pl.Datetime("us", "UTC"),
        "task": pl.String,  # null unless status == matched
        "seed": pl.Int64,  # null unless status == matched
        "partition_key": pl.String,  # null unless status == matched
        "status": pl.String,  # matched | ignored | unreadable
        "reason": pl.String,  # why ignored/unreadable, or which rule matched
        "lp_config": pl.String,  # JSON object of LP hyperparameters found in the run config
        "source": pl.String,  # "offline" | "wandb"
        "location": pl.String,  # file path or entity/project/run_id
        "fingerprint": pl.String,  # changes whenever the run's data may have changed
    }
)

# --- reward_streams (one partition = one training run) -----------------------------------
GRANULARITY_EPOCH = "epoch"  # per-label epoch means from env_per_label_rewards/<label>
GRANULARITY_COMPLETION = "completion"  # the per-episode stream of the recorder

REWARD_STREAMS = pl.Schema(
    {
        "task": pl.String,
        "seed": pl.Int64,
        "run_id": pl.String,
        "label": pl.String,
        "granularity": pl.String,  # "epoch" | "completion"
        "sample_index": pl.Int64,  # 0 = first sample of that label in that run
        "agent_step": pl.Int64,
        "epoch": pl.Int64,  # -1 where unknown
        "reward": pl.Float64,
        "sps": pl.Float64,  # overview/sps of that epoch (as-of join on agent_step for completions)
        "is_stale": pl.Boolean,  # epoch rows only: exact repeat of the label's previous value
    }
)


def conform(df: pl.DataFrame, schema: pl.Schema, table: str = "table") -> pl.DataFrame:
    """Return `df` with exactly the columns of `schema`, in order, cast to its dtypes."""
    missing = [name for name in schema.names() if name not in df.columns]
    if missing:
        raise ValueError(f"{table}: missing column(s) {missing}; got {df.columns}")
    return df.select(pl.col(name).cast(dtype) for name, dtype in schema.items())


def empty(schema: pl.Schema) -> pl.DataFrame:
    """An empty frame with the given schema."""
    return pl.DataFrame(schema=schema)
