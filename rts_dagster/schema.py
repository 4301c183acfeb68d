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


# === Analysis tables (rts_dagster.analysis) ===============================================
# One reward series: the ordered samples of one label in one run at one granularity.
SERIES_KEYS: tuple[str, ...] = ("task", "seed", "run_id", "label", "granularity")

_KEY_TYPES = {
    "task": pl.String,
    "seed": pl.Int64,
    "run_id": pl.String,
    "label": pl.String,
    "granularity": pl.String,
}

# --- metrics.series_metrics: one row per series -------------------------------------------
SERIES_METRICS = pl.Schema(
    {
        **_KEY_TYPES,
        "n_rows": pl.Int64,  # rows of the series in the input (before cleaning)
        "n_samples": pl.Int64,  # samples used: finite rewards, minus stale rows if destaled
        "n_nonfinite": pl.Int64,  # rows dropped because the reward was NaN, +-inf or null
        "n_stale": pl.Int64,  # rows flagged is_stale (epoch re-emissions; 0 for completions)
        "stale_fraction": pl.Float64,  # n_stale / n_rows
        "destaled": pl.Boolean,  # True: stale rows were dropped before computing metrics
        "mean_reward": pl.Float64,  # reward units
        "final_reward": pl.Float64,  # mean of the last `final_fraction` of the samples
        "mean_slope": pl.Float64,  # mean rolling OLS slope, reward per sample
        "slope_p10": pl.Float64,  # quantiles of the rolling OLS slope, reward per sample
        "slope_p50": pl.Float64,
        "slope_p90": pl.Float64,
        "ema_slope_final": pl.Float64,  # EMA of first differences at the last sample
        "noise_rolling_mean": pl.Float64,  # mean rolling std (ddof=1), reward units
        "noise_diff": pl.Float64,  # std(first differences, ddof=1) / sqrt(2)
        "noise_mad": pl.Float64,  # 1.4826 * MAD(first differences) / sqrt(2)
        "sps_mean": pl.Float64,  # mean SPS over samples with a finite SPS
        "sps_reward_corr": pl.Float64,  # Pearson(sps, reward)
        "sps_reward_spearman": pl.Float64,  # Spearman(sps, reward); null unless enabled
        "sps_noise_corr": pl.Float64,  # Pearson(sps, rolling std)
        "sps_dip_fraction": pl.Float64,  # share of samples with sps < (1 - t) * median sps
        "noise_dip_ratio": pl.Float64,  # mean rolling std in dips / outside dips
        "note": pl.String,  # why a statistic is NaN/degenerate; "" when nothing to say
    }
)

# --- metrics.rolling_metrics: one row per (cleaned) sample --------------------------------
ROLLING_METRICS = pl.Schema(
    {
        **_KEY_TYPES,
        "sample_index": pl.Int64,  # position in the cleaned series: 0, 1, 2, ...
        "raw_sample_index": pl.Int64,  # the input's sample_index of that row
        "agent_step": pl.Int64,
        "reward": pl.Float64,
        "sps": pl.Float64,
        "rolling_slope": pl.Float64,  # OLS slope over the trailing slope_window samples
        "ema_slope": pl.Float64,  # EMA (half-life ema_halflife) of first differences
        "rolling_std": pl.Float64,  # std (ddof=1) over the trailing noise_window samples
    }
)

# --- metrics.noise_by_progress: one row per (series, progress bin) -------------------------
NOISE_BY_PROGRESS = pl.Schema(
    {
        **_KEY_TYPES,
        "bin": pl.Int64,  # 0 .. n_bins-1, equal-count bins of the cleaned sample index
        "sample_index_start": pl.Int64,  # first sample of the bin (cleaned index)
        "sample_index_end": pl.Int64,  # last sample of the bin (inclusive)
        "progress": pl.Float64,  # bin centre as a fraction of the series, in (0, 1)
        "n_samples": pl.Int64,
        "mean_reward": pl.Float64,
        "noise_rolling_mean": pl.Float64,  # mean rolling std over the bin's defined windows
        "noise_diff": pl.Float64,  # std of first differences inside the bin / sqrt(2)
    }
)

