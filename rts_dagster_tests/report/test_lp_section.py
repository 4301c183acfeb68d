"""The report's LP section on small synthetic lp_recommendations tables: content, number
formatting, escaping of untrusted task/config names, empty and missing tables."""

import html
import math
import re
import struct

import numpy as np
import polars as pl
import pytest
from markdown_it import MarkdownIt

from rts_dagster.report import figures
from rts_dagster.report.document import Report, find_browser, write_report
from rts_dagster.report.lp_section import (
    _snr_points,
    _trace_panels,
    add_lp_section,
    diff_ci,
    interval_cell,
    lag,
    lag_versus,
    num,
    ratio_ci,
)
from rts_dagster.schema import (
    LP_CLOSED_LOOP,
    LP_CLOSED_LOOP_SUMMARY,
    LP_RECOMMENDATIONS,
    LP_REPLAY_TRACE,
    LP_SWEEP_SUMMARY,
    conform,
)

RENDER = MarkdownIt("commonmark").enable("table").enable("strikethrough")
EVIL_TASK = "a*b_[x](y)<script>"
PIPE_CONFIG = "cfg|pipe"
MODELLED = "fixed_maps"  # a task the simulator models
HEADING = "LP configuration: replay and closed-loop check"


def _rec(task: str, config: str, replay_best: str, **over) -> dict:
    row = {
        "task": task,
        "granularity": "completion",
        "config": config,
        "variant": "main",
        "ema_timescale": 0.001,
        "slow_timescale_factor": 0.2,
        "runs": [f"run.{task}.{seed}" for seed in (1, 2, 3)],
        "n_seeds": 3,
        "n_runs": 3,
        "n_compared": 15,
        "n_pairs": 3,
        "snr_default": 0.9,
        "snr_recommended": 1.8,
        "signal_ci_low": 1.2,
        "signal_ci_high": 2.7,
        "signal_ci_method": "t on logs",
        "signal_n": 3,
        "snr_ratio": 2.0,
        "snr_ratio_ci_low": 1.25,
        "snr_ratio_ci_high": 3.2,
        "ci_method": "t, Bonferroni over 15",
        "lag_default": 120.0,
        "lag_recommended": 80.0,
        "churn_default": 0.2,
        "churn_recommended": 0.1,
        "starved_default": 0.0,
        "starved_recommended": 0.01,
        "guards_passed": True,
        "replay_best": replay_best,
        "replay_best_snr_ratio": 5.0,
        "replay_best_ci_low": 0.5,
        "replay_best_ci_high": 40.0,
        "replay_best_ci_method": "t, Bonferroni over 15",
        "replay_best_n_pairs": 3,
        "replay_best_reason": "starved fraction 0.5 > the default's 0.0 + 0.05",
        "rejected": [f"{replay_best}: starved"],
        "confident": True,
        "actionable": True,
        "sentence": f"{task}: `{config}` passes every check [per completion].",
    }
    return {**row, **over}


def _summary(
    task: str, configs: dict[str, tuple[float, float, float]], granularity: str = "completion"
) -> list[dict]:
    return [
        {
            "task": task,
            "granularity": granularity,
            "config": name,
            "variant": "main",
            "metric": "lp_snr",
            "runs": [f"run.{task}.{seed}" for seed in (1, 2, 3)],
            "n_seeds": 3,
            "ci_method": "t on logs",
            "n_pairs": 3,
            "diff_ci_method": "paired t on logs",
            "mean": 1.0,
            "ci_low": 0.5,
            "ci_high": 2.0,
            "diff_vs_default": d,
            "diff_ci_low": lo,
            "diff_ci_high": hi,
        }
        for name, (d, lo, hi) in configs.items()
    ]


