"""The experiments matrix: default sweep, replay input, summaries, recommendation rule,
closed-loop comparison. Expected numbers come from scipy or from the rule by hand."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats

from rts_dagster.analysis.intervals import t_bounds
from rts_dagster.analysis.lp_sweep import (
    KALMAN_MATCHED,
    METTA_DEFAULT,
    closed_loop_candidates,
    default_sweep,
    recommend,
    replay_stream,
    summarise_closed_loop,
    summarise_sweep,
    sweep_run,
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


def _frame(columns: dict) -> pl.DataFrame:
    """LP_REPLAY_METRICS rows from column arrays (task, config, seed, lp_snr, lag_median,
    churn_plateau, starved_fraction; optional run_id, granularity); other columns fixed,
    settings of Metta's default (the rule does not read them)."""
    n = len(columns["config"])
    settings = {c.name: c for c in default_sweep(10)}[METTA_DEFAULT].settings()
    base = {
        "task": ["t"] * n,
        "granularity": ["completion"] * n,
        **{k: [v] * n for k, v in settings.items() if k != "config"},
        "n_completions": [100] * n,
        "n_labels": [10] * n,
        "gini_mean": [0.1] * n,
        "entropy_mean": [0.9] * n,
        "improving_mass": [0.1] * n,
        "improving_fraction": [0.1] * n,
        "plateaued_fraction": [0.5] * n,
        "lag_censored": [0.0] * n,
        "n_improving_events": [3] * n,
        "pole_fraction": [0.0] * n,
        "top_k": [3] * n,
    }
    frame = pl.DataFrame({**base, **{k: list(v) for k, v in columns.items()}})
    if "run_id" not in frame.columns:
        frame = frame.with_columns(pl.format("r{}", "seed").alias("run_id"))
    return conform(frame, LP_REPLAY_METRICS)


def _metrics(rows: list[tuple], granularity: str = "completion") -> pl.DataFrame:
    """(config, seed, lp_snr, lag_median, churn_plateau, starved_fraction) rows of task t."""
    names = ("config", "seed", "lp_snr", "lag_median", "churn_plateau", "starved_fraction")
    columns = {name: [r[i] for r in rows] for i, name in enumerate(names)}
    frame = _frame({**columns, "granularity": [granularity] * len(rows)})
    configs = {c.name: c for c in default_sweep(10)}
    settings = pl.DataFrame(
        [
            {"config": c.name, **c.settings()}
            for c in configs.values()
            if c.name in set(columns["config"])
        ],
        infer_schema_length=None,
    )
    if settings.height:  # the sweep's own settings for the names it has
        frame = frame.update(settings, on="config")
    return conform(frame, LP_REPLAY_METRICS)


def _bonferroni(values, k: int) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    low, high = stats.t.interval(
        1 - 0.05 / k, values.size - 1, loc=values.mean(), scale=stats.sem(values)
    )
    return math.exp(low), math.exp(high)


