"""Opt-in (RTS_SLOW_TESTS=1, needs torch): the default PPO learner, trained briefly on the
default task set, raises the per-completion reward of at least half of the labels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("RTS_SLOW_TESTS") != "1", reason="set RTS_SLOW_TESTS=1"),
]
pytest.importorskip("mettagrid", reason="needs the mettagrid package")
pytest.importorskip("torch", reason="needs torch: pip install -e '.[mettagrid]'")

from rts_dagster.analysis.intervals import Interval  # noqa: E402
from rts_dagster.mettagrid_engine.run import TASK_SETS, train_run  # noqa: E402

EPOCHS = 40


def slope_interval(epoch: np.ndarray, score: np.ndarray) -> Interval:
    """OLS slope of per-epoch mean completion score on epoch, with its t interval."""
    fit = stats.linregress(epoch, score)
    half = stats.t.ppf(0.975, epoch.size - 2) * fit.stderr
    return Interval(fit.slope, fit.slope - half, fit.slope + half, "OLS slope t", epoch.size)


def test_ppo_raises_per_label_reward(tmp_path: Path) -> None:
    result = train_run(1, tmp_path, epochs=EPOCHS, threads=2, progress=None, keep_episodes=True)
    labels = TASK_SETS["nav"]
    per_epoch = result.rows[0]["metric/agent_step"]
    rising = []
    for label in labels:
        epochs = np.array(
            [(e.agent_step - 1) // per_epoch for e in result.episodes if e.label == label]
        )
        scores = np.array([e.score for e in result.episodes if e.label == label])
        seen = np.unique(epochs)
        means = np.array([scores[epochs == e].mean() for e in seen])
        interval = slope_interval(seen.astype(float), means)
        rising.append(interval.low > 0)
    assert sum(rising) >= len(labels) / 2, rising