def _traces(task: str, configs: list[str], labels: list[str], seeds=(2, 1)) -> list[dict]:
    rows = []
    for seed in seeds:
        for config in configs:
            for g in range(5):
                for i, label in enumerate(labels):
                    p = (i + 1 + g) / sum(j + 1 + g for j in range(len(labels)))
                    rows.append(
                        {
                            "task": task,
                            "seed": seed,
                            "run_id": f"run.{task}.{seed}",
                            "config": config,
                            "eval_index": 10 * g,
                            "progress": g / 4,
                            "label": label,
                            "count": g,
                            "probability": p,
                            "trend": 1 if (g + i) % 3 == 0 else 0,
                        }
                    )
    return rows


def _closed(task: str, config: str, role: str) -> list[dict]:
    base = {
        "task": task,
        "config": config,
        "role": role,
        "n_seeds": 3,
        "ci_method": "paired t",
        "n_pairs": 3,
    }
    return [
        {
            **base,
            "metric": "time_to_competence",
            "default_mean": 95.0,
            "recommended_mean": 107.3456,
            "diff": 12.3456,
            "diff_ci_low": -1.5,
            "diff_ci_high": 26.26,
            "n_censored": 4,
        },
        {
            **base,
            "metric": "final_reward",
            "default_mean": 0.6729,
            "recommended_mean": 0.6257,
            "diff": -0.04731,
            "diff_ci_low": -0.05416,
            "diff_ci_high": -0.04046,
            "n_censored": 0,
        },
        {
            **base,
            "metric": "competence_final",
            "default_mean": 0.6,
            "recommended_mean": float("nan"),
            "diff": float("nan"),
            "diff_ci_low": float("nan"),
            "diff_ci_high": float("nan"),
            "n_censored": 0,
        },
    ]


def _frame(rows: list[dict], schema: pl.Schema) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame(schema=schema)
    filled = [{name: row.get(name) for name in schema.names()} for row in rows]
    return conform(pl.DataFrame(filled, schema=schema), schema)


def _lp(closed_loop: bool = True) -> dict[str, pl.DataFrame]:
    recs = [
        # untrusted task label, a config with a pipe, an infinite lag and a NaN churn
        _rec(
            EVIL_TASK,
            PIPE_CONFIG,
            "zscore_z30",
            lag_default=math.inf,
            lag_recommended=math.inf,
            churn_recommended=float("nan"),
            snr_ratio_ci_low=1.05,
        ),
        # the default kept, another configuration replayed best: checked in the closed loop
        _rec(
            MODELLED,
            "metta_default",
            "metta_default_cap_4",
            snr_ratio=1.0,
            snr_ratio_ci_low=float("nan"),
            snr_ratio_ci_high=float("nan"),
            ci_method=None,
            n_pairs=0,
            snr_recommended=0.9,
            replay_best_snr_ratio=2.95,
            replay_best_ci_low=0.8,
            replay_best_ci_high=9.0,
            replay_best_reason="not above the default: SNR ratio x2.95 includes 1",
            confident=False,
            actionable=False,
            sentence="fixed_maps: no configuration passes every check.",
        ),
    ]
    summary = _summary(
        EVIL_TASK,
        {
            "metta_default": (0.0, 0.0, 0.0),
            PIPE_CONFIG: (math.log(2.0), math.log(0.5), math.log(3.2)),
            "zscore_z30": (math.log(5e6), math.log(0.01), math.log(1e15)),
        },
    ) + _summary(
        MODELLED,
        {
            "metta_default": (0.0, 0.0, 0.0),
            "metta_default_cap_4": (math.log(2.95), math.log(2.6), math.log(3.3)),
            "main_ema_0.1": (0.2, float("nan"), float("nan")),
        },
    )
    traces = _traces(
        EVIL_TASK, ["metta_default", PIPE_CONFIG, "zscore_z30"], ["<b>bold</b>", "plain"]
    ) + _traces(MODELLED, ["metta_default", "metta_default_cap_4"], ["l1", "l2", "l3"])
    runs = [
        {"task": MODELLED, "config": c, "config_key": c, "seed": s, "epochs": 300}
        for c in ("metta_default", "metta_default_cap_4")
        for s in (101, 102, 103)
    ]
    closed = _closed(MODELLED, "metta_default_cap_4", "replay_best") if closed_loop else []
    return {
        "summary": _frame(summary, LP_SWEEP_SUMMARY),
        "recommendations": _frame(recs, LP_RECOMMENDATIONS),
        "closed_loop_runs": _frame(runs if closed_loop else [], LP_CLOSED_LOOP),
        "closed_loop": _frame(closed, LP_CLOSED_LOOP_SUMMARY),
        "traces": _frame(traces, LP_REPLAY_TRACE),
    }