def test_recommendation_rule() -> None:
    snr_default = [1.5, 1.6, 1.4]
    ratios_a = [2.0, 2.1, 1.9]  # eligible: lag and churn within the guards
    rows = []
    for seed, base in enumerate(snr_default, 1):
        rows.append((METTA_DEFAULT, seed, base, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, base * ratios_a[seed - 1], 120.0, 0.12, 0.0))
        rows.append(("main_ema_0.1", seed, base * 10, 100.0, 2.0, 0.0))  # 20x churn
        rows.append(("zscore_z10", seed, base * 50, 100.0, 0.1, 0.5))  # starves half
        rows.append(("main_ema_0.03", seed, base * 3, 400.0, 0.1, 0.0))  # 4x slower
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == "main_ema_0.006" and row["replay_best"] == "zscore_z10"
    assert row["n_compared"] == 4 and row["ci_method"] == "t, Bonferroni over 4"
    logs = np.log(ratios_a)
    assert row["snr_ratio"] == pytest.approx(math.exp(logs.mean()))
    assert (row["snr_ratio_ci_low"], row["snr_ratio_ci_high"]) == pytest.approx(
        _bonferroni(logs, 4)
    )
    own = np.log(np.array(snr_default) * ratios_a)  # its own SNR: 95% t on logs
    low, high = stats.t.interval(0.95, 2, loc=own.mean(), scale=stats.sem(own))
    assert (row["signal_ci_low"], row["signal_ci_high"]) == pytest.approx(
        (math.exp(low), math.exp(high))
    )
    assert row["signal_ci_method"] == "t on logs" and row["signal_n"] == 3
    assert row["confident"] is True and row["actionable"] is True and row["guards_passed"]
    assert (row["n_seeds"], row["n_pairs"], row["runs"]) == (3, 3, ["r1", "r2", "r3"])
    assert row["lag_recommended"] == 120.0 and row["lag_default"] == 100.0
    assert "starved fraction" in row["replay_best_reason"]
    assert [r.split(":")[0] for r in row["rejected"]] == [
        "zscore_z10",
        "main_ema_0.1",
        "main_ema_0.03",
    ]
    assert "plateau churn" in row["rejected"][1] and "response lag" in row["rejected"][2]
    sentence = row["sentence"]
    assert "main_ema_0.006" in sentence and "95% t, Bonferroni over 4 interval, n=3" in sentence
    assert "use " not in sentence and "keep" not in sentence  # evidence, not advice


