"""Assemble the report from the analysis tables: numbers, figures and plain-words findings.

Every number printed comes from a table an asset wrote (series_metrics, variance_table,
timescale recommendations); this module only selects, formats and plots them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import polars as pl

from rts_dagster.analysis import epoch_view, quality, summaries
from rts_dagster.analysis.verdict import Verdict
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
from rts_dagster.report.experiments import add_experiments_section
from rts_dagster.report.learning import add_learning_section, engine_sentence
from rts_dagster.report.lp_section import add_lp_section
from rts_dagster.report.scope import Findings, TaskScope, split_findings
from rts_dagster.report.verdicts import add_verdict_section

MAX_PLOT_POINTS = 400  # per line: enough for the shape, small HTML
BAND_POINTS = 60  # slope/noise bands: each bin averages enough windows to show a trend
# Tasks per figure: a panel per task stops being readable (and kaleido's render time grows
# with every panel) well before a team's hundreds of tasks; the per-task rows and sentences
# cover the same tasks, every row is in tables/*.csv (report/scope.py).
MAX_FIGURE_TASKS = 8


def figure_tasks(
    tasks: list[str],
    verdicts: list[Verdict] | None,
    limit: int = MAX_FIGURE_TASKS,
    with_arms: Iterable[str] = (),
) -> list[str]:
    """The tasks the figures show, sorted: every task when there are at most `limit`; else
    first those whose verdict changes an LP setting, then those with experiment arms
    (`with_arms`: their comparison is in the report), then those with conflicting
    evidence, then the rest, by name within each group."""
    if len(tasks) <= limit:
        return sorted(tasks)
    by_task = {v.task: v for v in verdicts or []}
    armed = set(with_arms)

    def rank(task: str) -> tuple[int, str]:
        v = by_task.get(task)
        if v is not None and v.action == "change":
            return 0, task
        if task in armed:
            return 1, task
        if v is not None and v.conflict:
            return 2, task
        return 3, task

    return sorted(sorted(tasks, key=rank)[:limit])


def tasks_with_arms(discovered: pl.DataFrame | None) -> list[str]:
    """Tasks whose runs (an arms table: task, arm) hold more than one arm: experiments."""
    if discovered is None or discovered.height == 0:
        return []
    counts = discovered.group_by("task").agg(pl.col("arm").n_unique().alias("n"))
    return sorted(counts.filter(pl.col("n") > 1)["task"].to_list())


def shown_note(shown: list[str], tasks: list[str]) -> str:
    """The sentence saying which tasks the figures leave out ("" when none)."""
    if len(shown) >= len(tasks):
        return ""
    return (
        f"The figures show {len(shown)} of the {len(tasks)} tasks ({', '.join(shown)}): those "
        "whose verdict changes an LP setting first, then those with experiment arms, then "
        "those with conflicting evidence, then by name. So do the per-task sentences and table rows below; each part that leaves "
        "tasks out says how many and links the CSV with every task's rows (tables/). The "
        "verdicts, the counts and the statements across tasks cover all "
        f"{len(tasks)} tasks."
    )


def preferred_granularity(table: pl.DataFrame) -> str:
    """`completion` (what LP consumes) when `table` (streams, or any per-series table) has
    it, else `epoch`."""
    return "completion" if (table["granularity"] == "completion").any() else "epoch"


def _binned(
    df: pl.DataFrame, value: str, keys: list[str], points: int = MAX_PLOT_POINTS
) -> pl.DataFrame:
    """Per (keys, sample-index bin): `value` averaged within each label first, then the
    median and p10/p90 across labels (so the band shows how labels differ, not the
    sample-to-sample scatter)."""
    # bin width per task: tasks differ by orders of magnitude in samples per label
    width = ((pl.col("sample_index").max().over("task") + 1) / points).ceil().clip(1).cast(pl.Int64)
    per_label = (
        df.filter(pl.col(value).is_finite())
        .with_columns(((pl.col("sample_index") // width) * width).alias("sample_index"))
        .group_by(*keys, "label", "sample_index")
        .agg(pl.col(value).mean())
    )
    return (
        # sorted first: the mean over labels then sums in one order, bit for bit the same
        # in every build (the figures' inputs are digested to reuse unchanged figures)
        per_label.sort(*keys, "sample_index", "label")
        .group_by(*keys, "sample_index")
        .agg(
            pl.col(value).quantile(0.1).alias("p10"),
            pl.col(value).median().alias("p50"),
            pl.col(value).quantile(0.9).alias("p90"),
            pl.col(value).mean().alias("mean"),
        )
        .sort(*keys, "sample_index")
    )


def reward_curve_table(streams: pl.DataFrame, granularity: str, smooth: int = 25) -> pl.DataFrame:
    """Mean reward over labels at each sample index, smoothed by a centred rolling mean."""
    part = streams.filter(
        (pl.col("granularity") == granularity) & pl.col("reward").is_finite() & ~pl.col("is_stale")
    )
    per_index = (
        part.group_by("task", "seed", "sample_index")
        .agg(pl.col("reward").mean())
        .sort("task", "seed", "sample_index")
        .with_columns(
            pl.col("reward").rolling_mean(smooth, min_samples=1, center=True).over("task", "seed")
        )
    )
    binned = _binned(
        per_index.with_columns(pl.lit("all").alias("label")), "reward", ["task", "seed"]
    )
    return binned.select("task", "seed", "sample_index", pl.col("mean").alias("reward"))


def sps_noise_table(rolling: pl.DataFrame, n_bins: int = 12) -> pl.DataFrame:
    """Mean rolling std of reward per SPS bin (equal-width within each task)."""
    part = rolling.filter(pl.col("sps").is_finite() & pl.col("rolling_std").is_finite())
    if part.height == 0:
        return pl.DataFrame(
            schema={
                "task": pl.String,
                "sps_bin_center": pl.Float64,
                "noise_mean": pl.Float64,
                "n": pl.UInt32,
            }
        )
    lo = pl.col("sps").min().over("task")
    hi = pl.col("sps").max().over("task")
    width = ((hi - lo) / n_bins).clip(lower_bound=1e-9)
    return (
        part.with_columns(
            ((pl.col("sps") - lo) / width).floor().clip(0, n_bins - 1).alias("bin"),
            lo.alias("lo"),
            width.alias("w"),
        )
        .group_by("task", "bin")
        .agg(
            (pl.col("lo").first() + (pl.col("bin").first() + 0.5) * pl.col("w").first()).alias(
                "sps_bin_center"
            ),
            pl.col("rolling_std").mean().alias("noise_mean"),
            pl.len().alias("n"),
        )
        .filter(pl.col("n") >= 20)
        .select("task", "sps_bin_center", "noise_mean", "n")
        .sort("task", "sps_bin_center")
    )


def _fmt_ci(value: float, low: float, high: float) -> str:
    """ "0.500 [0.100, inf]", "0.0100 [<1e-6, 0.0400]" (`figures.number`: a tiny positive
    bound never prints as 0); "n/a" when any part is undefined (an upper bound may be inf)."""
    if any(v is None or math.isnan(v) for v in (value, low, high)):
        return "n/a"
    return f"{figures.number(value)} [{figures.number(low)}, {figures.number(high)}]"


def noise_progress_table(progress: pl.DataFrame, granularity: str) -> pl.DataFrame:
    """Per task and progress bin: p10/median/p90 over series of the in-bin noise."""
    return (
        progress.filter((pl.col("granularity") == granularity) & pl.col("noise_diff").is_finite())
        .group_by("task", "bin")
        .agg(
            pl.col("progress").mean(),
            pl.col("noise_diff").quantile(0.1).alias("p10"),
            pl.col("noise_diff").median().alias("p50"),
            pl.col("noise_diff").quantile(0.9).alias("p90"),
        )
        .sort("task", "bin")
    )


def _data_section(
    report: Report,
    series_quality: pl.DataFrame,
    granularity: str,
    scope: TaskScope,
    run_urls: dict[str, str] | None = None,
) -> None:
    """Which runs feed which granularity, and every run or series left out, with why;
    where each run is on WandB when that is known."""
    report.add(Heading("Data used and left out"))
    links = {run: url for run, url in (run_urls or {}).items() if url}
    if links:
        run_tasks = series_quality.select("run_id", "task").unique("run_id", keep="first")
        link_table = (
            pl.DataFrame({"run_id": sorted(links), "url": [links[r] for r in sorted(links)]})
            .join(run_tasks, on="run_id", how="left", maintain_order="left")
            .select("task", "run_id", "url")
        )
        # a run no series names has no task: listed whichever tasks are shown
        listed = (
            link_table.filter(pl.col("task").is_null() | pl.col("task").is_in(scope.shown))
            if scope.limited
            else link_table
        )
        if listed.height:
            report.add(
                Table(
                    ["run", "WandB"],
                    [list(r) for r in listed.select("run_id", "url").iter_rows()],
                    caption="Where each run is on WandB (entity/project/run id from its run "
                    "record).",
                )
            )
        scope.publish(report, "wandb_runs", link_table, what="runs")
    per_task = quality.granularity_runs(series_quality, quality.PURPOSE_LEVEL)
    report.add(
        Table(
            ["task", "granularity", "runs", "run ids"],
            [
                [r["task"], r["granularity"], r["n_runs"], ", ".join(r["runs"])]
                for r in scope.keep(per_task).iter_rows(named=True)
            ],
            caption="Runs with at least one usable series, per granularity. Epoch and "
            "completion figures are never pooled; sections below that show one granularity "
            f"({granularity}) name the runs they leave out.",
        )
    )
    scope.publish(report, "runs_per_granularity", per_task)
    if scope.limited and per_task.height:
        totals = (
            per_task.group_by("granularity")
            .agg(pl.col("n_runs").sum(), pl.col("task").n_unique().alias("n_tasks"))
            .sort("granularity")
        )
        report.add(
            Paragraph(
                [
                    f"Across all {len(scope.tasks)} tasks, runs with a usable series: "
                    + "; ".join(f"{g}: {n} runs of {k} tasks" for g, n, k in totals.iter_rows())
                    + "."
                ]
            )
        )
    dropped = quality.left_out(series_quality, quality.PURPOSE_DYNAMICS)
    if dropped.height == 0:
        report.add_table_file("left_out", dropped)
        report.add(Paragraph(["No run or series was left out."]))
        return
    listed = scope.keep(dropped)
    if listed.height == 0:
        report.add(
            Paragraph([f"No run or series of the {len(scope.shown)} tasks shown was left out."])
        )
    else:
        report.add(
            Table(
                ["task", "run", "granularity", "label", "reason"],
                [
                    [r["task"], r["run_id"], r["granularity"], r["label"], r["reason"]]
                    for r in listed.iter_rows(named=True)
                ],
                caption="Left out of noise, drift, timescale and LP evidence (label '*': the "
                "whole run). Constant series still count for reward levels (the variance "
                "section); the others are left out there too.",
            )
        )
    scope.publish(report, "left_out", dropped)
    if scope.limited:
        whole = dropped.filter(pl.col("label") == "*").height
        report.add(
            Paragraph(
                [
                    f"Across all {len(scope.tasks)} tasks: {whole} whole runs (of a "
                    f"granularity) and {dropped.height - whole} single series left out, in "
                    f"{dropped['task'].n_unique()} tasks."
                ]
            )
        )


def _g(value: object) -> str:
    """The report's one number style (`figures.number`); "n/a" for anything not finite."""
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return figures.number(value)


