"""LP experiments: arms of one task compared with that task's baseline arm, over seeds.

An *experiment* is the runs of one task (recipe) that differ in LP settings: each *arm*
(one setting) has 1-5 seeds, one run per seed, and one arm per task is the baseline
(`runs`: run_id, task, arm, baseline, seed; only runs listed there are used, and the task
and seed come from there). Granularities are never pooled: every value is computed per
(run, granularity) and every output row carries its granularity.

Per-label quantities (one label's samples in one run at one granularity, in agent-step
order, after dropping non-finite rewards and, with `destale`, epoch re-emissions):
- final: mean reward over the last `final_fraction` of the run's agent steps (the run's
  span at that granularity, first to last sample of any label);
- smoothed reward: trailing mean over `smooth_window` samples (full windows only);
  rolling std: trailing sample std (ddof=1) over `noise_window` samples (full windows);
- start: the first smoothed value; convergence step: the first agent step at which the
  smoothed reward reaches start + convergence_fraction x (final - start) (from above when
  final < start); samples before it are "before convergence", the rest "after";
- threshold target: threshold_fraction x the mean over the BASELINE arm's runs of the
  label's final reward (one target per task, granularity and label, so every arm is timed
  against the same level).

A run's value of a metric is the mean over its labels of the per-label values (unless
the metric says otherwise); `n_labels` counts labels with a finite value.

Comparisons use only intervals that hold with 2-5 seeds: a paired t over the seeds both
arms share (>= 2 pairs), else Welch t (each arm >= 2 seeds), else none. Noise metrics are
compared as ratios (t on the logs). Pure functions on polars/numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from rts_dagster.analysis.distributions import nct_cdf, nct_sf, t_ppf
from rts_dagster.analysis.intervals import LEVEL, t_summary_bounds, welch_t_bounds
from rts_dagster.schema import (
    EXPERIMENT_COMPARISON,
    EXPERIMENT_CURVES,
    EXPERIMENT_DIFFERENCE,
    EXPERIMENT_LABEL_FINALS,
    EXPERIMENT_RUN_METRICS,
    GRANULARITY_COMPLETION,
    conform,
)

_SQRT2 = math.sqrt(2.0)
PER_MILLION = 1e6
POWER = 0.8
ALPHA = 0.05
MAX_SEEDS = 50  # beyond this, seeds_for_80pct_power is null


@dataclass(frozen=True)
class MetricSpec:
    """A run-level metric: its unit and how arms are compared ("difference" or "ratio")."""

    name: str
    unit: str
    scale: str


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("final_reward", "reward", "difference"),
    MetricSpec("final_reward_iqm", "reward", "difference"),
    MetricSpec("time_to_threshold", "agent steps", "difference"),
    MetricSpec("noise_before_convergence", "reward (rolling std)", "ratio"),
    MetricSpec("noise_after_convergence", "reward (rolling std)", "ratio"),
    MetricSpec("slope_after_convergence", "reward per 1M agent steps", "difference"),
    MetricSpec("noise_diff", "reward (std)", "ratio"),
    MetricSpec("sps_mean", "agent steps per second", "difference"),
    MetricSpec("sps_noise_corr", "Pearson r", "difference"),
    MetricSpec("sampling_gini", "Gini coefficient (0 = uniform)", "difference"),
    MetricSpec("sampling_entropy", "nats", "difference"),
)
PROBABILITY_OF_IMPROVEMENT = MetricSpec("probability_of_improvement", "probability", "probability")
_SPEC = {m.name: m for m in (*METRICS, PROBABILITY_OF_IMPROVEMENT)}

_RUNS = pl.Schema(
    {
        "run_id": pl.String,
        "task": pl.String,
        "arm": pl.String,
        "baseline": pl.Boolean,
        "seed": pl.Int64,
    }
)
_RUN = ["task", "arm", "baseline", "seed", "run_id", "granularity"]
_SERIES = ["run_id", "granularity", "label"]


# --- inputs ------------------------------------------------------------------------------------


def _runs_table(runs: pl.DataFrame) -> pl.DataFrame:
    """The runs to use, one row per run_id, checked: one baseline arm per task."""
    table = conform(runs, _RUNS, "runs").unique("run_id", keep="first", maintain_order=True)
    arms = table.group_by("task").agg(
        pl.col("arm").filter(pl.col("baseline")).unique().alias("baselines")
    )
    several = arms.filter(pl.col("baselines").list.len() > 1)
    if several.height:
        raise ValueError(f"runs: more than one baseline arm in task(s) {several['task'].to_list()}")
    mixed = table.group_by("task", "arm").agg(pl.col("baseline").n_unique().alias("k"))
    if mixed.filter(pl.col("k") > 1).height:
        raise ValueError("runs: an arm is marked baseline for some runs and not others")
    return table


def baseline_arms(runs: pl.DataFrame) -> dict[str, str]:
    """task -> its baseline arm's name (tasks without a baseline are absent)."""
    table = _runs_table(runs).filter(pl.col("baseline"))
    return dict(table.select("task", "arm").unique().iter_rows())


def _samples(streams: pl.DataFrame, runs: pl.DataFrame, destale: bool) -> pl.DataFrame:
    """Stream rows of the listed runs with the runs' task/arm/seed, finite rewards only
    (and no stale epoch re-emissions with `destale`), in series order."""
    rows = streams.select(
        pl.col("run_id").cast(pl.String),
        pl.col("label").cast(pl.String),
        pl.col("granularity").cast(pl.String),
        pl.col("sample_index").cast(pl.Int64),
        pl.col("agent_step").cast(pl.Int64),
        pl.col("epoch").cast(pl.Int64),
        pl.col("reward").cast(pl.Float64),
        pl.col("sps").cast(pl.Float64),
        pl.col("is_stale").cast(pl.Boolean).fill_null(False),
    ).join(_runs_table(runs), on="run_id", how="inner")
    keep = pl.col("reward").is_finite() & pl.col("agent_step").is_not_null()
    if destale:
        keep = keep & ~pl.col("is_stale")
    return rows.filter(keep).sort([*_SERIES, "agent_step", "sample_index"])


