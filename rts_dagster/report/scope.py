"""Which tasks the report's per-task parts cover, and the CSV files that hold every task.

With more tasks than the figures show (`build.MAX_FIGURE_TASKS`), every per-task sentence
and table row covers the tasks the figures show and nothing else: hundreds of tasks' rows
are not read in a document. Each place that leaves tasks out says how many in one line
and links the CSV (report/tables/<name>.csv) with every task's rows. Counts and statements
across tasks, and the verdicts, still cover every task.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import polars as pl

from rts_dagster.analysis.kalman import describe_by_task
from rts_dagster.report.document import Link, Paragraph, Report


@dataclass(frozen=True)
class TaskScope:
    """`tasks`: every task of the report; `shown`: those the per-task parts list (the
    figure tasks). When they are the same, nothing is left out and nothing is said."""

    tasks: tuple[str, ...]
    shown: tuple[str, ...]

    @classmethod
    def of(cls, tasks: Iterable[str], shown: Iterable[str] | None = None) -> TaskScope:
        every = tuple(sorted(set(tasks)))
        return cls(every, every if shown is None else tuple(sorted(set(shown))))

    @property
    def limited(self) -> bool:
        return bool(set(self.tasks) - set(self.shown))

    def keep(self, frame: pl.DataFrame, column: str = "task") -> pl.DataFrame:
        """The rows of the shown tasks (every row when nothing is left out)."""
        if not self.limited:
            return frame
        return frame.filter(pl.col(column).is_in(self.shown))

    def keep_names(self, names: Sequence[str]) -> list[str]:
        """`names` (tasks) that are shown, in their order."""
        if not self.limited:
            return list(names)
        shown = set(self.shown)
        return [n for n in names if n in shown]

    def n_left_out(self, frame: pl.DataFrame, column: str = "task") -> int:
        """How many tasks that have rows in `frame` are not shown."""
        if not self.limited or frame.height == 0:
            return 0
        return frame.filter(~pl.col(column).is_in(self.shown))[column].n_unique()

    def publish(
        self,
        report: Report,
        name: str,
        frame: pl.DataFrame,
        column: str = "task",
        what: str = "rows",
    ) -> None:
        """Keep `frame` (every task's rows) for tables/<name>.csv and, when it has rows of
        tasks that are not shown, add the line saying how many and linking the file."""
        href = report.add_table_file(name, frame)
        if note := self.left_out_note(frame, href, column, what):
            report.add(note)

    def left_out_note(
        self, frame: pl.DataFrame, href: str, column: str = "task", what: str = "rows"
    ) -> Paragraph | None:
        n = self.n_left_out(frame, column)
        if n == 0:
            return None
        whose = "task's" if n == 1 else "tasks'"
        return Paragraph(
            [
                f"{n} other {whose} {what} are left out here (this part covers the "
                f"{len(self.shown)} tasks the figures show); every task's rows: ",
                Link(href, href),
                ".",
            ]
        )


@dataclass(frozen=True)
class Findings:
    """The timescale findings (`kalman.describe_recommendations`) split by what they are
    about: each task's own sentences (the tasks the report shows are enough) and the
    statements across tasks (the noisiest task, adjusted for picking it among all)."""

    by_task: dict[str, list[str]]  # in the order of the findings
    across_tasks: list[str]


def split_findings(
    findings: Sequence[str], recommendations: pl.DataFrame, tasks: Iterable[str]
) -> Findings | None:
    """`findings` (the describe_recommendations sentences of every task in
    `recommendations`) split into the sentences of `tasks` and the statements across tasks;
    None when `findings` are not of that form (then nothing can be left out safely).

    describe_recommendations writes each task's sentences in the table's task order, then
    the statements across tasks; each task's own are those `describe_by_task` gives it
    (one call for every task: one per task cost ~20 ms each)."""
    if recommendations.height == 0:
        return Findings({}, list(findings))
    blocks, _ = describe_by_task(recommendations)

    def own(task: str) -> list[str]:
        return blocks.get(task, [])

    order = recommendations["task"].unique(maintain_order=True).to_list()
    for task in reversed(order):  # the statements across tasks follow the last task's own
        block = own(task)
        if not block:
            continue
        n = len(block)
        end = next(
            (k for k in range(len(findings), n - 1, -1) if list(findings[k - n : k]) == block),
            None,
        )
        if end is None:
            return None
        break
    else:  # no task has a sentence of its own: every finding is across tasks
        end = 0
    given, wanted = set(findings[:end]), set(tasks)
    by_task = {task: [s for s in own(task) if s in given] for task in order if task in wanted}
    return Findings(by_task, list(findings[end:]))
