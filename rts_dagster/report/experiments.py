"""The report's "Experiments" section: the arms of each task compared with its baseline.

Every number comes from the experiment tables (`analysis.experiments`: run metrics,
comparison, curves, difference over training) and the experiment plan; this module only
selects, formats and plots them, and writes its sentences from those numbers alone. It
describes: the verdict section is the report's only advice. Task, arm, label and run
names are untrusted: they reach the report only as plain strings inside document blocks,
which the renderers escape (and `escape.plot_text` inside figures).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import polars as pl

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
from rts_dagster.report.lp_section import num, ratio, signed
from rts_dagster.report.scope import TaskScope
from rts_dagster.schema import (
    EXPERIMENT_COMPARISON,
    EXPERIMENT_CURVES,
    EXPERIMENT_DIFFERENCE,
    EXPERIMENT_PLAN,
    EXPERIMENT_RUN_METRICS,
    GRANULARITY_COMPLETION,
    GRANULARITY_EPOCH,
    conform,
)

HEADING = "Experiments: arms compared with their baseline"
MIN_SEEDS = 3  # fewer seeds per arm than this: listed as still missing seeds
BASELINE_NAME = "baseline"  # the arm name discovery gives a task's baseline by default
NOISE_PHASES = {  # metric -> the phase its sentence names
    "noise_before_convergence": "before",
    "noise_after_convergence": "after",
}
METRIC_NAMES = {  # metric -> display name, in table order
    "final_reward": "final reward (last 25% of agent steps by default)",
    "final_reward_iqm": "final reward, interquartile mean over labels",
    "time_to_threshold": "time to threshold (of the baseline's final reward)",
    "noise_before_convergence": "noise before convergence (rolling std)",
    "noise_after_convergence": "noise after convergence (rolling std)",
    "slope_after_convergence": "slope after convergence",
    "noise_diff": "trend-robust noise std(diff)/sqrt2",
    "sps_mean": "mean SPS",
    "sps_noise_corr": "corr(SPS, rolling std)",
    "sampling_gini": "Gini of completions per label",
    "sampling_entropy": "entropy of completions per label",
    "probability_of_improvement": "P(arm run > baseline run), final reward",
}
EPOCH_NOTE = (
    "Epoch granularity: Metta's epoch means of env_per_label_rewards (each environment's "
    "held last reward of a label, averaged over the epoch's episode ends), not "
    "per-completion rewards: their noise is far below the per-completion noise and they lag."
)
ARMS_FORMED = (
    "An arm is the set of runs of one task whose configs agree on every value except the "
    "seed and run bookkeeping (run name, ids, timestamps); a task has an experiment once two "
    "of its arms have runs, one of them the baseline."
)
_SCHEMAS = {
    "comparison": EXPERIMENT_COMPARISON,
    "curves": EXPERIMENT_CURVES,
    "difference": EXPERIMENT_DIFFERENCE,
    "run_metrics": EXPERIMENT_RUN_METRICS,
    "plan": EXPERIMENT_PLAN,
}


# --- formatting ----------------------------------------------------------------------------------
def _finite(value: object) -> float | None:
    """`value` as a float, or None when missing or NaN (an infinite bound is kept)."""
    if value is None:
        return None
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def granularity_name(granularity: str | None) -> str:
    """The granularity in words; every table, figure and sentence names it."""
    if granularity == GRANULARITY_COMPLETION:
        return "completion stream (per-completion rewards, what LP consumes)"
    if granularity == GRANULARITY_EPOCH:
        return "epoch means (Metta's held values, not per-completion)"
    return f"granularity {granularity}"


def baseline_ref(name: str | None) -> str:
    """ "the baseline", or "the baseline <name>" when its arm has a name of its own."""
    return "the baseline" if name in (None, BASELINE_NAME) else f"the baseline {name}"


def _short(granularity: str | None) -> str:
    """The granularity in two words, for figure titles."""
    if granularity == GRANULARITY_COMPLETION:
        return "completion stream"
    return "epoch means" if granularity == GRANULARITY_EPOCH else f"granularity {granularity}"


def _with_n(method: str, n_arm: object, n_baseline: object) -> str:
    """`method`, with the seed counts appended when it does not state its n itself."""
    if "n=" in method:
        return method
    return f"{method}, n={n_arm}+{n_baseline} seeds"


def effect_text(scale: str | None, value: object) -> str:
    """ "+0.0120" (arm - baseline), "x0.710" (arm / baseline) or "0.667" (a probability)."""
    if scale == "ratio":
        return ratio(value)
    if scale == "difference":
        return signed(value)
    return num(value)


def _no_interval_reason(row: dict) -> str:
    note = (row.get("note") or "").strip()
    if note:
        return note
    if row.get("scale") == "probability":
        return "a valid interval for a probability needs more seeds"
    if min(row.get("n_seeds_arm") or 0, row.get("n_seeds_baseline") or 0) < 2:
        return "an arm has one seed: no interval from one seed"
    return "not computed"


def interval_text(row: dict) -> str:
    """A comparison row's interval with its method and n, e.g. "x0.550 to x0.920 (paired t
    on logs, 95%, n=3 pairs)"; "no interval (<reason>)" when its ci is null, or when no
    method is named (an interval is never printed without its method); the seed counts
    are given either way."""
    low, high = _finite(row.get("ci_low")), _finite(row.get("ci_high"))
    method = (row.get("method") or "").strip()
    if low is None or high is None:
        n = f"n={row.get('n_seeds_arm')}+{row.get('n_seeds_baseline')} seeds"
        return f"no interval ({_no_interval_reason(row)}; {n})"
    if not method:
        return "no interval (its method is not named)"
    method = _with_n(method, row.get("n_seeds_arm"), row.get("n_seeds_baseline"))
    scale = row.get("scale")
    return f"{effect_text(scale, low)} to {effect_text(scale, high)} ({method})"


def _interval_used_note(row: dict) -> bool:
    """True when the row's note is already printed as the reason for no interval."""
    no_ci = _finite(row.get("ci_low")) is None or _finite(row.get("ci_high")) is None
    return no_ci and bool((row.get("note") or "").strip())


