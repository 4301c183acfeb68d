"""Report section "Does the reward rise?": per task and granularity, how many labels rise
during training, with each label's slope and interval (analysis/learning.py), and the
engine that produced the runs. Describes only; the verdict section advises."""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from rts_dagster.analysis.learning import learning_slopes, learning_summary
from rts_dagster.report.document import Bullets, Heading, Paragraph, Report, Table, table_href
from rts_dagster.report.figures import number
from rts_dagster.report.scope import TaskScope

# what each engine tag means, in words the report can print
ENGINE_WORDS = {
    "rts-simulator": "the rts simulator (a learner model with Metta's LP and logging path, "
    "not MettaGrid training)",
    "mettagrid": "real MettaGrid environments with a PPO learner (rts_dagster.mettagrid_engine)",
}


def engine_sentence(engines: Mapping[str, int]) -> str:
    """'Runs: 12 from the rts simulator (...)', from `engine:<name>` tags (runs without
    one are training runs as logged)."""
    if not engines:
        return "Runs: as logged by their training jobs (no engine tag)."
    parts = []
    for name, count in sorted(engines.items(), key=lambda kv: (-kv[1], kv[0])):
        words = ENGINE_WORDS.get(name, f"engine {name}" if name else "training jobs as logged")
        parts.append(f"{count} from {words}")
    return "Runs: " + "; ".join(parts) + "."


def _interval(low: float | None, high: float | None, method: str) -> str:
    if low is None or high is None or low != low or high != high:
        return f"no interval ({method})"
    return f"{number(low)} to {number(high)} ({method})"


def add_learning_section(
    report: Report,
    streams: pl.DataFrame,
    slopes: pl.DataFrame | None = None,
    scope: TaskScope | None = None,
) -> pl.DataFrame:
    """The section, from `slopes` (`learning_slopes` of the usable series, when the caller
    has them) or else from `streams`; returns the per-label summary of every task. Its
    sentences and rows cover `scope.shown` (every task when None), with counts over all."""
    report.add(Heading("Does the reward rise?"))
    if slopes is None:
        slopes = learning_slopes(streams)
    every = learning_summary(slopes)
    scope = scope or TaskScope.of(every["task"].to_list())
    report.add_table_file("learning", every)
    summary = scope.keep(every)
    if every.height == 0:
        report.add(Paragraph(["No usable series to fit a slope to."]))
        return every
    report.add(
        Paragraph(
            [
                "Slope of each label's reward over training, in reward per 1M agent steps: per "
                "run, an OLS fit over the label's mean reward in 10 equal agent-step bins (bins "
                "absorb the serial dependence of the samples), with a t interval on 8 degrees "
                "of freedom; across seeds, the mean slope with a t interval over seeds. A label "
                "'rises in a run' when that run's interval is above 0."
            ]
        )
    )
    items = []
    for (task, granularity), part in summary.group_by(["task", "granularity"], maintain_order=True):
        runs = int(part["n_runs"].max())
        rising = part.filter(pl.col("n_rising") == pl.col("n_runs")).height
        falls = part.filter(pl.col("n_falling") > 0).height
        items.append(
            f"{task} ({granularity}): {rising} of {part.height} labels rise in every one of "
            f"its {runs} run(s); {falls} fall in at least one."
        )
    if items:
        report.add(Bullets(items))
    rows = [
        [
            r["task"],
            r["granularity"],
            r["label"],
            number(r["slope"]),
            _interval(r["ci_low"], r["ci_high"], r["method"]),
            f"{r['n_rising']} of {r['n_runs']}",
        ]
        for r in summary.iter_rows(named=True)
    ]
    if rows:
        report.add(
            Table(
                [
                    "task",
                    "granularity",
                    "label",
                    "slope (reward per 1M steps)",
                    "95% interval",
                    "runs rising",
                ],
                rows,
                caption="Per label: mean slope over seeds and its interval; how many runs' "
                "own intervals are above 0.",
            )
        )
    if note := scope.left_out_note(every, table_href("learning")):
        report.add(note)
    if scope.limited:
        rising = every.filter(pl.col("n_rising") == pl.col("n_runs")).height
        falls = every.filter(pl.col("n_falling") > 0).height
        report.add(
            Paragraph(
                [
                    f"Across all {len(scope.tasks)} tasks: {rising} of {every.height} "
                    "labels (per task and granularity) rise in every one of their runs; "
                    f"{falls} fall in at least one (each run judged by its own interval)."
                ]
            )
        )
    return every
