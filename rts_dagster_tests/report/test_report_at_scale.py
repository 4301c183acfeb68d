"""The report at more tasks than the figures show: every per-task sentence and row covers
the figure tasks, each place that leaves tasks out says how many and links the CSV with
every task's rows, the counts and statements across tasks and the verdicts cover all; at
8 tasks or fewer nothing is left out. Untrusted task labels stay text: escaped in the
report, one quoted cell in a CSV, never a file name."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from rts_dagster.analysis import epoch_view, kalman, metrics, quality, summaries, variance
from rts_dagster.analysis.learning import learning_slopes, learning_summary
from rts_dagster.analysis.lp_sweep import METTA_DEFAULT
from rts_dagster.analysis.verdict import Verdict
from rts_dagster.report.build import MAX_FIGURE_TASKS, build_report, figure_tasks
from rts_dagster.report.document import (
    Bullets,
    Heading,
    Link,
    Paragraph,
    Report,
    Table,
    csv_text,
    write_report,
)
from rts_dagster.report.scope import Findings, split_findings
from rts_dagster.schema import (
    LP_CLOSED_LOOP,
    LP_CLOSED_LOOP_SUMMARY,
    LP_RECOMMENDATIONS,
    LP_REPLAY_TRACE,
    LP_SWEEP_SUMMARY,
)
from rts_dagster_tests.report.test_experiments_section import _tables as experiment_tables
from rts_dagster_tests.report.test_lp_section import _frame, _rec, _summary, _traces
from rts_dagster_tests.synthetic import run_streams

# sorts first, so it is among the tasks shown; the other sorts last and is left out
HOSTILE_SHOWN = "../<b>x</b>|*y* [l](http://e)"
HOSTILE_LEFT_OUT = "zz/../../etc <script>alert(1)</script>|`q`"
TASKS = [HOSTILE_SHOWN, *(f"task{i:02d}" for i in range(10)), HOSTILE_LEFT_OUT]
CHANGED = "task09"  # its verdict changes an LP setting: shown although it sorts late
SHOWN = sorted([CHANGED, HOSTILE_SHOWN, *(f"task{i:02d}" for i in range(6))])
LEFT_OUT = sorted(set(TASKS) - set(SHOWN))
EXPERIMENT_ON = "task07"  # its experiment is left out with it
# every part that leaves tasks out names its CSV (tables/<name>.csv)
PER_TASK_TABLES = {
    "wandb_runs",
    "runs_per_granularity",
    "left_out",
    "timescales",
    "learning",
    "epoch_view",
    "lp_recommendations",
    "lp_pole_fraction",
    "lp_closed_loop_missing",
    "noise_trend",
    "per_label_metrics",
    "variance",
    "sps_noise",
    "sps_correlation",
    "lp_configs",
    "experiment_comparison",
}
LEFT_OUT_LINE = re.compile(
    r"(\d+) other tasks?'s? [a-z ]+ are left out here \(this part covers the (\d+) tasks the "
    r"figures show\); every task's rows: \[[^\]]*\]\(tables/([a-z_]+)\.csv\)\."
)


def _verdict(task: str, action: str = "keep_default") -> Verdict:
    return Verdict(
        task=task, action=action, proposal=None, confidence="low", conflict=False, rule="t"
    )


def _lp(tasks: list[str]) -> dict[str, pl.DataFrame]:
    """lp_recommendations tables with a row per task: every task's replay, its pole
    fraction and traces; no closed loop."""
    recs, summary, traces = [], [], []
    for i, task in enumerate(tasks):
        passed = i % 2 == 0
        recs.append(
            _rec(
                task,
                "main_ema_0.1" if passed else METTA_DEFAULT,
                "zscore_z30",
                confident=passed,
                actionable=passed,
                sentence=f"{task}: replayed sentence.",
            )
        )
        summary += _summary(
            task,
            {METTA_DEFAULT: (0.0, 0.0, 0.0), "main_ema_0.1": (0.3, 0.1, 0.5)},
        )
        summary.append(
            {**_summary(task, {METTA_DEFAULT: (0.0, 0.0, 0.0)})[0], "metric": "pole_fraction"}
        )
        traces += _traces(task, [METTA_DEFAULT, "main_ema_0.1"], ["rise", "flat"], seeds=(1,))
    return {
        "summary": _frame(summary, LP_SWEEP_SUMMARY),
        "recommendations": _frame(recs, LP_RECOMMENDATIONS),
        "closed_loop_runs": _frame([], LP_CLOSED_LOOP),
        "closed_loop": _frame([], LP_CLOSED_LOOP_SUMMARY),
        "traces": _frame(traces, LP_REPLAY_TRACE),
    }


def _experiments(task: str) -> dict[str, pl.DataFrame]:
    """The Experiments section's hand-made tables, moved to `task`."""
    return {
        name: frame.with_columns(pl.lit(task).alias("task"))
        for name, frame in experiment_tables().items()
    }