# --- variance.variance_table ---------------------------------------------------------------
VARIANCE_TABLE = pl.Schema(
    {
        "scope": pl.String,  # "across_tasks" | "within_task:<task>"
        "level": pl.String,  # "seed_vs_task" | "seed_vs_label"
        "var_seed": pl.Float64,  # pooled within-group variance of seed means
        "var_task_or_label": pl.Float64,  # variance of group means across groups
        "ratio": pl.Float64,  # var_seed / var_task_or_label
        "ratio_ci_low": pl.Float64,
        "ratio_ci_high": pl.Float64,
        "icc": pl.Float64,  # ICC(1), one-way random effects, group = task (or label)
        "icc_ci_low": pl.Float64,
        "icc_ci_high": pl.Float64,
        "n_tasks": pl.Int64,  # tasks used (1 for within_task scopes)
        "n_seeds": pl.Int64,  # across_tasks: runs (task, seed) used; within_task: seeds
        "reason": pl.String,  # why values are NaN or tasks were left out; "" otherwise
        "n_groups": pl.Int64,  # groups compared: tasks, or the task's labels
    }
)

# --- kalman.estimate_local_level: one row per series ---------------------------------------
LOCAL_LEVEL = pl.Schema(
    {
        **_KEY_TYPES,
        "n_samples": pl.Int64,
        "var_diff": pl.Float64,  # Var(y_t - y_{t-1})
        "cov_diff_lag1": pl.Float64,  # Cov(diff_t, diff_{t-1})
        "q": pl.Float64,  # level step variance (reward^2 per sample), clipped >= 0
        "r": pl.Float64,  # observation noise variance (reward^2), clipped >= 0
        "signal_to_noise": pl.Float64,  # q / r
        "gain": pl.Float64,  # steady-state Kalman gain K = optimal EMA weight
        "timescale": pl.Float64,  # 1 / K in samples, capped at n_samples
        "note": pl.String,
    }
)

# --- kalman.recommend_timescales: one row per (task, group) -------------------------------
TIMESCALE_RECOMMENDATIONS = pl.Schema(
    {
        "task": pl.String,
        "group": pl.String,  # "label" (one label of the task) | "pooled" (all its labels)
        "label": pl.String,  # the label, or "*" for the pooled row
        "granularity": pl.String,
        "n_series": pl.Int64,
        "n_seeds": pl.Int64,
        "noise_std": pl.Float64,  # sqrt(r), reward units (median over series)
        "drift_std": pl.Float64,  # sqrt(q), reward units per sample (median over series)
        "gain": pl.Float64,  # recommended EMA weight (from the median q and r)
        "timescale": pl.Float64,  # recommended EMA timescale 1/gain, samples of that label
        "timescale_ci_low": pl.Float64,  # 95% bootstrap CI over seeds
        "timescale_ci_high": pl.Float64,
        "lp_ema_timescale": pl.Float64,  # LP config's `ema_timescale` (an EMA weight)
        "lp_timescale": pl.Float64,  # 1 / lp_ema_timescale, completions of one task
        "timescale_ratio": pl.Float64,  # recommended timescale / LP timescale
        "note": pl.String,
        # Noise vs the quietest label of the task (label rows) or the quietest task (pooled
        # rows); null when there is nothing to compare with.
        "reference_label": pl.String,  # that label (label rows) or task (pooled rows)
        "noise_ratio": pl.Float64,  # noise_std / the reference's noise_std
        "noise_ratio_ci_low": pl.Float64,  # 95% bootstrap CI over seeds
        "noise_ratio_ci_high": pl.Float64,
        "timescale_vs_reference": pl.Float64,  # timescale / the reference's timescale
    }
)


# === LP replay (analysis.lp_replay, lp_signal, lp_sweep) ====================================
_LP_SETTINGS = {
    "config": pl.String,  # name of the curriculum configuration (sweep entry)
    "variant": pl.String,  # "main" | "zscore"
    "ema_timescale": pl.Float64,  # LP fast EMA weight
    "slow_timescale_factor": pl.Float64,
    "z_score_amplification": pl.Float64,  # zscore variant only
    "z_anneal_start": pl.Float64,  # annealed Z: value at the start of the stream
    "z_anneal_end": pl.Float64,
    "pool_cap": pl.Int64,  # active-pool cap (labels), null = none
    "sps_weight": pl.Float64,  # SPS-aware down-weighting exponent, 0 = off
}

# One row per (run, configuration): signal quality of the replay (lp_signal module doc).
LP_REPLAY_METRICS = pl.Schema(
    {
        "task": pl.String,
        "seed": pl.Int64,
        "run_id": pl.String,
        "granularity": pl.String,  # the stream replayed: "completion" or "epoch"
        **_LP_SETTINGS,
        "n_completions": pl.Int64,  # samples replayed
        "n_labels": pl.Int64,
        "gini_mean": pl.Float64,  # Gini of the sampling distribution, mean over time
        "entropy_mean": pl.Float64,  # entropy / log(n_labels), mean over time
        "lp_snr": pl.Float64,  # probability per improving label / per plateaued label
        "improving_mass": pl.Float64,  # mean probability mass on improving labels
        "improving_fraction": pl.Float64,  # share of label-instants improving
        "plateaued_fraction": pl.Float64,
        "lag_median": pl.Float64,  # completions from turning improving to LP top k (inf: never)
        "lag_censored": pl.Float64,  # share of those events never reaching the top k
        "n_improving_events": pl.Int64,
        "churn_plateau": pl.Float64,  # rank moves of plateaued labels per 1000 completions
        "starved_fraction": pl.Float64,  # label-instants below 1/10 of uniform probability
        "pole_fraction": pl.Float64,  # main: label-instants with |R(F)| or |R(S)| > 1
        "top_k": pl.Int64,
    }
)

