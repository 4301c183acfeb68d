"""EMA timescales from a local-level (random walk + noise) model of each reward series.

Model: y_t = mu_t + eps_t, mu_t = mu_{t-1} + eta_t, with Var(eta) = q (drift per sample)
and Var(eps) = r (observation noise). The steady-state Kalman filter for it is an EMA,
m_t = m_{t-1} + K (y_t - m_{t-1}), with the gain

    K = (-s + sqrt(s^2 + 4 s)) / 2,   s = q / r,

the fixed point of the Riccati recursion P <- (P + q) - (P + q)^2 / (P + q + r),
K = (P + q) / (P + q + r). K is the optimal EMA weight and 1/K its timescale in samples.

Estimation per series (`estimate_local_level`): the local-level model is ARIMA(0,1,1),
whose one-step predictor is that EMA, so K is estimated by least squares: the K
minimising the sum of squared one-step prediction errors e_t = y_t - m_{t-1}, where
m is the adjusted EMA (a running mean at first, like the Kalman filter from a diffuse
start; starting the EMA at y_0 instead biases K upwards on short or quiet series),
searched on a log grid (all series at once: two IIR passes per grid value) and refined
by a parabola in log K. With F = mean(e^2) the steady-state innovation
variance, r = F (1 - K) and q = K^2 F. This is efficient where the plain method of
moments is not: with Var(d) = q + 2r and Cov(d_t, d_{t-1}) = -r for d = first
differences, q = Var(d) - 2r is the difference of two large, noisy numbers when q << r,
the usual case for reward streams (both moments are still reported).

Boundaries: a minimum at the smallest grid gain means no detectable drift (q ~ 0,
K -> 0): the timescale is capped at the series length. A minimum at the largest means no
detectable noise (r ~ 0, K -> 1, timescale 1 sample). Constant series have q = r = 0
and no gain (NaN).

LP's `ema_timescale` (Metta main default 0.001) is an EMA *weight* applied once per
completion of one task: its timescale is 1/0.001 = 1000 completions of that task.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from rts_dagster.analysis.metrics import (
    MetricsConfig,
    first_differences,
    iir_with_resets,
    prepare_series,
    segment_sums,
)
from rts_dagster.schema import LOCAL_LEVEL, TIMESCALE_RECOMMENDATIONS, conform

METTA_MAIN_EMA_TIMESCALE = 0.001  # LP `ema_timescale` default on Metta main (a weight)
GAIN_MIN = 1e-5  # smallest gain searched: timescale 100k samples
GAIN_MAX = 0.999
GRID_SIZE = 61  # log-spaced gains between GAIN_MIN and GAIN_MAX (~21% apart)
MIN_SAMPLES = 10


def steady_state_gain(q: np.ndarray | float, r: np.ndarray | float) -> np.ndarray:
    """Steady-state Kalman gain of the local-level model (the optimal EMA weight).

    K = (-s + sqrt(s^2 + 4 s)) / 2 with s = q / r, computed as 2 s / (s + sqrt(s^2 + 4s))
    (no cancellation for small s). q = 0 gives 0, r = 0 with q > 0 gives 1, q = r = 0 or
    a negative/NaN input gives NaN."""
    q = np.asarray(q, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = q / r
        gain = 2.0 * s / (s + np.sqrt(s * s + 4.0 * s))
    gain = np.where((r == 0.0) & (q > 0.0), 1.0, gain)
    gain = np.where(q == 0.0, np.where(r > 0.0, 0.0, np.nan), gain)
    return np.where((q < 0.0) | (r < 0.0), np.nan, gain)


def gain_to_variances(
    gain: np.ndarray, innovation_var: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(q, r) of the local-level model with steady-state gain K and one-step prediction
    error variance F: r = F (1 - K), q = K^2 F (so that q / r = K^2 / (1 - K))."""
    gain = np.asarray(gain, dtype=np.float64)
    innovation_var = np.asarray(innovation_var, dtype=np.float64)
    return gain * gain * innovation_var, (1.0 - gain) * innovation_var