def _epoch_section(report: Report, view: pl.DataFrame | None, scope: TaskScope) -> None:
    """What Metta's epoch means can tell, and (where a run recorded its stream) how their
    converted per-completion noise compares with the stream's own."""
    report.add(Heading("What the epoch means can tell"))
    report.add(
        Paragraph(
            [
                "Metta's epoch value of a label is the mean, over every episode end of the "
                "epoch, of each environment's last reward of that label (held values). Held "
                "values are renewed at lambda = c / N per epoch (c completions of the label per "
                "epoch, N environments), so a held value is on average 1/lambda epochs old and "
                "the epoch noise is far below the per-completion noise. In epoch units a "
                "series tells its drift per epoch, its epoch noise and, when resolved, lambda; "
                "a per-completion figure needs a scale: c and C from a recorded stream, N from "
                "the run config (training_env.num_envs), or C given in the "
                "timescale_recommendations config (completions_per_epoch). Figures use the "
                "second half of each run (rts_dagster/analysis/epoch_model.py)."
            ]
        )
    )
    if view is None or view.height == 0:
        report.add(Paragraph(["No usable epoch series."]))
        return
    every = epoch_view.summarise_by_task(view)
    summary = scope.keep(every)
    if summary.height:
        report.add(
            Table(
                [
                    "task",
                    "runs",
                    "series",
                    "epoch noise (reward)",
                    "lambda resolved",
                    "median held-value age (epochs)",
                    "per-completion sd from epoch means (upper bound unless lambda resolved)",
                    "per-completion sd of the stream",
                    "converted / stream",
                    "scale",
                ],
                [
                    [
                        r["task"],
                        r["n_runs"],
                        r["n_series"],
                        r["epoch_noise"],
                        f"{r['n_lambda_told']} of {r['n_series']}",
                        r["lag_epochs"] if r["lag_epochs"] is not None else "not resolved",
                        r["sigma_per_completion"],
                        r["sigma_stream"],
                        r["sigma_ratio"],
                        r["scale_sources"],
                    ]
                    for r in summary.iter_rows(named=True)
                ],
                caption="Medians over the task's epoch series. Epoch noise: sqrt(Var(diff)/2) of "
                "the epoch values; per-completion sd from epoch means: the held-value model's "
                "conversion (an upper bound when lambda is not resolved); of the stream: "
                "std(diff)/sqrt2 of the recorded completions over the same epochs.",
            )
        )
    lines = []
    for r in summary.iter_rows(named=True):
        task = r["task"]
        stream, converted, noise = r["sigma_stream"], r["sigma_per_completion"], r["epoch_noise"]
        if stream is not None and math.isfinite(stream) and noise:
            text = (
                f"{task}: the epoch means' noise ({_g(noise)} reward, median over "
                f"{r['n_series']} series) is {_g(stream / noise)}x below the per-completion "
                f"noise of the recorded stream ({_g(stream)})"
            )
            if converted is not None and math.isfinite(converted):
                text += (
                    f"; converted through the held-value model the epoch series give "
                    f"{_g(converted)} ({_g(r['sigma_ratio'])}x the stream's)"
                )
            lines.append(text + f"; lambda resolved for {r['n_lambda_told']} of {r['n_series']}.")
        elif converted is not None and math.isfinite(converted):
            lines.append(
                f"{task}: per-completion sd ~{_g(converted)} from the epoch means "
                f"(scale: {r['scale_sources']}); no recorded stream to check it against."
            )
        else:
            lines.append(
                f"{task}: epoch noise {_g(noise)} reward per epoch; the per-completion noise "
                "cannot be told from these data (no recorded stream, no environment count in "
                "the run config, no completions_per_epoch given)."
            )
    if lines:
        report.add(Bullets(lines))
    scope.publish(report, "epoch_view", every)
    if scope.limited:
        checked = every.filter(pl.col("sigma_stream").is_finite())["task"].n_unique()
        report.add(
            Paragraph(
                [
                    f"Across all {len(scope.tasks)} tasks: lambda resolved for "
                    f"{every['n_lambda_told'].sum()} of {every['n_series'].sum()} epoch series; "
                    f"{checked} tasks have a recorded stream to check the conversion against."
                ]
            )
        )


