"""The LP experiments matrix: replay a run under many configurations, summarise across
seeds, recommend a configuration per task, and compare closed-loop outcomes.

Pure functions on polars/numpy (no Dagster, no I/O). The default sweep covers the study
plan's knobs: `ema_timescale` on a log grid around Metta's 0.001 and the navigation
recipe's 0.006 (and, per run, the gain the analysis core's local-level fit recommends), `slow_timescale_factor` (dual timescales: how far apart F and S are), the
z-score variant with Z in {10, 20, 30} and Z annealed 30 -> 10, an active-pool cap, and
SPS-aware down-weighting.

Recommendation rule, per (task, granularity): a completion replay and an epoch replay
are never pooled, and each row lists the runs that fed it.
1. The objective is the LP signal-to-noise ratio (`lp_signal.lp_snr`): how much more
   sampling probability an improving label gets than a plateaued one. Configurations are
   compared on the log scale, paired by run against Metta's default (a run whose SNR is
   undefined under either drops out; n is the pairs actually used).
2. A configuration can be the recommendation only if it passes every check:
   - signal: its own SNR carries signal, i.e. the lower bound of its 95% t interval on
     logs over runs is above 1 (an SNR of exactly 1 in every run, a distribution that
     ignores trends, never passes however it compares with the default);
   - beats the default: the lower bound of its paired log ratio's interval is above 0,
     the interval being adjusted for selecting among the K configurations compared
     (`intervals.selection_adjusted_t_interval`, Bonferroni: all K intervals hold together
     with probability >= 95%, so the winner's does, whichever it is);
   - guards, relative with absolute floors: median response lag <= `tolerance` (1.5) x
     the default's + one evaluation spacing (n_completions / DEFAULT_EVAL_POINTS: lags
     are measured between evaluation instants and cannot resolve less; an infinite lag is
     acceptable only against an infinite default); plateau churn <= `tolerance` x the
     default's + `churn_floor` (0.05 of the ranking per 1000 completions: less than one
     position per 2000 completions in a 10-label task, noise that cannot change what LP
     draws; without a floor a zero-churn default would veto every configuration);
     starved fraction <= the default's + `starved_margin` (0.05). A better SNR bought with
     a slower or jumpier signal is not an improvement, and replay cannot show what happens
     to labels a configuration stops sampling.
3. Among the configurations passing every check, the highest mean log ratio is the
   row's `config` (`confident`); if none passes, `config` is Metta's default. The highest
   replayed ratio (`replay_best`, eligible or not) is kept with the reason it failed.
4. Epoch rows (epoch means replayed as pseudo-completions) are never `actionable`: EMA
   weights then apply per epoch mean, not per completion, and an epoch mean averages the
   held last values of many environments (DOMAIN.md), so an ema_timescale (or the
   kalman_matched gain) found that way does not transfer to per-completion LP.
The rows describe evidence; the advice per task is the report's verdict. Replay is
open-loop; the closed-loop check on fresh seeds is the independent test.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import polars as pl

from rts_dagster.analysis import intervals, kalman, lp_timescales
from rts_dagster.analysis.distributions import t_ppf
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
SEPARATION_MATCHED = "separation_matched"
# Configurations whose settings are fitted per run (their table settings are geometric means)
PER_RUN_CONFIGS = (KALMAN_MATCHED, SEPARATION_MATCHED)


def default_sweep(
    n_labels: int,
    matched_gain: float | None = None,
    separation: tuple[float, float] | None = None,
) -> list[CurriculumConfig]:
    """The default experiments matrix for a task with `n_labels` labels. With
    `matched_gain` (see `matched_gain`), also Metta main LP with ema_timescale set to
    the steady-state Kalman gain of the run's own rewards (`kalman_matched`); with
    `separation` (see `separation_pair`), Metta main LP at the (ema_timescale,
    slow_timescale_factor) pair that best separates learning from plateaued labels at the
    run's measured noise, drift and slopes (`separation_matched`, `lp_timescales`)."""
    configs = [
        CurriculumConfig(name=METTA_DEFAULT, description="Metta main defaults"),
    ]
    if separation is not None and all(math.isfinite(v) and v > 0 for v in separation):
        ema, factor = separation
        if ema <= 1.0:
            configs.append(
                CurriculumConfig(
                    name=SEPARATION_MATCHED,
                    main=LPConfig(ema_timescale=ema, slow_timescale_factor=factor),
                    description=f"ema_timescale {ema:.3g}, slow_timescale_factor {factor:.3g}: "
                    "the pair that best separates learning from plateaued labels",
                )
            )
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
    per_series = kalman.estimate_local_level(rows, regimes=False)
    if "regime" in per_series.columns:  # the whole series, not its learning/plateau parts
        per_series = per_series.filter(pl.col("regime") == kalman.REGIME_WHOLE)
    q = per_series["q"].to_numpy()
    r = per_series["r"].to_numpy()
    ok = np.isfinite(q) & np.isfinite(r)
    if not ok.any():
        return None
    gain = float(kalman.steady_state_gain(q[ok].mean(), r[ok].mean()))
    return gain if math.isfinite(gain) and gain > 0 else None


