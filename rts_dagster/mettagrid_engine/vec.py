"""In-process vectorised MettaGrid workers, each with its own Simulator, StatsTracker and
Learning Progress state (as every Metta environment worker has its own curriculum).

A worker plays one episode at a time: its LP (`rts_dagster.analysis.lp.LearningProgress`,
one entry per task instance of the pool) draws the task, mettagrid runs it, and at the
episode end the worker feeds LP the score Metta feeds it (the mean over agents of the
episode return), deep-copies the stats tracker's infos (their `per_label_rewards` dict is
the tracker's live, held dict) and starts the next episode.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from mettagrid.envs.stats_tracker import StatsTracker
from mettagrid.simulator import Simulator
from mettagrid.util.dict_utils import unroll_nested_dict
from mettagrid.util.stats_writer import NoopStatsWriter

from rts_dagster.analysis.lp import LearningProgress, LPConfig
from rts_dagster.mettagrid_engine.tasks import Task

# Object types the policy sees, one plane each (the pool's tag names map onto these).
OBJECT_TYPES = ("type:agent", "type:altar", "type:mine", "type:converter", "type:wall")
SCALAR_FEATURES = ("inv:ore", "inv:heart", "episode_completion_pct")
N_ACTIONS = 5  # noop + 4 moves (change_vibe off)
_PAD, _GLOBAL = 0xFF, 0xFE  # token coordinates: padding, global (not a map cell)
# Flattened info keys left out of the epoch means: one entry per agent (Metta logs agent
# means under `agent/`), and wall-clock stamps (not a statistic, and not deterministic).
EXCLUDED_INFO_PREFIXES = ("per_agent/", "attributes/completion_time", "timing_")


@dataclass(frozen=True)
class EpisodeEnd:
    """One finished episode: who played what, the score LP was fed, and the flattened
    episode-end infos of the worker's stats tracker."""

    worker: int
    task_id: int
    label: str
    score: float
    agent_step: int
    steps: int
    info: dict[str, float]
    wall_time: float  # Unix seconds at the episode end (the one non-deterministic field)


def flatten_info(infos: dict[str, Any]) -> dict[str, float]:
    """Episode-end infos as Metta's trainer sees them: nested keys joined with '/', numeric
    values as floats, per-agent and wall-clock entries left out (EXCLUDED_INFO_PREFIXES)."""
    flat: dict[str, float] = {}
    for key, value in unroll_nested_dict(infos):
        if key.startswith(EXCLUDED_INFO_PREFIXES) or isinstance(value, bool | str):
            continue
        if isinstance(value, int | float | np.integer | np.floating):
            flat[key] = float(value)
    return flat


class ObservationEncoder:
    """Token observations (N, tokens, 3) -> (N, features) float32: one 13x13 one-hot plane
    per object type in the agent's egocentric view, plus ore, heart and episode progress."""

    def __init__(self, task: Task) -> None:
        game = task.config.game
        id_map = game.id_map()
        features = {feature.name: feature.id for feature in id_map.features()}
        self.height, self.width = game.obs.height, game.obs.width
        self.tag_feature = features["tag"]
        self.type_plane = np.zeros(256, dtype=np.int64)
        for value, name in enumerate(id_map.tag_names()):
            self.type_plane[value] = OBJECT_TYPES.index(name)
        self.scalar_ids = np.array([features[name] for name in SCALAR_FEATURES])
        self.scalar_scale = np.array([1.0, 1.0, 255.0], dtype=np.float32)
        self.signature = (tuple(id_map.tag_names()), tuple(sorted(features.items())))
        self.size = len(OBJECT_TYPES) * self.height * self.width + len(SCALAR_FEATURES)

    def check(self, task: Task) -> None:
        """Refuse a task whose id map differs (its tokens would mean something else)."""
        id_map = task.config.game.id_map()
        features = {feature.name: feature.id for feature in id_map.features()}
        if (tuple(id_map.tag_names()), tuple(sorted(features.items()))) != self.signature:
            raise ValueError(f"task {task.task_id} ({task.label}) has a different id map")

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        n = tokens.shape[0]
        coord, feature, value = tokens[..., 0], tokens[..., 1], tokens[..., 2]
        on_map = (coord != _PAD) & (coord != _GLOBAL)
        planes = np.zeros((n, len(OBJECT_TYPES), self.height, self.width), dtype=np.float32)
        row, tok = np.nonzero(on_map & (feature == self.tag_feature))
        c = coord[row, tok].astype(np.int64)
        planes[row, self.type_plane[value[row, tok]], c >> 4, c & 15] = 1.0
        scalars = np.zeros((n, len(SCALAR_FEATURES)), dtype=np.float32)
        hit = feature[..., None] == self.scalar_ids  # (n, tokens, scalars)
        row, tok, which = np.nonzero(hit & (coord != _PAD)[..., None])
        scalars[row, which] = value[row, tok] / self.scalar_scale[which]
        return np.concatenate([planes.reshape(n, -1), scalars], axis=1)


