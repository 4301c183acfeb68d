"""Seed vs task/label variance: ANOVA by loops, published two-way example, runs lacking
labels, granularities kept apart, degenerate designs. Coverage: test_coverage.py."""

from __future__ import annotations

import math
import warnings

import numpy as np
import polars as pl
import pytest
from scipy import stats

from rts_dagster.analysis.variance import additive_fit, run_values, variance_table
from rts_dagster.schema import VARIANCE_TABLE


def series_table(
    values: dict[tuple[str, int, str], float], granularity: str = "completion"
) -> pl.DataFrame:
    """A minimal series_metrics-like table: (task, seed, label) -> mean_reward."""
    rows = [(t, s, f"{t}.seed{s}", lab, granularity, v) for (t, s, lab), v in values.items()]
    return pl.DataFrame(
        rows,
        schema=["task", "seed", "run_id", "label", "granularity", "mean_reward"],
        orient="row",
    )


def nested(
    rng: np.random.Generator,
    mu: np.ndarray,
    n_seeds: int,
    sd_seed: float,
    sd_label: float,
    n_labels: int,
) -> pl.DataFrame:
    values = {}
    label_effect = rng.normal(0, 0.5, (len(mu), n_labels))
    for t, m in enumerate(mu):
        for s in range(n_seeds):
            run = m + rng.normal(0, sd_seed)
            for lab in range(n_labels):
                values[(f"task{t}", s, f"label{lab}")] = (
                    run + label_effect[t, lab] + rng.normal(0, sd_label)
                )
    return series_table(values)


def one_way_by_loops(groups: list[np.ndarray]) -> tuple[float, float, int, int]:
    """(MSB, MSW, df_between, df_within) with explicit loops, balanced design."""
    k, g = len(groups[0]), len(groups)
    grand = sum(float(x.sum()) for x in groups) / (g * k)
    ssw = sum(float(((x - x.mean()) ** 2).sum()) for x in groups)
    ssb = sum(k * (float(x.mean()) - grand) ** 2 for x in groups)
    return ssb / (g - 1), ssw / (g * (k - 1)), g - 1, g * (k - 1)


def two_way_by_loops(x: np.ndarray) -> tuple[float, float, int, int]:
    """(MS_rows, MS_residual, df_rows, df_residual) of a complete rows x columns table."""
    n_rows, n_cols = x.shape
    grand = x.mean()
    row_means = [x[i].mean() for i in range(n_rows)]
    col_means = [x[:, j].mean() for j in range(n_cols)]
    ss_rows = sum(n_cols * (m - grand) ** 2 for m in row_means)
    ss_res = 0.0
    for i in range(n_rows):
        for j in range(n_cols):
            ss_res += (x[i, j] - row_means[i] - col_means[j] + grand) ** 2
    df_rows, df_res = n_rows - 1, (n_rows - 1) * (n_cols - 1)
    return ss_rows / df_rows, ss_res / df_res, df_rows, df_res


def f_interval(msb: float, msw: float, d1: int, d2: int, k: float) -> tuple[float, ...]:
    """(icc, icc_low, icc_high, ratio, ratio_low, ratio_high) from scipy F quantiles."""
    f = msb / msw
    f_low, f_high = f / stats.f.ppf(0.975, d1, d2), f * stats.f.ppf(0.975, d2, d1)
    icc = [(v - 1) / (v + k - 1) for v in (f, f_low, f_high)]
    ratio_high = k / (f_low - 1) if f_low > 1 else math.inf
    return (*icc, k / (f - 1), k / (f_high - 1), ratio_high)


