"""The engine sentence and the "Does the reward rise?" section."""

from __future__ import annotations

import numpy as np
import polars as pl

from rts_dagster.report.document import Bullets, Report
from rts_dagster.report.learning import add_learning_section, engine_sentence


def test_engine_sentence_names_what_produced_the_runs():
    text = engine_sentence({"mettagrid": 4, "rts-simulator": 2, "": 1})
    assert text.startswith("Runs: 4 from real MettaGrid environments")
    assert "2 from the rts simulator" in text and "1 from training jobs as logged" in text


def test_section_counts_rising_labels():
    steps = np.arange(200) * 1000
    rng = np.random.default_rng(0)
    frames = []
    for seed in (1, 2):
        for label, slope in (("up", 1.0), ("flat", 0.0)):
            frames.append(
                pl.DataFrame(
                    {
                        "task": "t",
                        "seed": seed,
                        "run_id": f"r{seed}",
                        "label": label,
                        "granularity": "completion",
                        "agent_step": steps,
                        "reward": slope * steps / 1e6 + rng.normal(0, 0.01, steps.size),
                    }
                )
            )
    report = Report(title="x")
    summary = add_learning_section(report, pl.concat(frames))
    assert summary.filter(pl.col("label") == "up")["n_rising"].item() == 2
    bullets = [b for b in report.blocks if isinstance(b, Bullets)]
    assert bullets[0].items == [
        "t (completion): 1 of 2 labels rise in every one of its 2 run(s); 0 fall in at least one."
    ]