def _inputs(tasks: list[str]) -> tuple[tuple, dict]:
    """build_report's arguments for `tasks` (two seeds each), as the report asset passes
    them: the timescale findings of every task, learning slopes of every run."""
    rng = np.random.default_rng(7)
    streams = pl.concat([run_streams(task, seed, rng, n=120) for task in tasks for seed in (1, 2)])
    result = metrics.compute_metrics(streams)
    series_q = quality.series_quality(streams)
    level = quality.keep_usable(streams, series_q, quality.PURPOSE_LEVEL)
    dynamics = quality.keep_usable(streams, series_q, quality.PURPOSE_DYNAMICS)
    recs = kalman.recommend_timescales(kalman.estimate_local_level(dynamics))
    var = variance.variance_table(
        quality.keep_usable(result.series, series_q, quality.PURPOSE_LEVEL)
    )
    runs = series_q["run_id"].unique().sort().to_list()
    args = (
        streams,
        result.series,
        result.rolling,
        result.progress,
        var,
        recs,
        kalman.describe_recommendations(recs),
        {task: {"ema_timescale": 0.001, "slow_timescale_factor": 0.2} for task in tasks},
    )
    experiment_task = EXPERIMENT_ON if EXPERIMENT_ON in tasks else tasks[-1]
    kwargs = {
        "lp": _lp(tasks),
        "verdicts": [_verdict(t, "change" if t == CHANGED else "keep_default") for t in tasks],
        "series_quality": series_q,
        "epoch_views": epoch_view.epoch_view(level),
        "run_urls": {run: f"https://wandb.ai/e/p/runs/{i}" for i, run in enumerate(runs)},
        "experiments": _experiments(experiment_task),
        "learning": learning_slopes(level),
    }
    return args, kwargs


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> dict:
    args, kwargs = _inputs(TASKS)
    doc = build_report(*args, **kwargs)
    out_dir = tmp_path_factory.mktemp("many") / "report"
    written = write_report(doc, out_dir, want_png=False)
    return {
        "args": args,
        "kwargs": kwargs,
        "doc": doc,
        "dir": out_dir,
        "md": written["markdown"].read_text(),
        "html": written["html"].read_text(),
        "written": written,
    }


def _sections(doc: Report) -> dict[str, list]:
    """Level-2 heading -> the blocks under it (level-3/4 headings stay inside)."""
    out: dict[str, list] = {"": []}
    current = ""
    for block in doc.blocks:
        if isinstance(block, Heading) and block.level == 2:
            current = block.text
            out[current] = []
        else:
            out[current].append(block)
    return out


def _texts(block) -> list[str]:
    if isinstance(block, Paragraph):
        return ["".join(p if isinstance(p, str) else p.text for p in block.parts)]
    if isinstance(block, Bullets):
        return list(block.items)
    if isinstance(block, Table):
        return [block.caption, *(str(c) for row in block.rows for c in row)]
    return []


def test_the_shown_tasks_are_the_figure_tasks() -> None:
    assert figure_tasks(TASKS, [_verdict(CHANGED, "change")]) == SHOWN
    assert len(SHOWN) == MAX_FIGURE_TASKS and len(LEFT_OUT) == len(TASKS) - MAX_FIGURE_TASKS


