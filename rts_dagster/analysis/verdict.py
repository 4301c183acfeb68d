"""One verdict per task on the LP settings, from every piece of evidence at once.

The analysis has three sources of advice, and they can disagree:
- `noise`: the measured noise, drift and learning slopes per label, turned into the EMA
  pair that best separates a learning label from a plateaued one (`lp_timescales`, closed
  forms: model-based, not a measurement); each run's own pair is also replayed and run in
  the closed loop as `separation_matched`;
- `replay`: the recorded stream replayed through each LP configuration (`lp_sweep`): the
  selected winner paired by run against Metta's default with a Bonferroni interval over
  the K configurations compared, and the pre-declared `separation_matched` with a plain
  paired interval (it was not selected by the replay);
- `closed_loop`: the simulator trained under a candidate and under the default on fresh
  seeds (only for tasks the simulator models). Primary outcomes: final competence and time
  to competence; final reward is secondary (it depends on what the curriculum samples).
Plus `data`: what the data can tell at all (granularity, runs left out, the runs' own LP
settings, task instances per label).

`decide` turns them into one `Verdict`. Reading a candidate's closed loop (an outcome is
better / worse when its interval is wholly on that side of zero): `helpful` if a primary
outcome is better and none is worse; `mixed` if a primary outcome is better and another
outcome is worse; `harmful` if a primary outcome is worse and none is better;
`inconclusive` otherwise. Rules, in order:
1. no usable completion-granularity evidence -> keep the default, confidence "none": an
   epoch mean averages held values over environments, so no absolute `ema_timescale`
   follows from it; the way forward is recording the per-completion stream;
2. a replay winner (it passed every replay check) -> closed loop harmful: keep the default,
   "low", conflict; helpful: change, "high"; mixed: change, "low", conflict; none or
   inconclusive: change, "moderate" (to be confirmed in training);
3. no replay winner, the noise analysis proposes a pair -> its own replay check and closed
   loop decide: replay check significantly worse or closed loop harmful: keep the
   default, "low", conflict; replay check better and closed loop not harmful, or closed loop
   helpful: change, "moderate"; otherwise keep the default, "low" (the evidence cannot
   decide; conflict only if some source points the other way);
4. otherwise keep the default: "moderate" with 3 or more runs, else "low".
A conflict always means confidence "low". Seeds per arm of the settling experiment come
from a noncentral-t power calculation on the closed loop's primary outcome (final
competence), never on a d' or SNR ratio; simulator pairs share random draws, so real runs
need at least as many. Pure: structured inputs in, a structured decision out; sentences
live in `report/`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import polars as pl

from rts_dagster.analysis.distributions import nct_cdf, nct_sf, t_ppf
from rts_dagster.analysis.intervals import log_t_interval
from rts_dagster.analysis.kalman import METTA_MAIN_EMA_TIMESCALE
from rts_dagster.analysis.lp_sweep import METTA_DEFAULT, SEPARATION_MATCHED
from rts_dagster.schema import GRANULARITY_COMPLETION, GRANULARITY_EPOCH, VERDICTS, conform

Source = Literal["data", "noise", "replay", "closed_loop"]
Action = Literal["keep_default", "change"]
Confidence = Literal["high", "moderate", "low", "none"]

METTA_MAIN_EMA = METTA_MAIN_EMA_TIMESCALE  # what every comparison here is against
POWER = 0.8
ALPHA = 0.05
MAX_SEEDS = 50  # beyond this an experiment is not a practical way to settle it


@dataclass(frozen=True)
class Evidence:
    """One finding bearing on a task's LP settings.

    `supports`: True = favours `proposal` over Metta's default; False = favours the
    default (or finds the proposal harmful); None = cannot tell. `estimate`/`low`/`high`
    are the effect and its interval (`method`, `n`) in `unit`."""

    source: Source
    finding: str  # short plain words, built from the numbers
    supports: bool | None
    proposal: str | None = None  # the change in words: "ema_timescale=0.003, ..."
    config: str | None = None  # the sweep / closed-loop configuration that carries it
    metric: str | None = None
    estimate: float = math.nan
    low: float = math.nan
    high: float = math.nan
    method: str = ""
    n: int = 0
    unit: str = ""
    sd: float = math.nan  # sd of the paired differences, for the seeds an experiment needs
    better: int = 0  # +1: a positive estimate is good for the proposal, -1: negative, 0: n/a
    direction: int = 0  # proposal vs default ema_timescale: +1 faster, -1 slower, 0 n/a
    engine: str = "simulator"  # closed loop: what trained the runs (simulator | mettagrid)


@dataclass(frozen=True)
class Experiment:
    """Arms to run to settle a question, with the seeds per arm a paired comparison
    would need at 80% power (None when the effect size is unknown or too small)."""

    arms: tuple[str, ...]
    seeds_per_arm: int | None
    reason: str


@dataclass(frozen=True)
class Verdict:
    task: str
    action: Action
    proposal: str | None  # what to change to (action == "change"), or the open question
    confidence: Confidence
    conflict: bool
    rule: str  # which rule of the module docstring decided, e.g. "2: replay winner"
    evidence: tuple[Evidence, ...] = field(default_factory=tuple)
    settle_with: Experiment | None = None


def seeds_needed(
    effect: float, sd: float, power: float = POWER, alpha: float = ALPHA
) -> int | None:
    """Pairs needed by a two-sided paired t test to detect `effect` with this sd of the
    paired differences: the smallest n with noncentral-t power >= `power` (exact, not the
    normal approximation, which undercounts at small n). None if undefined or > MAX_SEEDS."""
    if not (math.isfinite(effect) and math.isfinite(sd)) or effect == 0 or sd <= 0:
        return None
    delta = abs(effect) / sd
    for n in range(2, MAX_SEEDS + 1):
        df = n - 1
        crit = t_ppf(1.0 - alpha / 2.0, df)
        nc = delta * math.sqrt(n)
        achieved = nct_sf(crit, df, nc) + nct_cdf(-crit, df, nc)
        if achieved >= power:
            return n
    return None


PRIMARY = ("competence_final", "time_to_competence")  # closed-loop outcomes that decide
SECONDARY = ("final_reward",)  # depends on what the curriculum sampled
SIZING_METRIC = "competence_final"  # the pre-declared outcome an experiment is sized on


def _bad(e: Evidence) -> bool:
    """An interval wholly on the bad side of zero."""
    if not (math.isfinite(e.low) and math.isfinite(e.high)) or e.better == 0:
        return False
    return e.high < 0 if e.better > 0 else e.low > 0


def _good(e: Evidence) -> bool:
    if not (math.isfinite(e.low) and math.isfinite(e.high)) or e.better == 0:
        return False
    return e.low > 0 if e.better > 0 else e.high < 0


def closed_loop_reading(rows: list[Evidence]) -> str | None:
    """harmful | helpful | mixed | inconclusive for one candidate's closed-loop rows, or
    None when it was not run (rules in the module docstring)."""
    if not rows:
        return None
    primary = [e for e in rows if e.metric in PRIMARY]
    good = any(_good(e) for e in primary)
    bad_primary = any(_bad(e) for e in primary)
    bad_any = bad_primary or any(_bad(e) for e in rows if e.metric in SECONDARY)
    if good:
        return "mixed" if bad_any else "helpful"
    return "harmful" if bad_primary else "inconclusive"


ENGINE_WORDS = {"simulator": "simulator", "mettagrid": "MettaGrid PPO"}


def closed_loop_name(rows: list[Evidence]) -> str:
    """ "closed loop (simulator)" or "closed loop (MettaGrid PPO)": what trained the runs."""
    engine = rows[0].engine if rows else "simulator"
    return f"closed loop ({ENGINE_WORDS.get(engine, engine)})"


def mixed_text(rows: list[Evidence]) -> str:
    """ "final competence better; time to competence, final reward worse"."""
    better = [e.metric.replace("_", " ") for e in rows if _good(e)]
    worse = [e.metric.replace("_", " ") for e in rows if _bad(e)]
    return f"{', '.join(better) or 'nothing'} better; {', '.join(worse) or 'nothing'} worse"


def _experiment(default: str, proposal: str, closed: list[Evidence], reason: str) -> Experiment:
    """The two arms, sized on the closed loop's final competence when it was run."""
    basis = next((e for e in closed if e.metric == SIZING_METRIC), None)
    seeds = seeds_needed(basis.estimate, basis.sd) if basis is not None else None
    return Experiment(arms=(default, proposal), seeds_per_arm=seeds, reason=reason)


