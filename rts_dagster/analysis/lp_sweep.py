"""The LP experiments matrix: replay a run under many configurations, summarise across
seeds, recommend a configuration per task, and compare closed-loop outcomes.

Pure functions on polars/numpy (no Dagster, no I/O). The default sweep covers the study
plan's knobs: `ema_timescale` on a log grid around Metta's 0.001 and the navigation
recipe's 0.006 (and, per run, the gain the analysis core's local-level fit recommends), `slow_timescale_factor` (dual timescales: how far apart F and S are), the
z-score variant with Z in {10, 20, 30} and Z annealed 30 -> 10, an active-pool cap, and
SPS-aware down-weighting.

Recommendation rule (per task, over the configurations replayed on every seed):
1. the objective is the LP signal-to-noise ratio (`lp_signal`): how much more sampling
   probability an improving label gets than a plateaued one; compared on the log scale,
   paired by seed against Metta's default;
2. a configuration is eligible if its median response lag and its plateau churn are at
   most `tolerance` (1.5) times the default's (when both are defined), and its starved
   fraction at most `starved_margin` (0.05) above the default's: a better SNR bought with
   a slower or jumpier signal is not an improvement, and replay cannot show what happens
   to labels a configuration stops sampling (in training they would stop producing the
   data their LP needs to recover);
3. the eligible configuration with the highest mean log SNR is recommended, with the 95%
   t interval of its paired log ratio; `confident` when that interval excludes 0.
Picking the best of many on the same seeds flatters it (winner's curse): the closed-loop
check on fresh seeds is the honest test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from rts_dagster.analysis import kalman
from rts_dagster.analysis.lp import LPConfig, ZScoreLPConfig
from rts_dagster.analysis.lp_replay import (
    DEFAULT_EVAL_POINTS,
    CurriculumConfig,
    LabelGroups,
    evaluation_points,
    replay,
)
from rts_dagster.analysis.lp_signal import TrendSettings, label_trends, signal_quality
from rts_dagster.schema import (
    GRANULARITY_COMPLETION,
    GRANULARITY_EPOCH,
    LP_CLOSED_LOOP_SUMMARY,
    LP_RECOMMENDATIONS,
    LP_REPLAY_METRICS,
    LP_REPLAY_TRACE,
    LP_SWEEP_SUMMARY,
    conform,
    empty,
)

METTA_DEFAULT = "metta_default"
EMA_GRID = (0.0003, 0.001, 0.003, 0.006, 0.01, 0.03, 0.1)  # log grid around 0.001, 0.006
SUMMARY_METRICS = (
    "lp_snr",
    "lag_median",
    "churn_plateau",
    "gini_mean",
    "entropy_mean",
    "improving_mass",
    "starved_fraction",
    "pole_fraction",
)
CLOSED_LOOP_METRICS = ("time_to_competence", "final_reward", "competence_final")


KALMAN_MATCHED = "kalman_matched"


def default_sweep(n_labels: int, matched_gain: float | None = None) -> list[CurriculumConfig]:
    """The default experiments matrix for a task with `n_labels` labels. With
    `matched_gain` (see `matched_gain`), also Metta main LP with ema_timescale set to
    the steady-state Kalman gain of the run's own rewards (`kalman_matched`)."""
    configs = [
        CurriculumConfig(name=METTA_DEFAULT, description="Metta main defaults"),
    ]
    if matched_gain is not None and math.isfinite(matched_gain) and 0 < matched_gain <= 1:
        configs.append(
            CurriculumConfig(
                name=KALMAN_MATCHED,
                main=LPConfig(ema_timescale=matched_gain),
                description=f"ema_timescale {matched_gain:.3g}: the local-level (Kalman) "
                "gain of this run's rewards",
            )
        )
    for ema in EMA_GRID:
        if ema != LPConfig().ema_timescale:
            configs.append(
                CurriculumConfig(
                    name=f"main_ema_{ema:g}",
                    main=LPConfig(ema_timescale=ema),
                    description=f"Metta main LP, ema_timescale {ema:g}",
                )
            )
    for factor in (0.05, 0.5):  # dual timescales: S much slower, or close to F
        configs.append(
            CurriculumConfig(
                name=f"main_ema_0.006_slow_{factor:g}",
                main=LPConfig(ema_timescale=0.006, slow_timescale_factor=factor),
                description=f"ema_timescale 0.006, slow_timescale_factor {factor:g}",
            )
        )
    for z in (10.0, 20.0, 30.0):
        configs.append(
            CurriculumConfig(
                name=f"zscore_z{z:g}",
                variant="zscore",
                zscore=ZScoreLPConfig(z_score_amplification=z),
                description=f"z-score variant, Z = {z:g}",
            )
        )
    configs.append(
        CurriculumConfig(
            name="zscore_z30_to_10",
            variant="zscore",
            z_anneal=(30.0, 10.0),
            description="z-score variant, Z annealed 30 -> 10 over the run",
        )
    )
    if n_labels >= 4:
        cap = max(2, math.ceil(n_labels / 3))
        configs.append(
            CurriculumConfig(
                name=f"metta_default_cap_{cap}",
                pool_cap=cap,
                description=f"Metta defaults, only the top {cap} labels sampleable",
            )
        )
    configs.append(
        CurriculumConfig(
            name="metta_default_sps_1",
            sps_weight=1.0,
            description="Metta defaults, weights x (label SPS / mean SPS)",
        )
    )
    return configs


