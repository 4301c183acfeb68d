"""Do seeds differ more than tasks (or labels)? Variance components with bootstrap CIs.

Observations are per-run values: for a run (task, seed), the mean over its labels of
the per-series `mean_reward` of `series_metrics` (each label counts once, however many
samples it has). Within a task, the observations are per (seed, label).

For groups g = 1..G (tasks, or the labels of one task) with n_g seeds each:

- var_seed = pooled within-group variance of the seed values,
  sum_g sum_s (x_gs - xbar_g)^2 / sum_g (n_g - 1)  (the ANOVA mean square within, MSW);
- var_task_or_label = variance (ddof=1) of the group means xbar_g across groups;
- ratio = var_seed / var_task_or_label (> 1: seeds of one task differ more than tasks);
- ICC(1), one-way random effects with the group as the random factor:
  ICC = (MSB - MSW) / (MSB + (k0 - 1) MSW), MSB = sum_g n_g (xbar_g - xbar)^2 / (G - 1),
  k0 = (N - sum_g n_g^2 / N) / (G - 1) (= n for balanced groups), N = sum_g n_g.
  It is the share of the variance due to the group; the estimate can be slightly
  negative when groups differ less than seed noise alone predicts.

95% CIs are percentile intervals of a stratified bootstrap (as in rliable): seeds are
resampled with replacement within each group (within a task: whole seeds, with all their
labels), groups are kept fixed, `n_boot` replicates vectorised with numpy and a seeded
generator. In each replicate the within-group sums of squares are rescaled by
n/(n-1) (resampling n seeds shrinks them by (n-1)/n on average). The CIs cover seed
sampling only: tasks and labels are the fixed set studied, not a sample of possible
tasks. Measured coverage of the ratio's 95% CI on normal nested data with fixed task
means: ~90-94% with 10 seeds per task, ~83-88% with 3 (a percentile bootstrap cannot
reach beyond the few observed seeds): read 3-seed CIs as optimistic.

Groups with a single seed carry no seed variance: they are left out of the pooled
variance (and of the across-task row) and the `reason` column says so; a scope with no
usable group gets NaN, never an exception.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import polars as pl

from rts_dagster.schema import VARIANCE_TABLE, conform

LEVEL_TASK = "seed_vs_task"
LEVEL_LABEL = "seed_vs_label"


def _components(
    x: np.ndarray, rescale: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(var_seed, var_group, ratio, icc) of x[..., group, seed] (NaN = missing), each
    with the leading (bootstrap) shape of x. Groups with < 2 seeds add nothing to the
    pooled within-group variance; empty groups are ignored.

    `rescale` (for bootstrap replicates): multiply each group's within sum of squares
    by n_g / (n_g - 1). Drawing n_g seeds with replacement shrinks it by (n_g - 1) / n_g
    on average, which biases the replicates low and the percentile CI with them."""
    valid = np.isfinite(x)
    n_g = valid.sum(axis=-1)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        total = np.where(valid, x, 0.0).sum(axis=-1)
        mean_g = total / n_g
        dev = np.where(valid, x - mean_g[..., None], 0.0)
        ss_w = (dev * dev).sum(axis=-1)
        if rescale:
            ss_w = ss_w * np.where(n_g >= 2, n_g / np.maximum(n_g - 1, 1), 0.0)
        msw = ss_w.sum(axis=-1) / np.maximum(n_g - 1, 0).sum(axis=-1)
        has = n_g >= 1
        n_groups = has.sum(axis=-1)
        mean_g0 = np.where(has, mean_g, 0.0)
        grand = mean_g0.sum(axis=-1) / n_groups
        spread = np.where(has, mean_g0 - grand[..., None], 0.0)
        var_group = (spread * spread).sum(axis=-1) / (n_groups - 1)
        n_total = n_g.sum(axis=-1)
        grand_w = total.sum(axis=-1) / n_total
        spread_w = np.where(has, mean_g0 - grand_w[..., None], 0.0)
        msb = (n_g * spread_w * spread_w).sum(axis=-1) / (n_groups - 1)
        k0 = (n_total - (n_g * n_g).sum(axis=-1) / n_total) / (n_groups - 1)
        icc = (msb - msw) / (msb + (k0 - 1.0) * msw)
        ratio = msw / var_group
    return msw, var_group, ratio, icc


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the finite replicates (NaN if most are not finite)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.size < 0.5 * values.size:
        return math.nan, math.nan
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(finite, [a, 1.0 - a])
    return float(lo), float(hi)


