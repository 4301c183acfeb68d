"""Which run belongs to which (task, seed): configurable rules, safe keys and paths.

Pure functions over `RunRecord`s; the `discovered_runs` asset calls `classify_runs`.
Run names, tags and labels are untrusted text: they are matched and reported, but a
partition key or a file name is always a sanitised slug (see `slug`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rts_dagster.arms import (
    DEFAULT_BOOKKEEPING,
    RunSettings,
    arm_key_part,
    assign_arms,
    setting_keys,
)
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
_HASH_LEN = 8
# What only a hashed slug may look like: ends in `-<8 hex>` (else a clean name could forge
# another name's hashed slug).
_HASHED_TAIL = re.compile(rf"-[0-9a-f]{{{_HASH_LEN}}}$")
# A dot-separated part `seed<N>`: marks the seed in a partition key, so no slug holds one
# (else task `a.seed1` seed 2 and task `a` seed 1 run `seed2` would share a key).
_SEED_PART = re.compile(r"(?:^|(?<=\.))seed(?=-?\d+(?:\.|$))")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Where researchers open a run: the WandB web app (its API lives on `api.` of that host).
WANDB_WEB_URL = "https://wandb.ai"
ENV_WANDB_BASE_URL = "WANDB_BASE_URL"
_WANDB_CLOUD_API_HOST = "api.wandb.ai"


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


# Names of the study plan's recipes -> the recipe. The first name of a recipe is the task
# name the product shows; a name task that starts with an alias (`fixed.maps.z30`) is that
# alias' recipe unless its task generator config says otherwise.
DEFAULT_ALIASES: dict[str, str] = {
    "fixed_maps": "recipes.prod.cvc.fixed_maps.train",
    "fixed.maps": "recipes.prod.cvc.fixed_maps.train",
    "assembly_lines": "recipes.experiment.assembly_lines.train",
    "assembly.lines": "recipes.experiment.assembly_lines.train",
    "variants_curriculum": "recipes.experiment.cvc.variants_curriculum.train",
    "variants": "recipes.experiment.cvc.variants_curriculum.train",
    "density_curriculum": "recipes.experiment.density_curriculum.train",
    "density": "recipes.experiment.density_curriculum.train",
}
# Where a run config may name its recipe (Metta does not store it; launchers may) and
# where Metta keeps the curriculum's task generator (shared by all runs of one recipe).
DEFAULT_RECIPE_KEYS: tuple[str, ...] = ("recipe", "tool_path", "recipe_path")
DEFAULT_TASK_GENERATOR_KEYS: tuple[str, ...] = (
    "training_env.curriculum.task_generator",
    "trainer.curriculum.task_generator",
    "curriculum.task_generator",
)


class DiscoveryRules(BaseModel):
    """Task/seed rules plus how tasks, recipes and arms are read from run configs."""

    model_config = ConfigDict(extra="forbid")
    rules: list[DiscoveryRule] = Field(default_factory=lambda: [DiscoveryRule()])
    # name -> recipe; merged over DEFAULT_ALIASES unless use_default_aliases is false
    aliases: dict[str, str] = Field(default_factory=dict)
    use_default_aliases: bool = True
    recipe_config_keys: list[str] = Field(default_factory=lambda: list(DEFAULT_RECIPE_KEYS))
    task_generator_keys: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TASK_GENERATOR_KEYS)
    )
    # fnmatch patterns of config key parts that are run bookkeeping, not settings
    bookkeeping_keys: list[str] = Field(default_factory=lambda: list(DEFAULT_BOOKKEEPING))
    # task -> config values of its baseline arm, e.g. {fixed_maps: {z_score_amplification: 10}}
    baselines: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def all_aliases(self) -> dict[str, str]:
        return {**(DEFAULT_ALIASES if self.use_default_aliases else {}), **self.aliases}


def load_rules(path: Path | None) -> DiscoveryRules:
    """Rules from a YAML file (`rules: [...]`), or the default rule when `path` is None."""
    if path is None:
        return DiscoveryRules()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return DiscoveryRules.model_validate(raw)
    except Exception as exc:
        raise ValueError(f"rules file {path}: {exc}") from exc


@lru_cache(maxsize=1 << 16)  # pure; every aggregate maps a thousand runs to their files
def slug(text: str) -> str:
    """A file-name- and partition-key-safe form of untrusted text.

    Keeps `[A-Za-z0-9_.-]` text as it is; anything changed (or too long, empty, reserved,
    ending like a hashed slug, or holding a `.seed<N>` part) becomes a cleaned prefix plus
    a short hash of the original. So a kept text never looks like a hashed one, and two
    texts share a slug only if their hashes collide (`classify_runs` still checks keys).
    """
    cleaned = _SLUG_UNSAFE.sub("-", text).strip("-.")
    if (
        cleaned == text
        and cleaned
        and len(cleaned) <= _MAX_SLUG
        and text not in RESERVED_NAMES
        and not _HASHED_TAIL.search(text)
        and not _SEED_PART.search(text)
    ):
        return cleaned
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:_HASH_LEN]
    prefix = _SEED_PART.sub("_seed", cleaned)[: _MAX_SLUG - _HASH_LEN - 1]
    return f"{prefix or 'x'}-{digest}"


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


def wandb_web_root(base_url: str | None) -> str:
    """`scheme://host[:port]` of the WandB web app for a configured base URL (the API's;
    `WANDB_BASE_URL`): its host, `wandb.ai` for the cloud API host, and `WANDB_WEB_URL` when
    unset or not an http(s) URL. Credentials or a path in the base URL are never kept."""
    text = (base_url or "").strip()
    if not text:
        return WANDB_WEB_URL
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:
        return WANDB_WEB_URL
    if parts.scheme not in ("http", "https") or not host:
        return WANDB_WEB_URL
    if host == _WANDB_CLOUD_API_HOST:
        return WANDB_WEB_URL
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}" + (f":{port}" if port is not None else "")


def _url_part(text: str) -> str:
    """One URL path segment of untrusted text: everything but unreserved characters quoted,
    and `.`/`..` spelled out so a browser cannot read them as "this/parent folder"."""
    quoted = quote(text, safe="")
    return quoted.replace(".", "%2E") if set(quoted) == {"."} else quoted


def wandb_run_url(
    entity: str | None, project: str | None, run_id: str | None, base_url: str | None = None
) -> str | None:
    """`<web root>/<entity>/<project>/runs/<run id>` (see `wandb_web_root`), each part
    URL-quoted; None unless all three are known."""
    if not (entity and project and run_id):
        return None
    path = "/".join(_url_part(p) for p in (entity, project)) + f"/runs/{_url_part(run_id)}"
    return f"{wandb_web_root(base_url)}/{path}"


def with_run_urls(table: pl.DataFrame, base_url: str | None = None) -> pl.DataFrame:
    """`table` (a discovered_runs table, maybe written before it had a `url` column) with
    `url` filled from entity/project/run id where it is missing; `base_url` defaults to
    `$WANDB_BASE_URL`. Lets an older discovered_runs.parquet pass `conform`."""
    if base_url is None:
        base_url = os.environ.get(ENV_WANDB_BASE_URL)
    have = table["url"] if "url" in table.columns else pl.Series([None] * table.height)
    # one URL per run (not per sample): a comprehension over the runs is fine
    urls = [
        url or wandb_run_url(entity, project, run_id, base_url)
        for url, entity, project, run_id in zip(
            have, table["entity"], table["project"], table["run_id"], strict=True
        )
    ]
    return table.with_columns(pl.Series("url", urls, dtype=pl.String))


# Columns a discovered_runs.parquet written before issue 11 lacks; read back as null.
_ADDED_COLUMNS = (
    "rule",
    "recipe",
    "task_source",
    "arm",
    "arm_id",
    "arm_settings",
    "baseline",
    "baseline_reason",
)


def upgrade_discovered(table: pl.DataFrame, base_url: str | None = None) -> pl.DataFrame:
    """An older discovered_runs table in today's columns: `url` filled (`with_run_urls`)
    and the task/arm columns added as null, so `conform` passes."""
    table = with_run_urls(table, base_url)
    missing = [c for c in _ADDED_COLUMNS if c not in table.columns]
    return table.with_columns(pl.lit(None, DISCOVERED_RUNS[c]).alias(c) for c in missing)


@dataclass(frozen=True)
class Match:
    task: str | None
    seed: int | None
    reason: str
    unreadable: bool = False  # the run cannot be keyed at all (e.g. a seed beyond Int64)
    rule: str | None = None  # the name of the rule that matched


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
        if seed is not None and not _INT64_MIN <= seed <= _INT64_MAX:
            return Match(
                task=None,
                seed=None,
                reason=f"rule {rule.name}: seed {seed} does not fit a 64-bit integer",
                unreadable=True,
            )
        if seed is None:
            misses.append(
                f"{rule.name}: no seed in name {run.run_name!r} "
                f"nor config key {rule.seed_config_key!r}"
            )
            continue
        return Match(task=task, seed=seed, reason=f"rule {rule.name}", rule=rule.name)
    return Match(task=None, seed=None, reason="; ".join(misses) or "no rules")


@dataclass(frozen=True)
class TaskIdentity:
    task: str
    recipe: str | None
    source: str  # how the task was decided, for discovered_runs.task_source


def _config_text(config: dict[str, Any], keys: Sequence[str]) -> str | None:
    for key in keys:
        value = config_get(config, key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def task_generator_fingerprint(config: dict[str, Any], keys: Sequence[str]) -> str | None:
    """A hash of the run's curriculum task generator config (equal for every run of one
    recipe), or None when the config has none."""
    for key in keys:
        value = config_get(config, key)
        if value is not None:
            text = json.dumps(value, sort_keys=True, default=str)
            return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    return None


def _alias_for(name_task: str, aliases: Mapping[str, str]) -> tuple[str, bool] | None:
    """(alias, exact) for the alias equal to `name_task`, else the longest alias that is a
    dotted prefix of it (`fixed.maps` of `fixed.maps.z30`)."""
    if name_task in aliases:
        return name_task, True
    prefixes = [a for a in aliases if name_task.startswith(a + ".")]
    return (max(prefixes, key=len), False) if prefixes else None


def _common_dotted_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common)


def _arm_settings(config: dict[str, Any], rules: DiscoveryRules) -> dict[str, Any]:
    """What defines a run's arm: its settings without bookkeeping and without the recipe
    name (task identity, not a setting: an aliased run and one naming its recipe agree)."""
    settings = setting_keys(config, rules.bookkeeping_keys)
    for key in rules.recipe_config_keys:
        settings.pop(key, None)
    return settings


def resolve_tasks(
    named: Mapping[str, tuple[str, dict[str, Any]]], rules: DiscoveryRules
) -> dict[str, TaskIdentity]:
    """run_id -> task identity, from `named` (run_id -> (task from the name rule, config)).

    In order: a recipe the config names (`recipe_config_keys`), shown by its first alias;
    the name task equal to an alias; the name task starting with an alias, unless the run's
    task generator differs from that recipe's other runs'; runs sharing a task generator
    config under different name tasks (`fixed.maps` and `fixed.maps.z30`: one recipe) get
    their common dotted prefix when it is one of their tasks; otherwise the name task.
    """
    aliases = rules.all_aliases()
    shown: dict[str, str] = {}  # recipe -> the task name shown (its first alias)
    for alias, recipe in aliases.items():
        shown.setdefault(recipe, alias)
    tg = {
        rid: task_generator_fingerprint(cfg, rules.task_generator_keys)
        for rid, (_, cfg) in named.items()
    }
    out: dict[str, TaskIdentity] = {}
    prefixed: dict[str, tuple[str, str]] = {}  # run_id -> (alias, recipe), decided later
    for rid, (name_task, cfg) in named.items():
        recipe = _config_text(cfg, rules.recipe_config_keys)
        if recipe is not None:
            out[rid] = TaskIdentity(shown.get(recipe, name_task), recipe, "config recipe")
            continue
        hit = _alias_for(name_task, aliases)
        if hit is None:
            continue
        alias, exact = hit
        if exact:
            out[rid] = TaskIdentity(shown[aliases[alias]], aliases[alias], f"alias {alias}")
        else:
            prefixed[rid] = (alias, aliases[alias])
    # a prefix match holds unless the run's task generator contradicts the recipe's
    recipe_tgs: dict[str, set[str]] = {}
    for rid, ident in out.items():
        if ident.recipe is not None and tg[rid] is not None:
            recipe_tgs.setdefault(ident.recipe, set()).add(tg[rid])
    for rid, (alias, recipe) in prefixed.items():
        known = recipe_tgs.get(recipe)
        if tg[rid] is not None and known and tg[rid] not in known:
            continue  # another recipe whose name starts like this one: use its name task
        out[rid] = TaskIdentity(
            shown[recipe], recipe, f"alias {alias} (prefix of name task {named[rid][0]!r})"
        )
    # the rest: one recipe per shared task generator, else the name task
    groups: dict[str, list[str]] = {}
    for rid in named:
        if rid not in out and tg[rid] is not None:
            groups.setdefault(tg[rid], []).append(rid)
    for members in groups.values():
        tasks = sorted({named[rid][0] for rid in members})
        common = _common_dotted_prefix(tasks)
        if len(tasks) > 1 and common in tasks:
            for rid in members:
                source = f"task generator shared with name task {common!r}"
                out[rid] = TaskIdentity(common, None, source)
    for rid, (name_task, _) in named.items():
        out.setdefault(rid, TaskIdentity(name_task, None, "name"))
    return out


def _as_int(value: Any) -> int | None:
    """An integer seed from an int, an integral float or their text; exact for big ints."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    try:
        as_float = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(as_float) if as_float.is_integer() else None