def test_per_task_parts_list_only_the_shown_tasks(many) -> None:
    args, kwargs, doc = many["args"], many["kwargs"], many["doc"]
    across = split_findings(args[6], args[5], SHOWN).across_tasks  # may name any task
    sections = _sections(doc)
    for heading, blocks in sections.items():
        if heading == "Verdict per task":
            continue
        for block in blocks:
            for text in _texts(block):
                if text in across:
                    continue
                for task in LEFT_OUT:
                    assert task not in text, (heading, text[:200])
    # every per-task table lists the shown tasks, all of them where each has rows
    task_tables = [
        b
        for heading, blocks in sections.items()
        if heading != "Verdict per task"
        for b in blocks
        if isinstance(b, Table) and b.header[0] == "task"
    ]
    assert len(task_tables) >= 8
    for table in task_tables:
        assert {row[0] for row in table.rows} <= set(SHOWN), table.caption
    for caption_start in ("Runs with at least one", "Per label: mean slope", "Medians over"):
        (table,) = [t for t in task_tables if t.caption.startswith(caption_start)]
        assert {row[0] for row in table.rows} == set(SHOWN)
    # the timescale table: label and pooled rows of the shown tasks only
    (timescales,) = [t for t in task_tables if "timescale 1/K [95% CI]" in t.header]
    assert {row[0] for row in timescales.rows} == set(SHOWN)
    assert {row[1] for row in timescales.rows} > {"*"}
    # the experiment of a task left out is not drawn
    assert not [f for f in doc.figures if f.name.startswith("experiment_")]
    assert kwargs["experiments"]["comparison"]["task"].unique().to_list() == [EXPERIMENT_ON]


def test_each_part_that_leaves_tasks_out_says_how_many_and_links_its_csv(many) -> None:
    found: dict[str, set[int]] = {}
    for n, shown, name in LEFT_OUT_LINE.findall(many["md"]):
        assert int(shown) == len(SHOWN)
        found.setdefault(name, set()).add(int(n))
    assert set(found) == PER_TASK_TABLES
    for name, counts in found.items():
        expected = 1 if name.startswith("experiment_") else len(LEFT_OUT)
        assert counts == {expected}, name
    # the same links in the HTML, relative, to files that exist
    for name in PER_TASK_TABLES:
        assert f"<a href='tables/{name}.csv'>tables/{name}.csv</a>" in many["html"]
        assert (many["dir"] / "tables" / f"{name}.csv").is_file()
    # the header says which tasks the figures and per-task parts show
    note = next(
        b.parts[0]
        for b in many["doc"].blocks
        if isinstance(b, Paragraph) and str(b.parts[0]).startswith("The figures show")
    )
    assert f"{len(SHOWN)} of the {len(TASKS)} tasks" in note and "tables/" in note


def _read(many, name: str, like: pl.DataFrame) -> pl.DataFrame:
    """tables/<name>.csv read back with the types of `like` (lists as their joined text)."""
    return pl.read_csv(many["dir"] / "tables" / f"{name}.csv", schema=_flat_schema(like))


def _flat_schema(frame: pl.DataFrame) -> pl.Schema:
    return pl.Schema(
        {
            name: pl.String if isinstance(dtype, pl.List | pl.Struct) else dtype
            for name, dtype in frame.schema.items()
        }
    )


