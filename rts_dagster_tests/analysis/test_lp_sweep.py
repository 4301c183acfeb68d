"""The experiments matrix: default sweep, replay input, summaries, recommendation rule,
closed-loop comparison. Expected numbers come from scipy or from the rule by hand."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats

from rts_dagster.analysis.lp_sweep import (
    METTA_DEFAULT,
    closed_loop_candidates,
    default_sweep,
    recommend,
    replay_stream,
    summarise_closed_loop,
    summarise_sweep,
    sweep_run,
    t_interval,
)
from rts_dagster.schema import LP_CLOSED_LOOP, LP_REPLAY_METRICS, REWARD_STREAMS, conform


def test_default_sweep_covers_the_study_plan() -> None:
    configs = {c.name: c for c in default_sweep(10)}
    assert METTA_DEFAULT in configs and configs[METTA_DEFAULT].main.ema_timescale == 0.001
    emas = {c.main.ema_timescale for c in configs.values() if c.variant == "main"}
    assert {0.0003, 0.001, 0.003, 0.006, 0.01, 0.03} <= emas
    zs = {c.zscore.z_score_amplification for c in configs.values() if c.variant == "zscore"}
    assert zs == {10.0, 20.0, 30.0}
    assert configs["zscore_z30_to_10"].z_anneal == (30.0, 10.0)
    factors = {c.main.slow_timescale_factor for c in configs.values() if c.variant == "main"}
    assert {0.05, 0.2, 0.5} <= factors
    assert any(c.pool_cap for c in configs.values())
    assert any(c.sps_weight > 0 for c in configs.values())
    assert len(configs) == len(default_sweep(10))  # names are unique
    assert not any(c.pool_cap for c in default_sweep(2))  # a cap needs a pool to cut


def test_t_interval_matches_scipy() -> None:
    values = np.array([0.3, 0.5, 0.9, 0.4])
    mean, low, high = t_interval(values)
    ref = stats.t.interval(0.95, 3, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean())
    assert (low, high) == pytest.approx(ref)
    assert math.isnan(t_interval(np.array([1.0]))[1])
    assert t_interval(np.array([1.0, np.nan, 3.0]))[0] == 2.0


def _streams(granularity: str) -> pl.DataFrame:
    rows = []
    for i, (label, step, reward, stale) in enumerate(
        [
            ("b", 100, 0.2, False),
            ("a", 100, 0.1, False),
            ("a", 200, 0.1, True),  # a stale re-emission
            ("b", 300, float("nan"), False),
            ("a", 400, 0.7, False),
        ]
    ):
        rows.append(
            {
                "task": "t",
                "seed": 1,
                "run_id": "r",
                "label": label,
                "granularity": granularity,
                "sample_index": i,
                "agent_step": step,
                "epoch": step // 100,
                "reward": reward,
                "sps": 1000.0 + step,
                "is_stale": stale if granularity == "epoch" else False,
            }
        )
    return conform(pl.DataFrame(rows), REWARD_STREAMS)


def test_replay_stream_prefers_completions_and_drops_stale_epochs() -> None:
    epoch = replay_stream(_streams("epoch"))
    assert epoch.granularity == "epoch" and epoch.labels == ("a", "b")
    # stale row dropped, NaN dropped (counted), ties on agent_step broken by label
    assert epoch.label_index.tolist() == [0, 1, 0]
    assert epoch.reward.tolist() == [0.1, 0.2, 0.7]
    assert epoch.sps.tolist() == [1100.0, 1100.0, 1400.0]
    assert epoch.n_dropped == 1
    both = pl.concat([_streams("epoch"), _streams("completion")])
    completion = replay_stream(both)
    assert completion.granularity == "completion" and completion.reward.size == 4
    with pytest.raises(ValueError, match="no finite epoch rewards"):
        replay_stream(_streams("epoch").with_columns(pl.lit(float("nan")).alias("reward")))
    # completion rows without one finite reward: the epoch means are replayed instead
    broken = _streams("completion").with_columns(pl.lit(float("nan")).alias("reward"))
    fallback = replay_stream(pl.concat([_streams("epoch"), broken]))
    assert fallback.granularity == "epoch" and fallback.reward.size == 3


def test_sweep_run_tables() -> None:
    rng = np.random.default_rng(3)
    n, n_labels = 3000, 5
    labels = rng.integers(0, n_labels, n)
    k = np.arange(n) / n
    reward = np.clip(np.where(labels < 2, k, 0.4) + rng.normal(0, 0.1, n), 0, 1)
    streams = conform(
        pl.DataFrame(
            {
                "task": "t",
                "seed": 4,
                "run_id": "r",
                "label": [f"L{i}" for i in labels],
                "granularity": "completion",
                "sample_index": np.arange(n),
                "agent_step": np.arange(n) * 10,
                "epoch": np.arange(n) // 100,
                "reward": reward,
                "sps": 5000.0,
                "is_stale": False,
            }
        ),
        REWARD_STREAMS,
    )
    stream = replay_stream(streams)
    configs = default_sweep(n_labels)
    metrics, trace = sweep_run(stream, configs, task="t", seed=4, run_id="r", n_eval=50)
    assert metrics.schema == LP_REPLAY_METRICS and metrics.height == len(configs)
    assert trace.height == len(configs) * 50 * n_labels
    sums = trace.group_by("config", "eval_index").agg(pl.col("probability").sum())
    np.testing.assert_allclose(sums["probability"].to_numpy(), 1.0, atol=1e-12)
    # labels L0, L1 rise over the run: every configuration sees improving labels
    assert (metrics["improving_fraction"] > 0).all()
    assert metrics.filter(pl.col("config") == METTA_DEFAULT)["pole_fraction"].item() >= 0


def _metrics(rows: list[tuple[str, int, float, float, float, float]]) -> pl.DataFrame:
    """(config, seed, lp_snr, lag_median, churn_plateau, starved_fraction) rows of one task."""
    configs = {c.name: c for c in default_sweep(10)}
    out = []
    for name, seed, snr, lag, churn, starved in rows:
        settings = (
            configs[name].settings() if name in configs else configs[METTA_DEFAULT].settings()
        )
        out.append(
            {
                "task": "t",
                "seed": seed,
                "run_id": f"r{seed}",
                "granularity": "completion",
                "config": name,
                **settings,
                "n_completions": 100,
                "n_labels": 10,
                "gini_mean": 0.1,
                "entropy_mean": 0.9,
                "lp_snr": snr,
                "improving_mass": 0.1,
                "improving_fraction": 0.1,
                "plateaued_fraction": 0.5,
                "lag_median": lag,
                "lag_censored": 0.0,
                "n_improving_events": 3,
                "churn_plateau": churn,
                "starved_fraction": starved,
                "pole_fraction": 0.0,
                "top_k": 3,
            }
        )
    return conform(pl.DataFrame(out), LP_REPLAY_METRICS)


def test_recommendation_rule() -> None:
    snr_default = [1.0, 1.2, 0.8]
    ratios_a = [2.0, 1.5, 2.5]  # eligible: same lag, same churn
    rows = []
    for seed, base in enumerate(snr_default, 1):
        rows.append((METTA_DEFAULT, seed, base, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, base * ratios_a[seed - 1], 120.0, 0.12, 0.0))
        rows.append(("main_ema_0.1", seed, base * 10, 100.0, 2.0, 0.0))  # 20x churn
        rows.append(("zscore_z10", seed, base * 50, 100.0, 0.1, 0.5))  # starves half
        rows.append(("main_ema_0.03", seed, base * 3, 400.0, 0.1, 0.0))  # 4x slower
    recs = recommend(_metrics(rows))
    row = recs.row(0, named=True)
    assert row["config"] == "main_ema_0.006" and row["replay_best"] == "zscore_z10"
    logs = np.log(ratios_a)
    low, high = stats.t.interval(0.95, 2, loc=logs.mean(), scale=stats.sem(logs))
    assert row["snr_ratio"] == pytest.approx(math.exp(logs.mean()))
    assert (row["snr_ratio_ci_low"], row["snr_ratio_ci_high"]) == pytest.approx(
        (math.exp(low), math.exp(high))
    )
    assert row["confident"] is True and row["n_seeds"] == 3
    assert row["lag_recommended"] == 120.0 and row["lag_default"] == 100.0
    assert "main_ema_0.006" in row["sentence"] and "clear improvement" in row["sentence"]


def test_default_is_kept_when_nothing_eligible_is_better() -> None:
    rows = []
    for seed in (1, 2, 3):
        rows.append((METTA_DEFAULT, seed, 1.0, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, 0.9, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.1", seed, 5.0, 100.0, 1.0, 0.0))
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == METTA_DEFAULT and row["snr_ratio"] == 1.0
    assert row["confident"] is False and row["replay_best"] == "main_ema_0.1"
    assert "keep Metta's default" in row["sentence"]


def test_infinite_default_lag_accepts_any_lag_but_not_the_reverse() -> None:
    rows = []
    for seed in (1, 2):
        rows.append((METTA_DEFAULT, seed, 1.0, math.inf, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, 1.5, 5000.0, 0.1, 0.0))
    assert recommend(_metrics(rows))["config"].item() == "main_ema_0.006"
    rows = []
    for seed in (1, 2):
        rows.append((METTA_DEFAULT, seed, 1.0, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, 1.5, math.inf, 0.1, 0.0))
    assert recommend(_metrics(rows))["config"].item() == METTA_DEFAULT


def test_sweep_summary_pairs_by_seed() -> None:
    rows = [(METTA_DEFAULT, s, b, 100.0, 0.1, 0.0) for s, b in ((1, 1.0), (2, 2.0))]
    rows += [("main_ema_0.006", 1, 3.0, 90.0, 0.2, 0.0), ("main_ema_0.006", 2, 4.0, 70.0, 0.2, 0.0)]
    summary = summarise_sweep(_metrics(rows))
    snr = summary.filter((pl.col("config") == "main_ema_0.006") & (pl.col("metric") == "lp_snr"))
    logs = np.log([3.0, 4.0 / 2.0])
    assert snr["diff_vs_default"].item() == pytest.approx(logs.mean())
    assert snr["mean"].item() == pytest.approx(math.sqrt(3.0 * 4.0))  # geometric mean
    lag = summary.filter(
        (pl.col("config") == "main_ema_0.006") & (pl.col("metric") == "lag_median")
    )
    assert lag["diff_vs_default"].item() == pytest.approx(-20.0)
    assert lag["mean"].item() == pytest.approx(80.0)


def test_closed_loop_summary_by_hand() -> None:
    recs = pl.DataFrame(
        {
            "task": ["t", "u"],
            "config": ["main_ema_0.006", METTA_DEFAULT],
            "replay_best": ["zscore_z10", "x"],
        }
    )
    candidates = closed_loop_candidates(recs)
    assert candidates == {
        "t": [("main_ema_0.006", "recommended"), ("zscore_z10", "replay_best")],
        "u": [("x", "replay_best")],
    }
    replayed = pl.DataFrame(
        {
            "task": ["u", "t", "t"],
            "config": ["kalman_matched", "other", "kalman_matched"],
            "granularity": ["completion", "completion", "epoch"],
        }
    )
    with_matched = closed_loop_candidates(recs, replayed)
    assert with_matched["u"] == [("x", "replay_best"), ("kalman_matched", "local_level_gain")]
    # a gain measured on epoch means is not a per-completion EMA weight: not simulated
    assert with_matched["t"] == candidates["t"]
    rows = []
    for seed, (d, c) in enumerate([(100, 90), (120, 100), (300, 300)], 1):
        rows.append(("t", METTA_DEFAULT, "k0", seed, 300, float(d), d < 300, 0.5, 0.6))
        rows.append(("t", "main_ema_0.006", "k1", seed, 300, float(c), c < 300, 0.55, 0.62))
    outcomes = conform(
        pl.DataFrame(rows, schema=list(LP_CLOSED_LOOP.names()), orient="row"), LP_CLOSED_LOOP
    )
    summary = summarise_closed_loop(outcomes, {"t": [("main_ema_0.006", "recommended")]})
    ttc = summary.filter(pl.col("metric") == "time_to_competence").row(0, named=True)
    diffs = np.array([-10.0, -20.0, 0.0])
    low, high = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
    assert ttc["diff"] == pytest.approx(-10.0)
    assert (ttc["diff_ci_low"], ttc["diff_ci_high"]) == pytest.approx((low, high))
    assert ttc["n_censored"] == 2  # seed 3 never reached competence in either run
    assert ttc["role"] == "recommended" and ttc["n_seeds"] == 3
    final = summary.filter(pl.col("metric") == "final_reward")["diff"].item()
    assert final == pytest.approx(0.05)


def test_summary_of_many_configurations_keeps_late_settings() -> None:
    """A column null in the first 100+ rows (pool_cap of a task without a cap) and set
    later must not break building the table (polars infers types from early rows)."""
    rows = []
    for task, n_labels in (("a_two_labels", 2), ("b_ten_labels", 10)):
        for config in default_sweep(n_labels):
            for seed in (1, 2):
                rows.append((task, config.name, seed))
    frame = _metrics([(name, seed, 1.0 + seed, 10.0, 0.1, 0.0) for _, name, seed in rows])
    frame = frame.with_columns(pl.Series("task", [task for task, _, _ in rows]))
    capped = [c for c in default_sweep(10) if c.pool_cap]
    settings = pl.DataFrame([c.settings() | {"config": c.name} for c in capped])
    frame = frame.update(settings.select("config", "pool_cap"), on="config")
    summary = summarise_sweep(frame)
    assert summary.height > 100
    caps = summary.filter(pl.col("pool_cap").is_not_null())["pool_cap"].unique().to_list()
    assert caps == [capped[0].pool_cap]
    assert recommend(frame).height == 2


def test_matched_gain_recovers_a_known_local_level() -> None:
    """Random walk (step sd 0.02) + noise (sd 0.2) on 3 labels: the matched EMA weight is
    the steady-state Kalman gain of (q, r), and the sweep replays LP at that weight."""
    from rts_dagster.analysis.kalman import steady_state_gain

    rng = np.random.default_rng(11)
    q, r, n = 0.02**2, 0.2**2, 6000
    frames = []
    for label in ("a", "b", "c"):
        level = 0.5 + np.cumsum(rng.normal(0, math.sqrt(q), n))
        frames.append(
            pl.DataFrame(
                {
                    "task": "t",
                    "seed": 1,
                    "run_id": "r",
                    "label": label,
                    "granularity": "completion",
                    "sample_index": np.arange(n),
                    "agent_step": np.arange(n),
                    "epoch": 0,
                    "reward": level + rng.normal(0, math.sqrt(r), n),
                    "sps": 1.0,
                    "is_stale": False,
                }
            )
        )
    streams = conform(pl.concat(frames), REWARD_STREAMS)
    from rts_dagster.analysis.lp_sweep import KALMAN_MATCHED, matched_gain

    gain = matched_gain(streams, "completion")
    truth = float(steady_state_gain(q, r))
    assert gain == pytest.approx(truth, rel=0.2)
    assert matched_gain(streams, "epoch") is None  # no epoch rows
    configs = {c.name: c for c in default_sweep(3, matched_gain=gain)}
    assert configs[KALMAN_MATCHED].main.ema_timescale == gain
    assert KALMAN_MATCHED not in {c.name for c in default_sweep(3)}


def test_a_run_without_snr_drops_out_of_the_pairs() -> None:
    rows = []
    for seed, snr in ((1, 1.0), (2, 1.2), (3, float("nan"))):
        rows.append((METTA_DEFAULT, seed, snr, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, 2 * snr, 100.0, 0.1, 0.0))
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == "main_ema_0.006" and row["snr_ratio"] == pytest.approx(2.0)
    assert (row["n_seeds"], row["n_runs"], row["n_pairs"]) == (3, 3, 2)


def test_default_alone_says_so() -> None:
    row = recommend(_metrics([(METTA_DEFAULT, s, 1.0, 10.0, 0.1, 0.0) for s in (1, 2)])).row(
        0, named=True
    )
    assert row["config"] == METTA_DEFAULT and row["replay_best"] is None
    assert "no other configuration replayed a higher ratio" in row["sentence"]


def test_two_runs_of_one_seed_are_two_pairs() -> None:
    ratios = {"r1": 2.0, "r1b": 1.5, "r2": 2.5}
    rows = []
    for run_id, ratio in ratios.items():
        rows.append((METTA_DEFAULT, 1 if run_id.startswith("r1") else 2, 1.0, 10.0, 0.1, 0.0))
        rows.append(("main_ema_0.006", 1 if run_id.startswith("r1") else 2, ratio, 10.0, 0.1, 0.0))
    frame = _metrics(rows).with_columns(pl.Series("run_id", [r for r in ratios for _ in (0, 1)]))
    row = recommend(frame).row(0, named=True)
    logs = np.log(list(ratios.values()))
    assert row["snr_ratio"] == pytest.approx(math.exp(logs.mean()))
    low, high = stats.t.interval(0.95, 2, loc=logs.mean(), scale=stats.sem(logs))
    assert (row["snr_ratio_ci_low"], row["snr_ratio_ci_high"]) == pytest.approx(
        (math.exp(low), math.exp(high))
    )
    assert (row["n_seeds"], row["n_runs"], row["n_pairs"]) == (2, 3, 3)


def test_an_uncertain_winner_is_not_advised_as_a_change() -> None:
    rows = []
    for seed, ratio in ((1, 3.0), (2, 0.5), (3, 2.0)):  # log CI spans 0
        rows.append((METTA_DEFAULT, seed, 1.0, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, ratio, 100.0, 0.1, 0.0))
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == "main_ema_0.006" and row["confident"] is False
    assert row["snr_ratio_ci_low"] < 1 < row["snr_ratio_ci_high"]
    assert "not yet a safe change" in row["sentence"] and "use " not in row["sentence"]
