"""The report's Experiments section on hand-made experiment tables: headings, intervals
always with their method (never one where the ci is null), ratio vs difference wording,
missing seeds and planned runs, epoch means named, untrusted arm names escaped."""

import html
import re

import polars as pl
import pytest
from markdown_it import MarkdownIt

from rts_dagster.report import figures
from rts_dagster.report.document import Report, Table, write_report
from rts_dagster.report.experiments import (
    ARMS_FORMED,
    EPOCH_NOTE,
    HEADING,
    add_experiments_section,
    interval_text,
    noise_sentence,
)
from rts_dagster.schema import (
    EXPERIMENT_COMPARISON,
    EXPERIMENT_CURVES,
    EXPERIMENT_DIFFERENCE,
    EXPERIMENT_PLAN,
    EXPERIMENT_RUN_METRICS,
    conform,
)

RENDER = MarkdownIt("commonmark").enable("table").enable("strikethrough")
TASK = "fixed_maps"
Z30 = "z_score_amplification=30"
EVIL_ARM = "z*30_[x](y)<script>alert(1)</script>|pipe"
PAIRED_LOG = "paired t on logs, 95%, n=3 pairs"
PAIRED = "paired t, 95%, n=3 pairs"
NAN = float("nan")


def _frame(rows: list[dict], schema: pl.Schema) -> pl.DataFrame:
    filled = [{name: row.get(name) for name in schema.names()} for row in rows]
    return conform(pl.DataFrame(filled, schema=schema), schema)


def _cmp(arm: str, metric: str, granularity: str = "completion", **over) -> dict:
    row = {
        "task": TASK,
        "arm": arm,
        "baseline": "baseline",
        "granularity": granularity,
        "metric": metric,
        "unit": "reward",
        "scale": "difference",
        "arm_value": 0.62,
        "baseline_value": 0.5,
        "difference": 0.12,
        "ci_low": 0.02,
        "ci_high": 0.22,
        "n_seeds_arm": 3,
        "n_seeds_baseline": 3,
        "paired": True,
        "method": PAIRED,
        "seeds_for_80pct_power": 4,
        "note": None,
    }
    return {**row, **over}


def _comparison() -> pl.DataFrame:
    rows = [
        # ratio whose interval excludes 1: "lowers ... to 0.710x"
        _cmp(
            Z30,
            "noise_after_convergence",
            scale="ratio",
            arm_value=0.0355,
            baseline_value=0.05,
            difference=0.71,
            ci_low=0.55,
            ci_high=0.92,
            method=PAIRED_LOG,
        ),
        # ratio whose interval spans 1: "cannot tell"
        _cmp(
            Z30,
            "noise_before_convergence",
            scale="ratio",
            arm_value=0.1,
            baseline_value=0.095,
            difference=1.05,
            ci_low=0.8,
            ci_high=1.3,
            method=PAIRED_LOG,
        ),
        _cmp(Z30, "final_reward"),
        # a null ci with a method named: the method must not be printed as an interval
        _cmp(
            Z30,
            "time_to_threshold",
            unit="agent steps",
            arm_value=2.0e6,
            baseline_value=2.5e6,
            difference=-5.0e5,
            ci_low=None,
            ci_high=None,
            note="2 of 6 labels never reached the threshold (censored)",
            seeds_for_80pct_power=None,
        ),
        # NaN bounds and no note: a reason is still given
        _cmp(Z30, "slope_after_convergence", ci_low=NAN, ci_high=NAN),
        _cmp(
            Z30,
            "probability_of_improvement",
            scale="probability",
            unit="probability",
            arm_value=0.667,
            baseline_value=None,
            difference=0.667,
            ci_low=None,
            ci_high=None,
            method=None,
            seeds_for_80pct_power=None,
            note="a valid interval needs more seeds",
        ),
        # epoch granularity: ratio that raises the noise (interval above 1)
        _cmp(
            Z30,
            "noise_after_convergence",
            "epoch",
            scale="ratio",
            arm_value=0.012,
            baseline_value=0.01,
            difference=1.2,
            ci_low=1.05,
            ci_high=1.37,
            method=PAIRED_LOG,
        ),
        _cmp(Z30, "final_reward", "epoch", difference=-0.03, ci_low=-0.08, ci_high=0.02),
        # the untrusted arm: one seed, so no interval at all
        _cmp(
            EVIL_ARM,
            "noise_after_convergence",
            scale="ratio",
            difference=0.9,
            ci_low=None,
            ci_high=None,
            n_seeds_arm=1,
            paired=False,
            method=None,
            seeds_for_80pct_power=None,
        ),
        _cmp(
            EVIL_ARM,
            "final_reward",
            ci_low=None,
            ci_high=None,
            n_seeds_arm=1,
            method=None,
            seeds_for_80pct_power=None,
        ),
    ]
    return _frame(rows, EXPERIMENT_COMPARISON)


