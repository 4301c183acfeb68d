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


_MS_FIELDS = ("between", "within", "df_between", "df_within", "k", "n_groups", "n_obs", "balanced")


def additive_fit(x: np.ndarray) -> AdditiveFit:
    """Fit x[label, seed] (NaN = missing cell; no empty rows or columns) with label and
    seed effects, by least squares on the observed cells.

    The label mean square is the reduction in residual sum of squares from adding labels
    to a seeds-only model (equal to the usual two-way one when every cell is present);
    its df is G - 1 and the residual df is N - G - S + 1."""
    fits = _additive_fits(np.asarray(x, dtype=np.float64)[None])
    ms = fits.mean_squares
    one = MeanSquares(
        **{f: np.asarray(getattr(ms, f)[0]) for f in _MS_FIELDS},
        model=ms.model,
    )
    return AdditiveFit(
        run_value=fits.run_value[0], mean_squares=one, identified=bool(fits.identified[0])
    )


@dataclass(frozen=True)
class _Fits:
    """`additive_fit` of many tables at once; every field has a leading table axis."""

    run_value: np.ndarray  # [table, seed]: NaN for padding seeds and unidentified tables
    mean_squares: MeanSquares
    identified: np.ndarray
    n_labels: np.ndarray
    n_seeds: np.ndarray
    spread: np.ndarray  # variance of the observed values, 0 when fewer than 2 (`_spread`)


def _additive_fits(x: np.ndarray) -> _Fits:
    """`additive_fit` of every x[table, label, seed] (NaN = missing cell; a label or seed
    with no cell is padding and not counted), without a loop over tables.

    Absorbing the label effects leaves the seeds' normal equations C beta = q with
    C = diag(n_s) - N' diag(1/n_l) N (N: which cells are observed). C is singular along the
    indicator of each connected set of seeds (linked by shared labels); adding the
    projector onto those indicators makes it invertible without changing the fitted
    values, so one batched solve serves connected and disconnected tables alike. The
    design's rank is then labels + seeds - components."""
    n_cols = x.shape[2]
    obs = np.isfinite(x)
    w = obs.astype(np.float64)
    y = np.where(obs, x, 0.0)
    n_l, n_s = w.sum(axis=2), w.sum(axis=1)
    has_seed = n_s > 0
    n_labels, n_seeds = (n_l > 0).sum(axis=1), has_seed.sum(axis=1)
    n_obs = obs.sum(axis=(1, 2))
    inv_l = 1.0 / np.maximum(n_l, 1.0)
    row_sum, col_sum = y.sum(axis=2), y.sum(axis=1)
    diag = np.arange(n_cols)

    # Seeds reachable through shared labels: boolean closure by repeated squaring.
    reach = (np.einsum("tls,tlr->tsr", w, w) > 0).astype(np.float64)
    for _ in range(math.ceil(math.log2(max(n_cols - 1, 1)))):
        reach = (reach @ reach > 0).astype(np.float64)
    size = reach.sum(axis=2)  # each seed's component size (0: padding)
    n_components = np.rint(np.where(has_seed, 1.0 / np.maximum(size, 1.0), 0.0).sum(axis=1))
    rank = n_labels + n_seeds - n_components.astype(np.int64)

    c = -np.einsum("tls,tl,tlr->tsr", w, inv_l, w)
    c[:, diag, diag] += n_s + ~has_seed  # padding seeds: beta = 0
    c += reach / np.maximum(size, 1.0)[:, :, None]
    q = col_sum - np.einsum("tls,tl->ts", w, row_sum * inv_l)
    beta = np.linalg.solve(c, q[..., None])[..., 0]
    alpha = (row_sum - np.einsum("tls,ts->tl", w, beta)) * inv_l
    fitted = alpha[:, :, None] + beta[:, None, :]
    resid = np.where(obs, x - fitted, 0.0)
    ss_resid = (resid * resid).sum(axis=(1, 2))
    # The seeds-only fit is nested in the additive one, so the reduction in residual SS
    # is the SS between the two fits: no cancellation when labels barely differ.
    seed_mean = col_sum / np.maximum(n_s, 1.0)
    gain = np.where(obs, fitted - seed_mean[:, None, :], 0.0)
    ss_label = (gain * gain).sum(axis=(1, 2))

    df_between = n_labels - 1
    df_resid = n_obs - rank
    has_between, has_resid = df_between > 0, df_resid > 0
    per_between = np.maximum(df_between, 1)
    k0 = (n_obs - (n_l * n_l).sum(axis=1) / np.maximum(n_obs, 1)) / per_between
    ms = MeanSquares(
        between=np.where(has_between, ss_label / per_between, np.nan),
        within=np.where(has_resid, ss_resid / np.maximum(df_resid, 1), np.nan),
        df_between=df_between,
        df_within=df_resid,
        k=np.where(has_between, k0, np.nan),
        n_groups=n_labels,
        n_obs=n_obs,
        balanced=n_obs == n_labels * n_seeds,
        model=TWO_WAY_MODEL,
    )
    identified = n_components == 1
    run_value = (alpha.sum(axis=1) / np.maximum(n_labels, 1))[:, None] + beta
    run_value = np.where(has_seed & identified[:, None], run_value, np.nan)

    n = np.maximum(n_obs, 1)
    dev = np.where(obs, x - (y.sum(axis=(1, 2)) / n)[:, None, None], 0.0)
    spread = np.where(n_obs >= 2, (dev * dev).sum(axis=(1, 2)) / n, 0.0)
    return _Fits(run_value, ms, identified, n_labels, n_seeds, spread)


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


