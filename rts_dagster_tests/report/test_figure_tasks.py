"""With many tasks the figures show a few (verdict changes first) and the tables every
task; the report built from only the shown tasks' streams (what the `report` asset
loads) is the report built from every stream."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

from rts_dagster.analysis import kalman, metrics, quality, variance
from rts_dagster.analysis.learning import learning_slopes
from rts_dagster.analysis.verdict import Verdict
from rts_dagster.report.build import MAX_FIGURE_TASKS, build_report, figure_tasks, shown_note
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


def test_figures_show_at_most_the_cap_and_tables_every_task(many_tasks) -> None:
    doc = _build(many_tasks, many_tasks["streams"], many_tasks["rolling"])
    with_timescales = _build(
        many_tasks, many_tasks["streams"], many_tasks["rolling"], recommendations=True
    )
    (timescales,) = [
        b
        for b in with_timescales.blocks
        if isinstance(b, Table) and "timescale 1/K" in " ".join(b.header)
    ]
    listed = {(row[0], row[1]) for row in timescales.rows}
    assert {task for task, _ in listed} == {f"task{t:02d}" for t in range(N_TASKS)}
    for task, label in listed:  # label rows only for the tasks the figures show
        assert label == "*" or task in figure_tasks(
            [f"task{t:02d}" for t in range(N_TASKS)], [_verdict("task11", "change")]
        ), (task, label)
    assert any(label != "*" for _, label in listed)
    assert "every row is in metrics/timescale_recommendations.parquet" in timescales.caption
    shown = figure_tasks([f"task{t:02d}" for t in range(N_TASKS)], [_verdict("task11", "change")])
    assert len(shown) == MAX_FIGURE_TASKS and "task11" in shown
    per_task_figures = [f for f in doc.figures if _figure_tasks_in(f)]
    assert len(per_task_figures) >= 4  # reward curves, bands, noise by task, ...
    for figure in per_task_figures:
        assert _figure_tasks_in(figure) <= set(shown), figure.name
    tables = [b for b in doc.blocks if isinstance(b, Table)]
    in_tables = {str(cell) for table in tables for row in table.rows for cell in row}
    assert {f"task{t:02d}" for t in range(N_TASKS)} <= in_tables
    notes = [b for b in doc.blocks if isinstance(b, Paragraph) and "figures show" in b.parts[0]]
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
