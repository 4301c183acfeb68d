"""Which series and runs can feed an aggregate, and why the others cannot.

Real runs die early, log a constant, or keep re-emitting one held value; a series like that
carries no information about noise or drift, and averaging it in silently turns tables to
n/a or counts a seed that contributes nothing. Every series (one label of one run at one
granularity) gets one `status`:

- `no_finite`: no finite reward at all;
- `absurd_values`: at least one reward is +-inf or beyond +-`REWARD_BOUND` (a corrupt log:
  MettaGrid rewards are per-agent episode returns, orders of magnitude below the bound),
  or more than `MAX_NAN_SHARE` of its rows are NaN. One 1e300 turns a pooled variance or
  timescale into inf, so such a series feeds no estimate at all, not even reward levels;
- `constant`: every finite reward is the same number (e.g. a task solved at exactly 1.0,
  or a label stuck at 0). That is a real value, not staleness: it counts for reward levels
  but has no noise or drift to measure;
- `mostly_stale` (epoch rows only): at least `stale_share` of its rows repeat the previous
  value exactly. Metta's epoch value is a mean over environments of held last values
  (DOMAIN.md), so exact repeats are rare in a healthy run; a series made of them was
  hardly logged anew;
- `too_short`: fewer than `min_samples` usable samples (finite, and for epoch rows not
  exact repeats);
- `ok`.

Two uses follow (`PURPOSE_LEVEL`, `PURPOSE_DYNAMICS`): reward-level summaries (variance of
mean reward) take `ok` and `constant` series; noise, drift, timescale and LP evidence take
`ok` series only (`absurd_values` feeds neither). A run contributes to a purpose when at least one of its series does.

Arms: a run whose config differs from its task's baseline in a setting (discovery) is
another arm of the task. Its series keep their status, but the task-level aggregates use
the baseline arm only (seeds are never pooled across settings); the other arms feed the
Experiments comparison (`usable(..., all_arms=True)`), and `left_out` names them.
Pure polars; no I/O.
"""

from __future__ import annotations

import polars as pl

from rts_dagster.schema import (
    GRANULARITY_EPOCH,
    RUN_QUALITY,
    SERIES_KEYS,
    SERIES_QUALITY,
    conform,
)

STATUS_OK = "ok"
STATUS_CONSTANT = "constant"
STATUS_STALE = "mostly_stale"
STATUS_SHORT = "too_short"
STATUS_NO_FINITE = "no_finite"
STATUS_ABSURD = "absurd_values"

PURPOSE_LEVEL = "level"  # mean-reward summaries
PURPOSE_DYNAMICS = "dynamics"  # noise, drift, timescales, LP replay

_USABLE = {
    PURPOSE_LEVEL: (STATUS_OK, STATUS_CONSTANT),
    PURPOSE_DYNAMICS: (STATUS_OK,),
}

MIN_SAMPLES = 10  # below this no per-series statistic of ours is stable
STALE_SHARE = 0.9
# |reward| beyond this is a corrupt value, not a reward (see the module docstring).
REWARD_BOUND = 1e6
# A series with more NaN rows than this share is logged wrongly, not occasionally empty.
MAX_NAN_SHARE = 0.1


def _num(col: str) -> pl.Expr:
    """A reward in the reason text: 4 significant digits."""
    return pl.col(col).map_elements(lambda v: f"{v:.4g}", return_dtype=pl.String)


