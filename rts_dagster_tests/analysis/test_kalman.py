"""Local-level gain: Riccati fixed point, statsmodels MLE, estimator edge cases, and the
recommendation table and its sentences."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import polars as pl
import pytest

from rts_dagster.analysis.kalman import (
    METTA_MAIN_EMA_TIMESCALE,
    describe_recommendations,
    estimate_local_level,
    gain_to_variances,
    recommend_timescales,
    steady_state_gain,
)
from rts_dagster.schema import LOCAL_LEVEL, REWARD_STREAMS, TIMESCALE_RECOMMENDATIONS, conform

GAIN_RTOL_VS_STATSMODELS = 0.10  # observed: within 0.5% on these designs


def local_level(
    rng: np.random.Generator, n: int, q: float, r: float, level: float = 0.0
) -> np.ndarray:
    return level + np.cumsum(rng.normal(0, math.sqrt(q), n)) + rng.normal(0, math.sqrt(r), n)


def streams(
    parts: list[tuple[str, int, str, np.ndarray]], granularity: str = "completion"
) -> pl.DataFrame:
    frames = []
    for task, seed, label, y in parts:
        n = len(y)
        frames.append(
            pl.DataFrame(
                {
                    "task": [task] * n,
                    "seed": [seed] * n,
                    "run_id": [f"{task}.seed{seed}"] * n,
                    "label": [label] * n,
                    "granularity": [granularity] * n,
                    "sample_index": np.arange(n),
                    "agent_step": np.arange(n),
                    "epoch": np.zeros(n, dtype=np.int64),
                    "reward": y,
                    "sps": np.ones(n),
                    "is_stale": np.zeros(n, dtype=bool),
                }
            )
        )
    return conform(pl.concat(frames), REWARD_STREAMS)


def riccati_gain(q: float, r: float, iterations: int = 200_000) -> float:
    """Iterate P <- (P + q) - (P + q)^2 / (P + q + r) to its fixed point."""
    p = r
    for _ in range(iterations):
        prior = p + q
        new = prior - prior * prior / (prior + r)
        if abs(new - p) <= 1e-16 * max(p, 1e-300):
            p = new
            break
        p = new
    prior = p + q
    return prior / (prior + r)


@pytest.mark.parametrize(
    ("q", "r"), [(1e-6, 1.0), (1e-3, 0.5), (0.05, 1.0), (1.0, 1.0), (4.0, 0.01), (1e3, 1e-3)]
)
def test_gain_is_the_riccati_fixed_point(q: float, r: float) -> None:
    assert steady_state_gain(q, r) == pytest.approx(riccati_gain(q, r), rel=1e-9)
    s = q / r
    assert steady_state_gain(q, r) == pytest.approx((-s + math.sqrt(s * s + 4 * s)) / 2, rel=1e-6)
    gq, gr = gain_to_variances(steady_state_gain(q, r), 1.0)
    assert gq / gr == pytest.approx(s, rel=1e-9)


def test_gain_edge_values() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = steady_state_gain(
            np.array([0.0, 1.0, 0.0, -1.0, np.nan]), np.array([1.0, 0.0, 0.0, 1.0, 1.0])
        )
    assert got[0] == 0.0 and got[1] == 1.0
    assert np.isnan(got[2:]).all()


@pytest.mark.parametrize(("q", "r", "seed"), [(1e-2, 1.0, 0), (1e-3, 0.25, 1), (1.0, 1.0, 3)])
def test_gain_agrees_with_statsmodels_local_level(q: float, r: float, seed: int) -> None:
    """K from our estimator vs K from the q, r that statsmodels' exact MLE fits."""
    from statsmodels.tsa.statespace.structural import UnobservedComponents

    rng = np.random.default_rng(seed)
    y = local_level(rng, 5000, q, r, level=3.0)
    ours = estimate_local_level(streams([("t", 1, "l", y)])).row(0, named=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = UnobservedComponents(y, "local level").fit(disp=False)
    r_sm, q_sm = fit.params  # sigma2.irregular, sigma2.level
    k_sm = float(steady_state_gain(q_sm, r_sm))
    assert ours["gain"] == pytest.approx(k_sm, rel=GAIN_RTOL_VS_STATSMODELS)
    assert ours["gain"] == pytest.approx(float(steady_state_gain(q, r)), rel=0.2)
    assert ours["r"] == pytest.approx(r, rel=0.1)
    assert ours["timescale"] == pytest.approx(1.0 / ours["gain"])


def test_many_series_at_once_equal_one_at_a_time(rng: np.random.Generator) -> None:
    parts = [
        ("a", 1, "x", local_level(rng, 3000, 1e-3, 1.0, level=100.0)),
        ("a", 1, "y", local_level(rng, 50, 1e-2, 0.1, level=-5.0)),
        ("a", 2, "x", local_level(rng, 8000, 1e-4, 2.0)),
        ("b", 1, "x", local_level(rng, 700, 0.5, 0.5, level=1e3)),
    ]
    together = estimate_local_level(streams(parts))
    assert together.schema == LOCAL_LEVEL
    for part, row in zip(parts, together.iter_rows(named=True), strict=True):
        alone = estimate_local_level(streams([part])).row(0, named=True)
        for col in ("q", "r", "gain", "var_diff", "cov_diff_lag1"):
            assert row[col] == pytest.approx(alone[col], rel=1e-7), col


def test_estimator_edge_cases(rng: np.random.Generator) -> None:
    parts = [
        ("t", 1, "const", np.full(500, 0.4)),
        ("t", 1, "short", rng.normal(size=5)),
        ("t", 1, "white", rng.normal(size=4000)),  # q = 0: no drift
        ("t", 1, "walk", np.cumsum(rng.normal(size=4000))),  # r = 0: no noise
        ("t", 1, "nan", np.r_[local_level(rng, 300, 0.01, 1.0), np.nan, np.inf]),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = estimate_local_level(streams(parts))
    by = {r["label"]: r for r in out.iter_rows(named=True)}
    assert math.isnan(by["const"]["gain"]) and "constant" in by["const"]["note"]
    assert math.isnan(by["short"]["gain"]) and "fewer than" in by["short"]["note"]
    assert by["white"]["gain"] < 2e-3 and by["white"]["timescale"] <= 4000
    assert by["walk"]["gain"] > 0.95 and "no detectable observation noise" in by["walk"]["note"]
    assert by["nan"]["n_samples"] == 300 and math.isfinite(by["nan"]["gain"])


def recommendation_streams(rng: np.random.Generator, seeds: int = 4) -> pl.DataFrame:
    parts = []
    for seed in range(seeds):
        parts.append(("fixed_maps", seed, "quiet", local_level(rng, 4000, 1e-4, 0.01)))
        parts.append(("fixed_maps", seed, "noisy", local_level(rng, 4000, 1e-4, 0.04)))
        parts.append(("assembly", seed, "only", local_level(rng, 4000, 1e-3, 0.09)))
    return streams(parts)


def test_recommendations_and_sentences(rng: np.random.Generator) -> None:
    per_series = estimate_local_level(recommendation_streams(rng))
    table = recommend_timescales(per_series, {"ema_timescale": 0.01}, n_boot=1000, seed=0)
    assert table.schema == TIMESCALE_RECOMMENDATIONS
    fm = table.filter(pl.col("task") == "fixed_maps")
    assert sorted(fm["label"].to_list()) == ["*", "noisy", "quiet"]
    for row in table.iter_rows(named=True):
        assert row["timescale_ci_low"] <= row["timescale"] <= row["timescale_ci_high"]
        assert row["lp_timescale"] == pytest.approx(100.0)
        assert row["timescale_ratio"] == pytest.approx(row["timescale"] / 100.0)
        assert row["gain"] == pytest.approx(1.0 / row["timescale"])
    quiet = fm.filter(pl.col("label") == "quiet").row(0, named=True)
    noisy = fm.filter(pl.col("label") == "noisy").row(0, named=True)
    # Twice the noise sd, same drift: timescale ~ sqrt(r/q) is ~2x longer.
    assert noisy["noise_ratio"] == pytest.approx(2.0, rel=0.1)
    assert noisy["noise_ratio_ci_low"] < 2.0 < noisy["noise_ratio_ci_high"]
    assert noisy["reference_label"] == "quiet" and quiet["noise_ratio"] == pytest.approx(1.0)
    assert noisy["timescale_vs_reference"] == pytest.approx(2.0, rel=0.25)
    assert quiet["timescale"] == pytest.approx(1.0 / float(steady_state_gain(1e-4, 0.01)), rel=0.15)

    sentences = describe_recommendations(table)
    assert len(sentences) == 4  # 2 task summaries, noisy vs quiet label, task vs task
    label_sentence = next(x for x in sentences if x.startswith("fixed_maps/noisy is "))
    m = re.match(
        r"fixed_maps/noisy is ([\d.]+)x as noisy as fixed_maps/quiet "
        r"\(95% CI ([\d.]+)-([\d.]+)\): its EMA timescale should be ~([\d.]+)x longer\.",
        label_sentence,
    )
    assert m, label_sentence
    said = [float(v) for v in m.groups()]
    expected = [
        noisy[c]
        for c in (
            "noise_ratio",
            "noise_ratio_ci_low",
            "noise_ratio_ci_high",
            "timescale_vs_reference",
        )
    ]
    assert said == pytest.approx(expected, rel=0.05)
    pooled = table.filter((pl.col("task") == "assembly") & (pl.col("group") == "pooled")).row(
        0, named=True
    )
    summary = next(x for x in sentences if x.startswith("assembly: "))
    ts = float(re.search(r"timescale of ~([\d.,]+) completions", summary).group(1).replace(",", ""))
    assert ts == pytest.approx(pooled["timescale"], rel=0.05)
    factor = float(
        re.search(r"([\d.]+)x shorter than LP's 100 \(ema_timescale=0.01\)", summary).group(1)
    )
    assert factor == pytest.approx(100.0 / pooled["timescale"], rel=0.05)


def test_recommendations_default_lp_and_degenerate_inputs(rng: np.random.Generator) -> None:
    per_series = estimate_local_level(recommendation_streams(rng, seeds=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = recommend_timescales(per_series, None, n_boot=500)
    assert (table["lp_ema_timescale"] == METTA_MAIN_EMA_TIMESCALE).all()
    assert (table["lp_timescale"] == 1000.0).all()
    assert table["note"].str.contains("1 seed").all()
    assert describe_recommendations(table)  # numbers, even with one seed
    empty = recommend_timescales(per_series.clear(), None)
    assert empty.height == 0 and describe_recommendations(empty) == []
    by_task = recommend_timescales(
        per_series, None, {"assembly": {"ema_timescale": 0.1}}, n_boot=200
    )
    assert by_task.filter(pl.col("task") == "assembly")["lp_timescale"].to_list() == [10.0, 10.0]