def separation_pair(streams: pl.DataFrame, granularity: str) -> tuple[float, float] | None:
    """The run's separation-optimal (ema_timescale, slow_timescale_factor) from its
    per-completion series (`lp_timescales.lp_separation_table`, all labels pooled). None for
    epoch data: an EMA weight per epoch mean is not LP's per-completion weight."""
    if granularity != GRANULARITY_COMPLETION:
        return None
    rows = streams.filter(pl.col("granularity") == GRANULARITY_COMPLETION)
    if rows.height == 0:
        return None
    table = lp_timescales.lp_separation_table(kalman.estimate_local_level(rows))
    pooled = table.filter((pl.col("label") == "*") & (pl.col("scope") == "pooled"))
    if pooled.height == 0:
        return None
    ema, factor = (
        pooled.row(0, named=True)["best_ema_timescale"],
        pooled.row(0, named=True)["best_slow_factor"],
    )
    if ema is None or factor is None or not (math.isfinite(ema) and math.isfinite(factor)):
        return None
    return float(ema), float(factor)


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


# --- across runs ---------------------------------------------------------------------------------
GROUP_KEYS = ["task", "granularity"]  # a completion and an epoch replay are never pooled
CHURN_FLOOR = 0.05  # absolute churn allowance (rank fraction per 1000 completions)
_SETTING_COLUMNS = [c for c in LP_REPLAY_METRICS.names() if c in LP_SWEEP_SUMMARY.names()]
_SETTING_COLUMNS = [c for c in _SETTING_COLUMNS if c not in ("task", "granularity")]


def _groups(metrics: pl.DataFrame):
    """(task, granularity, sorted run ids, rows) per group, in task order."""
    for (task, granularity), group in metrics.sort(GROUP_KEYS).group_by(
        GROUP_KEYS, maintain_order=True
    ):
        yield task, granularity, sorted(group["run_id"].unique().to_list()), group


def _t_columns(prefix: str, level: float = intervals.LEVEL) -> list[pl.Expr]:
    """`<prefix>_low/_high` of the t interval (df = n - 1) from `<prefix>_n/_mean/_sd`:
    `intervals.t_bounds` in columns (NaN bounds below 2 values, NaN mean below 1)."""
    n = pl.col(f"{prefix}_n")
    mean = pl.when(n >= 1).then(pl.col(f"{prefix}_mean")).otherwise(float("nan"))
    df = pl.when(n >= 2).then(n - 1).otherwise(1).cast(pl.Float64)
    quantile = df.map_batches(
        lambda d: pl.Series(t_ppf(0.5 + level / 2.0, d.to_numpy())),
        return_dtype=pl.Float64,
    )
    half = pl.when(n >= 2).then(quantile * pl.col(f"{prefix}_sd") / n.sqrt())
    half = half.otherwise(float("nan"))
    return [
        mean.alias(f"{prefix}_mean"),
        (mean - half).alias(f"{prefix}_low"),
        (mean + half).alias(f"{prefix}_high"),
    ]