def matched_gain(streams: pl.DataFrame, granularity: str) -> float | None:
    """The steady-state Kalman gain of a local-level model fitted to the run's series of
    `granularity` (q and r averaged over its labels, as `kalman.recommend_timescales`
    pools them): the EMA weight that tracks these rewards best. None if undefined."""
    rows = streams.filter(pl.col("granularity") == granularity)
    if rows.height == 0:
        return None
    per_series = kalman.estimate_local_level(rows)
    q = per_series["q"].to_numpy()
    r = per_series["r"].to_numpy()
    ok = np.isfinite(q) & np.isfinite(r)
    if not ok.any():
        return None
    gain = float(kalman.steady_state_gain(q[ok].mean(), r[ok].mean()))
    return gain if math.isfinite(gain) and gain > 0 else None


@dataclass(frozen=True)
class ReplayStream:
    """One run's completions in order, as LP would have consumed them."""

    labels: tuple[str, ...]
    label_index: np.ndarray  # (n,) int64
    reward: np.ndarray  # (n,) float64
    sps: np.ndarray  # (n,) float64, NaN where unknown
    granularity: str  # "completion", or "epoch" (epoch means as pseudo-completions)
    n_dropped: int  # rows without a finite reward (LP cannot consume them)


def replay_stream(streams: pl.DataFrame) -> ReplayStream:
    """The stream to replay from a `reward_streams` table of one run: the per-completion
    rows when recorded with a finite reward (in agent_step order), else the fresh
    (non-stale) epoch means, one pseudo-completion per label and epoch, in agent_step order.

    Completions sharing an agent_step are taken in label order (reward_streams does not
    keep the recorder's order within a step). Each label's LP state is its own recursion,
    so that only shifts which of the tied completions an evaluation instant sees first."""
    completions = streams.filter(pl.col("granularity") == GRANULARITY_COMPLETION)
    if completions.filter(pl.col("reward").is_finite()).height:
        rows, granularity = completions, GRANULARITY_COMPLETION
    else:
        rows = streams.filter(
            (pl.col("granularity") == GRANULARITY_EPOCH) & ~pl.col("is_stale").fill_null(False)
        )
        granularity = GRANULARITY_EPOCH
    finite = rows.filter(pl.col("reward").is_finite())
    if finite.height == 0:
        raise ValueError(f"no finite {granularity} rewards to replay")
    ordered = finite.sort("agent_step", "label", "sample_index")
    labels = tuple(sorted(ordered["label"].unique().to_list()))
    index = ordered["label"].replace_strict(labels, list(range(len(labels))), return_dtype=pl.Int64)
    return ReplayStream(
        labels=labels,
        label_index=index.to_numpy(),
        reward=ordered["reward"].to_numpy().astype(np.float64),
        sps=ordered["sps"].fill_null(np.nan).to_numpy().astype(np.float64),
        granularity=granularity,
        n_dropped=rows.height - finite.height,
    )