def _resample_within_groups(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified bootstrap copies of x[group, seed] (n_boot x group x seed): each group
    draws as many seeds as it has, with replacement, among its own present seeds."""
    n_groups, width = x.shape
    present = np.isfinite(x)
    counts = present.sum(axis=1)
    order = np.argsort(~present, axis=1, kind="stable")  # present slots first
    draw = (rng.random((n_boot, n_groups, width)) * counts[None, :, None]).astype(np.int64)
    slot = np.take_along_axis(np.broadcast_to(order, (n_boot, n_groups, width)), draw, axis=2)
    out = x[np.arange(n_groups)[None, :, None], slot]
    return np.where(np.arange(width)[None, None, :] < counts[None, :, None], out, np.nan)


def _row(
    scope: str,
    level: str,
    x: np.ndarray,
    boot: np.ndarray | None,
    ci_level: float,
    n_tasks: int,
    reasons: list[str],
) -> dict[str, Any]:
    """One output row for x[group, seed] and its bootstrap copies (None: no CI)."""
    var_seed, var_group, ratio, icc = (float(v) for v in _components(x))
    present = np.isfinite(x)
    n_groups = int(present.any(axis=1).sum())
    if not (present.sum(axis=1) >= 2).any():
        reasons.append("no group has 2 or more seeds: no seed variance")
    if n_groups < 2:
        reasons.append("fewer than 2 groups: no between-group variance")
    elif var_group == 0.0:
        reasons.append("all group means are equal: ratio undefined")
    ratio_ci = icc_ci = (math.nan, math.nan)
    if boot is not None and math.isfinite(ratio):
        _, _, ratio_b, icc_b = _components(boot, rescale=True)
        ratio_ci = _percentile_ci(ratio_b, ci_level)
        icc_ci = _percentile_ci(icc_b, ci_level)

    def finite(v: float) -> float:
        return v if math.isfinite(v) else math.nan

    return {
        "scope": scope,
        "level": level,
        "var_seed": finite(var_seed),
        "var_task_or_label": finite(var_group),
        "ratio": finite(ratio),
        "ratio_ci_low": ratio_ci[0],
        "ratio_ci_high": ratio_ci[1],
        "icc": finite(icc),
        "icc_ci_low": icc_ci[0],
        "icc_ci_high": icc_ci[1],
        "n_tasks": n_tasks,
        "n_seeds": int(present.sum()) if level == LEVEL_TASK else int(x.shape[1]),
        "reason": "; ".join(dict.fromkeys(reasons)),
        "n_groups": n_groups,
    }


def _pad(values: list[list[float]]) -> np.ndarray:
    """Ragged lists -> groups x max_len array, NaN-padded."""
    width = max((len(v) for v in values), default=0)
    out = np.full((len(values), max(width, 1)), np.nan)
    for i, v in enumerate(values):
        out[i, : len(v)] = v
    return out


def seed_values(
    series: pl.DataFrame, value: str = "mean_reward", granularity: str | None = None
) -> pl.DataFrame:
    """Per (task, seed, label) value (mean over duplicate run ids) of one granularity.

    `granularity` None picks `completion` when present (what LP consumes), else `epoch`.
    Rows with a non-finite value are dropped."""
    if granularity is None:
        has_completion = (series["granularity"] == "completion").any()
        granularity = "completion" if has_completion else "epoch"
    return (
        series.filter((pl.col("granularity") == granularity) & pl.col(value).is_finite())
        .group_by("task", "seed", "label", maintain_order=True)
        .agg(pl.col(value).mean().alias("value"))
        .sort("task", "seed", "label")
    )


def variance_table(
    series: pl.DataFrame,
    value: str = "mean_reward",
    granularity: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pl.DataFrame:
    """Seed vs task variance across tasks, and seed vs label variance within each task.

    `series`: the `series_metrics` table (or any table with task, seed, label,
    granularity and `value`). Returns `schema.VARIANCE_TABLE`: one
    "across_tasks" row (level seed_vs_task) and one "within_task:<task>" row per task
    (level seed_vs_label). See the module docstring for the definitions."""
    rng = np.random.default_rng(seed)
    obs = seed_values(series, value, granularity)
    rows: list[dict[str, Any]] = []
    tasks = obs["task"].unique(maintain_order=True).to_list()

    # Across tasks: one value per run = mean over its labels; stratified by task.
    runs = obs.group_by("task", "seed", maintain_order=True).agg(pl.col("value").mean())
    per_task = {t: runs.filter(pl.col("task") == t)["value"].to_list() for t in tasks}
    single = [t for t, v in per_task.items() if len(v) < 2]
    multi = [t for t in tasks if t not in single]
    reasons = [f"single-seed task(s) left out: {', '.join(single)}"] if single else []
    x = _pad([per_task[t] for t in multi])
    boot = _resample_within_groups(x, n_boot, rng) if multi else None
    rows.append(_row("across_tasks", LEVEL_TASK, x, boot, level, len(multi), reasons))

    # Within each task: groups = labels, members = seeds; whole seeds are resampled so
    # every replicate keeps the pairing of a seed's labels.
    for task in tasks:
        part = obs.filter(pl.col("task") == task)
        seeds = part["seed"].unique(maintain_order=True).to_list()
        labels = part["label"].unique(maintain_order=True).to_list()
        x = np.full((len(labels), len(seeds)), np.nan)
        s_idx = {s: i for i, s in enumerate(seeds)}
        l_idx = {lab: i for i, lab in enumerate(labels)}
        for s, lab, v in part.select("seed", "label", "value").iter_rows():
            x[l_idx[lab], s_idx[s]] = v
        reasons = [] if len(seeds) >= 2 else ["1 seed: no seed variance"]
        if len(labels) < 2:
            reasons.append("1 label: no between-label variance")
        boot = None
        if len(seeds) >= 2:
            idx = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
            boot = x[:, idx].transpose(1, 0, 2)  # n_boot x label x seed
        rows.append(_row(f"within_task:{task}", LEVEL_LABEL, x, boot, level, 1, reasons))
    return conform(pl.DataFrame(rows, schema=VARIANCE_TABLE), VARIANCE_TABLE, "variance_table")
