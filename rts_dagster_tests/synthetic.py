"""Synthetic tables with a known truth, shared by tests: reward streams of whole runs and
local-level fit tables with chosen noise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from rts_dagster.analysis.kalman import steady_state_gain
from rts_dagster.schema import LOCAL_LEVEL, REWARD_STREAMS, conform


def series(
    run_id: str,
    label: str,
    reward: np.ndarray,
    *,
    granularity: str = "completion",
    step0: int = 0,
    dstep: int = 100,
    sps: np.ndarray | None = None,
    per_epoch: int = 1,
    task: str = "t",
    seed: int = 0,
) -> pl.DataFrame:
    """One label's REWARD_STREAMS rows: agent steps `step0 + dstep * i`, epoch
    `i // per_epoch`, SPS 1000 unless given, nothing stale."""
    n = len(reward)
    return pl.DataFrame(
        {
            "task": task,
            "seed": seed,
            "run_id": run_id,
            "label": label,
            "granularity": granularity,
            "sample_index": np.arange(n),
            "agent_step": step0 + dstep * np.arange(n),
            "epoch": np.arange(n) // per_epoch,
            "reward": np.asarray(reward, dtype=float),
            "sps": np.full(n, 1000.0) if sps is None else sps,
            "is_stale": np.zeros(n, dtype=bool),
        }
    )


def run_streams(task: str, seed: int, rng: np.random.Generator, n: int = 300) -> pl.DataFrame:
    """Epoch and completion series of 3 labels: a rising one, a flat one, a constant one."""
    frames = []
    run_id = f"{task}.seed{seed}"
    for label, base in (("rise", None), ("flat", 0.5), ("const", 0.25)):
        for granularity in ("epoch", "completion"):
            if base is None:
                y = np.linspace(0.0, 1.0, n) + rng.normal(0, 0.05, n)
            elif label == "const":
                y = np.full(n, base)
            else:
                y = base + rng.normal(0, 0.05, n)
            sps = 1000.0 + rng.normal(0, 10, n)
            per_epoch = 1 if granularity == "epoch" else 3
            frames.append(
                series(
                    run_id,
                    label,
                    y,
                    granularity=granularity,
                    dstep=1000,
                    sps=sps,
                    per_epoch=per_epoch,
                    task=task,
                    seed=seed,
                )
            )
    return conform(pl.concat(frames), REWARD_STREAMS)


def local_level_table(
    task: Sequence[str],
    seed: np.ndarray,
    run_id: Sequence[str],
    label: Sequence[str],
    q: np.ndarray,
    r: np.ndarray,
    at_bound: np.ndarray | bool = False,
) -> pl.DataFrame:
    """LOCAL_LEVEL rows of whole-series completion fits with the given drift variance q and
    observation noise variance r (one row per entry): the gain is the steady-state gain of
    (q, r), every fit long and well-behaved. What `recommend_timescales` pools."""
    q, r = np.asarray(q, dtype=float), np.asarray(r, dtype=float)
    gain = np.asarray(steady_state_gain(q, r))
    return conform(
        pl.DataFrame(
            {
                "task": list(task),
                "seed": seed,
                "run_id": list(run_id),
                "label": list(label),
                "granularity": "completion",
                "regime": "whole",
                "unit": "completions",
                "regime_start": 0,
                "regime_end": 1000,
                "n_samples": 1000,
                "trend_slope": 0.0,
                "var_diff": np.nan,
                "cov_diff_lag1": np.nan,
                "q": q,
                "r": r,
                "signal_to_noise": q / r,
                "gain": gain,
                "timescale": 1.0 / gain,
                "at_bound": at_bound,
                "ljung_box_p": 0.5,
                "ljung_box_lags": 10,
                "fit_ok": True,
                "note": "",
            }
        ),
        LOCAL_LEVEL,
    )
