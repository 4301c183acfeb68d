"""Monte Carlo coverage of every interval kind at 3 seeds, on data with known truth.

Each check uses R = 4000 seeded, vectorised replications. At the true 95% coverage the
Monte Carlo standard error is sqrt(0.95 * 0.05 / 4000) = 0.0034, so the 0.93 threshold
sits 6 standard errors below nominal: an exact interval does not fail it by chance, and
an interval covering 90% or less (the percentile bootstrap at n = 3 covers ~75%) fails.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from rts_dagster.analysis import intervals as iv
from rts_dagster.analysis.variance import variance_table

R = 4000
SEEDS = 3
THRESHOLD = 0.93


def covered(low: np.ndarray, high: np.ndarray, truth: np.ndarray | float) -> float:
    return float(np.mean((low <= truth) & (truth <= high)))


def test_t_interval_of_a_mean_over_3_seeds() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 0.7, size=(R, SEEDS))
    _, low, high, n = iv.t_bounds(x)
    assert np.all(n == SEEDS)
    assert covered(low, high, 2.0) >= THRESHOLD


def test_paired_t_interval_over_3_pairs() -> None:
    rng = np.random.default_rng(2)
    seed_effect = rng.normal(0.0, 2.0, size=(R, SEEDS))  # shared by both arms of a pair
    a = seed_effect + 0.3 + rng.normal(0.0, 0.2, size=(R, SEEDS))
    b = seed_effect + rng.normal(0.0, 0.2, size=(R, SEEDS))
    _, low, high, _ = iv.t_bounds(a - b)
    assert covered(low, high, 0.3) >= THRESHOLD
    # Pairing matters here: the same data read as two unpaired means would give a far
    # wider interval (the seed effect is 10x the noise).
    assert np.median(high - low) < 0.2 * np.median(4 * seed_effect.std(axis=1, ddof=1))


def test_t_on_logs_for_lognormal_ratios() -> None:
    rng = np.random.default_rng(3)
    ratios = rng.lognormal(np.log(1.5), 0.8, size=(R, SEEDS))
    _, low, high, _ = iv.log_t_bounds(ratios)
    assert np.all(low > 0)
    assert covered(low, high, 1.5) >= THRESHOLD  # the true geometric mean


def test_selection_adjusted_t_covers_the_picked_configuration() -> None:
    """Pick the best of K = 15 configurations on the same 3 seeds; the Bonferroni interval
    must cover the winner's true mean. All configurations equal is the worst case for
    the winner's curse, so the true means are close together (0 to 0.1 sd apart)."""
    rng = np.random.default_rng(4)
    k = 15
    truth = np.linspace(0.0, 0.1, k)
    x = truth[None, :, None] + rng.normal(0.0, 1.0, size=(R, k, SEEDS))
    mean, low, high, _ = iv.t_bounds(x, iv.bonferroni_level(0.95, k))
    best = np.argmax(mean, axis=1)
    pick = np.arange(R)
    assert covered(low[pick, best], high[pick, best], truth[best]) >= THRESHOLD
    # The unadjusted t interval of the winner does not hold: the adjustment is needed.
    _, raw_low, raw_high, _ = iv.t_bounds(x)
    assert covered(raw_low[pick, best], raw_high[pick, best], truth[best]) < 0.90
    one = iv.selection_adjusted_t_interval(x[0, best[0]], k)
    assert (one.low, one.high) == (low[0, best[0]], high[0, best[0]])


def one_way_data(
    rng: np.random.Generator, groups: int, var_between: float, var_within: float
) -> np.ndarray:
    effect = rng.normal(0.0, np.sqrt(var_between), size=(R, groups, 1))
    return 5.0 + effect + rng.normal(0.0, np.sqrt(var_within), size=(R, groups, SEEDS))


def test_icc_ratio_and_variance_intervals_on_nested_normal_data() -> None:
    """3 tasks x 3 seeds and 10 labels x 3 seeds, one-way random effects, known components."""
    rng = np.random.default_rng(5)
    for groups, var_between, var_within in ((3, 1.0, 0.5), (10, 0.2, 0.6), (3, 0.05, 1.0)):
        x = one_way_data(rng, groups, var_between, var_within)
        ms = iv.one_way_anova(x)
        true_icc = var_between / (var_between + var_within)
        _, low, high = iv.icc_f_bounds(ms)
        assert covered(low, high, true_icc) >= THRESHOLD, (groups, "icc")
        _, low, high = iv.variance_ratio_f_bounds(ms)
        assert covered(low, high, var_within / var_between) >= THRESHOLD, (groups, "ratio")
        low, high = iv.chi2_variance_bounds(ms.within, ms.df_within)
        assert covered(low, high, var_within) >= THRESHOLD, (groups, "chi-square")


