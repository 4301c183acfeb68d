"""The earlier per-group implementation of `recommend_timescales` (with `_add_references`)
and `describe_recommendations`, kept as an independent scalar reference: a Python loop per
(task, granularity, unit, regime) group and per row. The vectorised functions in
`rts_dagster.analysis.kalman` must give the same table (to 1e-12 relative, NaN and null in
the same places, strings equal) and the same sentences on synthetic tables that cover both
reference branches, both granularities and every exclusion."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import polars as pl
import pytest
from scipy import stats

from rts_dagster.analysis import kalman
from rts_dagster.analysis.intervals import LEVEL, Interval, log_t_bounds, log_t_interval
from rts_dagster.analysis.kalman import (
    CI_METHOD_LOG_T,
    CI_METHOD_TYPICAL,
    CI_METHOD_WELCH,
    CI_METHOD_WELCH_TYPICAL,
    EPOCH_CAVEAT,
    FIT_OK_P,
    LP_NOT_COMPARABLE,
    LP_PER_INSTANCE,
    MAX_TASKS_VS_QUIETEST,
    MIN_FIT_SAMPLES,
    REGIME_LEARNING,
    REGIME_PLATEAU,
    REGIME_WHOLE,
    UNIT_COMPLETIONS,
    UNIT_EPOCHS,
    _exp,
    _geomean,
    _lp_weight,
    _noise_sentence,
    _regime_sentence,
    welch_log_ratio_interval,
)
from rts_dagster.schema import GRANULARITY_COMPLETION, TIMESCALE_RECOMMENDATIONS, conform
from rts_dagster_tests.synthetic import local_level_table

# --- the reference (copied unchanged but for names and docstrings) -------------------------


def _ref_exclusions(part: pl.DataFrame) -> tuple[int, str]:
    """How many series rows of a group are left out of pooling, and why (counted)."""
    n = part["n_samples"].to_numpy()
    gain = part["gain"].to_numpy()
    bound = part["at_bound"].to_numpy()
    absent = n == 0
    short = (n > 0) & (n < MIN_FIT_SAMPLES)
    undefined = ~absent & ~short & ~np.isfinite(gain)
    flagged = np.isfinite(gain) & bound
    counts = [
        (int(flagged.sum()), "gain at a grid bound or 1/K longer than the regime"),
        (int(short.sum()), f"shorter than {MIN_FIT_SAMPLES} samples"),
        (int(absent.sum()), "regime absent"),
        (int(undefined.sum()), "constant (no gain)"),
    ]
    total = sum(k for k, _ in counts)
    return total, ", ".join(f"{k} {why}" for k, why in counts if k)


def _reference_recommend_timescales(
    per_series: pl.DataFrame,
    lp_config: Mapping[str, Any] | None = None,
    lp_configs_by_task: Mapping[str, Mapping[str, Any]] | None = None,
) -> pl.DataFrame:
    """`kalman.recommend_timescales` as it was: one loop per (task, granularity, unit, regime)."""
    by_task = dict(lp_configs_by_task or {})
    if per_series.height == 0:
        return pl.DataFrame(schema=TIMESCALE_RECOMMENDATIONS)
    df = per_series.with_columns(
        (
            pl.col("gain").is_finite()
            & pl.col("r").is_finite()
            & pl.col("q").is_finite()
            & ~pl.col("at_bound").fill_null(True)
        ).alias("_usable"),
        pl.concat_str([pl.col("seed").cast(pl.String), pl.col("run_id")], separator="|")
        .fill_null("?")
        .alias("_unit_seed"),
    )
    with_completions = (
        df.filter(pl.col("granularity") == GRANULARITY_COMPLETION)
        .select(pl.concat_str([pl.col("task"), pl.col("_unit_seed")], separator="|"))
        .to_series()
        .unique()
        .to_list()
    )
    df = df.with_columns(
        ~pl.concat_str([pl.col("task"), pl.col("_unit_seed")], separator="|")
        .is_in(with_completions)
        .alias("_epoch_only")
    )
    rows: list[dict[str, Any]] = []
    seed_noise: dict[tuple[str, str, str, str, str], dict[str, float]] = {}
    group_keys = ("task", "granularity", "unit", "regime")
    # seeds whose run has no completion stream, per (group, label) and per group: counted
    # once here rather than filtered row by row
    epoch_rows = df.filter(pl.col("_epoch_only"))
    seeds_of = pl.col("_unit_seed").n_unique()
    epoch_only_of: dict[tuple, int] = {
        (*k, "*"): n for *k, n in epoch_rows.group_by(group_keys).agg(seeds_of).iter_rows()
    }
    epoch_only_of |= {
        tuple(k): n for *k, n in epoch_rows.group_by(*group_keys, "label").agg(seeds_of).iter_rows()
    }
    for key, part in df.group_by(group_keys, maintain_order=True):
        task, granularity, unit, regime = (str(v) for v in key)
        lp_weight = _lp_weight(by_task.get(task, lp_config))
        comparable = unit == UNIT_COMPLETIONS
        seeds = sorted(part["_unit_seed"].unique().to_list())
        labels = sorted(part["label"].unique().to_list())
        s_idx = {s: i for i, s in enumerate(seeds)}
        l_idx = {lab: i for i, lab in enumerate(labels)}
        ts = np.full((len(seeds), len(labels)), np.nan)
        noise = np.full_like(ts, np.nan)
        drift = np.full_like(ts, np.nan)
        not_ok = np.zeros_like(ts, dtype=bool)
        use = part.filter(pl.col("_usable"))
        i = np.asarray([s_idx[s] for s in use["_unit_seed"].to_list()], dtype=np.int64)
        k = np.asarray([l_idx[lab] for lab in use["label"].to_list()], dtype=np.int64)
        ts[i, k] = 1.0 / use["gain"].to_numpy()
        noise[i, k] = np.sqrt(use["r"].to_numpy())
        drift[i, k] = np.sqrt(use["q"].to_numpy())
        not_ok[i, k] = (use["ljung_box_p"].fill_null(math.nan) < FIT_OK_P).to_numpy()
        with warnings.catch_warnings():  # all-NaN seeds are meant to give NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            pooled_seed = {
                "ts": np.exp(np.nanmean(np.log(ts), axis=1)),
                "noise": np.exp(np.nanmean(np.log(noise), axis=1)),
                "drift": np.exp(np.nanmean(np.log(drift), axis=1)),
            }
        by_label = part.partition_by("label", as_dict=True, maintain_order=True)
        groups = [(lab, by_label[(lab,)], l_idx[lab]) for lab in labels]
        groups.append(("*", part, -1))
        # every label's interval (and the pooled one, last) in one vectorised call: the
        # same numbers as `log_t_interval` on each column
        geo, low, high, count = log_t_bounds(np.column_stack([ts, pooled_seed["ts"]]).T)
        for label, members, col in groups:
            if col >= 0:
                n_seed, d_seed = noise[:, col], drift[:, col]
                n_bad = int(not_ok[:, col].sum())
            else:
                n_seed, d_seed = pooled_seed["noise"], pooled_seed["drift"]
                n_bad = int(not_ok.sum())
            c = col if col >= 0 else len(labels)
            interval = Interval(
                float(geo[c]), float(low[c]), float(high[c]), CI_METHOD_LOG_T, int(count[c]), LEVEL
            )
            n_excl, why = _ref_exclusions(members)
            epoch_only = epoch_only_of.get((task, granularity, unit, regime, label), 0)
            seed_noise[(task, granularity, unit, regime, label)] = dict(
                zip(seeds, n_seed, strict=True)
            )
            estimate = interval.estimate
            rows.append(
                {
                    "task": task,
                    "group": "pooled" if label == "*" else "label",
                    "label": label,
                    "granularity": granularity,
                    "regime": regime,
                    "unit": unit,
                    "n_series": members.height,
                    "n_seeds": interval.n,
                    "n_excluded": n_excl,
                    "excluded_reason": why,
                    "n_fit_not_ok": n_bad,
                    "n_seeds_epoch_only": epoch_only,
                    "noise_std": _geomean(n_seed),
                    "drift_std": _geomean(d_seed),
                    "gain": 1.0 / estimate if estimate > 0 else math.nan,
                    "timescale": estimate,
                    "timescale_ci_low": interval.low,
                    "timescale_ci_high": interval.high,
                    "ci_method": interval.method,
                    "ci_n": interval.n,
                    "ci_level": interval.level,
                    "lp_ema_timescale": lp_weight if comparable else None,
                    "lp_timescale": 1.0 / lp_weight if comparable else None,
                    "timescale_ratio": None,
                    "lp_comparison": LP_PER_INSTANCE if comparable else LP_NOT_COMPARABLE,
                    "note": _ref_rec_note(interval.n, n_excl, n_bad, comparable),
                }
            )
    table = pl.DataFrame(rows, infer_schema_length=None)
    return _ref_add_references(table, seed_noise)


def _ref_rec_note(n_seeds: int, n_excluded: int, n_not_ok: int, completions: bool = True) -> str:
    parts = [] if completions else [EPOCH_CAVEAT]
    if n_seeds == 0:
        parts.append("no usable fit")
    elif n_seeds < 2:
        parts.append("1 seed: no interval")
    if n_excluded:
        parts.append(f"{n_excluded} fit(s) left out (excluded_reason)")
    if n_not_ok:
        parts.append(f"{n_not_ok} fit(s) with Ljung-Box p < {FIT_OK_P:g} kept")
    return "; ".join(parts)


_REFERENCE_COLUMNS = (
    "reference_label",
    "noise_ratio",
    "noise_ratio_ci_low",
    "noise_ratio_ci_high",
    "noise_ratio_ci_method",
    "noise_ratio_n",
    "timescale_vs_reference",
)


def _ref_finite_noise(row: dict[str, Any]) -> bool:
    value = row["noise_std"]
    return value is not None and math.isfinite(value)


def _ref_add_references(
    table: pl.DataFrame, seed_noise: dict[tuple[str, str, str, str, str], dict[str, float]]
) -> pl.DataFrame:
    """`kalman._add_references` as it was: loops over rows, per-seed dicts."""
    rows = list(table.iter_rows(named=True))
    # peers of each row, gathered once (table order kept): the labels of its task, or
    # the tasks of its (granularity, unit, regime), with a finite noise
    label_peers: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    task_peers: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if not _ref_finite_noise(row):
            continue
        where = (row["granularity"], row["unit"], row["regime"])
        if row["group"] == "label":
            label_peers.setdefault((row["task"], *where), []).append(row)
        else:
            task_peers.setdefault(where, []).append(row)
    task_refs = {
        where: _ref_task_references(peers, seed_noise) for where, peers in task_peers.items()
    }
    refs: list[dict[str, Any]] = []
    for row in rows:
        task, gran, unit, regime = row["task"], row["granularity"], row["unit"], row["regime"]
        if row["group"] != "label":
            ref = task_refs.get((gran, unit, regime), {}).get(task)
            refs.append(
                ref if ref and _ref_finite_noise(row) else dict.fromkeys(_REFERENCE_COLUMNS)
            )
            continue
        peers = label_peers.get((task, gran, unit, regime), [])
        if len(peers) < 2 or not _ref_finite_noise(row):
            refs.append(dict.fromkeys(_REFERENCE_COLUMNS))
            continue
        mine = seed_noise[(task, gran, unit, regime, row["label"])]
        per_seed: dict[str, list[float]] = {}
        for peer in peers:
            for seed, value in seed_noise[(task, gran, unit, regime, peer["label"])].items():
                if value > 0 and math.isfinite(value):
                    per_seed.setdefault(seed, []).append(math.log(value))
        common = [s for s in sorted(mine) if s in per_seed and len(per_seed[s]) >= 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.asarray([mine[s] / math.exp(float(np.mean(per_seed[s]))) for s in common])
        interval = log_t_interval(ratios, method=CI_METHOD_TYPICAL)
        typical_ts = math.exp(
            float(np.log(np.asarray([p["timescale"] for p in peers], dtype=np.float64)).mean())
        )
        refs.append(
            _ref_columns(
                f"the typical label of the task (geometric mean of {len(peers)} labels)",
                interval,
                row["timescale"] / typical_ts if typical_ts else math.nan,
            )
        )
    extra = pl.DataFrame(refs, schema={c: TIMESCALE_RECOMMENDATIONS[c] for c in _REFERENCE_COLUMNS})
    out = pl.concat([table.drop(_REFERENCE_COLUMNS, strict=False), extra], how="horizontal")
    return conform(out, TIMESCALE_RECOMMENDATIONS, "timescale_recommendations")


def _ref_columns(name: str, interval: Interval, ts_ratio: float) -> dict[str, Any]:
    return {
        "reference_label": name,
        "noise_ratio": interval.estimate,
        "noise_ratio_ci_low": interval.low,
        "noise_ratio_ci_high": interval.high,
        "noise_ratio_ci_method": interval.method,
        "noise_ratio_n": interval.n,
        "timescale_vs_reference": ts_ratio,
    }


def _ref_task_references(
    peers: list[dict[str, Any]],
    seed_noise: dict[tuple[str, str, str, str, str], dict[str, float]],
) -> dict[str, dict[str, Any]]:
    """Reference columns of each pooled row of one (granularity, unit, regime), by task:
    `peers` are its pooled rows with a finite noise (`_add_references`)."""
    if len(peers) < 2:
        return {}

    def noise_of(row: dict[str, Any]) -> dict[str, float]:
        return seed_noise[(row["task"], row["granularity"], row["unit"], row["regime"], "*")]

    out: dict[str, dict[str, Any]] = {}
    if len(peers) > MAX_TASKS_VS_QUIETEST:
        # per task: its geometric mean over seeds (noise_std) and its timescale
        log_noise = np.log(np.asarray([p["noise_std"] for p in peers], dtype=np.float64))
        timescales = np.asarray([p["timescale"] for p in peers], dtype=np.float64)
        name = f"the typical task (geometric mean of {len(peers) - 1} other tasks)"
        for i, row in enumerate(peers):
            others = np.exp(np.delete(log_noise, i))
            interval = replace(
                welch_log_ratio_interval(list(noise_of(row).values()), others, hsu_df=True),
                method=CI_METHOD_WELCH_TYPICAL,
            )
            typical_ts = _geomean(np.delete(timescales, i))
            with np.errstate(divide="ignore", invalid="ignore"):
                ts_ratio = row["timescale"] / typical_ts if typical_ts else math.nan
            out[row["task"]] = _ref_columns(name, interval, ts_ratio)
        return out
    ref = min(peers, key=lambda p: (p["noise_std"], p["task"], p["label"]))
    theirs = noise_of(ref)
    pairs = len(peers) * (len(peers) - 1) // 2
    for row in peers:
        if row["task"] == ref["task"]:  # the reference itself
            out[row["task"]] = dict.fromkeys(_REFERENCE_COLUMNS) | {
                "reference_label": ref["task"],
                "noise_ratio": 1.0,
                "noise_ratio_ci_method": "reference",
                "timescale_vs_reference": 1.0,
            }
            continue
        interval = replace(
            welch_log_ratio_interval(
                list(noise_of(row).values()),
                list(theirs.values()),
                level=1.0 - (1.0 - LEVEL) / pairs,
            ),
            method=f"{CI_METHOD_WELCH}, Bonferroni over {pairs} task pairs",
            level=LEVEL,  # all pairs hold together at LEVEL
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            ts_ratio = row["timescale"] / ref["timescale"] if ref["timescale"] else math.nan
        out[row["task"]] = _ref_columns(ref["task"], interval, ts_ratio)
    return out


def _ref_adjusted_for_picking(
    row: dict[str, Any], k: int, what: str = "labels"
) -> tuple[float, float, str]:
    """The row's noise-ratio interval widened to Bonferroni over `k` (the sentence names the
    noisiest of k labels or tasks: a picked one), from its own t interval on logs on n - 1
    df (the paired interval's df, and the typical-task Welch interval's: `hsu_df`)."""
    low, high, n = row["noise_ratio_ci_low"], row["noise_ratio_ci_high"], row["noise_ratio_n"]
    if low is None or high is None or not n or n < 2 or not (low > 0 and high > 0):
        return math.nan, math.nan, row["noise_ratio_ci_method"] or ""
    centre, half = (math.log(high) + math.log(low)) / 2, (math.log(high) - math.log(low)) / 2
    widen = stats.t.ppf(1 - (1 - LEVEL) / (2 * k), n - 1) / stats.t.ppf(1 - (1 - LEVEL) / 2, n - 1)
    return (
        _exp(centre - half * widen),
        _exp(centre + half * widen),
        f"{row['noise_ratio_ci_method']}, Bonferroni over {k} {what}",
    )


def _ref_described_groups(rows: pl.DataFrame) -> list[tuple[str, str]]:
    """(granularity, unit) pairs of one task's rows to describe: completion-stream rows,
    and epoch-stream rows when the task has no completion rows or some of its epoch seeds
    come from runs without a completion stream (`n_seeds_epoch_only`)."""
    pairs = rows.select("granularity", "unit").unique(maintain_order=True).rows()
    has_completion = any(g == GRANULARITY_COMPLETION for g, _ in pairs)
    out = []
    for granularity, unit in pairs:
        part = rows.filter((pl.col("granularity") == granularity) & (pl.col("unit") == unit))
        epoch_only = (
            int(part["n_seeds_epoch_only"].fill_null(0).max() or 0)
            if "n_seeds_epoch_only" in part.columns
            else 0
        )
        if granularity == GRANULARITY_COMPLETION or not has_completion or epoch_only > 0:
            out.append((granularity, unit))
    order = {UNIT_COMPLETIONS: 0, UNIT_EPOCHS: 1}
    return sorted(out, key=lambda gu: (gu[0] != GRANULARITY_COMPLETION, order.get(gu[1], 2)))


def _reference_describe_recommendations(table: pl.DataFrame) -> list[str]:
    """`kalman.describe_recommendations` as it was: filters per task and group."""
    if table.height == 0:
        return []
    out: list[str] = []
    for task in table["task"].unique(maintain_order=True).to_list():
        task_rows = table.filter(pl.col("task") == task)
        for granularity, unit in _ref_described_groups(task_rows):
            rows = task_rows.filter(
                (pl.col("granularity") == granularity) & (pl.col("unit") == unit)
            )
            for regime in (REGIME_WHOLE, REGIME_LEARNING, REGIME_PLATEAU):
                pooled = rows.filter((pl.col("group") == "pooled") & (pl.col("regime") == regime))
                if pooled.height:
                    out.append(_regime_sentence(task, pooled.row(0, named=True)))
            labels = rows.filter(
                (pl.col("group") == "label")
                & (pl.col("regime") == REGIME_WHOLE)
                & pl.col("noise_ratio").is_finite()
            )
            if labels.height >= 2:
                top = labels.sort("noise_ratio", descending=True).row(0, named=True)
                if top["noise_ratio"] > 1.0:
                    low, high, method = _ref_adjusted_for_picking(top, labels.height)
                    picked = top | {
                        "noise_ratio_ci_low": low,
                        "noise_ratio_ci_high": high,
                        "noise_ratio_ci_method": method,
                    }
                    out.append(
                        _noise_sentence(
                            f"{task}/{top['label']}",
                            top["reference_label"],
                            picked,
                        )
                    )
    pooled = table.filter(
        (pl.col("group") == "pooled")
        & (pl.col("regime") == REGIME_WHOLE)
        & pl.col("noise_ratio").is_finite()
    )
    pairs = pooled.select("granularity", "unit").unique().rows()
    for granularity, unit in sorted(pairs, key=lambda gu: (gu[0] != GRANULARITY_COMPLETION, gu)):
        part = pooled.filter((pl.col("granularity") == granularity) & (pl.col("unit") == unit))
        if part.height >= 2:
            top = part.sort("noise_ratio", descending=True).row(0, named=True)
            if top["noise_ratio"] > 1.0:
                if top["noise_ratio_ci_method"] == CI_METHOD_WELCH_TYPICAL:
                    # vs the typical task the interval holds for one task, not for the
                    # noisiest of them (vs the quietest task it already holds for any pair)
                    low, high, method = _ref_adjusted_for_picking(top, part.height, "tasks")
                    top = top | {
                        "noise_ratio_ci_low": low,
                        "noise_ratio_ci_high": high,
                        "noise_ratio_ci_method": method,
                    }
                out.append(_noise_sentence(top["task"], top["reference_label"], top))
    return out


# --- synthetic fit tables ---------------------------------------------------------------------

LABELS = ("a", "b", "c")


def fit_table(n_tasks: int, seed: int = 0) -> pl.DataFrame:
    """LOCAL_LEVEL rows of `n_tasks` tasks x 3 labels x (whole, learning, plateau), completion
    fits for seeds 0-2 and epoch fits for seeds 0-3 (seed 3: an epoch-only run), with every
    case the pooling treats apart: t00 has 1 seed, t01 has every fit at a bound (no finite
    noise), t02 has a label whose fits are all at a bound and its epoch rows in completion
    units (converted), t03 has labels a and b equally noisy in every seed (a tie for the
    noisiest label), label c is absent in seed 0 of every task, and fits are short, absent,
    constant, at a bound, without drift (gain 0), without noise (r = 0), with Ljung-Box
    p < 0.01, NaN or null, scattered over the rest; label a of t04 has no run id in seeds 1
    and 2 (one seed "?" with two fits per group)."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(n_tasks):
        task = f"t{t:02d}"
        task_sd = math.exp(rng.normal(0.0, 0.5))
        for granularity, seeds in (("completion", range(3)), ("epoch", range(4))):
            for s in seeds if t else [0]:
                for label in LABELS:
                    if label == "c" and s == 0:
                        continue
                    for regime in kalman.REGIMES:
                        sd = 0.1 * task_sd * math.exp(rng.normal(0.0, 0.3))
                        if t == 3 and label in ("a", "b"):
                            sd = 0.3 * (1.0 + s)
                        rows.append((task, s, label, granularity, regime, sd))
    task, s, label, granularity, regime, sd = (list(c) for c in zip(*rows, strict=True))
    n = len(task)
    r = np.asarray(sd) ** 2
    q = r * np.exp(rng.normal(math.log(1e-3), 1.0, n))
    table = local_level_table(
        task, np.asarray(s), [f"{a}.seed{b}" for a, b in zip(task, s, strict=True)], label, q, r
    ).with_columns(
        pl.Series("granularity", granularity),
        pl.Series("regime", regime),
        pl.Series("ljung_box_p", rng.uniform(0.0, 0.05, n)),
    )
    kind = rng.choice(
        ["ok", "short", "absent", "constant", "bound", "no_drift", "no_noise", "lb_nan"],
        size=n,
        p=[0.72, 0.05, 0.05, 0.04, 0.06, 0.03, 0.02, 0.03],
    )
    task_col, label_col = pl.col("task"), pl.col("label")
    kind_col = pl.Series("_kind", kind)
    table = table.with_columns(kind_col).with_columns(
        pl.when(task_col == "t01")
        .then(pl.lit("bound"))
        .when((task_col == "t02") & (label_col == "b"))
        .then(pl.lit("bound"))
        .when(task_col.is_in(["t00", "t03"]))
        .then(pl.lit("ok"))
        .otherwise(pl.col("_kind"))
        .alias("_kind")
    )
    kind_is = pl.col("_kind").is_in
    nan = pl.lit(math.nan)
    table = table.with_columns(
        pl.when(kind_is(["short"]))
        .then(50)
        .when(kind_is(["absent"]))
        .then(0)
        .otherwise(pl.col("n_samples"))
        .alias("n_samples"),
        *(
            pl.when(kind_is(["short", "absent", "constant"]))
            .then(nan)
            .otherwise(pl.col(c))
            .alias(c)
            for c in ("q", "r", "gain", "timescale", "ljung_box_p")
        ),
        pl.col("at_bound") | kind_is(["bound"]),
    ).with_columns(
        pl.when(kind_is(["no_drift"])).then(0.0).otherwise(pl.col("q")).alias("q"),
        pl.when(kind_is(["no_drift"])).then(0.0).otherwise(pl.col("gain")).alias("gain"),
        pl.when(kind_is(["no_noise"])).then(0.0).otherwise(pl.col("r")).alias("r"),
        pl.when(kind_is(["lb_nan"]))
        .then(pl.when(pl.col("seed") == 1).then(None).otherwise(nan))
        .otherwise(pl.col("ljung_box_p"))
        .alias("ljung_box_p"),
    )
    epoch = pl.col("granularity") == "epoch"
    unit = (
        pl.when(epoch & (task_col != "t02"))
        .then(pl.lit(UNIT_EPOCHS))
        .otherwise(pl.lit(UNIT_COMPLETIONS))
    )
    no_run = (task_col == "t04") & pl.col("seed").is_in([1, 2]) & (label_col == "a")
    return table.with_columns(
        unit.alias("unit"),
        pl.when(no_run).then(None).otherwise(pl.col("run_id")).alias("run_id"),
    ).drop("_kind")


