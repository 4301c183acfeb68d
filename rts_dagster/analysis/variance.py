"""Do seeds differ more than tasks (or labels)? Variance components with exact intervals.

Two kinds of rows per granularity ("epoch" and "completion" are never pooled: their noise
differs by orders of magnitude):

across_tasks (level seed_vs_task): one value per run (task, seed), groups = tasks, in the
one-way random-effects model  v_ts = mu + a_t + e_ts,  a_t ~ N(0, var_task),
e_ts ~ N(0, var_seed). Tasks are a sample of possible tasks and seeds a sample of seeds:
- var_seed = MSW (pooled within-task variance of the run values), with its exact
  chi-square interval (df = N - G);
- var_task_or_label = (MSB - MSW) / k0, the variance of the true task means (k0 = seeds
  per task; for unequal seed counts (N - sum n_t^2 / N) / (G - 1)). Unbiased, and
  NEGATIVE when tasks differ less than seed noise alone predicts (`reason` says so);
- ratio = var_seed / var_task_or_label (> 1: seeds of one task differ more than tasks),
  +inf when var_task_or_label <= 0 (a variance ratio is positive: the between component
  is then at its boundary 0, and the ratio's CI reaches +inf too);
- icc = var_task / (var_task + var_seed) = (MSB - MSW) / (MSB + (k0 - 1) MSW), ICC(1),
  negative in that case (its estimator range is [-1/(k0-1), 1]); when icc > 0,
  ratio = (1 - icc) / icc exactly. Their CIs are the exact F interval of the ICC
  (Shrout & Fleiss 1979) and its monotone image for the ratio; exact for equal seed
  counts, approximate (k0) otherwise. The ratio's upper bound is +inf when the data
  cannot exclude var_task = 0 (F below its 97.5% quantile): with 3 tasks that is common.

within_task:<task> (level seed_vs_label): values per (label, seed) of one task, in the
two-way additive model  v_ls = mu + a_l + b_s + e_ls  (label effect a_l ~ N(0, var_label),
seed effect b_s, residual e_ls ~ N(0, var_seed)). The seed effect b_s, a run that is better
on every label, is removed: LP compares labels within one run, so a run-wide offset does
not change its choices, and the across_tasks row already measures it. Here
- var_seed = residual mean square (label-by-seed noise), chi-square interval;
- var_task_or_label = (MS_label - MS_resid) / k (k = seeds per label), may be negative
  (ratio then +inf, as above);
- icc = consistency ICC(C,1) of McGraw & Wong (1996), ratio = (1 - icc) / icc, with the
  exact F interval on (G - 1, (G - 1)(S - 1)) df; with missing (label, seed) cells the
  label mean square is adjusted for seeds (least squares) and the interval is approximate.

Run value (across_tasks): within a task, a run's value comes from the same additive fit,
mean_l(a_l) + mu + b_s: the run's effect on the task's full label set. A plain mean over the
labels a run has would jump when a run lacks a hard label; comparing on shared labels only
would throw away every label some run lacks. The additive fit uses every observed cell and,
for data that are additive, a missing label leaves the run's value unchanged. It needs the
runs of a task to be connected through shared labels; a task where they are not is left out
(reason). With every cell present it equals the mean over labels.

No interval is formed from one seed: single-seed tasks are left out of across_tasks and a
within row with one seed has NaN bounds. Filtering degenerate series (stalled streams,
broken runs) is the caller's job: every row of `series` given here is used, and the `runs`
column lists the run ids that fed each row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from rts_dagster.analysis.intervals import (
    LEVEL,
    MeanSquares,
    chi2_variance_bounds,
    f_method_name,
    icc_f_bounds,
    one_way_anova,
    variance_ratio_f_bounds,
)
from rts_dagster.schema import (
    GRANULARITY_COMPLETION,
    GRANULARITY_EPOCH,
    VARIANCE_TABLE,
    conform,
)

LEVEL_TASK = "seed_vs_task"
LEVEL_LABEL = "seed_vs_label"
TWO_WAY_MODEL = "two-way additive label + seed, consistency ICC(C,1)"


@dataclass(frozen=True)
class AdditiveFit:
    """Least-squares fit of v[label, seed] = alpha_label + beta_seed on the observed cells."""

    run_value: np.ndarray  # per seed: mean(alpha) + beta_s (NaN when not identified)
    mean_squares: MeanSquares  # label (adjusted for seeds) vs residual
    identified: bool  # seeds connected through shared labels


def additive_fit(x: np.ndarray) -> AdditiveFit:
    """Fit x[label, seed] (NaN = missing cell; no empty rows or columns) with label and
    seed effects, by least squares on the observed cells.

    The label mean square is the reduction in residual sum of squares from adding labels
    to a seeds-only model (equal to the usual two-way one when every cell is present);
    its df is G - 1 and the residual df is N - G - S + 1."""
    n_labels, n_seeds = x.shape
    observed = np.isfinite(x)
    label_idx, seed_idx = np.nonzero(observed)
    y = x[observed]
    n_obs = y.size
    design = np.zeros((n_obs, n_labels + n_seeds))
    design[np.arange(n_obs), label_idx] = 1.0
    design[np.arange(n_obs), n_labels + seed_idx] = 1.0
    coef, _, rank, _ = np.linalg.lstsq(design, y, rcond=None)
    identified = int(rank) == n_labels + n_seeds - 1
    resid = y - design @ coef
    ss_resid = float(resid @ resid)

    seed_count = observed.sum(axis=0)
    seed_mean = np.where(observed, x, 0.0).sum(axis=0) / seed_count
    dev_seed_only = y - seed_mean[seed_idx]
    ss_label = max(float(dev_seed_only @ dev_seed_only) - ss_resid, 0.0)

    df_between = n_labels - 1
    df_resid = n_obs - int(rank)
    label_count = observed.sum(axis=1)
    k0 = (n_obs - float((label_count**2).sum()) / n_obs) / df_between if df_between else math.nan
    ms = MeanSquares(
        between=np.asarray(ss_label / df_between if df_between else math.nan),
        within=np.asarray(ss_resid / df_resid if df_resid > 0 else math.nan),
        df_between=np.asarray(df_between),
        df_within=np.asarray(df_resid),
        k=np.asarray(k0),
        n_groups=np.asarray(n_labels),
        n_obs=np.asarray(n_obs),
        balanced=np.asarray(bool(observed.all())),
        model=TWO_WAY_MODEL,
    )
    run_value = coef[:n_labels].mean() + coef[n_labels:]
    if not identified:
        run_value = np.full(n_seeds, math.nan)
    return AdditiveFit(run_value=run_value, mean_squares=ms, identified=identified)


def cell_values(
    series: pl.DataFrame, value: str = "mean_reward", granularity: str | None = None
) -> pl.DataFrame:
    """Per (granularity, task, seed, label): `value` (mean over duplicate run ids of one
    seed) and the run ids behind it. Non-finite values are dropped. `granularity` None
    keeps every granularity present (each analysed on its own)."""
    rows = series.filter(pl.col(value).is_finite())
    if granularity is not None:
        rows = rows.filter(pl.col("granularity") == granularity)
    return (
        rows.group_by("granularity", "task", "seed", "label")
        .agg(pl.col(value).mean().alias("value"), pl.col("run_id").unique().alias("runs"))
        .sort("granularity", "task", "seed", "label")
    )


def _task_matrix(part: pl.DataFrame) -> tuple[np.ndarray, list[int], list[str]]:
    """x[label, seed] of one (granularity, task), NaN where the seed lacks the label."""
    seeds = sorted(part["seed"].unique().to_list())
    labels = sorted(part["label"].unique().to_list())
    s_idx = {s: i for i, s in enumerate(seeds)}
    l_idx = {lab: i for i, lab in enumerate(labels)}
    x = np.full((len(labels), len(seeds)), np.nan)
    rows = part["label"].replace_strict(l_idx, return_dtype=pl.Int64).to_numpy()
    cols = part["seed"].replace_strict(s_idx, return_dtype=pl.Int64).to_numpy()
    x[rows, cols] = part["value"].to_numpy()
    return x, seeds, labels


def _runs_of(part: pl.DataFrame) -> list[str]:
    return sorted(set(part["runs"].explode().drop_nulls().to_list()))


def _spread(x: np.ndarray) -> float:
    """Variance of the finite values of x (0 when fewer than 2)."""
    values = x[np.isfinite(x)]
    return float(values.var()) if values.size >= 2 else 0.0


def _finite(v: Any) -> float:
    v = float(v)
    return v if math.isfinite(v) or v == math.inf else math.nan


def _components_row(
    ms: MeanSquares, scale: float, level: float, reasons: list[str], group_word: str
) -> dict[str, Any]:
    """var_seed, var_task_or_label, ratio, icc and their intervals from mean squares.
    A mean square below 1e-12 x `scale` (the variance of all the values) is rounding
    noise, e.g. of the least-squares fit: it counts as 0 and gives no F interval (an
    interval from F = 1e30 would end at ICC = 1 to rounding)."""
    tiny = 1e-12 * scale if math.isfinite(scale) else 0.0
    no_seed_var = float(ms.within) <= tiny
    equal_means = float(ms.between) <= tiny
    usable = bool(ms.usable) and not (no_seed_var or equal_means)
    var_seed = _finite(ms.var_within) if int(ms.df_within) >= 1 else math.nan
    if no_seed_var:
        var_seed = 0.0
    var_group = _finite(ms.var_between)
    seed_low, seed_high = (float(v) for v in chi2_variance_bounds(var_seed, ms.df_within, level))
    if var_seed == 0.0:
        seed_low = seed_high = math.nan
    icc, icc_low, icc_high = (float(v) for v in icc_f_bounds(ms, level))
    ratio, ratio_low, ratio_high = (float(v) for v in variance_ratio_f_bounds(ms, level))
    if int(ms.n_groups) >= 2 and int(ms.df_within) >= 1 and not usable:
        icc = icc_low = icc_high = ratio = ratio_low = ratio_high = math.nan
        if no_seed_var:
            reasons.append("seed variance is 0: no F interval")
        elif equal_means:
            reasons.append(f"all {group_word} means are equal: ratio undefined")
    if usable and var_group <= 0.0:
        ratio = math.inf
        reasons.append(
            f"var_task_or_label <= 0: {group_word}s differ less than seed noise alone "
            "predicts (ratio +inf, icc <= 0; the CIs still hold)"
        )
    return {
        "var_seed": var_seed,
        "var_seed_ci_low": seed_low,
        "var_seed_ci_high": seed_high,
        "var_task_or_label": var_group if int(ms.df_within) >= 1 else math.nan,
        "ratio": ratio if usable else math.nan,
        "ratio_ci_low": ratio_low,
        "ratio_ci_high": ratio_high,
        "icc": icc if usable else math.nan,
        "icc_ci_low": icc_low,
        "icc_ci_high": icc_high,
        "defined": usable,
    }


def _within_task_row(
    granularity: str, task: str, part: pl.DataFrame, level: float
) -> tuple[dict[str, Any], AdditiveFit, list[int]]:
    x, seeds, labels = _task_matrix(part)
    fit = additive_fit(x)
    reasons: list[str] = []
    if len(seeds) < 2:
        reasons.append("1 seed: no seed variance")
    if len(labels) < 2:
        reasons.append("1 label: no between-label variance")
    if not fit.identified:
        reasons.append("seeds share no labels: label and seed effects not separable")
    elif len(seeds) >= 2 and len(labels) >= 2 and int(fit.mean_squares.df_within) < 1:
        reasons.append("no residual degrees of freedom (too many missing label cells)")
    comp = _components_row(fit.mean_squares, _spread(x), level, reasons, "label")
    ms = fit.mean_squares
    ci_method = ""
    if comp.pop("defined"):
        ci_method = (
            f"{f_method_name(ms)}, n={int(ms.n_obs)} (label, seed) cells: "
            f"{len(labels)} labels x {len(seeds)} seeds"
        )
    runs = _runs_of(part)
    row = {
        "scope": f"within_task:{task}",
        "level": LEVEL_LABEL,
        "granularity": granularity,
        **comp,
        "n_tasks": 1,
        "n_seeds": len(seeds),
        "n_runs": len(runs),
        "runs": runs,
        "n_groups": len(labels),
        "ci_method": ci_method,
        "reason": "; ".join(dict.fromkeys(reasons)),
    }
    return row, fit, seeds


def run_values(
    series: pl.DataFrame, value: str = "mean_reward", granularity: str | None = None
) -> pl.DataFrame:
    """One value per run (granularity, task, seed) from the within-task additive fit (see
    the module docstring): columns granularity, task, seed, value, runs. Runs of a task
    whose seeds are not connected through shared labels get NaN."""
    cells = cell_values(series, value, granularity)
    out = []
    for (gran, task), part in cells.partition_by(
        "granularity", "task", as_dict=True, maintain_order=True
    ).items():
        x, seeds, _ = _task_matrix(part)
        fit = additive_fit(x)
        runs = part.group_by("seed").agg(
            pl.col("runs").list.explode(keep_nulls=False, empty_as_null=False).unique().sort()
        )
        out.append(
            pl.DataFrame(
                {"granularity": gran, "task": task, "seed": seeds, "value": fit.run_value}
            ).join(runs, on="seed", how="left")
        )
    schema = {
        "granularity": pl.String,
        "task": pl.String,
        "seed": pl.Int64,
        "value": pl.Float64,
        "runs": pl.List(pl.String),
    }
    if not out:
        return pl.DataFrame(schema=schema)
    return pl.concat(out).cast(schema).sort("granularity", "task", "seed")  # type: ignore[arg-type]


def _granularity_order(granularities: list[str]) -> list[str]:
    known = [GRANULARITY_COMPLETION, GRANULARITY_EPOCH]
    return [g for g in known if g in granularities] + sorted(
        g for g in granularities if g not in known
    )


def variance_table(
    series: pl.DataFrame,
    value: str = "mean_reward",
    granularity: str | None = None,
    level: float = LEVEL,
) -> pl.DataFrame:
    """Seed vs task variance across tasks, and seed vs label variance within each task,
    one row per (scope, granularity).

    `series`: the `series_metrics` table (or any table with task, seed, run_id, label,
    granularity and `value`), already filtered of series the caller does not trust.
    `granularity` None: every granularity present, each on its own (completion rows
    first). Returns `schema.VARIANCE_TABLE`; see the module docstring for the model, the
    definitions and the intervals."""
    cells = cell_values(series, value, granularity)
    rows: list[dict[str, Any]] = []
    grans = _granularity_order(cells["granularity"].unique().to_list())
    for gran in grans:
        gcells = cells.filter(pl.col("granularity") == gran)
        within_rows = []
        task_values: list[np.ndarray] = []
        task_runs: list[str] = []
        single: list[str] = []
        unidentified: list[str] = []
        n_runs_used = 0
        for (task,), part in gcells.partition_by("task", as_dict=True, maintain_order=True).items():
            row, fit, seeds = _within_task_row(gran, str(task), part, level)
            within_rows.append(row)
            if len(seeds) < 2:
                single.append(str(task))
            elif not fit.identified:
                unidentified.append(str(task))
            else:
                task_values.append(fit.run_value)
                task_runs.extend(_runs_of(part))
                n_runs_used += len(seeds)

        reasons: list[str] = []
        if single:
            reasons.append(f"single-seed task(s) left out: {', '.join(single)}")
        if unidentified:
            reasons.append(
                f"task(s) whose seeds share no labels left out: {', '.join(unidentified)}"
            )
        if len(task_values) < 2:
            reasons.append("fewer than 2 tasks with 2+ seeds: no between-task variance")
        width = max((v.size for v in task_values), default=1)
        x = np.full((max(len(task_values), 1), width), np.nan)
        for i, v in enumerate(task_values):
            x[i, : v.size] = v
        ms = one_way_anova(x)
        comp = _components_row(ms, _spread(x), level, reasons, "task")
        ci_method = ""
        if comp.pop("defined"):
            ci_method = f"{f_method_name(ms)}, n={n_runs_used} runs in {len(task_values)} tasks"
        runs = sorted(set(task_runs))
        rows.append(
            {
                "scope": "across_tasks",
                "level": LEVEL_TASK,
                "granularity": gran,
                **comp,
                "n_tasks": len(task_values),
                "n_seeds": n_runs_used,
                "n_runs": len(runs),
                "runs": runs,
                "n_groups": len(task_values),
                "ci_method": ci_method,
                "reason": "; ".join(dict.fromkeys(reasons)),
            }
        )
        rows.extend(within_rows)
    if not rows:
        return pl.DataFrame(schema=VARIANCE_TABLE)
    return conform(pl.DataFrame(rows, schema=VARIANCE_TABLE), VARIANCE_TABLE, "variance_table")
