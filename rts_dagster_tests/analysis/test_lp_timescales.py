"""LP's own objective: closed forms of F - S vs a Monte Carlo of the two EMAs, the
direction the optimum moves, and the per-label / per-task table."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy.signal import lfilter

from rts_dagster.analysis.kalman import MIN_FIT_SAMPLES, estimate_local_level
from rts_dagster.analysis.lp_timescales import (
    EMA_GRID,
    METTA_DEFAULT_EMA,
    METTA_DEFAULT_SLOW_FACTOR,
    SLOW_FACTOR_GRID,
    best_pair,
    lp_separation_table,
    plateau_spread,
    ramp_separation,
    separation_score,
)
from rts_dagster.schema import LP_TIMESCALES, REWARD_STREAMS, conform


def ema(x: np.ndarray, w: float, start: np.ndarray | float) -> np.ndarray:
    """m_t = w x_t + (1 - w) m_{t-1} along the last axis, with m_{-1} = start."""
    zi = (1.0 - w) * np.broadcast_to(np.asarray(start, dtype=np.float64), x.shape[:-1])
    return lfilter([w], [1.0, -(1.0 - w)], x, axis=-1, zi=zi[..., None])[0]


@pytest.mark.parametrize(("a", "f"), [(0.01, 0.2), (0.05, 0.1), (0.002, 0.5)])
def test_ramp_separation_matches_monte_carlo(a: float, f: float) -> None:
    rng = np.random.default_rng(1)
    runs, steps, level, slope, sd = 2000, 800, 0.3, 1e-3, 0.2
    t = np.arange(1, steps + 1)
    x = level + slope * t + rng.normal(0, sd, (runs, steps))
    d = ema(x, a, level) - ema(x, a * f, level)
    mc_mean = d.mean(axis=0)
    mc_se = d.std(axis=0, ddof=1) / math.sqrt(runs)
    closed = ramp_separation(slope, t, a, a * f)
    assert np.all(np.abs(mc_mean - closed) < 4.5 * mc_se + 1e-12)
    check = [50, 200, 799]
    np.testing.assert_allclose(mc_mean[check], closed[check], rtol=0.1, atol=3e-4)


@pytest.mark.parametrize(("a", "f", "q"), [(0.02, 0.2, 0.0), (0.02, 0.2, 1e-5), (0.1, 0.05, 1e-4)])
def test_plateau_spread_matches_monte_carlo(a: float, f: float, q: float) -> None:
    rng = np.random.default_rng(2)
    runs, steps, sd = 400, 16000, 0.3
    x = np.cumsum(rng.normal(0, math.sqrt(q), (runs, steps)), axis=1)
    x += rng.normal(0, sd, (runs, steps))
    d = ema(x, a, x[:, 0]) - ema(x, a * f, x[:, 0])
    sample = d[:, 6000::500]  # after the slow EMA's burn-in, nearly independent points
    mc_sd = float(np.sqrt(np.mean(sample**2)))
    assert mc_sd == pytest.approx(float(plateau_spread(sd * sd, q, a, a * f)), rel=0.05)


def test_optimum_moves_the_right_way() -> None:
    slope, duration, r, q = 5e-4, 2000.0, 0.04, 1e-7
    a0, f0, _ = best_pair(slope, duration, r, q)
    a_noisy, _, _ = best_pair(slope, duration, 10 * r, q)
    a_short, _, _ = best_pair(slope * 4, duration / 4, r, q)  # same total gain, faster
    assert a_noisy < a0  # noisier plateau -> slower pair
    assert a_short > a0  # shorter learning phase -> faster pair
    assert EMA_GRID[0] < a0 < EMA_GRID[-1]
    # The grid optimum beats Metta's default and every other grid point.
    d_default = separation_score(
        slope, duration, r, q, METTA_DEFAULT_EMA, METTA_DEFAULT_SLOW_FACTOR
    )
    assert separation_score(slope, duration, r, q, a0, f0) >= d_default


def streams(
    parts: list[tuple[int, str, np.ndarray]], granularity: str = "completion"
) -> pl.DataFrame:
    frames = []
    for seed, label, y in parts:
        n = len(y)
        frames.append(
            pl.DataFrame(
                {
                    "task": "t",
                    "seed": seed,
                    "run_id": f"t.seed{seed}",
                    "label": label,
                    "granularity": granularity,
                    "sample_index": np.arange(n),
                    "agent_step": np.arange(n),
                    "epoch": 0,
                    "reward": y,
                    "sps": 1.0,
                    "is_stale": False,
                }
            )
        )
    return conform(pl.concat(frames), REWARD_STREAMS)


def curve(rng: np.random.Generator, knee: int, sd: float, n: int = 6000) -> np.ndarray:
    level = np.r_[np.linspace(0.0, 0.6, knee), np.full(n - knee, 0.6)]
    return level + np.cumsum(rng.normal(0, 1e-3, n)) + rng.normal(0, sd, n)


def test_table_per_label_task_and_seed() -> None:
    rng = np.random.default_rng(3)
    parts = [
        (s, lab, curve(rng, knee, sd))
        for s in range(3)
        for lab, knee, sd in (("quick", 800, 0.2), ("slow", 2500, 0.5))
    ]
    parts.append((0, "epochs", curve(rng, 800, 0.2)))  # epoch rows: not used
    ll = estimate_local_level(pl.concat([streams(parts[:-1]), streams(parts[-1:], "epoch")]))
    table = lp_separation_table(ll)
    assert table.schema == LP_TIMESCALES
    assert "epochs" not in table["label"].to_list()
    pooled = {
        r["label"]: r for r in table.filter(pl.col("scope") == "pooled").iter_rows(named=True)
    }
    assert set(pooled) == {"quick", "slow", "*"} and pooled["*"]["n_labels"] == 2
    assert pooled["quick"]["best_ema_timescale"] > pooled["slow"]["best_ema_timescale"]
    # Seed rows: default score from that seed's measured inputs (independent recomputation).
    for row in table.filter((pl.col("scope") == "seed") & (pl.col("label") != "*")).iter_rows(
        named=True
    ):
        mine = ll.filter((pl.col("seed") == row["seed"]) & (pl.col("label") == row["label"]))
        plat = mine.filter(pl.col("regime") == "plateau").row(0, named=True)
        learn = mine.filter(pl.col("regime") == "learning").row(0, named=True)
        if plat["at_bound"]:  # left out, as recommend_timescales does
            assert row["best_score"] is None and row["n_excluded"] == 1
            continue
        expected = separation_score(
            learn["trend_slope"],
            learn["n_samples"],
            plat["r"],
            plat["q"],
            METTA_DEFAULT_EMA,
            METTA_DEFAULT_SLOW_FACTOR,
        )
        assert row["default_score"] == pytest.approx(float(expected), rel=1e-9)
        assert row["t_eval"] == pytest.approx(learn["n_samples"] / 2)
        a, f, best = best_pair(learn["trend_slope"], learn["n_samples"], plat["r"], plat["q"])
        assert (row["best_ema_timescale"], row["best_slow_factor"]) == pytest.approx((a, f))
        assert row["best_score"] == pytest.approx(best, rel=1e-9)
        # Leave-one-seed-out: never better than the in-sample best on this seed.
        assert row["loo_score"] <= row["best_score"] * (1 + 1e-12)
        assert row["loo_ratio"] == pytest.approx(row["loo_score"] / row["default_score"])
    assert table.filter(pl.col("scope") == "seed").height == 9  # 3 seeds x (2 labels + "*")


def test_units_without_a_plateau_are_left_out_with_a_reason() -> None:
    rng = np.random.default_rng(4)
    ramp = np.linspace(0, 1, 3000) + rng.normal(0, 0.05, 3000)  # learning only
    table = lp_separation_table(estimate_local_level(streams([(1, "ramp", ramp)])))
    # label and task rows, pooled and per seed: all with nulls, the count and the reason
    assert table.height == 4 and table["note"].str.contains("left out: ").all()
    assert table["best_score"].is_null().all()
    assert (table["n_excluded"] == 1).all() and (table["n_seeds"] == 0).all()
    assert (table["excluded_reason"] == "1 no plateau regime").all()


def test_fits_kalman_rejects_are_left_out_and_counted() -> None:
    """A plateau fit flagged at_bound and a learning regime shorter than MIN_FIT_SAMPLES
    leave their units out (as recommend_timescales does); the pooled score is the one of
    the remaining units, recomputed independently."""
    rng = np.random.default_rng(5)
    parts = [(s, lab, curve(rng, 800, 0.2)) for s in range(3) for lab in ("a", "b")]
    ll = estimate_local_level(streams(parts))
    bound = (pl.col("seed") == 0) & (pl.col("label") == "a") & (pl.col("regime") == "plateau")
    short = (pl.col("seed") == 1) & (pl.col("label") == "b") & (pl.col("regime") == "learning")
    assert not ll.filter(bound)["at_bound"].any()
    ll = ll.with_columns(
        pl.when(bound).then(True).otherwise(pl.col("at_bound")).alias("at_bound"),
        pl.when(short).then(MIN_FIT_SAMPLES - 1).otherwise(pl.col("n_samples")).alias("n_samples"),
    )
    table = lp_separation_table(ll)
    task = table.filter((pl.col("label") == "*") & (pl.col("scope") == "pooled")).row(0, named=True)
    assert task["n_excluded"] == 2 and task["n_seeds"] == 3 and task["n_labels"] == 2
    assert "1 plateau gain at a grid bound" in task["excluded_reason"]
    assert (
        f"1 learning regime shorter than {MIN_FIT_SAMPLES} completions" in task["excluded_reason"]
    )
    assert "2 of 6 units left out" in task["note"]
    # independent: mean log d' over the 4 kept units at Metta's default
    kept = []
    for s, lab in ((0, "b"), (1, "a"), (2, "a"), (2, "b")):
        mine = ll.filter((pl.col("seed") == s) & (pl.col("label") == lab))
        plat = mine.filter(pl.col("regime") == "plateau").row(0, named=True)
        learn = mine.filter(pl.col("regime") == "learning").row(0, named=True)
        kept.append(
            math.log(
                separation_score(
                    learn["trend_slope"],
                    learn["n_samples"],
                    plat["r"],
                    plat["q"],
                    METTA_DEFAULT_EMA,
                    METTA_DEFAULT_SLOW_FACTOR,
                )
            )
        )
    assert task["default_score"] == pytest.approx(math.exp(np.mean(kept)), rel=1e-9)
    a = table.filter((pl.col("label") == "a") & (pl.col("scope") == "pooled")).row(0, named=True)
    assert a["n_excluded"] == 1 and a["n_seeds"] == 2
    seed0a = table.filter(
        (pl.col("label") == "a") & (pl.col("scope") == "seed") & (pl.col("seed") == 0)
    ).row(0, named=True)
    assert seed0a["best_score"] is None and seed0a["note"].startswith("left out: ")
    assert table["score_method"].str.contains("closed-form d'").all()
    assert table["score_method"].str.contains("not measured on the stream").all()


def test_slow_factor_limit_is_finite_and_the_grid_reaches_it() -> None:
    """As f -> 1 both E[F - S] and sd(F - S) shrink like (1 - f): d' tends to a finite
    positive limit, checked against direct sums of the EMA impulse responses (not the
    closed forms), so the grid runs to f = 0.99 and `limit_score` reports the limit."""
    slope, duration, r, q, a = 5e-4, 2000.0, 0.04, 1e-7, 0.005
    k = np.arange(200000)

    def direct(f: float) -> float:
        b = a * f
        h = a * (1 - a) ** k - b * (1 - b) ** k  # impulse response of F - S
        t = duration / 2.0
        ramp = slope * np.sum(h[: int(t)] * (t - k[: int(t)]))  # response to s * t
        g = np.cumsum(h)  # response to one random-walk step
        return abs(ramp) / math.sqrt(r * np.sum(h * h) + q * np.sum(g[1:] ** 2))

    for f in (0.5, 0.9, 0.999):
        closed = float(separation_score(slope, duration, r, q, a, f))
        assert closed == pytest.approx(direct(f), rel=1e-3)
    near = [float(separation_score(slope, duration, r, q, a, 1 - e)) for e in (1e-3, 1e-5, 1e-6)]
    assert near[0] > 0 and near[1] == pytest.approx(near[2], rel=1e-3)
    assert near[2] == pytest.approx(direct(0.999), rel=2e-3)  # no fall towards 0
    assert SLOW_FACTOR_GRID.max() == pytest.approx(0.99) and SLOW_FACTOR_GRID.min() == 0.05
    # The table reports the limit and flags an optimum on the f edge.
    rng = np.random.default_rng(6)
    parts = [(s, "x", curve(rng, 800, 0.2)) for s in range(2)]
    ll = estimate_local_level(streams(parts))
    row = lp_separation_table(ll).filter(pl.col("scope") == "pooled").row(0, named=True)
    mine = [ll.filter(pl.col("seed") == s) for s in range(2)]
    limit = np.mean(
        [
            np.log(
                separation_score(
                    m.filter(pl.col("regime") == "learning")["trend_slope"][0],
                    m.filter(pl.col("regime") == "learning")["n_samples"][0],
                    m.filter(pl.col("regime") == "plateau")["r"][0],
                    m.filter(pl.col("regime") == "plateau")["q"][0],
                    EMA_GRID,
                    1 - 1e-6,
                )
            )
            for m in mine
        ],
        axis=0,
    ).max()
    assert row["limit_score"] == pytest.approx(math.exp(limit), rel=1e-9)
    on_f_edge = row["best_slow_factor"] in (SLOW_FACTOR_GRID[0], SLOW_FACTOR_GRID[-1])
    assert row["best_on_grid_edge"] == (
        on_f_edge or row["best_ema_timescale"] in (EMA_GRID[0], EMA_GRID[-1])
    )
    if on_f_edge:
        assert "slow_timescale_factor grid edge" in row["note"]