def series_quality(
    streams: pl.DataFrame,
    arms: pl.DataFrame | None = None,
    min_samples: int = MIN_SAMPLES,
    stale_share: float = STALE_SHARE,
    reward_bound: float = REWARD_BOUND,
    max_nan_share: float = MAX_NAN_SHARE,
) -> pl.DataFrame:
    """One row per series of a `reward_streams` table: counts, `status` and `reason`
    (see the module docstring). `arms`: run_id, arm, baseline (bool) per run; runs not in
    it (or no table) count as their task's baseline. Columns: `schema.SERIES_QUALITY`."""
    finite = pl.col("reward").is_finite().fill_null(False)
    # +-inf and finite values beyond the bound (not NaN: polars orders NaN above everything)
    reward = pl.col("reward")
    absurd = (reward.is_infinite() | (finite & (reward.abs() > reward_bound))).fill_null(False)
    finite = finite & ~absurd  # min/max, constancy and usable counts ignore absurd values
    repeat = pl.col("is_stale").fill_null(False) & (pl.col("granularity") == GRANULARITY_EPOCH)
    stats = (
        streams.group_by(*SERIES_KEYS, maintain_order=True)
        .agg(
            pl.len().cast(pl.Int64).alias("n_rows"),
            finite.sum().cast(pl.Int64).alias("n_finite"),
            (repeat & finite).sum().cast(pl.Int64).alias("n_repeats"),
            pl.col("reward").filter(finite).min().alias("reward_min"),
            pl.col("reward").filter(finite).max().alias("reward_max"),
            absurd.sum().cast(pl.Int64).alias("_n_absurd"),
            pl.col("reward").is_nan().fill_null(False).sum().cast(pl.Int64).alias("_n_nan"),
            pl.col("reward").abs().filter(absurd).max().alias("_absurd_max"),
        )
        .with_columns((pl.col("n_finite") - pl.col("n_repeats")).alias("n_usable"))
    )
    n_rows, n_usable = pl.col("n_rows"), pl.col("n_usable")
    constant = (pl.col("n_finite") > 0) & (pl.col("reward_min") == pl.col("reward_max"))
    stale = (pl.col("n_repeats") >= stale_share * n_rows) & (pl.col("n_repeats") > 0)
    n_absurd, n_nan = pl.col("_n_absurd"), pl.col("_n_nan")
    is_absurd = (n_absurd > 0) | (n_nan > max_nan_share * n_rows)
    status = (
        pl.when((pl.col("n_finite") == 0) & (n_absurd == 0))
        .then(pl.lit(STATUS_NO_FINITE))
        .when(is_absurd)
        .then(pl.lit(STATUS_ABSURD))
        .when(constant)
        .then(pl.lit(STATUS_CONSTANT))
        .when(stale)
        .then(pl.lit(STATUS_STALE))
        .when(n_usable < min_samples)
        .then(pl.lit(STATUS_SHORT))
        .otherwise(pl.lit(STATUS_OK))
    )
    reason = (
        pl.when(pl.col("status") == STATUS_NO_FINITE)
        .then(pl.format("no finite reward in {} rows", n_rows))
        .when(pl.col("status") == STATUS_ABSURD)
        .then(
            pl.format(
                "{} of {} rewards infinite or beyond +-{} (largest |reward| {}), {} NaN "
                "(over {} is too many): corrupt values, kept out of every estimate",
                n_absurd,
                n_rows,
                pl.lit(f"{reward_bound:.4g}"),
                pl.when(n_absurd > 0).then(_num("_absurd_max")).otherwise(pl.lit("-")),
                n_nan,
                pl.lit(f"{max_nan_share:.0%}"),
            )
        )
        .when(pl.col("status") == STATUS_CONSTANT)
        .then(
            pl.format(
                "constant at {} over {} samples: no noise or drift to measure",
                _num("reward_min"),
                pl.col("n_finite"),
            )
        )
        .when(pl.col("status") == STATUS_STALE)
        .then(
            pl.format(
                "{} of {} rows repeat the previous value exactly (hardly logged anew)",
                pl.col("n_repeats"),
                n_rows,
            )
        )
        .when(pl.col("status") == STATUS_SHORT)
        .then(pl.format("only {} usable samples (fewer than {})", n_usable, pl.lit(min_samples)))
        .otherwise(pl.lit(""))
    )
    out = (
        stats.with_columns(status.alias("status"))
        .with_columns(reason.alias("reason"))
        .drop("_n_absurd", "_n_nan", "_absurd_max")
    )
    return conform(with_arms(out, arms), SERIES_QUALITY, "series_quality")


def with_arms(quality: pl.DataFrame, arms: pl.DataFrame | None) -> pl.DataFrame:
    """`quality` with `arm` and `baseline_arm` from `arms` (run_id, arm, baseline); a usable
    series of another arm gets the reason why the task aggregates leave it out."""
    quality = quality.drop("arm", "baseline_arm", strict=False)
    if arms is None or arms.height == 0:
        return quality.with_columns(
            pl.lit("baseline").alias("arm"), pl.lit(True).alias("baseline_arm")
        )
    table = arms.select(
        pl.col("run_id").cast(pl.String),
        pl.col("arm").cast(pl.String),
        pl.col("baseline").cast(pl.Boolean).alias("baseline_arm"),
    ).unique("run_id", keep="first")
    out = quality.join(table, on="run_id", how="left").with_columns(
        pl.col("arm").fill_null("baseline"), pl.col("baseline_arm").fill_null(True)
    )
    usable_any = pl.col("status").is_in(_USABLE[PURPOSE_LEVEL])
    return out.with_columns(
        pl.when(~pl.col("baseline_arm") & usable_any)
        .then(
            pl.format(
                "arm {}: another setting of this task, kept out of the task's pooled "
                "analyses and compared with the baseline in Experiments",
                pl.col("arm"),
            )
        )
        .otherwise(pl.col("reason"))
        .alias("reason")
    )


def _fit(purpose: str, all_arms: bool = False) -> pl.Expr:
    fit = pl.col("status").is_in(_USABLE[purpose])
    return fit if all_arms else fit & pl.col("baseline_arm")


def usable(quality: pl.DataFrame, purpose: str, all_arms: bool = False) -> pl.DataFrame:
    """The series keys fit for `purpose` (PURPOSE_LEVEL or PURPOSE_DYNAMICS): of the
    baseline arms only, unless `all_arms` (the Experiments comparison)."""
    return quality.filter(_fit(purpose, all_arms)).select(SERIES_KEYS)