METHOD_NOTES = (
    "Intervals (rts_dagster/analysis/intervals.py), all 95% and valid with 2-5 seeds; each "
    "printed with its method and n, none formed from one seed: Student t of a mean over "
    "seeds; paired t of differences over runs or seeds shared by two configurations; t on "
    "logs for ratios and timescales (geometric means); Welch t on logs for two tasks with "
    "different seeds; Bonferroni-adjusted t for the best of K configurations (it holds "
    "whichever was picked); exact F for the random-effects ICC and the variance ratio "
    "(1 - ICC) / ICC; chi-square for Var(seed). Coverage at 3 seeds is tested on "
    "synthetic data with a known truth (rts_dagster_tests/analysis/test_coverage.py and the "
    "kalman / lp_sweep / verdict tests).",
    "Data quality (analysis/quality.py): a series is constant (every finite value equal, e.g. "
    "a task solved at exactly 1.0: not stale), mostly_stale (>= 90% of its epoch rows repeat "
    "the previous value exactly), too_short (< 10 usable samples), absurd_values (an infinite "
    "or |reward| > 1e6, or more than 10% NaN: corrupt) or no_finite; reward "
    "levels use ok and constant series, noise, drift, timescales and LP use ok series only; "
    "everything left out is listed in 'Data used and left out'.",
    "Epoch means (analysis/epoch_model.py): the held-value model of Metta's logging; epoch "
    "figures stay in epoch units unless a scale converts them (see 'What the epoch means "
    "can tell'). An LP ema_timescale is never compared with or proposed from an epoch count.",
    "Timescales (analysis/kalman.py): local-level fits per regime (learning / plateau, a "
    "two-segment line accepted by BIC); fits shorter than 100 samples or at the search bound "
    "are left out and counted; Ljung-Box p < 0.01 on the one-step errors flags a poor fit. "
    "LP's objective (analysis/lp_timescales.py): d' of F - S between a learning and a "
    "plateaued label, closed forms; the pair is chosen on the other seeds and scored on each "
    "held-out seed.",
    "Verdict (analysis/verdict.py): the only advice; replay winners must carry signal of "
    "their own, beat the default after the selection adjustment and pass the lag, churn and "
    "starvation guards; the closed loop (the simulator) can veto or confirm; conflicts are "
    "named with the experiment that would settle them (seeds per arm from a noncentral-t "
    "power calculation on a measured training outcome, never on a d' ratio).",
)