def test_no_configuration_passing_leaves_the_default_in_the_row() -> None:
    rows = []
    for seed in (1, 2, 3):
        rows.append((METTA_DEFAULT, seed, 1.0 + 0.1 * seed, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, 0.9, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.1", seed, 5.0 + seed, 100.0, 1.0, 0.0))
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == METTA_DEFAULT and row["snr_ratio"] == 1.0
    assert row["confident"] is False and row["actionable"] is False
    assert row["n_pairs"] == 0 and row["ci_method"] is None
    assert row["replay_best"] == "main_ema_0.1" and "plateau churn" in row["replay_best_reason"]
    assert row["replay_best_n_pairs"] == 3
    assert "no configuration passes every check" in row["sentence"]
    assert "keep" not in row["sentence"]


def test_infinite_default_lag_accepts_any_lag_but_not_the_reverse() -> None:
    rows = []
    for seed, jitter in ((1, 1.0), (2, 1.02)):
        rows.append((METTA_DEFAULT, seed, 1.0, math.inf, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, 1.5 * jitter, 5000.0, 0.1, 0.0))
    assert recommend(_metrics(rows))["config"].item() == "main_ema_0.006"
    rows = []
    for seed, jitter in ((1, 1.0), (2, 1.02)):
        rows.append((METTA_DEFAULT, seed, 1.0, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, 1.5 * jitter, math.inf, 0.1, 0.0))
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == METTA_DEFAULT and "response lag never" in row["replay_best_reason"]


def test_sweep_summary_pairs_by_seed() -> None:
    rows = [(METTA_DEFAULT, s, b, 100.0, 0.1, 0.0) for s, b in ((1, 1.0), (2, 2.0))]
    rows += [("main_ema_0.006", 1, 3.0, 90.0, 0.2, 0.0), ("main_ema_0.006", 2, 4.0, 70.0, 0.2, 0.0)]
    summary = summarise_sweep(_metrics(rows))
    snr = summary.filter((pl.col("config") == "main_ema_0.006") & (pl.col("metric") == "lp_snr"))
    logs = np.log([3.0, 4.0 / 2.0])
    assert snr["diff_vs_default"].item() == pytest.approx(logs.mean())
    low, high = stats.t.interval(0.95, 1, loc=logs.mean(), scale=stats.sem(logs))
    assert (snr["diff_ci_low"].item(), snr["diff_ci_high"].item()) == pytest.approx((low, high))
    assert snr["mean"].item() == pytest.approx(math.sqrt(3.0 * 4.0))  # geometric mean
    assert snr.select("ci_method", "diff_ci_method", "n_seeds", "n_pairs").row(0) == (
        "t on logs",
        "paired t on logs",
        2,
        2,
    )
    assert (
        snr["runs"].item().to_list() == ["r1", "r2"] and snr["granularity"].item() == "completion"
    )
    lag = summary.filter(
        (pl.col("config") == "main_ema_0.006") & (pl.col("metric") == "lag_median")
    )
    assert lag["diff_vs_default"].item() == pytest.approx(-20.0)
    assert lag["mean"].item() == pytest.approx(80.0)
    assert lag["diff_ci_method"].item() == "paired t" and lag["ci_method"].item() == "t"


def test_closed_loop_summary_by_hand() -> None:
    recs = pl.DataFrame(
        {
            "task": ["t", "u", "e"],
            "granularity": ["completion", "completion", "epoch"],
            "config": ["main_ema_0.006", METTA_DEFAULT, "main_ema_0.01"],
            "replay_best": ["zscore_z10", "x", "main_ema_0.01"],
            "actionable": [True, False, False],
        }
    )
    candidates = closed_loop_candidates(recs)
    # the epoch row sends nothing to the simulator: its settings do not transfer
    assert candidates == {
        "t": [("main_ema_0.006", "recommended"), ("zscore_z10", "replay_best")],
        "u": [("x", "replay_best")],
    }
    not_actionable = recs.with_columns(pl.lit(False).alias("actionable"))
    assert closed_loop_candidates(not_actionable)["t"] == [("zscore_z10", "replay_best")]
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
        rows.append(("t", METTA_DEFAULT, "k0", seed, 300, float(d), d < 300, 0.5, 0.6, "simulator"))
        rows.append(
            ("t", "main_ema_0.006", "k1", seed, 300, float(c), c < 300, 0.55, 0.62, "simulator")
        )
    outcomes = conform(
        pl.DataFrame(rows, schema=list(LP_CLOSED_LOOP.names()), orient="row"), LP_CLOSED_LOOP
    )
    summary = summarise_closed_loop(outcomes, {"t": [("main_ema_0.006", "recommended")]})
    ttc = summary.filter(pl.col("metric") == "time_to_competence").row(0, named=True)
    diffs = np.array([-10.0, -20.0, 0.0])
    low, high = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
    assert ttc["diff"] == pytest.approx(-10.0)
    assert (ttc["diff_ci_low"], ttc["diff_ci_high"]) == pytest.approx((low, high))
    assert (ttc["ci_method"], ttc["n_pairs"]) == ("paired t", 3)
    assert ttc["engine"] == "simulator"
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
    summary = summarise_sweep(frame)
    assert summary.height > 100
    capped = [c for c in default_sweep(10) if c.pool_cap]
    caps = summary.filter(pl.col("pool_cap").is_not_null())["pool_cap"].unique().to_list()
    assert caps == [capped[0].pool_cap]
    assert recommend(frame).height == 2


def test_matched_gain_recovers_a_known_local_level() -> None:
    """Random walk (step sd 0.02) + noise (sd 0.2) on 3 labels: the matched EMA weight is
    the steady-state Kalman gain of (q, r), and the sweep replays LP at that weight."""
    from rts_dagster.analysis.kalman import steady_state_gain
    from rts_dagster.analysis.lp_sweep import KALMAN_MATCHED, matched_gain

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
    gain = matched_gain(streams, "completion")
    truth = float(steady_state_gain(q, r))
    assert gain == pytest.approx(truth, rel=0.2)
    assert matched_gain(streams, "epoch") is None  # no epoch rows
    configs = {c.name: c for c in default_sweep(3, matched_gain=gain)}
    assert configs[KALMAN_MATCHED].main.ema_timescale == gain
    assert KALMAN_MATCHED not in {c.name for c in default_sweep(3)}


def test_a_run_without_snr_drops_out_of_the_pairs() -> None:
    rows = []
    for seed, snr in ((1, 1.0), (2, 1.05), (3, float("nan"))):
        rows.append((METTA_DEFAULT, seed, snr, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, (2 + 0.1 * seed) * snr, 100.0, 0.1, 0.0))
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == "main_ema_0.006"
    assert row["snr_ratio"] == pytest.approx(math.sqrt(2.1 * 2.2))
    assert (row["n_seeds"], row["n_runs"], row["n_pairs"]) == (3, 3, 2)


def test_default_alone_says_so() -> None:
    rows = [(METTA_DEFAULT, s, 1.0 + s, 10.0, 0.1, 0.0) for s in (1, 2)]
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == METTA_DEFAULT and row["replay_best"] is None
    assert row["n_compared"] == 0 and row["rejected"] == []
    assert "No other configuration replayed a ratio above 1" in row["sentence"]


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
    assert (row["snr_ratio_ci_low"], row["snr_ratio_ci_high"]) == pytest.approx(
        _bonferroni(logs, 1)  # one configuration compared: the plain 95% t interval
    )
    assert (row["n_seeds"], row["n_runs"], row["n_pairs"]) == (2, 3, 3)


def test_an_uncertain_winner_is_not_the_row_configuration() -> None:
    rows = []
    for seed, ratio in ((1, 3.0), (2, 0.5), (3, 2.0)):  # log CI spans 0
        rows.append((METTA_DEFAULT, seed, 1.0, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.006", seed, ratio, 100.0, 0.1, 0.0))
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == METTA_DEFAULT and row["confident"] is False
    assert row["replay_best"] == "main_ema_0.006"
    assert row["replay_best_ci_low"] < 1 < row["replay_best_ci_high"]
    assert "not above the default" in row["replay_best_reason"]
    assert "use " not in row["sentence"]


# --- regressions of the review (issue 9) --------------------------------------------------------
def test_an_snr_of_exactly_one_is_never_recommended() -> None:
    """main_ema_0.0003 gave LP SNR 1.0 in every run (LP ignores trends) against a default
    at 0.975: a 'better' ratio with no signal at all."""
    rows = []
    for seed in (1, 2, 3):
        rows.append((METTA_DEFAULT, seed, 0.975, 100.0, 0.1, 0.0))
        rows.append(("main_ema_0.0003", seed, 1.0, 100.0, 0.1, 0.0))
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == METTA_DEFAULT and not row["confident"]
    assert row["replay_best"] == "main_ema_0.0003"
    assert row["replay_best_reason"].startswith("no signal of its own")


def test_a_zero_churn_default_does_not_veto_every_configuration() -> None:
    rows = []
    for seed, jitter in ((1, 1.0), (2, 1.05), (3, 0.95)):
        rows.append((METTA_DEFAULT, seed, 1.2, 100.0, 0.0, 0.0))
        rows.append(("main_ema_0.006", seed, 3.0 * jitter, 100.0, 0.02, 0.0))  # below the floor
        rows.append(("main_ema_0.01", seed, 4.0 * jitter, 100.0, 0.5, 0.0))  # real churn
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == "main_ema_0.006" and row["confident"]
    assert row["replay_best"] == "main_ema_0.01" and "plateau churn" in row["replay_best_reason"]
    # the floor is a parameter: without it the old multiplicative guard vetoes both
    strict = recommend(_metrics(rows), churn_floor=0.0).row(0, named=True)
    assert strict["config"] == METTA_DEFAULT


def test_the_n_printed_is_the_pairs_used() -> None:
    rows = []
    for seed, base in ((1, 1.5), (2, 1.6), (3, 1.4), (4, 1.5)):
        rows.append((METTA_DEFAULT, seed, base, 100.0, 0.1, 0.0))
        snr = float("nan") if seed == 4 else base * (2.0 + 0.05 * seed)
        rows.append(("main_ema_0.006", seed, snr, 100.0, 0.1, 0.0))
    row = recommend(_metrics(rows)).row(0, named=True)
    assert row["config"] == "main_ema_0.006" and row["n_pairs"] == 3 and row["n_runs"] == 4
    assert "95% t, Bonferroni over 1 interval, n=3" in row["sentence"]
    assert "n=4" not in row["sentence"] and "4 seeds" not in row["sentence"]


def _mixed_task() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Three completion runs and one epoch run of task t: main_ema_0.03 churns 6x the
    default per completion, but the epoch run's default churns 2.16, which pooled would
    lift the default's mean churn to ~0.65 and let main_ema_0.03 through."""
    completion = []
    for seed, jitter in ((1, 1.0), (2, 1.05), (3, 0.95)):
        completion.append((METTA_DEFAULT, seed, 1.3, 100.0, 0.15, 0.0))
        completion.append(("main_ema_0.006", seed, 2.6 * jitter, 100.0, 0.16, 0.0))
        completion.append(("main_ema_0.03", seed, 5.2 * jitter, 100.0, 0.9, 0.0))
    epoch = [(METTA_DEFAULT, 4, 1.1, 10.0, 2.16, 0.0), ("main_ema_0.03", 4, 9.0, 10.0, 0.9, 0.0)]
    return _metrics(completion), _metrics(epoch, granularity="epoch")


def test_granularities_are_never_pooled() -> None:
    completion, epoch = _mixed_task()
    alone = recommend(completion)
    mixed = recommend(pl.concat([completion, epoch]))
    assert mixed["granularity"].to_list() == ["completion", "epoch"]
    assert mixed.filter(pl.col("granularity") == "completion").equals(alone)
    assert alone["config"].item() == "main_ema_0.006"
    assert "plateau churn" in alone["replay_best_reason"].item()  # main_ema_0.03 stays rejected
    epoch_row = mixed.filter(pl.col("granularity") == "epoch").row(0, named=True)
    assert epoch_row["runs"] == ["r4"] and epoch_row["n_runs"] == 1
    summary = summarise_sweep(pl.concat([completion, epoch]))
    churn = summary.filter(
        (pl.col("metric") == "churn_plateau") & (pl.col("config") == METTA_DEFAULT)
    ).sort("granularity")
    assert churn["mean"].to_list() == pytest.approx([0.15, 2.16])
    assert churn["runs"].to_list() == [["r1", "r2", "r3"], ["r4"]]


def test_epoch_rows_are_never_actionable() -> None:
    rows = []
    for seed, jitter in ((1, 1.0), (2, 1.05), (3, 0.95)):
        rows.append((METTA_DEFAULT, seed, 1.3, 100.0, 0.15, 0.0))
        rows.append(("main_ema_0.01", seed, 4.0 * jitter, 100.0, 0.15, 0.0))
        rows.append((KALMAN_MATCHED, seed, 3.0 * jitter, 100.0, 0.15, 0.0))
    recs = recommend(_metrics(rows, granularity="epoch"))
    row = recs.row(0, named=True)
    assert row["config"] == "main_ema_0.01" and row["confident"] and not row["actionable"]
    assert "do not transfer to per-completion LP" in row["sentence"]
    assert "RewardStreamRecorder" in row["sentence"]
    assert "use " not in row["sentence"]
    metrics = _metrics(rows, granularity="epoch")
    assert closed_loop_candidates(recs, metrics) == {}  # nothing of it reaches the simulator


def test_selection_adjusted_interval_covers_the_winner_at_three_seeds() -> None:
    """K = 15 configurations with known true log SNR ratios, 3 seeds, 2000 replications
    (tasks): the interval of the highest-replaying configuration (recommended or not) and
    of the recommended one cover its true log ratio at >= 93% (nominal 95%); the plain
    per-configuration t interval of the same winner covers less (winner's curse)."""
    rng = np.random.default_rng(2026)
    reps, k, seeds, sd = 2000, 15, 3, 0.1
    truth = np.linspace(-0.5, 1.5, k)
    truth[-3:] = 1.5  # a three-way tie at the top: the selection is really a max of noise
    names = [f"c{i:02d}" for i in range(k)]
    default_log = rng.normal(1.0, 0.3, (reps, seeds))
    cand_log = default_log[:, :, None] + truth + rng.normal(0, sd, (reps, seeds, k))
    logs = np.concatenate([default_log[:, :, None], cand_log], axis=2)  # (reps, seeds, 1+k)
    rep, seed, cfg = np.meshgrid(
        np.arange(reps), np.arange(1, seeds + 1), np.arange(k + 1), indexing="ij"
    )
    configs = np.array([METTA_DEFAULT, *names])
    n = logs.size
    frame = _frame(
        {
            "task": [f"t{i:04d}" for i in rep.ravel()],
            "config": configs[cfg.ravel()],
            "seed": seed.ravel(),
            "lp_snr": np.exp(logs.ravel()),
            "lag_median": np.full(n, 100.0),
            "churn_plateau": np.full(n, 0.1),
            "starved_fraction": np.zeros(n),
        }
    )
    recs = recommend(frame).sort("task")
    assert recs.height == reps and (recs["n_compared"] == k).all()
    true_of = dict(zip(names, np.exp(truth), strict=True))
    best_truth = recs["replay_best"].replace_strict(true_of, return_dtype=pl.Float64)
    covered = (recs["replay_best_ci_low"] <= best_truth) & (
        best_truth <= recs["replay_best_ci_high"]
    )
    assert covered.mean() >= 0.93
    chosen = recs.filter(pl.col("confident"))
    assert chosen.height > reps / 2  # the recommendation is made often enough to test it
    chosen_truth = chosen["config"].replace_strict(true_of, return_dtype=pl.Float64)
    hit = (chosen["snr_ratio_ci_low"] <= chosen_truth) & (
        chosen_truth <= chosen["snr_ratio_ci_high"]
    )
    assert hit.mean() >= 0.93
    # the same winners' plain 95% t intervals (no selection adjustment) cover less
    winner = recs["replay_best"].str.slice(1).cast(pl.Int64).to_numpy()
    # recs are sorted by task, t0000 ... t1999: replication order
    winner_logs = (cand_log - default_log[:, :, None])[np.arange(reps), :, winner]
    _, low, high, _ = t_bounds(winner_logs)  # (reps, seeds) -> per replication
    plain = ((low <= truth[winner]) & (truth[winner] <= high)).mean()
    print(
        f"coverage: winner {covered.mean():.3f}, recommended {hit.mean():.3f} "
        f"({chosen.height} of {reps}), winner unadjusted {plain:.3f}"
    )
    assert plain < covered.mean()


def _reference_summary(metrics: pl.DataFrame) -> pl.DataFrame:
    """The per-group loop summarise_sweep replaced: scalar intervals module calls."""
    from rts_dagster.analysis import intervals
    from rts_dagster.analysis.lp_sweep import (
        _SETTING_COLUMNS,
        GROUP_KEYS,
        PER_RUN_CONFIGS,
        SUMMARY_METRICS,
    )
    from rts_dagster.schema import LP_SWEEP_SUMMARY

    def log(v):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(v > 0, np.log(v), np.nan)

    rows = []
    ordered = metrics.sort(GROUP_KEYS, maintain_order=True)
    for (task, granularity), group in ordered.group_by(GROUP_KEYS, maintain_order=True):
        runs = sorted(group["run_id"].unique().to_list())
        default = group.filter(pl.col("config") == METTA_DEFAULT)
        for _, per_config in group.group_by(["config"], maintain_order=True):
            settings = per_config.select(_SETTING_COLUMNS).row(0, named=True)
            if settings["config"] in PER_RUN_CONFIGS:
                for name in ("ema_timescale", "slow_timescale_factor"):
                    settings[name] = float(np.exp(np.log(per_config[name].to_numpy()).mean()))
            paired = per_config.join(default, on=["seed", "run_id"], suffix="_d", how="left")
            for metric in SUMMARY_METRICS:
                values = per_config[metric].to_numpy()
                ours = paired[metric].to_numpy().astype(float)
                theirs = paired[f"{metric}_d"].cast(pl.Float64).fill_null(np.nan).to_numpy()
                if metric == "lp_snr":
                    level = intervals.log_t_interval(values)
                    diff = intervals.t_interval(log(ours) - log(theirs))
                    methods = ("t on logs", "paired t on logs")
                else:
                    level = intervals.t_interval(values)
                    diff = intervals.paired_t_interval(ours, theirs)
                    methods = ("t", "paired t")
                rows.append(
                    {
                        **settings,
                        "task": task,
                        "granularity": granularity,
                        "metric": metric,
                        "runs": runs,
                        "n_seeds": level.n,
                        "mean": level.estimate,
                        "ci_low": level.low,
                        "ci_high": level.high,
                        "ci_method": methods[0],
                        "n_pairs": diff.n,
                        "diff_vs_default": diff.estimate,
                        "diff_ci_low": diff.low,
                        "diff_ci_high": diff.high,
                        "diff_ci_method": methods[1],
                    }
                )
    return conform(pl.DataFrame(rows, infer_schema_length=None), LP_SWEEP_SUMMARY)


def test_summarise_sweep_equals_the_scalar_intervals_per_group() -> None:
    """Every (task, granularity, config, metric) row: the same n, mean and bounds as the
    intervals module's scalar functions, with NaN, inf, zero and negative values, a run
    missing its default replay, a one-run task and per-run fitted settings."""
    from polars.testing import assert_frame_equal

    from rts_dagster.analysis.lp_sweep import KALMAN_MATCHED, SUMMARY_METRICS

    rng = np.random.default_rng(11)
    configs = [METTA_DEFAULT, "ema_0.01", KALMAN_MATCHED, "zscore_z30"]
    rows = []
    for task, seeds in (("b_task", 4), ("a_task", 3), ("one_run", 1)):
        for granularity in ("completion", "epoch"):
            for config in configs:
                for seed in range(1, seeds + 1):
                    if task == "a_task" and seed == 2 and config == METTA_DEFAULT:
                        continue  # no default replay for this run: no pair
                    row = {
                        "task": task,
                        "seed": seed,
                        "run_id": f"{task}.seed{seed}",
                        "granularity": granularity,
                        "config": config,
                        "variant": "main",
                        "ema_timescale": 0.001 * rng.uniform(0.5, 2.0),
                        "slow_timescale_factor": 0.5,
                    }
                    for m in SUMMARY_METRICS:
                        row[m] = float(rng.lognormal(0.0, 0.5))
                    rows.append(row)
    frame = pl.DataFrame(rows)
    frame = frame.with_columns(
        # odd values the intervals must drop exactly as the scalar functions do
        pl.when((pl.col("seed") == 1) & (pl.col("config") == "ema_0.01"))
        .then(float("inf"))
        .otherwise(pl.col("lag_median"))
        .alias("lag_median"),
        pl.when((pl.col("seed") == 3) & (pl.col("task") == "b_task"))
        .then(0.0)
        .otherwise(pl.col("lp_snr"))
        .alias("lp_snr"),
        pl.when(pl.col("seed") == 2)
        .then(float("nan"))
        .otherwise(pl.col("gini_mean"))
        .alias("gini_mean"),
        pl.when(pl.col("config") == "zscore_z30")
        .then(-pl.col("entropy_mean"))
        .otherwise(pl.col("entropy_mean"))
        .alias("entropy_mean"),
    )
    for name, dtype in LP_REPLAY_METRICS.items():
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(name))
    metrics = conform(frame, LP_REPLAY_METRICS)
    got, want = summarise_sweep(metrics), _reference_summary(metrics)
    assert got.height == want.height == 3 * 2 * len(configs) * len(SUMMARY_METRICS)
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-12, abs_tol=1e-14)
    assert (got["n_seeds"] == 0).sum() + (got["n_seeds"] == 1).sum() > 0