def _power_text(value: object) -> str:
    return "n/a" if value is None else str(value)


def _seeds_text(seeds: Iterable[int]) -> str:
    ordered = sorted(seeds)
    return ", ".join(str(s) for s in ordered) if ordered else "none"


# --- inputs --------------------------------------------------------------------------------------
def _tables(frames: dict[str, pl.DataFrame | None]) -> tuple[dict[str, pl.DataFrame], list[str]]:
    """Every table conformed to its schema (empty when missing), and the names of those
    that could not be read."""
    out, problems = {}, []
    for name, schema in _SCHEMAS.items():
        frame = frames.get(name)
        if frame is None:
            out[name] = pl.DataFrame(schema=schema)
            continue
        try:
            out[name] = conform(frame, schema, name)
        except (ValueError, pl.exceptions.PolarsError) as exc:
            problems.append(f"{name} (unreadable: {exc})")
            out[name] = pl.DataFrame(schema=schema)
    return out, problems


def _tasks_with_arms(t: dict[str, pl.DataFrame]) -> list[str]:
    """Tasks with a comparison, a difference over training, or curves of two arms."""
    tasks = set(t["comparison"]["task"].drop_nulls().to_list())
    tasks |= set(t["difference"]["task"].drop_nulls().to_list())
    two_arms = t["curves"].group_by("task").agg(pl.col("arm").n_unique().alias("n"))
    tasks |= set(two_arms.filter(pl.col("n") >= 2)["task"].drop_nulls().to_list())
    return sorted(tasks)


def _baselines(t: dict[str, pl.DataFrame], discovered: pl.DataFrame | None) -> dict[str, str]:
    """Task -> its baseline arm's name, from the comparison (else the difference table,
    else discovered runs flagged `baseline`)."""
    found: dict[str, str] = {}
    if discovered is not None and {"task", "arm", "baseline"} <= set(discovered.columns):
        flagged = discovered.filter(pl.col("baseline").fill_null(False))
        for task, arm in flagged.select("task", "arm").unique().sort("task", "arm").iter_rows():
            found.setdefault(task, arm)
    for name in ("difference", "comparison"):  # the comparison's word wins
        pairs = t[name].select("task", "baseline").drop_nulls().unique().sort("task", "baseline")
        found.update(dict(pairs.iter_rows()))
    return found


