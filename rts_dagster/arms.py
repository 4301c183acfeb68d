"""Arms: the runs of one task that agree on every config value but the seed and run
bookkeeping.

An experiment launches one recipe several times with one LP setting changed. Which runs
are seeds of one setting and which are different settings is read from the run configs,
never from the names ("group by everything but the seed"): each run's config is
flattened to dotted keys, bookkeeping keys (seed, run name, output dirs, timestamps, ...:
`DEFAULT_BOOKKEEPING`) are dropped, and the rest is hashed into an `arm_id`.

Per task, one arm is the baseline: the one the rules name (`baselines:`), else the one
whose LP settings are Metta's defaults, else the arm with the most runs. Every other arm
is named by how its config differs from the baseline's (`z_score_amplification=30`).
Pure functions: no I/O.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rts_dagster.analysis.lp import LPConfig, ZScoreLPConfig

BASELINE_ARM = "baseline"

# Config keys that differ between the seeds of one setting without changing what is
# trained: matched (fnmatch) against every dotted part of a key; a match drops the key
# and everything under it.
DEFAULT_BOOKKEEPING: tuple[str, ...] = (
    "seed",
    "*_seed",
    "seed_*",
    "run",
    "run_name",
    "run_id",
    "run_dir",
    "*_dir",
    "dir",
    "*_path",
    "*_uri",
    "*_url",
    "uri",
    "url",
    "group",
    "tags",
    "notes",
    "wandb",
    "timestamp",
    "*_timestamp",
    "*_time",
    "*_at",
    "hostname",
    "host",
    "node_rank",
    "job_id",
    "job_name",
)

# Keys are shown in arm names in this order: LP settings first (what experiments vary).
_LP_KEY_ORDER = tuple(
    dict.fromkeys([*LPConfig.model_fields, *ZScoreLPConfig.model_fields, "num_active_tasks"])
)
_MAX_NAMED_KEYS = 3


def lp_defaults() -> dict[str, Any]:
    """Default of every LP key: Metta main's where it has one, else the z-score variant's."""
    return {**ZScoreLPConfig().model_dump(), **LPConfig().model_dump()}


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; wandb's `{"value": x}` wrappers unwrapped; lists
    and other non-dict values kept as leaves."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and set(value) == {"value"}:
            value = value["value"]
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def is_bookkeeping(key: str, patterns: Sequence[str] = DEFAULT_BOOKKEEPING) -> bool:
    """True if any dotted part of `key` matches a bookkeeping pattern."""
    return any(fnmatch.fnmatchcase(part, p) for part in key.split(".") for p in patterns)


def setting_keys(
    config: Mapping[str, Any], patterns: Sequence[str] = DEFAULT_BOOKKEEPING
) -> dict[str, Any]:
    """The flattened config without bookkeeping: what defines a run's arm."""
    return {k: v for k, v in flatten_config(config).items() if not is_bookkeeping(k, patterns)}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def arm_id(settings: Mapping[str, Any]) -> str:
    """A stable 12-hex id of a run's settings (equal settings, equal id)."""
    text = _canonical(sorted((k, _canonical(v)) for k, v in settings.items()))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class RunSettings:
    run_id: str
    task: str
    settings: dict[str, Any]
    created_order: int  # position in creation order (earlier first)


