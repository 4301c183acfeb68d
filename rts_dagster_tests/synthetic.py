"""Synthetic reward streams with a known shape, for tests that need whole runs."""

from __future__ import annotations

import numpy as np
import polars as pl

from rts_dagster.schema import REWARD_STREAMS, conform


def run_streams(task: str, seed: int, rng: np.random.Generator, n: int = 300) -> pl.DataFrame:
    """Epoch and completion series of 3 labels: a rising one, a flat one, a constant one."""
    frames = []
    run_id = f"{task}.seed{seed}"
    for label, base in (("rise", None), ("flat", 0.5), ("const", 0.25)):
        for granularity in ("epoch", "completion"):
            steps = np.arange(n) * 1000
            if base is None:
                y = np.linspace(0.0, 1.0, n) + rng.normal(0, 0.05, n)
            elif label == "const":
                y = np.full(n, base)
            else:
                y = base + rng.normal(0, 0.05, n)
            frames.append(
                pl.DataFrame(
                    {
                        "task": task,
                        "seed": seed,
                        "run_id": run_id,
                        "label": label,
                        "granularity": granularity,
                        "sample_index": np.arange(n),
                        "agent_step": steps,
                        "epoch": np.arange(n) // (1 if granularity == "epoch" else 3),
                        "reward": y,
                        "sps": 1000.0 + rng.normal(0, 10, n),
                        "is_stale": np.zeros(n, dtype=bool),
                    }
                )
            )
    return conform(pl.concat(frames), REWARD_STREAMS)