def _seeds(
    t: dict[str, pl.DataFrame], discovered: pl.DataFrame | None
) -> dict[tuple[str, str], set[int]]:
    """(task, arm) -> the seeds with runs: from the run metrics, plus matched discovered
    runs when discovery gives arms (a run may be found before it has metrics)."""
    frames = [t["run_metrics"].select("task", "arm", "seed")]
    if discovered is not None and {"task", "arm", "seed"} <= set(discovered.columns):
        runs = discovered
        if "status" in runs.columns:
            runs = runs.filter(pl.col("status") == "matched")
        frames.append(
            runs.select(
                pl.col("task").cast(pl.String),
                pl.col("arm").cast(pl.String),
                pl.col("seed").cast(pl.Int64),
            )
        )
    pairs = pl.concat(frames).drop_nulls().unique()
    seeds: dict[tuple[str, str], set[int]] = {}
    for task, arm, seed in pairs.iter_rows():
        seeds.setdefault((task, arm), set()).add(seed)
    return seeds


def _arms(task: str, baseline: str | None, t: dict[str, pl.DataFrame], seeds: dict) -> list[str]:
    """The task's arms, baseline first, the others sorted."""
    names: set[str] = {arm for (tk, arm) in seeds if tk == task}
    for name in ("comparison", "curves", "difference"):
        names |= set(t[name].filter(pl.col("task") == task)["arm"].drop_nulls().to_list())
    others = sorted(names - {baseline})
    return ([baseline] if baseline is not None else []) + others


def _granularities(task: str, t: dict[str, pl.DataFrame]) -> list[str]:
    """The task's granularities, completion first (what LP consumes), then epoch."""
    found: set[str] = set()
    for name in ("comparison", "curves", "difference"):
        found |= set(t[name].filter(pl.col("task") == task)["granularity"].drop_nulls().to_list())
    order = {GRANULARITY_COMPLETION: 0, GRANULARITY_EPOCH: 1}
    return sorted(found, key=lambda g: (order.get(g, 2), g))


# --- the section ---------------------------------------------------------------------------------
def add_experiments_section(
    report: Report,
    comparison: pl.DataFrame | None,
    curves: pl.DataFrame | None,
    difference: pl.DataFrame | None,
    run_metrics: pl.DataFrame | None,
    plan: pl.DataFrame | None,
    discovered: pl.DataFrame | None = None,
    scope: TaskScope | None = None,
) -> None:
    """Append the Experiments section: per task with two arms, reward curves per arm, the
    difference to the baseline over training, a metrics table per (arm, granularity),
    sentences on noise before and after convergence, and the seeds and planned runs
    still missing. `discovered`: discovered runs with task, arm, seed (and optionally
    baseline, status) columns, used for seeds that have no metrics yet. `scope`: the tasks
    whose experiments are shown (every task when None); the others are counted and their
    rows kept for tables/experiment_*.csv."""
    report.add(Heading(HEADING))
    t, problems = _tables(
        {
            "comparison": comparison,
            "curves": curves,
            "difference": difference,
            "run_metrics": run_metrics,
            "plan": plan,
        }
    )
    if problems:
        report.add(
            Paragraph(["Some experiment tables could not be used: " + "; ".join(problems) + "."])
        )
    every_task = _tasks_with_arms(t)
    planned = sorted(set(t["plan"]["task"].drop_nulls().to_list()))
    scope = scope or TaskScope.of([*every_task, *planned])
    comparison_href = report.add_table_file("experiment_comparison", t["comparison"])
    report.add_table_file("experiment_run_metrics", t["run_metrics"])
    plan_href = report.add_table_file("experiment_plan", t["plan"])
    if not every_task:
        report.add(Paragraph([f"No task has two arms yet. {ARMS_FORMED}"]))
        _planned_runs(report, t["plan"], scope.keep_names(planned))
        _left_out(report, scope, planned, plan_href, "planned runs")
        return
    report.add(
        Paragraph(
            [
                f"{ARMS_FORMED} Each run gives one value per metric (the mean over its labels "
                "unless the metric says otherwise) and arms are compared across seeds: a paired "
                "t interval over the seeds both arms share (at least 2), else Welch t; noise "
                "metrics as ratios arm / baseline with t intervals on logs. Every interval is "
                "printed with its method and n; none is formed from one seed. Epoch and "
                "completion values are never pooled. This section describes the runs; the "
                "verdict section is the report's only advice."
            ]
        )
    )
    baselines = _baselines(t, discovered)
    seeds = _seeds(t, discovered)
    for ti, task in enumerate(scope.keep_names(every_task)):
        _task_block(report, ti, task, baselines.get(task), t, seeds)
    _left_out(report, scope, every_task, comparison_href, "experiments")
    planned_elsewhere = sorted(set(planned) - set(every_task))
    if shown_elsewhere := scope.keep_names(planned_elsewhere):
        report.add(Heading("Planned runs of tasks without a second arm yet", 3))
        _planned_runs(report, t["plan"], shown_elsewhere)
    _left_out(report, scope, planned_elsewhere, plan_href, "planned runs")