def _finite_stats(value: pl.Expr, prefix: str) -> list[pl.Expr]:
    finite = value.filter(value.is_finite())
    return [
        finite.len().cast(pl.Int64).alias(f"{prefix}_n"),
        finite.mean().fill_null(float("nan")).alias(f"{prefix}_mean"),
        finite.std(ddof=1).fill_null(float("nan")).alias(f"{prefix}_sd"),
    ]


def summarise_sweep(metrics: pl.DataFrame) -> pl.DataFrame:
    """LP_SWEEP_SUMMARY: per (task, granularity), configuration and metric, the across-run
    mean with its t interval (t on logs for lp_snr) and the paired difference against
    Metta's default (log ratio for lp_snr), each interval with its method and n.

    One polars pass over every group (hundreds of tasks x 20 configurations x 8 metrics):
    the same numbers as `intervals.t_interval` / `log_t_interval` / `paired_t_interval`
    per group (tested against them)."""
    if metrics.height == 0:
        return empty(LP_SWEEP_SUMMARY)
    keys = [*GROUP_KEYS, "config"]
    run_keys = [*GROUP_KEYS, "seed", "run_id"]
    ordered = metrics.sort(GROUP_KEYS, maintain_order=True)
    config_order = ordered.select(keys).unique(maintain_order=True).with_row_index("_config_order")
    long = ordered.select(
        *keys, "seed", "run_id", *(pl.col(m).cast(pl.Float64) for m in SUMMARY_METRICS)
    ).unpivot(index=[*keys, "seed", "run_id"], variable_name="metric", value_name="value")
    is_log = pl.col("metric") == "lp_snr"
    positive_log = pl.when(pl.col("value") > 0).then(pl.col("value").log())
    level_value = pl.when(is_log).then(positive_log).otherwise(pl.col("value"))
    level = long.group_by([*keys, "metric"], maintain_order=True).agg(
        _finite_stats(level_value, "level")
    )
    default = long.filter(pl.col("config") == METTA_DEFAULT).select(
        *run_keys, "metric", pl.col("value").alias("theirs")
    )
    theirs_log = pl.when(pl.col("theirs") > 0).then(pl.col("theirs").log())
    diff_value = (
        pl.when(is_log)
        .then(positive_log.fill_null(float("nan")) - theirs_log.fill_null(float("nan")))
        .otherwise(pl.col("value") - pl.col("theirs"))
    )
    diff = (
        long.join(default, on=[*run_keys, "metric"], how="left")
        .group_by([*keys, "metric"], maintain_order=True)
        .agg(_finite_stats(diff_value, "diff"))
    )
    per_run = pl.col("config").is_in(PER_RUN_CONFIGS)
    settings = ordered.group_by(keys, maintain_order=True).agg(
        *(
            pl.col(c).first()
            for c in _SETTING_COLUMNS
            if c not in ("config", "ema_timescale", "slow_timescale_factor")
        ),
        *(
            # fitted per run: the geometric mean of the runs' settings
            pl.when(per_run.first())
            .then(pl.col(c).log().mean().exp())
            .otherwise(pl.col(c).first())
            .alias(c)
            for c in ("ema_timescale", "slow_timescale_factor")
        ),
    )
    runs = ordered.group_by(GROUP_KEYS).agg(pl.col("run_id").unique().sort().alias("runs"))
    metric_order = pl.DataFrame(
        {"metric": list(SUMMARY_METRICS), "_metric_order": list(range(len(SUMMARY_METRICS)))}
    )
    out = (
        level.join(diff, on=[*keys, "metric"], how="left")
        .join(settings, on=keys, how="left")
        .join(runs, on=GROUP_KEYS, how="left")
        .join(config_order, on=keys, how="left")
        .join(metric_order, on="metric", how="left")
        .sort("_config_order", "_metric_order")
        .with_columns(*_t_columns("level"), *_t_columns("diff"))
    )
    log_rows = pl.col("metric") == "lp_snr"

    def back(column: str) -> pl.Expr:  # geometric mean and bounds for lp_snr
        return pl.when(log_rows).then(pl.col(column).exp()).otherwise(pl.col(column))

    out = out.with_columns(
        pl.col("level_n").alias("n_seeds"),
        back("level_mean").alias("mean"),
        back("level_low").alias("ci_low"),
        back("level_high").alias("ci_high"),
        pl.when(log_rows).then(pl.lit("t on logs")).otherwise(pl.lit("t")).alias("ci_method"),
        pl.col("diff_n").alias("n_pairs"),
        pl.col("diff_mean").alias("diff_vs_default"),
        pl.col("diff_low").alias("diff_ci_low"),
        pl.col("diff_high").alias("diff_ci_high"),
        pl.when(log_rows)
        .then(pl.lit("paired t on logs"))
        .otherwise(pl.lit("paired t"))
        .alias("diff_ci_method"),
    )
    return conform(out, LP_SWEEP_SUMMARY, "lp sweep summary")