def _interval(row: dict) -> str:
    if row["low"] is None or not math.isfinite(row["low"]):
        return f"no interval, n={row['n']}"
    return f"95% {row['method']} interval {_g(row['low'])} to {_g(row['high'])}, n={row['n']} seeds"


def _side(row: dict, reference: float) -> int:
    """-1 / +1 when the row's interval lies wholly below / above `reference`, else 0."""
    low, high = row["low"], row["high"]
    if high is not None and math.isfinite(high) and high < reference:
        return -1
    if low is not None and math.isfinite(low) and low > reference:
        return 1
    return 0


_NOISE_TREND = {
    -1: "shrinks as the labels are learned",
    1: "grows as the labels are learned",
    0: "does not clearly change over training",
}
_SPS_NOISE = {
    -1: "SPS dips come with noisier rewards",
    1: "noise is higher when SPS is higher",
    0: "no clear link between SPS and reward noise",
}


def noise_trend_sentences(table: pl.DataFrame) -> list[str]:
    """Does noise shrink as a label is learned? One sentence per (task, granularity)."""
    return [
        f"{r['task']} ({r['granularity']}): noise {_NOISE_TREND[_side(r, 1.0)]}: last tenth / "
        f"first tenth = x{_g(r['estimate'])} ({_interval(r)}; geometric mean over "
        f"{r['n_series']} series)."
        for r in table.iter_rows(named=True)
    ]


def sps_noise_sentences(table: pl.DataFrame) -> list[str]:
    """Do SPS dips come with noisier rewards? One sentence per (task, granularity)."""
    return [
        f"{r['task']} ({r['granularity']}): {_SPS_NOISE[_side(r, 0.0)]}: corr(SPS, rolling "
        f"std) = {_g(r['estimate'])} ({_interval(r)}; mean over {r['n_series']} series)."
        for r in table.iter_rows(named=True)
    ]


def _methods_section(report: Report) -> None:
    report.add(Heading("Methods and limits"))
    report.add(Bullets(list(METHOD_NOTES)))


def _not_shown(
    series_quality: pl.DataFrame | None, granularity: str, scope: TaskScope | None = None
) -> str:
    """A sentence naming the runs (of the tasks shown) that have no usable series of
    `granularity`."""
    if series_quality is None or series_quality.height == 0:
        return ""
    if scope is not None:
        series_quality = scope.keep(series_quality)
    fit = quality.usable(series_quality, quality.PURPOSE_DYNAMICS)
    shown = set(fit.filter(pl.col("granularity") == granularity)["run_id"].to_list())
    runs = sorted(set(series_quality["run_id"].to_list()) - shown)
    if not runs:
        return ""
    return (
        f" Not shown (no usable {granularity} series; see 'Data used and left out'): "
        + ", ".join(runs)
        + "."
    )


_WITHIN_TASK = "within_task:"  # variance_table's scope of a task's own rows
TIMESCALES_TABLE = "timescales"  # tables/timescales.csv: every timescale_recommendations row
# per-task 95% intervals counted across many tasks: the count is not a test of its own
_UNADJUSTED = (
    "each task judged by its own 95% interval, not adjusted for the number of tasks: with no "
    "real effect, about 1 task in 40 still lands on each side by chance"
)


def _sides(table: pl.DataFrame, reference: float) -> pl.DataFrame:
    """Per granularity: how many rows' intervals lie wholly below / above `reference`, and
    how many include it (`_side`, vectorised)."""
    side = (
        pl.when(pl.col("high").is_finite() & (pl.col("high") < reference))
        .then(-1)
        .when(pl.col("low").is_finite() & (pl.col("low") > reference))
        .then(1)
        .otherwise(0)
    )
    return (
        table.with_columns(side.alias("side"))
        .group_by("granularity")
        .agg(*((pl.col("side") == s).sum().alias(str(s)) for s in (-1, 1, 0)))
        .sort("granularity")
    )