def _left_out(report: Report, scope: TaskScope, tasks: list[str], href: str, what: str) -> None:
    """The line saying how many of `tasks` are not shown, and where their rows are."""
    if note := scope.left_out_note(
        pl.DataFrame({"task": tasks}, schema={"task": pl.String}), href, what=what
    ):
        report.add(note)


def _task_block(
    report: Report,
    ti: int,
    task: str,
    baseline: str | None,
    t: dict[str, pl.DataFrame],
    seeds: dict[tuple[str, str], set[int]],
) -> None:
    arms = _arms(task, baseline, t, seeds)
    report.add(Heading(f"Experiment on task {task}", 3))
    described = [
        f"{arm}{' (baseline)' if arm == baseline and arm != BASELINE_NAME else ''}: seeds "
        f"{_seeds_text(seeds.get((task, arm), set()))}"
        for arm in arms
    ]
    report.add(Paragraph([f"Arms of {task}: " + "; ".join(described) + "."]))
    for gi, granularity in enumerate(_granularities(task, t)):
        report.add(Heading(f"{task}: {granularity_name(granularity)}", 4))
        _curves_figure(report, ti, gi, task, granularity, arms, t["curves"])
        _difference_figure(report, ti, gi, task, granularity, arms, baseline, t["difference"])
        comp = t["comparison"].filter(
            (pl.col("task") == task) & (pl.col("granularity") == granularity)
        )
        for arm in arms:
            _metrics_table(report, task, arm, granularity, comp.filter(pl.col("arm") == arm))
    _runs_table(report, task, arms, t["run_metrics"].filter(pl.col("task") == task))
    _noise_sentences(report, task, t["comparison"].filter(pl.col("task") == task))
    _missing(report, task, arms, baseline, seeds, t["plan"])


def _for_granularity(caption: str, granularity: str) -> str:
    return f"{caption} {EPOCH_NOTE}" if granularity == GRANULARITY_EPOCH else caption


def _band_note(part: pl.DataFrame, arms: list[str], n_col: str) -> str:
    """Per arm: the interval's method and n, or that it has none (one seed)."""
    notes = []
    for arm in arms:
        rows = part.filter(pl.col("arm") == arm)
        if rows.height == 0:
            continue
        n_values = rows[n_col].drop_nulls()
        lo, hi = (int(n_values.min()), int(n_values.max())) if n_values.len() else (0, 0)
        n_text = f"n={lo}" if lo == hi else f"n={lo}-{hi}"
        with_ci = rows.filter(
            pl.col("ci_low").is_not_null()
            & pl.col("ci_high").is_not_null()
            & pl.col("ci_low").is_not_nan()
            & pl.col("ci_high").is_not_nan()
        )
        methods = sorted(set(with_ci["method"].drop_nulls().to_list()))
        if with_ci.height == 0:
            why = "one seed" if hi <= 1 else "no interval in the table"
            notes.append(f"{arm}: {n_text}, no band ({why})")
        else:
            method = "; ".join(methods) or "t interval over seeds"
            n_part = "" if "n=" in method else f", {n_text}"
            gaps = rows.height - with_ci.height
            gap_text = f", no band in {gaps} of {rows.height} bins" if gaps else ""
            notes.append(f"{arm}: {method}{n_part}{gap_text}")
    return "; ".join(notes)