@dataclass(frozen=True)
class Evidence:
    """One configuration of one (task, granularity) against Metta's default."""

    config: str
    ratio: intervals.Interval  # SNR ratio vs default (exp of the adjusted paired log interval)
    signal: intervals.Interval  # its own SNR, t interval on logs over runs
    lag: float
    churn: float
    starved: float
    reasons: tuple[str, ...]  # every check it fails (empty: eligible)

    @property
    def log_ratio(self) -> float:
        return math.log(self.ratio.estimate) if self.ratio.estimate > 0 else math.nan


def config_evidence(
    metrics: pl.DataFrame,
    *,
    tolerance: float = 1.5,
    starved_margin: float = 0.05,
    churn_floor: float = CHURN_FLOOR,
) -> dict[tuple[str, str], dict[str, Evidence]]:
    """(task, granularity) -> configuration -> Evidence, for every group of LP_REPLAY_METRICS
    rows that has a replay of Metta's default (the default included, with no ratio), with
    the checks of the module docstring. K, the number of configurations compared, counts
    those with >= 2 pairs. The statistics of all groups are computed at once (`*_bounds`)."""
    stats_ = _config_stats(metrics)
    if stats_.height == 0:
        return {}
    snr = _padded(stats_["lp_snr"])
    ratio_logs = _log(snr) - _log(_padded(stats_["snr_default"]))
    n_pairs = np.isfinite(ratio_logs).sum(axis=1)
    is_default = (stats_["config"] == METTA_DEFAULT).to_numpy()
    compared = (~is_default) & (n_pairs >= 2)
    n_compared = (
        stats_.select(*GROUP_KEYS)
        .with_columns(pl.Series("compared", compared, dtype=pl.Int64))
        .select(pl.col("compared").sum().over(GROUP_KEYS))
        .to_series()
        .to_numpy()
    )
    ratio = np.full((snr.shape[0], 3), np.nan)  # exp of (mean, low, high) of the log ratio
    for k in np.unique(np.maximum(n_compared, 1)):
        rows = np.maximum(n_compared, 1) == k
        mean, low, high, _ = intervals.t_bounds(
            ratio_logs[rows], intervals.bonferroni_level(intervals.LEVEL, int(k))
        )
        ratio[rows] = np.exp(np.stack([mean, low, high], axis=1))
    geo, sig_low, sig_high, sig_n = intervals.log_t_bounds(snr)
    lags = _padded(stats_["lag_median"])
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN
        lag = np.nanmedian(lags, axis=1)  # inf (never reached) sorts last: kept
    churn = _finite_mean(_padded(stats_["churn_plateau"]))
    starved = _finite_mean(_padded(stats_["starved_fraction"]))

    out: dict[tuple[str, str], dict[str, Evidence]] = {}
    bases: dict[tuple[str, str], Evidence] = {}
    rows = stats_.select(*GROUP_KEYS, "config", "n_completions").rows()
    for i, (task, granularity, name, _) in enumerate(rows):
        signal = intervals.Interval(
            float(geo[i]), float(sig_low[i]), float(sig_high[i]), "t on logs", int(sig_n[i])
        )
        if is_default[i]:
            none = intervals.Interval(1.0, math.nan, math.nan, "", 0)
            bases[(task, granularity)] = Evidence(
                name, none, signal, float(lag[i]), float(churn[i]), float(starved[i]), ()
            )
    for i, (task, granularity, name, n_completions) in enumerate(rows):
        base = bases.get((task, granularity))
        if base is None:
            continue  # no default replayed: nothing to compare with
        group = out.setdefault((task, granularity), {METTA_DEFAULT: base})
        if is_default[i]:
            continue
        k = max(int(n_compared[i]), 1)
        ratio_i = intervals.Interval(
            float(ratio[i, 0]),
            float(ratio[i, 1]),
            float(ratio[i, 2]),
            f"t, Bonferroni over {k}",  # intervals.selection_adjusted_t_interval's name
            int(n_pairs[i]),
        )
        signal = intervals.Interval(
            float(geo[i]), float(sig_low[i]), float(sig_high[i]), "t on logs", int(sig_n[i])
        )
        reasons = _signal_failures(signal, ratio_i)
        # lags are measured between evaluation instants: one spacing is their resolution
        spacing = max(1.0, float(n_completions or 0) / DEFAULT_EVAL_POINTS)
        evidence = Evidence(
            name, ratio_i, signal, float(lag[i]), float(churn[i]), float(starved[i]), ()
        )
        reasons += _guard_failures(evidence, base, tolerance, starved_margin, churn_floor, spacing)
        group[name] = Evidence(
            name, ratio_i, signal, evidence.lag, evidence.churn, evidence.starved, tuple(reasons)
        )
    return out


