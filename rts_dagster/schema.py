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
        # WandB page of the run (entity/project/run id known), parts URL-quoted; else null
        "url": pl.String,
        # --- task and arm (discovery.resolve_tasks, arms.assign_arms); null unless matched
        "rule": pl.String,  # the discovery rule that matched
        "recipe": pl.String,  # the recipe (from the config or an alias); null: unknown
        "task_source": pl.String,  # how the task was decided: config recipe | alias ... | name
        "arm": pl.String,  # "baseline" or how its config differs, e.g. "z_score_amplification=30"
        "arm_id": pl.String,  # hash of the config without seed and bookkeeping
        "arm_settings": pl.String,  # JSON: dotted key -> value where the arm differs
        "baseline": pl.Boolean,  # the run's arm is its task's baseline
        "baseline_reason": pl.String,  # why that arm is the task's baseline
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
# One row per (scope, granularity); epoch and completion values are never pooled. Variance
# components of random-effects models (see rts_dagster/analysis/variance.py): across_tasks is
# one-way (run values grouped by task), within_task:<task> is two-way additive (label + seed).
VARIANCE_TABLE = pl.Schema(
    {
        "scope": pl.String,  # "across_tasks" | "within_task:<task>"
        "level": pl.String,  # "seed_vs_task" | "seed_vs_label"
        "granularity": pl.String,  # "epoch" | "completion"
        "var_seed": pl.Float64,  # sigma2 within: MSW (across) / residual MS (within), reward^2
        "var_seed_ci_low": pl.Float64,  # exact chi-square interval of var_seed
        "var_seed_ci_high": pl.Float64,
        "var_task_or_label": pl.Float64,  # sigma2 between: (MSB - MSW) / k0; can be < 0
        "ratio": pl.Float64,  # var_seed / var_task_or_label; +inf when var_task_or_label <= 0
        "ratio_ci_low": pl.Float64,  # implied by the icc's F interval
        "ratio_ci_high": pl.Float64,  # +inf when var_task_or_label = 0 is not excluded
        "icc": pl.Float64,  # across: ICC(1) one-way; within: consistency ICC(C,1)
        "icc_ci_low": pl.Float64,  # exact F interval (approximate for unequal group sizes)
        "icc_ci_high": pl.Float64,
        "n_tasks": pl.Int64,  # tasks used (1 for within_task scopes)
        "n_seeds": pl.Int64,  # across_tasks: runs (task, seed) used; within_task: seeds
        "n_runs": pl.Int64,  # distinct run ids that fed the row
        "runs": pl.List(pl.String),  # those run ids, sorted
        "n_groups": pl.Int64,  # groups compared: tasks, or the task's labels
        # method and n of the icc/ratio CIs, "" if none; e.g.
        # "exact F (one-way random effects ICC(1)), n=9 runs in 3 tasks"
        "ci_method": pl.String,
        "reason": pl.String,  # why values are NaN or tasks were left out; "" otherwise
    }
)

# --- kalman.estimate_local_level: one row per (series, regime) ------------------------------
REGIME_NAMES = ("whole", "learning", "plateau")  # kalman.REGIMES
TIMESCALE_UNITS = ("completions", "epochs")  # one sample of a completion / epoch series

LOCAL_LEVEL = pl.Schema(
    {
        **_KEY_TYPES,
        "regime": pl.String,  # "whole" | "learning" | "plateau" (kalman.split_regimes)
        "unit": pl.String,  # "completions" (of the label) | "epochs": unit of one sample
        "regime_start": pl.Int64,  # first sample of the regime (cleaned series position)
        "regime_end": pl.Int64,  # one past its last sample (start = end: regime absent)
        "n_samples": pl.Int64,  # samples in the regime
        "trend_slope": pl.Float64,  # OLS slope of the regime's line, reward per `unit`
        "var_diff": pl.Float64,  # Var(y_t - y_{t-1})
        "cov_diff_lag1": pl.Float64,  # Cov(diff_t, diff_{t-1})
        "q": pl.Float64,  # level step variance, reward^2 per `unit`
        "r": pl.Float64,  # observation noise variance, reward^2
        "signal_to_noise": pl.Float64,  # q / r
        "gain": pl.Float64,  # steady-state Kalman gain K (tracking-optimal EMA weight per `unit`)
        "timescale": pl.Float64,  # 1 / K in `unit`, capped at n_samples
        "at_bound": pl.Boolean,  # K at a grid end or 1/K > n_samples: left out of pooling
        "ljung_box_p": pl.Float64,  # Ljung-Box p of the fitted EMA's one-step errors
        "ljung_box_lags": pl.Int64,  # lags of that test (0: not tested)
        "fit_ok": pl.Boolean,  # ljung_box_p >= 0.01 (errors consistent with white noise)
        "note": pl.String,  # why a value is NaN, flagged or left out; "" otherwise
    }
)