def _tables(cells: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, np.ndarray]:
    """The cells of `cell_values` as tables x[table, label, seed] (NaN = no cell), one per
    (granularity, task) in sorted order, labels and seeds sorted within each. Returns the
    cells with their table, seed_idx and label_idx, one row per table (granularity, task,
    the run ids behind it sorted) and x."""
    first = pl.int_range(pl.len()) == 0  # cells are sorted by granularity, task
    keyed = cells.with_columns(
        table=(
            first
            | pl.col("granularity").ne_missing(pl.col("granularity").shift())
            | pl.col("task").ne_missing(pl.col("task").shift())
        ).cum_sum()
        - 1
    ).with_columns(
        seed_idx=(pl.col("seed").rank("dense").over("table") - 1).cast(pl.Int64),
        label_idx=(pl.col("label").rank("dense").over("table") - 1).cast(pl.Int64),
    )
    tables = keyed.group_by("table", maintain_order=True).agg(
        pl.col("granularity").first(),
        pl.col("task").first(),
        pl.col("runs").explode().drop_nulls().unique().sort(),
    )
    t, lab, seed = (keyed[c].to_numpy() for c in ("table", "label_idx", "seed_idx"))
    x = np.full((tables.height, int(lab.max()) + 1, int(seed.max()) + 1), np.nan)
    x[t, lab, seed] = keyed["value"].to_numpy()
    return keyed, tables, x


def _spread(x: np.ndarray) -> float:
    """Variance of the finite values of x (0 when fewer than 2)."""
    values = x[np.isfinite(x)]
    return float(values.var()) if values.size >= 2 else 0.0


def _finite(v: np.ndarray) -> np.ndarray:
    """v where finite or +inf, else NaN."""
    return np.where(np.isfinite(v) | (v == np.inf), v, np.nan)


def _reason_texts(group_word: str) -> tuple[str, str, str]:
    """What `_components` flags, in words: seed variance 0, equal means, negative."""
    return (
        "seed variance is 0: no F interval",
        f"all {group_word} means are equal: ratio undefined",
        f"var_task_or_label <= 0: {group_word}s differ less than seed noise alone "
        "predicts (ratio +inf, icc <= 0; the CIs still hold)",
    )