def _flat(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(
        pl.col(name).cast(pl.List(pl.String)).list.join(", ")
        for name, dtype in frame.schema.items()
        if isinstance(dtype, pl.List)
    )


def test_the_csvs_hold_every_tasks_rows(many) -> None:
    args, kwargs = many["args"], many["kwargs"]
    lp_recs = kwargs["lp"]["recommendations"].sort("task", "granularity")
    expected = {
        "variance": args[4],
        "timescales": args[5],
        "learning": learning_summary(kwargs["learning"]),
        "lp_recommendations": lp_recs,
        "left_out": quality.left_out(kwargs["series_quality"], quality.PURPOSE_DYNAMICS),
        "noise_trend": summaries.noise_trend(
            quality.keep_usable(args[3], kwargs["series_quality"], quality.PURPOSE_DYNAMICS)
        ),
        "epoch_view": epoch_view.summarise_by_task(kwargs["epoch_views"]),
        "experiment_comparison": kwargs["experiments"]["comparison"],
    }
    for name, table in expected.items():
        read = _read(many, name, table)
        assert_frame_equal(read, _flat(table), check_exact=True)
    for name in PER_TASK_TABLES - {"variance", "experiment_comparison"}:
        read = pl.read_csv(many["dir"] / "tables" / f"{name}.csv", infer_schema=False)
        assert set(read["task"]) == set(TASKS), name
    variance_tasks = set(
        pl.read_csv(many["dir"] / "tables" / "variance.csv", infer_schema=False)["scope"]
        .str.strip_prefix("within_task:")
        .to_list()
    )
    assert variance_tasks == {"across_tasks", *TASKS}


def test_the_verdicts_and_the_statements_across_tasks_cover_every_task(many) -> None:
    doc, md, args, kwargs = many["doc"], many["md"], many["args"], many["kwargs"]
    verdicts = _sections(doc)["Verdict per task"]
    bullets = next(b for b in verdicts if isinstance(b, Bullets))
    assert len(bullets.items) == len(TASKS)
    for item, task in zip(bullets.items, TASKS, strict=True):
        assert item.startswith(f"{task}: ")
    assert f"runs over {len(TASKS)} tasks" in md
    # the statements across tasks: after the shown tasks' own findings, over all tasks
    split = split_findings(args[6], args[5], SHOWN)
    assert split.across_tasks and split.across_tasks == args[6][-len(split.across_tasks) :]
    for sentence in split.across_tasks:
        assert f"{len(TASKS)} tasks" in sentence or f"{len(TASKS) - 1} other" in sentence
    findings = _sections(doc)["What the streams show"]
    shown_own = [
        s
        for task in SHOWN
        for s in kalman.describe_recommendations(args[5].filter(pl.col("task") == task))
    ]
    listed = [s for b in findings if isinstance(b, Bullets) for s in b.items]
    assert sorted(listed) == sorted(shown_own + split.across_tasks)
    # the one-line summaries count every task
    text = "\n".join(t for b in doc.blocks for t in _texts(b))
    summary = learning_summary(kwargs["learning"])
    rising = summary.filter(pl.col("n_rising") == pl.col("n_runs")).height
    assert (
        f"Across all {len(TASKS)} tasks: {rising} of {summary.height} labels (per task and "
        "granularity) rise in every one of their runs" in text
    )
    assert text.count(f"Across all {len(TASKS)} tasks") >= 9
    assert f"Within-task rows of all {len(TASKS)} tasks" in text
    passed = kwargs["lp"]["recommendations"]["confident"].sum()
    assert f"a configuration passes every check in {passed} rows of {passed} tasks" in text
    assert (
        f"{len(TASKS)} record an LP config in their runs, 1 distinct: ema_timescale=0.001, "
        "slow_timescale_factor=0.2" in text
    )
    assert f"Across all {len(TASKS)} tasks, {len(TASKS)} have no closed-loop comparison" in text


def test_with_at_most_eight_tasks_nothing_is_left_out(tmp_path) -> None:
    tasks = TASKS[:6]
    args, kwargs = _inputs(tasks)
    doc = build_report(*args, **kwargs)
    md = write_report(doc, tmp_path, want_png=False)["markdown"].read_text()
    assert "left out here" not in md and "Across all" not in md and "](tables/" not in md
    assert not [b for b in doc.blocks if isinstance(b, Paragraph) and "figures show" in str(b)]
    header = next(b for b in doc.blocks if isinstance(b, Paragraph)).parts[0]
    assert f"runs over 6 tasks ({', '.join(sorted(tasks))})" in header
    assert args[6] and all(
        s in [i for b in doc.blocks if isinstance(b, Bullets) for i in b.items] for s in args[6]
    )
    (timescales,) = [b for b in doc.blocks if isinstance(b, Table) and "vs LP" in b.header]
    assert len(timescales.rows) == args[5].height
    # the CSVs are written at any number of tasks
    assert (tmp_path / "tables" / "timescales.csv").is_file()


def test_a_hostile_task_label_is_escaped_and_stays_data(many) -> None:
    md, html_text, out_dir = many["md"], many["html"], many["dir"]
    assert "<b>x</b>" not in md and "<script>" not in md
    assert "\\<b\\>x\\</b\\>\\|\\*y\\* \\[l\\](http://e)" in md  # shown, escaped
    body = html_text.split("</script>", 1)[1]  # after the inlined plotly.js
    assert "<b>x</b>" not in body and "<script>alert" not in body
    assert "&lt;b&gt;x&lt;/b&gt;|*y*" in body
    # in a CSV a label is one quoted cell, read back exactly; file names are our own
    tasks = set(pl.read_csv(out_dir / "tables" / "learning.csv", infer_schema=False)["task"])
    assert {HOSTILE_SHOWN, HOSTILE_LEFT_OUT} <= tasks
    raw = (out_dir / "tables" / "learning.csv").read_text()
    assert f'"{HOSTILE_LEFT_OUT}"' not in raw  # nothing in it needs quotes: kept as is
    assert f"\n{HOSTILE_LEFT_OUT}," in raw
    names = {p.name for p in (out_dir / "tables").iterdir()}
    assert names == {f"{n}.csv" for n in many["doc"].tables}
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*\.csv", n) for n in names)
    written = [p.relative_to(out_dir.parent) for p in out_dir.parent.rglob("*")]
    assert all(p.parts[0] == out_dir.name for p in written)  # nothing outside the report dir
    assert not [p for p in written if "etc" in p.parts or "<" in str(p)]


def test_links_and_table_files_take_only_our_own_names() -> None:
    for href in ("../x.csv", "/etc/passwd", "http://e/x.csv", "tables/<b>.csv", "tables/x"):
        with pytest.raises(ValueError):
            Link("x", href)
    report = Report(title="t")
    for name in ("../evil", "a b", "X", ""):
        with pytest.raises(ValueError):
            report.add_table_file(name, pl.DataFrame({"task": ["t"]}))


def test_a_csv_quotes_what_would_break_it() -> None:
    frame = pl.DataFrame(
        {
            "task": [HOSTILE_LEFT_OUT, 'a,"b"\nc'],
            "runs": [["r1", "r2"], []],
            "value": [math.inf, float("nan")],
        }
    )
    text = csv_text(frame)
    back = pl.read_csv(
        text.encode(), schema={"task": pl.String, "runs": pl.String, "value": pl.Float64}
    )
    assert back["task"].to_list() == frame["task"].to_list()
    assert back["runs"].to_list() == ["r1, r2", ""]
    assert back["value"][0] == math.inf and math.isnan(back["value"][1])


def test_a_csv_cell_a_spreadsheet_would_run_is_kept_as_text() -> None:
    frame = pl.DataFrame(
        {
            "task": ['=HYPERLINK("http://e")', "+1", "@SUM(A1)", "-x", "a=b", "ok"],
            "runs": [["=cmd"], ["r"], [], ["\tx"], ["y"], ["z"]],
            "value": [-1.0, 2.0, 3.0, -4.0, 5.0, 6.0],
        }
    )
    back = pl.read_csv(
        csv_text(frame).encode(),
        schema={"task": pl.String, "runs": pl.String, "value": pl.Float64},
    )
    assert back["task"].to_list() == [
        '\'=HYPERLINK("http://e")',
        "'+1",
        "'@SUM(A1)",
        "'-x",
        "a=b",
        "ok",
    ]
    assert back["runs"].to_list() == ["'=cmd", "r", "", "'\tx", "y", "z"]
    assert back["value"].to_list() == frame["value"].to_list()  # numbers stay numbers


def test_stale_csvs_of_an_earlier_report_are_removed(tmp_path) -> None:
    report = Report(title="t")
    report.add_table_file("kept", pl.DataFrame({"a": [1]}))
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "gone.csv").write_text("a\n1\n")
    (tmp_path / "tables" / "Notes.CSV.txt").write_text("not ours")
    write_report(report, tmp_path, want_png=False)
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["Notes.CSV.txt", "kept.csv"]