def partition_key(task: str, seed: int, run_id: str | None = None) -> str:
    """`<task slug>.seed<N>`, or `<task slug>.seed<N>.<run slug>` for a (task, seed) that
    has or had more than one run. Injective: no slug holds a `.seed<N>` part (see `slug`),
    so the first such part of a key is its seed, and everything after it its run."""
    key = f"{slug(task)}.seed{seed}"
    return f"{key}.{slug(run_id)}" if run_id is not None else key


def stream_file_stem(seed: int, run_id: str | None = None) -> str:
    """File stem of a partition under `<data>/<task slug>/`: `<seed>` or `<seed>.<run>`."""
    return f"{seed}.{slug(run_id)}" if run_id is not None else str(seed)


@lru_cache(maxsize=1 << 16)
def partition_files(task: str, seed: int, run_id: str, key: str) -> tuple[str, str]:
    """(task folder, file stem) of a matched run's partition: `<task slug>/<seed>` for the
    run holding the plain key, `<task slug>/<seed>.<suffix>` for a key
    `<task>.seed<N>.<suffix>` (a run-id slug, or an arm's name). Keys are unique, so one
    key, one pair of files: a run never writes another run's files."""
    plain = partition_key(task, seed)
    if key == plain:
        return slug(task), stream_file_stem(seed)
    if key.startswith(plain + "."):
        return slug(task), f"{seed}.{key[len(plain) + 1 :]}"
    return slug(task), stream_file_stem(seed, run_id)