def _direction_summary(
    table: pl.DataFrame, reference: float, words: dict[int, str], subject: str, scope: TaskScope
) -> Paragraph:
    """One line over every task: per granularity, in how many tasks the interval lies
    below `reference`, above it, or includes it (`words` of -1, +1 and 0)."""
    parts = [
        f"{granularity}: {subject}"
        + ", ".join(f"{words[s]} in {n}" for s, n in zip((-1, 1, 0), counts, strict=True))
        for granularity, *counts in _sides(table, reference).iter_rows()
    ]
    return Paragraph([f"Across all {len(scope.tasks)} tasks, {'; '.join(parts)}; {_UNADJUSTED}."])


def _noise_trend(report: Report, trend: pl.DataFrame, scope: TaskScope) -> None:
    if trend.height == 0:
        return
    if (listed := scope.keep(trend)).height:
        report.add(Bullets(noise_trend_sentences(listed)))
    scope.publish(report, "noise_trend", trend, what="sentences")
    if scope.limited:
        report.add(_direction_summary(trend, 1.0, _NOISE_TREND, "noise ", scope))


def _per_label_table(
    report: Report,
    sel: pl.DataFrame,
    series_quality: pl.DataFrame,
    granularity: str,
    scope: TaskScope,
) -> None:
    per_label = (
        sel.group_by("task", "label")
        .agg(
            pl.len().alias("seeds"),
            pl.col("n_samples").sum().alias("samples"),
            pl.col("mean_reward").mean(),
            pl.col("mean_slope").mean(),
            pl.col("noise_diff").mean(),
            pl.col("noise_rolling_mean").mean(),
            pl.col("stale_fraction").mean(),
            pl.col("sps_reward_corr").mean(),
        )
        .sort("task", "noise_diff", descending=[False, True])
    )
    report.add(
        Table(
            [
                "task",
                "label",
                "seeds",
                "samples",
                "mean reward",
                "mean slope (reward/sample)",
                "noise std(diff)/sqrt2",
                "rolling std (10)",
                "stale fraction",
                "corr(SPS, reward)",
            ],
            [list(r) for r in scope.keep(per_label).iter_rows()],
            caption=f"Per-label metrics ({granularity} stream), averaged over seeds."
            + _not_shown(series_quality, granularity, scope),
        )
    )
    scope.publish(report, "per_label_metrics", per_label)
    if scope.limited and per_label.height:
        noise = per_label["noise_diff"].filter(per_label["noise_diff"].is_finite())
        spread = (
            f"; trend-robust noise std(diff)/sqrt2 median {_g(noise.median())} reward (p10 "
            f"{_g(noise.quantile(0.1))}, p90 {_g(noise.quantile(0.9))})"
            if noise.len()
            else ""
        )
        report.add(
            Paragraph(
                [
                    f"Across all {len(scope.tasks)} tasks: {per_label.height} (task, label) "
                    f"rows{spread}."
                ]
            )
        )


def _variance_section(
    report: Report, variance: pl.DataFrame, shown: list[str], scope: TaskScope
) -> None:
    report.add(Heading("Seed variance vs task variance"))
    if variance.height == 0:
        report.add_table_file("variance", variance)
        return
    named = variance.with_columns(
        pl.concat_str(
            [
                pl.col("scope"),
                pl.lit(" / "),
                pl.col("level"),
                pl.lit(" / "),
                pl.col("granularity"),
            ]
        ).alias("name"),
        # the task of a within-task row (null across tasks): what the report may leave out
        pl.when(pl.col("scope").str.starts_with(_WITHIN_TASK))
        .then(pl.col("scope").str.strip_prefix(_WITHIN_TASK))
        .alias("_task"),
    )
    listed = (
        named.filter(pl.col("_task").is_null() | pl.col("_task").is_in(scope.shown))
        if scope.limited
        else named
    )
    report.add(
        Paragraph(
            [
                "Variance components of mean reward. Across tasks: a one-way random-effects "
                "model with the task as the random factor (a run's value is its run effect "
                "from an additive label + run fit, so a run missing a hard label is not "
                "pulled down); within a task: an additive label + seed model, so var(seed) "
                "there is the label-by-seed noise. Intervals are exact F intervals (ICC and "
                "the ratio (1 - ICC) / ICC), valid with 3 seeds; the method and n of each "
                "are in the last columns. Epoch and completion values are never pooled."
            ]
        ),
        Table(
            [
                "scope",
                "level",
                "granularity",
                "Var(seed) [95% CI]",
                "Var(task or label)",
                "ratio [95% CI]",
                "ICC [95% CI]",
                "runs",
                "interval",
                "note",
            ],
            [
                [
                    r["scope"],
                    r["level"],
                    r["granularity"],
                    _fmt_ci(r["var_seed"], r["var_seed_ci_low"], r["var_seed_ci_high"]),
                    r["var_task_or_label"],
                    _fmt_ci(r["ratio"], r["ratio_ci_low"], r["ratio_ci_high"]),
                    _fmt_ci(r["icc"], r["icc_ci_low"], r["icc_ci_high"]),
                    r["n_runs"],
                    r["ci_method"] or "none",
                    r["reason"] or "",
                ]
                for r in listed.iter_rows(named=True)
            ],
            caption="Ratio = Var(seed) / Var(task or label) > 1: seeds of the same task "
            "differ more than the tasks (or labels) differ; inf = the task (label) "
            "component cannot be told from zero.",
        ),
    )
    href = report.add_table_file("variance", variance)
    if note := scope.left_out_note(named, href, column="_task"):
        report.add(note)
    within = named.filter(pl.col("_task").is_not_null())
    if scope.limited and within.height:
        sides = _sides(
            within.select(
                "granularity",
                pl.col("ratio_ci_low").alias("low"),
                pl.col("ratio_ci_high").alias("high"),
            ),
            1.0,
        )
        parts = [
            f"{granularity}: above 1 (seeds differ more than labels) in {above} rows, below 1 "
            f"in {below}, includes 1 in {neither}"
            for granularity, below, above, neither in sides.iter_rows()
        ]
        report.add(
            Paragraph(
                [
                    f"Within-task rows of all {within['_task'].n_unique()} tasks, by the "
                    f"ratio's exact F 95% interval ({'; '.join(parts)}): each row judged by its "
                    "own interval, not adjusted for the number of tasks."
                ]
            )
        )
    report.add(
        Figure(
            "variance_ratios",
            FigureRecipe(
                figures.variance_ratios,
                (
                    named.filter(
                        (pl.col("scope") == "across_tasks")
                        | pl.col("scope").is_in([f"{_WITHIN_TASK}{t}" for t in shown])
                    ).drop("_task"),
                ),
            ),
            "Seed/task and seed/label variance ratios with exact F 95% intervals (an "
            "infinite upper bound is drawn to the axis edge).",
        )
    )


