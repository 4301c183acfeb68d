"""The report's LP replay section (built from the lp_recommendations tables).

Every number comes from a table `lp_recommendations` wrote (`defs.lp.lp_tables`); this
module only selects, formats and plots them. Task labels, configuration names and run ids
are untrusted: they reach the report only as plain strings inside document blocks, which
the renderers escape (and `escape.plot_text` inside figures).
"""

from __future__ import annotations

import math

import polars as pl

from rts_dagster.analysis.lp_signal import TrendSettings
from rts_dagster.analysis.lp_sweep import METTA_DEFAULT
from rts_dagster.report import figures
from rts_dagster.report.document import (
    Bullets,
    Figure,
    FigureRecipe,
    Heading,
    Paragraph,
    Report,
    Table,
)
from rts_dagster.report.scope import TaskScope
from rts_dagster.schema import (
    GRANULARITY_EPOCH,
    LP_CLOSED_LOOP,
    LP_CLOSED_LOOP_SUMMARY,
    LP_RECOMMENDATIONS,
    LP_REPLAY_TRACE,
    LP_SWEEP_SUMMARY,
    conform,
)
from rts_dagster.simulate.closed_loop import COMPETENCE_FRACTION, FINAL_FRACTION
from rts_dagster.simulate.model import TASKS

_SCHEMAS = {
    "summary": LP_SWEEP_SUMMARY,
    "recommendations": LP_RECOMMENDATIONS,
    "closed_loop_runs": LP_CLOSED_LOOP,
    "closed_loop": LP_CLOSED_LOOP_SUMMARY,
    "traces": LP_REPLAY_TRACE,
}
_CLOSED_LOOP_METRICS = {  # metric -> (display name with unit, order)
    "time_to_competence": ("time to competence (epochs)", 0),
    "final_reward": (f"final reward (mean episode reward, last {FINAL_FRACTION:.0%} of epochs)", 1),
    "competence_final": ("final competence (mean latent competence)", 2),
}
_ROLES = {
    "recommended": "passed every check",
    "replay_best": "highest replayed SNR",
    "local_level_gain": "LP at the local-level gain",
    "lp_separation": "LP at the separation-optimal pair",
}


# --- formatting ----------------------------------------------------------------------------------
def _finite(value: object) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def num(value: object) -> str:
    """3 significant digits (`figures.number`): "n/a" for None/NaN, "inf"/"-inf", "<1e-6"
    for a tiny positive value."""
    return figures.number(value)


def signed(value: object) -> str:
    """ "+0.667", "-0.768"; a tiny value keeps its bound: "<+1e-6", ">-1e-6"."""
    text = num(value)
    if text.startswith("<"):
        return f"<+{text[1:]}"
    return text if text.startswith(("-", ">", "n/a", "inf")) else f"+{text}"


def ratio(value: object) -> str:
    """ "x1.53"; a tiny ratio "<x1e-6"."""
    return "n/a" if _finite(value) is None else _prefixed("x", value)


def ratio_ci(value: object, low: object, high: object) -> str:
    """ "x1.53 (x0.327 to x7.20)"."""
    if _finite(value) is None:
        return "n/a"
    if _finite(low) is None or _finite(high) is None:
        return f"{ratio(value)} (CI n/a)"
    return f"{ratio(value)} ({ratio(low)} to {ratio(high)})"


def lag(value: object) -> str:
    """Median response lag in completions; +inf means most events never reached the top k."""
    if value is not None and float(value) == math.inf:  # type: ignore[arg-type]
        return "never"
    return num(value)


def diff_ci(value: object, low: object, high: object) -> str:
    """ "+0.667 (-0.768 to +2.10)"."""
    if _finite(value) is None:
        return "n/a"
    if _finite(low) is None or _finite(high) is None:
        return f"{signed(value)} (CI n/a)"
    return f"{signed(value)} ({signed(low)} to {signed(high)})"


def _versus(ours: str, theirs: str) -> str:
    return f"{ours} vs {theirs}"


def lag_versus(ours: object, theirs: object) -> str:
    """Two median lags side by side; a sentence when neither ever reaches the top k."""
    if lag(ours) == lag(theirs) == "never":
        return "neither reaches LP's top quarter before the run ends"
    return _versus(lag(ours), lag(theirs))