def row_files(row: Mapping[str, Any]) -> tuple[str, str]:
    """`partition_files` of a matched discovered_runs row."""
    return partition_files(row["task"], row["seed"], row["run_id"], row["partition_key"])


def classify_runs(
    runs: Sequence[RunRecord],
    unreadable: Sequence[UnreadableRun],
    rules: DiscoveryRules,
    previous: pl.DataFrame | None = None,
    reserved_keys: Iterable[str] = (),
    base_url: str | None = None,
) -> pl.DataFrame:
    """One `DISCOVERED_RUNS` row per run: matched runs get a partition key; others are
    listed as ignored/unreadable with the reason, never dropped.

    Keys are unique and stable (see `_assign_keys`): `previous` (the last discovered_runs
    table) keeps every run's earlier key; `reserved_keys` (partitions registered before,
    e.g. of runs gone from the source) are never handed to a new run. `url` links each run
    with entity and project to WandB (`wandb_run_url`; `base_url` defaults to
    `$WANDB_BASE_URL`)."""
    if base_url is None:
        base_url = os.environ.get(ENV_WANDB_BASE_URL)
    rows: list[dict[str, Any]] = []
    matched: dict[str, tuple[str, int]] = {}  # run_id -> (task, seed)
    configs: dict[str, tuple[str, dict[str, Any]]] = {}  # run_id -> (name task, config)
    seen_ids: dict[str, str] = {}  # run_id -> location of the first run listed with it
    ordered = sorted(runs, key=lambda r: (r.created_at is None, r.created_at or 0, r.run_id))
    for run in ordered:
        row = _base_row(run, base_url)
        if run.run_id in seen_ids:
            row.update(
                status=RUN_STATUS_IGNORED,
                reason=f"run id {run.run_id!r} is listed twice; the copy at "
                f"{seen_ids[run.run_id]!r} is used",
            )
            rows.append(row)
            continue
        seen_ids[run.run_id] = run.location
        try:
            match = match_run(run, rules)
        except Exception as exc:  # one odd run must not stop the listing of the others
            match = Match(None, None, f"cannot classify: {type(exc).__name__}: {exc}", True)
        if match.task is None or match.seed is None:
            status = RUN_STATUS_UNREADABLE if match.unreadable else RUN_STATUS_IGNORED
            row.update(status=status, reason=match.reason)
        else:
            matched[run.run_id] = (match.task, match.seed)
            configs[run.run_id] = (match.task, run.config)
            row.update(status=RUN_STATUS_MATCHED, seed=match.seed, rule=match.rule)
            row["reason"] = match.reason
        rows.append(row)

    identities = resolve_tasks(configs, rules)
    order = {run.run_id: i for i, run in enumerate(ordered)}
    arms = assign_arms(
        [
            RunSettings(
                run_id=rid,
                task=identities[rid].task,
                settings=_arm_settings(cfg, rules),
                created_order=order[rid],
            )
            for rid, (_, cfg) in configs.items()
        ],
        rules.baselines,
    )
    for row in rows:
        if row["status"] != RUN_STATUS_MATCHED:
            continue
        rid = row["run_id"]
        ident, arm = identities[rid], arms[rid]
        matched[rid] = (ident.task, matched[rid][1])
        row.update(
            task=ident.task,
            recipe=ident.recipe,
            task_source=ident.source,
            arm=arm.arm,
            arm_id=arm.arm_id,
            arm_settings=json.dumps(arm.differences, sort_keys=True, default=str),
            baseline=arm.baseline,
            baseline_reason=arm.baseline_reason,
        )
    arm_of = {rid: (arms[rid].arm_id, arms[rid].arm, arms[rid].baseline) for rid in matched}
    keys = _assign_keys(matched, previous, set(reserved_keys), arm_of)
    holders: dict[str, str] = {}
    claimants: dict[tuple, list[str]] = {}  # (task/seed, arm) -> its runs: duplicates
    for rid, claim in matched.items():
        claimants.setdefault((claim, arm_of[rid][0]), []).append(rid)
    for row in rows:
        if row["status"] != RUN_STATUS_MATCHED:
            continue
        key = keys[row["run_id"]]
        if key in holders:  # only a slug hash collision gets here: never share a key
            row.update(
                status=RUN_STATUS_UNREADABLE,
                task=None,
                seed=None,
                reason=f"partition key {key!r} is already held by run {holders[key]!r}",
            )
            continue
        holders[key] = row["run_id"]
        row["partition_key"] = key
        mine = (matched[row["run_id"]], arm_of[row["run_id"]][0])
        others = sorted(rid for rid in claimants[mine] if rid != row["run_id"])
        if others:
            row["reason"] += f"; duplicate task/arm/seed: also claimed by run(s) {others!r}"

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