def _components(ms: MeanSquares, scale: np.ndarray, level: float) -> dict[str, np.ndarray]:
    """var_seed, var_task_or_label, ratio, icc and their intervals from mean squares, for
    every row of `ms` at once. A mean square below 1e-12 x `scale` (the variance of all the
    values) is rounding noise, e.g. of the least-squares fit: it counts as 0 and gives no
    F interval (an interval from F = 1e30 would end at ICC = 1 to rounding). Also returns
    `defined` and the flags behind the reasons (`_reason_texts`)."""
    with np.errstate(invalid="ignore", over="ignore"):
        tiny = np.where(np.isfinite(scale), 1e-12 * scale, 0.0)
    no_seed_var = ms.within <= tiny
    equal_means = ms.between <= tiny
    usable = ms.usable & ~(no_seed_var | equal_means)
    has_df = ms.df_within >= 1
    var_seed = np.where(no_seed_var, 0.0, np.where(has_df, _finite(ms.var_within), np.nan))
    var_group = _finite(ms.var_between)
    seed_low, seed_high = chi2_variance_bounds(var_seed, ms.df_within, level)
    zero = var_seed == 0.0
    icc, icc_low, icc_high = icc_f_bounds(ms, level)
    ratio, ratio_low, ratio_high = variance_ratio_f_bounds(ms, level)
    blank = (ms.n_groups >= 2) & has_df & ~usable  # no F interval: all six NaN
    negative = usable & (var_group <= 0.0)

    def unless_blank(v: np.ndarray) -> np.ndarray:
        return np.where(blank, np.nan, v)

    return {
        "var_seed": var_seed,
        "var_seed_ci_low": np.where(zero, np.nan, seed_low),
        "var_seed_ci_high": np.where(zero, np.nan, seed_high),
        "var_task_or_label": np.where(has_df, var_group, np.nan),
        "ratio": np.where(usable, np.where(negative, np.inf, ratio), np.nan),
        "ratio_ci_low": unless_blank(ratio_low),
        "ratio_ci_high": unless_blank(ratio_high),
        "icc": np.where(usable, icc, np.nan),
        "icc_ci_low": unless_blank(icc_low),
        "icc_ci_high": unless_blank(icc_high),
        "defined": usable,
        "seed_var_zero": blank & no_seed_var,
        "equal_means": blank & ~no_seed_var & equal_means,
        "negative": negative,
    }


_FLAGS = ("defined", "seed_var_zero", "equal_means", "negative")


def _task_name(task: pl.Expr) -> pl.Expr:
    """The task as text in scopes and reasons; a missing task reads "None" (as str(None))."""
    return task.cast(pl.String).fill_null("None")


def _within_rows(tables: pl.DataFrame, fits: _Fits, level: float) -> pl.DataFrame:
    """One within_task row per table, in the order of `tables`."""
    ms = fits.mean_squares
    comp = _components(ms, fits.spread, level)
    n_seeds, n_labels = fits.n_seeds, fits.n_labels
    flags = {
        "1 seed: no seed variance": n_seeds < 2,
        "1 label: no between-label variance": n_labels < 2,
        "seeds share no labels: label and seed effects not separable": ~fits.identified,
        "no residual degrees of freedom (too many missing label cells)": fits.identified
        & (n_seeds >= 2)
        & (n_labels >= 2)
        & (ms.df_within < 1),
        **dict(zip(_reason_texts("label"), (comp[f] for f in _FLAGS[1:]), strict=True)),
    }
    names = {text: f"_flag{i}" for i, text in enumerate(flags)}
    # Formatted like f_method_name: "%.3g" is the same as format(k0, ".3g").
    method = (
        pl.when(pl.col("_balanced"))
        .then(pl.lit(f"exact F ({ms.model})"))
        .otherwise(
            pl.concat_str(
                pl.lit(f"approximate F ({ms.model}, unequal group sizes, k0="),
                pl.col("_k0"),
                pl.lit(")"),
            )
        )
    )
    ci_method = (
        pl.when(pl.col("_defined"))
        .then(
            pl.concat_str(
                method,
                pl.lit(", n="),
                pl.col("_n_obs").cast(pl.String),
                pl.lit(" (label, seed) cells: "),
                pl.col("n_groups").cast(pl.String),
                pl.lit(" labels x "),
                pl.col("n_seeds").cast(pl.String),
                pl.lit(" seeds"),
            )
        )
        .otherwise(pl.lit(""))
    )
    reason = pl.concat_str(
        [pl.when(pl.col(name)).then(pl.lit(text)) for text, name in names.items()],
        separator="; ",
        ignore_nulls=True,
    )
    values = {name: comp[name] for name in VARIANCE_TABLE.names() if name in comp}
    return tables.hstack(
        pl.DataFrame(
            {
                **values,
                "n_seeds": n_seeds,
                "n_groups": n_labels,
                "_n_obs": ms.n_obs,
                "_balanced": ms.balanced,
                "_k0": np.char.mod("%.3g", ms.k),
                "_defined": comp["defined"],
                **{names[text]: flag for text, flag in flags.items()},
            }
        ).get_columns()
    ).select(
        pl.concat_str(pl.lit("within_task:"), _task_name(pl.col("task"))).alias("scope"),
        pl.lit(LEVEL_LABEL).alias("level"),
        "granularity",
        *values,
        pl.lit(1, pl.Int64).alias("n_tasks"),
        "n_seeds",
        pl.col("runs").list.len().cast(pl.Int64).alias("n_runs"),
        "runs",
        "n_groups",
        ci_method.alias("ci_method"),
        reason.alias("reason"),
    )