def _prediction_sse(
    y: np.ndarray, starts: np.ndarray, lengths: np.ndarray, gains: np.ndarray
) -> np.ndarray:
    """Sum of squared one-step prediction errors per series (rows) and gain (columns).

    The predictor of y_t is the adjusted EMA of y_0..y_{t-1} (weights (1-K)^k,
    normalised by their sum): a running mean at first, an EMA of weight K later, which
    is what the Kalman filter does from a diffuse start. Numerator and weight sum are
    two IIR passes per gain over all series; y is taken relative to each series' first
    value to keep the sums small."""
    n = len(y)
    ends = starts + lengths
    yc = y - np.repeat(y[starts], lengths)
    ones = np.ones(n)
    first = np.zeros(n, dtype=bool)
    first[starts] = True
    sse = np.empty((len(starts), len(gains)))
    for j, gain in enumerate(gains):  # a loop over gains; each pass covers every sample
        w = 1.0 - gain
        mean = iir_with_resets(yc, starts, lengths, w)
        mean /= iir_with_resets(ones, starts, lengths, w)
        e = np.empty(n)
        e[0] = 0.0
        np.subtract(yc[1:], mean[:-1], out=e[1:])
        e[first] = 0.0
        np.square(e, out=e)
        sse[:, j] = segment_sums(e, starts, ends)
    return sse