def _render(lp, tmp_path, want_png: bool = False) -> tuple[str, str, dict]:
    report = Report(title="LP")
    add_lp_section(report, lp)
    out = write_report(report, tmp_path, want_png=want_png)
    return out["markdown"].read_text(), out["html"].read_text(), out


def _md_text(markdown: str) -> str:
    """The visible text of the rendered markdown (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", RENDER.render(markdown)))


def _table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """The body rows of the rendered table whose first header is `first_header`, as the
    visible text of every cell."""
    rendered = RENDER.render(markdown)
    for table in rendered.split("<table>")[1:]:
        table = table.split("</table>")[0]
        head = table.split("</thead>")[0]
        if html.unescape(head.split("<th>")[1].split("</th>")[0]) != first_header:
            continue
        body = table.split("<tbody>")[1]
        return [
            [html.unescape(c.split("</td>")[0]) for c in tr.split("<td>")[1:]]
            for tr in body.split("<tr>")[1:]
        ]
    raise AssertionError(f"no table starting with {first_header!r}")


# --- formatting ----------------------------------------------------------------------------------
def test_number_formatting():
    assert num(float("nan")) == "n/a" and num(None) == "n/a"
    assert num(1.0) == "1.00" and num(0.0123456) == "0.0123" and num(243.3333) == "243"
    assert num(100.0) == "100" and num(12345.6) == "12346" and num(5.5e6) == "5.50e6"
    assert num(0.0) == "0" and num(-0.0) == "0"
    # tiny magnitudes: the sign and a bound, never "0" or 33 zeros' worth of exponent
    assert num(5.83e-33) == "<1e-6" and num(-5.83e-33) == ">-1e-6" and num(1e-300) == "<1e-6"
    assert num(2.1e-4) == "2.10e-4" and num(9.99e-7) == "<1e-6" and num(1e-6) == "1.00e-6"
    assert ratio_ci(0.5, 5.83e-33, 0.04) == "x0.500 (<x1e-6 to x0.0400)"
    assert diff_ci(0.01, 5.83e-33, 0.04) == "+0.0100 (<+1e-6 to +0.0400)"
    assert diff_ci(-0.01, -0.04, -5.83e-33) == "-0.0100 (-0.0400 to >-1e-6)"
    assert interval_cell(2.0, 3e-40, 3.2, "t", 3) == "x2.00 (<x1e-6 to x3.20; 95% t interval, n=3)"
    # every printed bound keeps its side of 0: a positive value never prints as 0 or negative
    values = np.geomspace(1e-320, 1e12, 2000)
    assert all(num(v) != "0" and not num(v).startswith(("-", ">")) for v in values)
    assert all(num(-v).startswith(("-", ">-")) for v in values)
    # and every plain printed number is within 3 significant digits of the value
    plain = [v for v in values if num(v)[0].isdigit()]
    assert all(abs(float(num(v)) - v) <= 5e-3 * v for v in plain)
    assert lag(math.inf) == "never" and lag(float("nan")) == "n/a" and lag(129.5) == "130"
    assert lag_versus(80.0, math.inf) == "80.0 vs never"
    assert lag_versus(math.inf, math.inf) == "neither reaches LP's top quarter before the run ends"
    assert ratio_ci(1.533, 0.3266, 7.1954) == "x1.53 (x0.327 to x7.20)"
    assert ratio_ci(1.0, float("nan"), float("nan")) == "x1.00 (CI n/a)"
    assert diff_ci(0.6667, -0.7676, 2.1009) == "+0.667 (-0.768 to +2.10)"
    assert diff_ci(float("nan"), 0.0, 1.0) == "n/a"


# --- content and escaping ------------------------------------------------------------------------
def test_section_lists_recommendations_and_escapes_untrusted_text(tmp_path):
    lp = _lp()
    markdown, page, _ = _render(lp, tmp_path)
    visible = _md_text(markdown)
    assert HEADING in visible and "Limits" in visible
    for sentence in lp["recommendations"]["sentence"]:
        assert sentence in visible  # backticks, brackets and <script> come out literally
    # markdown: nothing of the label turns into markup
    rendered = RENDER.render(markdown)
    assert "<script>" not in rendered and "<b>" not in rendered
    links = re.findall(r'href="([^"]*)"', rendered)
    assert links and all(link.startswith("report.html#lp_") for link in links)  # figure links
    assert "&lt;script&gt;" in rendered
    # html: the raw label appears nowhere, neither in the text nor in the figures' data
    assert EVIL_TASK not in page and "<b>bold" not in page
    assert "a*b_[x](y)&lt;script&gt;" in page.split("</script>", 1)[1]
    # the per-task table: the label and the config with a pipe each stay in one cell
    recs = _table_rows(markdown, "task")
    header_cells = 10
    assert all(len(r) == header_cells for r in recs)
    evil = next(r for r in recs if r[0] == EVIL_TASK)
    runs = ", ".join(f"run.{EVIL_TASK}.{seed}" for seed in (1, 2, 3))
    assert evil[1] == f"completion, 3 runs ({runs})"
    assert evil[2] == PIPE_CONFIG
    # every interval says its method and n beside it
    assert evil[3] == "1.80 (1.20 to 2.70; 95% t on logs interval, n=3)"
    assert evil[4] == "x2.00 (x1.05 to x3.20; 95% t, Bonferroni over 15 interval, n=3)"
    assert (
        evil[5] == "neither reaches LP's top quarter before the run ends"
        and evil[6] == "n/a vs 0.200"
    )
    assert evil[8] == (
        "zscore_z30 x5.00 (x0.500 to x40.0; 95% t, Bonferroni over 15 interval, n=3): "
        "starved fraction 0.5 > the default's 0.0 + 0.05"
    )
    assert evil[9] == "yes"
    fixed = next(r for r in recs if r[0] == MODELLED)
    assert fixed[2] == "none (metta_default shown)" and fixed[4] == "x1 (is the default)"
    assert fixed[8].startswith("metta_default_cap_4 x2.95 (x0.800 to x9.00; 95% t, Bonferroni")
    assert fixed[9] == "no"
    assert "epoch means (" not in visible  # every task replayed its completion stream
    # the section describes evidence; the advice is the report's verdict
    assert "the verdict at the top of the report is the advice" in visible


def test_epoch_means_are_said(tmp_path):
    lp = _lp()
    lp["recommendations"] = lp["recommendations"].with_columns(
        pl.when(pl.col("task") == MODELLED)
        .then(pl.lit("epoch"))
        .otherwise(pl.col("granularity"))
        .alias("granularity")
    )
    visible = _md_text(_render(lp, tmp_path)[0])
    assert f"otherwise epoch means ({MODELLED})" in visible
    assert "never pooled" in visible


def test_a_task_with_both_granularities_gets_two_rows_and_panels(tmp_path):
    lp = _lp()
    epoch_rec = _rec(
        MODELLED,
        "main_ema_0.01",
        "main_ema_0.01",
        granularity="epoch",
        runs=["run.fixed_maps.4"],
        n_runs=1,
        actionable=False,
        replay_best_reason=None,
        sentence="fixed_maps: epoch means do not transfer.",
    )
    lp["recommendations"] = pl.concat(
        [lp["recommendations"], _frame([epoch_rec], LP_RECOMMENDATIONS)]
    )
    epoch_summary = _summary(
        MODELLED, {"metta_default": (0.0, 0.0, 0.0), "main_ema_0.01": (1.0, 0.5, 1.5)}, "epoch"
    )
    lp["summary"] = pl.concat([lp["summary"], _frame(epoch_summary, LP_SWEEP_SUMMARY)])
    markdown, _, _ = _render(lp, tmp_path)
    rows = [r for r in _table_rows(markdown, "task") if r[0] == MODELLED]
    assert [r[1].split(",")[0] for r in rows] == ["completion", "epoch"]
    assert rows[1][9] == "no" and rows[1][1] == "epoch, 1 runs (run.fixed_maps.4)"
    points = _snr_points(lp["summary"], lp["recommendations"])
    assert {f"{MODELLED} (per completion)", f"{MODELLED} (epoch means)"} <= set(points["task"])
    epoch_points = points.filter(pl.col("task") == f"{MODELLED} (epoch means)")
    assert epoch_points.filter(pl.col("config") == "main_ema_0.01")["role"].item() == "recommended"


def test_closed_loop_table_shows_differences_and_cis(tmp_path):
    markdown, page, _ = _render(_lp(), tmp_path)
    rows = _table_rows(markdown, "task")  # the recommendations table comes first
    closed = _table_rows(markdown.split("Closed loop in the simulator (fresh seeds)", 1)[1], "task")
    assert closed and closed != rows
    by_metric = {r[3]: r for r in closed}
    time = by_metric["time to competence (epochs)"]
    assert time[:3] == [MODELLED, "metta_default_cap_4", "highest replayed SNR"]
    assert time[5:] == [
        "95.0",
        "107",
        "+12.3 (-1.50 to +26.3; 95% paired t interval, n=3)",
        "4 of 6",
    ]
    reward = next(r for m, r in by_metric.items() if m.startswith("final reward"))
    assert reward[7].startswith("-0.0473 (-0.0542 to -0.0405; 95% paired t") and reward[8] == ""
    competence = by_metric["final competence (mean latent competence)"]
    assert competence[6] == "n/a" and competence[7] == "n/a"
    # the task without closed-loop rows is explained: the simulator does not model it
    visible = _md_text(markdown)
    assert f"{EVIL_TASK}: the simulator does not model this task." in visible
    assert "+12.3 (-1.50 to +26.3; 95% paired t interval, n=3)" in page


def test_empty_closed_loop_explains_why(tmp_path):
    lp = _lp(closed_loop=False)
    # the modelled task keeps the default and nothing replayed better: nothing to compare
    lp["recommendations"] = lp["recommendations"].with_columns(
        pl.when(pl.col("task") == MODELLED)
        .then(pl.lit("metta_default"))
        .otherwise(pl.col("replay_best"))
        .alias("replay_best")
    )
    markdown, _, _ = _render(lp, tmp_path)
    visible = _md_text(markdown)
    assert "No closed-loop comparison was run:" in visible
    assert f"{EVIL_TASK}: the simulator does not model this task." in visible
    assert f"{MODELLED}: no configuration passed every check and none had a higher" in visible
    assert "candidate - default" not in visible  # no closed-loop table


def test_closed_loop_not_run_for_a_modelled_candidate(tmp_path):
    visible = _md_text(_render(_lp(closed_loop=False), tmp_path)[0])
    assert f"{MODELLED}: the closed-loop check was not run" in visible


@pytest.mark.parametrize("drop", ["all", "empty", "no_traces", "bad_columns"])
def test_missing_or_empty_tables_do_not_raise(tmp_path, drop):
    lp = _lp()
    if drop == "all":
        lp = {}
    elif drop == "empty":
        lp = {k: v.clear() for k, v in lp.items()}
    elif drop == "no_traces":
        del lp["traces"]
    else:
        lp["summary"] = pl.DataFrame({"task": ["x"]})
    markdown, _, _ = _render(lp, tmp_path)
    visible = _md_text(markdown)
    assert HEADING in visible and "Limits" in visible
    if drop in ("all", "empty"):
        assert "No LP replay evidence" in visible
        assert "No closed-loop comparison was run" in visible
    if drop in ("all", "no_traces"):
        assert "could not be used" in visible and "traces (missing)" in visible
    if drop in ("all", "empty", "no_traces"):
        assert "No replay traces to plot" in visible
    if drop == "bad_columns":
        assert "summary (unreadable" in visible and "No sweep summary of LP SNR" in visible


# --- figures -------------------------------------------------------------------------------------
def test_snr_figure_highlights_the_recommendation_and_clips():
    lp = _lp()
    points = _snr_points(lp["summary"], lp["recommendations"])
    fig = figures.lp_snr_ratios(points)
    assert fig.layout.xaxis.title.text == figures.LP_SNR_AXIS
    assert fig.layout.xaxis.type == "log"
    recommended = [t for t in fig.data if t.name == "recommended"]
    # the configuration passing every check; a row without one highlights nothing
    assert {y for t in recommended for y in t.y} == {"cfg|pipe"}
    defaults = [t for t in fig.data if t.name == "Metta default"]
    assert {y for t in defaults for y in t.y} == {"metta_default"}
    best = next(t for t in fig.data if t.name.startswith("highest replayed SNR"))
    i = list(best.y).index("zscore_z30")
    assert best.x[i] == figures.SNR_CLIP and "x5.00e6" in best.text[i]  # drawn at the edge
    # labels reach plotly as entities: plotly draws them literally
    assert "a*b_[x](y)&lt;script&gt; (per completion)" in [a.text for a in fig.layout.annotations]


def test_sampling_figure_uses_lowest_seed_and_escapes_labels():
    lp = _lp()
    panels = _trace_panels(lp["traces"], lp["recommendations"])
    assert set(panels["seed"].to_list()) == {1}
    evil = panels.filter(pl.col("task") == f"{EVIL_TASK} (per completion)")
    assert evil.group_by("panel").agg(pl.col("config").first()).sort("panel")[
        "config"
    ].to_list() == ["metta_default", PIPE_CONFIG, "zscore_z30"]
    fixed = panels.filter(pl.col("task") == f"{MODELLED} (per completion)")
    assert fixed["role"].unique().sort().to_list() == ["Metta default", "highest replayed SNR"]
    # only the runs that fed a row are drawn for it
    other = lp["recommendations"].with_columns(pl.lit(["elsewhere"]).alias("runs"))
    assert _trace_panels(lp["traces"], other).height == 0
    fig = figures.lp_sampling(panels)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 5
    assert "&lt;b&gt;bold&lt;/b&gt;" in heatmaps[0].y
    z = np.asarray(heatmaps[0].z, dtype=float)
    assert np.isfinite(z).all() and z.shape == (2, 5)
    assert all(fig.layout[f"xaxis{i}"].title.text == "completions replayed" for i in (1, 2))


@pytest.mark.skipif(find_browser() is None, reason="no chromium for kaleido")
def test_section_renders_png_figures(tmp_path):
    markdown, _, out = _render(_lp(), tmp_path, want_png=True)
    for name in ("lp_snr_ratios", "lp_sampling"):
        head = out["pngs"][name].read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width > 300 and height > 200
        assert f"](figures/{name}.png)" in markdown


def test_section_renders_html_figures_without_a_browser(tmp_path):
    _, page, out = _render(_lp(), tmp_path)
    assert out["pngs"] == {}
    assert "fig-lp_snr_ratios" in page and "fig-lp_sampling" in page


def test_pole_share_of_metta_default_is_reported(tmp_path):
    lp = _lp()
    pole = [
        {**row, "metric": "pole_fraction", "mean": share}
        for row, share in zip(
            _summary(MODELLED, {"metta_default": (0.0, 0.0, 0.0)})
            + _summary(EVIL_TASK, {"metta_default": (0.0, 0.0, 0.0)}),
            (0.0123, 0.5),
            strict=True,
        )
    ]
    lp["summary"] = pl.concat([lp["summary"], _frame(pole, LP_SWEEP_SUMMARY)])
    markdown, _, _ = _render(lp, tmp_path)
    text = _md_text(markdown)
    assert "x = -0.056" in text
    assert f"{MODELLED}: 1.23%" in text and f"{EVIL_TASK}: 50.0%" in text