def decide(
    task: str,
    evidence: list[Evidence],
    default: str = METTA_DEFAULT,
    n_runs: int = 0,
) -> Verdict:
    """The task's verdict from its evidence (rules in the module docstring)."""
    ev = tuple(evidence)
    data = [e for e in ev if e.source == "data"]
    replay = [e for e in ev if e.source == "replay" and e.supports and e.proposal]
    noise = [e for e in ev if e.source == "noise" and e.supports and e.proposal]
    closed = [e for e in ev if e.source == "closed_loop"]

    def verdict(action, proposal, confidence, conflict, rule, settle=None) -> Verdict:
        return Verdict(
            task, action, proposal, "low" if conflict else confidence, conflict, rule, ev, settle
        )

    if any(e.metric == "granularity" for e in data) and not (replay or noise):
        return verdict(
            "keep_default",
            None,
            "none",
            False,
            "1: epoch means only",
            Experiment(
                arms=(default,),
                seeds_per_arm=None,
                reason="record the per-completion stream (RewardStreamRecorder) in the next "
                "runs: it is what LP consumes and what an absolute ema_timescale needs",
            ),
        )

    if replay:
        best = replay[0]
        mine = [e for e in closed if e.config is not None and e.config == best.config]
        reading = closed_loop_reading(mine)
        opposite = any(
            e.direction and best.direction and e.direction != best.direction for e in noise
        )
        exp = _experiment(default, best.proposal, mine, "")
        if reading == "harmful":
            return verdict(
                "keep_default",
                best.proposal,
                "low",
                True,
                "2: replay winner harmful in the closed loop",
                Experiment(
                    exp.arms,
                    exp.seeds_per_arm,
                    f"the replay favours it; the {closed_loop_name(mine)} finds it harmful",
                ),
            )
        if reading == "helpful" and not opposite:
            return verdict("change", best.proposal, "high", False, "2: replay winner confirmed")
        return verdict(
            "change",
            best.proposal,
            "moderate",
            reading == "mixed" or opposite,
            "2: replay winner",
            Experiment(
                exp.arms,
                exp.seeds_per_arm,
                "replay is open-loop: confirm in training"
                + (f"; the closed loop is mixed ({mixed_text(mine)})" if reading == "mixed" else "")
                + ("; the noise analysis points the other way" if opposite else ""),
            ),
        )

    if noise:
        proposal = noise[0]
        key = proposal.config
        mine = [e for e in closed if e.config is not None and e.config == key]
        checks = [
            e for e in ev if e.source == "replay" and e.config == key and e.metric == "snr_check"
        ]
        replay_check = checks[0].supports if checks else None
        reading = closed_loop_reading(mine)
        exp = _experiment(default, proposal.proposal, mine, "")

        def settle(reason: str) -> Experiment:
            return Experiment(exp.arms, exp.seeds_per_arm, reason)

        if replay_check is False or reading == "harmful":
            against = "the replay" if replay_check is False else f"the {closed_loop_name(mine)}"
            return verdict(
                "keep_default",
                proposal.proposal,
                "low",
                True,
                "3: noise analysis' pair contradicted",
                settle(f"the noise analysis proposes it; {against} finds it worse"),
            )
        if (replay_check is True and reading != "mixed") or reading == "helpful":
            return verdict(
                "change",
                proposal.proposal,
                "moderate",
                False,
                "3: noise analysis' pair supported",
                settle(
                    "supported by the model and the "
                    + ("replay" if replay_check else closed_loop_name(mine))
                    + ": confirm in training"
                ),
            )
        return verdict(
            "keep_default",
            proposal.proposal,
            "low",
            reading == "mixed",
            "3: noise analysis not confirmed",
            settle(
                "the noise analysis proposes it; "
                + (
                    f"the {closed_loop_name(mine)} is mixed: {mixed_text(mine)}"
                    if reading == "mixed"
                    else "neither the replay nor the closed loop can tell it from the default"
                    if reading
                    else "the replay cannot tell it from the default and no closed loop ran"
                )
            ),
        )

    return verdict(
        "keep_default", None, "moderate" if n_runs >= 3 else "low", False, "4: no change supported"
    )


