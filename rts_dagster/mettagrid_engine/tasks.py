"""MettaGrid task families of graded difficulty, built with mettagrid's own config and map
builders (mettagrid 0.26.22; docs/mettagrid_engine.md).

Every family is a one-agent game whose only reward is a heart (reward 1 per episode at
most; the episode ends as soon as every agent made one):
- `reach_5x5`, `reach_9x9`: walk to an altar and bump it (distance grows with the map);
- `maze_9x9`: the same with 14 random interior walls (some layouts block the way);
- `chain_7x7`: a resource chain, bump a mine for ore, then a converter turns ore into a heart.

A label has several task instances (LP entries), one per `max_steps` bucket, as Metta's
recipes bucket missions over `game.max_steps`. Every config declares the same objects and
resources whatever its family places, so all tasks share one observation id map and one
policy reads them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mettagrid.builder import building
from mettagrid.config.game_value import InventoryValue
from mettagrid.config.handler_config import Handler, actorHas, updateActor
from mettagrid.config.mettagrid_config import (
    ActionsConfig,
    AgentConfig,
    ChangeVibeActionConfig,
    GameConfig,
    GridObjectConfig,
    InventoryConfig,
    MettaGridConfig,
    MoveActionConfig,
    NoopActionConfig,
    ResourceLimitsConfig,
)
from mettagrid.config.mutation.stats_mutation import logStatToGame
from mettagrid.config.reward_config import reward
from mettagrid.map_builder.random_map import RandomMapBuilder

METTAGRID_VERSION = "0.26.22"
RESOURCES = ("ore", "heart")
HEART_STAT = "heart.made"  # game stat that ends the episode once every agent made a heart


@dataclass(frozen=True)
class Family:
    """One curriculum label: map size, obstacles, whether hearts need the ore chain, and the
    `max_steps` of each of its task instances."""

    label: str
    size: int
    max_steps: tuple[int, ...]
    walls: int = 0
    chain: bool = False
    description: str = ""

    @property
    def recipe(self) -> str:
        return f"rts.mettagrid.{self.label}"


FAMILIES: dict[str, Family] = {
    family.label: family
    for family in (
        Family("reach_5x5", 5, (10, 12, 14, 16), description="reach an altar, 5x5 map"),
        Family("reach_9x9", 9, (20, 24, 28, 32), description="reach an altar, 9x9 map"),
        Family(
            "maze_9x9", 9, (20, 24, 28, 32), walls=14, description="altar behind 14 random walls"
        ),
        Family(
            "chain_7x7", 7, (26, 30, 34, 38), chain=True, description="mine -> ore -> converter"
        ),
    )
}
DEFAULT_LABELS: tuple[str, ...] = ("reach_5x5", "reach_9x9", "maze_9x9", "chain_7x7")
RECIPE = "rts.mettagrid.curriculum"  # the recipe of a run over several families


@dataclass(frozen=True)
class Task:
    """One task instance (an LP entry): its label, its index in the pool, its config."""

    task_id: int
    label: str
    config: MettaGridConfig


def _heart_mutations() -> list[Any]:
    return [updateActor({"heart": 1}), logStatToGame(HEART_STAT)]


def _objects() -> dict[str, Any]:
    """Every object type any family uses (one id map for all tasks)."""
    return {
        "wall": building.wall,
        "altar": GridObjectConfig(
            name="altar", map_name="altar", on_use_handler=Handler(mutations=_heart_mutations())
        ),
        "mine": GridObjectConfig(
            name="mine",
            map_name="mine",
            on_use_handler=Handler(mutations=[updateActor({"ore": 1})]),
        ),
        "converter": GridObjectConfig(
            name="converter",
            map_name="converter",
            on_use_handler=Handler(
                filters=[actorHas({"ore": 1})],
                mutations=[updateActor({"ore": -1}), *_heart_mutations()],
            ),
        ),
    }


def make_task_config(
    family: Family, max_steps: int, map_seed: int, num_agents: int = 1
) -> MettaGridConfig:
    """The MettaGridConfig of one task instance. `map_seed` is the map builder's base seed
    (mettagrid adds a per-Simulator episode counter, so every episode gets a new layout)."""
    placed: dict[str, int] = {"mine": 1, "converter": 1} if family.chain else {"altar": 1}
    if family.walls:
        placed["wall"] = family.walls
    game = GameConfig(
        num_agents=num_agents,
        max_steps=max_steps,
        resource_names=list(RESOURCES),
        objects=_objects(),
        end_episode_on_game_stats={HEART_STAT: num_agents},
        # change_vibe is on by default and adds ~160 actions: off, so actions = noop + 4 moves
        actions=ActionsConfig(
            noop=NoopActionConfig(),
            move=MoveActionConfig(),
            change_vibe=ChangeVibeActionConfig(enabled=False),
        ),
        agent=AgentConfig(
            rewards={"heart": reward(InventoryValue(item="heart"))},
            inventory=InventoryConfig(
                default_limit=1,
                limits={"heart": ResourceLimitsConfig(base=1, resources=["heart"])},
            ),
        ),
        map_builder=RandomMapBuilder.Config(
            agents=num_agents,
            width=family.size,
            height=family.size,
            objects=placed,
            border_width=1,
            border_object="wall",
            seed=map_seed,
        ),
    )
    return MettaGridConfig(label=family.label, game=game)


def make_pool(labels: tuple[str, ...] | list[str] = DEFAULT_LABELS) -> list[Task]:
    """The task pool: every label's instances (one per max_steps bucket), label-major."""
    unknown = [label for label in labels if label not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown MettaGrid families {unknown}; known: {sorted(FAMILIES)}")
    pool: list[Task] = []
    for i, label in enumerate(labels):
        family = FAMILIES[label]
        for j, max_steps in enumerate(family.max_steps):
            config = make_task_config(family, max_steps, map_seed=1000 * i + 100 * j)
            pool.append(Task(len(pool), label, config))
    return pool


def task_generator(labels: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`training_env.curriculum.task_generator` of a run: the families and their buckets
    (the same for every seed and LP arm of one label set: the task identity)."""
    return {
        "type": "mettagrid",
        "mettagrid": METTAGRID_VERSION,
        "labels": list(labels),
        "families": {
            label: {
                "size": FAMILIES[label].size,
                "walls": FAMILIES[label].walls,
                "chain": FAMILIES[label].chain,
                "max_steps_buckets": list(FAMILIES[label].max_steps),
            }
            for label in labels
        },
    }