# --- kalman.recommend_timescales: one row per (task, group, unit, regime) -------------------
# Descriptive: the tracking-optimal EMA timescale of the stream (steady-state Kalman 1/K),
# pooled over seeds. Not LP's best timescale (see LP_TIMESCALES).
TIMESCALE_RECOMMENDATIONS = pl.Schema(
    {
        "task": pl.String,
        "group": pl.String,  # "label" (one label of the task) | "pooled" (all its labels)
        "label": pl.String,  # the label, or "*" for the pooled row
        "granularity": pl.String,
        "regime": pl.String,  # "whole" | "learning" | "plateau"
        "unit": pl.String,  # "completions" | "epochs": unit of timescale, drift_std
        "n_series": pl.Int64,  # series rows of the group (usable or not)
        "n_seeds": pl.Int64,  # seeds (seed, run_id) with a usable fit: the n of the interval
        "n_excluded": pl.Int64,  # series rows left out of the pooled numbers
        "excluded_reason": pl.String,  # counted reasons ("2 gain at a grid bound ..."); "" if none
        "n_fit_not_ok": pl.Int64,  # usable fits with Ljung-Box p < 0.01 (kept)
        "n_seeds_epoch_only": pl.Int64,  # seeds of the group whose run has no completion stream
        "noise_std": pl.Float64,  # sqrt(r), reward units: geometric mean over seeds
        "drift_std": pl.Float64,  # sqrt(q), reward per `unit`: geometric mean over seeds
        "gain": pl.Float64,  # 1 / timescale: tracking-optimal EMA weight per `unit`
        "timescale": pl.Float64,  # geometric mean over seeds of 1/K, in `unit`
        "timescale_ci_low": pl.Float64,  # interval over seeds (ci_method, ci_n, ci_level)
        "timescale_ci_high": pl.Float64,
        "ci_method": pl.String,  # "t on logs"
        "ci_n": pl.Int64,  # seeds behind the interval (< 2: bounds NaN)
        "ci_level": pl.Float64,  # 0.95
        # LP config: only where unit == "completions" (null otherwise, see lp_comparison)
        "lp_ema_timescale": pl.Float64,  # LP config's `ema_timescale` (weight per completion
        # of one task instance)
        "lp_timescale": pl.Float64,  # 1 / lp_ema_timescale, completions of one task instance
        # always null: a label timescale (completions of the label) and LP's per-instance
        # timescale need instances per label to compare (lp_comparison)
        "timescale_ratio": pl.Float64,
        "lp_comparison": pl.String,  # what the comparison means, or why it is null
        "note": pl.String,
        # Noise vs the typical label of the same (task, unit, regime) (label rows), or vs
        # the quietest task (pooled rows, <= 10 tasks) / the typical task (> 10 tasks);
        # null when there is nothing to compare with (kalman._add_references).
        "reference_label": pl.String,  # that reference, named
        "noise_ratio": pl.Float64,  # geometric mean over seeds of noise / reference noise
        "noise_ratio_ci_low": pl.Float64,
        "noise_ratio_ci_high": pl.Float64,
        "noise_ratio_ci_method": pl.String,  # the interval's method (kalman.CI_METHOD_*)
        "noise_ratio_n": pl.Int64,  # pairs of seeds (paired) or the smaller seed count (Welch)
        "timescale_vs_reference": pl.Float64,  # timescale / the reference's timescale
    }
)