def _curves_figure(
    report: Report,
    ti: int,
    gi: int,
    task: str,
    granularity: str,
    arms: list[str],
    curves: pl.DataFrame,
) -> None:
    part = curves.filter((pl.col("task") == task) & (pl.col("granularity") == granularity))
    if part.height == 0:
        report.add(Paragraph([f"{task}, {granularity_name(granularity)}: no reward curves."]))
        return
    shown = [arm for arm in arms if arm in set(part["arm"].to_list())]
    caption = (
        f"{task}, {granularity_name(granularity)}: reward (mean over labels) over agent "
        "steps, one line per arm (mean over its seeds); band = 95% t interval over the n "
        f"seeds of the arm ({_band_note(part, shown, 'n_seeds')}). An arm with one seed has "
        "no band."
    )
    report.add(
        Figure(
            f"experiment_{ti}_{gi}_curves",
            FigureRecipe(
                figures.experiment_curves,
                (
                    part,
                    arms,
                    f"Reward per arm: {task}, {_short(granularity)}",
                ),
            ),
            _for_granularity(caption, granularity),
        )
    )


def _difference_figure(
    report: Report,
    ti: int,
    gi: int,
    task: str,
    granularity: str,
    arms: list[str],
    baseline: str | None,
    difference: pl.DataFrame,
) -> None:
    part = difference.filter((pl.col("task") == task) & (pl.col("granularity") == granularity))
    if part.height == 0:
        report.add(
            Paragraph([f"{task}, {granularity_name(granularity)}: no difference over training."])
        )
        return
    shown = [arm for arm in arms if arm in set(part["arm"].to_list())]
    caption = (
        f"{task}, {granularity_name(granularity)}: arm minus {baseline_ref(baseline)}, "
        "reward (mean over labels) per "
        "agent-step bin, one line per arm; band = 95% interval of the difference "
        f"({_band_note(part, shown, 'n')}); dashed line = no difference."
    )
    report.add(
        Figure(
            f"experiment_{ti}_{gi}_difference",
            FigureRecipe(
                figures.experiment_difference,
                (
                    part,
                    arms,
                    f"Arm - baseline: {task}, {_short(granularity)}",
                ),
            ),
            _for_granularity(caption, granularity),
        )
    )


def _metric_order(metric: str) -> tuple[int, str]:
    names = list(METRIC_NAMES)
    return (names.index(metric) if metric in METRIC_NAMES else len(names), metric)


def _metrics_table(
    report: Report, task: str, arm: str, granularity: str, rows: pl.DataFrame
) -> None:
    if rows.height == 0:
        return
    first = rows.row(0, named=True)
    body = []
    for row in sorted(rows.iter_rows(named=True), key=lambda r: _metric_order(r["metric"])):
        body.append(
            [
                METRIC_NAMES.get(row["metric"], row["metric"]),
                row["unit"] or "",
                num(row["arm_value"]),
                num(row["baseline_value"]),
                effect_text(row["scale"], row["difference"]),
                interval_text(row),
                _power_text(row["seeds_for_80pct_power"]),
                "" if _interval_used_note(row) else (row["note"] or ""),
            ]
        )
    caption = (
        f"{task}: {arm} vs {baseline_ref(first['baseline'])}, {granularity_name(granularity)} "
        f"({first['n_seeds_arm']} + {first['n_seeds_baseline']} seeds). Arm and baseline "
        "values: means over seeds (geometric for ratio metrics). Effect: arm - baseline "
        "(+/-) or arm / baseline (x). Seeds per arm for 80% power: to detect the observed "
        "effect in a two-sided 5% test (noncentral t); n/a: undefined or more than 50."
    )
    report.add(
        Table(
            [
                "metric",
                "unit",
                "arm",
                "baseline",
                "effect",
                "95% interval (method, n)",
                "seeds per arm for 80% power",
                "note",
            ],
            body,
            caption=_for_granularity(caption, granularity),
        )
    )