# --- per-label values ----------------------------------------------------------------------------


def _nan_to_null(expr: pl.Expr) -> pl.Expr:
    return expr.fill_nan(None)


def _label_values(
    samples: pl.DataFrame,
    *,
    final_fraction: float,
    threshold_fraction: float,
    convergence_fraction: float,
    smooth_window: int,
    noise_window: int,
) -> pl.DataFrame:
    """One row per (run, granularity, label) with every per-label metric (NaN -> null)."""
    run = ["run_id", "granularity"]
    first_step = pl.col("agent_step").min().over(run)
    last_step = pl.col("agent_step").max().over(run)
    s = samples.with_columns(
        first_step=first_step,
        last_step=last_step,
        in_final=pl.col("agent_step").cast(pl.Float64)
        >= last_step - final_fraction * (last_step - first_step),
        smoothed=pl.col("reward")
        .rolling_mean(smooth_window, min_samples=smooth_window)
        .over(_SERIES),
        rolling_std=pl.col("reward")
        .rolling_std(noise_window, min_samples=noise_window)
        .over(_SERIES),
        d=pl.col("reward").diff().over(_SERIES),
    )
    per_label = s.group_by([*_RUN, "label"]).agg(
        final=pl.col("reward").filter(pl.col("in_final")).mean(),
        start=pl.col("smoothed").drop_nulls().first(),
        n=pl.len(),
        noise_diff=pl.when(pl.len() >= 3).then(pl.col("d").std() / _SQRT2),
        last_step=pl.col("last_step").first(),
    )
    targets = (
        per_label.filter(pl.col("baseline"))
        .group_by("task", "granularity", "label")
        .agg(target=threshold_fraction * pl.col("final").mean())
    )
    per_label = per_label.join(targets, on=["task", "granularity", "label"], how="left")
    level = pl.col("start") + convergence_fraction * (pl.col("final") - pl.col("start"))
    reached_conv = (
        pl.when(pl.col("final") >= pl.col("start"))
        .then(pl.col("smoothed") >= level)
        .otherwise(pl.col("smoothed") <= level)
    )
    s = s.join(
        per_label.select(*_SERIES, "final", "start", "target"), on=_SERIES, how="left"
    ).with_columns(
        reached_target=(pl.col("smoothed") >= pl.col("target")).fill_null(False),
        reached_conv=reached_conv.fill_null(False),
    )
    s = s.with_columns(
        conv_step=pl.col("agent_step").filter(pl.col("reached_conv")).min().over(_SERIES)
    ).with_columns(after=(pl.col("agent_step") >= pl.col("conv_step")).fill_null(False))
    x = pl.col("agent_step").cast(pl.Float64)
    after = pl.col("after")
    both = pl.col("sps").is_finite() & pl.col("rolling_std").is_not_null()
    timed = s.group_by(_SERIES).agg(
        hit_step=pl.col("agent_step").filter(pl.col("reached_target")).min(),
        converged=pl.col("conv_step").first().is_not_null(),
        noise_before=pl.col("rolling_std").filter(~after).mean(),
        noise_after=pl.col("rolling_std").filter(after).mean(),
        slope_after=pl.when(after.sum() >= 3).then(
            pl.cov(x.filter(after), pl.col("reward").filter(after))
            / x.filter(after).var()
            * PER_MILLION
        ),
        sps_noise_corr=pl.when(both.sum() >= 3).then(
            pl.corr(pl.col("sps").filter(both), pl.col("rolling_std").filter(both))
        ),
    )
    out = per_label.join(timed, on=_SERIES, how="left").with_columns(
        censored=pl.col("target").is_not_null() & pl.col("hit_step").is_null(),
    )
    out = out.with_columns(
        time_to_threshold=pl.when(pl.col("target").is_null())
        .then(None)
        .otherwise(pl.col("hit_step").fill_null(pl.col("last_step")))
        .cast(pl.Float64),
    )
    value_columns = [
        "final",
        "noise_diff",
        "time_to_threshold",
        "noise_before",
        "noise_after",
        "slope_after",
        "sps_noise_corr",
    ]
    return out.with_columns(_nan_to_null(pl.col(c).cast(pl.Float64)) for c in value_columns)