def _sps_section(
    report: Report,
    roll: pl.DataFrame,
    series: pl.DataFrame,
    sel: pl.DataFrame,
    granularity: str,
    scope: TaskScope,
) -> None:
    report.add(Heading("SPS and noise"))
    sps_points = sps_noise_table(roll)
    if sps_points.height:
        report.add(
            Figure(
                "sps_vs_noise",
                FigureRecipe(figures.sps_vs_noise, (sps_points,)),
                f"Mean rolling reward std per SPS bin ({granularity} stream): a falling line "
                "means SPS dips come with noisier rewards.",
            )
        )
    sps = summaries.sps_noise(series)
    if sps.height:
        if (listed := scope.keep(sps)).height:
            report.add(Bullets(sps_noise_sentences(listed)))
        scope.publish(report, "sps_noise", sps, what="sentences")
        if scope.limited:
            report.add(_direction_summary(sps, 0.0, _SPS_NOISE, "", scope))
    corr = (
        sel.group_by("task")
        .agg(pl.col("sps_reward_corr").mean(), pl.col("sps_noise_corr").mean())
        .sort("task")
    )
    report.add(
        Table(
            ["task", "mean corr(SPS, reward)", "mean corr(SPS, rolling std)"],
            [list(r) for r in scope.keep(corr).iter_rows()],
        )
    )
    scope.publish(report, "sps_correlation", corr)


def _timescale_section(
    report: Report, recommendations: pl.DataFrame, in_figures: pl.Expr, scope: TaskScope
) -> None:
    report.add(Heading("EMA timescales of the streams"))
    report.add(
        Paragraph(
            [
                "A local-level model (random-walk signal + observation noise) is fitted to "
                "every series, and separately to its learning and plateau regimes (a "
                "two-segment line, the break accepted by BIC); its steady-state Kalman gain K "
                "is the EMA weight that tracks that stream best and 1/K its timescale, in the "
                "unit of the series: completions of the label, or epochs for Metta's epoch "
                "means. This describes the stream; it is not LP's best timescale (LP detects "
                "change through |F - S|, see the verdict's noise evidence). LP's ema_timescale "
                "is compared only in completion units. Intervals: t on the logs of the "
                "per-seed timescales, n = seeds with a usable fit; fits at the search bound "
                "or too short are left out and counted."
            ]
        )
    )
    href = report.add_table_file(TIMESCALES_TABLE, recommendations)
    if recommendations.height == 0:
        return
    recs = recommendations.sort("task", "granularity", "group", "label", "regime")
    report.add(
        Table(
            [
                "task",
                "label",
                "regime",
                "unit",
                "seeds",
                "noise sd",
                "drift sd per unit",
                "timescale 1/K [95% CI]",
                "interval",
                "left out",
                "LP timescale (completions of one task instance)",
                "vs LP",
            ],
            [
                [
                    r["task"],
                    r["label"],
                    r["regime"],
                    r["unit"],
                    r["n_seeds"],
                    r["noise_std"],
                    r["drift_std"],
                    _fmt_ci(r["timescale"], r["timescale_ci_low"], r["timescale_ci_high"]),
                    f"{r['ci_method']}, n={r['ci_n']}" if r["ci_method"] else "none",
                    r["excluded_reason"] or "",
                    r["lp_timescale"],
                    r["lp_comparison"] or "",
                ]
                for r in scope.keep(recs).iter_rows(named=True)
            ],
            caption="label '*' = all labels of the task pooled; timescales in the row's "
            "unit; noise sd in reward units.",
        )
    )
    if note := scope.left_out_note(recs, href):
        report.add(note)
    plateau = recs.filter((pl.col("regime") == "plateau") & pl.col("timescale").is_finite())
    if scope.limited:
        pooled = plateau.filter(pl.col("label") == "*")
        spread = [
            f"{_g(part['timescale'].median())} {unit} (p10 {_g(part['timescale'].quantile(0.1))}, "
            f"p90 {_g(part['timescale'].quantile(0.9))}; {part.height} pooled rows of "
            f"{part['task'].n_unique()} tasks)"
            for (unit,), part in pooled.group_by("unit", maintain_order=True)
        ]
        if spread:
            report.add(
                Paragraph(
                    [
                        f"Across all {len(scope.tasks)} tasks, the plateau timescale of the "
                        "pooled rows ('*'), median over rows: " + "; ".join(spread) + "."
                    ]
                )
            )
    for unit in recs["unit"].unique(maintain_order=True).to_list():
        part = plateau.filter(pl.col("unit") == unit)
        if part.height == 0:
            continue
        named = part.with_columns(
            pl.concat_str([pl.col("task"), pl.lit("/"), pl.col("label")]).alias("name")
        )
        report.add(
            Figure(
                f"timescales_{'completions' if unit == 'completions' else 'epochs'}",
                FigureRecipe(
                    figures.timescales,
                    (
                        named.filter(in_figures).sort("task", "label", descending=True),
                        unit,
                    ),
                ),
                f"Tracking-optimal EMA timescale in the plateau regime, {unit} (dots, 95% "
                "t interval over seeds on the log scale)"
                + (" and the LP config's timescale (crosses)." if unit == "completions" else "."),
            )
        )


