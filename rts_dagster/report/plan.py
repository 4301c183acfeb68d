"""`experiments/plan.md`: the experiment plan in words, from `EXPERIMENT_PLAN` rows.

Run names and tasks are untrusted text: Markdown text is escaped, and commands (already
shell-quoted by the plan) sit in fenced blocks whose fence is longer than any run of
backticks inside, with control characters made visible.
"""

from __future__ import annotations

import re

import polars as pl

from rts_dagster.escape import md, md_table, visible_controls


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_plan(plan: pl.DataFrame, command_template: str) -> str:
    """The plan as Markdown: per task, its arms, seeds, run names, which exist, and the
    launch commands of the runs still missing."""
    lines = ["# Experiment plan", ""]
    if plan.height == 0:
        lines += [
            "No verdict proposes a change or names an experiment to settle a question, so "
            "nothing is planned. The plan fills in when `verdicts` proposes one.",
            "",
        ]
        return "\n".join(lines)
    lines += [
        'Each task below has an open question from its verdict (report.md, "Verdict per '
        'task"). The plan runs the baseline and the proposed LP settings on the same seeds, '
        "so the comparison can pair by seed. Planned run names follow the discovery rules: "
        "when the runs finish, the sensor (or `rts refresh`) picks them up and the "
        "Experiments section of the report compares the arms; the arm is read from each "
        "run's config, not from its name.",
        "",
        "Launch command template (asset config `command_template`; `override_prefix` sets "
        "where the LP settings go):",
        "",
    ]
    template = visible_controls(command_template)
    fence = _fence(template)
    lines += [f"{fence}text", template, fence, ""]
    for (task,), rows in plan.group_by(["task"], maintain_order=True):
        recipe = rows["recipe"][0]
        lines += [f"## {md(task)}", ""]
        lines += [f"Recipe: {md(recipe) if recipe else 'unknown (no alias or config names it)'}."]
        lines += [f"Why: {md(rows['reason'][0])}", ""]
        table = [
            [
                r["arm"],
                r["seed"],
                r["run_name"],
                "yes" if r["exists"] else "not yet",
                r["found_arm"] if r["found_arm"] is not None else "",
            ]
            for r in rows.iter_rows(named=True)
        ]
        lines += [md_table(["arm", "seed", "run name", "exists", "arm found"], table), ""]
        done = rows.filter(pl.col("exists")).height
        lines += [f"{done} of {rows.height} planned runs exist.", ""]
        missing = rows.filter(~pl.col("exists"))
        if missing.height:
            commands = "\n".join(visible_controls(c) for c in missing["command"].to_list())
            fence = _fence(commands)
            lines += ["Launch the missing runs:", "", f"{fence}sh", commands, fence, ""]
        mismatched = rows.filter(
            pl.col("exists")
            & pl.col("found_arm").is_not_null()
            & (pl.col("arm") == "baseline")
            & (pl.col("found_arm") != "baseline")
        )
        for r in mismatched.iter_rows(named=True):
            lines += [
                f"Note: {md(r['run_name'])} exists but discovery put it in arm "
                f"{md(r['found_arm'])}, not the baseline.",
                "",
            ]
    return "\n".join(lines)
