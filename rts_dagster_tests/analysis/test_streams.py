import math

import numpy as np
import polars as pl
import pytest

from rts_dagster.analysis.streams import (
    build_reward_streams,
    completion_streams,
    describe_step_issues,
    epoch_streams,
    step_issues,
)
from rts_dagster.schema import COMPLETION_RECORD, REWARD_STREAMS

NULL = None


def history_frame():
    # 4 epochs; label a.b completed in epochs 0,1,3 (epoch 2 re-emits 0.5: stale);
    # label c first appears at epoch 2; a logged NaN stays a sample.
    return pl.DataFrame(
        {
            "_step": [0, 100, 200, 300],
            "_timestamp": [1.0, 2.0, 3.0, 4.0],
            "metric/agent_step": [0.0, 100.0, 200.0, 300.0],
            "metric/epoch": [0.0, 1.0, 2.0, 3.0],
            "overview/sps": [1000.0, 500.0, NULL, 900.0],
            "env_per_label_rewards/a.b": [0.25, 0.5, 0.5, 0.75],
            "env_per_label_rewards/c": [NULL, NULL, float("nan"), 1.0],
        },
        schema_overrides={"overview/sps": pl.Float64, "env_per_label_rewards/c": pl.Float64},
    )


def test_epoch_streams_long_form_stale_and_nan():
    out = epoch_streams(history_frame(), "fixed_maps", 1, "run-1")
    assert out.schema == REWARD_STREAMS
    a = out.filter(pl.col("label") == "a.b")
    assert a["reward"].to_list() == [0.25, 0.5, 0.5, 0.75]
    assert a["sample_index"].to_list() == [0, 1, 2, 3]
    assert a["agent_step"].to_list() == [0, 100, 200, 300]
    assert a["epoch"].to_list() == [0, 1, 2, 3]
    assert a["is_stale"].to_list() == [False, False, True, False]
    assert a["sps"].to_list() == [1000.0, 500.0, 500.0, 900.0]  # forward-filled
    c = out.filter(pl.col("label") == "c")
    assert c["sample_index"].to_list() == [0, 1]
    assert math.isnan(c["reward"][0]) and c["reward"][1] == 1.0
    assert set(out["granularity"]) == {"epoch"}
    assert set(out["task"]) == {"fixed_maps"} and set(out["seed"]) == {1}


def test_epoch_streams_without_step_metric_falls_back_to_step():
    hist = history_frame().drop("metric/agent_step", "metric/epoch")
    out = epoch_streams(hist, "t", 2, "r")
    assert out.filter(pl.col("label") == "a.b")["agent_step"].to_list() == [0, 100, 200, 300]
    assert set(out["epoch"]) == {-1}


def test_epoch_streams_empty_when_no_label_keys():
    out = epoch_streams(history_frame().select("_step", "overview/sps"), "t", 1, "r")
    assert out.height == 0 and out.schema == REWARD_STREAMS


def test_completion_streams_order_sample_index_and_sps_asof():
    rng = np.random.default_rng(0)
    n = 200
    steps = np.sort(rng.integers(0, 400, n))
    labels = rng.choice(["x", "y", "z"], n)
    comp = pl.DataFrame(
        {
            "completion_index": np.arange(n),
            "worker": np.zeros(n, dtype=np.int32),
            "label": labels,
            "task_id": np.full(n, -1),
            "reward": rng.random(n),
            "agent_step": steps,
            "epoch": np.full(n, -1),
            "wall_time": np.arange(n, dtype=float),
        },
        schema=COMPLETION_RECORD,
    )
    out = completion_streams(comp, history_frame(), "t", 1, "r")
    assert out.schema == REWARD_STREAMS and out.height == n
    for lab in ["x", "y", "z"]:
        mask = labels == lab
        got = out.filter(pl.col("label") == lab)
        np.testing.assert_array_equal(got["reward"].to_numpy(), comp["reward"].to_numpy()[mask])
        assert got["sample_index"].to_list() == list(range(mask.sum()))
    # sps/epoch of the epoch each completion happened in: the first history row logged at
    # or after its agent_step (history rows at 0, 100, 200, 300; sps 1000, 500, 500 (ffill), 900)
    row_of = np.minimum(np.searchsorted([0, 100, 200, 300], steps, side="left"), 3)
    expected_sps = np.array([1000.0, 500.0, 500.0, 900.0])[row_of]
    expected_epoch = row_of
    back = out.sort("agent_step", "sample_index")
    order = np.argsort(steps, kind="stable")
    merged = out.join(
        comp.select("label", "reward", "agent_step").with_row_index("i"),
        on=["label", "reward", "agent_step"],
    ).sort("i")
    np.testing.assert_array_equal(merged["sps"].to_numpy(), expected_sps)
    np.testing.assert_array_equal(merged["epoch"].to_numpy(), expected_epoch)
    assert back.height == len(order)
    assert not out["is_stale"].any()