def _curves() -> pl.DataFrame:
    rows = []
    for arm, n_seeds in (("baseline", 3), (Z30, 3), (EVIL_ARM, 1)):
        for granularity in ("completion", "epoch"):
            for b in range(4):
                mean = 0.2 + 0.1 * b
                has_ci = n_seeds > 1
                rows.append(
                    {
                        "task": TASK,
                        "arm": arm,
                        "granularity": granularity,
                        "bin": b,
                        "agent_step": 1e6 * (b + 0.5),
                        "mean_reward": mean,
                        "ci_low": mean - 0.05 if has_ci else None,
                        "ci_high": mean + 0.05 if has_ci else None,
                        "n_seeds": n_seeds,
                        "method": "t, 95%, n=3 seeds" if has_ci else None,
                    }
                )
    return _frame(rows, EXPERIMENT_CURVES)


def _difference() -> pl.DataFrame:
    rows = [
        {
            "task": TASK,
            "arm": arm,
            "baseline": "baseline",
            "granularity": granularity,
            "bin": b,
            "agent_step": 1e6 * (b + 0.5),
            "difference": 0.05 * b,
            "ci_low": 0.05 * b - 0.04 if arm == Z30 else None,
            "ci_high": 0.05 * b + 0.04 if arm == Z30 else None,
            "n": 3 if arm == Z30 else 1,
            "paired": arm == Z30,
            "method": PAIRED if arm == Z30 else None,
        }
        for arm in (Z30, EVIL_ARM)
        for granularity in ("completion", "epoch")
        for b in range(4)
    ]
    return _frame(rows, EXPERIMENT_DIFFERENCE)


def _run_metrics() -> pl.DataFrame:
    rows = [
        {
            "task": TASK,
            "arm": arm,
            "seed": seed,
            "run_id": f"alice.{TASK}.{arm}.seed{seed}",
            "granularity": "completion",
            "metric": "final_reward",
            "unit": "reward",
            "value": 0.5,
            "n_labels": 6,
            "note": None,
        }
        for arm, seeds in (("baseline", (1, 2, 3)), (Z30, (1, 2, 3)), (EVIL_ARM, (1,)))
        for seed in seeds
    ]
    return _frame(rows, EXPERIMENT_RUN_METRICS)


def _plan() -> pl.DataFrame:
    rows = [
        {
            "task": TASK,
            "recipe": "recipes.prod.cvc.fixed_maps.train",
            "arm": EVIL_ARM,
            "seed": seed,
            "run_name": f"alice.fixed_maps.evil.seed{seed}",
            "overrides": ["trainer.curriculum.algorithm.z_score_amplification=30"],
            "command": "launch ...",
            "reason": "settle the verdict",
            "exists": seed == 1,
            "found_arm": EVIL_ARM if seed == 1 else None,
        }
        for seed in (1, 2, 3)
    ]
    rows.append({**rows[0], "arm": Z30, "run_name": "alice.fixed_maps.z30.seed1"})
    rows[-1]["found_arm"] = "baseline"  # exists, but discovery put it in another arm
    return _frame(rows, EXPERIMENT_PLAN)