# --- lp_timescales.lp_separation_table: one row per (task, label | "*", seed | pooled) ----
# LP's own objective: d' of F - S between a learning and a plateaued label (completions only).
LP_TIMESCALES = pl.Schema(
    {
        "task": pl.String,
        "label": pl.String,  # the label, or "*": all labels of the task (geometric mean d')
        "seed": pl.Int64,  # null on pooled rows
        "run_id": pl.String,  # null on pooled rows
        "scope": pl.String,  # "seed" | "pooled" (over seeds)
        "n_seeds": pl.Int64,  # seeds with a usable unit (behind the scores)
        "n_labels": pl.Int64,  # labels with a usable unit
        "n_excluded": pl.Int64,  # (seed, label) units of the scope left out (kalman's exclusions)
        "excluded_reason": pl.String,  # counted reasons ("3 no plateau regime, ..."); "" if none
        "score_method": pl.String,  # d' is model-based: closed forms at the measured inputs
        "plateau_noise_std": pl.Float64,  # sqrt(r) of the plateau regime, reward units
        "plateau_drift_std": pl.Float64,  # sqrt(q), reward per completion
        "learning_slope": pl.Float64,  # |OLS slope| of the learning regime, reward per completion
        "learning_duration": pl.Float64,  # completions in the learning regime
        "t_eval": pl.Float64,  # completions into the ramp where d' is evaluated (duration / 2)
        "tracking_timescale": pl.Float64,  # plateau Kalman 1/K, completions (descriptive)
        "best_ema_timescale": pl.Float64,  # fast EMA weight a maximising mean log d'
        "best_slow_factor": pl.Float64,  # slow_timescale_factor f of that pair
        "best_score": pl.Float64,  # d' of the best pair (geometric mean over the scope)
        "default_score": pl.Float64,  # d' of Metta's default (a = 0.001, f = 0.2)
        "score_ratio": pl.Float64,  # best / default, in-sample (optimistic)
        "best_on_grid_edge": pl.Boolean,  # the optimum sits on the grid's edge
        "limit_score": pl.Float64,  # d' as slow_timescale_factor -> 1 (finite: d' is scale-free)
        "loo_ema_timescale": pl.Float64,  # seed rows: pair chosen on the other seeds
        "loo_slow_factor": pl.Float64,
        "loo_score": pl.Float64,  # d' of that pair on this seed
        "loo_ratio": pl.Float64,  # loo_score / default_score on this seed (t on logs over seeds)
        "note": pl.String,  # why values are null / left out; "" otherwise
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

# One row per (task, granularity, configuration, metric): across-run mean, CI and paired
# difference against Metta's default on the same runs. A completion replay and an epoch
# replay of one task are never pooled. Intervals are per configuration (not adjusted for
# picking among configurations: LP_RECOMMENDATIONS is).
LP_SWEEP_SUMMARY = pl.Schema(
    {
        "task": pl.String,
        "granularity": pl.String,  # the streams replayed: "completion" or "epoch"
        **_LP_SETTINGS,
        "metric": pl.String,
        "runs": pl.List(pl.String),  # run ids that fed this row
        "n_seeds": pl.Int64,  # runs with a finite value (the n of ci_low/ci_high)
        "mean": pl.Float64,  # geometric mean for lp_snr
        "ci_low": pl.Float64,
        "ci_high": pl.Float64,
        "ci_method": pl.String,  # "t" | "t on logs" (lp_snr)
        "n_pairs": pl.Int64,  # runs with a finite difference (the n of diff_ci_*)
        "diff_vs_default": pl.Float64,  # mean paired difference (log ratio for lp_snr)
        "diff_ci_low": pl.Float64,
        "diff_ci_high": pl.Float64,
        "diff_ci_method": pl.String,  # "paired t" | "paired t on logs" (lp_snr)
    }
)

# One row per (task, granularity): the replay evidence of lp_sweep.recommend (rule in its
# module docstring). Descriptive: the advice is the report's verdict (analysis/verdict.py).
LP_RECOMMENDATIONS = pl.Schema(
    {
        "task": pl.String,
        "granularity": pl.String,  # "completion" | "epoch" (never pooled)
        **_LP_SETTINGS,  # config: the configuration that passed every check, else metta_default
        "runs": pl.List(pl.String),  # run ids that fed this row
        "n_seeds": pl.Int64,  # distinct seeds replayed
        "n_runs": pl.Int64,  # runs replayed (a seed run twice counts twice)
        "n_compared": pl.Int64,  # K: configurations (>= 2 pairs) the winner was picked from
        "n_pairs": pl.Int64,  # pairs behind snr_ratio's interval (0 for metta_default)
        "snr_default": pl.Float64,  # geometric mean lp_snr of Metta's default
        "snr_recommended": pl.Float64,  # geometric mean lp_snr of `config`
        "signal_ci_low": pl.Float64,  # `config`'s own lp_snr interval over runs
        "signal_ci_high": pl.Float64,
        "signal_ci_method": pl.String,  # "t on logs"
        "signal_n": pl.Int64,  # runs with a finite lp_snr under `config`
        "snr_ratio": pl.Float64,  # config / default, geometric mean of the paired ratios
        "snr_ratio_ci_low": pl.Float64,  # selection-adjusted interval of the paired log ratio
        "snr_ratio_ci_high": pl.Float64,
        "ci_method": pl.String,  # e.g. "t, Bonferroni over 15" (n = n_pairs); null: default
        "lag_default": pl.Float64,
        "lag_recommended": pl.Float64,
        "churn_default": pl.Float64,
        "churn_recommended": pl.Float64,
        "starved_default": pl.Float64,
        "starved_recommended": pl.Float64,
        "guards_passed": pl.Boolean,  # `config` within the lag, churn and starvation guards
        "replay_best": pl.String,  # the highest replayed SNR ratio > 1, eligible or not
        "replay_best_snr_ratio": pl.Float64,
        "replay_best_ci_low": pl.Float64,  # selection-adjusted, as snr_ratio_ci_*
        "replay_best_ci_high": pl.Float64,
        "replay_best_ci_method": pl.String,  # e.g. "t, Bonferroni over 15"
        "replay_best_n_pairs": pl.Int64,
        "replay_best_reason": pl.String,  # why it was not the recommendation (null: it was)
        "rejected": pl.List(pl.String),  # "config: reasons" of every better-replaying reject
        "confident": pl.Boolean,  # a configuration other than the default passed every check
        "actionable": pl.Boolean,  # confident and replayed per completion (settings transfer)
        "sentence": pl.String,  # descriptive evidence; untrusted text not escaped here
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
        # simulator: the learner model; mettagrid: real MettaGrid + PPO (competence = mean
        # over labels of the label's reward in the last 25% of epochs; time in epochs until
        # the label-mean reward reaches 0.8)
        "engine": pl.String,
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
        "diff_ci_low": pl.Float64,
        "diff_ci_high": pl.Float64,
        "ci_method": pl.String,  # "paired t"
        "n_pairs": pl.Int64,  # seeds with a finite difference (the interval's n)
        "n_censored": pl.Int64,  # runs that never reached competence (counted as epochs)
        "engine": pl.String,  # what trained the runs: simulator | mettagrid
    }
)

# === Data quality (analysis.quality) ============================================================
# One row per series: why it can or cannot feed an aggregate.
SERIES_QUALITY = pl.Schema(
    {
        **_KEY_TYPES,
        "n_rows": pl.Int64,
        "n_finite": pl.Int64,  # rows with a finite reward
        "n_repeats": pl.Int64,  # epoch rows that repeat the previous value exactly
        "n_usable": pl.Int64,  # finite rows that are not exact repeats
        "reward_min": pl.Float64,
        "reward_max": pl.Float64,
        "status": pl.String,  # ok | constant | mostly_stale | too_short | no_finite
        "reason": pl.String,  # plain words; "" when ok
        "arm": pl.String,  # the run's arm ("baseline" unless its task has several)
        "baseline_arm": pl.Boolean,  # False: feeds only the Experiments comparison
    }
)

# One row per (run, granularity): does it contribute, and if not fully, why.
RUN_QUALITY = pl.Schema(
    {
        "task": pl.String,
        "seed": pl.Int64,
        "run_id": pl.String,
        "granularity": pl.String,
        "n_series": pl.Int64,
        "n_level": pl.Int64,  # series usable for reward-level summaries (ok or constant)
        "n_dynamics": pl.Int64,  # series usable for noise, drift, timescales, LP (ok)
        "contributes_level": pl.Boolean,
        "contributes_dynamics": pl.Boolean,
        "reason": pl.String,  # which series were left out and why; "" when none
    }
)


# === What the epoch means can tell (analysis.epoch_view) =======================================
EPOCH_VIEW = pl.Schema(
    {
        "task": pl.String,
        "seed": pl.Int64,
        "run_id": pl.String,
        "label": pl.String,
        "n_epochs": pl.Int64,  # epochs used: the second half of the run
        "drift_per_epoch": pl.Float64,  # OLS slope, reward per epoch
        "epoch_noise": pl.Float64,  # sqrt(Var(diff) / 2) of the epoch series, reward units
        "lam": pl.Float64,  # held-value renewal rate per epoch (c / N); NaN: not told
        "lag_epochs": pl.Float64,  # 1 / lam: how old a held value is, epochs
        "note": pl.String,  # why lam is not told; "" when it is
        "scale_source": pl.String,  # recorded stream | run config | user | none
        "label_per_epoch": pl.Float64,  # c: completions of the label per epoch (given or implied)
        "total_per_epoch": pl.Float64,  # C: completions of all labels per epoch
        "n_envs": pl.Float64,  # N: environments (given or implied)
        "sigma_per_completion": pl.Float64,  # converted per-completion sd; NaN: cannot tell
        "drift_per_completion": pl.Float64,  # drift per completion of the label
        "conversion": pl.String,  # the formula and numbers used, or why none could be
        "sigma_stream": pl.Float64,  # the recorded stream's own noise (same epochs); NaN: none
        "sigma_ratio": pl.Float64,  # sigma_per_completion / sigma_stream
    }
)


# === One verdict per task (analysis.verdict) =====================================================
EVIDENCE = pl.Struct(
    {
        "source": pl.String,  # data | noise | replay | closed_loop
        "finding": pl.String,
        "supports": pl.Boolean,  # for the proposal (true), against (false), cannot tell (null)
        "proposal": pl.String,
        "config": pl.String,  # the configuration carrying the proposal (sweep / closed loop)
        "metric": pl.String,
        "estimate": pl.Float64,  # effect in `unit`
        "low": pl.Float64,  # its 95% interval (`method`, `n`)
        "high": pl.Float64,
        "method": pl.String,
        "n": pl.Int64,
        "unit": pl.String,
        "sd": pl.Float64,  # sd of the paired differences (seeds an experiment needs)
        "better": pl.Int64,  # +1: positive estimate good for the proposal; -1: negative; 0
        "direction": pl.Int64,  # proposed ema_timescale vs the runs': +1 faster, -1 slower
        "engine": pl.String,  # closed loop: "simulator" | "mettagrid"; else "simulator"
    }
)
VERDICTS = pl.Schema(
    {
        "task": pl.String,
        "action": pl.String,  # keep_default | change
        "proposal": pl.String,  # what to change to, or the open question; null: none
        "confidence": pl.String,  # high | moderate | low | none
        "conflict": pl.Boolean,  # the sources disagree
        "rule": pl.String,  # the rule of analysis/verdict.py that decided
        "settle_arms": pl.List(pl.String),  # the experiment that would settle it
        "settle_seeds_per_arm": pl.Int64,  # for 80% power at the observed effect; null: unknown
        "settle_reason": pl.String,
        "evidence": pl.List(EVIDENCE),
    }
)


# === Experiments: arms of one task compared with its baseline (analysis.experiments) ==============
# An arm = the runs of one task whose configs agree on everything but the seed and run
# bookkeeping (discovery.py). Values are per run (one seed) and then compared across seeds.

# --- experiments.run_metrics: one row per (run, granularity, metric) -------------------------------
EXPERIMENT_RUN_METRICS = pl.Schema(
    {
        "task": pl.String,
        "arm": pl.String,  # readable arm name ("baseline" or "z_score_amplification=30")
        "seed": pl.Int64,
        "run_id": pl.String,
        "granularity": pl.String,  # epoch | completion: never pooled
        "metric": pl.String,  # final_reward, time_to_threshold, noise_diff, ...
        "unit": pl.String,  # e.g. "reward", "agent steps", "reward per 1M agent steps"
        "value": pl.Float64,  # the run's value (mean over its labels unless the metric says)
        "n_labels": pl.Int64,  # labels that gave a finite value
        "note": pl.String,  # e.g. "2 of 6 labels never reached the threshold (censored)"
    }
)

# --- experiments.label_final_rewards: one row per (run, granularity, label) -----------------------
# Input of compare_arms' probability_of_improvement (rliable: per label, over run pairs).
EXPERIMENT_LABEL_FINALS = pl.Schema(
    {
        "task": pl.String,
        "arm": pl.String,
        "seed": pl.Int64,
        "run_id": pl.String,
        "granularity": pl.String,
        "label": pl.String,
        "final_reward": pl.Float64,  # mean reward over the last final_fraction of agent steps
    }
)

# --- experiments.compare_arms: one row per (task, non-baseline arm, granularity, metric) ---------
EXPERIMENT_COMPARISON = pl.Schema(
    {
        "task": pl.String,
        "arm": pl.String,
        "baseline": pl.String,  # the baseline arm's name
        "granularity": pl.String,
        "metric": pl.String,
        "unit": pl.String,
        "scale": pl.String,  # "difference" (arm - baseline) | "ratio" (arm / baseline)
        "arm_value": pl.Float64,  # mean over the arm's seeds (geometric for ratio metrics)
        "baseline_value": pl.Float64,
        "difference": pl.Float64,  # arm - baseline, or arm / baseline when scale == "ratio"
        "ci_low": pl.Float64,  # null when no valid interval exists (say why in note)
        "ci_high": pl.Float64,
        "n_seeds_arm": pl.Int64,
        "n_seeds_baseline": pl.Int64,
        "paired": pl.Boolean,  # paired by seed (the arms share seeds) or Welch
        "method": pl.String,  # e.g. "paired t, 95%, n=3 pairs"
        "seeds_for_80pct_power": pl.Int64,  # seeds per arm to detect this difference; null: n/a
        "note": pl.String,
    }
)

# --- experiments.arm_curves: reward over training per arm, band over seeds ------------------------
EXPERIMENT_CURVES = pl.Schema(
    {
        "task": pl.String,
        "arm": pl.String,
        "granularity": pl.String,
        "bin": pl.Int64,  # 0 .. n_bins-1 over the task's common agent-step range
        "agent_step": pl.Float64,  # bin centre
        "mean_reward": pl.Float64,  # mean over seeds of the run's mean over labels in the bin
        "ci_low": pl.Float64,  # t interval over seeds; null with one seed
        "ci_high": pl.Float64,
        "n_seeds": pl.Int64,
        "method": pl.String,
    }
)

# --- experiments.difference_over_training: arm - baseline per bin -------------------------------
EXPERIMENT_DIFFERENCE = pl.Schema(
    {
        "task": pl.String,
        "arm": pl.String,
        "baseline": pl.String,
        "granularity": pl.String,
        "bin": pl.Int64,
        "agent_step": pl.Float64,
        "difference": pl.Float64,  # reward units
        "ci_low": pl.Float64,
        "ci_high": pl.Float64,
        "n": pl.Int64,  # pairs (paired) or the smaller arm's seeds (Welch)
        "paired": pl.Boolean,
        "method": pl.String,
    }
)

# --- experiment_plan: one row per planned run ------------------------------------------------------
EXPERIMENT_PLAN = pl.Schema(
    {
        "task": pl.String,
        "recipe": pl.String,  # the recipe the launch command trains; null: unknown
        "arm": pl.String,  # "baseline" or the proposed settings, e.g. "ema_timescale=0.003"
        "seed": pl.Int64,
        "run_name": pl.String,  # follows the discovery rules: maps back to task and arm
        "overrides": pl.List(pl.String),  # `<dotted key>=<value>` config overrides
        "command": pl.String,  # the launch command (template in the plan's config)
        "reason": pl.String,  # the verdict that asked for it
        "exists": pl.Boolean,  # a discovered run has this name
        "found_arm": pl.String,  # the arm discovery gave that run (null: not found)
    }
)


# === Does the reward rise? (analysis.learning) =====================================================
LEARNING_SLOPES = pl.Schema(
    {
        **_KEY_TYPES,
        "n_bins": pl.Int64,  # agent-step bins of the run with data for the label
        "slope": pl.Float64,  # reward per 1M agent steps, OLS over the bin means
        "ci_low": pl.Float64,  # t interval, df = n_bins - 2; null below 3 bins
        "ci_high": pl.Float64,
        "method": pl.String,
    }
)

LEARNING_SUMMARY = pl.Schema(
    {
        "task": pl.String,
        "label": pl.String,
        "granularity": pl.String,
        "n_runs": pl.Int64,
        "slope": pl.Float64,  # mean over seeds of the runs' slopes, reward per 1M agent steps
        "ci_low": pl.Float64,  # t interval over seeds; null with one seed
        "ci_high": pl.Float64,
        "n_rising": pl.Int64,  # runs whose own interval is above 0
        "n_falling": pl.Int64,  # runs whose own interval is below 0
        "method": pl.String,
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