# --- inputs --------------------------------------------------------------------------------------
def _tables(lp: dict[str, pl.DataFrame] | None) -> tuple[dict[str, pl.DataFrame], list[str]]:
    """Every table conformed to its schema (empty when missing or unreadable), and the
    names of those that were missing or malformed."""
    lp = lp or {}
    out, problems = {}, []
    for name, schema in _SCHEMAS.items():
        frame = lp.get(name)
        if frame is None:
            problems.append(f"{name} (missing)")
            out[name] = pl.DataFrame(schema=schema)
            continue
        try:
            out[name] = conform(frame, schema, name)
        except (ValueError, pl.exceptions.PolarsError) as exc:
            problems.append(f"{name} (unreadable: {exc})")
            out[name] = pl.DataFrame(schema=schema)
    return out, problems


def _panel_name(task: str, granularity: str | None) -> str:
    """A (task, granularity) row's panel title: the two are never pooled."""
    if granularity == GRANULARITY_EPOCH:
        return f"{task} (epoch means)"
    return f"{task} (per completion)" if granularity else task


def _snr_points(summary: pl.DataFrame, recs: pl.DataFrame) -> pl.DataFrame:
    """Per (task, granularity) and configuration: exp of the paired mean log SNR ratio and
    its per-configuration t interval, and the configuration's role in the evidence row."""
    snr = summary.filter(pl.col("metric") == "lp_snr")
    keys = list(zip(recs["task"].to_list(), recs["granularity"].to_list(), strict=True))
    recommended = dict(zip(keys, recs["config"].to_list(), strict=True))
    best = dict(zip(keys, recs["replay_best"].to_list(), strict=True))
    roles = []
    for task, granularity, config in snr.select("task", "granularity", "config").iter_rows():
        key = (task, granularity)
        if config == METTA_DEFAULT:
            roles.append("default")
        elif config == recommended.get(key):
            roles.append("recommended")
        elif config == best.get(key):
            roles.append("replay_best")
        else:
            roles.append("other")
    names = [_panel_name(t, g) for t, g in snr.select("task", "granularity").iter_rows()]
    return snr.select(
        pl.Series("task", names, dtype=pl.String),
        "config",
        pl.col("diff_vs_default").exp().alias("ratio"),
        pl.col("diff_ci_low").exp().alias("ratio_low"),
        pl.col("diff_ci_high").exp().alias("ratio_high"),
    ).with_columns(pl.Series("role", roles, dtype=pl.String))


def _trace_panels(traces: pl.DataFrame, recs: pl.DataFrame) -> pl.DataFrame:
    """The traces of the lowest seed of every (task, granularity) row, among the runs that
    fed it, one panel per configuration: Metta's default, the row's configuration (if
    different) and the highest replayed SNR (if different from both), in that order."""
    frames = []
    for rec in recs.sort("task", "granularity").iter_rows(named=True):
        task = rec["task"]
        runs = rec["runs"] or []
        per_task = traces.filter((pl.col("task") == task) & pl.col("run_id").is_in(runs))
        if per_task.height == 0:
            continue
        first_run = per_task.sort("seed", "run_id")["run_id"][0]  # lowest seed's run
        per_seed = per_task.filter(pl.col("run_id") == first_run)
        wanted: list[tuple[str, str]] = []
        for config, role in (
            (METTA_DEFAULT, "Metta default"),
            (rec["config"] if rec["confident"] else None, "passes every check"),
            (rec["replay_best"], "highest replayed SNR"),
        ):
            if not config:
                continue
            known = [c for c, _ in wanted]
            if config in known:
                i = known.index(config)
                wanted[i] = (config, f"{wanted[i][1]} = {role}")
            else:
                wanted.append((config, role))
        for i, (config, role) in enumerate(wanted):
            part = per_seed.filter(pl.col("config") == config)
            if part.height == 0:
                continue
            frames.append(
                part.select(
                    pl.lit(_panel_name(task, rec["granularity"])).alias("task"),
                    "seed",
                    "config",
                    "eval_index",
                    "label",
                    "probability",
                    "trend",
                ).with_columns(pl.lit(i).alias("panel"), pl.lit(role).alias("role"))
            )
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames)