def _tables() -> dict[str, pl.DataFrame]:
    return {
        "comparison": _comparison(),
        "curves": _curves(),
        "difference": _difference(),
        "run_metrics": _run_metrics(),
        "plan": _plan(),
    }


def _render(tmp_path, tables: dict) -> tuple[str, str, Report]:
    report = Report(title="Experiments")
    add_experiments_section(report, **tables)
    out = write_report(report, tmp_path, want_png=False)
    return out["markdown"].read_text(), out["html"].read_text(), report


def _visible(markdown: str) -> str:
    """The visible text of the rendered markdown (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", RENDER.render(markdown)))


def _rendered_tables(markdown: str, report: Report, first: str) -> dict[str, list[list[str]]]:
    """Caption -> body rows (the visible text of every cell) of each rendered table whose
    first header is `first`; rendered tables and the report's Table blocks are in order."""
    rendered = []
    for table in RENDER.render(markdown).split("<table>")[1:]:
        head, body = table.split("</table>")[0].split("<tbody>")
        if html.unescape(head.split("<th>")[1].split("</th>")[0]) != first:
            continue
        rendered.append(
            [
                [html.unescape(re.sub(r"<[^>]+>", "", c.split("</td>")[0])) for c in row]
                for row in (tr.split("<td>")[1:] for tr in body.split("<tr>")[1:])
            ]
        )
    captions = [b.caption for b in report.blocks if isinstance(b, Table) and b.header[0] == first]
    assert len(captions) == len(rendered)
    return dict(zip(captions, rendered, strict=True))


def _metric_tables(markdown: str, report: Report) -> dict[str, list[list[str]]]:
    return _rendered_tables(markdown, report, "metric")


def _table(tables: dict[str, list[list[str]]], arm: str, granularity: str) -> list[list[str]]:
    prefix = f"{TASK}: {arm} vs the baseline, {granularity}"
    (rows,) = [rows for caption, rows in tables.items() if caption.startswith(prefix)]
    return rows


# --- headings and tables -------------------------------------------------------------------------
def test_headings_name_task_and_granularity(tmp_path):
    markdown, _, _ = _render(tmp_path, _tables())
    headings = [line for line in markdown.splitlines() if line.startswith("#")]
    visible = [html.unescape(re.sub(r"<[^>]+>", "", RENDER.render(h))).strip() for h in headings]
    assert HEADING in visible
    assert f"Experiment on task {TASK}" in visible
    assert any(h.startswith(f"{TASK}: completion stream") for h in visible)
    assert any(h.startswith(f"{TASK}: epoch means") for h in visible)
    assert f"{TASK}: noise before and after convergence" in visible
    assert f"{TASK}: seeds still missing and planned runs" in visible


def test_one_metrics_table_per_arm_and_granularity(tmp_path):
    markdown, _, report = _render(tmp_path, _tables())
    tables = _metric_tables(markdown, report)
    # Z30 in both granularities, the untrusted arm in completion only
    assert len(tables) == 3
    epoch = [c for c in tables if c.startswith(f"{TASK}: {Z30} vs the baseline, epoch means")]
    assert len(epoch) == 1 and EPOCH_NOTE in epoch[0]
    completion = [c for c in tables if "completion stream" in c]
    assert len(completion) == 2 and all(EPOCH_NOTE not in c for c in completion)
    rows = {r[0]: r for r in _table(tables, Z30, "completion")}
    # metric, unit, arm, baseline, effect, interval, power, note
    assert rows["final reward (last 25% of agent steps by default)"][2:7] == [
        "0.620",
        "0.500",
        "+0.120",
        f"+0.0200 to +0.220 ({PAIRED})",
        "4",
    ]
    noise = rows["noise after convergence (rolling std)"]
    assert noise[4] == "x0.710" and noise[5] == f"x0.550 to x0.920 ({PAIRED_LOG})"
    assert rows["P(arm run > baseline run), final reward"][4:7] == [
        "0.667",
        "no interval (a valid interval needs more seeds; n=3+3 seeds)",
        "n/a",
    ]
    # metrics in the documented order, whatever the table's row order
    assert [r[0] for r in _table(tables, Z30, "completion")][:3] == [
        "final reward (last 25% of agent steps by default)",
        "time to threshold (of the baseline's final reward)",
        "noise before convergence (rolling std)",
    ]