def test_across_and_within_rows_match_anova_by_loops(rng: np.random.Generator) -> None:
    table = nested(
        rng, mu=np.array([0.0, 1.0, 0.5, 2.0]), n_seeds=5, sd_seed=0.7, sd_label=0.2, n_labels=3
    )
    out = variance_table(table)
    assert out.schema == VARIANCE_TABLE
    across = out.row(0, named=True)
    assert (across["scope"], across["level"], across["granularity"]) == (
        "across_tasks",
        "seed_vs_task",
        "completion",
    )
    # Complete data: a run's value is the mean over its labels.
    runs = table.group_by("task", "seed").agg(pl.col("mean_reward").mean()).sort("task", "seed")
    groups = [runs.filter(pl.col("task") == f"task{t}")["mean_reward"].to_numpy() for t in range(4)]
    msb, msw, d1, d2 = one_way_by_loops(groups)
    assert across["var_seed"] == pytest.approx(msw, rel=1e-12)
    assert across["var_task_or_label"] == pytest.approx((msb - msw) / 5, rel=1e-12)
    expected = f_interval(msb, msw, d1, d2, 5)
    got = [across[c] for c in ("icc", "icc_ci_low", "icc_ci_high")]
    got += [across[c] for c in ("ratio", "ratio_ci_low", "ratio_ci_high")]
    assert got == pytest.approx(expected, rel=1e-10)
    assert across["ratio"] == pytest.approx(across["var_seed"] / across["var_task_or_label"])
    assert across["var_seed_ci_low"] == pytest.approx(d2 * msw / stats.chi2.ppf(0.975, d2))
    assert across["var_seed_ci_high"] == pytest.approx(d2 * msw / stats.chi2.ppf(0.025, d2))
    assert (across["n_tasks"], across["n_seeds"], across["n_runs"], across["reason"]) == (
        4,
        20,
        20,
        "",
    )
    assert across["runs"] == sorted(table["run_id"].unique().to_list())
    assert across["ci_method"] == "exact F (one-way random effects ICC(1)), n=20 runs in 4 tasks"

    within = out.filter(pl.col("scope") == "within_task:task2").row(0, named=True)
    part = table.filter(pl.col("task") == "task2").sort("label", "seed")
    x = part["mean_reward"].to_numpy().reshape(3, 5)  # labels x seeds
    ms_label, ms_res, d1, d2 = two_way_by_loops(x)
    assert within["level"] == "seed_vs_label"
    assert within["var_seed"] == pytest.approx(ms_res, rel=1e-10)
    assert within["var_task_or_label"] == pytest.approx((ms_label - ms_res) / 5, rel=1e-10)
    expected = f_interval(ms_label, ms_res, d1, d2, 5)
    got = [within[c] for c in ("icc", "icc_ci_low", "icc_ci_high")]
    got += [within[c] for c in ("ratio", "ratio_ci_low", "ratio_ci_high")]
    assert got == pytest.approx(expected, rel=1e-10)
    assert (within["n_seeds"], within["n_groups"], within["n_runs"]) == (5, 3, 5)
    assert within["ci_method"].startswith("exact F (two-way additive label + seed")