# --- section -------------------------------------------------------------------------------------
def add_lp_section(
    report: Report,
    lp: dict[str, pl.DataFrame],
    figure_tasks: list[str] | None = None,
    scope: TaskScope | None = None,
) -> None:
    """Append the LP configuration section to `report`; its figures show `figure_tasks`
    (all tasks when None), its per-task sentences and rows `scope.shown` (every task when
    None), with counts over every task."""
    report.add(Heading("LP configuration: replay and closed-loop check"))
    tables, problems = _tables(lp)
    summary, recs = tables["summary"], tables["recommendations"].sort("task", "granularity")
    closed, runs, traces = tables["closed_loop"], tables["closed_loop_runs"], tables["traces"]
    if scope is None:
        scope = TaskScope.of([*recs["task"].to_list(), *summary["task"].to_list()])
    if problems:
        report.add(
            Paragraph(
                [
                    "Some LP tables could not be used, so parts of this section are missing: "
                    + "; ".join(problems)
                    + ". Materialize lp_replay and lp_recommendations to fill them."
                ]
            )
        )
    _intro(report, summary, recs, scope)
    if recs.height:
        listed = scope.keep(recs)
        if sentences := [str(s) for s in listed["sentence"].drop_nulls().to_list()]:
            report.add(Bullets(sentences))
        if listed.height:
            _recommendation_table(report, listed)
        scope.publish(report, "lp_recommendations", recs)
        if scope.limited:
            _recommendation_counts(report, recs, scope)
    else:
        report.add_table_file("lp_recommendations", recs)
        report.add(
            Paragraph(
                [
                    "No LP replay evidence: the recommendations table is empty (no task has "
                    "replays of Metta's default to compare against)."
                ]
            )
        )
    if figure_tasks is None:
        shown, shown_summary = recs, summary
    else:
        shown = recs.filter(pl.col("task").is_in(figure_tasks))
        shown_summary = summary.filter(pl.col("task").is_in(figure_tasks))
    _snr_figure(report, shown_summary, shown)
    _sampling_figure(report, traces, shown)
    _pole(report, summary, scope)
    _closed_loop(report, closed, runs, recs, scope)
    _limits(report, recs)


def _recommendation_counts(report: Report, recs: pl.DataFrame, scope: TaskScope) -> None:
    """One line over every task's replay rows: how many pass every check, transfer."""
    passed = recs.filter(pl.col("confident").fill_null(False))
    transfer = recs.filter(pl.col("actionable").fill_null(False)).height
    report.add(
        Paragraph(
            [
                f"Across all {len(scope.tasks)} tasks ({recs.height} replay rows): a "
                f"configuration passes every check in {passed.height} rows of "
                f"{passed['task'].n_unique()} tasks, each row's checks as in the table "
                "(adjusted for the configurations compared within its task, not for the "
                f"number of tasks); {transfer} rows' settings transfer to per-completion LP."
            ]
        )
    )


def _pole(report: Report, summary: pl.DataFrame, scope: TaskScope) -> None:
    """How often Metta's progress-smoothing transform ran into its pole in the replay."""
    every = summary.filter(
        (pl.col("metric") == "pole_fraction") & (pl.col("config") == METTA_DEFAULT)
    ).sort("task", "granularity")
    if every.height == 0:
        return
    rows = scope.keep(every)
    both = rows.group_by("task").agg(pl.len() > 1).filter(pl.col("len"))["task"].to_list()
    parts = [
        f"{_panel_name(task, granularity) if task in both else task}: {num(100 * value)}%"
        for task, granularity, value in rows.select("task", "granularity", "mean").iter_rows()
    ]
    if parts:
        report.add(
            Paragraph(
                [
                    "Progress smoothing applies R(p) = p(1-t)/(p + t(1-2p)), meant for p in "
                    "[0, 1], to x in [-1, 1]; with t = 0.05 its denominator crosses zero at x = "
                    "-0.056, where R falls towards minus infinity and inflates |R(F) - R(S)|. "
                    "Share of label-instants of Metta's default replay with |R(F)| or |R(S)| "
                    "above 1 (mean over seeds): " + "; ".join(parts) + "."
                ]
            )
        )
    scope.publish(
        report,
        "lp_pole_fraction",
        every.select("task", "granularity", pl.col("mean").alias("pole_fraction"), "n_seeds"),
    )