# --- evidence from the analysis tables -----------------------------------------------------------
_SETTING_NAMES = (
    "variant",
    "ema_timescale",
    "slow_timescale_factor",
    "z_score_amplification",
    "z_anneal_start",
    "z_anneal_end",
    "pool_cap",
    "sps_weight",
)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9)
    return a == b


def setting_change(row: dict, default: dict) -> str:
    """ "ema_timescale=0.003" (the settings of `row` that differ from `default`), or the
    configuration name when none differs."""
    parts = [
        f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}"
        for k in _SETTING_NAMES
        if k in row and row[k] is not None and not _same(row[k], default.get(k))
    ]
    return ", ".join(parts) or str(row.get("config"))


def _default_settings() -> dict:
    from rts_dagster.analysis.lp_replay import CurriculumConfig

    return CurriculumConfig(name=METTA_DEFAULT).settings()


def _ema_direction(ema: float | None, default_ema: float) -> int:
    if ema is None or not math.isfinite(ema) or math.isclose(ema, default_ema, rel_tol=1e-9):
        return 0
    return 1 if ema > default_ema else -1


def data_evidence(
    granularity_runs: list[dict],
    left_out: list[dict],
    runs_ema: float = METTA_MAIN_EMA,
    instances_per_label: float | None = None,
) -> list[Evidence]:
    """What the data can tell: which granularities feed the task, what was left out, the
    LP setting the runs trained with, and how many task instances share a label.
    `granularity_runs`: rows of `quality.granularity_runs` for the task; `left_out`: rows
    of `quality.left_out` (whole runs, label '*') for the task."""
    out = []
    grans = {r["granularity"]: r for r in granularity_runs}
    if GRANULARITY_COMPLETION not in grans:
        n = grans.get(GRANULARITY_EPOCH, {}).get("n_runs", 0)
        out.append(
            Evidence(
                "data",
                f"epoch means only ({n} runs, no per-completion stream): an epoch value "
                "averages held last values over environments, so no absolute ema_timescale "
                "follows from it",
                None,
                metric="granularity",
                n=n,
            )
        )
    else:
        out.append(
            Evidence(
                "data",
                f"per-completion stream from {grans[GRANULARITY_COMPLETION]['n_runs']} runs",
                None,
                metric="coverage",
                n=grans[GRANULARITY_COMPLETION]["n_runs"],
            )
        )
    if math.isfinite(runs_ema) and not math.isclose(runs_ema, METTA_MAIN_EMA, rel_tol=1e-9):
        out.append(
            Evidence(
                "data",
                f"these runs trained with ema_timescale={runs_ema:g}; every comparison here is "
                f"against Metta's default ({METTA_MAIN_EMA:g}), and main_ema_{runs_ema:g} is a "
                "replayed candidate when it is on the grid",
                None,
                metric="runs_config",
            )
        )
    if instances_per_label is not None and math.isfinite(instances_per_label):
        out.append(
            Evidence(
                "data",
                f"LP's EMAs run per task instance, ~{instances_per_label:.3g} active instances "
                "per label here: the replay and the simulator run LP per label, so an "
                "ema_timescale a found here is per label completion, ~"
                f"{instances_per_label:.3g} x a per instance completion",
                None,
                metric="units",
                estimate=instances_per_label,
            )
        )
    for row in left_out:
        out.append(
            Evidence(
                "data",
                f"left out: {row['run_id']} ({row['granularity']}): {row['reason']}",
                None,
                metric="left_out",
            )
        )
    return out