def _config_stats(metrics: pl.DataFrame) -> pl.DataFrame:
    """Per (task, granularity, config): the runs' lp_snr with the default's of the same
    run alongside (null where the default did not replay that run), lags, churn, starved
    fractions (lists), the settings and the median n_completions."""
    keys = [*GROUP_KEYS, "seed", "run_id"]
    default = metrics.filter(pl.col("config") == METTA_DEFAULT).select(
        *keys, pl.col("lp_snr").alias("snr_default")
    )
    paired = metrics.sort(GROUP_KEYS).join(default, on=keys, how="left", maintain_order="left")
    per_run = ("config", "ema_timescale", "slow_timescale_factor")
    settings = [c for c in _SETTING_COLUMNS if c not in per_run]
    return paired.group_by([*GROUP_KEYS, "config"], maintain_order=True).agg(
        "lp_snr",
        "snr_default",
        "lag_median",
        "churn_plateau",
        "starved_fraction",
        pl.col("n_completions").median(),
        *(pl.col(c).first() for c in settings),
        # kalman_matched / separation_matched have their own settings per run: geometric mean
        pl.col("ema_timescale").log().mean().exp(),
        pl.col("slow_timescale_factor").log().mean().exp(),
    )


def _padded(lists: pl.Series) -> np.ndarray:
    """A list column as a (rows, longest) float matrix, NaN-padded (nulls are NaN)."""
    lengths = lists.list.len().to_numpy().astype(np.int64)
    width = max(int(lengths.max()) if lengths.size else 0, 1)
    out = np.full((lengths.size, width), np.nan)
    flat = lists.explode().cast(pl.Float64).fill_null(np.nan).to_numpy()
    used = np.maximum(lengths, 1)  # an empty list explodes to one null
    rows = np.repeat(np.arange(lengths.size), used)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(used) - used, used)
    out[rows, cols] = flat
    return out