def sweep_run(
    stream: ReplayStream,
    configs: list[CurriculumConfig],
    *,
    task: str,
    seed: int,
    run_id: str,
    trend_settings: TrendSettings | None = None,
    n_eval: int = DEFAULT_EVAL_POINTS,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(LP_REPLAY_METRICS, LP_REPLAY_TRACE) of one run under every configuration."""
    n_labels = len(stream.labels)
    points = evaluation_points(stream.reward.size, n_eval)
    groups = LabelGroups(stream.label_index, n_labels)  # one sort for every replay
    trends = label_trends(
        stream.label_index,
        stream.reward,
        n_labels,
        points,
        trend_settings or TrendSettings(),
        groups=groups,
    )
    metric_rows, traces = [], []
    keys = {"task": task, "seed": seed, "run_id": run_id}
    for config in configs:
        result = replay(
            stream.label_index,
            stream.reward,
            n_labels,
            config,
            eval_index=points,
            sps=stream.sps,
            groups=groups,
        )
        metric_rows.append(
            {
                **keys,
                "granularity": stream.granularity,
                "config": config.name,
                **config.settings(),
                "n_completions": int(stream.reward.size),
                "n_labels": n_labels,
                **signal_quality(result, trends),
            }
        )
        g, n = points.size, n_labels
        traces.append(
            pl.DataFrame(
                {
                    "config": [config.name] * (g * n),
                    "eval_index": np.repeat(points, n),
                    "progress": np.repeat(result.progress, n),
                    "label": np.tile(np.array(stream.labels, dtype=object), g),
                    "count": result.counts.ravel(),
                    "fast": result.fast.ravel(),
                    "slow": result.slow.ravel(),
                    "score": result.score.ravel(),
                    "probability": result.probability.ravel(),
                    "trend": trends.ravel(),
                },
                strict=False,
            )
        )
    metrics = conform(
        pl.DataFrame(metric_rows, infer_schema_length=None), LP_REPLAY_METRICS, "lp_replay metrics"
    )
    trace = pl.concat(traces).with_columns(
        pl.lit(task).alias("task"), pl.lit(seed).alias("seed"), pl.lit(run_id).alias("run_id")
    )
    return metrics, conform(trace, LP_REPLAY_TRACE, "lp_replay trace")


# --- across seeds --------------------------------------------------------------------------------
def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the t interval of the mean; NaN bounds for fewer than 2 values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1))
    half /= math.sqrt(values.size)
    return mean, mean - half, mean + half


_SETTING_COLUMNS = [c for c in LP_REPLAY_METRICS.names() if c in LP_SWEEP_SUMMARY.names()]


def summarise_sweep(metrics: pl.DataFrame) -> pl.DataFrame:
    """LP_SWEEP_SUMMARY: per task, configuration and metric, the across-seed mean and
    CI, and the paired difference against Metta's default (log ratio for lp_snr)."""
    if metrics.height == 0:
        return empty(LP_SWEEP_SUMMARY)
    rows = []
    for (task,), per_task in metrics.group_by(["task"], maintain_order=True):
        default = per_task.filter(pl.col("config") == METTA_DEFAULT)
        for _, per_config in per_task.group_by(["config"], maintain_order=True):
            settings = per_config.select(_SETTING_COLUMNS).row(0, named=True)
            paired = per_config.join(default, on=["seed", "run_id"], suffix="_default", how="left")
            for metric in SUMMARY_METRICS:
                values = per_config[metric].to_numpy()
                if metric == "lp_snr":  # a ratio: geometric mean, differences of logs
                    mean, low, high = (_exp(v) for v in t_interval(_log(values)))
                    diffs = _log(paired[metric].to_numpy()) - _log(
                        paired[f"{metric}_default"].to_numpy()
                    )
                else:
                    mean, low, high = t_interval(values)
                    with np.errstate(invalid="ignore"):  # inf - inf (censored lags): NaN
                        diffs = paired[metric].to_numpy() - paired[f"{metric}_default"].to_numpy()
                diff, diff_low, diff_high = t_interval(diffs)
                rows.append(
                    {
                        **settings,
                        "task": task,
                        "metric": metric,
                        "n_seeds": int(np.isfinite(values).sum()),
                        "mean": mean,
                        "ci_low": low,
                        "ci_high": high,
                        "diff_vs_default": diff,
                        "diff_ci_low": diff_low,
                        "diff_ci_high": diff_high,
                    }
                )
    return conform(
        pl.DataFrame(rows, infer_schema_length=None), LP_SWEEP_SUMMARY, "lp sweep summary"
    )


def recommend(
    metrics: pl.DataFrame, tolerance: float = 1.5, starved_margin: float = 0.05
) -> pl.DataFrame:
    """LP_RECOMMENDATIONS: one configuration per task (see the module docstring)."""
    rows = []
    for (task,), per_task in metrics.sort("task").group_by(["task"], maintain_order=True):
        default = per_task.filter(pl.col("config") == METTA_DEFAULT)
        if default.height == 0:
            continue
        base = _config_stats(default, default)
        best_name, best = METTA_DEFAULT, base
        top_name: str | None = None
        top_ratio = 0.0
        # A run without a finite SNR (no instant with both improving and plateaued
        # labels: a short run, one label) drops out of the pairs; at least 2 runs must stay.
        needed = min(2, default.height)
        for (config,), per_config in per_task.group_by(["config"], maintain_order=True):
            if config == METTA_DEFAULT:
                continue
            cand = _config_stats(per_config, default)
            if not math.isfinite(cand["log_ratio"]) or cand["n"] < needed:
                continue
            if cand["log_ratio"] > top_ratio:
                top_name, top_ratio = config, cand["log_ratio"]
            eligible = (
                _within(cand["lag"], base["lag"], tolerance)
                and _within(cand["churn"], base["churn"], tolerance)
                and cand["starved"] <= base["starved"] + starved_margin
            )
            if eligible and cand["log_ratio"] > max(best["log_ratio"], 0.0):
                best_name, best = config, cand
        chosen = per_task.filter(pl.col("config") == best_name)
        settings = chosen.select(_SETTING_COLUMNS).row(0, named=True)
        # kalman_matched has its own ema_timescale per run: report their geometric mean
        settings["ema_timescale"] = float(np.exp(np.log(chosen["ema_timescale"]).mean()))
        is_default = best_name == METTA_DEFAULT
        row = {
            **settings,
            "task": task,
            "granularity": chosen["granularity"][0],
            "n_seeds": int(chosen["seed"].n_unique()),
            "n_runs": int(chosen.height),
            "n_pairs": int(best["n"]),
            "snr_default": base["snr"],
            "snr_recommended": best["snr"],
            "snr_ratio": 1.0 if is_default else math.exp(best["log_ratio"]),
            "snr_ratio_ci_low": math.nan if is_default else _exp(best["low"]),
            "snr_ratio_ci_high": math.nan if is_default else _exp(best["high"]),
            "lag_default": base["lag"],
            "lag_recommended": best["lag"],
            "churn_default": base["churn"],
            "churn_recommended": best["churn"],
            "starved_default": base["starved"],
            "starved_recommended": best["starved"],
            "replay_best": top_name,
            "confident": (not is_default) and best["low"] > 0,
        }
        row["sentence"] = _sentence(row, best_name)
        rows.append(row)
    if not rows:
        return empty(LP_RECOMMENDATIONS)
    return conform(
        pl.DataFrame(rows, infer_schema_length=None), LP_RECOMMENDATIONS, "lp recommendations"
    )


def _exp(value: float) -> float:
    return math.exp(value) if math.isfinite(value) else math.nan


def _log(values: np.ndarray) -> np.ndarray:
    """Natural log with NaN (not a warning) for non-positive or missing values."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log(values), np.nan)


def _config_stats(per_config: pl.DataFrame, default: pl.DataFrame) -> dict[str, float]:
    # Pairs are runs (two runs of one seed are two pairs, not four)
    paired = per_config.join(default, on=["seed", "run_id"], suffix="_default", how="inner")
    logs = _log(paired["lp_snr"].to_numpy()) - _log(paired["lp_snr_default"].to_numpy())
    mean, low, high = t_interval(logs)  # NaN mean when no pair is finite
    return {
        "n": int(np.isfinite(logs).sum()),
        "log_ratio": mean,
        "low": low,
        "high": high,
        "snr": _exp(t_interval(_log(per_config["lp_snr"].to_numpy()))[0]),
        "lag": _median_with_inf(per_config["lag_median"].to_numpy()),
        "churn": _nanmean(per_config["churn_plateau"].to_numpy()),
        "starved": _nanmean(per_config["starved_fraction"].to_numpy()),
    }


def _within(value: float, reference: float, tolerance: float) -> bool:
    """value <= tolerance * reference; undefined values (NaN) do not disqualify, and an
    infinite lag is only acceptable against an infinite reference."""
    if math.isnan(value) or math.isnan(reference) or reference == math.inf:
        return True
    return value <= tolerance * reference + 1e-12


def _median_with_inf(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else math.nan


def _nanmean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def _sentence(row: dict, name: str) -> str:
    task, n = row["task"], row["n_seeds"]
    source = (
        "per-completion rewards"
        if row["granularity"] == GRANULARITY_COMPLETION
        else ("epoch means (no per-completion stream recorded)")
    )
    if name == METTA_DEFAULT:
        return (
            f"{task}: keep Metta's default LP: no other configuration raised the LP "
            f"signal-to-noise ratio without a slower or jumpier signal or starving labels "
            f"(replayed on {n} seeds, {source})"
            + (
                f"; the highest replayed ratio came from {row['replay_best']}, which failed "
                "those checks."
                if row["replay_best"]
                else "; no other configuration replayed a higher ratio."
            )
        )
    if row["confident"]:
        verdict, lead = "a clear improvement", f"{task}: use {name}"
    else:
        verdict = f"not distinguishable from the default with {n} seeds"
        lead = (
            f"{task}: {name} replays best but is not yet a safe change (keep Metta's default "
            "until more seeds confirm it)"
        )
    return (
        f"{lead}: LP gives improving labels x{row['snr_ratio']:.2f} the "
        f"relative probability Metta's default gives them (95% CI x{row['snr_ratio_ci_low']:.2f}"
        f" to x{row['snr_ratio_ci_high']:.2f} over {n} seeds: {verdict}); median response lag "
        f"{_num(row['lag_recommended'])} vs {_num(row['lag_default'])} (completions until "
        f"LP ranks a newly improving label in its top quarter); plateau "
        f"churn {_num(row['churn_recommended'], 3)} vs {_num(row['churn_default'], 3)} "
        f"(replayed on {source})."
    )


def _num(value: float, digits: int = 0) -> str:
    if value == math.inf:
        return "never"
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


# --- closed loop ---------------------------------------------------------------------------------
def closed_loop_candidates(
    recommendations: pl.DataFrame, metrics: pl.DataFrame | None = None
) -> dict[str, list[tuple[str, str]]]:
    """Task -> [(configuration, role)] to compare with Metta's default in the closed loop:
    the recommendation, the highest replayed SNR (the configuration an open-loop reading
    alone would pick) and, when it was replayed (`metrics`), `kalman_matched` (LP at the
    local-level gain the noise analysis recommends); each once, default excluded."""
    matched_tasks = set()
    if metrics is not None and metrics.height:
        # only a gain measured per completion means the same thing in the simulator
        matched = metrics.filter(
            (pl.col("config") == KALMAN_MATCHED) & (pl.col("granularity") == GRANULARITY_COMPLETION)
        )
        matched_tasks = set(matched["task"].to_list())
    out: dict[str, list[tuple[str, str]]] = {}
    for row in recommendations.iter_rows(named=True):
        pairs: list[tuple[str, str]] = []
        wanted = [(row["config"], "recommended"), (row["replay_best"], "replay_best")]
        if row["task"] in matched_tasks:
            wanted.append((KALMAN_MATCHED, "local_level_gain"))
        for name, role in wanted:
            if name and name != METTA_DEFAULT and name not in (n for n, _ in pairs):
                pairs.append((name, role))
        if pairs:
            out[row["task"]] = pairs
    return out


def summarise_closed_loop(
    outcomes: pl.DataFrame, candidates: dict[str, list[tuple[str, str]]]
) -> pl.DataFrame:
    """LP_CLOSED_LOOP_SUMMARY: per task and candidate, candidate - default on paired seeds
    with 95% t intervals. `outcomes` has LP_CLOSED_LOOP rows."""
    rows = []
    for task, pairs in candidates.items():
        per_task = outcomes.filter(pl.col("task") == task)
        default = per_task.filter(pl.col("config") == METTA_DEFAULT)
        for name, role in pairs:
            chosen = per_task.filter(pl.col("config") == name)
            paired = chosen.join(default, on="seed", suffix="_default", how="inner")
            if paired.height == 0:
                continue
            reached = paired["reached_competence"].to_numpy()
            reached_default = paired["reached_competence_default"].to_numpy()
            for metric in CLOSED_LOOP_METRICS:
                ours = paired[metric].to_numpy()
                theirs = paired[f"{metric}_default"].to_numpy()
                diff, low, high = t_interval(ours - theirs)
                censored = 0
                if metric == "time_to_competence":
                    censored = int((~reached).sum() + (~reached_default).sum())
                rows.append(
                    {
                        "task": task,
                        "config": name,
                        "role": role,
                        "metric": metric,
                        "n_seeds": paired.height,
                        "default_mean": float(np.mean(theirs)),
                        "recommended_mean": float(np.mean(ours)),
                        "diff": diff,
                        "diff_ci_low": low,
                        "diff_ci_high": high,
                        "n_censored": censored,
                    }
                )
    if not rows:
        return empty(LP_CLOSED_LOOP_SUMMARY)
    return conform(
        pl.DataFrame(rows, infer_schema_length=None), LP_CLOSED_LOOP_SUMMARY, "closed loop summary"
    )