def _log_interval_evidence(
    source: Source,
    finding: str,
    supports: bool | None,
    ratio: float,
    low: float,
    high: float,
    **kw,
) -> Evidence:
    """An Evidence on a ratio, stored on the log scale (the report shows it as a ratio)."""

    def log(v: float | None) -> float:
        return math.log(v) if v is not None and math.isfinite(v) and v > 0 else math.nan

    return Evidence(
        source, finding, supports, estimate=log(ratio), low=log(low), high=log(high), **kw
    )


def replay_evidence(recommendation: dict | None, default_ema: float) -> list[Evidence]:
    """The LP replay's findings for the task (an `LP_RECOMMENDATIONS` row of completion
    granularity; epoch rows never carry a setting that transfers): the winner if one
    passed every check, else what the best-replaying candidate failed; and the default's
    own signal-to-noise ratio (below 1: it favours plateaued labels over improving ones)."""
    if recommendation is None:
        return []
    r = recommendation
    out = []
    if r.get("actionable"):
        n = int(r.get("n_pairs") or 0)
        low = r["snr_ratio_ci_low"]
        out.append(
            _log_interval_evidence(
                "replay",
                f"{r['config']} raises LP's signal-to-noise ratio vs the default, paired by run "
                "(interval adjusted for the configurations compared)",
                True,
                r["snr_ratio"],
                low,
                r["snr_ratio_ci_high"],
                proposal=setting_change(r, _default_settings()),
                config=r["config"],
                metric="snr_ratio",
                method=r.get("ci_method") or "",
                n=n,
                unit="log SNR ratio",
                sd=sd_from_interval(
                    math.log(max(low, 1e-300)),
                    math.log(r["snr_ratio_ci_high"]),
                    n,
                    int(r.get("n_compared") or 1),
                ),
                better=1,
                direction=_ema_direction(r.get("ema_timescale"), default_ema),
            )
        )
    else:
        best = r.get("replay_best")
        finding = (
            f"no configuration passed every check (K={r.get('n_compared') or 0} compared, "
            "intervals adjusted for that)"
        )
        reason = r.get("replay_best_reason") or ""
        if best and reason:
            finding += f"; the highest replayed ratio, {best}, failed: {reason}"
        out.append(
            _log_interval_evidence(
                "replay",
                finding,
                None,
                r.get("replay_best_snr_ratio") or math.nan,
                r.get("replay_best_ci_low") or math.nan,
                r.get("replay_best_ci_high") or math.nan,
                config=best,
                metric="snr_ratio",
                method=r.get("ci_method") or "t, Bonferroni",
                n=int(r.get("replay_best_n_pairs") or 0),
                unit="log SNR ratio",
            )
        )
    snr, lo, hi = r.get("snr_default"), r.get("signal_ci_low"), r.get("signal_ci_high")
    if r.get("config") == METTA_DEFAULT and snr is not None and math.isfinite(snr):
        side = (
            "below 1: LP at the default gives plateaued labels more probability than improving ones"
            if hi is not None and hi < 1
            else "above 1: the default favours improving labels"
            if lo is not None and lo > 1
            else "not distinguishable from 1"
        )
        out.append(
            _log_interval_evidence(
                "replay",
                f"Metta's default's own signal-to-noise ratio is {side}",
                None,
                snr,
                lo if lo is not None else math.nan,
                hi if hi is not None else math.nan,
                metric="default_snr",
                method=r.get("signal_ci_method") or "t on logs",
                n=int(r.get("signal_n") or 0),
                unit="log SNR",
            )
        )
    return out