def test_every_printed_interval_names_its_method_and_null_ci_prints_none(tmp_path):
    markdown, _, report = _render(tmp_path, _tables())
    tables = _metric_tables(markdown, report)
    cells = [row[5] for rows in tables.values() for row in rows]
    assert len(cells) == 10
    pattern = re.compile(r"^\S+ to \S+ \((paired t|Welch t)[^)]*n=\d+[^)]*\)$")
    for cell in cells:
        assert cell.startswith("no interval (") or pattern.match(cell), cell
    rows = {row[0]: row for row in _table(tables, Z30, "completion")}
    censored = rows["time to threshold (of the baseline's final reward)"]
    # the null ci prints no bounds and no method, only the reason (from the note)
    assert (
        censored[5]
        == "no interval (2 of 6 labels never reached the threshold (censored); n=3+3 seeds)"
    )
    assert censored[7] == ""  # the note is not printed twice
    assert rows["slope after convergence"][5] == "no interval (not computed; n=3+3 seeds)"
    evil = _table(tables, EVIL_ARM, "completion")
    assert len(evil) == 2
    assert all(
        r[5] == "no interval (an arm has one seed: no interval from one seed; n=1+3 seeds)"
        for r in evil
    )


def test_runs_table_shows_each_runs_own_values(tmp_path):
    tables = _tables()
    extra = _frame(
        [
            {
                "task": TASK,
                "arm": Z30,
                "seed": 2,
                "run_id": "z30.seed2",
                "granularity": "epoch",
                "metric": "time_to_threshold",
                "unit": "agent steps",
                "value": 1.5e6,
            }
        ],
        EXPERIMENT_RUN_METRICS,
    )
    tables["run_metrics"] = pl.concat([tables["run_metrics"], extra])
    markdown, _, report = _render(tmp_path, tables)
    ((caption, rows),) = _rendered_tables(markdown, report, "arm").items()
    assert EPOCH_NOTE in caption
    # completion rows first (baseline, then arms by name), then the epoch row
    assert [r[:3] for r in rows[:3]] == [["baseline", "1", f"alice.{TASK}.baseline.seed1"]] + [
        ["baseline", str(s), f"alice.{TASK}.baseline.seed{s}"] for s in (2, 3)
    ]
    assert rows[3][:2] == [EVIL_ARM, "1"]
    assert rows[-1] == [
        Z30,
        "2",
        "z30.seed2",
        "epoch means (Metta's held values, not per-completion)",
        "n/a",
        "1.50e6",
        "n/a",
    ]
    assert rows[0][4:] == ["0.500", "n/a", "n/a"]


def test_interval_needs_a_method_and_gets_its_n():
    row = _cmp(Z30, "final_reward", method=None)
    assert interval_text(row) == "no interval (its method is not named)"  # ci present
    row = _cmp(Z30, "final_reward", method="Welch t, 95%")
    assert interval_text(row) == "+0.0200 to +0.220 (Welch t, 95%, n=3+3 seeds)"