def keep_usable(
    table: pl.DataFrame, quality: pl.DataFrame, purpose: str, all_arms: bool = False
) -> pl.DataFrame:
    """Rows of `table` (any frame with the series key columns) whose series is fit for
    `purpose`; series missing from `quality` are dropped too (unknown = not checked)."""
    return table.join(usable(quality, purpose, all_arms), on=list(SERIES_KEYS), how="semi")


def run_quality(quality: pl.DataFrame) -> pl.DataFrame:
    """One row per (run, granularity): how many of its series are usable for each purpose,
    and, when it contributes nothing to a purpose, why. Columns: `schema.RUN_QUALITY`."""
    keys = ["task", "seed", "run_id", "granularity"]
    status = pl.col("status")
    # another arm's usable series are left out of the task aggregates under that name
    shown = pl.when(pl.col("baseline_arm") | ~status.is_in(_USABLE[PURPOSE_LEVEL]))
    shown = shown.then(status).otherwise(pl.lit("other arm")).alias("status")
    out = (
        quality.group_by(keys, maintain_order=True)
        .agg(
            pl.len().cast(pl.Int64).alias("n_series"),
            _fit(PURPOSE_LEVEL).sum().cast(pl.Int64).alias("n_level"),
            _fit(PURPOSE_DYNAMICS).sum().cast(pl.Int64).alias("n_dynamics"),
            # the reasons of the series left out, most common first
            shown.filter(shown != STATUS_OK).value_counts(sort=True).alias("_counts"),
        )
        .with_columns(
            (pl.col("n_level") > 0).alias("contributes_level"),
            (pl.col("n_dynamics") > 0).alias("contributes_dynamics"),
            pl.col("_counts")
            .list.eval(
                pl.format(
                    "{} {}",
                    pl.element().struct.field("count"),
                    pl.element().struct.field("status").str.replace("_", " "),
                )
            )
            .list.join(", ")
            .alias("_summary"),
        )
        .with_columns(
            pl.when(pl.col("n_dynamics") == pl.col("n_series"))
            .then(pl.lit(""))
            .otherwise(
                pl.format(
                    "{} of {} series left out ({})",
                    pl.col("n_series") - pl.col("n_dynamics"),
                    pl.col("n_series"),
                    pl.col("_summary"),
                )
            )
            .alias("reason")
        )
    )
    return conform(out, RUN_QUALITY, "run_quality")


def left_out(quality: pl.DataFrame, purpose: str) -> pl.DataFrame:
    """What a section built for `purpose` leaves out, for the report to name: whole runs
    (label "*" when none of a run's series of that granularity is usable) and single series
    of runs that do contribute. Columns: task, seed, run_id, granularity, label, reason."""
    fit = _fit(purpose)
    other_arm = ~pl.col("baseline_arm") & pl.col("status").is_in(_USABLE[PURPOSE_LEVEL])
    runs = quality.group_by("task", "seed", "run_id", "granularity", maintain_order=True).agg(
        fit.any().alias("_any"),
        pl.len().alias("_n"),
        pl.col("reason").filter(~fit).first().alias("_first"),
        (~fit).sum().alias("_bad"),
        other_arm.any().alias("_arm"),
        pl.col("reason").filter(other_arm).first().alias("_arm_reason"),
    )
    whole = runs.filter(~pl.col("_any")).select(
        "task",
        "seed",
        "run_id",
        "granularity",
        pl.lit("*").alias("label"),
        # a run of another arm is left out as such, whatever its labels' quality
        pl.when(pl.col("_arm"))
        .then(pl.col("_arm_reason"))
        .when(pl.col("_n") == 1)
        .then(pl.col("_first"))
        .otherwise(pl.format("all {} labels unusable, e.g. {}", pl.col("_n"), pl.col("_first")))
        .alias("reason"),
    )
    partial = (
        quality.join(runs.filter(pl.col("_any")), on=["task", "seed", "run_id", "granularity"])
        .filter(~fit)
        .select("task", "seed", "run_id", "granularity", "label", "reason")
    )
    return pl.concat([whole, partial]).sort("task", "run_id", "granularity", "label")


def granularity_runs(quality: pl.DataFrame, purpose: str = PURPOSE_DYNAMICS) -> pl.DataFrame:
    """Per (task, granularity): the runs that feed it (`runs`, sorted run ids) and how
    many, so a task whose seeds mix granularities is never summarised under one."""
    fit = quality.filter(_fit(purpose))
    return (
        fit.group_by("task", "granularity")
        .agg(pl.col("run_id").unique().sort().alias("runs"))
        .with_columns(pl.col("runs").list.len().cast(pl.Int64).alias("n_runs"))
        .sort("task", "granularity")
    )