def _intro(report: Report, summary: pl.DataFrame, recs: pl.DataFrame, scope: TaskScope) -> None:
    if recs.height == 0 and summary.height == 0:
        report.add(Paragraph(["No LP configuration has been replayed yet."]))
        return
    configs = (
        summary.group_by("task", "granularity")
        .agg(pl.col("config").n_unique().alias("n"))["n"]
        .to_list()
    )
    runs = sorted(set(recs["n_runs"].drop_nulls().to_list()))
    epoch_tasks = recs.filter(pl.col("granularity") == GRANULARITY_EPOCH)["task"].to_list()
    epoch_names = ", ".join(scope.keep_names(epoch_tasks))
    if n_other := len(epoch_tasks) - len(scope.keep_names(epoch_tasks)):
        epoch_names += f"{', and ' if epoch_names else ''}{n_other} other tasks"
    if not recs.height:
        stream = "the recorded reward streams"
    elif not epoch_tasks:
        stream = "the recorded per-completion reward stream (the rewards LP consumes, in order)"
    else:
        stream = (
            "the per-completion reward stream where one was recorded and otherwise epoch "
            "means (" + epoch_names + "): each label's fresh (non-stale) epoch mean "
            "is fed to LP as one pseudo-completion, which LP never sees in training. A task "
            "with both kinds of run gets one row per granularity; the two are never pooled"
        )
    n_configs = (
        f"{_span(configs)} LP configurations per task" if configs else "the LP configurations"
    )
    n_runs = f"{_span(runs)} runs per task" if runs else "the available runs"
    report.add(
        Paragraph(
            [
                "This section shows the replay evidence; the verdict at the top of the report "
                "is the advice for each task. "
                f"Each task's training runs were replayed through {n_configs} (Metta's "
                "default and variations of its EMA timescales, the z-score variant, an "
                "active-pool cap, SPS-aware weighting, and kalman_matched: Metta's LP with "
                "ema_timescale set to the local-level gain of the run's own rewards) on "
                f"{n_runs}, using {stream}. "
                "The objective is the LP signal-to-noise ratio (SNR): the sampling "
                "probability LP gives a label whose reward is rising over the probability it "
                "gives a plateaued one. A configuration passes every check when its own SNR "
                "is above 1 (lower bound of its 95% t interval on logs over runs), its SNR "
                "ratio to Metta's default is above 1 (paired by run, on the log scale, with a "
                "t interval Bonferroni-adjusted for the number of configurations compared, so "
                "that picking the best of many does not flatter it), its median response lag "
                "and plateau churn are at most 1.5 times the default's plus a small absolute "
                "floor (one evaluation spacing of lag; 0.05 of churn), and its starved "
                "fraction is at most 0.05 above the default's (the asset's default guards). "
                "Every interval names its method and n (the pairs of runs actually used). "
                "EMA settings replayed on epoch means do not transfer to per-completion LP "
                "(an EMA weight then applies per epoch mean, itself an average of held "
                "rewards), so those rows are marked as not transferable. Replay is open-loop: "
                "every configuration sees the same recorded sequence of completions, chosen "
                "by the curriculum that ran, so it shows how a configuration reacts to the "
                "rewards, not what it would make the agent practise; the closed-loop check "
                "below runs the simulator instead."
            ]
        )
    )


def _span(values: list[int]) -> str:
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo} to {hi}"


def interval_cell(
    value: object, low: object, high: object, method: object, n: object, prefix: str = "x"
) -> str:
    """ "x2.00 (x1.25 to x3.20; 95% t, Bonferroni over 15 interval, n=3)"."""
    if _finite(value) is None:
        return "n/a"
    text = _prefixed(prefix, value)
    if _finite(low) is None or _finite(high) is None:
        return f"{text} (no interval, n={n if n is not None else 0})"
    return (
        f"{text} ({_prefixed(prefix, low)} to {_prefixed(prefix, high)}; "
        f"95% {method} interval, n={n})"
    )


def _prefixed(prefix: str, value: object) -> str:
    """`num(value)` after `prefix`, behind a leading "<"/">": "x2.00", "<x1e-6"."""
    text = num(value)
    return f"{text[0]}{prefix}{text[1:]}" if text[0] in "<>" else f"{prefix}{text}"