# --- noise before and after convergence ----------------------------------------------------------
def test_noise_sentences_wording_follows_the_interval(tmp_path):
    markdown, _, _ = _render(tmp_path, _tables())
    text = _visible(markdown)
    lowers = (
        f"{TASK}, completion stream (per-completion rewards, what LP consumes): {Z30} lowers "
        "the noise after convergence to 0.710x the baseline's (0.0355 vs 0.0500 reward; "
        f"{PAIRED_LOG}: 0.550 to 0.920)."
    )
    spans = (
        f"cannot tell whether {Z30} changes the noise before convergence: 1.05x the "
        f"baseline's (0.100 vs 0.0950 reward; {PAIRED_LOG}: 0.800 to 1.30, the interval "
        "spans 1)."
    )
    raises = f"{Z30} raises the noise after convergence to 1.20x the baseline's"
    assert lowers in text and spans in text and raises in text
    # before comes ahead of after within an arm and granularity
    assert text.index("noise before convergence: 1.05x") < text.index(lowers)
    # the one-seed arm: no interval, no change named
    evil = (
        f"{TASK}, completion stream (per-completion rewards, what LP consumes): the noise "
        f"after convergence of {EVIL_ARM} is 0.900x the baseline's (0.620 vs 0.500 reward); "
        "no interval (an arm has one seed: no interval from one seed; n=1+3 seeds), so no change "
        "is measured."
    )
    assert evil in text
    lines = [line for line in text.splitlines() if "convergence" in line and EVIL_ARM in line]
    assert lines == [evil]
    assert EPOCH_NOTE in text


def test_noise_sentence_for_a_difference_scale_and_a_missing_value():
    row = _cmp(Z30, "noise_after_convergence", difference=-0.01, ci_low=-0.02, ci_high=-0.004)
    assert noise_sentence(row).endswith(
        f"{Z30} lowers the noise after convergence by 0.0100 reward (0.620 vs 0.500 reward; "
        f"{PAIRED}: -0.0200 to -0.00400)."
    )
    row = _cmp(Z30, "noise_before_convergence", difference=NAN, note="no label converged")
    assert noise_sentence(row).endswith(
        f"the noise before convergence of {Z30} vs the baseline is not measured "
        "(no label converged)."
    )
    named = _cmp(
        Z30,
        "noise_after_convergence",
        baseline="ema=0.001",
        scale="ratio",
        difference=0.5,
        ci_low=0.3,
        ci_high=0.8,
        method=PAIRED_LOG,
    )
    assert "to 0.500x the baseline's (ema=0.001) (" in noise_sentence(named)


# --- missing seeds and planned runs --------------------------------------------------------------
def test_missing_seeds_and_planned_runs_are_listed(tmp_path):
    markdown, _, _ = _render(tmp_path, _tables())
    text = _visible(markdown)
    assert f"{EVIL_ARM}: 1 seed(s) (1), fewer than 3." in text
    assert (
        f"{EVIL_ARM} lacks seed(s) 2, 3 that the baseline has: pairing by seed uses "
        "1 of the baseline's 3 seeds." in text
    )
    assert f"{Z30}: " not in text.split("seeds still missing")[1].split("Experiment plan")[0]
    assert "Experiment plan: 2 of 4 planned runs exist." in text
    assert (
        f"{TASK}, arm {EVIL_ARM}: seed(s) 2, 3 planned and not run yet (e.g. "
        "alice.fixed_maps.evil.seed2); launch commands in experiments/plan.md." in text
    )
    assert "alice.fixed_maps.evil.seed1" not in text.split("Experiment plan")[1]  # it exists
    assert (
        f"alice.fixed_maps.z30.seed1 exists but discovery put it in arm baseline, not the "
        f"planned {Z30}." in text
    )


def test_discovered_runs_add_seeds_without_metrics(tmp_path):
    tables = _tables()
    discovered = pl.DataFrame(
        {
            "run_id": ["r2", "r3", "rx"],
            "task": [TASK, TASK, TASK],
            "arm": [EVIL_ARM, EVIL_ARM, EVIL_ARM],
            "seed": [2, 3, 4],
            "status": ["matched", "matched", "ignored"],
        }
    )
    markdown, _, _ = _render(tmp_path, {**tables, "discovered": discovered})
    text = _visible(markdown)
    assert f"{EVIL_ARM}: seeds 1, 2, 3" in text
    assert "fewer than 3" not in text and f"{EVIL_ARM} lacks" not in text


