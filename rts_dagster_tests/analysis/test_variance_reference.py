"""The earlier per-task implementation of `variance_table` (with `additive_fit` by
`np.linalg.lstsq`, `_within_task_row`, `_components_row` and `run_values`), kept as an
independent scalar reference: a Python loop per (granularity, task) and one least-squares
fit per task. The vectorised functions in `rts_dagster.analysis.variance` must give the
same table (to 1e-12 relative, NaN in the same places, strings equal) on synthetic tables
with many tasks, missing cells, unbalanced seeds, 1-seed and 1-label tasks, zero seed
variance, seeds sharing no labels, NaN values and two granularities."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import polars as pl
import pytest

from rts_dagster.analysis import variance
from rts_dagster.analysis.intervals import (
    LEVEL,
    MeanSquares,
    chi2_variance_bounds,
    f_method_name,
    icc_f_bounds,
    one_way_anova,
    variance_ratio_f_bounds,
)
from rts_dagster.analysis.variance import LEVEL_LABEL, LEVEL_TASK, TWO_WAY_MODEL
from rts_dagster.schema import (
    GRANULARITY_COMPLETION,
    GRANULARITY_EPOCH,
    VARIANCE_TABLE,
    conform,
)

# --- the reference (copied unchanged but for names and docstrings) -------------------------


@dataclass(frozen=True)
class _RefAdditiveFit:
    run_value: np.ndarray
    mean_squares: MeanSquares
    identified: bool


def _ref_additive_fit(x: np.ndarray) -> _RefAdditiveFit:
    """x[label, seed] (NaN = missing) fitted with label and seed effects by lstsq."""
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
    return _RefAdditiveFit(run_value=run_value, mean_squares=ms, identified=identified)


def _ref_cell_values(
    series: pl.DataFrame, value: str = "mean_reward", granularity: str | None = None
) -> pl.DataFrame:
    rows = series.filter(pl.col(value).is_finite())
    if granularity is not None:
        rows = rows.filter(pl.col("granularity") == granularity)
    return (
        rows.group_by("granularity", "task", "seed", "label")
        .agg(pl.col(value).mean().alias("value"), pl.col("run_id").unique().alias("runs"))
        .sort("granularity", "task", "seed", "label")
    )


def _ref_task_matrix(part: pl.DataFrame) -> tuple[np.ndarray, list[int], list[str]]:
    seeds = sorted(part["seed"].unique().to_list())
    labels = sorted(part["label"].unique().to_list())
    s_idx = {s: i for i, s in enumerate(seeds)}
    l_idx = {lab: i for i, lab in enumerate(labels)}
    x = np.full((len(labels), len(seeds)), np.nan)
    rows = part["label"].replace_strict(l_idx, return_dtype=pl.Int64).to_numpy()
    cols = part["seed"].replace_strict(s_idx, return_dtype=pl.Int64).to_numpy()
    x[rows, cols] = part["value"].to_numpy()
    return x, seeds, labels


def _ref_runs_of(part: pl.DataFrame) -> list[str]:
    return sorted(set(part["runs"].explode().drop_nulls().to_list()))


def _ref_spread(x: np.ndarray) -> float:
    values = x[np.isfinite(x)]
    return float(values.var()) if values.size >= 2 else 0.0


def _ref_finite(v: Any) -> float:
    v = float(v)
    return v if math.isfinite(v) or v == math.inf else math.nan


def _ref_components_row(
    ms: MeanSquares, scale: float, level: float, reasons: list[str], group_word: str
) -> dict[str, Any]:
    tiny = 1e-12 * scale if math.isfinite(scale) else 0.0
    no_seed_var = float(ms.within) <= tiny
    equal_means = float(ms.between) <= tiny
    usable = bool(ms.usable) and not (no_seed_var or equal_means)
    var_seed = _ref_finite(ms.var_within) if int(ms.df_within) >= 1 else math.nan
    if no_seed_var:
        var_seed = 0.0
    var_group = _ref_finite(ms.var_between)
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


def _ref_within_task_row(
    granularity: str, task: str, part: pl.DataFrame, level: float
) -> tuple[dict[str, Any], _RefAdditiveFit, list[int]]:
    x, seeds, labels = _ref_task_matrix(part)
    fit = _ref_additive_fit(x)
    reasons: list[str] = []
    if len(seeds) < 2:
        reasons.append("1 seed: no seed variance")
    if len(labels) < 2:
        reasons.append("1 label: no between-label variance")
    if not fit.identified:
        reasons.append("seeds share no labels: label and seed effects not separable")
    elif len(seeds) >= 2 and len(labels) >= 2 and int(fit.mean_squares.df_within) < 1:
        reasons.append("no residual degrees of freedom (too many missing label cells)")
    comp = _ref_components_row(fit.mean_squares, _ref_spread(x), level, reasons, "label")
    ms = fit.mean_squares
    ci_method = ""
    if comp.pop("defined"):
        ci_method = (
            f"{f_method_name(ms)}, n={int(ms.n_obs)} (label, seed) cells: "
            f"{len(labels)} labels x {len(seeds)} seeds"
        )
    runs = _ref_runs_of(part)
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


def _reference_run_values(
    series: pl.DataFrame, value: str = "mean_reward", granularity: str | None = None
) -> pl.DataFrame:
    cells = _ref_cell_values(series, value, granularity)
    out = []
    for (gran, task), part in cells.partition_by(
        "granularity", "task", as_dict=True, maintain_order=True
    ).items():
        x, seeds, _ = _ref_task_matrix(part)
        fit = _ref_additive_fit(x)
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


def _ref_granularity_order(granularities: list[str]) -> list[str]:
    known = [GRANULARITY_COMPLETION, GRANULARITY_EPOCH]
    return [g for g in known if g in granularities] + sorted(
        g for g in granularities if g not in known
    )


def _reference_variance_table(
    series: pl.DataFrame,
    value: str = "mean_reward",
    granularity: str | None = None,
    level: float = LEVEL,
) -> pl.DataFrame:
    cells = _ref_cell_values(series, value, granularity)
    rows: list[dict[str, Any]] = []
    grans = _ref_granularity_order(cells["granularity"].unique().to_list())
    for gran in grans:
        gcells = cells.filter(pl.col("granularity") == gran)
        within_rows = []
        task_values: list[np.ndarray] = []
        task_runs: list[str] = []
        single: list[str] = []
        unidentified: list[str] = []
        n_runs_used = 0
        for (task,), part in gcells.partition_by("task", as_dict=True, maintain_order=True).items():
            row, fit, seeds = _ref_within_task_row(gran, str(task), part, level)
            within_rows.append(row)
            if len(seeds) < 2:
                single.append(str(task))
            elif not fit.identified:
                unidentified.append(str(task))
            else:
                task_values.append(fit.run_value)
                task_runs.extend(_ref_runs_of(part))
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
        comp = _ref_components_row(ms, _ref_spread(x), level, reasons, "task")
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


# --- synthetic inputs -----------------------------------------------------------------------

Cell = tuple[str | None, int, str | None, str, str, float]  # task, seed, run_id, label, gran, value


def _table(rows: list[Cell]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "task": pl.String,
            "seed": pl.Int64,
            "run_id": pl.String,
            "label": pl.String,
            "granularity": pl.String,
            "mean_reward": pl.Float64,
        },
        orient="row",
    )


def random_tasks(
    rng: np.random.Generator,
    n_tasks: int,
    granularity: str,
    scale: float = 1.0,
    missing: float = 0.1,
    seeds: tuple[int, ...] = (3, 4, 5),
    labels: tuple[int, int] = (4, 7),
) -> list[Cell]:
    """Tasks with random seed counts, label counts and effect sizes, and missing cells
    (probability `missing`; a seed left with no cell drops out).

    Well conditioned on purpose: labels differ by 30-100 noise sd, so F is far from 0 and
    from the F quantiles. Where labels differ far less than the noise, MS_label =
    SS_seed_only - SS_resid cancels, and where F / F_0.975 is near 1 an icc bound is
    near 0: there the reference's own lstsq rounding exceeds 1e-12 relative
    (test_ill_conditioned_tables_match_exact_arithmetic). Those regimes are reached by
    the deterministic `special_tasks`."""
    rows: list[Cell] = []
    for t in range(n_tasks):
        task = f"task{t}"
        seed_ids = rng.choice(1000, int(rng.choice(seeds)), replace=False)
        n_labels = int(rng.integers(*labels))
        mu = rng.normal(0.5, 0.3)
        sd = 10 ** rng.uniform(-2, -1.5)
        label_effect = sd * 10 ** rng.uniform(1.5, 2) * rng.permutation(n_labels) / n_labels
        for s in seed_ids:
            offset = rng.normal(0.0, 0.1)
            for lab in range(n_labels):
                if rng.random() < missing:
                    continue
                v = mu + offset + label_effect[lab] + rng.normal(0.0, sd)
                rows.append((task, int(s), f"{task}.seed{s}", f"label{lab}", granularity, v))
    return [(t, s, r, lab, g, scale * v) for t, s, r, lab, g, v in rows]


def special_tasks(granularity: str) -> list[Cell]:
    """One task per edge case of the within rows (and of the across row's exclusions)."""
    rows: list[Cell] = []

    def add(task: str, seed: int, label: str, value: float, run: str | None = "") -> None:
        run_id = f"{task}.seed{seed}" if run == "" else run
        rows.append((task, seed, run_id, label, granularity, value))

    for lab, v in (("a", 0.2), ("b", 0.5), ("c", 0.9)):
        add("solo", 4, lab, v)  # 1 seed
    for s, v in ((1, 0.3), (2, 0.35), (3, 0.28)):
        add("one_label", s, "only", v)  # 1 label
    for s in (1, 2, 3):
        for lab, d in (("a", 0.3), ("b", 0.7), ("c", 0.1)):
            add("additive", s, lab, 0.1 * s + d)  # residual 0: seed variance 0
            add("label_only", s, lab, d)  # seeds identical
    for s, lab, v in ((1, "a", 1.0), (1, "c", 1.5), (2, "b", 2.0), (2, "e", 0.1)):
        add("disjoint", s, lab, v)  # seeds share no labels
    for s, lab, v in ((1, "a", 0.4), (1, "b", 0.6), (2, "a", 0.45)):
        add("no_df", s, lab, v)  # 3 cells, rank 3: no residual df
    # Labels that differ less than the interaction noise predicts: var_label < 0.
    noise = {1: (0.05, -0.03, -0.02), 2: (-0.04, 0.06, -0.02), 3: (-0.01, -0.03, 0.04)}
    for s, offset in ((1, 0.0), (2, 0.4), (3, -0.4)):
        for (lab, d), e in zip((("a", 0.01), ("b", -0.01), ("c", 0.0)), noise[s], strict=True):
            add("flat_labels", s, lab, 0.5 + offset + d + e)
    for s, a, b in ((1, 1.0, 2.0), (2, 2.0, 1.0), (3, 1.5, 1.5)):
        add("equal_labels", s, "a", a)  # label means equal after removing seeds
        add("equal_labels", s, "b", b)
    # Two run ids of one seed (their values averaged), a run id missing, NaN and inf values.
    for s in (1, 2, 3):
        for lab, d in (("a", 0.3), ("b", 0.6)):
            add("dup", s, lab, d + 0.02 * s * (lab == "a"))
    add("dup", 1, "a", 0.37, run="dup.seed1.rerun")
    add("dup", 2, "b", 0.61, run=None)
    add("dup", 3, "b", math.nan)
    add("dup", 3, "c", math.inf)
    add("gone", 1, "a", math.nan)  # a task with no finite value
    return rows


def mixed_table(seed: int = 5) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = random_tasks(rng, 40, GRANULARITY_COMPLETION) + special_tasks(GRANULARITY_COMPLETION)
    rows += random_tasks(rng, 25, GRANULARITY_EPOCH, scale=0.01, missing=0.2)
    rows += special_tasks(GRANULARITY_EPOCH)
    rows += random_tasks(rng, 3, "custom", seeds=(1,))
    order = rng.permutation(len(rows))  # input order must not matter
    return _table([rows[i] for i in order])


def assert_same_table(got: pl.DataFrame, want: pl.DataFrame, rel: float = 1e-12) -> None:
    """Same schema and rows; floats to `rel` relative with NaN/inf/null where `want` has
    them; everything else exactly equal."""
    assert got.schema == want.schema
    assert got.height == want.height
    for name, dtype in want.schema.items():
        a, b = got[name], want[name]
        assert a.is_null().to_list() == b.is_null().to_list(), name
        if dtype == pl.Float64:
            x, y = a.to_numpy(), b.to_numpy()
            assert np.array_equal(np.isnan(x), np.isnan(y)), name
            finite = np.isfinite(y)
            assert np.array_equal(x[~finite & ~np.isnan(y)], y[~finite & ~np.isnan(y)]), name
            np.testing.assert_allclose(x[finite], y[finite], rtol=rel, atol=0, err_msg=name)
        else:
            assert a.to_list() == b.to_list(), name


# --- the tests ---------------------------------------------------------------------------


def test_variance_table_equals_reference_on_mixed_designs() -> None:
    table = mixed_table()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = variance.variance_table(table)
    want = _reference_variance_table(table)
    assert_same_table(got, want)
    # The input reaches every branch of the reference.
    reasons = " ".join(want["reason"].to_list())
    for fragment in (
        "1 seed",
        "1 label",
        "seeds share no labels",
        "no residual degrees of freedom",
        "seed variance is 0",
        "all label means are equal",
        "labels differ less than seed noise",
        "single-seed task(s) left out",
        "task(s) whose seeds share no labels left out",
    ):
        assert fragment in reasons, fragment
    assert want["ci_method"].str.starts_with("approximate F (two-way").any()
    assert want["ci_method"].str.starts_with("exact F (two-way").any()
    assert want["granularity"].unique(maintain_order=True).to_list() == [
        GRANULARITY_COMPLETION,
        GRANULARITY_EPOCH,
        "custom",
    ]


@pytest.mark.parametrize("granularity", [GRANULARITY_EPOCH, "custom", "absent"])
def test_one_granularity_and_another_value_column_equal_reference(granularity: str) -> None:
    table = mixed_table(8).with_columns((pl.col("mean_reward") ** 2).alias("final_reward"))
    for value in ("mean_reward", "final_reward"):
        got = variance.variance_table(table, value, granularity, level=0.9)
        assert_same_table(got, _reference_variance_table(table, value, granularity, 0.9))


def test_many_balanced_tasks_equal_reference() -> None:
    """The shape of a large study: every cell present, 3 seeds x 6 labels, many tasks."""
    rng = np.random.default_rng(2)
    rows = random_tasks(rng, 150, GRANULARITY_EPOCH, missing=0.0, seeds=(3,), labels=(6, 7))
    table = _table(rows)
    got = variance.variance_table(table)
    want = _reference_variance_table(table)
    assert_same_table(got, want)
    assert want["ci_method"].str.starts_with("exact F").all()


def test_degenerate_tables_equal_reference() -> None:
    """One task, only single-seed tasks, one cell, equal task means, no random tasks, a
    missing task name, no rows."""
    rng = np.random.default_rng(4)
    cases = [
        _table(random_tasks(rng, 1, GRANULARITY_COMPLETION)),
        _table(random_tasks(rng, 4, GRANULARITY_COMPLETION, seeds=(1,))),
        _table([("t", 1, "t.seed1", "a", GRANULARITY_COMPLETION, 0.5)]),
        _table(  # equal task means
            [
                (t, s, f"{t}.seed{s}", "a", GRANULARITY_COMPLETION, v)
                for t, s, v in (("t1", 1, 1.0), ("t1", 2, 2.0), ("t2", 1, 2.0), ("t2", 2, 1.0))
            ]
        ),
        _table(special_tasks(GRANULARITY_EPOCH)),
        _table(  # a missing task name, with 1 seed: "None" in the scope and the reason
            [(None, 1, "r1", lab, GRANULARITY_COMPLETION, v) for lab, v in (("a", 1), ("b", 2))]
            + random_tasks(rng, 3, GRANULARITY_COMPLETION)
        ),
        _table([]),
    ]
    for table in cases:
        assert_same_table(variance.variance_table(table), _reference_variance_table(table))


def test_run_values_equal_reference() -> None:
    table = mixed_table(11)
    got = variance.run_values(table)
    want = _reference_run_values(table)
    assert got.schema == want.schema
    assert got.drop("value").equals(want.drop("value"))
    x, y = got["value"].to_numpy(), want["value"].to_numpy()
    assert np.array_equal(np.isnan(x), np.isnan(y))
    np.testing.assert_allclose(x[np.isfinite(y)], y[np.isfinite(y)], rtol=1e-12, atol=0)
    empty = _table([])
    assert variance.run_values(empty).equals(_reference_run_values(empty))


def test_additive_fit_equals_reference() -> None:
    rng = np.random.default_rng(9)
    disjoint = np.array([[1.0, np.nan], [np.nan, 2.0], [1.5, np.nan], [np.nan, 0.1]])
    matrices = [disjoint, np.array([[0.3]]), np.array([[0.3, 0.4, 0.2]])]
    for _ in range(60):
        labels, seeds = int(rng.integers(1, 8)), int(rng.integers(1, 6))
        x = rng.normal(0, 1, (labels, 1)) + rng.normal(0, 2, (1, seeds))
        x = x + rng.normal(0, 0.1, x.shape)
        x[rng.random(x.shape) < 0.2] = np.nan
        x = x[np.isfinite(x).any(axis=1)][:, np.isfinite(x).any(axis=0)]
        if x.size:
            matrices.append(x)
    fields = ("between", "within", "df_between", "df_within", "k", "n_groups", "n_obs")
    for x in matrices:
        got, want = variance.additive_fit(x), _ref_additive_fit(x)
        assert got.identified == want.identified
        np.testing.assert_allclose(got.run_value, want.run_value, rtol=1e-12, atol=0)
        for f in fields:
            np.testing.assert_allclose(
                getattr(got.mean_squares, f), getattr(want.mean_squares, f), rtol=1e-9, atol=0
            )
        assert bool(got.mean_squares.balanced) == bool(want.mean_squares.balanced)
        assert got.mean_squares.model == want.mean_squares.model


def _exact_sums_of_squares(x: np.ndarray) -> tuple[Fraction, Fraction]:
    """(SS_resid, SS_label) of the additive fit of a connected x[label, seed], in exact
    rational arithmetic: the seeds' normal equations with labels absorbed, plus the
    constraint sum(beta) = 0, solved by Gauss-Jordan elimination."""
    n_labels, n_seeds = x.shape
    obs = np.isfinite(x)
    cell = {(i, j): Fraction(float(x[i, j])) for i, j in zip(*np.nonzero(obs), strict=True)}
    n_l = [int(obs[i].sum()) for i in range(n_labels)]
    n_s = [int(obs[:, j].sum()) for j in range(n_seeds)]
    row = [sum((v for (i, _), v in cell.items() if i == a), Fraction(0)) for a in range(n_labels)]
    col = [sum((v for (_, j), v in cell.items() if j == b), Fraction(0)) for b in range(n_seeds)]
    m = [
        [
            (n_s[a] if a == b else 0)
            - sum(Fraction(1, n_l[i]) for i in range(n_labels) if obs[i, a] and obs[i, b])
            + Fraction(1, n_seeds)
            for b in range(n_seeds)
        ]
        + [col[a] - sum(row[i] / n_l[i] for i in range(n_labels) if obs[i, a])]
        for a in range(n_seeds)
    ]
    for a in range(n_seeds):
        pivot = next(r for r in range(a, n_seeds) if m[r][a] != 0)
        m[a], m[pivot] = m[pivot], m[a]
        for r in range(n_seeds):
            if r != a and m[r][a] != 0:
                f = m[r][a] / m[a][a]
                m[r] = [u - f * v for u, v in zip(m[r], m[a], strict=True)]
    beta = [m[a][n_seeds] / m[a][a] for a in range(n_seeds)]
    alpha = [
        (row[i] - sum((beta[j] for j in range(n_seeds) if obs[i, j]), Fraction(0))) / n_l[i]
        for i in range(n_labels)
    ]
    ss_resid = sum(((v - alpha[i] - beta[j]) ** 2 for (i, j), v in cell.items()), Fraction(0))
    seed_mean = [col[j] / n_s[j] for j in range(n_seeds)]
    ss_seed_only = sum(((v - seed_mean[j]) ** 2 for (i, j), v in cell.items()), Fraction(0))
    return ss_resid, ss_seed_only - ss_resid


def test_ill_conditioned_tables_match_exact_arithmetic() -> None:
    """Labels whose means differ 1e-3 against interaction noise of sd 0.05 and seed
    offsets of sd 2 (F ~ 5e-4): the reference's SS_label, a difference SS_seed_only -
    SS_resid, was off by ~1e-11 relative (so `random_tasks` keeps clear of such tables);
    the batched fit's sums of squares equal exact rational arithmetic to 1e-12."""
    for seed in (17, 18, 19):
        rng = np.random.default_rng(seed)
        offsets = rng.normal(0.0, 2.0, (1, 4))
        e = rng.normal(0.0, 0.05, 4)
        e -= e.mean()
        x = offsets + np.stack([e, 1e-3 - e])
        ss_resid, ss_label = _exact_sums_of_squares(x)
        ms = variance.additive_fit(x).mean_squares
        assert float(ms.between / ms.within) < 1e-3
        got_resid = float(ms.within) * int(ms.df_within)
        got_label = float(ms.between) * int(ms.df_between)
        assert got_resid == pytest.approx(float(ss_resid), rel=1e-12, abs=0)
        assert got_label == pytest.approx(float(ss_label), rel=1e-12, abs=0)