def _iqm(labels: pl.DataFrame) -> pl.DataFrame:
    """rliable's interquartile mean of each run's per-label final rewards: sort, drop
    floor(n/4) from each end, average the rest (= scipy.stats.trim_mean(x, 0.25))."""
    finite = labels.filter(pl.col("final").is_not_null())
    ranked = finite.with_columns(
        rank=pl.col("final").rank("ordinal").over("run_id", "granularity") - 1,
        n=pl.len().over("run_id", "granularity"),
    ).with_columns(cut=(pl.col("n") // 4))
    middle = (pl.col("rank") >= pl.col("cut")) & (pl.col("rank") < pl.col("n") - pl.col("cut"))
    return ranked.group_by("run_id", "granularity").agg(
        final_reward_iqm=pl.col("final").filter(middle).mean(), n_iqm=pl.len()
    )


def _sps_mean(samples: pl.DataFrame) -> pl.DataFrame:
    """Mean SPS of each (run, granularity) over its distinct epochs (agent steps where the
    epoch is unknown): every epoch counts once, however many labels or completions it has."""
    key = pl.when(pl.col("epoch") >= 0).then(pl.col("epoch")).otherwise(-1 - pl.col("agent_step"))
    per_epoch = (
        samples.filter(pl.col("sps").is_finite())
        .with_columns(key=key)
        # in order: a mean over thread-ordered groups differs in the last bits from run to
        # run, and two arms with the same SPS would then differ by ~1e-12
        .group_by("run_id", "granularity", "key", maintain_order=True)
        .agg(pl.col("sps").first())
    )
    return per_epoch.group_by("run_id", "granularity", maintain_order=True).agg(
        sps_mean=pl.col("sps").mean(), n_sps=pl.len()
    )


def _sampling(streams: pl.DataFrame, runs: pl.DataFrame) -> pl.DataFrame:
    """Gini and Shannon entropy (nats) of each run's completions per label, over every
    label the task's runs completed (a label this run never sampled counts 0)."""
    rows = (
        streams.select(
            pl.col("run_id").cast(pl.String), pl.col("label").cast(pl.String), "granularity"
        )
        .filter(pl.col("granularity") == GRANULARITY_COMPLETION)
        .join(_runs_table(runs).select("run_id", "task"), on="run_id", how="inner")
    )
    counts = rows.group_by("task", "run_id", "label").agg(count=pl.len())
    labels = counts.select("task", "label").unique()
    grid = counts.select("task", "run_id").unique().join(labels, on="task")
    full = grid.join(counts, on=["task", "run_id", "label"], how="left").with_columns(
        pl.col("count").fill_null(0).cast(pl.Float64)
    )
    full = full.with_columns(
        i=pl.col("count").rank("ordinal").over("run_id").cast(pl.Float64),
        k=pl.len().over("run_id").cast(pl.Float64),
        total=pl.col("count").sum().over("run_id"),
    ).with_columns(p=pl.col("count") / pl.col("total"))
    plogp = pl.when(pl.col("p") > 0).then(pl.col("p") * pl.col("p").log()).otherwise(0.0)
    return (
        full.group_by("run_id")
        .agg(
            sampling_gini=(
                2.0
                * (pl.col("i") * pl.col("count")).sum()
                / (pl.col("k") * pl.col("total")).first()
                - (pl.col("k").first() + 1.0) / pl.col("k").first()
            ),
            sampling_entropy=-plogp.sum(),
            n_sampling=pl.len(),
        )
        .with_columns(granularity=pl.lit(GRANULARITY_COMPLETION))
    )


def label_final_rewards(
    streams: pl.DataFrame,
    runs: pl.DataFrame,
    *,
    final_fraction: float = 0.25,
    destale: bool = True,
) -> pl.DataFrame:
    """Per (run, granularity, label) mean reward over the last `final_fraction` of the run's
    agent steps (schema.EXPERIMENT_LABEL_FINALS): the input of probability_of_improvement."""
    samples = _samples(streams, runs, destale)
    run = ["run_id", "granularity"]
    first, last = pl.col("agent_step").min().over(run), pl.col("agent_step").max().over(run)
    tail = pl.col("agent_step").cast(pl.Float64) >= last - final_fraction * (last - first)
    out = (
        samples.with_columns(tail=tail)
        .group_by([*_RUN, "label"])
        .agg(final_reward=pl.col("reward").filter(pl.col("tail")).mean())
        .sort("task", "arm", "seed", "run_id", "granularity", "label")
    )
    return conform(out, EXPERIMENT_LABEL_FINALS, "experiment_label_finals")


# --- run_metrics -----------------------------------------------------------------------------------


def _count_note(missing: pl.Expr, total: pl.Expr, why: str) -> pl.Expr:
    return pl.when(missing > 0).then(
        pl.format("{} of {} labels gave no value (" + why + ")", missing, total)
    )


def run_metrics(
    streams: pl.DataFrame,
    runs: pl.DataFrame,
    *,
    final_fraction: float = 0.25,
    threshold_fraction: float = 0.8,
    convergence_fraction: float = 0.9,
    smooth_window: int = 10,
    noise_window: int = 10,
    destale: bool = True,
) -> pl.DataFrame:
    """One row per (run, granularity, metric) (schema.EXPERIMENT_RUN_METRICS).

    The value is the mean over the run's labels of the per-label value (module docstring),
    except final_reward_iqm (interquartile mean over labels of the per-label final rewards),
    sps_mean (the run's mean SPS over its distinct epochs, not weighted by labels) and
    sampling_gini / sampling_entropy (of the run's completions per label; completion
    granularity only: epoch rows are NaN, an epoch mean does not show what LP sampled).
    time_to_threshold: a label that never reaches the target is censored at the run's last
    agent step (kept in the mean, counted in `note`)."""
    if not 0.0 < final_fraction <= 1.0:
        raise ValueError("final_fraction must be in (0, 1]")
    if smooth_window < 1 or noise_window < 2:
        raise ValueError("smooth_window must be >= 1 and noise_window >= 2")
    samples = _samples(streams, runs, destale)
    labels = _label_values(
        samples,
        final_fraction=final_fraction,
        threshold_fraction=threshold_fraction,
        convergence_fraction=convergence_fraction,
        smooth_window=smooth_window,
        noise_window=noise_window,
    )
    per_label = {
        "final_reward": ("final", f"no sample in the last {final_fraction:.0%} of agent steps"),
        "time_to_threshold": ("time_to_threshold", "no baseline final reward to set a target"),
        "noise_before_convergence": ("noise_before", "no full rolling window before convergence"),
        "noise_after_convergence": (
            "noise_after",
            "never converged or no full rolling window after",
        ),
        "slope_after_convergence": ("slope_after", "fewer than 3 samples after convergence"),
        "noise_diff": ("noise_diff", "fewer than 3 samples"),
        "sps_noise_corr": (
            "sps_noise_corr",
            "fewer than 3 samples with SPS and a rolling std, or constant",
        ),
    }
    runs_frame = labels.group_by(_RUN).agg(
        *[pl.col(col).mean().alias(f"{name}__v") for name, (col, _) in per_label.items()],
        *[pl.col(col).count().alias(f"{name}__n") for name, (col, _) in per_label.items()],
        pl.len().alias("n_total"),
        pl.col("censored").sum().alias("n_censored"),
        (~pl.col("converged").fill_null(False)).sum().alias("n_unconverged"),
    )
    runs_frame = (
        runs_frame.join(_iqm(labels), on=["run_id", "granularity"], how="left")
        .join(_sps_mean(samples), on=["run_id", "granularity"], how="left")
        .join(_sampling(streams, runs), on=["run_id", "granularity"], how="left")
    )
    total = pl.col("n_total")
    parts: list[pl.DataFrame] = []
    key_columns = ["task", "arm", "seed", "run_id", "granularity"]
    for name, (_, why) in per_label.items():
        n = pl.col(f"{name}__n")
        notes = [_count_note(total - n, total, why)]
        if name == "time_to_threshold":
            notes.append(
                pl.when(pl.col("n_censored") > 0).then(
                    pl.format(
                        "{} of {} labels never reached the threshold (censored at the run's last agent step)",
                        pl.col("n_censored"),
                        total,
                    )
                )
            )
        if name in ("noise_after_convergence", "slope_after_convergence"):
            notes.append(
                pl.when(pl.col("n_unconverged") > 0).then(
                    pl.format("{} of {} labels never converged", pl.col("n_unconverged"), total)
                )
            )
        parts.append(
            runs_frame.select(
                *key_columns,
                metric=pl.lit(name),
                value=pl.col(f"{name}__v"),
                n_labels=n,
                note=pl.concat_str(notes, separator="; ", ignore_nulls=True),
            )
        )
    parts.append(
        runs_frame.select(
            *key_columns,
            metric=pl.lit("final_reward_iqm"),
            value=pl.col("final_reward_iqm"),
            n_labels=pl.col("n_iqm").fill_null(0),
            note=pl.when(pl.col("n_iqm").fill_null(0) < 4)
            .then(pl.lit("fewer than 4 labels: the IQM is the plain mean"))
            .otherwise(None),
        )
    )
    parts.append(
        runs_frame.select(
            *key_columns,
            metric=pl.lit("sps_mean"),
            value=pl.col("sps_mean"),
            n_labels=total,
            note=pl.when(pl.col("sps_mean").is_null())
            .then(pl.lit("no finite SPS"))
            .otherwise(pl.format("mean over {} distinct epochs", pl.col("n_sps"))),
        )
    )
    completion = pl.col("granularity") == GRANULARITY_COMPLETION
    for name in ("sampling_gini", "sampling_entropy"):
        parts.append(
            runs_frame.select(
                *key_columns,
                metric=pl.lit(name),
                value=pl.col(name),
                n_labels=pl.col("n_sampling").fill_null(0),
                note=pl.when(~completion)
                .then(
                    pl.lit("completion granularity only: an epoch mean does not show LP's sampling")
                )
                .otherwise(pl.format("over the task's {} completed labels", pl.col("n_sampling"))),
            )
        )
    units = pl.DataFrame({"metric": [m.name for m in METRICS], "unit": [m.unit for m in METRICS]})
    out = (
        pl.concat(parts, how="vertical_relaxed")
        .join(units, on="metric", how="left")
        .with_columns(
            pl.col("value").cast(pl.Float64).fill_null(math.nan),
            pl.col("n_labels").cast(pl.Int64),
            pl.col("note").fill_null(""),
        )
    )
    order = {m.name: i for i, m in enumerate(METRICS)}
    out = out.with_columns(_order=pl.col("metric").replace_strict(order, return_dtype=pl.Int64))
    out = out.sort("task", "arm", "seed", "run_id", "granularity", "_order")
    return conform(out, EXPERIMENT_RUN_METRICS, "experiment_run_metrics")


# --- power ---------------------------------------------------------------------------------------


def _smallest_n(delta: np.ndarray, ok: np.ndarray, paired: bool) -> np.ndarray:
    """Smallest n in 2..MAX_SEEDS whose exact two-sided noncentral-t power at alpha reaches
    POWER (power rises with n, so a vectorised bisection: ~6 noncentral-t evaluations per
    element instead of 49); -1 where not `ok` or not reached by MAX_SEEDS."""
    out = np.full(delta.shape, -1, dtype=np.int64)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return out
    d = delta[idx]
    lo = np.full(len(idx), 2, dtype=np.int64)
    hi = np.full(len(idx), MAX_SEEDS + 1, dtype=np.int64)  # MAX_SEEDS + 1: not reached
    while np.any(lo < hi):
        active = lo < hi
        mid = (lo + hi) // 2
        n = mid[active].astype(np.float64)
        df = n - 1.0 if paired else 2.0 * n - 2.0
        nc = d[active] * (np.sqrt(n) if paired else np.sqrt(n / 2.0))
        crit = t_ppf(1.0 - ALPHA / 2.0, df)
        # the far tail can come back NaN from scipy where it is ~1e-60: it is 0 then
        far_tail = np.nan_to_num(nct_cdf(-crit, df, nc), nan=0.0)
        power = nct_sf(crit, df, nc) + far_tail
        enough = np.zeros(len(idx), dtype=bool)
        enough[active] = power >= POWER
        hi = np.where(active & enough, mid, hi)
        lo = np.where(active & ~enough, mid + 1, lo)
    out[idx] = np.where(lo <= MAX_SEEDS, lo, -1)
    return out


def _standardised(effect: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    effect = np.atleast_1d(np.asarray(effect, dtype=np.float64))
    sd = np.atleast_1d(np.asarray(sd, dtype=np.float64))
    ok = np.isfinite(effect) & np.isfinite(sd) & (sd > 0) & (effect != 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(ok, np.abs(effect) / np.where(ok, sd, 1.0), 0.0)
    return delta, ok


def seeds_for_power_paired(effect: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Pairs for a two-sided paired t test at alpha 0.05 to reach 80% power (exact
    noncentral t, as verdict.seeds_needed), per element; -1 where undefined (effect 0,
    sd <= 0) or > 50."""
    delta, ok = _standardised(effect, sd)
    return _smallest_n(delta, ok, paired=True)


def seeds_for_power_two_sample(effect: np.ndarray, pooled_sd: np.ndarray) -> np.ndarray:
    """Seeds per arm for a two-sided two-sample t test (equal n, pooled sd) at alpha 0.05
    to reach 80% power (exact noncentral t, df = 2n - 2, noncentrality delta sqrt(n/2));
    -1 where undefined or > 50."""
    delta, ok = _standardised(effect, pooled_sd)
    return _smallest_n(delta, ok, paired=False)


# --- the comparison kernel ----------------------------------------------------------------------


def _side_stats(values: pl.DataFrame, keys: list[str], tag: str) -> pl.DataFrame:
    return values.group_by(keys).agg(
        pl.col("v").count().alias(f"n_{tag}"),
        pl.col("v").mean().alias(f"mean_{tag}"),
        pl.col("v").var().alias(f"var_{tag}"),
    )


def _compare(
    grid: pl.DataFrame,
    arm_values: pl.DataFrame,
    base_values: pl.DataFrame,
    keys: list[str],
    base_keys: list[str],
    level: float,
) -> pl.DataFrame:
    """For each row of `grid` (columns `keys`): arm vs baseline over seeds. `arm_values` has
    keys + seed + v, `base_values` base_keys + seed + v, one row per seed, v null where
    missing. Adds n_a, n_b, n_pairs, paired, estimate, low, high, and sd (paired: sd of the
    differences; unpaired: pooled sd) for the power calculation."""
    arm_values = arm_values.filter(pl.col("v").is_not_null())
    base_values = base_values.filter(pl.col("v").is_not_null())
    pairs = (
        arm_values.join(base_values, on=[*base_keys, "seed"], how="inner", suffix="_b")
        .with_columns(d=pl.col("v") - pl.col("v_b"))
        .group_by(keys)
        .agg(n_pairs=pl.len(), mean_d=pl.col("d").mean(), var_d=pl.col("d").var())
    )
    out = (
        grid.join(_side_stats(arm_values, keys, "a"), on=keys, how="left")
        .join(_side_stats(base_values, base_keys, "b"), on=base_keys, how="left")
        .join(pairs, on=keys, how="left")
        .with_columns(pl.col("n_a", "n_b", "n_pairs").fill_null(0))
    )

    def col(name: str) -> np.ndarray:
        return out[name].cast(pl.Float64).fill_null(math.nan).to_numpy()

    n_a, n_b, n_p = col("n_a"), col("n_b"), col("n_pairs")
    mean_a, mean_b, mean_d = col("mean_a"), col("mean_b"), col("mean_d")
    var_a, var_b, var_d = col("var_a"), col("var_b"), col("var_d")
    paired = n_p >= 2
    welch = ~paired & (n_a >= 2) & (n_b >= 2)
    p_low, p_high = t_summary_bounds(mean_d, var_d, n_p, level)
    w_diff, w_low, w_high, _ = welch_t_bounds(mean_a, var_a, n_a, mean_b, var_b, n_b, level)
    with np.errstate(invalid="ignore"):
        pooled = np.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))
    nan = np.full(len(n_a), math.nan)
    return out.with_columns(
        paired=pl.Series(paired),
        welch=pl.Series(welch),
        estimate=pl.Series(np.where(paired, mean_d, w_diff)),
        low=pl.Series(np.where(paired, p_low, np.where(welch, w_low, nan))),
        high=pl.Series(np.where(paired, p_high, np.where(welch, w_high, nan))),
        sd=pl.Series(np.where(paired, np.sqrt(var_d), np.where(welch, pooled, nan))),
    )


def _method(kind: pl.Expr, scale: pl.Expr, level: float) -> pl.Expr:
    on_logs = pl.when(scale == "ratio").then(pl.lit(" on logs")).otherwise(pl.lit(""))
    pct = f"{level:.0%}"
    return (
        pl.when(pl.col("paired"))
        .then(pl.format("paired t{}, " + pct + ", n={} pairs", on_logs, pl.col("n_pairs")))
        .when(pl.col("welch"))
        .then(
            pl.format(
                "Welch t{}, " + pct + ", n={}+{} seeds", on_logs, pl.col("n_a"), pl.col("n_b")
            )
        )
        .otherwise(pl.format("no interval, n={}+{} seeds", pl.col("n_a"), pl.col("n_b")))
    )


# --- compare_arms ---------------------------------------------------------------------------------


def _per_seed(metrics: pl.DataFrame) -> pl.DataFrame:
    """Run values per (task, arm, seed, granularity, metric) on the comparison scale (logs
    for ratio metrics; non-positive values left out), duplicate runs of a seed averaged."""
    scales = pl.DataFrame({"metric": list(_SPEC), "scale": [m.scale for m in _SPEC.values()]})
    m = metrics.join(scales, on="metric", how="left").with_columns(
        v=pl.when(~pl.col("value").is_finite())
        .then(None)
        .when(pl.col("scale") == "ratio")
        .then(pl.when(pl.col("value") > 0).then(pl.col("value").log()))
        .otherwise(pl.col("value")),
        nonpositive=(pl.col("scale") == "ratio")
        & pl.col("value").is_finite()
        & (pl.col("value") <= 0),
    )
    return m.group_by("task", "arm", "seed", "granularity", "metric").agg(
        v=pl.col("v").mean(), nonpositive=pl.col("nonpositive").any()
    )


def _probability_of_improvement(
    label_finals: pl.DataFrame, runs: pl.DataFrame, bases: pl.DataFrame
) -> pl.DataFrame:
    """Per (task, arm, granularity): P(an arm run's final reward > a baseline run's), per
    label over all arm x baseline run pairs (ties count half), averaged over labels."""
    table = _runs_table(runs)
    finals = (
        label_finals.select(
            pl.col("run_id").cast(pl.String),
            pl.col("granularity").cast(pl.String),
            pl.col("label").cast(pl.String),
            pl.col("final_reward").cast(pl.Float64),
        )
        .filter(pl.col("final_reward").is_finite())
        .join(table.select("run_id", "task", "arm"), on="run_id", how="inner")
    )
    base = finals.join(bases, left_on=["task", "arm"], right_on=["task", "baseline"], how="inner")
    arm = finals.join(bases, on="task", how="inner").filter(pl.col("arm") != pl.col("baseline"))
    pairs = arm.join(
        base.select("task", "granularity", "label", "run_id", b=pl.col("final_reward")),
        on=["task", "granularity", "label"],
        how="inner",
        suffix="_b",
    ).with_columns(
        win=pl.when(pl.col("final_reward") > pl.col("b"))
        .then(1.0)
        .when(pl.col("final_reward") == pl.col("b"))
        .then(0.5)
        .otherwise(0.0)
    )
    per_label = pairs.group_by("task", "arm", "granularity", "label").agg(
        p=pl.col("win").mean(),
        runs_a=pl.col("run_id").n_unique(),
        runs_b=pl.col("run_id_b").n_unique(),
    )
    return per_label.group_by("task", "arm", "granularity").agg(
        poi=pl.col("p").mean(),
        poi_labels=pl.len(),
        poi_runs_a=pl.col("runs_a").max(),
        poi_runs_b=pl.col("runs_b").max(),
    )


def compare_arms(
    run_metrics_table: pl.DataFrame,
    runs: pl.DataFrame,
    *,
    level: float = LEVEL,
    label_finals: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Each non-baseline arm against its task's baseline arm, per granularity and metric
    (schema.EXPERIMENT_COMPARISON).

    Paired t over the seeds both arms share when they share >= 2 seeds with a value (n =
    pairs), else Welch t when each arm has >= 2 seeds, else no interval. Ratio metrics
    (noise) compare arm / baseline with the t interval on the logs; arm_value and
    baseline_value are then geometric means. `seeds_for_80pct_power`: seeds per arm for a
    two-sided test at alpha 0.05 to detect the observed difference (log scale for ratios)
    with 80% power, exact noncentral t with the paired sd (paired) or pooled sd (Welch).

    probability_of_improvement (rliable) needs `label_finals` (label_final_rewards()); it
    gets no interval at these n. Rows exist for every (task, non-baseline arm, granularity
    present in either arm, metric); tasks without a baseline arm give no rows."""
    table = _runs_table(runs)
    bases = table.filter(pl.col("baseline")).select("task", baseline=pl.col("arm")).unique()
    arms = table.filter(~pl.col("baseline")).select("task", "arm").unique().join(bases, on="task")
    metrics = run_metrics_table.select(
        pl.col("task").cast(pl.String),
        pl.col("arm").cast(pl.String),
        pl.col("seed").cast(pl.Int64),
        pl.col("run_id").cast(pl.String),
        pl.col("granularity").cast(pl.String),
        pl.col("metric").cast(pl.String),
        pl.col("value").cast(pl.Float64),
    ).join(table.select("run_id"), on="run_id", how="semi")
    per_seed = _per_seed(metrics)
    present = metrics.select("task", "arm", "granularity").unique()
    arm_gran = present.join(arms.select("task", "arm"), on=["task", "arm"], how="semi")
    base_gran = present.join(
        bases, left_on=["task", "arm"], right_on=["task", "baseline"], how="semi"
    )
    grans = pl.concat(
        [
            arm_gran.select("task", "arm", "granularity"),
            arms.select("task", "arm").join(base_gran.select("task", "granularity"), on="task"),
        ]
    ).unique()
    specs = pl.DataFrame(
        {
            "metric": [m.name for m in (*METRICS, PROBABILITY_OF_IMPROVEMENT)],
            "unit": [m.unit for m in (*METRICS, PROBABILITY_OF_IMPROVEMENT)],
            "scale": [m.scale for m in (*METRICS, PROBABILITY_OF_IMPROVEMENT)],
        }
    )
    grid = grans.join(bases, on="task").join(specs, how="cross")
    has_arm = arm_gran.select("task", "arm", "granularity").with_columns(arm_present=pl.lit(True))
    has_base = (
        base_gran.select("task", "granularity").unique().with_columns(base_present=pl.lit(True))
    )
    grid = (
        grid.join(has_arm, on=["task", "arm", "granularity"], how="left")
        .join(has_base, on=["task", "granularity"], how="left")
        .with_columns(pl.col("arm_present", "base_present").fill_null(False))
    )

    keys = ["task", "arm", "granularity", "metric"]
    base_keys = ["task", "granularity", "metric"]
    arm_values = per_seed.join(arms.select("task", "arm"), on=["task", "arm"], how="semi").select(
        *keys, "seed", "v"
    )
    base_values = per_seed.join(
        bases, left_on=["task", "arm"], right_on=["task", "baseline"], how="semi"
    ).select(*base_keys, "seed", "v")
    out = _compare(grid, arm_values, base_values, keys, base_keys, level)
    nonpos_a = per_seed.group_by(keys).agg(nonpos_a=pl.col("nonpositive").sum())
    nonpos_b = (
        per_seed.join(bases, left_on=["task", "arm"], right_on=["task", "baseline"], how="semi")
        .group_by(base_keys)
        .agg(nonpos_b=pl.col("nonpositive").sum())
    )
    out = out.join(nonpos_a, on=keys, how="left").join(nonpos_b, on=base_keys, how="left")

    # power, on the comparison scale
    estimate = out["estimate"].to_numpy()
    sd = out["sd"].to_numpy()
    paired = out["paired"].to_numpy()
    welch = out["welch"].to_numpy()
    need = np.full(len(estimate), -1, dtype=np.int64)
    need[paired] = seeds_for_power_paired(estimate[paired], sd[paired])
    need[welch] = seeds_for_power_two_sample(estimate[welch], sd[welch])
    ratio = pl.col("scale") == "ratio"
    out = out.with_columns(
        seeds_for_80pct_power=pl.Series(need).cast(pl.Int64),
        arm_value=pl.when(ratio).then(pl.col("mean_a").exp()).otherwise(pl.col("mean_a")),
        baseline_value=pl.when(ratio).then(pl.col("mean_b").exp()).otherwise(pl.col("mean_b")),
        difference=pl.when(ratio).then(pl.col("estimate").exp()).otherwise(pl.col("estimate")),
        ci_low=pl.when(ratio).then(pl.col("low").exp()).otherwise(pl.col("low")),
        ci_high=pl.when(ratio).then(pl.col("high").exp()).otherwise(pl.col("high")),
    ).with_columns(
        pl.when(pl.col("seeds_for_80pct_power") < 0)
        .then(None)
        .otherwise(pl.col("seeds_for_80pct_power"))
        .alias("seeds_for_80pct_power"),
        method=_method(pl.col("paired"), pl.col("scale"), level),
    )
    unshared = pl.max_horizontal(pl.col("n_a"), pl.col("n_b")) - pl.col("n_pairs")
    completion_only = pl.col("metric").is_in(["sampling_gini", "sampling_entropy"]) & (
        pl.col("granularity") != GRANULARITY_COMPLETION
    )
    notes = [
        pl.when(completion_only).then(
            pl.lit("completion granularity only: an epoch mean does not show LP's sampling")
        ),
        pl.when(~pl.col("arm_present")).then(pl.lit("the arm has no runs at this granularity")),
        pl.when(~pl.col("base_present")).then(
            pl.lit("the baseline has no runs at this granularity")
        ),
        pl.when(pl.col("paired") & (unshared > 0)).then(
            pl.format(
                "paired over the {} shared seeds; unshared seeds left out of the interval",
                pl.col("n_pairs"),
            )
        ),
        pl.when(pl.col("welch")).then(pl.lit("arms share fewer than 2 seeds: unpaired Welch t")),
        pl.when(
            ~pl.col("paired")
            & ~pl.col("welch")
            & pl.col("arm_present")
            & pl.col("base_present")
            & ~completion_only
        ).then(
            pl.format(
                "no interval: an interval needs 2 shared seeds or 2 seeds per arm (arm {}, baseline {} seeds with a value)",
                pl.col("n_a"),
                pl.col("n_b"),
            )
        ),
        pl.when(pl.col("nonpos_a").fill_null(0) + pl.col("nonpos_b").fill_null(0) > 0).then(
            pl.format(
                "{} run value(s) <= 0 left out of the ratio",
                pl.col("nonpos_a").fill_null(0) + pl.col("nonpos_b").fill_null(0),
            )
        ),
    ]
    out = out.with_columns(
        note=pl.concat_str(notes, separator="; ", ignore_nulls=True).fill_null("")
    )

    # probability of improvement: a point estimate, no interval
    is_poi = pl.col("metric") == PROBABILITY_OF_IMPROVEMENT.name
    if label_finals is not None:
        poi = _probability_of_improvement(label_finals, runs, bases)
    else:
        poi = pl.DataFrame(
            schema={
                "task": pl.String,
                "arm": pl.String,
                "granularity": pl.String,
                "poi": pl.Float64,
                "poi_labels": pl.UInt32,
                "poi_runs_a": pl.UInt32,
                "poi_runs_b": pl.UInt32,
            }
        )
    out = out.join(poi, on=["task", "arm", "granularity"], how="left")
    poi_note = (
        pl.when(~pl.col("arm_present"))
        .then(pl.lit("the arm has no runs at this granularity"))
        .when(~pl.col("base_present"))
        .then(pl.lit("the baseline has no runs at this granularity"))
        .when(pl.lit(label_finals is None))
        .then(pl.lit("not estimated: pass label_finals (label_final_rewards) to compare_arms"))
        .when(pl.col("poi").is_null())
        .then(pl.lit("no label with a final reward in both arms"))
        .otherwise(
            pl.format(
                "P(arm run > baseline run) per label over {}x{} run pairs, mean over {} labels; "
                "no interval: a valid one needs more seeds (a bootstrap over 3 runs under-covers)",
                pl.col("poi_runs_a"),
                pl.col("poi_runs_b"),
                pl.col("poi_labels"),
            )
        )
    )
    out = out.with_columns(
        difference=pl.when(is_poi).then(pl.col("poi")).otherwise(pl.col("difference")),
        arm_value=pl.when(is_poi).then(None).otherwise(pl.col("arm_value")),
        baseline_value=pl.when(is_poi).then(None).otherwise(pl.col("baseline_value")),
        ci_low=pl.when(is_poi).then(None).otherwise(pl.col("ci_low")),
        ci_high=pl.when(is_poi).then(None).otherwise(pl.col("ci_high")),
        seeds_for_80pct_power=pl.when(is_poi).then(None).otherwise(pl.col("seeds_for_80pct_power")),
        paired=pl.when(is_poi).then(False).otherwise(pl.col("paired")),
        method=pl.when(is_poi)
        .then(
            pl.format(
                "pairwise count over runs, no interval, n={}+{} seeds",
                pl.col("poi_runs_a").fill_null(0),
                pl.col("poi_runs_b").fill_null(0),
            )
        )
        .otherwise(pl.col("method")),
        n_seeds_arm=pl.when(is_poi)
        .then(pl.col("poi_runs_a").fill_null(0))
        .otherwise(pl.col("n_a")),
        n_seeds_baseline=pl.when(is_poi)
        .then(pl.col("poi_runs_b").fill_null(0))
        .otherwise(pl.col("n_b")),
        note=pl.when(is_poi).then(poi_note).otherwise(pl.col("note")),
    )
    floats = ["arm_value", "baseline_value", "difference"]
    out = out.with_columns(
        pl.col(floats).cast(pl.Float64).fill_null(math.nan),
        pl.col("ci_low", "ci_high").cast(pl.Float64).fill_nan(None),
    )
    order = {name: i for i, name in enumerate(_SPEC)}
    out = out.with_columns(
        _order=pl.col("metric").replace_strict(order, return_dtype=pl.Int64)
    ).sort("task", "arm", "granularity", "_order")
    return conform(out, EXPERIMENT_COMPARISON, "experiment_comparison")


# --- curves over training ---------------------------------------------------------------------------


def _run_bins(
    streams: pl.DataFrame, runs: pl.DataFrame, n_bins: int, destale: bool
) -> pl.DataFrame:
    """Per (run, granularity, bin): the mean over labels of each label's mean reward in the
    bin. Bins split the task's common agent-step range at that granularity (the latest
    first step to the earliest last step of its runs) into `n_bins` equal widths."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    samples = _samples(streams, runs, destale)
    span = samples.group_by("task", "granularity", "run_id").agg(
        lo=pl.col("agent_step").min(), hi=pl.col("agent_step").max()
    )
    common = (
        span.group_by("task", "granularity")
        .agg(lo=pl.col("lo").max().cast(pl.Float64), hi=pl.col("hi").min().cast(pl.Float64))
        .filter(pl.col("hi") > pl.col("lo"))
    )
    width = (pl.col("hi") - pl.col("lo")) / n_bins
    binned = (
        samples.join(common, on=["task", "granularity"], how="inner")
        .filter((pl.col("agent_step") >= pl.col("lo")) & (pl.col("agent_step") <= pl.col("hi")))
        .with_columns(
            bin=((pl.col("agent_step") - pl.col("lo")) / width)
            .floor()
            .cast(pl.Int64)
            .clip(0, n_bins - 1),
        )
        .with_columns(centre=pl.col("lo") + (pl.col("bin").cast(pl.Float64) + 0.5) * width)
    )
    per_label = binned.group_by([*_RUN, "label", "bin"]).agg(
        r=pl.col("reward").mean(), centre=pl.col("centre").first()
    )
    per_run = per_label.group_by([*_RUN, "bin"]).agg(
        r=pl.col("r").mean(), centre=pl.col("centre").first()
    )
    return per_run.group_by("task", "arm", "baseline", "seed", "granularity", "bin").agg(
        v=pl.col("r").mean(), agent_step=pl.col("centre").first()
    )


def arm_curves(
    streams: pl.DataFrame,
    runs: pl.DataFrame,
    *,
    n_bins: int = 20,
    level: float = LEVEL,
    destale: bool = True,
) -> pl.DataFrame:
    """Reward over training per arm (schema.EXPERIMENT_CURVES): per bin, the mean over the
    arm's seeds of each run's mean over labels of the label's mean reward in the bin, with a
    t interval over seeds (null with one seed)."""
    values = _run_bins(streams, runs, n_bins, destale)
    grouped = values.group_by("task", "arm", "granularity", "bin").agg(
        mean_reward=pl.col("v").mean(),
        var=pl.col("v").var(),
        n_seeds=pl.col("v").count(),
        agent_step=pl.col("agent_step").first(),
    )
    low, high = t_summary_bounds(
        grouped["mean_reward"].to_numpy(),
        grouped["var"].fill_null(math.nan).to_numpy(),
        grouped["n_seeds"].to_numpy(),
        level,
    )
    pct = f"{level:.0%}"
    out = grouped.with_columns(
        ci_low=pl.Series(low),
        ci_high=pl.Series(high),
        method=pl.when(pl.col("n_seeds") >= 2)
        .then(pl.format("t over seeds, " + pct + ", n={} seeds", pl.col("n_seeds")))
        .otherwise(pl.format("no interval, n={} seed", pl.col("n_seeds"))),
    ).with_columns(pl.col("ci_low", "ci_high").fill_nan(None))
    out = out.sort("task", "arm", "granularity", "bin")
    return conform(out, EXPERIMENT_CURVES, "experiment_curves")


def difference_over_training(
    streams: pl.DataFrame,
    runs: pl.DataFrame,
    *,
    n_bins: int = 20,
    level: float = LEVEL,
    destale: bool = True,
) -> pl.DataFrame:
    """Arm minus baseline per bin of the per-run bin values of `arm_curves`
    (schema.EXPERIMENT_DIFFERENCE): paired t over shared seeds (>= 2), else Welch t (each
    arm >= 2 seeds), else no interval. n = pairs, or the smaller arm's seeds when unpaired."""
    values = _run_bins(streams, runs, n_bins, destale)
    table = _runs_table(runs)
    bases = table.filter(pl.col("baseline")).select("task", baseline=pl.col("arm")).unique()
    keys = ["task", "arm", "granularity", "bin"]
    base_keys = ["task", "granularity", "bin"]
    arm_values = values.filter(~pl.col("baseline")).join(bases, on="task", how="semi")
    base_values = values.filter(pl.col("baseline")).select(*base_keys, "seed", "v")
    grid = (
        arm_values.group_by(keys)
        .agg(agent_step=pl.col("agent_step").first())
        .join(bases, on="task")
        .join(base_values.select(base_keys).unique(), on=base_keys, how="semi")
    )
    out = _compare(grid, arm_values.select(*keys, "seed", "v"), base_values, keys, base_keys, level)
    pct = f"{level:.0%}"
    out = out.with_columns(
        difference=pl.col("estimate"),
        ci_low=pl.col("low").fill_nan(None),
        ci_high=pl.col("high").fill_nan(None),
        n=pl.when(pl.col("paired"))
        .then(pl.col("n_pairs"))
        .otherwise(pl.min_horizontal("n_a", "n_b")),
        method=pl.when(pl.col("paired"))
        .then(pl.format("paired t, " + pct + ", n={} pairs", pl.col("n_pairs")))
        .when(pl.col("welch"))
        .then(pl.format("Welch t, " + pct + ", n={}+{} seeds", pl.col("n_a"), pl.col("n_b")))
        .otherwise(pl.format("no interval, n={}+{} seeds", pl.col("n_a"), pl.col("n_b"))),
    ).sort("task", "arm", "granularity", "bin")
    return conform(out, EXPERIMENT_DIFFERENCE, "experiment_difference")


# --- a summary the report can use --------------------------------------------------------------------


@dataclass(frozen=True)
class ArmFinding:
    """One comparison row, reduced to what a sentence needs."""

    task: str
    arm: str
    baseline: str
    granularity: str
    metric: str
    scale: str
    difference: float
    ci_low: float | None
    ci_high: float | None
    method: str

    @property
    def excludes_no_effect(self) -> bool:
        """The interval lies wholly on one side of no effect (0, or 1 for ratios)."""
        if self.ci_low is None or self.ci_high is None:
            return False
        null = 1.0 if self.scale == "ratio" else 0.0
        return self.ci_low > null or self.ci_high < null


def findings(comparison: pl.DataFrame) -> list[ArmFinding]:
    """The rows of an EXPERIMENT_COMPARISON table whose interval excludes no effect."""
    out = []
    for row in comparison.iter_rows(named=True):  # one row per comparison, not per sample
        f = ArmFinding(
            row["task"],
            row["arm"],
            row["baseline"],
            row["granularity"],
            row["metric"],
            row["scale"],
            row["difference"],
            row["ci_low"],
            row["ci_high"],
            row["method"],
        )
        if f.excludes_no_effect:
            out.append(f)
    return out