@dataclass(frozen=True)
class ArmAssignment:
    arm: str  # "baseline" or how the arm differs, e.g. "z_score_amplification=30"
    arm_id: str
    baseline: bool  # this run's arm is its task's baseline
    differences: dict[str, Any]  # dotted key -> this arm's value, where it differs
    baseline_reason: str  # why the task's baseline is the arm it is


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return _canonical(a) == _canonical(b)


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _lp_defaults_match(settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> bool:
    """Every LP key the run sets is at its default (Metta main's, or the variant's for the
    variant's own keys), and it sets at least one LP key or none at all."""
    for key, value in settings.items():
        leaf = _leaf(key)
        if leaf in defaults and not _same(value, defaults[leaf]):
            return False
    return True


def _differences(
    arm: Mapping[str, Any], base: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(telling, all) keys where `arm` differs from `base`. A key only one side sets, at
    that key's known default, is in `all` only: unset means the default, so it does not
    tell the arms apart (e.g. a variant's extra keys left at their defaults, or main-only
    keys a variant does not write)."""
    every: dict[str, Any] = {}
    telling: dict[str, Any] = {}
    for key in sorted(set(arm) | set(base)):
        in_arm, in_base = key in arm, key in base
        if in_arm and in_base and _same(arm[key], base[key]):
            continue
        value = arm[key] if in_arm else None
        every[key] = value
        leaf = _leaf(key)
        one_side = arm[key] if in_arm else base[key]
        if in_arm != in_base and leaf in defaults and _same(one_side, defaults[leaf]):
            continue
        telling[key] = value
    return telling, every


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Shortest dotted suffix of each key that is unique among `keys`."""
    short: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if sum(1 for other in keys if other == tail or other.endswith("." + tail)) == 1:
                short[key] = tail
                break
        else:
            short[key] = key
    return short


def _format_value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int | str):
        return str(value)
    return _canonical(value)


def arm_key_part(name: str) -> str:
    """Text for a partition key from an arm name: `z_score_amplification=30` ->
    `z_score_amplification30`, `a=1, b=2` -> `a1_b2` (still slugged by the caller)."""
    return name.replace(", ", "_").replace("=", "").replace(" ", "_")


def arm_name(differences: Mapping[str, Any]) -> str:
    """`k=v, k2=v2` over the differing keys (LP keys first), at most three, then `+N more`."""
    if not differences:
        return BASELINE_ARM
    order = {k: i for i, k in enumerate(_LP_KEY_ORDER)}
    keys = sorted(differences, key=lambda k: (order.get(_leaf(k), len(order)), k))
    short = _short_keys(keys)
    named = [f"{short[k]}={_format_value(differences[k])}" for k in keys[:_MAX_NAMED_KEYS]]
    more = len(keys) - _MAX_NAMED_KEYS
    return ", ".join(named) + (f", +{more} more" if more > 0 else "")


def _without_defaults(settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Settings minus LP keys at their default: a run that writes `ema_timescale: 0.001`
    and one that leaves it unset trained the same way, so they share an arm."""
    return {
        k: v
        for k, v in settings.items()
        if not (_leaf(k) in defaults and _same(v, defaults[_leaf(k)]))
    }


def _matches(settings: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """The run's settings hold every `wanted` value (a key by its full dotted path or by a
    dotted suffix)."""
    for key, value in wanted.items():
        hits = [k for k in settings if k == key or k.endswith("." + key)]
        if not hits or not all(_same(settings[k], value) for k in hits):
            return False
    return True


def assign_arms(
    runs: Sequence[RunSettings], baselines: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, ArmAssignment]:
    """run_id -> its arm, per task. `baselines` maps a task to config values identifying
    its baseline arm (from the rules file); otherwise the baseline is the arm whose LP
    settings are all at their defaults (ties and no match: the arm with most runs, then
    the earliest)."""
    baselines = baselines or {}
    defaults = lp_defaults()
    out: dict[str, ArmAssignment] = {}
    by_task: dict[str, list[RunSettings]] = {}
    for run in runs:
        by_task.setdefault(run.task, []).append(run)
    for task, members in by_task.items():
        arms: dict[str, list[RunSettings]] = {}
        for run in members:
            arms.setdefault(arm_id(_without_defaults(run.settings, defaults)), []).append(run)

        def rank(aid: str, arms: dict[str, list[RunSettings]] = arms) -> tuple[int, int]:
            return (-len(arms[aid]), min(r.created_order for r in arms[aid]))

        named = baselines.get(task)
        chosen: str | None = None
        reason = ""
        if len(arms) == 1:
            chosen, reason = next(iter(arms)), "the only arm of its task"
        elif named:
            hits = [a for a in arms if _matches(arms[a][0].settings, named)]
            if hits:
                chosen = min(hits, key=rank)
                reason = f"named in the rules ({_canonical(dict(named))})"
            else:
                reason = f"no arm has the baseline named in the rules ({_canonical(dict(named))}); "
        if chosen is None:
            default_arms = [a for a in arms if _lp_defaults_match(arms[a][0].settings, defaults)]
            if default_arms:
                chosen = min(default_arms, key=rank)
                reason += "its LP settings are Metta's defaults"
            else:
                chosen = min(arms, key=rank)
                reason += (
                    "no arm has Metta's default LP settings: the arm with the most runs "
                    "(name one with `baselines:` in the rules)"
                )
        if len(arms) > 1 and len([a for a in arms if rank(a) == rank(chosen)]) > 1 and not named:
            reason += " (tie broken by the earliest run)"
        base_settings = arms[chosen][0].settings
        names: dict[str, str] = {}
        for aid, arm_runs in arms.items():
            if aid == chosen:
                names[aid] = BASELINE_ARM
                continue
            telling, every = _differences(arm_runs[0].settings, base_settings, defaults)
            names[aid] = arm_name(telling or every) if (telling or every) else f"arm-{aid[:6]}"
        # two arms may read alike once truncated: keep names unique with the id
        counts: dict[str, int] = {}
        for name in names.values():
            counts[name] = counts.get(name, 0) + 1
        for aid, name in names.items():
            if counts[name] > 1 and aid != chosen:
                names[aid] = f"{name} [{aid[:6]}]"
        for aid, arm_runs in arms.items():
            _, every = _differences(arm_runs[0].settings, base_settings, defaults)
            for run in arm_runs:
                out[run.run_id] = ArmAssignment(
                    arm=names[aid],
                    arm_id=aid,
                    baseline=aid == chosen,
                    differences={} if aid == chosen else every,
                    baseline_reason=reason,
                )
    return out