def _finite_mean(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    n = ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, x, 0.0).sum(axis=1) / n, np.nan)


def _signal_failures(signal: intervals.Interval, ratio: intervals.Interval) -> list[str]:
    if ratio.n < 2:
        return [
            f"only {ratio.n} run(s) with a finite SNR under both it and the default "
            "(an interval needs 2)"
        ]
    failed = []
    if not (signal.defined and signal.low > 1.0):
        failed.append(
            f"no signal of its own: its SNR {_interval_text(signal)} does not lie above 1"
        )
    if not ratio.low > 1.0:
        failed.append(
            f"not above the default: SNR ratio {_interval_text(ratio, 'x')} "
            + ("lies below 1" if ratio.high < 1.0 else "includes 1")
        )
    return failed


def _guard_failures(
    candidate: Evidence,
    base: Evidence,
    tolerance: float,
    starved_margin: float,
    churn_floor: float,
    lag_floor: float,
) -> list[str]:
    lag, churn, starved = candidate.lag, candidate.churn, candidate.starved
    failed = []
    if not _within(lag, base.lag, tolerance, lag_floor):
        failed.append(
            f"median response lag {_num(lag)} > {tolerance:g} x the default's "
            f"{_num(base.lag)} + {lag_floor:.3g} completions"
        )
    if not _within(churn, base.churn, tolerance, churn_floor):
        failed.append(
            f"plateau churn {_num(churn, 3)} > {tolerance:g} x the default's "
            f"{_num(base.churn, 3)} + {churn_floor:g}"
        )
    known = math.isfinite(starved) and math.isfinite(base.starved)
    if known and starved > base.starved + starved_margin + 1e-12:
        failed.append(
            f"starved fraction {starved:.3f} > the default's {base.starved:.3f} + "
            f"{starved_margin:g}"
        )
    return failed


def recommend(
    metrics: pl.DataFrame,
    tolerance: float = 1.5,
    starved_margin: float = 0.05,
    churn_floor: float = CHURN_FLOOR,
) -> pl.DataFrame:
    """LP_RECOMMENDATIONS: one row of replay evidence per (task, granularity) (the rule in
    the module docstring); groups without a replay of Metta's default are left out."""
    rows = []
    evidence_by_group = config_evidence(
        metrics, tolerance=tolerance, starved_margin=starved_margin, churn_floor=churn_floor
    )
    if not evidence_by_group:
        return empty(LP_RECOMMENDATIONS)
    settings_of = {
        (r["task"], r["granularity"], r["config"]): r
        for r in _config_stats(metrics).select(*GROUP_KEYS, *_SETTING_COLUMNS).iter_rows(named=True)
    }
    groups = (
        metrics.group_by(GROUP_KEYS)
        .agg(pl.col("run_id").unique().sort().alias("runs"), pl.col("seed").n_unique())
        .sort(GROUP_KEYS)
    )
    for task, granularity, runs, n_seeds in groups.iter_rows():
        evidence = evidence_by_group.get((task, granularity))
        if evidence is None:
            continue
        base = evidence[METTA_DEFAULT]
        candidates = sorted(
            (e for e in evidence.values() if e.config != METTA_DEFAULT and e.ratio.n >= 1),
            key=lambda e: (-_finite_or(e.log_ratio, -math.inf), e.config),
        )
        eligible = [e for e in candidates if not e.reasons]
        chosen = eligible[0] if eligible else base
        threshold = chosen.log_ratio if eligible else 0.0
        best = next((e for e in candidates if _finite_or(e.log_ratio, -1.0) > 0.0), None)
        rejected = [e for e in candidates if e.reasons and _finite_or(e.log_ratio, -1) > threshold]
        settings = {c: settings_of[(task, granularity, chosen.config)][c] for c in _SETTING_COLUMNS}
        confident = bool(eligible)
        n_compared = sum(e.ratio.n >= 2 for e in candidates)
        row = {
            **settings,
            "task": task,
            "granularity": granularity,
            "runs": runs,
            "n_seeds": n_seeds,
            "n_runs": len(runs),
            "n_compared": n_compared,
            "n_pairs": chosen.ratio.n,
            "snr_default": base.signal.estimate,
            "snr_recommended": chosen.signal.estimate,
            "signal_ci_low": chosen.signal.low,
            "signal_ci_high": chosen.signal.high,
            "signal_ci_method": chosen.signal.method,
            "signal_n": chosen.signal.n,
            "snr_ratio": chosen.ratio.estimate,
            "snr_ratio_ci_low": chosen.ratio.low,
            "snr_ratio_ci_high": chosen.ratio.high,
            "ci_method": chosen.ratio.method if confident else None,
            "lag_default": base.lag,
            "lag_recommended": chosen.lag,
            "churn_default": base.churn,
            "churn_recommended": chosen.churn,
            "starved_default": base.starved,
            "starved_recommended": chosen.starved,
            "guards_passed": not chosen.reasons,
            "replay_best": best.config if best else None,
            "replay_best_snr_ratio": best.ratio.estimate if best else math.nan,
            "replay_best_ci_low": best.ratio.low if best else math.nan,
            "replay_best_ci_high": best.ratio.high if best else math.nan,
            "replay_best_ci_method": best.ratio.method if best else None,
            "replay_best_n_pairs": best.ratio.n if best else None,
            "replay_best_reason": "; ".join(best.reasons) if best and best.reasons else None,
            "rejected": [f"{e.config}: {'; '.join(e.reasons)}" for e in rejected],
            "confident": confident,
            "actionable": confident and granularity == GRANULARITY_COMPLETION,
        }
        row["sentence"] = _sentence(row, chosen, best, base)
        rows.append(row)
    if not rows:
        return empty(LP_RECOMMENDATIONS)
    return conform(
        pl.DataFrame(rows, infer_schema_length=None), LP_RECOMMENDATIONS, "lp recommendations"
    )