def _findings(
    report: Report,
    findings: Sequence[str] | Findings,
    recommendations: pl.DataFrame,
    scope: TaskScope,
) -> None:
    """ "What the streams show": the timescale findings of the tasks shown, then the
    statements across every task (whose intervals are adjusted for picking among all)."""
    report.add(Heading("What the streams show"))
    empty = ["Nothing to describe: too few usable samples."]
    split = findings if isinstance(findings, Findings) else None
    if split is None and not scope.limited:
        report.add(Bullets(list(findings) or empty))
        return
    if split is None:
        split = split_findings(findings, recommendations, scope.shown)
    if split is None:  # not describe_recommendations' sentences: nothing is left out
        report.add(Bullets(list(findings) or empty))
        return
    own = [s for task, lines in split.by_task.items() if task in scope.shown for s in lines]
    if not own and not split.across_tasks:
        report.add(Bullets(empty))
        return
    if own:
        report.add(Bullets(own))
    href = report.add_table_file(TIMESCALES_TABLE, recommendations)
    if note := scope.left_out_note(recommendations, href, what="sentences"):
        report.add(note)
    if split.across_tasks:
        if scope.limited:
            report.add(Paragraph([f"Across all {len(scope.tasks)} tasks:"]))
        report.add(Bullets(list(split.across_tasks)))