RUN_TABLE_METRICS = ("final_reward", "time_to_threshold", "noise_after_convergence")


def _runs_table(report: Report, task: str, arms: list[str], metrics: pl.DataFrame) -> None:
    """One row per (run, granularity): the run's own values of a few headline metrics, so
    the spread over seeds behind each comparison is visible."""
    if metrics.height == 0:
        return
    wide = (
        metrics.group_by("arm", "seed", "run_id", "granularity")
        .agg(
            pl.col("value").filter(pl.col("metric") == m).first().alias(m)
            for m in RUN_TABLE_METRICS
        )
        .with_columns(
            pl.col("arm").replace_strict(arms, range(len(arms)), default=len(arms)).alias("order")
        )
        .sort("granularity", "order", "arm", "seed", "run_id")
    )
    units = dict(metrics.select("metric", "unit").unique("metric").iter_rows())
    header = ["arm", "seed", "run", "granularity"] + [
        f"{METRIC_NAMES[m]} ({units.get(m) or 'n/a'})" for m in RUN_TABLE_METRICS
    ]
    rows = [
        [r["arm"], r["seed"], r["run_id"], granularity_name(r["granularity"])]
        + [num(r[m]) for m in RUN_TABLE_METRICS]
        for r in wide.iter_rows(named=True)
    ]
    caption = (
        f"{task}: every run's own values (each a mean over the run's labels); per-run notes "
        "(labels without a value, censored thresholds) are in the experiment_run_metrics table."
    )
    if (wide["granularity"] == GRANULARITY_EPOCH).any():
        caption += f" {EPOCH_NOTE}"
    report.add(Table(header, rows, caption=caption))


def noise_sentence(row: dict) -> str:
    """One sentence on a noise_before/after_convergence comparison row, its wording chosen
    by whether the interval excludes no change (1 for a ratio, 0 for a difference)."""
    phase = NOISE_PHASES.get(row["metric"], row["metric"])
    where = f"{row['task']}, {granularity_name(row['granularity'])}"
    arm, scale = row["arm"], row["scale"]
    subject = f"the noise {phase} convergence"
    effect = _finite(row["difference"])
    if effect is None:
        why = (row.get("note") or "").strip() or "no value"
        return f"{where}: {subject} of {arm} vs the baseline is not measured ({why})."
    is_ratio = scale == "ratio"
    reference = 1.0 if is_ratio else 0.0
    unit = f" {row['unit']}" if row.get("unit") else ""
    values = f"{num(row['arm_value'])} vs {num(row['baseline_value'])}{unit}"
    named = "" if row["baseline"] in (None, BASELINE_NAME) else f" ({row['baseline']})"
    size = f"{num(effect)}x the baseline's{named}" if is_ratio else f"{signed(effect)}{unit}"
    low, high = _finite(row["ci_low"]), _finite(row["ci_high"])
    method = (row.get("method") or "").strip()
    if low is None or high is None or not method:
        return (
            f"{where}: {subject} of {arm} is {size} ({values}); "
            f"{interval_text(row)}, so no change is measured."
        )
    method = _with_n(method, row.get("n_seeds_arm"), row.get("n_seeds_baseline"))
    bounds = f"{num(low)} to {num(high)}" if is_ratio else f"{signed(low)} to {signed(high)}"
    if low > reference or high < reference:
        verb = "raises" if low > reference else "lowers"
        change = f"to {size}" if is_ratio else f"by {num(abs(effect))}{unit}"
        return f"{where}: {arm} {verb} {subject} {change} ({values}; {method}: {bounds})."
    return (
        f"{where}: cannot tell whether {arm} changes {subject}: {size} ({values}; "
        f"{method}: {bounds}, the interval spans {'1' if is_ratio else '0'})."
    )


