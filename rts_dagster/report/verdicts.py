"""The report's first section: one verdict per task, in words, with its chain of evidence.

Sentences are written here from `analysis.verdict.Verdict` objects only, so the advice at
the top and the evidence below come from the same numbers.
"""

from __future__ import annotations

import math

from rts_dagster.analysis.verdict import Evidence, Verdict, closed_loop_name
from rts_dagster.report.document import Bullets, Heading, Paragraph, Report, Table
from rts_dagster.report.figures import number

_SOURCES = {
    "data": "data",
    "noise": "noise and drift",
    "replay": "LP replay",
    "closed_loop": "closed loop (simulator)",
}
_SUPPORTS = {True: "for the change", False: "against the change", None: "cannot tell"}


def source_name(e: Evidence) -> str:
    """Where a piece of evidence comes from; a closed loop names what trained its runs."""
    return closed_loop_name([e]) if e.source == "closed_loop" else _SOURCES[e.source]


def _num(value: float) -> str:
    return number(value) if math.isfinite(value) else "n/a"


def evidence_text(e: Evidence) -> str:
    """ "LP replay: <finding> (+0.12, 95% paired t interval, n=3: +0.02 to +0.22)"."""
    text = f"{source_name(e)}: {e.finding}"
    if e.source == "data":  # facts about the data; their numbers are in the finding
        return text
    if math.isfinite(e.estimate) and e.unit.startswith("log "):  # a ratio: show it as one
        ratio = e.unit.removeprefix("log ")
        bounds = (
            f"; 95% {e.method} interval, n={e.n}: x{_num(math.exp(e.low))} to "
            f"x{_num(math.exp(e.high))}"
            if math.isfinite(e.low) and math.isfinite(e.high)
            else f"; no interval, n={e.n}"
        )
        return text + f" ({ratio} x{_num(math.exp(e.estimate))}{bounds})"
    if math.isfinite(e.estimate):
        unit = f" {e.unit}" if e.unit else ""
        if math.isfinite(e.low) and math.isfinite(e.high):
            text += (
                f" ({_num(e.estimate)}{unit}; 95% {e.method} interval, n={e.n}: "
                f"{_num(e.low)} to {_num(e.high)})"
            )
        else:
            text += f" ({_num(e.estimate)}{unit}; no interval, n={e.n})"
    return text


def _data(v: Verdict, metric: str) -> Evidence | None:
    return next((e for e in v.evidence if e.source == "data" and e.metric == metric), None)


def headline(v: Verdict) -> str:
    """The verdict in one sentence (plus the experiment that would settle it)."""
    proposal = v.proposal
    units = _data(v, "units")
    if proposal and "ema_timescale" in proposal:
        proposal += " (per label completion, as replayed"
        if units is not None and math.isfinite(units.estimate):
            proposal += (
                f"; Metta's LP keeps its EMAs per task instance, ~{units.estimate:.3g} "
                "instances per label here"
            )
        proposal += ")"
    if v.action == "change":
        lead = f"{v.task}: change to {proposal}"
    elif v.confidence == "none":
        lead = f"{v.task}: keep Metta's default LP settings; these data cannot tell more"
    elif v.proposal and v.conflict:
        lead = (
            f"{v.task}: keep Metta's default LP settings; the evidence conflicts about {proposal}"
        )
    elif v.proposal:
        lead = (
            f"{v.task}: keep Metta's default LP settings; the evidence cannot yet decide "
            f"about {proposal}"
        )
    else:
        lead = f"{v.task}: keep Metta's default LP settings"
    text = f"{lead} (confidence: {v.confidence})."
    runs = _data(v, "runs_config")
    if runs is not None:
        text += f" Note: {runs.finding}."
    if v.settle_with is not None and v.settle_with.reason:
        exp = v.settle_with
        if len(exp.arms) >= 2:
            seeds = (
                f"{exp.seeds_per_arm} seeds per arm for 80% power at the simulator's "
                "difference in final competence (simulator pairs share random draws: real "
                "runs need at least as many)"
                if exp.seeds_per_arm
                else "seeds per arm unknown: no training outcome measured, or a difference "
                "too small for 50 seeds"
            )
            text += f" To settle it: run {' vs '.join(exp.arms)} ({seeds}); {exp.reason}."
        else:
            text += f" Next step: {exp.reason}."
    return text


def add_verdict_section(report: Report, verdicts: list[Verdict]) -> None:
    """Heading, one bullet per task, then a table of the evidence each verdict rests on."""
    report.add(Heading("Verdict per task"))
    if not verdicts:
        report.add(Paragraph(["No task has usable runs yet: no verdict."]))
        return
    report.add(
        Paragraph(
            [
                "The only advice in this report. Every section below describes evidence; the "
                "verdict weighs it (rules: rts_dagster/analysis/verdict.py). Confidence: 'high' "
                "= the replay and the closed loop agree; 'moderate' = one direct test supports "
                "it and nothing contradicts it; 'low' = the sources conflict or cannot decide; "
                "'none' = the data cannot answer the question. Closed-loop outcomes: final "
                "competence and time to competence decide; final reward is secondary (it "
                "depends on what the curriculum samples)."
            ]
        )
    )
    report.add(Bullets([headline(v) for v in verdicts]))
    rows = [
        [v.task, source_name(e), _SUPPORTS[e.supports], evidence_text(e)]
        for v in verdicts
        for e in v.evidence
    ]
    if rows:
        report.add(
            Table(
                ["task", "source", "bears", "evidence"],
                rows,
                caption="The chain of evidence behind each verdict.",
            )
        )