def build_report(
    streams: pl.DataFrame,
    series: pl.DataFrame,
    rolling: pl.DataFrame,
    progress: pl.DataFrame,
    variance: pl.DataFrame,
    recommendations: pl.DataFrame,
    findings: Sequence[str] | Findings,
    lp_configs: dict[str, dict],
    lp: dict[str, pl.DataFrame] | None = None,
    verdicts: list[Verdict] | None = None,
    series_quality: pl.DataFrame | None = None,
    epoch_views: pl.DataFrame | None = None,
    run_urls: dict[str, str] | None = None,
    experiments: dict[str, pl.DataFrame] | None = None,
    engines: dict[str, int] | None = None,
    learning: pl.DataFrame | None = None,
) -> Report:
    """The whole report. `findings`: descriptive sentences of the timescale analysis
    (`kalman.describe_recommendations` of `recommendations`, or a `scope.Findings` split by
    task, where only the tasks the report shows need sentences); `lp_configs`: task -> LP
    config found in its runs' config; `lp`: the lp_recommendations tables
    (`defs.lp.lp_tables`), None when not materialized; `verdicts`: one per task;
    `series_quality`: the data_quality series table (what was left out and why); runs,
    tasks and granularity are counted from it when given.

    With more than `MAX_FIGURE_TASKS` tasks, the figures and every per-task sentence and
    table row cover `figure_tasks(...)`; the verdicts, the counts and the statements across
    tasks cover every task, and every table's rows are kept for tables/<name>.csv.

    `streams` and `rolling` feed only figures: a caller with many tasks may pass only the
    rows of `figure_tasks(...)`. `learning`: `analysis.learning.learning_slopes` of every
    run's usable series (computed from `streams` when None)."""
    if series_quality is None:
        series_quality = quality.series_quality(streams)
    granularity = preferred_granularity(series_quality)
    n_runs = series_quality.select("task", "seed", "run_id").unique().height
    tasks = sorted(series_quality["task"].unique().to_list())
    shown = figure_tasks(
        tasks, verdicts, with_arms=tasks_with_arms((experiments or {}).get("discovered"))
    )
    scope = TaskScope.of(tasks, shown)
    in_figures = pl.col("task").is_in(shown)
    # what each section may use (data_quality): levels keep constant series, dynamics not
    streams = quality.keep_usable(streams, series_quality, quality.PURPOSE_LEVEL)
    series = quality.keep_usable(series, series_quality, quality.PURPOSE_LEVEL)
    rolling = quality.keep_usable(rolling, series_quality, quality.PURPOSE_DYNAMICS)
    progress = quality.keep_usable(progress, series_quality, quality.PURPOSE_DYNAMICS)
    report = Report(title="Reward streams and LP settings")
    # hundreds of names are no header: every task is named in the verdicts
    task_names = "each named in the verdicts" if scope.limited and verdicts else ", ".join(tasks)
    report.add(
        Paragraph(
            [
                f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC} from {n_runs} runs over "
                f"{len(tasks)} tasks ({task_names}). Figures use the {granularity} "
                "stream (the per-completion rewards LP consumes when recorded; Metta's epoch "
                "means otherwise). An epoch mean is an average over environments of each "
                "one's last reward of the label (held values): its noise is far below the "
                "per-completion noise, its drift is per epoch (c completions of the label per "
                "epoch make it ~c times the drift per completion), and it lags the stream."
            ]
        )
    )
    report.add(Paragraph([engine_sentence(engines or {})]))
    if note := shown_note(shown, tasks):
        report.add(Paragraph([note]))
    add_verdict_section(report, verdicts or [])
    _data_section(report, series_quality, granularity, scope, run_urls)
    _findings(report, findings, recommendations, scope)
    add_learning_section(report, streams, slopes=learning, scope=scope)
    _epoch_section(report, epoch_views, scope)
    if lp is not None:
        add_lp_section(report, lp, shown, scope=scope)
    if experiments is None:
        experiments = {k: None for k in ("comparison", "curves", "difference", "run_metrics")}
        experiments["plan"] = None
    add_experiments_section(report, **experiments, scope=scope)

    sel = series.filter(pl.col("granularity") == granularity)
    report.add(Heading("Reward curves"))
    report.add(
        Figure(
            "reward_curves",
            FigureRecipe(
                figures.reward_curves,
                (
                    reward_curve_table(streams.filter(in_figures), granularity),
                    granularity,
                ),
            ),
            f"Mean reward over labels vs sample index ({granularity} stream), one colour per "
            "seed (smoothed over 25 samples)." + _not_shown(series_quality, granularity, scope),
        )
    )

    roll = rolling.filter((pl.col("granularity") == granularity) & in_figures)
    report.add(Heading("Rate of change and noise over training"))
    report.add(
        Figure(
            "slope_bands",
            FigureRecipe(
                figures.band_overlay,
                (
                    _binned(roll, "rolling_slope", ["task", "seed"], points=BAND_POINTS),
                    "rolling OLS slope (reward per sample)",
                    "Rate of change: median over labels, p10-p90 band",
                    granularity,
                ),
            ),
            f"Rolling OLS slope of reward over the last 25 samples ({granularity} stream), "
            "averaged per label within each sample-index bin; line = median over labels, band "
            "= p10-p90 over labels.",
        ),
        Figure(
            "noise_bands",
            FigureRecipe(
                figures.band_overlay,
                (
                    _binned(roll, "rolling_std", ["task", "seed"], points=BAND_POINTS),
                    "rolling std of reward (reward units)",
                    "Sampling noise: median over labels, p10-p90 band",
                    granularity,
                ),
            ),
            f"Rolling standard deviation of reward over the last 10 samples ({granularity} "
            "stream), averaged per label within each sample-index bin; line = median over "
            "labels, band = p10-p90.",
        ),
    )

    noise_bins = noise_progress_table(progress.filter(in_figures), granularity)
    if noise_bins.height:
        report.add(
            Figure(
                "noise_vs_progress",
                FigureRecipe(figures.noise_vs_progress, (noise_bins,)),
                f"Noise within each tenth of every label's series ({granularity} stream); "
                "line = median over (label, seed) series, band = p10-p90.",
            )
        )
    _noise_trend(report, summaries.noise_trend(progress), scope)

    report.add(Heading("Noise across tasks"))
    report.add(
        Figure(
            "noise_by_task",
            FigureRecipe(
                figures.noise_distribution,
                (
                    sel.filter(in_figures),
                    "noise_diff",
                    "trend-robust noise std(diff)/sqrt(2) (reward units)",
                ),
            ),
            f"Trend-robust noise of every (label, seed) series, per task ({granularity} stream)."
            + _not_shown(series_quality, granularity, scope),
        )
    )
    _per_label_table(report, sel, series_quality, granularity, scope)
    _variance_section(report, variance, shown, scope)
    _sps_section(report, roll, series, sel, granularity, scope)
    _timescale_section(report, recommendations, in_figures, scope)
    _lp_config_paragraphs(report, lp_configs, scope)
    _methods_section(report)
    return report


def _lp_config_paragraphs(report: Report, lp_configs: dict[str, dict], scope: TaskScope) -> None:
    for task, cfg in sorted(lp_configs.items()):
        if cfg and (not scope.limited or task in scope.shown):
            report.add(
                Paragraph(
                    [
                        f"{task}: LP config in the runs: "
                        + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()))
                    ]
                )
            )
    configs = pl.DataFrame(
        [
            {"task": task, "key": key, "value": str(value)}
            for task, cfg in sorted(lp_configs.items())
            for key, value in sorted((cfg or {}).items())
        ],
        schema={"task": pl.String, "key": pl.String, "value": pl.String},
    )
    scope.publish(report, "lp_configs", configs)
    if scope.limited and configs.height:
        distinct = {
            ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()))
            for cfg in lp_configs.values()
            if cfg
        }
        which = f": {next(iter(distinct))}" if len(distinct) == 1 else ""
        report.add(
            Paragraph(
                [
                    f"Across all {len(scope.tasks)} tasks: {configs['task'].n_unique()} record an "
                    f"LP config in their runs, {len(distinct)} distinct{which}."
                ]
            )
        )