def test_no_bound_is_exactly_0_or_1_by_construction_with_3_seeds() -> None:
    """The old percentile bootstrap put ratio bounds at exactly 0 and ICC bounds at
    exactly 1 whenever a resample repeated one seed three times (11% of resamples)."""
    rng = np.random.default_rng(6)
    x = one_way_data(rng, 3, 5.0, 0.01)  # tasks far apart: ICC near 1, ratio near 0
    ms = iv.one_way_anova(x)
    _, icc_low, icc_high = iv.icc_f_bounds(ms)
    _, ratio_low, ratio_high = iv.variance_ratio_f_bounds(ms)
    seed_low, seed_high = iv.chi2_variance_bounds(ms.within, ms.df_within)
    assert np.all(icc_high < 1.0) and np.all(icc_low < icc_high)
    assert np.all(ratio_low > 0.0) and np.all(seed_low > 0.0)
    for bound in (icc_low, icc_high, ratio_low, ratio_high, seed_low, seed_high):
        assert not np.any((bound == 0.0) | (bound == 1.0))
    # And in the table itself.
    out = variance_table(nested_table(np.random.default_rng(7), var_task=5.0, var_run=0.01))
    across = out.row(0, named=True)
    assert across["ratio_ci_low"] > 0.0 and across["icc_ci_high"] < 1.0
    assert across["var_seed_ci_low"] > 0.0
    bounds = out.select(pl.col("^(ratio|icc|var_seed)_ci_(low|high)$")).to_numpy()
    assert np.isfinite(bounds[:, [0, 2, 4]]).all()  # every row has its intervals
    assert not np.isin(bounds, [0.0, 1.0]).any()


# --- The full variance_table on nested data with tasks drawn as random effects ----------
TASKS, LABELS = 3, 4
VAR_TASK, VAR_RUN, VAR_LABEL, VAR_NOISE = 0.5, 0.2, 0.3, 0.1


def nested_table(
    rng: np.random.Generator, var_task: float = VAR_TASK, var_run: float = VAR_RUN
) -> pl.DataFrame:
    """value(t, s, l) = task_t + run_ts + label_tl + noise_tsl, every effect random."""
    task = rng.normal(0.0, np.sqrt(var_task), size=(TASKS, 1, 1))
    run = rng.normal(0.0, np.sqrt(var_run), size=(TASKS, SEEDS, 1))
    label = rng.normal(0.0, np.sqrt(VAR_LABEL), size=(TASKS, 1, LABELS))
    noise = rng.normal(0.0, np.sqrt(VAR_NOISE), size=(TASKS, SEEDS, LABELS))
    value = (task + run + label + noise).ravel()
    t, s, lab = np.meshgrid(np.arange(TASKS), np.arange(SEEDS), np.arange(LABELS), indexing="ij")
    return pl.DataFrame(
        {
            "task": [f"task{i}" for i in t.ravel()],
            "seed": s.ravel(),
            "run_id": [f"task{i}.seed{j}" for i, j in zip(t.ravel(), s.ravel(), strict=True)],
            "label": [f"label{i}" for i in lab.ravel()],
            "granularity": "completion",
            "mean_reward": value,
        }
    )


def test_variance_table_coverage_with_random_tasks() -> None:
    """What the table prints, end to end. Across tasks, a run's value is the mean over its
    labels: between-task variance VAR_TASK + VAR_LABEL / L (a task's labels are its own),
    within-task VAR_RUN + VAR_NOISE / L. Within a task, the additive fit removes the run
    effect: the seed component is VAR_NOISE, the label component VAR_LABEL.

    300 replications (the table is built with polars per task, ~10 ms each): Monte Carlo
    standard error 0.0126 at 95%, so the 0.91 threshold is 3.2 standard errors below."""
    rng = np.random.default_rng(8)
    between = VAR_TASK + VAR_LABEL / LABELS
    within = VAR_RUN + VAR_NOISE / LABELS
    truth = {
        "across_tasks": (within / between, between / (between + within)),
        "within_task:task0": (VAR_NOISE / VAR_LABEL, VAR_LABEL / (VAR_LABEL + VAR_NOISE)),
    }
    reps = 300
    hits = {scope: np.zeros(2) for scope in truth}
    for _ in range(reps):
        out = variance_table(nested_table(rng))
        for scope, (ratio, icc) in truth.items():
            row = out.filter(pl.col("scope") == scope).row(0, named=True)
            hits[scope] += [
                row["ratio_ci_low"] <= ratio <= row["ratio_ci_high"],
                row["icc_ci_low"] <= icc <= row["icc_ci_high"],
            ]
    for scope, (ratio_hits, icc_hits) in hits.items():
        assert ratio_hits / reps >= 0.91, (scope, ratio_hits / reps)
        assert icc_hits / reps >= 0.91, (scope, icc_hits / reps)
