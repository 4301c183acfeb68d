"""LP's own objective: the EMA pair that best separates a learning label from a plateaued one.

The tracking-optimal Kalman gain (`kalman`) describes a stream; it is not LP's best
timescale. LP detects change through |F - S|, with a fast EMA F of weight a
(`ema_timescale`) and a slow EMA S of weight b = a f (`slow_timescale_factor`), both fed
once per completion (DOMAIN.md). So the question is: which (a, f) makes F - S of a label
that is learning stand out most against F - S of a label on a plateau?

Learning (mean). A label sits on a flat level c (F = S = c) and then ramps, E[x_t] =
c + s t for t = 1, 2, ... An EMA m_t = (1 - w) m_{t-1} + w x_t has deviation d_t = m_t - c
obeying d_t = (1 - w) d_{t-1} + w s t, d_0 = 0, whose solution is

    d_t = s [ t - (1 - w)/w (1 - (1 - w)^t) ]

(check: d_1 = s w; the difference d_t - (1 - w) d_{t-1} = w s t). Hence

    E[F_t - S_t] = s [ (1-b)/b (1 - (1-b)^t) - (1-a)/a (1 - (1-a)^t) ],

rising like s (a - b) t^2 / 2 while a t << 1 and tending to s (1/b - 1/a).

Plateau (spread). x_t = mu_t + eps_t, Var(eps) = sigma^2, mu a random walk with step
variance q. Both EMAs have unit DC gain, so D = F - S is stationary. With impulse
responses h_w[k] = w (1 - w)^k:
- noise: Var = sigma^2 sum_k (h_a[k] - h_b[k])^2
               = sigma^2 [ a/(2-a) + b/(2-b) - 2ab/(a+b-ab) ];
- drift: D responds to one step eta of the walk with g[k] = sum_{j<=k} (h_a - h_b)[j]
  = (1-b)^(k+1) - (1-a)^(k+1), so with alpha = 1-a, beta = 1-b
         Var = q sum_{m>=1} (beta^m - alpha^m)^2
             = q [ beta^2/(1-beta^2) + alpha^2/(1-alpha^2) - 2 alpha beta/(1-alpha beta) ].
The two parts are independent: sd_plateau = sqrt(sum).

Score: d' = E[F - S] at the middle of the measured learning phase (t = L / 2 completions
for a learning regime of L completions) / sd_plateau. A larger sigma^2 / q penalises fast
pairs (noise passes), a larger q penalises slow ones (drift accumulates), and a shorter
learning phase needs a faster pair to move in time.

d' is model-based: these closed forms evaluated at the measured inputs (`score_method`),
not a separation measured on the stream. It is scale-free: as f -> 1, F - S shrinks like
(1 - f) on the ramp and on the plateau alike, so d' tends to a finite limit (the d' of the
derivative of the EMA with respect to its weight), not to 0, and on measured inputs it is
flat in f above ~0.5 (within ~1%). `limit_score` is that f -> 1 limit (at the best a for
it): `best_score / limit_score` near 1 says f is not pinned down by d'. In LP itself the
absolute size of F - S matters on main (the exploration floor and the lp_gain term), which
d' does not see.

Inputs, per (task, seed, label), from `kalman.estimate_local_level` rows in completion
units only: plateau regime r (sigma^2) and q, learning regime OLS slope and duration.
The same fits as `kalman.recommend_timescales` pools are used: a plateau fit flagged
`at_bound`, a plateau or learning regime shorter than `kalman.MIN_FIT_SAMPLES`, an absent
regime, a constant plateau or an undefined slope leaves the unit out, counted per row
(`n_excluded`, `excluded_reason`). (The learning regime gives only its OLS slope and
length, so its own local-level fit flags do not matter.)
A pair is chosen by maximising the mean of log d' over the units in scope (seeds of one
label, or seeds x labels of a task) on the grid a in 1e-4..0.5 (log), f in 0.05..0.99;
an optimum on the grid's edge is flagged (`best_on_grid_edge`).
Per seed, the pair is also chosen on the *other* seeds and scored on this one
(`loo_*`), so that ratios to Metta's default (a = 0.001, f = 0.2) are not inflated by
picking the best of the grid on the same seed: t intervals on log `loo_ratio` over seeds
are fair (the in-sample `score_ratio` is optimistic). Note that the label stream pools
many task instances while LP's EMAs run per task instance.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from rts_dagster.analysis.kalman import (
    MIN_FIT_SAMPLES,
    REGIME_LEARNING,
    REGIME_PLATEAU,
    UNIT_COMPLETIONS,
)
from rts_dagster.schema import LP_TIMESCALES, conform

METTA_DEFAULT_EMA = 0.001
METTA_DEFAULT_SLOW_FACTOR = 0.2
EMA_GRID = np.geomspace(1e-4, 0.5, 60)
SLOW_FACTOR_GRID = np.r_[np.linspace(0.05, 0.95, 19), 0.99]
SLOW_FACTOR_LIMIT = 1.0 - 1e-6  # f -> 1: d' at its finite limit (module doc)
SCORE_METHOD = (
    "model: closed-form d' at the measured plateau noise/drift and learning slope/duration "
    "(not measured on the stream)"
)


def ramp_separation(
    slope: np.ndarray | float, t: np.ndarray | float, a: np.ndarray | float, b: np.ndarray | float
) -> np.ndarray:
    """E[F_t - S_t] after t completions of a ramp of `slope` per completion from a flat
    start (F = S = the flat level), for fast weight a and slow weight b (module doc)."""
    slope, t, a, b = (np.asarray(v, dtype=np.float64) for v in (slope, t, a, b))

    def lag(w: np.ndarray) -> np.ndarray:  # (1 - w)/w (1 - (1 - w)^t), accurate for small w
        return (1.0 - w) / w * -np.expm1(t * np.log1p(-w))

    return slope * (lag(b) - lag(a))


def plateau_spread(
    noise_var: np.ndarray | float,
    drift_var: np.ndarray | float,
    a: np.ndarray | float,
    b: np.ndarray | float,
) -> np.ndarray:
    """Stationary sd of F - S on a plateau with observation noise variance `noise_var`
    and random-walk step variance `drift_var` per completion (module doc)."""
    noise_var, drift_var, a, b = (
        np.asarray(v, dtype=np.float64) for v in (noise_var, drift_var, a, b)
    )
    noise = a / (2.0 - a) + b / (2.0 - b) - 2.0 * a * b / (a + b - a * b)
    alpha, beta = 1.0 - a, 1.0 - b
    drift = (
        beta * beta / (b * (2.0 - b))
        + alpha * alpha / (a * (2.0 - a))
        - 2.0 * alpha * beta / (a + b - a * b)
    )
    return np.sqrt(noise_var * noise + drift_var * np.maximum(drift, 0.0))


def separation_score(
    slope: np.ndarray | float,
    duration: np.ndarray | float,
    noise_var: np.ndarray | float,
    drift_var: np.ndarray | float,
    a: np.ndarray | float,
    f: np.ndarray | float,
) -> np.ndarray:
    """d' = |E[F - S]| at the middle of the learning phase / sd(F - S) on the plateau."""
    b = np.asarray(a, dtype=np.float64) * np.asarray(f, dtype=np.float64)
    mean = np.abs(ramp_separation(np.abs(slope), np.asarray(duration) / 2.0, a, b))
    with np.errstate(divide="ignore", invalid="ignore"):
        return mean / plateau_spread(noise_var, drift_var, a, b)