# --- figures -------------------------------------------------------------------------------------
def test_figures_per_granularity_with_bands_only_where_intervals_exist(tmp_path):
    _, _, report = _render(tmp_path, _tables())
    figs = {f.name: f for f in report.figures}
    assert set(figs) == {
        "experiment_0_0_curves",
        "experiment_0_0_difference",
        "experiment_0_1_curves",
        "experiment_0_1_difference",
    }
    curves = figs["experiment_0_0_curves"]
    assert "band = 95% t interval over the n seeds" in curves.caption
    assert f"{EVIL_ARM}: n=1, no band (one seed)" in curves.caption
    assert "An arm with one seed has no band." in curves.caption
    assert EPOCH_NOTE in figs["experiment_0_1_curves"].caption
    assert EPOCH_NOTE not in curves.caption
    fig = curves.figure
    assert fig.layout.xaxis.title.text == "agent steps"
    assert fig.layout.yaxis.title.text == "reward (mean over labels)"
    lines = [t for t in fig.data if t.showlegend is not False]
    bands = [t for t in fig.data if t.fill == "toself"]
    # baseline first, then the arms sorted by name; the untrusted name as plotly text
    assert [t.name for t in lines] == ["baseline", figures.plot_label(EVIL_ARM), Z30]
    assert len(bands) == 2  # baseline and Z30; the one-seed arm has none
    # the band spans exactly the curves' interval bounds
    assert min(bands[0].y) == pytest.approx(0.15) and max(bands[0].y) == pytest.approx(0.55)
    diff = figs["experiment_0_0_difference"]
    assert f"{Z30}: {PAIRED})" in diff.caption and "dashed line = no difference" in diff.caption
    # an arm keeps its colour across figures (the difference figure has no baseline line)
    colour = {t.name: t.line.color for t in lines}
    diff_lines = [t for t in diff.figure.data if t.showlegend is not False]
    assert [t.name for t in diff_lines] == [figures.plot_label(EVIL_ARM), Z30]
    assert all(t.line.color == colour[t.name] for t in diff_lines)
    shapes = diff.figure.layout.shapes
    assert len(shapes) == 1 and shapes[0].y0 == 0 and shapes[0].line.dash == "dash"


# --- escaping ------------------------------------------------------------------------------------
def test_untrusted_arm_name_is_escaped(tmp_path):
    markdown, page, report = _render(tmp_path, _tables())
    rendered = RENDER.render(markdown)
    assert "<script>" not in rendered and "&lt;script&gt;" in rendered
    assert not re.findall(r'<a href="(?!report\.html#experiment_)', rendered)
    # the pipe in the name keeps every metric table's cells in place
    for rows in _metric_tables(markdown, report).values():
        assert all(len(row) == 8 for row in rows)
    assert EVIL_ARM in _visible(markdown)  # shown literally
    # html: the raw name appears nowhere (neither in the text nor in the figures' data)
    assert EVIL_ARM not in page
    assert "z*30_[x](y)&lt;script&gt;alert(1)&lt;/script&gt;|pipe" in page


# --- nothing to compare --------------------------------------------------------------------------
def test_no_arms_says_how_arms_are_formed(tmp_path):
    for tables in (
        dict.fromkeys(("comparison", "curves", "difference", "run_metrics", "plan")),
        {
            "comparison": _frame([], EXPERIMENT_COMPARISON),
            "curves": _curves().filter(pl.col("arm") == "baseline"),
            "difference": None,
            "run_metrics": None,
            "plan": _plan(),
        },
    ):
        markdown, _, report = _render(tmp_path, tables)
        text = _visible(markdown)
        assert HEADING in text and "No task has two arms yet." in text
        assert ARMS_FORMED in text and "seed and run bookkeeping" in text
        assert not report.figures
        if tables["plan"] is not None:
            assert "alice.fixed_maps.evil.seed2" in text  # planned runs still listed


def test_unreadable_table_is_named(tmp_path):
    tables = {**_tables(), "curves": pl.DataFrame({"task": [TASK]})}
    markdown, _, _ = _render(tmp_path, tables)
    text = _visible(markdown)
    assert "Some experiment tables could not be used: curves (unreadable" in text
    assert f"Experiment on task {TASK}" in text  # the rest of the section is kept