def _noise_sentences(report: Report, task: str, comparison: pl.DataFrame) -> None:
    rows = comparison.filter(pl.col("metric").is_in(list(NOISE_PHASES)))
    report.add(Heading(f"{task}: noise before and after convergence", 4))
    if rows.height == 0:
        report.add(Paragraph([f"{task}: no noise before/after convergence was compared."]))
        return
    ordered = _before_first(list(rows.iter_rows(named=True)))
    items = [noise_sentence(r) for r in ordered]
    report.add(
        Paragraph(
            [
                "Noise = mean rolling std of reward before and after each label's convergence "
                "(the first agent step where its smoothed reward has covered a set fraction, by "
                "default 90%, of its rise), as a ratio arm / baseline; the wording follows the "
                "95% interval alone: a change is named only when the interval excludes 1."
            ]
        )
    )
    report.add(Bullets(items))
    if any(r["granularity"] == GRANULARITY_EPOCH for r in ordered):
        report.add(Paragraph([EPOCH_NOTE]))


def _before_first(rows: list[dict]) -> list[dict]:
    """Per arm and granularity (completion first), noise before convergence, then after."""
    phase = {"noise_before_convergence": 0, "noise_after_convergence": 1}
    order = {GRANULARITY_COMPLETION: 0, GRANULARITY_EPOCH: 1}
    return sorted(
        rows,
        key=lambda r: (
            r["arm"] or "",
            order.get(r["granularity"], 2),
            r["granularity"] or "",
            phase.get(r["metric"], 2),
        ),
    )


def _missing(
    report: Report,
    task: str,
    arms: list[str],
    baseline: str | None,
    seeds: dict[tuple[str, str], set[int]],
    plan: pl.DataFrame,
) -> None:
    """Arms short of seeds or with seeds the baseline has and they lack (partial pairing),
    and the planned runs of the task that do not exist yet."""
    report.add(Heading(f"{task}: seeds still missing and planned runs", 4))
    base_seeds = seeds.get((task, baseline), set()) if baseline is not None else set()
    items = []
    for arm in arms:
        own = seeds.get((task, arm), set())
        if len(own) < MIN_SEEDS:
            items.append(f"{arm}: {len(own)} seed(s) ({_seeds_text(own)}), fewer than {MIN_SEEDS}.")
        if arm == baseline or baseline is None:
            continue
        lacking, extra = base_seeds - own, own - base_seeds
        if lacking:
            items.append(
                f"{arm} lacks seed(s) {_seeds_text(lacking)} that {baseline_ref(baseline)} has: "
                f"pairing by seed uses {len(own & base_seeds)} of the baseline's "
                f"{len(base_seeds)} seeds."
            )
        if extra:
            items.append(
                f"{arm} has seed(s) {_seeds_text(extra)} that {baseline_ref(baseline)} lacks "
                "(unpaired)."
            )
    if not items:
        items.append(
            f"Every arm of {task} has at least {MIN_SEEDS} seeds and every seed of the baseline."
        )
    report.add(Bullets(items))
    _planned_runs(report, plan, [task])


def _planned_runs(report: Report, plan: pl.DataFrame, tasks: list[str]) -> None:
    """The planned runs of `tasks` that do not exist yet (by run name), and planned runs
    that exist but that discovery put in another arm."""
    part = plan.filter(pl.col("task").is_in(tasks)).sort("task", "arm", "seed", "run_name")
    if part.height == 0:
        return
    items = []
    # runs not launched yet: one line per (task, arm), seeds listed, the first name shown
    todo = part.filter(pl.col("exists") == False)  # noqa: E712 (null = unknown: not listed)
    for (task, arm), rows in todo.group_by(["task", "arm"], maintain_order=True):
        seeds = ", ".join(str(s) for s in rows["seed"].to_list())
        example = rows["run_name"][0]
        more = f" (e.g. {example})" if rows.height > 1 else f" ({example})"
        items.append(
            f"{task}, arm {arm}: seed(s) {seeds} planned and not run yet{more}; launch "
            "commands in experiments/plan.md."
        )
    for row in part.iter_rows(named=True):
        found = row["found_arm"]
        if row["exists"] and found is not None and found != row["arm"]:
            items.append(
                f"{row['task']}: {row['run_name']} exists but discovery put it in arm "
                f"{found}, not the planned {row['arm']}."
            )
    done = part.filter(pl.col("exists").fill_null(False)).height
    lead = f"Experiment plan: {done} of {part.height} planned runs exist."
    report.add(Paragraph([lead]))
    if items:
        report.add(Bullets(items))
