"""With many tasks the figures show a few (verdict changes first), and so do the per-task
tables; the report built from only the shown tasks' streams (what the `report` asset
loads) is the report built from every stream."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

from rts_dagster.analysis import kalman, metrics, quality, variance
from rts_dagster.analysis.learning import learning_slopes
from rts_dagster.analysis.verdict import Verdict
from rts_dagster.report.build import (
    MAX_FIGURE_TASKS,
    build_report,
    figure_tasks,
    shown_note,
    tasks_with_arms,
)
from rts_dagster.report.document import Figure, Paragraph, Table, render_markdown
from rts_dagster.schema import TIMESCALE_RECOMMENDATIONS, empty
from rts_dagster_tests.synthetic import run_streams

N_TASKS = MAX_FIGURE_TASKS + 4


def _verdict(task: str, action: str = "keep_default", conflict: bool = False) -> Verdict:
    return Verdict(
        task=task, action=action, proposal=None, confidence="low", conflict=conflict, rule="t"
    )


def test_figure_tasks_prefers_changes_then_conflicts_then_names() -> None:
    tasks = [f"t{i:02d}" for i in range(20)]
    verdicts = [_verdict("t19", "change"), _verdict("t15", conflict=True), _verdict("t03")]
    shown = figure_tasks(tasks, verdicts, limit=4)
    assert shown == ["t00", "t01", "t15", "t19"]
    assert figure_tasks(tasks[:4], verdicts, limit=4) == tasks[:4]
    assert shown_note(tasks[:4], tasks[:4]) == ""
    assert "4 of the 20 tasks" in shown_note(shown, tasks)
    # a task with experiment arms comes after the changes and before the conflicts
    armed = figure_tasks(tasks, verdicts, limit=3, with_arms=["t17"])
    assert armed == ["t15", "t17", "t19"]
    assert figure_tasks(tasks, verdicts, limit=2, with_arms=["t17"]) == ["t17", "t19"]


def test_tasks_with_arms_are_those_with_more_than_one_arm() -> None:
    runs = pl.DataFrame(
        {"task": ["a", "a", "b", "b", "c"], "arm": ["base", "x", "base", "base", "base"]}
    )
    assert tasks_with_arms(runs) == ["a"]
    assert tasks_with_arms(None) == [] and tasks_with_arms(runs.clear()) == []


@pytest.fixture(scope="module")
def many_tasks() -> dict[str, pl.DataFrame]:
    rng = np.random.default_rng(3)
    streams = pl.concat(
        [run_streams(f"task{t:02d}", seed, rng, n=120) for t in range(N_TASKS) for seed in (1, 2)]
    )
    result = metrics.compute_metrics(streams)
    series_q = quality.series_quality(streams)
    return {
        "streams": streams,
        "series": result.series,
        "rolling": result.rolling,
        "progress": result.progress,
        "quality": series_q,
        "variance": variance.variance_table(
            quality.keep_usable(result.series, series_q, quality.PURPOSE_LEVEL)
        ),
    }


def _build(t: dict[str, pl.DataFrame], streams, rolling, learning=None, recommendations=False):
    recs = empty(TIMESCALE_RECOMMENDATIONS)
    if recommendations:
        dynamics = quality.keep_usable(t["streams"], t["quality"], quality.PURPOSE_DYNAMICS)
        recs = kalman.recommend_timescales(kalman.estimate_local_level(dynamics))
    return build_report(
        streams,
        t["series"],
        rolling,
        t["progress"],
        t["variance"],
        recs,
        [],
        {},
        verdicts=[_verdict("task11", "change")],
        series_quality=t["quality"],
        learning=learning,
    )


def _figure_tasks_in(figure: Figure) -> set[str]:
    text = figure.figure.to_json()
    return set(re.findall(r"task\d\d", text))


def test_figures_and_tables_show_at_most_the_cap(many_tasks) -> None:
    """Beyond the cap the per-task tables list the figure tasks, as the figures do (the
    rows of every task are in tables/*.csv: test_report_at_scale.py)."""
    doc = _build(many_tasks, many_tasks["streams"], many_tasks["rolling"])
    with_timescales = _build(
        many_tasks, many_tasks["streams"], many_tasks["rolling"], recommendations=True
    )
    shown = figure_tasks([f"task{t:02d}" for t in range(N_TASKS)], [_verdict("task11", "change")])
    assert len(shown) == MAX_FIGURE_TASKS and "task11" in shown
    (timescales,) = [
        b
        for b in with_timescales.blocks
        if isinstance(b, Table) and "timescale 1/K" in " ".join(b.header)
    ]
    listed = {(row[0], row[1]) for row in timescales.rows}
    assert {task for task, _ in listed} == set(shown)  # label and pooled rows
    assert any(label != "*" for _, label in listed) and any(label == "*" for _, label in listed)
    assert with_timescales.tables["timescales"]["task"].n_unique() == N_TASKS
    per_task_figures = [f for f in doc.figures if _figure_tasks_in(f)]
    assert len(per_task_figures) >= 4  # reward curves, bands, noise by task, ...
    for figure in per_task_figures:
        assert _figure_tasks_in(figure) <= set(shown), figure.name
    # the verdict section is the one place every task is named (here: one verdict)
    tables = [b for b in doc.blocks if isinstance(b, Table) and b.header[0] == "task"]
    assert {str(row[0]) for table in tables for row in table.rows} == set(shown)
    notes = [
        b for b in doc.blocks if isinstance(b, Paragraph) and b.parts[0].startswith("The figures")
    ]
    assert len(notes) == 1 and f"{MAX_FIGURE_TASKS} of the {N_TASKS} tasks" in notes[0].parts[0]


def test_the_report_from_the_shown_tasks_streams_is_the_report_from_all(many_tasks) -> None:
    t = many_tasks
    tasks = sorted(set(t["streams"]["task"]))
    chosen = figure_tasks(tasks, [_verdict("task11", "change")])
    assert chosen != tasks[:MAX_FIGURE_TASKS]  # the verdict moved task11 in
    # the asset's inputs: streams and rolling of the figure tasks, learning of every run
    shown = pl.col("task").is_in(chosen)
    learning = learning_slopes(
        quality.keep_usable(t["streams"], t["quality"], quality.PURPOSE_LEVEL)
    )
    full = _build(t, t["streams"], t["rolling"])
    part = _build(t, t["streams"].filter(shown), t["rolling"].filter(shown), learning)

    def text(doc) -> str:
        markdown = render_markdown(doc, {}, "report.html", "")
        return re.sub(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", "Generated", markdown)

    assert text(part) == text(full)
    for a, b in zip(full.figures, part.figures, strict=True):
        assert a.name == b.name
        assert a.figure.to_json() == b.figure.to_json(), a.name