def test_build_reward_streams_both_granularities():
    comp = pl.DataFrame(
        {
            "completion_index": [0, 1, 0],
            "worker": [0, 0, 1],
            "label": ["a.b", "a.b", "a.b"],
            "task_id": [1, 1, 2],
            "reward": [0.1, 0.2, 0.3],
            "agent_step": [10, 50, 20],
            "epoch": [0, 0, 0],
            "wall_time": [1.0, 3.0, 2.0],
        },
        schema=COMPLETION_RECORD,
    )
    out = build_reward_streams(history_frame(), comp, "t", 1, "r")
    comp_rows = out.filter(pl.col("granularity") == "completion")
    # ordered by agent_step across workers: 10 (w0), 20 (w1), 50 (w0)
    assert comp_rows["reward"].to_list() == [0.1, 0.3, 0.2]
    assert out.filter(pl.col("granularity") == "epoch").height == 6


def _long_history(steps, epochs=None, n_labels=2, seed=0):
    """60-ish epochs of two labels with the given metric/agent_step column."""
    steps = np.asarray(steps, dtype=np.float64)
    n = steps.size
    rng = np.random.default_rng(seed)
    cols = {
        "_step": np.arange(n),
        "metric/agent_step": steps,
        "metric/epoch": np.arange(n, dtype=np.float64) if epochs is None else epochs,
        "overview/sps": np.full(n, 1000.0),
    }
    cols.update({f"env_per_label_rewards/l{i}": rng.random(n) for i in range(n_labels)})
    return pl.DataFrame(cols)


@pytest.mark.parametrize("bad", [1e300, math.inf, -math.inf, math.nan, -1e300])
def test_one_corrupt_agent_step_keeps_the_run_and_is_counted(bad):
    # issue 10 #11: one bad metric/agent_step in 60 rows used to fail the whole run
    steps = np.arange(60) * 100.0
    steps[30] = bad
    hist = _long_history(steps)
    out = build_reward_streams(hist, None, "t", 1, "r")
    assert out.height == 120  # every reward kept, both labels
    # reference: the corrupt row counts as not logged, so it holds the previous step
    expected = (np.arange(60) * 100).tolist()
    expected[30] = 2900
    for label in ("l0", "l1"):
        assert out.filter(pl.col("label") == label)["agent_step"].to_list() == expected
    issues = step_issues(hist)
    assert issues["agent_step_invalid"] == 1
    assert issues["epoch_invalid"] == 0 and issues["agent_step_negative"] == 0
    assert issues["agent_step_backward"] == 0  # the held step does not go back
    assert describe_step_issues(issues)[0].startswith("1 rows with a corrupt metric/agent_step")


def test_corrupt_epoch_is_held_from_the_previous_row_and_counted():
    epochs = np.arange(60, dtype=np.float64)
    epochs[[10, 11]] = [np.inf, 1e300]
    hist = _long_history(np.arange(60) * 100.0, epochs=epochs)
    out = build_reward_streams(hist, None, "t", 1, "r").filter(pl.col("label") == "l0")
    expected = list(range(60))
    expected[10] = expected[11] = 9
    assert out["epoch"].to_list() == expected
    assert step_issues(hist)["epoch_invalid"] == 2


def test_negative_and_backward_agent_steps_are_flagged_not_dropped():
    # issue 10 #18: a negative step was accepted silently; a resumed run goes back legitimately
    steps = np.concatenate([np.arange(30) * 100.0, np.arange(20, 50) * 100.0])  # resumed at 2000
    steps[5] = -7.0
    hist = _long_history(steps)
    out = build_reward_streams(hist, None, "t", 1, "r")
    assert out.height == 120
    assert out.filter(pl.col("label") == "l0")["agent_step"][5] == -7  # kept as logged
    comp = pl.DataFrame(
        {
            "completion_index": [0, 1, 2, 0, 1],
            "worker": [0, 0, 0, 1, 1],
            "label": ["l0"] * 5,
            "task_id": [1] * 5,
            "reward": [0.1, 0.2, 0.3, 0.4, 0.5],
            "agent_step": [10, -3, 30, 50, 40],  # w0: one negative (goes back); w1: goes back
            "epoch": [0] * 5,
            "wall_time": [1.0, 2.0, 3.0, 4.0, 5.0],
        },
        schema=COMPLETION_RECORD,
    )
    # reference by hand: history 1 negative, backward at row 5 (100 -> -7) and row 30
    # (2900 -> 2000); completions 1 negative, backward 10 -> -3 (w0) and 50 -> 40 (w1)
    issues = step_issues(hist, comp)
    assert issues == {
        "agent_step_invalid": 0,
        "epoch_invalid": 0,
        "agent_step_negative": 2,
        "agent_step_backward": 4,
    }
    text = " ".join(describe_step_issues(issues))
    assert "2 rows with a negative agent_step" in text and "resumed run" in text
    clean = step_issues(_long_history(np.arange(60) * 100.0))
    assert set(clean.values()) == {0} and describe_step_issues(clean) == []