def _finite_or(value: float, fallback: float) -> float:
    return value if math.isfinite(value) else fallback


def _log(values: np.ndarray) -> np.ndarray:
    """Natural log with NaN (not a warning) for non-positive or missing values."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log(values), np.nan)


def _within(value: float, reference: float, tolerance: float, floor: float) -> bool:
    """value <= tolerance * reference + floor; undefined values (NaN) do not disqualify,
    and an infinite value is only acceptable against an infinite reference."""
    if math.isnan(value) or math.isnan(reference) or reference == math.inf:
        return True
    return value <= tolerance * reference + floor + 1e-12


def _interval_text(interval: intervals.Interval, prefix: str = "") -> str:
    """ "x2.00 (x1.30 to x3.10, 95% t, Bonferroni over 15 interval, n=3)"."""
    estimate = f"{prefix}{_num(interval.estimate, 2)}"
    if not interval.defined:
        return f"{estimate} (no interval, n={interval.n})"
    return (
        f"{estimate} ({prefix}{_num(interval.low, 2)} to {prefix}{_num(interval.high, 2)}, "
        f"{interval.describe()})"
    )


_EPOCH_NOTE = (
    " Replayed on epoch means (one pseudo-completion per label and epoch; no per-completion "
    "stream was recorded): EMA weights then apply per epoch mean, not per completion, and an "
    "epoch mean averages the held last rewards of many environments, so ema_timescale "
    "values (kalman_matched's gain included) replayed on epoch means do not transfer to "
    "per-completion LP; recording the stream with RewardStreamRecorder (rts_dagster.recorder) "
    "would measure them."
)


def _sentence(row: dict, chosen: Evidence, best: Evidence | None, base: Evidence) -> str:
    """Plain words: what the replay shows, each interval with its method and n."""
    source = (
        "per-completion replay"
        if row["granularity"] == GRANULARITY_COMPLETION
        else "replay of epoch means"
    )
    head = f"{row['task']} ({source} of {row['n_runs']} run(s): {', '.join(row['runs'])})"
    k = row["n_compared"]
    if row["confident"]:
        text = (
            f"{head}: {chosen.config} passes every check among {k} configurations compared: "
            f"LP SNR ratio to Metta's default {_interval_text(chosen.ratio, 'x')}; its own SNR "
            f"{_interval_text(chosen.signal)}; median response lag {_num(chosen.lag)} vs "
            f"{_num(base.lag)} completions; plateau churn {_num(chosen.churn, 3)} vs "
            f"{_num(base.churn, 3)}; starved fraction {_num(chosen.starved, 3)} vs "
            f"{_num(base.starved, 3)}."
        )
    else:
        checks = (
            f"own SNR above 1, a ratio to Metta's default above 1 after adjusting for the {k} "
            "configurations compared, lag, churn and starvation guards"
            if k
            else "no configuration has 2 runs paired with the default to form an interval"
        )
        text = (
            f"{head}: no configuration passes every check ({checks}); Metta's default's own "
            f"SNR {_interval_text(base.signal)}."
        )
    if best is not None and best.config != chosen.config:
        text += (
            f" Highest replayed ratio: {best.config}, {_interval_text(best.ratio, 'x')}; "
            f"not passing: {'; '.join(best.reasons)}."
        )
    elif best is None and not row["confident"]:
        text += " No other configuration replayed a ratio above 1."
    if row["granularity"] != GRANULARITY_COMPLETION:
        text += _EPOCH_NOTE
    return text


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if value == math.inf:
        return "never"
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


# --- closed loop ---------------------------------------------------------------------------------
def closed_loop_candidates(
    recommendations: pl.DataFrame, metrics: pl.DataFrame | None = None
) -> dict[str, list[tuple[str, str]]]:
    """Task -> [(configuration, role)] to compare with Metta's default in the closed loop,
    from completion-granularity rows only (the simulator's LP consumes completions): the
    recommendation when `actionable`, the highest replayed SNR (the configuration an
    open-loop reading alone would pick) and, when it was replayed on completions
    (`metrics`), `kalman_matched` (LP at the local-level gain the noise analysis
    recommends); each once, default excluded."""
    replayed: dict[str, set[str]] = {KALMAN_MATCHED: set(), SEPARATION_MATCHED: set()}
    if metrics is not None and metrics.height:
        for name, tasks in replayed.items():
            matched = metrics.filter(
                (pl.col("config") == name) & (pl.col("granularity") == GRANULARITY_COMPLETION)
            )
            tasks.update(matched["task"].to_list())
    out: dict[str, list[tuple[str, str]]] = {}
    rows = recommendations.filter(pl.col("granularity") == GRANULARITY_COMPLETION)
    for row in rows.iter_rows(named=True):
        pairs: list[tuple[str, str]] = []
        wanted = [(row["replay_best"], "replay_best")]
        if row["actionable"]:
            wanted.insert(0, (row["config"], "recommended"))
        if row["task"] in replayed[SEPARATION_MATCHED]:
            wanted.append((SEPARATION_MATCHED, "lp_separation"))
        if row["task"] in replayed[KALMAN_MATCHED]:
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
    with the paired t interval (method and n in the row). `outcomes` has LP_CLOSED_LOOP rows."""
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
                diff = intervals.paired_t_interval(ours, theirs)
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
                        "diff": diff.estimate,
                        "diff_ci_low": diff.low,
                        "diff_ci_high": diff.high,
                        "ci_method": diff.method,
                        "n_pairs": diff.n,
                        "n_censored": censored,
                        "engine": paired["engine"][0] if "engine" in paired.columns else None,
                    }
                )
    if not rows:
        return empty(LP_CLOSED_LOOP_SUMMARY)
    return conform(
        pl.DataFrame(rows, infer_schema_length=None), LP_CLOSED_LOOP_SUMMARY, "closed loop summary"
    )