def _across_row(
    gran: str, tables: pl.DataFrame, fits: _Fits, in_gran: np.ndarray, level: float
) -> dict[str, Any]:
    """The across_tasks row of one granularity, from the run values of its tables."""
    multi = fits.n_seeds >= 2
    used = in_gran & multi & fits.identified
    tasks = tables.select(_task_name(pl.col("task")))["task"]
    single = tasks.filter(in_gran & ~multi).to_list()
    unidentified = tasks.filter(in_gran & multi & ~fits.identified).to_list()
    reasons: list[str] = []
    if single:
        reasons.append(f"single-seed task(s) left out: {', '.join(single)}")
    if unidentified:
        reasons.append(f"task(s) whose seeds share no labels left out: {', '.join(unidentified)}")
    n_used = int(used.sum())
    if n_used < 2:
        reasons.append("fewer than 2 tasks with 2+ seeds: no between-task variance")
    # Trimmed to the widest used task, as one_way_anova's sums depend on the layout.
    width = int(fits.n_seeds[used].max()) if n_used else 1
    x = fits.run_value[used, :width] if n_used else np.full((1, 1), np.nan)
    ms = one_way_anova(x)
    comp = {k: v.item() for k, v in _components(ms, np.asarray(_spread(x)), level).items()}
    for text, flag in zip(_reason_texts("task"), _FLAGS[1:], strict=True):
        if comp[flag]:
            reasons.append(text)
    n_runs_used = int(fits.n_seeds[used].sum())
    ci_method = ""
    if comp["defined"]:
        ci_method = f"{f_method_name(ms)}, n={n_runs_used} runs in {n_used} tasks"
    runs = tables.filter(used)["runs"].explode().drop_nulls().unique().sort().to_list()
    return {
        "scope": "across_tasks",
        "level": LEVEL_TASK,
        "granularity": gran,
        **{k: v for k, v in comp.items() if k not in _FLAGS},
        "n_tasks": n_used,
        "n_seeds": n_runs_used,
        "n_runs": len(runs),
        "runs": runs,
        "n_groups": n_used,
        "ci_method": ci_method,
        "reason": "; ".join(dict.fromkeys(reasons)),
    }


def run_values(
    series: pl.DataFrame, value: str = "mean_reward", granularity: str | None = None
) -> pl.DataFrame:
    """One value per run (granularity, task, seed) from the within-task additive fit (see
    the module docstring): columns granularity, task, seed, value, runs. Runs of a task
    whose seeds are not connected through shared labels get NaN."""
    schema = {
        "granularity": pl.String,
        "task": pl.String,
        "seed": pl.Int64,
        "value": pl.Float64,
        "runs": pl.List(pl.String),
    }
    cells = cell_values(series, value, granularity)
    if cells.is_empty():
        return pl.DataFrame(schema=schema)
    keyed, _, x = _tables(cells)
    fits = _additive_fits(x)
    out = keyed.group_by("granularity", "task", "seed", maintain_order=True).agg(
        pl.col("table").first(),
        pl.col("seed_idx").first(),
        pl.col("runs").list.explode(keep_nulls=False, empty_as_null=False).unique().sort(),
    )
    value_of = fits.run_value[out["table"].to_numpy(), out["seed_idx"].to_numpy()]
    return (
        out.with_columns(value=pl.Series(value_of, dtype=pl.Float64))
        .select(list(schema))
        .cast(schema)  # type: ignore[arg-type]
        .sort("granularity", "task", "seed")
    )


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
    if cells.is_empty():
        return pl.DataFrame(schema=VARIANCE_TABLE)
    # Every (granularity, task) is fitted in one batch; only the across rows, one per
    # granularity, are formed one at a time.
    _, tables, x = _tables(cells)
    fits = _additive_fits(x)
    within = conform(_within_rows(tables, fits, level), VARIANCE_TABLE, "variance_table")
    gran_of = tables["granularity"]
    parts = []
    for gran in _granularity_order(gran_of.unique().to_list()):
        in_gran = (gran_of == gran).to_numpy()
        across = _across_row(gran, tables, fits, in_gran, level)
        parts += [pl.DataFrame([across], schema=VARIANCE_TABLE), within.filter(in_gran)]
    return conform(pl.concat(parts), VARIANCE_TABLE, "variance_table")