def replay_check_evidence(row: dict | None) -> list[Evidence]:
    """The replay of the noise analysis' own pair (`separation_matched`, pre-declared, so a
    plain paired interval): an `LP_SWEEP_SUMMARY` row of metric lp_snr."""
    if row is None:
        return []
    low, high = row.get("diff_ci_low"), row.get("diff_ci_high")
    supports = None
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        supports = True if low > 0 else False if high < 0 else None
    return [
        Evidence(
            "replay",
            "the noise analysis' pair replayed on the recorded streams (each run its own "
            "pair), SNR vs the default, paired by run",
            supports,
            config=SEPARATION_MATCHED,
            metric="snr_check",
            estimate=row.get("diff_vs_default")
            if row.get("diff_vs_default") is not None
            else math.nan,
            low=low if low is not None else math.nan,
            high=high if high is not None else math.nan,
            method=row.get("diff_ci_method") or "paired t on logs",
            n=int(row.get("n_pairs") or 0),
            unit="log SNR ratio",
            better=1,
        )
    ]


def closed_loop_evidence(rows: list[dict]) -> list[Evidence]:
    """Closed-loop differences (candidate - default, paired by seed) of one task."""
    better = {"time_to_competence": -1, "final_reward": 1, "competence_final": 1}
    units = {"time_to_competence": "epochs", "final_reward": "reward", "competence_final": ""}
    out = []
    for r in rows:
        metric = r["metric"]
        good = better.get(metric, 0)
        low, high = r["diff_ci_low"], r["diff_ci_high"]
        defined = (
            low is not None and high is not None and math.isfinite(low) and math.isfinite(high)
        )
        e = Evidence(
            "closed_loop",
            f"{r['config']} vs default, {metric.replace('_', ' ')}"
            + (
                " (secondary: depends on what the curriculum samples)"
                if metric in SECONDARY
                else ""
            ),
            None,
            config=r["config"],
            metric=metric,
            estimate=r["diff"],
            low=low if defined else math.nan,
            high=high if defined else math.nan,
            method=r.get("ci_method") or "paired t",
            n=int(r.get("n_pairs") or r.get("n_seeds") or 0),
            unit=units.get(metric, ""),
            sd=sd_from_interval(
                low if defined else math.nan,
                high if defined else math.nan,
                int(r.get("n_pairs") or r.get("n_seeds") or 0),
            ),
            better=good,
            engine=r.get("engine") or "simulator",
        )
        out.append(replace(e, supports=True if _good(e) else False if _bad(e) else None))
    return out