def _parabola_min(log_k: np.ndarray, sse: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: (log gain, SSE at it, grid index of the minimum), refined by a parabola
    through the grid minimum and its two neighbours (kept on the grid at the ends)."""
    j = np.argmin(sse, axis=1)
    rows = np.arange(sse.shape[0])
    jc = np.clip(j, 1, len(log_k) - 2)
    y0, y1, y2 = sse[rows, jc - 1], sse[rows, jc], sse[rows, jc + 1]
    h = log_k[1] - log_k[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        curv = y0 - 2.0 * y1 + y2
        shift = np.where(curv > 0, 0.5 * h * (y0 - y2) / curv, 0.0)
    shift = np.clip(shift, -h, h)
    inner = (j > 0) & (j < len(log_k) - 1)
    best_log = np.where(inner, log_k[jc] + shift, log_k[j])
    with np.errstate(invalid="ignore"):
        best_sse = np.where(
            inner, y1 - 0.125 * (y0 - y2) ** 2 / np.where(curv > 0, curv, np.inf), sse[rows, j]
        )
    return best_log, best_sse, j


def estimate_local_level(
    streams: pl.DataFrame,
    config: MetricsConfig | None = None,
    grid_size: int = GRID_SIZE,
) -> pl.DataFrame:
    """q, r, gain and timescale of every series of `streams` (REWARD_STREAMS columns).

    Series are cleaned as in `metrics` (non-finite rewards dropped; stale epoch rows
    dropped when `config.destale`). Columns: `schema.LOCAL_LEVEL`."""
    prep = prepare_series(streams, config)
    lengths = prep.nonempty_lengths
    starts = prep.starts
    n_seg = len(lengths)
    d = first_differences(prep.y, starts)
    ends = starts + lengths

    # Method-of-moments diagnostics: Var(d) and the lag-1 autocovariance of d.
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.maximum(lengths - 1, 0)
        d_mean = segment_sums(d, starts + 1, ends) / m
        dc = d - np.repeat(np.where(m > 0, d_mean, 0.0), lengths)
        dc[starts] = 0.0
        var_diff = np.where(m >= 2, segment_sums(dc * dc, starts + 1, ends) / (m - 1), np.nan)
        lag = np.zeros_like(dc)
        lag[1:] = dc[1:] * dc[:-1]
        cov1 = np.where(m >= 3, segment_sums(lag, starts + 2, ends) / (m - 2), np.nan)

    log_k = np.linspace(math.log(GAIN_MIN), math.log(GAIN_MAX), grid_size)
    sse = (
        _prediction_sse(prep.y, starts, lengths, np.exp(log_k))
        if n_seg
        else np.zeros((0, grid_size))
    )
    best_log, best_sse, j = _parabola_min(log_k, sse)
    gain = np.exp(best_log)
    with np.errstate(divide="ignore", invalid="ignore"):
        innovation_var = np.maximum(best_sse, 0.0) / m
    q, r = gain_to_variances(gain, innovation_var)
    enough = lengths >= MIN_SAMPLES
    constant = sse[:, -1] == 0.0 if n_seg else np.zeros(0, dtype=bool)
    undefined = ~enough | constant
    gain = np.where(undefined, np.nan, gain)
    q = np.where(undefined, np.nan, q)
    r = np.where(undefined, np.nan, r)
    timescale = np.minimum(1.0 / gain, lengths)
    note = np.full(n_seg, "", dtype=object)
    note[j == 0] = (
        f"no detectable drift: gain <= {GAIN_MIN:g}, timescale capped at the series length"
    )
    note[j == grid_size - 1] = "no detectable observation noise: gain ~ 1"
    note[(1.0 / np.exp(best_log) > lengths) & (j > 0)] = (
        "timescale longer than the series: capped at its length"
    )
    note[constant] = "constant series: no drift and no noise, gain undefined"
    note[~enough] = f"fewer than {MIN_SAMPLES} samples"

    nonempty = prep.lengths > 0
    out = prep.keys.filter(pl.Series(nonempty)).with_columns(
        pl.Series("n_samples", lengths),
        pl.Series("var_diff", var_diff),
        pl.Series("cov_diff_lag1", cov1),
        pl.Series("q", q),
        pl.Series("r", r),
        pl.Series("signal_to_noise", np.where(undefined, np.nan, gain * gain / (1.0 - gain))),
        pl.Series("gain", gain),
        pl.Series("timescale", timescale),
        pl.Series("note", note.astype(str), dtype=pl.String),
    )
    return conform(out, LOCAL_LEVEL, "local_level")


# --- recommendations -----------------------------------------------------------------------


def _timescale(q: np.ndarray, r: np.ndarray, cap: float) -> np.ndarray:
    gain = steady_state_gain(q, r)
    with np.errstate(divide="ignore"):
        return np.minimum(1.0 / gain, cap)


def _lp_weight(config: Mapping[str, Any] | None) -> float:
    """LP's fast EMA weight from a config dict (Metta main's default when absent)."""
    value = (config or {}).get("ema_timescale", METTA_MAIN_EMA_TIMESCALE)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if value > 0 else math.nan


def recommend_timescales(
    per_series: pl.DataFrame,
    lp_config: Mapping[str, Any] | None = None,
    lp_configs_by_task: Mapping[str, Mapping[str, Any]] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> pl.DataFrame:
    """Recommended fast-EMA timescale per (task, label) and per task (labels pooled).

    `per_series`: the `estimate_local_level` table. Per group, q and r are averaged over
    its series (each seed, and for the pooled row each (seed, label), counts once) and
    turned into the gain K = steady_state_gain(q, r); the timescale 1/K is capped at the
    longest series of the group. The 95% CI resamples seeds with replacement (`n_boot`
    replicates, seeded). `lp_config` (or `lp_configs_by_task[task]`) supplies LP's
    `ema_timescale` weight, default Metta main's 0.001; `timescale_ratio` =
    recommended / LP timescale. Also compares each label's noise (sqrt r) with the
    quietest label of its task (`noise_ratio`, paired bootstrap over seeds), and each
    task's pooled noise with the quietest task. Columns: `schema.TIMESCALE_RECOMMENDATIONS`."""
    by_task = dict(lp_configs_by_task or {})
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    boot_noise: dict[tuple[str, str, str], np.ndarray] = {}
    usable = per_series.filter(pl.col("q").is_not_nan() & pl.col("r").is_not_nan())
    for (task, granularity), part in usable.group_by("task", "granularity", maintain_order=True):
        seeds = part.select("seed", "run_id").unique(maintain_order=True)
        labels = sorted(part["label"].unique().to_list())
        s_idx = {tuple(v): i for i, v in enumerate(seeds.iter_rows())}
        l_idx = {lab: i for i, lab in enumerate(labels)}
        q = np.full((len(s_idx), len(labels)), np.nan)
        r = np.full_like(q, np.nan)
        n = np.zeros_like(q)
        for row in part.iter_rows(named=True):  # one row per series: small
            i, k = s_idx[(row["seed"], row["run_id"])], l_idx[row["label"]]
            q[i, k], r[i, k], n[i, k] = row["q"], row["r"], row["n_samples"]
        idx = rng.integers(0, len(s_idx), size=(n_boot, len(s_idx)))
        lp_weight = _lp_weight(by_task.get(task, lp_config))
        groups = [(lab, [l_idx[lab]]) for lab in labels] + [("*", list(range(len(labels))))]
        for label, cols in groups:
            qg, rg = q[:, cols], r[:, cols]
            cap = float(np.nanmax(n[:, cols]))
            with warnings.catch_warnings():  # all-NaN replicates are meant to give NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                q_mean, r_mean = np.nanmean(qg), np.nanmean(rg)
                qb = np.nanmean(qg[idx], axis=(1, 2))  # n_boot x seeds x labels -> n_boot
                rb = np.nanmean(rg[idx], axis=(1, 2))
            ts = float(_timescale(q_mean, r_mean, cap))
            ts_b = _timescale(qb, rb, cap)
            lo, hi = _ci(ts_b)
            boot_noise[(task, label, granularity)] = np.sqrt(rb)
            n_series = int(np.isfinite(qg).sum())
            rows.append(
                {
                    "task": task,
                    "group": "pooled" if label == "*" else "label",
                    "label": label,
                    "granularity": granularity,
                    "n_series": n_series,
                    "n_seeds": int(np.isfinite(qg).any(axis=1).sum()),
                    "noise_std": math.sqrt(r_mean) if r_mean >= 0 else math.nan,
                    "drift_std": math.sqrt(q_mean) if q_mean >= 0 else math.nan,
                    "gain": float(steady_state_gain(q_mean, r_mean)),
                    "timescale": ts,
                    "timescale_ci_low": lo,
                    "timescale_ci_high": hi,
                    "lp_ema_timescale": lp_weight,
                    "lp_timescale": 1.0 / lp_weight,
                    "timescale_ratio": ts * lp_weight,
                    "note": _rec_note(n_series, len(s_idx), granularity),
                }
            )
    if not rows:
        return _empty_recommendations()
    return _add_references(pl.DataFrame(rows), boot_noise)