# The LP state over time of one run under a few configurations (for plots).
LP_REPLAY_TRACE = pl.Schema(
    {
        "task": pl.String,
        "seed": pl.Int64,
        "run_id": pl.String,
        "config": pl.String,
        "eval_index": pl.Int64,  # completions fed so far - 1
        "progress": pl.Float64,  # fraction of the stream
        "label": pl.String,
        "count": pl.Int64,  # completions of that label so far
        "fast": pl.Float64,  # F
        "slow": pl.Float64,  # S
        "score": pl.Float64,  # main: raw LP score; zscore: LP_i
        "probability": pl.Float64,  # sampling probability
        "trend": pl.Int8,  # 1 improving, 0 plateaued, -1 declining, -2 undecided
    }
)

# One row per (task, configuration, metric): across-seed mean, CI and paired difference
# against Metta's default on the same seeds.
LP_SWEEP_SUMMARY = pl.Schema(
    {
        "task": pl.String,
        **_LP_SETTINGS,
        "metric": pl.String,
        "n_seeds": pl.Int64,
        "mean": pl.Float64,
        "ci_low": pl.Float64,  # 95% t interval over seeds
        "ci_high": pl.Float64,
        "diff_vs_default": pl.Float64,  # mean paired difference (log ratio for lp_snr)
        "diff_ci_low": pl.Float64,
        "diff_ci_high": pl.Float64,
    }
)

# One row per task: the recommended configuration and its evidence.
LP_RECOMMENDATIONS = pl.Schema(
    {
        "task": pl.String,
        "granularity": pl.String,
        **_LP_SETTINGS,
        "n_seeds": pl.Int64,  # distinct seeds replayed
        "n_runs": pl.Int64,  # runs replayed (a seed run twice counts twice)
        "n_pairs": pl.Int64,  # runs with a finite SNR under both configurations
        "snr_default": pl.Float64,  # geometric mean lp_snr of Metta's default
        "snr_recommended": pl.Float64,
        "snr_ratio": pl.Float64,  # recommended / default, geometric mean over seeds
        "snr_ratio_ci_low": pl.Float64,  # 95% t interval of the paired log ratio
        "snr_ratio_ci_high": pl.Float64,
        "lag_default": pl.Float64,
        "lag_recommended": pl.Float64,
        "churn_default": pl.Float64,
        "churn_recommended": pl.Float64,
        "starved_default": pl.Float64,
        "starved_recommended": pl.Float64,
        "replay_best": pl.String,  # the highest replayed SNR, eligible or not (null: none)
        "confident": pl.Boolean,  # the ratio's CI excludes 1
        "sentence": pl.String,  # plain words; untrusted text not escaped here
    }
)

# Closed loop: the simulator under the recommended configuration vs Metta's default.
LP_CLOSED_LOOP = pl.Schema(
    {
        "task": pl.String,
        "config": pl.String,
        "config_key": pl.String,  # hash of the configuration's settings
        "seed": pl.Int64,
        "epochs": pl.Int64,
        "time_to_competence": pl.Float64,  # epochs until mean latent competence >= target
        "reached_competence": pl.Boolean,  # False: never; time_to_competence = epochs
        "final_reward": pl.Float64,  # mean episode reward over the last 10% of epochs
        "competence_final": pl.Float64,  # mean latent competence at the end
    }
)

LP_CLOSED_LOOP_SUMMARY = pl.Schema(
    {
        "task": pl.String,
        "config": pl.String,  # the configuration compared with Metta's default
        "role": pl.String,  # "recommended" | "replay_best" | "local_level_gain" (kalman_matched)
        "metric": pl.String,  # time_to_competence | final_reward | competence_final
        "n_seeds": pl.Int64,
        "default_mean": pl.Float64,
        "recommended_mean": pl.Float64,
        "diff": pl.Float64,  # recommended - default, mean over paired seeds
        "diff_ci_low": pl.Float64,  # 95% t interval
        "diff_ci_high": pl.Float64,
        "n_censored": pl.Int64,  # runs that never reached competence (counted as epochs)
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