class Worker:
    """One environment worker: a Simulator with a StatsTracker, and its own LP over the pool."""

    def __init__(self, pool: list[Task], seed: int, worker: int, lp_config: LPConfig) -> None:
        self.pool, self.seed, self.worker = pool, int(seed), int(worker)
        self.rng = np.random.default_rng([self.seed, self.worker])
        self.lp = LearningProgress(len(pool), lp_config)
        self.simulator = Simulator()
        self.simulator.add_event_handler(StatsTracker(NoopStatsWriter()))
        self.episodes = 0
        self.sim: Any = None
        self.task: Task = pool[0]
        self._start()

    def _start(self) -> None:
        self.task = self.pool[int(self.rng.choice(len(self.pool), p=self.lp.probabilities()))]
        episode_seed = (self.seed * 1_000_003 + self.worker * 10_007 + self.episodes) % 2**31
        self.sim = self.simulator.new_simulation(self.task.config, seed=episode_seed)
        self.episodes += 1

    @property
    def num_agents(self) -> int:
        return int(self.task.config.game.num_agents)

    def observations(self) -> np.ndarray:
        return self.sim._c_sim.observations()

    def step(self, actions: np.ndarray, agent_step: int) -> tuple[np.ndarray, EpisodeEnd | None]:
        """Step with one action per agent; at an episode end, feed LP, keep the infos and
        start the next episode. Returns (rewards of this step, the episode end or None)."""
        sim = self.sim
        sim._c_sim.actions()[:] = actions
        sim.step()
        rewards = np.array(sim._c_sim.rewards(), dtype=np.float32)
        if not sim.is_done():
            return rewards, None
        infos = copy.deepcopy(sim._context["infos"])  # per_label_rewards is the live dict
        score = float(np.mean(sim.episode_rewards))
        end = EpisodeEnd(
            worker=self.worker,
            task_id=self.task.task_id,
            label=self.task.label,
            score=score,
            agent_step=int(agent_step),
            steps=int(sim.current_step),
            info=flatten_info(infos),
            wall_time=time.time(),
        )
        self.lp.update(self.task.task_id, score)
        sim.close()
        self._start()
        return rewards, end

    def close(self) -> None:
        if self.sim is not None:
            self.sim.close()
            self.sim = None


class VecEnv:
    """`n_workers` workers stepped in lockstep in this process; agents are rows."""

    def __init__(
        self, pool: list[Task], seed: int, n_workers: int, lp_config: LPConfig | None = None
    ) -> None:
        if n_workers < 1:
            raise ValueError("n_workers must be >= 1")
        self.pool = pool
        self.encoder = ObservationEncoder(pool[0])
        for task in pool:
            self.encoder.check(task)
        if len({task.config.game.num_agents for task in pool}) != 1:
            raise ValueError("every task of the pool must have the same number of agents")
        self.lp_config = lp_config or LPConfig()
        self.workers = [Worker(pool, seed, w, self.lp_config) for w in range(n_workers)]
        self.agents_per_worker = self.workers[0].num_agents
        self.n_agents = n_workers * self.agents_per_worker
        self.agent_step = 0

    def observations(self) -> np.ndarray:
        return self.encoder(np.concatenate([w.observations() for w in self.workers]))

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[EpisodeEnd]]:
        """One step of every worker. Returns (next observations, rewards, done per agent,
        the episode ends in worker order). A completion's agent_step is the trainer's count
        up to and including its worker's agents in this step (unique and ordered)."""
        actions = np.asarray(actions, dtype=np.int32).reshape(len(self.workers), -1)
        rewards = np.zeros(self.n_agents, dtype=np.float32)
        dones = np.zeros(self.n_agents, dtype=bool)
        ends: list[EpisodeEnd] = []
        k = self.agents_per_worker
        for w, worker in enumerate(self.workers):
            step_count = self.agent_step + (w + 1) * k
            rewards[w * k : (w + 1) * k], end = worker.step(actions[w], step_count)
            if end is not None:
                dones[w * k : (w + 1) * k] = True
                ends.append(end)
        self.agent_step += self.n_agents
        return self.observations(), rewards, dones, ends

    def curriculum_stats(self) -> dict[str, float]:
        """Curriculum stats averaged over the workers' LP states (Metta's key suffixes)."""
        scores = [w.lp.scores() for w in self.workers]
        recent = [w.lp.recent_means() for w in self.workers]
        stats = {
            "algorithm/lp/mean_learning_progress": float(np.mean([s.mean() for s in scores])),
            "num_evicted": 0.0,  # no eviction: the pool is every task instance
        }
        seen = [r[~np.isnan(r)] for r in recent]
        if any(r.size for r in seen):
            stats["algorithm/tracker/mean_recent_score"] = float(
                np.mean([r.mean() for r in seen if r.size])
            )
        return stats

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
