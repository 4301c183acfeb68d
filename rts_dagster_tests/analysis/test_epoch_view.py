"""What an epoch series can tell, checked against the per-completion truth behind it."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from rts_dagster.analysis import epoch_model, epoch_view
from rts_dagster.schema import REWARD_STREAMS, conform

SIGMA = 0.2
N_ENVS = 1024
PER_EPOCH = 64
EPOCHS = 300


def _run(rng, run_id="r1", with_stream=True) -> pl.DataFrame:
    """A plateaued run of 2 labels (p = 1/2): completions with sd SIGMA around fixed means,
    epoch values formed by Metta's held-value rule over N_ENVS environments."""
    counts = rng.poisson(PER_EPOCH, EPOCHS)
    epoch = np.repeat(np.arange(EPOCHS), counts)
    n = epoch.size
    label = rng.integers(0, 2, n)
    reward = np.array([0.3, 0.6])[label] + SIGMA * rng.standard_normal(n)
    env = rng.integers(0, N_ENVS, n)
    means = epoch_model.held_value_epoch_means(epoch, env, label, reward, EPOCHS, 2)
    names = np.array(["a", "b"])
    rows = []
    for j in range(2):
        ok = np.isfinite(means[:, j])
        rows.append(
            pl.DataFrame(
                {
                    "label": names[j],
                    "granularity": "epoch",
                    "sample_index": np.arange(ok.sum()),
                    "epoch": np.flatnonzero(ok),
                    "reward": means[ok, j],
                }
            )
        )
    if with_stream:
        order = np.lexsort((np.arange(n), label))
        rows.append(
            pl.DataFrame(
                {
                    "label": names[label[order]],
                    "granularity": "completion",
                    "sample_index": np.concatenate(
                        [np.arange((label == j).sum()) for j in range(2)]
                    ),
                    "epoch": epoch[order],
                    "reward": reward[order],
                }
            )
        )
    frame = pl.concat(rows).with_columns(
        pl.lit("t").alias("task"),
        pl.lit(1).alias("seed"),
        pl.lit(run_id).alias("run_id"),
        (pl.col("epoch") * 1000).alias("agent_step"),
        pl.lit(1000.0).alias("sps"),
        pl.lit(False).alias("is_stale"),
    )
    return conform(frame, REWARD_STREAMS)


def test_scales_from_the_recorded_stream_recover_the_per_completion_noise(rng):
    view = epoch_view.epoch_view(_run(rng))
    assert view.height == 2 and set(view["scale_source"]) == {epoch_view.SCALE_STREAM}
    # c and C are counts of the stream over the second half of the run
    assert view["label_per_epoch"].to_numpy() == pytest.approx(PER_EPOCH / 2, rel=0.05)
    assert view["total_per_epoch"].to_numpy() == pytest.approx(PER_EPOCH, rel=0.03)
    assert view["sigma_stream"].to_numpy() == pytest.approx(SIGMA, rel=0.05)
    # at a plateau with N >> C the held-value part is small: sqrt(C W) ~ sigma
    assert view["sigma_per_completion"].to_numpy() == pytest.approx(SIGMA, rel=0.15)
    # ...while the epoch noise itself is far below it (about sigma / sqrt(C))
    assert view["epoch_noise"].to_numpy() == pytest.approx(SIGMA / np.sqrt(PER_EPOCH), rel=0.2)
    assert all("sqrt(C W)" in how for how in view["conversion"])


def test_without_a_scale_the_per_completion_noise_is_not_told(rng):
    view = epoch_view.epoch_view(_run(rng, with_stream=False))
    assert set(view["scale_source"]) == {epoch_view.SCALE_NONE}
    assert view["sigma_per_completion"].is_nan().all()
    assert all("cannot be told" in how for how in view["conversion"])
    given = epoch_view.epoch_view(_run(rng, with_stream=False), completions_per_epoch=PER_EPOCH)
    assert set(given["scale_source"]) == {epoch_view.SCALE_USER}
    assert given["sigma_per_completion"].to_numpy() == pytest.approx(SIGMA, rel=0.15)


def test_summary_compares_epoch_and_stream_per_task(rng):
    view = epoch_view.epoch_view(pl.concat([_run(rng, "r1"), _run(rng, "r2")]))
    summary = epoch_view.summarise_by_task(view).row(0, named=True)
    assert summary["n_runs"] == 2 and summary["n_series"] == 4
    assert summary["sigma_ratio"] == pytest.approx(1.0, abs=0.15)
    assert summary["sigma_stream"] / summary["epoch_noise"] > 5
