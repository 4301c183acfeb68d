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
from dataclasses import dataclass, field
from typing import Literal

from scipy import stats

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
    proposal: str | None = None  # configuration name or "setting=value"
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
        mine = [e for e in closed if e.proposal == best.proposal]
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
        return Verdict(
            task,
            "keep_default",
            proposal.proposal,
            "low",
            True,
            "3: noise analysis not confirmed by replay",
            ev,
            _experiment(
                default,
                proposal.proposal,
                proposal,
                "the noise analysis proposes it; the replay does not confirm it",
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