def _recommendation_table(report: Report, recs: pl.DataFrame) -> None:
    rows = []
    for r in recs.iter_rows(named=True):
        passed = bool(r["confident"])
        best = r["replay_best"]
        if best is None:
            best_text = "none above the default"
        else:
            best_text = f"{best} " + interval_cell(
                r["replay_best_snr_ratio"],
                r["replay_best_ci_low"],
                r["replay_best_ci_high"],
                r["replay_best_ci_method"],
                r["replay_best_n_pairs"],
            )
            if r["replay_best_reason"]:
                best_text += f": {r['replay_best_reason']}"
        own = interval_cell(
            r["snr_recommended"],
            r["signal_ci_low"],
            r["signal_ci_high"],
            r["signal_ci_method"],
            r["signal_n"],
            prefix="",
        )
        rows.append(
            [
                r["task"],
                f"{r['granularity']}, {r['n_runs']} runs ({', '.join(r['runs'] or [])})",
                r["config"] if passed else f"none ({METTA_DEFAULT} shown)",
                own,
                interval_cell(
                    r["snr_ratio"],
                    r["snr_ratio_ci_low"],
                    r["snr_ratio_ci_high"],
                    r["ci_method"],
                    r["n_pairs"],
                )
                if passed
                else "x1 (is the default)",
                lag_versus(r["lag_recommended"], r["lag_default"]),
                _versus(num(r["churn_recommended"]), num(r["churn_default"])),
                _versus(num(r["starved_recommended"]), num(r["starved_default"])),
                best_text,
                "yes" if r["actionable"] else "no",
            ]
        )
    report.add(
        Table(
            [
                "task",
                "replayed on",
                "configuration passing every check",
                "its own LP SNR (probability ratio, interval)",
                "SNR ratio vs default (interval)",
                "median lag, it vs default (completions)",
                "plateau churn, it vs default (rank fraction per 1000 completions)",
                "starved fraction, it vs default",
                "highest replayed SNR ratio vs default (interval): why not passing",
                "settings transfer to per-completion LP",
            ],
            rows,
            caption="Replay evidence per task and granularity (completion and epoch replays "
            "are never pooled). SNR: geometric mean over runs; lag: median over runs of the "
            "per-run median lag ('never': most labels that turned improving never reached "
            "LP's top quarter before the run ended); churn and starved fraction: mean over "
            "runs. When no configuration passes every check the row shows Metta's default. "
            "Ratio intervals are adjusted for the number of configurations compared "
            "(Bonferroni), n = pairs of runs used. Epoch rows never transfer: EMA settings "
            "replayed on epoch means do not carry over to per-completion LP.",
        )
    )


def _snr_figure(report: Report, summary: pl.DataFrame, recs: pl.DataFrame) -> None:
    points = _snr_points(summary, recs)
    if points.height == 0:
        report.add(Paragraph(["No sweep summary of LP SNR to plot."]))
        return
    report.add(
        Figure(
            "lp_snr_ratios",
            FigureRecipe(figures.lp_snr_ratios, (points,)),
            "Replayed LP signal-to-noise ratio of every configuration relative to Metta's "
            "default, per task and granularity: geometric mean over runs of the paired ratio, "
            "whiskers = 95% paired t interval on logs of that configuration alone, not "
            "adjusted for picking among configurations (the table's intervals are); none "
            "when fewer than 2 runs have a finite SNR. Right of the dashed "
            "line: improving labels get relatively more probability than under the default. "
            f"Values beyond x{figures.SNR_CLIP:g} or below x1/{figures.SNR_CLIP:g} are drawn "
            "at the axis edge with their value written next to them.",
        )
    )


def _sampling_figure(report: Report, traces: pl.DataFrame, recs: pl.DataFrame) -> None:
    panels = _trace_panels(traces, recs)
    if panels.height == 0:
        report.add(Paragraph(["No replay traces to plot the sampling distribution."]))
        return
    trend = TrendSettings()
    report.add(
        Figure(
            "lp_sampling",
            FigureRecipe(figures.lp_sampling, (panels,)),
            "Sampling probability of every label as LP replays the lowest seed's run of each "
            "task, under Metta's default, the configuration passing every check and the one with the "
            "highest replayed SNR (when different). Colour: probability relative to uniform "
            "(1/L, L labels), log scale (red: drawn more, blue: drawn less; the scale stops "
            "at 1/8 and 8 times uniform); black dots: the label's reward is rising (slope over "
            f"its last {trend.window} samples above {trend.t_improving:g} noise standard errors, "
            "with the default trend settings). A good configuration turns red where the dots "
            "are.",
        )
    )