def test_additive_fit_matches_shrout_fleiss_two_way_example() -> None:
    """Shrout & Fleiss (1979) Table 2 as labels x seeds: EMS = 1.02 on 15 df and
    ICC(3,1) = 0.71 [0.34, 0.95] (the consistency ICC of McGraw & Wong 1996)."""
    x = np.array(
        [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
        dtype=np.float64,
    )
    ms = additive_fit(x).mean_squares
    assert float(ms.within) == pytest.approx(1.02, abs=0.005) and int(ms.df_within) == 15
    assert float(ms.between) == pytest.approx(11.24, abs=0.005)
    values = {("t", s, f"l{i}"): x[i, s] for i in range(6) for s in range(4)}
    row = variance_table(series_table(values)).filter(pl.col("scope") == "within_task:t")
    row = row.row(0, named=True)
    assert [round(row[c], 2) for c in ("icc", "icc_ci_low", "icc_ci_high")] == [0.71, 0.34, 0.95]


def test_a_run_lacking_a_hard_label_keeps_its_value() -> None:
    """Known truth: value = label difficulty + run skill exactly. Seed 0 lacks the hard
    label. Its additive-fit value equals the truth (mean difficulty + skill); the old
    'mean over the labels it has' put it 0.167 higher (the hard label's 0 is missing)."""
    difficulty = {"easy": 0.9, "mid": 0.6, "mid2": 0.5, "hard": 0.0}
    skill = {0: 0.10, 1: 0.00, 2: -0.05}
    values = {
        ("t", s, lab): d + b
        for s, b in skill.items()
        for lab, d in difficulty.items()
        if not (s == 0 and lab == "hard")
    }
    got = run_values(series_table(values)).sort("seed")["value"].to_numpy()
    truth = np.mean(list(difficulty.values())) + np.array(list(skill.values()))
    np.testing.assert_allclose(got, truth, atol=1e-12)
    naive = np.mean([v for (_, s, _), v in values.items() if s == 0])
    assert naive - truth[0] == pytest.approx(
        0.5 - 1.0 / 3.0
    )  # what the missing label used to do to seed 0

    # Same with noise: removing the hard label from seed 0 moves its value by the noise
    # only (vs its full-data value), while the naive mean jumps by ~0.17.
    rng = np.random.default_rng(11)
    full = {
        ("t", s, lab): d + b + rng.normal(0, 0.01)
        for s, b in skill.items()
        for lab, d in difficulty.items()
    }
    before = run_values(series_table(full)).sort("seed")["value"].to_numpy()
    lacking = {k: v for k, v in full.items() if k != ("t", 0, "hard")}
    after = run_values(series_table(lacking)).sort("seed")["value"].to_numpy()
    assert abs(after[0] - before[0]) < 0.03
    across = variance_table(series_table(lacking)).row(0, named=True)
    assert across["ci_method"] == "" and "fewer than 2 tasks" in across["reason"]
    within = variance_table(series_table(lacking)).row(1, named=True)
    assert within["ci_method"].startswith("approximate F")  # a missing cell


def test_granularities_are_never_pooled(rng: np.random.Generator) -> None:
    completion = nested(rng, np.array([0.0, 1.0, 3.0]), 3, 0.5, 0.1, 2)
    epoch = nested(rng, np.array([0.0, 0.1, 0.2]), 3, 0.01, 0.001, 2).with_columns(
        pl.lit("epoch").alias("granularity")
    )
    both = variance_table(pl.concat([epoch, completion]))
    assert both.height == 2 * 4
    assert both.select("scope", "granularity").is_unique().all()
    assert both.filter(pl.col("granularity") == "completion").equals(variance_table(completion))
    assert both.filter(pl.col("granularity") == "epoch").equals(variance_table(epoch))
    assert both["granularity"].to_list()[:4] == ["completion"] * 4
    only_epoch = variance_table(pl.concat([epoch, completion]), granularity="epoch")
    assert only_epoch.equals(variance_table(epoch))


def test_single_seed_unbalanced_and_degenerate_designs_do_not_crash() -> None:
    values = {
        ("solo", 1, "a"): 1.0,
        ("solo", 1, "b"): 2.0,
        ("pair", 1, "a"): 0.5,
        ("pair", 2, "a"): 0.7,
        ("trio", 1, "x"): 0.1,
        ("trio", 2, "x"): 0.4,
        ("trio", 3, "x"): 0.2,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = variance_table(series_table(values))
    across = out.row(0, named=True)
    assert "single-seed task(s) left out: solo" in across["reason"]
    assert across["n_tasks"] == 2 and across["n_seeds"] == 5 and math.isfinite(across["icc"])
    assert across["ci_method"].startswith("approximate F")  # 2 and 3 seeds: k0
    assert "solo.seed1" not in across["runs"]
    solo = out.filter(pl.col("scope") == "within_task:solo").row(0, named=True)
    assert math.isnan(solo["var_seed"]) and math.isnan(solo["ratio_ci_low"])
    assert "1 seed" in solo["reason"] and solo["ci_method"] == ""
    pair = out.filter(pl.col("scope") == "within_task:pair").row(0, named=True)
    assert "1 label" in pair["reason"] and math.isnan(pair["ratio"])

    only_one = variance_table(series_table({("t", 1, "a"): 1.0})).row(0, named=True)
    assert math.isnan(only_one["ratio"]) and only_one["reason"]
    equal = variance_table(
        series_table(
            {("t1", 1, "a"): 1.0, ("t1", 2, "a"): 2.0, ("t2", 1, "a"): 2.0, ("t2", 2, "a"): 1.0}
        )
    )
    assert "all task means are equal" in equal.row(0, named=True)["reason"]
    # Seeds of a task with no label in common: the additive fit cannot separate them.
    disjoint = {("d", 1, "a"): 1.0, ("d", 2, "b"): 2.0, ("d", 1, "c"): 1.5, ("d", 2, "e"): 0.1}
    row = variance_table(series_table(disjoint)).filter(pl.col("scope") == "within_task:d")
    assert "share no labels" in row.row(0, named=True)["reason"]
    # Exactly additive values: the residual is rounding noise, not seed variance.
    additive = {
        ("t", s, lab): 0.1 * s + d for s in (1, 2, 3) for lab, d in (("a", 0.3), ("b", 0.7))
    }
    row = variance_table(series_table(additive)).row(1, named=True)
    assert row["var_seed"] == 0.0 and "seed variance is 0" in row["reason"]
    assert math.isnan(row["icc_ci_high"]) and row["ci_method"] == ""
    empty = variance_table(series_table({("t", 1, "a"): 1.0}).clear())
    assert empty.height == 0 and empty.schema == VARIANCE_TABLE


def test_negative_task_component_is_reported_not_hidden() -> None:
    # Tasks with identical means up to tiny offsets, seeds far apart: MSB < MSW.
    values = {
        (t, s, "a"): off + seed_value
        for t, off in (("t1", 0.0), ("t2", 0.3), ("t3", -0.3))
        for s, seed_value in ((1, 0.0), (2, 1.0), (3, -1.0))
    }
    row = variance_table(series_table(values)).row(0, named=True)
    assert row["var_task_or_label"] < 0 and row["icc"] < 0
    # The ratio of variances sits at its boundary (var_task = 0), inside its own CI.
    assert row["ratio"] == math.inf and row["ratio_ci_low"] < math.inf
    assert "var_task_or_label <= 0" in row["reason"]
    assert row["ratio_ci_high"] == math.inf and row["icc_ci_low"] >= -0.5


def test_deterministic_and_nonfinite_values_are_ignored(rng: np.random.Generator) -> None:
    table = nested(rng, np.array([0.0, 1.0, 3.0]), 3, 0.5, 0.1, 2)
    a = variance_table(table)
    assert a.equals(variance_table(table.sample(fraction=1.0, shuffle=True, seed=3)))
    dirty = pl.concat([table, series_table({("task0", 9, "label0"): float("nan")})])
    assert variance_table(dirty).equals(a)