def _ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) < len(values) * 0.5 or len(finite) == 0:
        return math.nan, math.nan
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(finite, [a, 1.0 - a])
    return float(lo), float(hi)


def _rec_note(n_series: int, n_seeds: int, granularity: str) -> str:
    parts = []
    if n_seeds < 2:
        parts.append("1 seed: the CI is degenerate")
    elif n_seeds < 5:
        parts.append(f"{n_seeds} seeds: coarse bootstrap CI")
    if granularity == "epoch":
        parts.append("epoch means: timescale in epochs, not completions")
    else:
        parts.append("timescale in completions of the label; LP's EMA runs per task instance")
    if n_series == 0:
        parts.append("no series")
    return "; ".join(parts)


_REFERENCE_COLUMNS = (
    "reference_label",
    "noise_ratio",
    "noise_ratio_ci_low",
    "noise_ratio_ci_high",
    "timescale_vs_reference",
)


def _empty_recommendations() -> pl.DataFrame:
    return pl.DataFrame(schema=TIMESCALE_RECOMMENDATIONS)


def _add_references(
    table: pl.DataFrame, boot_noise: dict[tuple[str, str, str], np.ndarray]
) -> pl.DataFrame:
    """Noise of each label vs the quietest label of its task (paired: same resampled
    seeds), and of each task (pooled) vs the quietest task (independent resamples)."""
    refs: list[dict[str, Any]] = []
    for row in table.iter_rows(named=True):
        task, gran = row["task"], row["granularity"]
        if row["group"] == "label":
            peers = table.filter(
                (pl.col("task") == task)
                & (pl.col("granularity") == gran)
                & (pl.col("group") == "label")
            )
        else:
            peers = table.filter((pl.col("granularity") == gran) & (pl.col("group") == "pooled"))
        peers = peers.filter(pl.col("noise_std").is_finite())
        if peers.height < 2 or not math.isfinite(row["noise_std"]):
            refs.append(dict.fromkeys(_REFERENCE_COLUMNS))
            continue
        ref = peers.sort("noise_std").row(0, named=True)
        mine = boot_noise[(task, row["label"], gran)]
        theirs = boot_noise[(ref["task"], ref["label"], gran)]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_b = mine / theirs
            lo, hi = _ci(ratio_b)
            name = ref["label"] if row["group"] == "label" else ref["task"]
            refs.append(
                {
                    "reference_label": name,
                    "noise_ratio": row["noise_std"] / ref["noise_std"],
                    "noise_ratio_ci_low": lo,
                    "noise_ratio_ci_high": hi,
                    "timescale_vs_reference": row["timescale"] / ref["timescale"],
                }
            )
    extra = pl.DataFrame(refs, schema={c: TIMESCALE_RECOMMENDATIONS[c] for c in _REFERENCE_COLUMNS})
    out = pl.concat([table, extra], how="horizontal")
    return conform(out, TIMESCALE_RECOMMENDATIONS, "timescale_recommendations")