def _closed_loop(
    report: Report,
    closed: pl.DataFrame,
    runs: pl.DataFrame,
    recs: pl.DataFrame,
    scope: TaskScope,
) -> None:
    report.add(Heading("Closed loop in the simulator (fresh seeds)", level=3))
    missing = _missing_closed_loop(closed, runs, recs)
    reasons = [f"{task}: {why}." for task, why in scope.keep(missing).iter_rows()]
    href = report.add_table_file("lp_closed_loop_missing", missing)
    if closed.height == 0:
        report.add_table_file("lp_closed_loop", closed)
        text = "No closed-loop comparison was run"
        if missing.height == 0:
            text += " (no configuration to check)."
        report.add(Paragraph([text + (":" if missing.height else "")]))
        if reasons:
            report.add(Bullets(reasons))
        _missing_summary(report, missing, href, scope)
        return
    epochs = sorted(set(runs["epochs"].drop_nulls().to_list()))
    seeds = sorted(set(closed["n_seeds"].drop_nulls().to_list()))
    report.add(
        Paragraph(
            [
                "The simulator's learner reacts to the curriculum, so here a configuration "
                "changes what is practised. Each candidate (the configuration passing every "
                "check, the "
                "configuration with the highest replayed SNR, and Metta's LP with "
                "ema_timescale at the local-level gain of the task's rewards, the timescale "
                "the noise analysis above measures) and Metta's "
                f"default ran on {_span(seeds)} fresh seeds"
                + (f" of {_span(epochs)} epochs" if epochs else "")
                + ", with the same learner and random draws per seed; differences are "
                "candidate minus default, paired by seed, with 95% paired t intervals (method "
                "and n beside each). Only tasks replayed per completion are simulated: a "
                "setting found on epoch means does not transfer to per-completion LP. Time to "
                "competence: epochs until the mean latent competence over the task's labels "
                f"is {COMPETENCE_FRACTION:.0%} of the way from its floor to its ceiling; a run "
                "that never gets there is censored and counted as its run length, so its true "
                "time is longer than shown. Final reward is the mean over the episodes the "
                "curriculum chose, so a curriculum that practises harder labels lowers it even "
                "while competence rises; final competence (mean latent competence over all "
                "labels) does not depend on what was sampled."
            ]
        )
    )
    order = {m: o for m, (_, o) in _CLOSED_LOOP_METRICS.items()}
    ordered = (
        scope.keep(closed)
        .with_columns(
            pl.col("metric").replace_strict(order, default=len(order)).alias("_m"),
            (pl.col("role") != "recommended").alias("_r"),
        )
        .sort("task", "_r", "config", "_m")
    )
    rows = []
    for r in ordered.iter_rows(named=True):
        is_time = r["metric"] == "time_to_competence"
        rows.append(
            [
                r["task"],
                r["config"],
                _ROLES.get(r["role"], r["role"]),
                _CLOSED_LOOP_METRICS.get(r["metric"], (r["metric"], 0))[0],
                r["n_seeds"],
                num(r["default_mean"]),
                num(r["recommended_mean"]),
                _diff_cell(r),
                f"{r['n_censored']} of {2 * r['n_seeds']}" if is_time else "",
            ]
        )
    if rows:
        report.add(
            Table(
                [
                    "task",
                    "configuration",
                    "role",
                    "metric",
                    "seeds",
                    "Metta default (mean)",
                    "candidate (mean)",
                    "candidate - default (interval)",
                    "censored runs (default + candidate)",
                ],
                rows,
                caption="Closed loop in the simulator (fresh seeds): candidate vs Metta's "
                "default, paired by seed. Lower time to competence and higher reward or "
                "competence are better.",
            )
        )
    scope.publish(report, "lp_closed_loop", closed)
    if scope.limited:
        report.add(
            Paragraph(
                [
                    f"Across all {len(scope.tasks)} tasks: {closed['task'].n_unique()} have "
                    "closed-loop rows."
                ]
            )
        )
    if reasons:
        report.add(Paragraph(["Tasks without a closed-loop comparison:"]), Bullets(reasons))
    _missing_summary(report, missing, href, scope)


