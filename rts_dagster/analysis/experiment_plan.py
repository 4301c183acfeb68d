"""An experiment plan from the verdicts: which runs to launch to settle each open question.

A verdict that proposes a change (or names the experiment that would settle a conflict)
becomes two arms of its task: the baseline and the proposed LP settings, each with the
seeds the verdict's power calculation asks for (at least `min_seeds`), on the baseline's
own seeds first so the comparison can pair by seed. Every planned run gets a name the
discovery rules map back to its task (`<user>.<task>[.<arm tag>].seed<N>`), and a launch
command from a template (Metta's SkyPilot launcher form by default), so when the runs
finish the sensor picks them up and `experiment_comparison` fills in with no further
setup. The arm itself is read from the launched run's config, never from its name.

Pure: tables in, a table out (`schema.EXPERIMENT_PLAN`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from rts_dagster.schema import EXPERIMENT_PLAN, RUN_STATUS_MATCHED, conform

DEFAULT_COMMAND = "./devops/skypilot/launch.py {recipe} run={run_name} {overrides}"
DEFAULT_OVERRIDE_PREFIX = "trainer.curriculum.algorithm_config"
_SETTING = re.compile(
    r"([A-Za-z_][A-Za-z0-9_]*)=([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|true|false)"
)


class PlanConfig(BaseModel):
    """How planned runs are named and launched (the asset's run config)."""

    model_config = ConfigDict(extra="forbid")

    command_template: str = Field(
        DEFAULT_COMMAND,
        description="Launch command; {recipe}, {run_name}, {overrides} and {seed} are filled in.",
    )
    override_prefix: str = Field(
        DEFAULT_OVERRIDE_PREFIX,
        description="Dotted config path of the LP settings in the launcher's overrides.",
    )
    user: str | None = Field(
        None, description="Name prefix of planned runs; default: the baseline runs' user."
    )
    min_seeds: int = Field(3, ge=2, description="Seeds per arm at least.")
    max_seeds: int = Field(10, ge=2, description="Seeds per arm at most (a practical cap).")


def parse_settings(text: str | None, allowed: Sequence[str]) -> dict[str, str]:
    """`"ema_timescale=0.003, slow_timescale_factor=0.2"` -> {key: value text}, keeping
    only the LP keys in `allowed` (a proposal's words around them are ignored)."""
    if not text:
        return {}
    return {k: v for k, v in _SETTING.findall(text) if k in allowed}


# Short run-name forms of the LP keys experiments vary (names stay readable in the UI).
_TAG_NAMES = {
    "ema_timescale": "ema",
    "slow_timescale_factor": "slow",
    "exploration_bonus": "explore",
    "progress_smoothing": "smooth",
    "z_score_amplification": "z",
    "early_progress_amplification": "early",
    "lp_score_temperature": "temp",
    "performance_bonus_weight": "perf",
    "num_active_tasks": "pool",
}


def arm_tag(settings: Mapping[str, str]) -> str:
    """A run-name part for an arm: `ema0p003_slow0p2` (letters, digits, `_`; no dots, so
    the name rule still finds the task and seed). Only a label: the arm is read from the
    run's config."""
    parts = []
    for key, value in settings.items():
        text = value.replace(".", "p").replace("-", "m").replace("+", "")
        parts.append(f"{_TAG_NAMES.get(key, key)}{text}")
    return "_".join(parts)


def _run_user(discovered: pl.DataFrame, task: str, fallback: str) -> str:
    runs = discovered.filter((pl.col("task") == task) & (pl.col("status") == RUN_STATUS_MATCHED))
    prefixes = [name.split(".", 1)[0] for name in runs["run_name"].to_list() if "." in name]
    if not prefixes:
        return fallback
    return max(sorted(set(prefixes)), key=prefixes.count)


def plan_experiments(
    verdicts: pl.DataFrame,
    discovered: pl.DataFrame,
    allowed_keys: Sequence[str],
    config: PlanConfig | None = None,
) -> pl.DataFrame:
    """One `EXPERIMENT_PLAN` row per run the plan needs, per task whose verdict proposes
    a change or names a settling experiment. `discovered`: the discovered_runs table
    (run names, tasks, arms, seeds, recipes); `allowed_keys`: LP setting names."""
    config = config or PlanConfig()
    rows: list[dict[str, Any]] = []
    matched = discovered.filter(pl.col("status") == RUN_STATUS_MATCHED)
    by_name = {r["run_name"]: r for r in matched.iter_rows(named=True)}
    for verdict in verdicts.iter_rows(named=True):
        arms = verdict["settle_arms"] or []
        proposal_text = arms[-1] if len(arms) >= 2 else None
        if verdict["action"] == "change" and verdict["proposal"]:
            proposal_text = verdict["proposal"]
        settings = parse_settings(proposal_text, allowed_keys)
        if not settings:
            continue
        task = verdict["task"]
        task_runs = matched.filter(pl.col("task") == task)
        recipes = [r for r in task_runs["recipe"].to_list() if r]
        recipe = recipes[0] if recipes else None
        base_seeds = sorted(
            {
                r["seed"]
                for r in task_runs.iter_rows(named=True)
                if r["baseline"] is not False and r["seed"] is not None
            }
        )
        wanted = verdict["settle_seeds_per_arm"] or config.min_seeds
        n_seeds = min(max(int(wanted), config.min_seeds), config.max_seeds)
        seeds = base_seeds[:n_seeds]
        nxt = max(base_seeds, default=0) + 1
        while len(seeds) < n_seeds:
            seeds.append(nxt)
            nxt += 1
        user = config.user or _run_user(discovered, task, "user")
        why = verdict["settle_reason"] or f"verdict: {verdict['action']} ({verdict['rule']})"
        tag = arm_tag(settings)
        overrides = [f"{config.override_prefix}.{k}={v}" for k, v in settings.items()]
        arm_name = ", ".join(f"{k}={v}" for k, v in settings.items())
        for arm, tag_part, over in (("baseline", None, []), (arm_name, tag, overrides)):
            for seed in seeds:
                parts = [user, task] + ([tag_part] if tag_part else []) + [f"seed{seed}"]
                name = ".".join(parts)
                existing = by_name.get(name)
                if existing is None and arm == "baseline":
                    # the baseline's own run of that seed, whatever its name
                    existing = next(
                        (
                            r
                            for r in task_runs.iter_rows(named=True)
                            if r["seed"] == seed and r["baseline"] is not False
                        ),
                        None,
                    )
                    if existing is not None:
                        name = existing["run_name"]
                # names come from run names (untrusted): every filled-in part is shell-quoted
                command = config.command_template.format(
                    recipe=shlex.quote(recipe or f"<recipe of {task}>"),
                    run_name=shlex.quote(name),
                    overrides=" ".join(shlex.quote(o) for o in over),
                    seed=seed,
                ).strip()
                rows.append(
                    {
                        "task": task,
                        "recipe": recipe,
                        "arm": arm,
                        "seed": seed,
                        "run_name": name,
                        "overrides": over,
                        "command": command,
                        "reason": why,
                        "exists": existing is not None,
                        "found_arm": existing["arm"] if existing is not None else None,
                    }
                )
    if not rows:
        return pl.DataFrame(schema=EXPERIMENT_PLAN)
    return conform(pl.DataFrame(rows, schema=EXPERIMENT_PLAN), EXPERIMENT_PLAN, "experiment_plan")