# --- plain words -----------------------------------------------------------------------------


def _fmt(x: float) -> str:
    """2 significant digits below 10 (keeping a trailing zero: 2.0), integers above."""
    if not math.isfinite(x):
        return "n/a"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:#.2g}" if x < 10 else f"{x:.0f}"


def _fmt_range(lo: float, hi: float) -> str:
    """`lo-hi`, with more digits when the default rounding would print the same number."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    if _fmt(lo) != _fmt(hi):
        return f"{_fmt(lo)}-{_fmt(hi)}"
    return f"{lo:.4g}-{hi:.4g}"


def _unit(granularity: str) -> str:
    return "completions" if granularity == "completion" else "epochs"


def describe_recommendations(table: pl.DataFrame) -> list[str]:
    """Plain-words findings generated from the numbers of `recommend_timescales`.

    Uses the completion stream when the table has it (what LP consumes), else epochs."""
    if table.height == 0:
        return []
    gran = "completion" if (table["granularity"] == "completion").any() else "epoch"
    part = table.filter(pl.col("granularity") == gran)
    unit = _unit(gran)
    out: list[str] = []
    for task in part["task"].unique(maintain_order=True).to_list():
        rows = part.filter(pl.col("task") == task)
        pooled = rows.filter(pl.col("group") == "pooled").row(0, named=True)
        ts, lp = pooled["timescale"], pooled["lp_timescale"]
        if not math.isfinite(ts):
            out.append(f"{task}: no EMA timescale could be estimated ({pooled['note']}).")
            continue
        ratio = pooled["timescale_ratio"]
        direction = "shorter" if ratio < 1 else "longer"
        factor = 1.0 / ratio if ratio < 1 else ratio
        out.append(
            f"{task}: the reward streams suggest a fast-EMA timescale of ~{_fmt(ts)} {unit} "
            f"(95% CI {_fmt_range(pooled['timescale_ci_low'], pooled['timescale_ci_high'])}, "
            f"{pooled['n_seeds']} seeds; noise sd {pooled['noise_std']:.3g}, drift sd "
            f"{pooled['drift_std']:.3g} per sample), {_fmt(factor)}x {direction} than LP's "
            f"{_fmt(lp)} (ema_timescale={pooled['lp_ema_timescale']:g}): set ema_timescale "
            f"~{1.0 / ts:.2g} (the slow EMA follows through slow_timescale_factor)."
        )
        labels = rows.filter((pl.col("group") == "label") & pl.col("noise_ratio").is_finite())
        if labels.height >= 2:
            top = labels.sort("noise_ratio", descending=True).row(0, named=True)
            if top["noise_ratio"] > 1.0:
                out.append(
                    _noise_sentence(
                        f"{task}/{top['label']}", f"{task}/{top['reference_label']}", top
                    )
                )
    pooled = part.filter((pl.col("group") == "pooled") & pl.col("noise_ratio").is_finite())
    if pooled.height >= 2:
        top = pooled.sort("noise_ratio", descending=True).row(0, named=True)
        if top["noise_ratio"] > 1.0:
            out.append(_noise_sentence(top["task"], top["reference_label"], top))
    return out


def _noise_sentence(name: str, reference: str, row: dict[str, Any]) -> str:
    ts_ratio = row["timescale_vs_reference"]
    if not math.isfinite(ts_ratio):
        advice = "its EMA timescale could not be compared"
    elif ts_ratio >= 1.25:
        advice = f"its EMA timescale should be ~{_fmt(ts_ratio)}x longer"
    elif ts_ratio <= 0.8:
        advice = (
            f"yet its EMA timescale should be ~{_fmt(1.0 / ts_ratio)}x shorter (it drifts faster)"
        )
    else:
        advice = "yet its EMA timescale should be about the same (it also drifts faster)"
    lo, hi = row["noise_ratio_ci_low"], row["noise_ratio_ci_high"]
    ci = f"95% CI {_fmt_range(lo, hi)}" if math.isfinite(lo) else "no CI"
    return f"{name} is {_fmt(row['noise_ratio'])}x as noisy as {reference} ({ci}): {advice}."
