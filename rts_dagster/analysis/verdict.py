"""One verdict per task on the LP settings, from every piece of evidence at once.

The analysis has three sources of advice, and they can disagree:
- `noise`: the measured noise, drift and learning slopes per label, turned into the EMA
  pair that best separates a learning label from a plateaued one (`lp_timescales`);
  absolute only in completion units;
- `replay`: the recorded stream replayed through each LP configuration (`lp_sweep`), the
  winner paired by seed against Metta's default with a selection-adjusted interval;
- `closed_loop`: the simulator trained under a candidate and under the default on fresh
  seeds (only for tasks the simulator models).
Plus `data`: what the data can tell at all (epoch means only, runs left out).

`decide` turns them into one `Verdict`: keep the default, or change one setting, with a
confidence and, when the sources conflict or cannot decide, the experiment that would
settle it. Every section of the report describes evidence; only the verdict advises, so no
two sections can give opposite advice. Rules (in order):
1. no usable completion-granularity evidence -> keep the default, confidence "none": an
   epoch mean averages held values over environments, so no absolute `ema_timescale`
   follows from it; the way forward is recording the per-completion stream;
2. a confident, actionable replay winner:
   - the closed loop finds it harmful (an interval wholly on the bad side) -> keep the
     default, conflict, settle with an experiment of the two arms;
   - the closed loop finds it helpful and nothing harmful -> change, "high";
   - otherwise (no closed loop, or inconclusive) -> change, "moderate", to be confirmed
     by an experiment; "low" when the noise analysis points the other way;
3. no replay winner but the noise analysis proposes a pair -> keep the default, conflict:
   name the noise analysis' proposal and the experiment that would settle it;
4. otherwise keep the default: "moderate" with 3 or more runs, else "low".
Pure: structured inputs in, a structured decision out; sentences live in `report/`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import polars as pl
from scipy import stats

from rts_dagster.analysis.lp_sweep import SEPARATION_MATCHED
from rts_dagster.schema import VERDICTS, conform

Source = Literal["data", "noise", "replay", "closed_loop"]
Action = Literal["keep_default", "change"]
Confidence = Literal["high", "moderate", "low", "none"]

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
        crit = stats.t.ppf(1.0 - alpha / 2.0, df)
        nc = delta * math.sqrt(n)
        achieved = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
        if achieved >= power:
            return n
    return None


def _experiment(default: str, proposal: str, basis: Evidence | None, reason: str) -> Experiment:
    seeds = seeds_needed(basis.estimate, basis.sd) if basis is not None else None
    return Experiment(arms=(default, proposal), seeds_per_arm=seeds, reason=reason)


def _harmful(e: Evidence) -> bool:
    """An interval wholly on the bad side of zero."""
    if not (math.isfinite(e.low) and math.isfinite(e.high)) or e.better == 0:
        return False
    return e.high < 0 if e.better > 0 else e.low > 0


def _helpful(e: Evidence) -> bool:
    if not (math.isfinite(e.low) and math.isfinite(e.high)) or e.better == 0:
        return False
    return e.low > 0 if e.better > 0 else e.high < 0


def decide(
    task: str,
    evidence: list[Evidence],
    default: str = "metta_default",
    n_runs: int = 0,
) -> Verdict:
    """The task's verdict from its evidence (rules in the module docstring)."""
    ev = tuple(evidence)
    data = [e for e in ev if e.source == "data"]
    replay = [e for e in ev if e.source == "replay" and e.supports and e.proposal]
    noise = [e for e in ev if e.source == "noise" and e.supports and e.proposal]
    closed = [e for e in ev if e.source == "closed_loop"]

    if any(e.supports is None and e.metric == "granularity" for e in data) and not (
        replay or noise
    ):
        return Verdict(
            task,
            "keep_default",
            None,
            "none",
            False,
            "1: epoch means only",
            ev,
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
        harmful = [e for e in mine if _harmful(e)]
        helpful = [e for e in mine if _helpful(e)]
        opposite = [
            e for e in noise if e.direction and best.direction and e.direction != best.direction
        ]
        if harmful:
            return Verdict(
                task,
                "keep_default",
                best.proposal,
                "low",
                True,
                "2: replay winner harmful in the closed loop",
                ev,
                _experiment(
                    default,
                    best.proposal,
                    harmful[0],
                    "the replay favours it but the closed loop finds it harmful",
                ),
            )
        if helpful and not opposite:
            return Verdict(
                task, "change", best.proposal, "high", False, "2: replay winner confirmed", ev
            )
        return Verdict(
            task,
            "change",
            best.proposal,
            "low" if opposite else "moderate",
            bool(opposite),
            "2: replay winner",
            ev,
            _experiment(
                default,
                best.proposal,
                best,
                "replay is open-loop: confirm in training"
                + ("; the noise analysis points the other way" if opposite else ""),
            ),
        )

    if noise:
        proposal = noise[0]
        mine = [e for e in closed if e.config is not None and e.config == proposal.config]
        harmful = [e for e in mine if _harmful(e)]
        helpful = [e for e in mine if _helpful(e)]
        if harmful:
            return Verdict(
                task,
                "keep_default",
                proposal.proposal,
                "moderate",
                True,
                "3: noise analysis' pair harmful in the closed loop",
                ev,
                _experiment(
                    default,
                    proposal.proposal,
                    harmful[0],
                    "the noise analysis proposes it, the replay does not confirm it and the "
                    "closed loop (simulator) finds it harmful; only real training can overrule "
                    "that",
                ),
            )
        if helpful:
            return Verdict(
                task,
                "change",
                proposal.proposal,
                "moderate",
                True,
                "3: noise analysis' pair helpful in the closed loop, replay unconfirmed",
                ev,
                _experiment(
                    default,
                    proposal.proposal,
                    helpful[0],
                    "the closed loop favours it but the replay does not: confirm in training",
                ),
            )
        if mine:  # measured in the closed loop, inconclusive: size an experiment on it
            sized = [e for e in mine if seeds_needed(e.estimate, e.sd) is not None]
            basis = min(sized, key=lambda e: seeds_needed(e.estimate, e.sd), default=None)
            return Verdict(
                task,
                "keep_default",
                proposal.proposal,
                "low",
                True,
                "3: noise analysis not confirmed by replay or closed loop",
                ev,
                _experiment(
                    default,
                    proposal.proposal,
                    basis,
                    "the noise analysis proposes it; neither the replay nor the closed loop "
                    "(simulator) can tell it from the default",
                ),
            )
        return Verdict(
            task,
            "keep_default",
            proposal.proposal,
            "low",
            True,
            "3: noise analysis not confirmed by replay",
            ev,
            Experiment(
                arms=(default, proposal.proposal),
                seeds_per_arm=None,
                reason="the noise analysis proposes it; the replay does not confirm it, and "
                "its effect on training has not been measured",
            ),
        )

    return Verdict(
        task,
        "keep_default",
        None,
        "moderate" if n_runs >= 3 else "low",
        False,
        "4: no change supported",
        ev,
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

    return CurriculumConfig(name="metta_default").settings()


def _ema_direction(ema: float | None, default_ema: float) -> int:
    if ema is None or not math.isfinite(ema) or math.isclose(ema, default_ema, rel_tol=1e-9):
        return 0
    return 1 if ema > default_ema else -1


def data_evidence(granularity_runs: list[dict], left_out: list[dict]) -> list[Evidence]:
    """What the data can tell: which granularities feed the task, what was left out.
    `granularity_runs`: rows of `quality.granularity_runs` for the task; `left_out`: rows
    of `quality.left_out` (whole runs, label '*') for the task."""
    out = []
    grans = {r["granularity"]: r for r in granularity_runs}
    if "completion" not in grans:
        n = grans.get("epoch", {}).get("n_runs", 0)
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
                f"per-completion stream from {grans['completion']['n_runs']} runs",
                None,
                metric="coverage",
                n=grans["completion"]["n_runs"],
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


def replay_evidence(recommendation: dict | None, default_ema: float) -> list[Evidence]:
    """The LP replay's finding for the task (an `LP_RECOMMENDATIONS` row of completion
    granularity; epoch rows never carry a setting that transfers)."""
    if recommendation is None:
        return []
    r = recommendation
    n = int(r.get("n_pairs") or 0)
    if r.get("actionable"):
        return [
            Evidence(
                "replay",
                f"{r['config']} raises LP's signal-to-noise ratio x{r['snr_ratio']:.3g} vs the "
                "default, paired by run",
                True,
                proposal=setting_change(r, _default_settings()),
                config=r["config"],
                metric="snr_ratio",
                estimate=math.log(r["snr_ratio"]),
                low=math.log(r["snr_ratio_ci_low"]) if r["snr_ratio_ci_low"] > 0 else -math.inf,
                high=math.log(r["snr_ratio_ci_high"]),
                method=r.get("ci_method") or "",
                n=n,
                unit="log SNR ratio",
                sd=sd_from_interval(
                    math.log(max(r["snr_ratio_ci_low"], 1e-300)),
                    math.log(r["snr_ratio_ci_high"]),
                    n,
                    int(r.get("n_compared") or 1),
                ),
                better=1,
                direction=_ema_direction(r.get("ema_timescale"), default_ema),
            )
        ]
    best = r.get("replay_best")
    n = int(r.get("replay_best_n_pairs") or r.get("signal_n") or n)
    finding = "no configuration beat the default on every check"
    if best:
        reason = r.get("replay_best_reason") or ""
        finding += f"; the highest replayed ratio, {best}, failed: {reason}" if reason else ""
    return [Evidence("replay", finding, False, metric="snr_ratio", n=n)]


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
        verdict: bool | None = None
        if defined and good:
            if (good > 0 and low > 0) or (good < 0 and high < 0):
                verdict = True
            elif (good > 0 and high < 0) or (good < 0 and low > 0):
                verdict = False
        out.append(
            Evidence(
                "closed_loop",
                f"{r['config']} vs default, {metric.replace('_', ' ')}",
                verdict,
                config=r["config"],
                metric=metric,
                estimate=r["diff"],
                low=low if low is not None else math.nan,
                high=high if high is not None else math.nan,
                method=r.get("ci_method") or "paired t",
                n=int(r.get("n_pairs") or r.get("n_seeds") or 0),
                unit=units.get(metric, ""),
                sd=sd_from_interval(
                    low if defined else math.nan,
                    high if defined else math.nan,
                    int(r.get("n_pairs") or r.get("n_seeds") or 0),
                ),
                better=good,
            )
        )
    return out


def noise_evidence(
    pooled: dict | None, loo_ratios: list[float], default_ema: float
) -> list[Evidence]:
    """LP's separation objective (`lp_timescales`): the pair chosen on the other seeds vs
    Metta's default on each held-out seed (t on log ratios over seeds). Supports a change
    only when that interval excludes 1 from above."""
    if pooled is None:
        return []
    from rts_dagster.analysis.intervals import log_t_interval

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
    proposal = f"ema_timescale={a:.3g}, slow_timescale_factor={f:.3g}"
    supports = iv.defined and iv.low > 1.0
    return [
        Evidence(
            "noise",
            f"the EMA pair that best separates learning from plateaued labels is {proposal}; "
            "its d' on held-out seeds vs the default's",
            supports if iv.defined else None,
            proposal=proposal,
            config=SEPARATION_MATCHED,
            metric="separation_ratio",
            estimate=math.log(iv.estimate) if iv.estimate > 0 else math.nan,
            low=math.log(iv.low) if iv.defined and iv.low > 0 else math.nan,
            high=math.log(iv.high) if iv.defined else math.nan,
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
    q = stats.t.ppf(1.0 - ALPHA / (2.0 * max(n_compared, 1)), n - 1)
    return (high - low) / 2.0 * math.sqrt(n) / q


def _log_sd(values: list[float]) -> float:
    import numpy as np

    x = np.asarray([v for v in values if v is not None and v > 0 and math.isfinite(v)])
    return float(np.log(x).std(ddof=1)) if x.size >= 2 else math.nan


# --- all tasks, and the table form -------------------------------------------------------------
def decide_all(
    granularity_runs: pl.DataFrame,
    left_out: pl.DataFrame,
    lp_recommendations: pl.DataFrame,
    closed_loop: pl.DataFrame,
    lp_timescales: pl.DataFrame,
    default_ema: dict[str, float] | None = None,
) -> list[Verdict]:
    """One verdict per task that has runs. Inputs: `quality.granularity_runs` and
    `quality.left_out` (whole runs), LP_RECOMMENDATIONS, LP_CLOSED_LOOP_SUMMARY and
    LP_TIMESCALES tables (any may be empty). `default_ema`: task -> the LP ema_timescale its
    runs used (Metta main's 0.001 when absent), for the direction of a proposed change."""
    default_ema = default_ema or {}
    tasks = sorted(set(granularity_runs["task"].to_list()))
    out = []
    for task in tasks:
        ema0 = default_ema.get(task, 0.001)
        runs = granularity_runs.filter(pl.col("task") == task)
        whole = left_out.filter((pl.col("task") == task) & (pl.col("label") == "*"))
        evidence = data_evidence(
            list(runs.iter_rows(named=True)), list(whole.iter_rows(named=True))
        )
        rec = lp_recommendations.filter(
            (pl.col("task") == task) & (pl.col("granularity") == "completion")
        )
        evidence += replay_evidence(rec.row(0, named=True) if rec.height else None, ema0)
        pooled = lp_timescales.filter(
            (pl.col("task") == task) & (pl.col("label") == "*") & (pl.col("scope") == "pooled")
        )
        seeds = lp_timescales.filter(
            (pl.col("task") == task) & (pl.col("label") == "*") & (pl.col("scope") == "seed")
        )
        evidence += noise_evidence(
            pooled.row(0, named=True) if pooled.height else None,
            seeds["loo_ratio"].to_list() if seeds.height else [],
            ema0,
        )
        evidence += closed_loop_evidence(
            list(closed_loop.filter(pl.col("task") == task).iter_rows(named=True))
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