def _diff_cell(r: dict) -> str:
    """ "+12.3 (-1.50 to +26.3; 95% paired t interval, n=3)"."""
    text = diff_ci(r["diff"], r["diff_ci_low"], r["diff_ci_high"])
    if text.endswith(")") and "CI n/a" not in text and r.get("ci_method"):
        return f"{text[:-1]}; 95% {r['ci_method']} interval, n={r['n_pairs']})"
    return text


def _missing_summary(report: Report, missing: pl.DataFrame, href: str, scope: TaskScope) -> None:
    """The line saying how many tasks' reasons are left out, and every task's reasons
    counted."""
    if note := scope.left_out_note(missing, href, what="reasons"):
        report.add(note)
    if not scope.limited or missing.height == 0:
        return
    counts = missing.group_by("reason").len().sort(["len", "reason"], descending=[True, False])
    report.add(
        Paragraph(
            [
                f"Across all {len(scope.tasks)} tasks, {missing.height} have no closed-loop "
                "comparison: "
                + "; ".join(f"{n} because {why}" for why, n in counts.iter_rows())
                + "."
            ]
        )
    )


def _missing_closed_loop(
    closed: pl.DataFrame, runs: pl.DataFrame, recs: pl.DataFrame
) -> pl.DataFrame:
    """Why each task of `recs` (sorted by task) has no closed-loop rows: task, reason, in
    the order of `recs`."""
    first_completion = (
        recs.filter(pl.col("granularity") != GRANULARITY_EPOCH)
        .group_by("task", maintain_order=True)
        .first()
        .select("task", "actionable", "replay_best", pl.lit(True).alias("_completion"))
    )
    without = (
        recs.select("task")
        .unique(maintain_order=True)
        .filter(~pl.col("task").is_in(closed["task"].unique().implode()))
        .join(first_completion, on="task", how="left", maintain_order="left")
    )
    nothing_to_compare = ~pl.col("actionable").fill_null(False) & (
        pl.col("replay_best").is_null() | (pl.col("replay_best") == METTA_DEFAULT)
    )
    reason = (
        pl.when(pl.col("_completion").is_null())
        .then(
            pl.lit(
                "only epoch means were replayed, and settings found on epoch means do not "
                "transfer to per-completion LP, so nothing is simulated"
            )
        )
        .when(nothing_to_compare)
        .then(
            pl.lit(
                "no configuration passed every check and none had a higher replayed SNR "
                "than Metta's default, so there is nothing to compare"
            )
        )
        .when(~pl.col("task").is_in(list(TASKS)))
        .then(pl.lit("the simulator does not model this task"))
        .when(pl.lit(runs.height == 0))
        .then(
            pl.lit(
                "the closed-loop check was not run (disabled in the lp_recommendations "
                "configuration)"
            )
        )
        .otherwise(pl.lit("no paired simulator runs of the candidate and Metta's default"))
    )
    return without.select("task", reason.alias("reason"))


def _limits(report: Report, recs: pl.DataFrame) -> None:
    seeds = sorted(set(recs["n_seeds"].drop_nulls().to_list()))
    n_seeds = f"{_span(seeds)} seeds" if seeds else "a few seeds"
    report.add(Heading("Limits", level=3))
    report.add(
        Paragraph(
            [
                "Replay is open-loop: the recorded label order came from the curriculum that "
                "ran, so a configuration that would stop sampling a label still sees that "
                "label's rewards in replay, and a configuration that would focus on a label "
                "never sees the extra practice it would have caused (the starved-fraction "
                "guard only limits this). The closed-loop results come from the simulator's "
                "learner model, not from MettaGrid training. With "
                f"{n_seeds} the confidence intervals are wide: a ratio whose interval "
                "includes 1 (or a difference whose interval includes 0) does not separate "
                "the configuration from the default. Picking the best of many configurations "
                "on the same seeds flatters the winner (winner's curse); the ratio intervals "
                "of the evidence table are Bonferroni-adjusted for the configurations "
                "compared, which covers that, at the price of wider intervals; the "
                "closed-loop check uses fresh seeds."
            ]
        )
    )