def _assign_keys(
    matched: Mapping[str, tuple[str, int]],
    previous: pl.DataFrame | None,
    reserved: set[str],
    arm_of: Mapping[str, tuple[str, str, bool]] | None = None,
) -> dict[str, str]:
    """run_id -> partition key, independent of listing order:

    - a run keeps the key `previous` gave it (same task and seed, a key of its own form
      `<task>.seed<N>[.<suffix>]`, held by no other previous run);
    - otherwise, within its (task, seed), a run that is the only one of its arm gets the
      plain `<task>.seed<N>` if its arm is the baseline (or it is the only run of that
      (task, seed)), `<task>.seed<N>.<arm name slug>` for another arm; provided no earlier
      run had that (task, seed[, arm]) and the key is not reserved;
    - every other run's key is derived from its run id, so a run found later never takes
      over an existing run's key, or its files.

    `arm_of`: run_id -> (arm id, arm name, is baseline); absent = one arm per task.
    """
    arm_of = arm_of or {}
    kept: dict[str, str] = {}
    earlier_groups: set[tuple[str, int]] = set()
    if previous is not None and previous.height:
        prev = previous.filter(
            (pl.col("status") == RUN_STATUS_MATCHED) & pl.col("partition_key").is_not_null()
        )
        reserved |= set(prev["partition_key"].to_list())
        counts = prev.group_by("partition_key").len()
        unique = set(counts.filter(pl.col("len") == 1)["partition_key"].to_list())
        for row in prev.select("run_id", "task", "seed", "partition_key").iter_rows(named=True):
            if row["task"] is None or row["seed"] is None:
                continue
            earlier_groups.add((row["task"], row["seed"]))
            now = matched.get(row["run_id"])
            plain = partition_key(row["task"], row["seed"])
            key = row["partition_key"]
            own_form = key == plain or key.startswith(plain + ".")
            if now == (row["task"], row["seed"]) and key in unique and own_form:
                kept[row["run_id"]] = key
    group_sizes: dict[tuple[str, int], int] = {}
    arm_sizes: dict[tuple[str, int, str], int] = {}
    for run_id, task_seed in matched.items():
        group_sizes[task_seed] = group_sizes.get(task_seed, 0) + 1
        aid = arm_of.get(run_id, ("", "", True))[0]
        arm_sizes[(*task_seed, aid)] = arm_sizes.get((*task_seed, aid), 0) + 1
    keys: dict[str, str] = {}
    for run_id, (task, seed) in matched.items():
        aid, name, is_baseline = arm_of.get(run_id, ("", "", True))
        plain = partition_key(task, seed)
        if run_id in kept:
            keys[run_id] = kept[run_id]
            continue
        alone_in_arm = arm_sizes[(task, seed, aid)] == 1
        if group_sizes[(task, seed)] == 1 or (alone_in_arm and is_baseline):
            wanted = plain
        elif alone_in_arm:
            wanted = f"{plain}.{slug(arm_key_part(name))}"
        else:
            wanted = None
        fresh = (task, seed) not in earlier_groups or wanted != plain
        if wanted is not None and fresh and wanted not in reserved:
            keys[run_id] = wanted
            reserved.add(wanted)
        else:
            keys[run_id] = partition_key(task, seed, run_id)
    return keys


def _base_row(run: RunRecord, base_url: str | None) -> dict[str, Any]:
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
        "url": wandb_run_url(run.entity, run.project, run.run_id, base_url),
        "rule": None,
        "recipe": None,
        "task_source": None,
        "arm": None,
        "arm_id": None,
        "arm_settings": None,
        "baseline": None,
        "baseline_reason": None,
    }