def noise_evidence(
    pooled: dict | None,
    loo_ratios: list[float],
    default_ema: float,
    replayed: dict | None = None,
) -> list[Evidence]:
    """LP's separation objective (`lp_timescales`, closed forms at the measured inputs):
    the pair chosen on the other seeds vs Metta's default on each held-out seed (t on log
    ratios over seeds). `replayed`: the `separation_matched` sweep-summary row, whose
    settings (geometric means of the runs' own pairs) are what the replay and the closed
    loop ran; the proposal names those."""
    if pooled is None:
        return []
    iv = log_t_interval(loo_ratios)
    a, f = pooled.get("best_ema_timescale"), pooled.get("best_slow_factor")
    if a is None or not math.isfinite(a):
        return [
            Evidence(
                "noise",
                f"no separation-optimal EMA pair ({pooled.get('note') or 'too little data'})",
                None,
            )
        ]
    if replayed is not None:
        a, f = replayed["ema_timescale"], replayed["slow_timescale_factor"]
    proposal = f"ema_timescale={a:.3g}, slow_timescale_factor={f:.3g}"
    edge = " (the optimum sits on the grid's edge)" if pooled.get("best_on_grid_edge") else ""
    best, limit = pooled.get("best_score"), pooled.get("limit_score")
    if best and limit and math.isfinite(best) and math.isfinite(limit) and limit >= 0.98 * best:
        edge += "; d' is flat in slow_timescale_factor near 1, so that factor is weakly determined"
    supports = iv.defined and iv.low > 1.0
    return [
        _log_interval_evidence(
            "noise",
            f"model-based (closed forms at the measured noise, drift and slopes): the EMA pair "
            f"that best separates learning from plateaued labels is {proposal}{edge}; its d' "
            "on held-out seeds vs the default's",
            supports if iv.defined else None,
            iv.estimate,
            iv.low,
            iv.high,
            proposal=proposal,
            config=SEPARATION_MATCHED,
            metric="separation_ratio",
            method=iv.method,
            n=iv.n,
            unit="log d' ratio",
            sd=_log_sd(loo_ratios),
            better=1,
            direction=_ema_direction(a, default_ema),
        )
    ]


def sd_from_interval(low: float, high: float, n: int, n_compared: int = 1) -> float:
    """The sd of the differences behind a (Bonferroni over `n_compared`) 95% t interval of
    their mean: half-width * sqrt(n) / t quantile. NaN when undefined."""
    if n < 2 or not (math.isfinite(low) and math.isfinite(high)):
        return math.nan
    q = t_ppf(1.0 - ALPHA / (2.0 * max(n_compared, 1)), n - 1)
    return (high - low) / 2.0 * math.sqrt(n) / q


def _log_sd(values: list[float]) -> float:
    import numpy as np

    x = np.asarray([v for v in values if v is not None and v > 0 and math.isfinite(v)])
    return float(np.log(x).std(ddof=1)) if x.size >= 2 else math.nan


