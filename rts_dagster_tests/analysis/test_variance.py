"""Seed vs task/label variance: direct ANOVA formulas, CI coverage, degenerate designs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import polars as pl
import pytest

from rts_dagster.analysis.variance import variance_table
from rts_dagster.schema import VARIANCE_TABLE


def series_table(values: dict[tuple[str, int, str], float]) -> pl.DataFrame:
    """A minimal series_metrics-like table: (task, seed, label) -> mean_reward."""
    rows = [(t, s, lab, "completion", v) for (t, s, lab), v in values.items()]
    return pl.DataFrame(
        rows, schema=["task", "seed", "label", "granularity", "mean_reward"], orient="row"
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
    for t, m in enumerate(mu):
        for s in range(n_seeds):
            run = m + rng.normal(0, sd_seed)
            for lab in range(n_labels):
                values[(f"task{t}", s, f"label{lab}")] = run + rng.normal(0, sd_label)
    return series_table(values)


def anova_by_hand(groups: list[np.ndarray]) -> tuple[float, float, float]:
    """(MSW, variance of group means, ICC(1)) with explicit loops, balanced design."""
    k = len(groups[0])
    g = len(groups)
    grand = sum(float(x.sum()) for x in groups) / (g * k)
    ssw = sum(float(((x - x.mean()) ** 2).sum()) for x in groups)
    ssb = sum(k * (float(x.mean()) - grand) ** 2 for x in groups)
    msw = ssw / (g * (k - 1))
    msb = ssb / (g - 1)
    means = np.array([x.mean() for x in groups])
    return msw, float(np.var(means, ddof=1)), (msb - msw) / (msb + (k - 1) * msw)


def test_components_and_icc_match_direct_formulas(rng: np.random.Generator) -> None:
    table = nested(
        rng, mu=np.array([0.0, 1.0, 0.5, 2.0]), n_seeds=5, sd_seed=0.7, sd_label=0.2, n_labels=3
    )
    out = variance_table(table, n_boot=500, seed=1)
    assert out.schema == VARIANCE_TABLE
    across = out.row(0, named=True)
    assert (across["scope"], across["level"]) == ("across_tasks", "seed_vs_task")
    runs = table.group_by("task", "seed").agg(pl.col("mean_reward").mean()).sort("task", "seed")
    groups = [runs.filter(pl.col("task") == f"task{t}")["mean_reward"].to_numpy() for t in range(4)]
    msw, var_means, icc = anova_by_hand(groups)
    assert across["var_seed"] == pytest.approx(msw, rel=1e-12)
    assert across["var_seed"] == pytest.approx(
        np.mean([np.var(x, ddof=1) for x in groups]), rel=1e-12
    )
    assert across["var_task_or_label"] == pytest.approx(var_means, rel=1e-12)
    assert across["ratio"] == pytest.approx(msw / var_means, rel=1e-12)
    assert across["icc"] == pytest.approx(icc, rel=1e-12)
    assert (across["n_tasks"], across["n_seeds"], across["reason"]) == (4, 20, "")
    assert across["ratio_ci_low"] <= across["ratio"] <= across["ratio_ci_high"]
    assert across["icc_ci_low"] <= across["icc"] <= across["icc_ci_high"]

    within = out.filter(pl.col("scope") == "within_task:task2").row(0, named=True)
    part = table.filter(pl.col("task") == "task2")
    by_label = [
        part.filter(pl.col("label") == f"label{i}").sort("seed")["mean_reward"].to_numpy()
        for i in range(3)
    ]
    msw, var_means, icc = anova_by_hand(by_label)
    assert within["level"] == "seed_vs_label"
    assert within["var_seed"] == pytest.approx(msw, rel=1e-12)
    assert within["var_task_or_label"] == pytest.approx(var_means, rel=1e-12)
    assert within["icc"] == pytest.approx(icc, rel=1e-12)
    assert (within["n_seeds"], within["n_groups"]) == (5, 3)
    # Labels share the task mean here (only 0.2 sd of label noise) while seeds differ by
    # 0.7 sd: seeds differ more than labels.
    assert (
        within["ratio"] > 1 and within["ratio_ci_low"] <= within["ratio"] <= within["ratio_ci_high"]
    )


def test_ci_covers_the_true_ratio() -> None:
    """10 fixed tasks x 10 seeds x 4 labels, 100 repetitions of the seeds.

    The estimand, conditional on the task means mu: per-run values have variance
    v = sd_seed^2 + sd_label^2 / n_labels, the task means vary as var(mu) + v / n_seeds,
    so the true ratio is v / (var(mu) + v / n_seeds)."""
    rng = np.random.default_rng(2024)
    mu = rng.normal(0, 1.0, 10)
    sd_seed, sd_label, n_seeds, n_labels = 0.8, 0.3, 10, 4
    v = sd_seed**2 + sd_label**2 / n_labels
    true_ratio = v / (np.var(mu, ddof=1) + v / n_seeds)
    true_icc = np.var(mu, ddof=1) / (np.var(mu, ddof=1) + v)
    hits = icc_hits = 0
    for rep in range(100):
        out = variance_table(
            nested(rng, mu, n_seeds, sd_seed, sd_label, n_labels), n_boot=500, seed=rep
        )
        row = out.row(0, named=True)
        hits += row["ratio_ci_low"] <= true_ratio <= row["ratio_ci_high"]
        icc_hits += row["icc_ci_low"] <= true_icc <= row["icc_ci_high"]
    assert hits >= 90, hits
    assert icc_hits >= 85, icc_hits  # ICC: reported, looser bound


def test_single_seed_and_degenerate_designs_do_not_crash() -> None:
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
        out = variance_table(series_table(values), n_boot=500)
    across = out.row(0, named=True)
    assert "single-seed task(s) left out: solo" in across["reason"]
    assert across["n_tasks"] == 2 and math.isfinite(across["ratio"])
    solo = out.filter(pl.col("scope") == "within_task:solo").row(0, named=True)
    assert (
        math.isnan(solo["var_seed"])
        and math.isnan(solo["ratio"])
        and math.isnan(solo["ratio_ci_low"])
    )
    assert "1 seed" in solo["reason"]
    pair = out.filter(pl.col("scope") == "within_task:pair").row(0, named=True)
    assert "1 label" in pair["reason"] and math.isnan(pair["ratio"])
    assert math.isfinite(pair["var_seed"])

    only_one = variance_table(series_table({("t", 1, "a"): 1.0}), n_boot=500)
    assert math.isnan(only_one.row(0, named=True)["ratio"])
    assert only_one.row(0, named=True)["reason"]
    equal = variance_table(
        series_table(
            {("t1", 1, "a"): 1.0, ("t1", 2, "a"): 2.0, ("t2", 1, "a"): 2.0, ("t2", 2, "a"): 1.0}
        ),
        n_boot=500,
    )
    assert "all group means are equal" in equal.row(0, named=True)["reason"]


def test_bootstrap_is_seeded_and_nonfinite_values_are_ignored(rng: np.random.Generator) -> None:
    table = nested(rng, np.array([0.0, 1.0, 3.0]), 3, 0.5, 0.1, 2)
    a = variance_table(table, n_boot=500, seed=5)
    b = variance_table(table, n_boot=500, seed=5)
    assert a.equals(b)
    dirty = pl.concat([table, series_table({("task0", 9, "label0"): float("nan")})], how="vertical")
    assert variance_table(dirty, n_boot=500, seed=5).equals(a)
    epoch_only = table.with_columns(pl.lit("epoch").alias("granularity"))
    assert variance_table(epoch_only, n_boot=500, seed=5).drop("reason").equals(a.drop("reason"))