def best_pair(
    slope: float, duration: float, noise_var: float, drift_var: float
) -> tuple[float, float, float]:
    """(ema_timescale, slow_timescale_factor, d') maximising d' on the grid for one set
    of inputs."""
    a = EMA_GRID[:, None]
    f = SLOW_FACTOR_GRID[None, :]
    score = separation_score(slope, duration, noise_var, drift_var, a, f)
    i, k = np.unravel_index(int(np.nanargmax(score)), score.shape)
    return float(EMA_GRID[i]), float(SLOW_FACTOR_GRID[k]), float(score[i, k])


def _log_scores(units: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """log d' on the (a, f) grid, (units, len(EMA_GRID), len(SLOW_FACTOR_GRID)), and
    log d' of Metta's default, (units,)."""
    cols = [units[c].to_numpy()[:, None, None] for c in ("slope", "duration", "r", "q")]
    a = EMA_GRID[None, :, None]
    f = SLOW_FACTOR_GRID[None, None, :]
    with np.errstate(divide="ignore"):
        grid = np.log(separation_score(*cols, a, f))
        default = np.log(
            separation_score(
                *(c[:, 0, 0] for c in cols), METTA_DEFAULT_EMA, METTA_DEFAULT_SLOW_FACTOR
            )
        )
    return grid, default


def _best(log_grid: np.ndarray) -> tuple[float, float, float, bool]:
    """(a, f, mean log d', on the grid edge) maximising the mean over the first axis."""
    mean = log_grid.mean(axis=0)
    i, k = np.unravel_index(int(np.argmax(mean)), mean.shape)
    edge = i in (0, len(EMA_GRID) - 1) or k in (0, len(SLOW_FACTOR_GRID) - 1)
    return float(EMA_GRID[i]), float(SLOW_FACTOR_GRID[k]), float(mean[i, k]), bool(edge)


def _log_limit_scores(units: pl.DataFrame) -> np.ndarray:
    """log d' as f -> 1 on the a grid, (units, len(EMA_GRID))."""
    cols = [units[c].to_numpy()[:, None] for c in ("slope", "duration", "r", "q")]
    with np.errstate(divide="ignore"):
        return np.log(separation_score(*cols, EMA_GRID[None, :], SLOW_FACTOR_LIMIT))


def _inputs(local_level: pl.DataFrame) -> pl.DataFrame:
    """Per (task, seed, run_id, label): plateau r, q, tracking timescale; learning slope,
    duration; and `reason` ("" for a usable unit, else why it is left out: the exclusions
    `kalman.recommend_timescales` applies to the fits used here)."""
    keys = ["task", "seed", "run_id", "label"]
    ll = local_level.filter(pl.col("unit") == UNIT_COMPLETIONS)
    plateau = ll.filter(pl.col("regime") == REGIME_PLATEAU).select(
        *keys,
        pl.col("r"),
        pl.col("q"),
        pl.col("timescale").alias("tracking_timescale"),
        pl.col("at_bound").alias("plateau_at_bound"),
        pl.col("n_samples").alias("plateau_n"),
    )
    learning = ll.filter(pl.col("regime") == REGIME_LEARNING).select(
        *keys,
        pl.col("trend_slope").alias("slope"),
        pl.col("n_samples").alias("duration"),
    )
    units = plateau.join(learning, on=keys, how="full", coalesce=True, nulls_equal=True)
    plateau_n = pl.col("plateau_n").fill_null(0)
    duration = pl.col("duration").fill_null(0)
    reason = (
        pl.when(plateau_n == 0)
        .then(pl.lit("no plateau regime"))
        .when(plateau_n < MIN_FIT_SAMPLES)
        .then(pl.lit(f"plateau shorter than {MIN_FIT_SAMPLES} completions"))
        .when(~pl.col("r").is_finite() | ~pl.col("q").is_finite())
        .then(pl.lit("plateau constant (no local-level fit)"))
        .when(pl.col("plateau_at_bound").fill_null(True))
        .then(pl.lit("plateau gain at a grid bound or 1/K longer than the regime"))
        .when(duration == 0)
        .then(pl.lit("no learning regime"))
        .when(duration < MIN_FIT_SAMPLES)
        .then(pl.lit(f"learning regime shorter than {MIN_FIT_SAMPLES} completions"))
        .when(~pl.col("slope").is_finite() | (pl.col("slope") == 0))
        .then(pl.lit("learning slope undefined"))
        .otherwise(pl.lit(""))
    )
    return units.with_columns(
        reason.alias("reason"), pl.col(pl.Float64).fill_null(float("nan"))
    ).sort(keys)


def _exclusions(part: pl.DataFrame) -> tuple[int, str]:
    """Units of a scope left out, and the counted reasons ("3 no plateau regime, ...")."""
    left = part.filter(pl.col("reason") != "")
    if left.height == 0:
        return 0, ""
    counts = left.group_by("reason").len().sort(["len", "reason"], descending=[True, False])
    return left.height, ", ".join(f"{n} {why}" for why, n in counts.rows())


def _edge_note(a: float, f: float, best: float, limit: float) -> str:
    """Which grid edge the optimum sits on; for the f edge, how far d' is from its f -> 1
    limit."""
    parts = []
    if a in (EMA_GRID[0], EMA_GRID[-1]):
        parts.append(f"optimum on the ema_timescale grid edge ({a:.3g})")
    if f in (SLOW_FACTOR_GRID[0], SLOW_FACTOR_GRID[-1]):
        parts.append(f"optimum on the slow_timescale_factor grid edge ({f:g})")
    if f == SLOW_FACTOR_GRID[-1] and math.isfinite(limit):
        parts.append(f"d' as f -> 1 is {math.exp(limit - best):.3f}x the grid best")
    return "; ".join(parts)


def _row(
    task: str,
    label: str,
    seed: int | None,
    run_id: str | None,
    part: pl.DataFrame,
    log_grid: np.ndarray,
    log_default: np.ndarray,
    log_limit: np.ndarray,
    loo: tuple[float, float, float] | None,
    notes: list[str],
) -> dict:
    """One row from the usable units `part` (with their log d' arrays) and the scope's
    exclusions (`part` holds left-out units too, with a non-empty `reason`)."""
    n_excluded, why = _exclusions(part)
    usable = part.filter(pl.col("reason") == "")
    base = {
        "task": task,
        "label": label,
        "seed": seed,
        "run_id": run_id,
        "scope": "seed" if seed is not None else "pooled",
        "n_seeds": usable.select("seed", "run_id").unique().height,
        "n_labels": usable["label"].n_unique(),
        "n_excluded": n_excluded,
        "excluded_reason": why,
        "score_method": SCORE_METHOD,
    }
    if usable.height == 0:
        what = "left out" if part.height == 1 else f"all {part.height} units left out"
        return base | {"note": "; ".join([f"{what}: {why}", *notes])}
    a, f, best, edge = _best(log_grid)
    default = float(log_default.mean())
    limit = float(np.max(log_limit.mean(axis=0)))

    def gm(col: str) -> float:
        x = np.abs(usable[col].to_numpy())
        x = x[np.isfinite(x) & (x > 0)]
        return float(np.exp(np.log(x).mean())) if x.size else math.nan

    if n_excluded:
        notes = [*notes, f"{n_excluded} of {part.height} units left out (excluded_reason)"]
    if edge:
        notes = [*notes, _edge_note(a, f, best, limit)]
    return base | {
        "plateau_noise_std": gm("r") ** 0.5,
        "plateau_drift_std": gm("q") ** 0.5,
        "learning_slope": gm("slope"),
        "learning_duration": gm("duration"),
        "t_eval": gm("duration") / 2.0,
        "tracking_timescale": gm("tracking_timescale"),
        "best_ema_timescale": a,
        "best_slow_factor": f,
        "best_score": math.exp(best),
        "default_score": math.exp(default),
        "score_ratio": math.exp(best - default),
        "best_on_grid_edge": edge,
        "limit_score": math.exp(limit),
        "loo_ema_timescale": loo[0] if loo else None,
        "loo_slow_factor": loo[1] if loo else None,
        "loo_score": math.exp(loo[2]) if loo else None,
        "loo_ratio": math.exp(loo[2] - default) if loo else None,
        "note": "; ".join(notes),
    }


def lp_separation_table(local_level: pl.DataFrame) -> pl.DataFrame:
    """Best (ema_timescale, slow_timescale_factor) for LP's |F - S| separation per label
    and per task ("*"), pooled over seeds and per seed, with Metta's default pair's score
    and leave-one-seed-out choices (module doc). `local_level`: the
    `kalman.estimate_local_level` table (only unit == "completions" rows are used; epoch
    rows converted to completion units elsewhere may be passed with that unit). Units
    whose fits `kalman.recommend_timescales` would leave out are left out and counted per
    row (`n_excluded`, `excluded_reason`); a scope with none usable gets a row of nulls
    with the reason in `note`. Scores are model-based (`score_method`); scores of task
    rows are geometric means of d' over labels. Columns: `schema.LP_TIMESCALES`."""
    units = _inputs(local_level).with_row_index("_i")
    usable_mask = (units["reason"] == "").to_numpy()
    # log d' arrays for every unit (NaN-free only on usable units; others never indexed)
    safe = units.with_columns(
        pl.when(pl.col("reason") == "").then(pl.col(c)).otherwise(1.0).alias(c)
        for c in ("slope", "duration", "r", "q")
    )
    log_grid, log_default = _log_scores(safe)
    log_limit = _log_limit_scores(safe)
    seed_key = (
        units.select(
            pl.concat_str(
                [pl.col("seed").cast(pl.String), pl.col("run_id")], separator="|"
            ).fill_null("?")
        )
        .to_series()
        .to_numpy()
    )
    rows: list[dict] = []
    for (task,), t_part in units.group_by("task", maintain_order=True):
        scopes = [
            (lab, t_part.filter(pl.col("label") == lab))
            for lab in sorted(t_part["label"].unique().to_list())
        ]
        scopes.append(("*", t_part))
        for label, part in scopes:
            idx = part["_i"].to_numpy()
            ok = idx[usable_mask[idx]]
            rows.append(
                _row(
                    str(task),
                    label,
                    None,
                    None,
                    part,
                    log_grid[ok],
                    log_default[ok],
                    log_limit[ok],
                    None,
                    [],
                )
            )
            keys = seed_key[idx]
            for key in np.unique(keys):  # a handful of seeds
                mine = ok[seed_key[ok] == key]
                others = ok[seed_key[ok] != key]
                loo = None
                notes: list[str] = []
                if mine.size and others.size:
                    la, lf, _, _ = _best(log_grid[others])
                    i = int(np.argmin(np.abs(EMA_GRID - la)))
                    k = int(np.argmin(np.abs(SLOW_FACTOR_GRID - lf)))
                    loo = (la, lf, float(log_grid[mine, i, k].mean()))
                elif mine.size:
                    notes.append("one usable seed: no leave-one-out choice")
                seed_part = part.filter(pl.Series(keys == key))
                rows.append(
                    _row(
                        str(task),
                        label,
                        None if seed_part["seed"][0] is None else int(seed_part["seed"][0]),
                        str(seed_part["run_id"][0]),
                        seed_part,
                        log_grid[mine],
                        log_default[mine],
                        log_limit[mine],
                        loo,
                        notes,
                    )
                )
    if not rows:
        return pl.DataFrame(schema=LP_TIMESCALES)
    out = pl.DataFrame(rows, schema_overrides=dict(LP_TIMESCALES), infer_schema_length=None)
    missing = [c for c in LP_TIMESCALES.names() if c not in out.columns]
    out = out.with_columns(pl.lit(None).alias(c) for c in missing)
    return conform(out, LP_TIMESCALES, "lp_timescales")