# --- all tasks, and the table form -------------------------------------------------------------
def _by_task(table: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Task -> its rows (non-empty groups only), in table order."""
    if table.height == 0:
        return {}
    return {
        key[0]: part
        for key, part in table.partition_by("task", as_dict=True, maintain_order=True).items()
    }


def decide_all(
    granularity_runs: pl.DataFrame,
    left_out: pl.DataFrame,
    lp_recommendations: pl.DataFrame,
    closed_loop: pl.DataFrame,
    lp_timescales: pl.DataFrame,
    runs_ema: dict[str, float] | None = None,
    sweep_summary: pl.DataFrame | None = None,
    instances_per_label: dict[str, float] | None = None,
) -> list[Verdict]:
    """One verdict per task that has runs. Inputs: `quality.granularity_runs` and
    `quality.left_out` (whole runs), LP_RECOMMENDATIONS, LP_CLOSED_LOOP_SUMMARY,
    LP_TIMESCALES and LP_SWEEP_SUMMARY tables (any may be empty). `runs_ema`: task -> the
    ema_timescale its runs trained with; `instances_per_label`: task -> active task
    instances per label (num_active_tasks / labels), for the unit of a proposed weight."""
    runs_ema = runs_ema or {}
    instances_per_label = instances_per_label or {}
    tasks = sorted(set(granularity_runs["task"].to_list()))
    # each table split by task once: a filter per task and table is quadratic in tasks
    runs_of = _by_task(granularity_runs)
    whole_of = _by_task(left_out.filter(pl.col("label") == "*"))
    completion = pl.col("granularity") == GRANULARITY_COMPLETION
    rec_of = _by_task(lp_recommendations.filter(completion))
    check_of = (
        _by_task(
            sweep_summary.filter(
                completion
                & (pl.col("config") == SEPARATION_MATCHED)
                & (pl.col("metric") == "lp_snr")
            )
        )
        if sweep_summary is not None and sweep_summary.height
        else None
    )
    star = lp_timescales.filter(pl.col("label") == "*")
    pooled_of = _by_task(star.filter(pl.col("scope") == "pooled"))
    seeds_of = _by_task(star.filter(pl.col("scope") == "seed"))
    closed_of = _by_task(closed_loop)
    out = []
    for task in tasks:
        runs = runs_of.get(task, granularity_runs.clear())
        whole = whole_of.get(task, left_out.clear())
        evidence = data_evidence(
            list(runs.iter_rows(named=True)),
            list(whole.iter_rows(named=True)),
            runs_ema.get(task, METTA_MAIN_EMA),
            instances_per_label.get(task),
        )
        rec = rec_of.get(task)
        evidence += replay_evidence(
            rec.row(0, named=True) if rec is not None else None, METTA_MAIN_EMA
        )
        replayed = None
        if check_of is not None:
            check = check_of.get(task)
            replayed = check.row(0, named=True) if check is not None else None
        pooled = pooled_of.get(task)
        seeds = seeds_of.get(task)
        evidence += noise_evidence(
            pooled.row(0, named=True) if pooled is not None else None,
            seeds["loo_ratio"].to_list() if seeds is not None else [],
            METTA_MAIN_EMA,
            replayed,
        )
        evidence += replay_check_evidence(replayed)
        closed = closed_of.get(task)
        evidence += closed_loop_evidence(
            list(closed.iter_rows(named=True)) if closed is not None else []
        )
        n_runs = int(runs["n_runs"].max() or 0) if runs.height else 0
        out.append(decide(task, evidence, n_runs=n_runs))
    return out


def verdicts_table(verdicts: list[Verdict]) -> pl.DataFrame:
    """VERDICTS: one row per task, the evidence as a list of structs."""
    rows = []
    for v in verdicts:
        exp = v.settle_with
        rows.append(
            {
                "task": v.task,
                "action": v.action,
                "proposal": v.proposal,
                "confidence": v.confidence,
                "conflict": v.conflict,
                "rule": v.rule,
                "settle_arms": list(exp.arms) if exp else [],
                "settle_seeds_per_arm": exp.seeds_per_arm if exp else None,
                "settle_reason": exp.reason if exp else None,
                "evidence": [asdict(e) for e in v.evidence],
            }
        )
    if not rows:
        return pl.DataFrame(schema=VERDICTS)
    return conform(pl.DataFrame(rows, schema=VERDICTS), VERDICTS, "verdicts")


def verdicts_from_table(table: pl.DataFrame) -> list[Verdict]:
    """The inverse of `verdicts_table` (what the report reads back)."""
    out = []
    for r in table.iter_rows(named=True):
        exp = None
        if r["settle_reason"] is not None:
            exp = Experiment(tuple(r["settle_arms"]), r["settle_seeds_per_arm"], r["settle_reason"])
        evidence = tuple(
            Evidence(**{k: (math.nan if v is None and k in _FLOATS else v) for k, v in e.items()})
            for e in r["evidence"]
        )
        out.append(
            Verdict(
                r["task"],
                r["action"],
                r["proposal"],
                r["confidence"],
                r["conflict"],
                r["rule"],
                evidence,
                exp,
            )
        )
    return out


_FLOATS = ("estimate", "low", "high", "sd")