def test_the_report_dir_has_only_what_write_report_writes(many) -> None:
    names = {p.name for p in Path(many["dir"]).iterdir()}
    assert names == {"report.md", "report.html", "tables", "figures"}


def test_the_findings_split_into_each_tasks_own_and_the_statements_across(many) -> None:
    """Each task's own sentences are those of its rows alone; with the statements across
    tasks they give back describe_recommendations' list. A caller may pass the split
    (only the shown tasks' sentences): the report is the same."""
    args, kwargs = many["args"], many["kwargs"]
    recs, findings = args[5], args[6]
    every = split_findings(findings, recs, TASKS)
    order = recs["task"].unique(maintain_order=True).to_list()
    assert [s for t in order for s in every.by_task[t]] + every.across_tasks == findings
    for task in TASKS:
        own = kalman.describe_recommendations(recs.filter(pl.col("task") == task))
        assert every.by_task[task] == own
    assert split_findings(["not a finding"], recs, TASKS) is None
    shown_only = Findings({t: every.by_task[t] for t in SHOWN}, every.across_tasks)
    again = build_report(*args[:6], shown_only, *args[7:], **kwargs)

    def text(doc: Report) -> list[str]:
        return [t for b in doc.blocks for t in _texts(b) if not t.startswith("Generated")]

    assert text(again) == text(many["doc"])