LP_CONFIGS: dict[str, Any] = {
    "t00": {"ema_timescale": 0.01},
    "t01": {"ema_timescale": "not a number"},
    "t02": {"ema_timescale": -1.0},
    "t03": {},
    "t05": None,
}


def assert_same_table(got: pl.DataFrame, want: pl.DataFrame, rel: float = 1e-12) -> None:
    """Same columns, dtypes and rows in order; floats within `rel` relative with NaN, null
    and infinities in the same places; everything else equal."""
    assert got.schema == want.schema
    assert got.height == want.height
    for name, dtype in want.schema.items():
        a, b = got[name], want[name]
        if dtype != pl.Float64:
            assert a.to_list() == b.to_list(), name
            continue
        assert (a.is_null() == b.is_null()).all(), name
        x = a.drop_nulls().to_numpy()
        y = b.drop_nulls().to_numpy()
        assert (np.isnan(x) == np.isnan(y)).all(), name
        assert (np.isinf(x) == np.isinf(y)).all() and (x[np.isinf(x)] == y[np.isinf(y)]).all()
        fin = np.isfinite(y)
        assert (np.abs(x[fin] - y[fin]) <= rel * np.abs(y[fin])).all(), name


# --- the vectorised functions equal the reference ---------------------------------------------


@pytest.mark.parametrize("n_tasks", [4, MAX_TASKS_VS_QUIETEST + 1, 14])
def test_recommendations_equal_the_reference(n_tasks: int) -> None:
    """Both LP config arguments, and the rows in another order (groups appear in another
    order, labels and seeds do not arrive sorted)."""
    fits = fit_table(n_tasks, seed=n_tasks)
    shuffled = fits.sample(fraction=1.0, shuffle=True, seed=n_tasks)
    for per_series, lp_config, by_task in (
        (fits, None, None),
        (fits, {"ema_timescale": 0.005}, LP_CONFIGS),
        (shuffled, None, LP_CONFIGS),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = _reference_recommend_timescales(per_series, lp_config, by_task)
        got = kalman.recommend_timescales(per_series, lp_config, by_task)
        assert_same_table(got, want)
        assert kalman.describe_recommendations(got) == _reference_describe_recommendations(want)


def test_the_synthetic_table_reaches_every_branch() -> None:
    """The cases `fit_table` is meant to cover do reach the reference's branches."""
    per_series = fit_table(14, seed=14)
    assert (per_series["gain"] == 0.0).any() and (per_series["r"] == 0.0).any()
    assert per_series["ljung_box_p"].is_null().any() and per_series["run_id"].null_count() == 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        big = _reference_recommend_timescales(per_series, None, LP_CONFIGS)
        small = _reference_recommend_timescales(fit_table(4, seed=4), None, LP_CONFIGS)
    methods = set(big["noise_ratio_ci_method"].drop_nulls()) | set(
        small["noise_ratio_ci_method"].drop_nulls()
    )
    assert {CI_METHOD_TYPICAL, CI_METHOD_WELCH_TYPICAL, "reference"} <= methods
    assert any("Bonferroni" in m for m in methods)
    reasons = " ".join(big["excluded_reason"])
    for why in ("grid bound", "shorter than", "regime absent", "constant"):
        assert why in reasons
    assert (big["n_fit_not_ok"] > 0).any() and (big["n_seeds_epoch_only"] > 0).any()
    assert (big["n_seeds"] == 1).any() and big["noise_std"].is_nan().any()
    assert set(big["unit"]) == {UNIT_COMPLETIONS, UNIT_EPOCHS}
    assert big["lp_ema_timescale"].is_nan().any() and big["lp_ema_timescale"].is_null().any()
    # t03: labels a and b tie for the noisiest; the sentence names the first
    tied = big.filter(
        (pl.col("task") == "t03") & (pl.col("regime") == REGIME_WHOLE) & (pl.col("label") != "c")
    ).filter(pl.col("group") == "label")
    for part in tied.partition_by("granularity"):
        assert part.height == 2 and part["noise_ratio"].n_unique() == 1
    named = [x for x in _reference_describe_recommendations(big) if x.startswith("t03/")]
    assert len(named) == 2 and all(x.startswith("t03/a is") for x in named)


def test_describe_equals_the_reference_on_other_tables() -> None:
    """Sentences from tables the recommendation never writes: without
    `n_seeds_epoch_only`, with a task's rows out of order, and empty."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = _reference_recommend_timescales(fit_table(14, seed=3), None, LP_CONFIGS)
    shuffled = table.sample(fraction=1.0, shuffle=True, seed=5)
    for t in (table, shuffled, table.drop("n_seeds_epoch_only"), table.clear()):
        assert kalman.describe_recommendations(t) == _reference_describe_recommendations(t)


def test_empty_and_single_row_tables_equal_the_reference() -> None:
    per_series = fit_table(2)
    for part in (per_series.clear(), per_series.head(1), per_series.filter(pl.col("seed") == 1)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = _reference_recommend_timescales(part)
        assert_same_table(kalman.recommend_timescales(part), want)
