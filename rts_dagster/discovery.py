"""Which run belongs to which (task, seed): configurable rules, safe keys and paths.

Pure functions over `RunRecord`s; the `discovered_runs` asset calls `classify_runs`.
Run names, tags and labels are untrusted text: they are matched and reported, but a
partition key or a file name is always a sanitised slug (see `slug`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rts_dagster.schema import (
    DISCOVERED_RUNS,
    RUN_STATUS_IGNORED,
    RUN_STATUS_MATCHED,
    RUN_STATUS_UNREADABLE,
    conform,
)
from rts_dagster.sources.base import RunRecord, UnreadableRun
from rts_dagster.storage import RESERVED_NAMES

# `<anything>.<task>.seed<N>`: the first dot-separated part is the user (or any prefix),
# the rest up to `.seed<N>` is the task, so `alice.fixed.maps.seed1` -> task `fixed.maps`.
DEFAULT_NAME_REGEX = r"^(?P<prefix>[^.]*)\.(?P<task>.+?)(?:\.seed(?P<seed>-?\d+))?$"

# LP hyperparameter names we look for anywhere in a run config (Metta main + variants).
LP_CONFIG_KEYS = (
    "ema_timescale",
    "slow_timescale_factor",
    "exploration_bonus",
    "progress_smoothing",
    "lp_gain",
    "memory",
    "use_bidirectional",
    "z_score_amplification",
    "early_progress_amplification",
    "lp_score_temperature",
    "performance_bonus_weight",
    "use_baseline_normalization",
    "min_samples_for_lp",
    "rand_task_rate",
    "num_active_tasks",
)

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_MAX_SLUG = 64


class DiscoveryRule(BaseModel):
    """One rule: a run matches if every given filter holds; task and seed come from the
    name regex groups `task`/`seed`, a fixed `task`, or the config key `seed_config_key`."""

    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    name_regex: str = DEFAULT_NAME_REGEX
    task: str | None = None  # fixed task name (overrides the regex group)
    seed_config_key: str | None = "seed"  # dotted path into the run config
    tags_all: list[str] = Field(default_factory=list)  # run must carry all of these tags
    states: list[str] = Field(default_factory=list)  # empty = any state
    project: str | None = None
    config_equals: dict[str, Any] = Field(default_factory=dict)  # dotted key -> value

    @field_validator("name_regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"name_regex {value!r} does not compile: {exc}") from exc
        return value


class DiscoveryRules(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[DiscoveryRule] = Field(default_factory=lambda: [DiscoveryRule()])


def load_rules(path: Path | None) -> DiscoveryRules:
    """Rules from a YAML file (`rules: [...]`), or the default rule when `path` is None."""
    if path is None:
        return DiscoveryRules()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return DiscoveryRules.model_validate(raw)
    except Exception as exc:
        raise ValueError(f"rules file {path}: {exc}") from exc


def slug(text: str) -> str:
    """A file-name- and partition-key-safe form of untrusted text.

    Keeps `[A-Za-z0-9_.-]`; anything changed (or too long, empty or reserved) gets a short
    hash of the original appended, so distinct inputs never share a slug.
    """
    cleaned = _SLUG_UNSAFE.sub("-", text).strip("-.")
    if cleaned == text and cleaned and len(cleaned) <= _MAX_SLUG and text not in RESERVED_NAMES:
        return cleaned
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[: _MAX_SLUG - 9] or 'x'}-{digest}"


def config_get(config: dict[str, Any], dotted: str) -> Any:
    """`config['a']['b']` for `dotted='a.b'`; also accepts a flat `'a.b'` key; None if absent."""
    if dotted in config:
        value = config[dotted]
    else:
        value = config
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
    # wandb stores init config values as {"value": ...} in some exports
    if isinstance(value, dict) and set(value) == {"value"}:
        return value["value"]
    return value


def extract_lp_config(config: dict[str, Any]) -> dict[str, Any]:
    """LP hyperparameters found anywhere in a nested run config.

    The dict holding the most LP keys (the curriculum algorithm section) wins; keys it
    lacks are filled from the other dicts, shallowest first (e.g. `num_active_tasks`
    one level up)."""
    nodes: list[tuple[int, int, dict[str, Any]]] = []  # (-n_lp_keys, depth, node)
    queue: list[tuple[int, dict[str, Any]]] = [(0, config)]
    while queue:
        depth, node = queue.pop(0)
        n_lp = sum(1 for k, v in node.items() if k in LP_CONFIG_KEYS and not isinstance(v, dict))
        nodes.append((-n_lp, depth, node))
        queue.extend((depth + 1, v) for v in node.values() if isinstance(v, dict))
    best = min(nodes, key=lambda t: (t[0], t[1]))[2]
    ordered = [best] + [
        node for _, _, node in sorted(nodes, key=lambda t: t[1]) if node is not best
    ]
    found: dict[str, Any] = {}
    for node in ordered:
        for key, value in node.items():
            if key in LP_CONFIG_KEYS and not isinstance(value, dict):
                found.setdefault(key, value)
    return found


def user_from_tags(tags: Iterable[str]) -> str:
    for tag in tags:
        if tag.startswith("user:"):
            return tag[len("user:") :]
    return ""


@dataclass(frozen=True)
class Match:
    task: str | None
    seed: int | None
    reason: str


def match_run(run: RunRecord, rules: DiscoveryRules) -> Match:
    """Task and seed of `run` from the first rule that matches, or the reason none did."""
    misses: list[str] = []
    for rule in rules.rules:
        if rule.project and run.project != rule.project:
            misses.append(f"{rule.name}: project {run.project!r} != {rule.project!r}")
            continue
        if rule.states and run.state not in rule.states:
            misses.append(f"{rule.name}: state {run.state!r} not in {rule.states}")
            continue
        missing_tags = [t for t in rule.tags_all if t not in run.tags]
        if missing_tags:
            misses.append(f"{rule.name}: missing tags {missing_tags}")
            continue
        bad_config = [k for k, v in rule.config_equals.items() if config_get(run.config, k) != v]
        if bad_config:
            misses.append(f"{rule.name}: config {bad_config} differ")
            continue
        found = re.search(rule.name_regex, run.run_name)
        groups = found.groupdict() if found else {}
        task = rule.task or groups.get("task")
        if not task:
            misses.append(f"{rule.name}: name {run.run_name!r} does not match {rule.name_regex!r}")
            continue
        seed = _as_int(groups.get("seed"))
        if seed is None and rule.seed_config_key:
            seed = _as_int(config_get(run.config, rule.seed_config_key))
        if seed is None:
            misses.append(
                f"{rule.name}: no seed in name {run.run_name!r} "
                f"nor config key {rule.seed_config_key!r}"
            )
            continue
        return Match(task=task, seed=seed, reason=f"rule {rule.name}")
    return Match(task=None, seed=None, reason="; ".join(misses) or "no rules")


def _as_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        return None
    return int(as_float) if as_float.is_integer() else None


def partition_key(task: str, seed: int, run_id: str | None = None) -> str:
    """`<task slug>.seed<N>`; a second run claiming the same (task, seed) gets its run id
    appended instead of overwriting the first."""
    key = f"{slug(task)}.seed{seed}"
    return f"{key}.{slug(run_id)}" if run_id is not None else key


def stream_file_stem(seed: int, run_id: str | None = None) -> str:
    """File stem of a partition under `<data>/<task slug>/`: `<seed>` or `<seed>.<run>`."""
    return f"{seed}.{slug(run_id)}" if run_id is not None else str(seed)


def partition_files(task: str, seed: int, run_id: str, key: str) -> tuple[str, str]:
    """(task folder, file stem) of a matched run's partition: `<task slug>/<seed>` for the
    run holding the plain key, `<task slug>/<seed>.<run slug>` for a duplicate."""
    duplicate = key != partition_key(task, seed)
    return slug(task), stream_file_stem(seed, run_id if duplicate else None)


def row_files(row: Mapping[str, Any]) -> tuple[str, str]:
    """`partition_files` of a matched discovered_runs row."""
    return partition_files(row["task"], row["seed"], row["run_id"], row["partition_key"])


def classify_runs(
    runs: Sequence[RunRecord],
    unreadable: Sequence[UnreadableRun],
    rules: DiscoveryRules,
) -> pl.DataFrame:
    """One `DISCOVERED_RUNS` row per run: matched runs get a partition key; others are
    listed as ignored/unreadable with the reason, never dropped."""
    rows: list[dict[str, Any]] = []
    claimed: dict[tuple[str, int], str] = {}
    # Earliest run first, so the original keeps the plain key when a rerun appears.
    ordered = sorted(runs, key=lambda r: (r.created_at is None, r.created_at or 0, r.run_id))
    for run in ordered:
        match = match_run(run, rules)
        row = _base_row(run)
        if match.task is None or match.seed is None:
            row.update(status=RUN_STATUS_IGNORED, reason=match.reason)
        else:
            first = claimed.setdefault((match.task, match.seed), run.run_id)
            duplicate = first != run.run_id
            row.update(
                status=RUN_STATUS_MATCHED,
                task=match.task,
                seed=match.seed,
                partition_key=partition_key(
                    match.task, match.seed, run.run_id if duplicate else None
                ),
                reason=match.reason
                + (f"; duplicate task/seed: also claimed by run {first!r}" if duplicate else ""),
            )
        rows.append(row)
    for bad in unreadable:
        rows.append(
            {
                **{name: None for name in DISCOVERED_RUNS.names()},
                "tags": [],
                "status": RUN_STATUS_UNREADABLE,
                "reason": bad.error,
                "source": bad.source,
                "location": bad.location,
                "lp_config": "{}",
            }
        )
    if not rows:
        return pl.DataFrame(schema=DISCOVERED_RUNS)
    return conform(pl.DataFrame(rows, schema=DISCOVERED_RUNS), DISCOVERED_RUNS, "discovered_runs")


def _base_row(run: RunRecord) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "run_name": run.run_name,
        "project": run.project,
        "entity": run.entity,
        "user": user_from_tags(run.tags),
        "tags": list(run.tags),
        "state": run.state,
        "created_at": run.created_at,
        "heartbeat_at": run.heartbeat_at,
        "task": None,
        "seed": None,
        "partition_key": None,
        "lp_config": json.dumps(extract_lp_config(run.config), sort_keys=True, default=str),
        "source": run.source,
        "location": run.location,
        "fingerprint": run.fingerprint,
    }
