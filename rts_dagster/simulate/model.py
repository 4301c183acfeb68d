"""A small closed-loop learner driven by an LP curriculum (pure numpy).

Each label has a latent competence c in [0, 1] that grows with practice along a logistic
curve; an episode of that label scores max(0, c + noise) (or 0 on a rare failed episode).
LP (rts_dagster.analysis.lp: Metta main's by default, or an `LPArm`'s variant) picks the
label of every episode and is updated with every reward, so what gets practised depends on
what LP saw: a closed loop. Training is cut into epochs of a fixed number of agent steps.
Every completion is one episode end in one of `n_envs` environments; each epoch yields
Metta's per-label epoch values as its stats trackers form them (the last reward per label
held by each environment, averaged over all episode ends of the epoch:
`analysis.epoch_model.held_value_epoch_means`), SPS and curriculum stats.

Everything is a deterministic function of (task, seed, curriculum). Label parameters
depend on (task, label) only, so all seeds of a task share them; a seed changes
learning-speed multipliers, the initial competence and every random draw. No random draw
depends on the curriculum: two LP arms on one seed meet the same learner, SPS trace,
episode counts, uniform draws, reward noise and environments, and differ only by what their
LP made the learner practise (so arms pair by seed). Details and limits: docs/simulator.md.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from rts_dagster.analysis.epoch_model import held_value_epoch_means
from rts_dagster.analysis.lp import LPConfig, ZScoreLPConfig
from rts_dagster.analysis.lp_replay import CurriculumConfig, StepwiseCurriculum

DEFAULT_EPOCHS = 300
STEPS_PER_EPOCH = 65_536 * 4  # agent steps per epoch (a Metta-sized batch)
# Environments per run: Metta rolls out num_envs x agents x bptt_horizon agent steps per
# epoch, so 262 144 / (4 agents x 64 steps) = 1024; with ~1000-step episodes each one then
# ends an episode every ~16 epochs, i.e. ~64 completions per epoch (docs/simulator.md).
DEFAULT_N_ENVS = 1024
T0 = 1_763_596_800.0  # 2025-11-20T00:00:00Z: simulated wall clock origin

_FIXED_MAPS_MISSIONS = (
    "training_facility.extractor_hub_30",
    "training_facility.extractor_hub_50",
    "training_facility.extractor_hub_70",
    "training_facility.collect_resources_classic",
    "training_facility.collect_resources_spread",
    "training_facility.collect_far",
    "hello_world.oxygen_bottleneck",
    "hello_world.energy_starved",
    "hello_world.divide_and_conquer",
    "hello_world.go_together",
)
_VARIANT_MISSIONS = (
    "extractor_hub_30",
    "collect_resources_classic",
    "oxygen_bottleneck",
    "go_together",
)
_VARIANTS = ("lonely_heart", "pack_rat", "energized", "rough_terrain", "dark_side", "heart_chorus")


@dataclass(frozen=True)
class TaskSpec:
    """One simulated recipe: its labels, LP config and throughput."""

    name: str
    recipe: str
    labels: tuple[str, ...]
    lp: LPConfig = field(default_factory=LPConfig)
    num_active_tasks: int = 64
    completions_per_epoch: float = 64.0  # Poisson mean
    steps_per_epoch: int = STEPS_PER_EPOCH
    base_sps: float = 45_000.0
    n_buckets: int = 4  # task instances per label (e.g. max_steps buckets) -> task_id
    n_envs: int = DEFAULT_N_ENVS  # environments, each with its own stats tracker


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="fixed_maps",
            recipe="recipes.prod.cvc.fixed_maps.train",
            labels=_FIXED_MAPS_MISSIONS,
            num_active_tasks=1500,
            base_sps=42_000.0,
        ),
        TaskSpec(
            name="assembly_lines",
            recipe="recipes.experiment.assembly_lines.train",
            labels=("tiny_1chain_0sinks_dense", "tiny_2chain_1sinks_dense"),
            completions_per_epoch=80.0,
            base_sps=60_000.0,
        ),
        TaskSpec(
            name="variants_curriculum",
            recipe="recipes.experiment.cvc.variants_curriculum.train",
            labels=tuple(f"{m}_{v}" for m in _VARIANT_MISSIONS for v in _VARIANTS),
            # A non-default LP setting, so that readers of the run config see one.
            lp=LPConfig(ema_timescale=0.01),
            num_active_tasks=1500,
            completions_per_epoch=48.0,  # ~2 per label: many labels missing from an epoch
            base_sps=38_000.0,
        ),
    )
}


# Settings both LP variants have, with one meaning: an arm keeps the task's baseline values.
SHARED_LP_KEYS = (
    "ema_timescale",
    "slow_timescale_factor",
    "exploration_bonus",
    "progress_smoothing",
)
_ARM_TAG = re.compile(r"[a-z0-9_]+")


def baseline_curriculum(spec: TaskSpec) -> CurriculumConfig:
    """The curriculum a task runs by default: Metta main's LP with the task's LP config."""
    return CurriculumConfig(name="task_default", main=spec.lp)


@dataclass(frozen=True)
class LPArm:
    """One LP experiment on a task: its runs use `variant` with `overrides`, and every
    shared setting (SHARED_LP_KEYS) not overridden keeps the task's baseline value, so the
    arm differs from the baseline only where its LP settings do. `tag` goes into the run
    name (`<user>.<task>.<tag>.seed<N>`)."""

    task: str
    tag: str
    variant: Literal["main", "zscore"] = "main"
    overrides: tuple[tuple[str, float | int | bool], ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {sorted(TASKS)}")
        if not _ARM_TAG.fullmatch(self.tag) or re.fullmatch(r"seed-?\d+", self.tag):
            raise ValueError(f"arm tag {self.tag!r} must match [a-z0-9_]+ and not be seed<N>")
        fields = (LPConfig if self.variant == "main" else ZScoreLPConfig).model_fields
        unknown = sorted(key for key, _ in self.overrides if key not in fields)
        if unknown:  # ZScoreLPConfig ignores extra keys: a typo would go unnoticed
            raise ValueError(f"{self.tag}: no {self.variant} LP setting named {unknown}")

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    def curriculum(self) -> CurriculumConfig:
        """The validated curriculum this arm runs (named after its tag)."""
        base = self.spec.lp
        settings = dict(self.overrides)
        if self.variant == "main":
            main = LPConfig.model_validate({**base.model_dump(), **settings})
            return CurriculumConfig(name=self.tag, main=main)
        shared = {key: getattr(base, key) for key in SHARED_LP_KEYS}
        zscore = ZScoreLPConfig.model_validate({**shared, **settings})
        return CurriculumConfig(name=self.tag, variant="zscore", zscore=zscore)


# The demo's A/B experiment: fixed_maps under the z-score variant with Z = 30 (the top of
# the study plan's sweep 10/20/30), beside the baseline runs of the same seeds.
DEFAULT_ARMS: tuple[LPArm, ...] = (
    LPArm("fixed_maps", "z30", "zscore", (("z_score_amplification", 30.0),)),
)


@dataclass(frozen=True)
class LabelParams:
    """Ground-truth learner parameters, one array entry per label.

    competence(n) = floor + (ceiling - floor) * g(n), g a logistic in the effective
    practice n (episodes of that label) rescaled so that g(0) = 0, g(inf) = 1, with
    midpoint `half_practice` and scale `width`.
    """

    floor: np.ndarray  # competence before any practice
    ceiling: np.ndarray  # asymptotic competence
    half_practice: np.ndarray  # effective episodes to reach the logistic midpoint
    width: np.ndarray  # logistic scale in episodes
    noise: np.ndarray  # sd of the per-episode reward noise
    failure_rate: np.ndarray  # chance an episode scores exactly 0
    forgetting: np.ndarray  # fraction of practice lost per epoch without that label
    transfer: np.ndarray  # practice credited to every label per completion, / n_labels


@dataclass(frozen=True)
class SimulatedRun:
    """Everything one simulated run produced. Shapes: n completions, E epochs, L labels."""

    task: TaskSpec
    seed: int
    labels: tuple[str, ...]
    params: LabelParams  # this seed's realised parameters
    curriculum: CurriculumConfig  # the LP configuration the run was driven by
    # per completion, in completion order
    label_index: np.ndarray  # (n,) int64
    reward: np.ndarray  # (n,) float64, what LP was fed
    competence: np.ndarray  # (n,) latent mean reward of that episode (ground truth)
    agent_step: np.ndarray  # (n,) int64, in (epoch * S, (epoch + 1) * S]
    epoch: np.ndarray  # (n,) int64, 0-based epoch during which the episode finished
    task_id: np.ndarray  # (n,) int64, label_index * n_buckets + bucket
    env_id: np.ndarray  # (n,) int64 in [0, n_envs): the environment whose episode ended
    wall_time: np.ndarray  # (n,) float64, simulated Unix seconds
    probabilities: np.ndarray  # (n, L) LP distribution the label was drawn from
    fast: np.ndarray  # (n, L) LP fast EMA F after the update with this completion
    slow: np.ndarray  # (n, L) LP slow EMA S after the update
    # per epoch
    epoch_agent_step: np.ndarray  # (E,) agent_step at the end of the epoch (log step)
    epoch_wall_time: np.ndarray  # (E,) simulated Unix seconds at the end of the epoch
    sps: np.ndarray  # (E,) agent steps per second over the epoch
    epoch_completions: np.ndarray  # (E,) completions in the epoch
    label_means: np.ndarray  # (E, L) logged per-label value (held-value mean), NaN if not logged
    label_fresh: np.ndarray  # (E, L) bool, label completed in that epoch
    reward_mean: np.ndarray  # (E,) mean episode reward of the epoch (NaN if none)
    mean_learning_progress: np.ndarray  # (E,) mean LP score over labels at epoch end
    mean_recent_score: np.ndarray  # (E,) tracker: mean over seen labels of recent scores
    num_evicted: np.ndarray  # (E,) always 0: labels are never evicted here
    epoch_competence: np.ndarray  # (E, L) latent competence at the end of the epoch

    @property
    def n_epochs(self) -> int:
        return int(self.epoch_agent_step.size)

    @property
    def epoch_bounds(self) -> np.ndarray:
        """(E + 1,) completion offsets: epoch e is completions [b[e], b[e+1])."""
        return np.concatenate([[0], np.cumsum(self.epoch_completions)])


def stable_hash(text: str) -> int:
    """64-bit hash that, unlike hash(), is the same in every process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def label_params(task: TaskSpec) -> LabelParams:
    """Parameters of each label: a deterministic function of (task name, label).

    Practice needs are scaled by the expected completions per label over a default-length
    run, so that every task shows learning curves within DEFAULT_EPOCHS whatever its label
    count (a shorter run just sees the start of the curves).
    """
    practice = task.completions_per_epoch * DEFAULT_EPOCHS / len(task.labels)
    rows = []
    for label in task.labels:
        rng = np.random.default_rng(stable_hash(f"{task.name}/{label}"))
        half = practice * math.exp(rng.uniform(math.log(0.08), math.log(0.6)))
        rows.append(
            (
                rng.uniform(0.0, 0.15),  # floor
                rng.uniform(0.4, 0.85),  # ceiling
                half,
                half * rng.uniform(0.2, 0.5),  # width
                rng.uniform(0.05, 0.25),  # noise
                rng.uniform(0.0, 0.06),  # failure_rate
                rng.uniform(0.0, 0.01),  # forgetting
                rng.uniform(0.0, 0.3),  # transfer
            )
        )
    columns = np.array(rows, dtype=np.float64).T
    return LabelParams(*columns)


def _seed_params(base: LabelParams, rng: np.random.Generator) -> LabelParams:
    """A seed's version: learning-speed multipliers and initial-competence jitter."""
    n = base.floor.size
    speed = math.exp(rng.normal(0.0, 0.15)) * np.exp(rng.normal(0.0, 0.15, n))
    floor = np.clip(base.floor + rng.normal(0.0, 0.02, n), 0.0, None)
    return LabelParams(
        floor=floor,
        ceiling=np.maximum(base.ceiling, floor),
        half_practice=base.half_practice / speed,
        width=base.width / speed,
        noise=base.noise,
        failure_rate=base.failure_rate,
        forgetting=base.forgetting,
        transfer=base.transfer,
    )


def competence(params: LabelParams, practice: np.ndarray) -> np.ndarray:
    """Latent competence per label for effective practice `practice` (vectorised)."""
    g0 = 1.0 / (1.0 + np.exp(params.half_practice / params.width))
    g = 1.0 / (1.0 + np.exp(-(practice - params.half_practice) / params.width))
    return params.floor + (params.ceiling - params.floor) * (g - g0) / (1.0 - g0)


def _sps_trace(base: float, epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Epoch SPS: jitter around `base`, a slow first epoch, occasional multi-epoch dips."""
    factor = np.exp(rng.normal(0.0, 0.04, epochs))
    factor[0] *= 0.6  # warm-up: compilation, env start-up
    starts = rng.random(epochs) < 0.015
    lengths = 1 + np.minimum(rng.geometric(0.4, epochs) - 1, 7)
    depths = rng.uniform(0.3, 0.7, epochs)
    for e in np.flatnonzero(starts):  # few dips: checkpoint, evaluation, preemption
        factor[e : e + lengths[e]] *= depths[e]
    return base * factor


def recent_score_means(
    label_index: np.ndarray,
    reward: np.ndarray,
    epoch_bounds: np.ndarray,
    n_labels: int,
    memory: int,
) -> np.ndarray:
    """The curriculum tracker's mean recent score at each epoch end: the mean, over the
    labels seen so far, of the mean of each label's last `memory` scores clipped to [0, 1]
    (NaN before any completion); what main LP's outcome memory holds. The tracker is not
    part of an LP variant, so every arm logs it, computed the same way.

    Vectorised: one cumulative sum over the scores sorted by label (stable), read at each
    label's start plus its completion count at each epoch end, and `memory` before that."""
    labels = np.asarray(label_index, dtype=np.int64)
    clipped = np.clip(np.asarray(reward, dtype=np.float64), 0.0, 1.0)
    order = np.argsort(labels, kind="stable")
    cumulative = np.concatenate([[0.0], np.cumsum(clipped[order])])
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=n_labels))[:-1]])
    # Completions per label at each epoch end: cumulative counts over epochs.
    bounds = np.asarray(epoch_bounds, dtype=np.int64)
    epoch_of = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))
    n_epochs = bounds.size - 1
    per_epoch = np.bincount(epoch_of * n_labels + labels, minlength=n_epochs * n_labels)
    counts = np.cumsum(per_epoch.reshape(n_epochs, n_labels), axis=0)
    held = np.minimum(counts, memory)
    sums = cumulative[starts + counts] - cumulative[starts + counts - held]
    seen = held > 0
    totals = np.where(seen, sums / np.maximum(held, 1), 0.0).sum(axis=1)
    n_seen = seen.sum(axis=1)
    return np.where(n_seen > 0, totals / np.maximum(n_seen, 1), np.nan)


def simulate(
    task: str | TaskSpec,
    seed: int,
    epochs: int | None = None,
    curriculum: CurriculumConfig | None = None,
) -> SimulatedRun:
    """Run the closed loop for `epochs` epochs (default DEFAULT_EPOCHS) under `curriculum`
    (default `baseline_curriculum`: Metta main LP with the task's LP config; an arm's is
    `LPArm.curriculum()`). The learner, SPS and every random draw depend on (task, seed)
    only, so two curricula on one seed differ only by what they made the learner
    practise."""
    spec = TASKS[task] if isinstance(task, str) else task
    n_epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    if n_epochs < 1:
        raise ValueError("epochs must be >= 1")
    if spec.n_envs < 1:
        raise ValueError("n_envs must be >= 1")
    n_labels = len(spec.labels)
    steps = spec.steps_per_epoch
    seq = np.random.SeedSequence([stable_hash(spec.name), int(seed)])
    # A fourth child for the environments: the first three (and every draw) are unchanged.
    param_rng, sps_rng, episode_rng, env_rng = (np.random.default_rng(s) for s in seq.spawn(4))
    params = _seed_params(label_params(spec), param_rng)

    sps = _sps_trace(spec.base_sps, n_epochs, sps_rng)
    epoch_end_time = T0 + np.cumsum(steps / sps)
    epoch_start_time = np.concatenate([[T0], epoch_end_time[:-1]])
    counts = episode_rng.poisson(spec.completions_per_epoch, n_epochs)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    total = int(bounds[-1])

    label_index = np.empty(total, dtype=np.int64)
    reward = np.empty(total)
    latent = np.empty(total)
    probabilities = np.empty((total, n_labels))
    fast = np.empty((total, n_labels))
    slow = np.empty((total, n_labels))
    mean_lp = np.empty(n_epochs)
    epoch_competence = np.empty((n_epochs, n_labels))

    config = curriculum or baseline_curriculum(spec)
    lp = StepwiseCurriculum(config, n_labels)
    expected_total = max(spec.completions_per_epoch * n_epochs, 1.0)  # for an annealed Z
    practice = np.zeros(n_labels)
    # Python lists for the per-completion loop: scalar numpy indexing is several times
    # slower than list indexing, and this loop is the simulator's only sequential part.
    floor = params.floor.tolist()
    span = (params.ceiling - params.floor).tolist()
    half = params.half_practice.tolist()
    width = params.width.tolist()
    g0 = (1.0 / (1.0 + np.exp(params.half_practice / params.width))).tolist()
    noise = params.noise.tolist()
    failure = params.failure_rate.tolist()
    last = n_labels - 1

    for e in range(n_epochs):
        lo, hi = int(bounds[e]), int(bounds[e + 1])
        n = hi - lo
        draws = episode_rng.random(n).tolist()
        shocks = episode_rng.standard_normal(n).tolist()
        fails = episode_rng.random(n).tolist()
        practised = practice.tolist()
        epoch_sps = float(sps[e])
        for k in range(n):
            j = lo + k
            p = lp.probabilities(min(j / expected_total, 1.0))
            probabilities[j] = p
            i = min(int(np.searchsorted(np.cumsum(p), draws[k], side="right")), last)
            g = 1.0 / (1.0 + math.exp(-(practised[i] - half[i]) / width[i]))
            c = floor[i] + span[i] * (g - g0[i]) / (1.0 - g0[i])
            r = 0.0 if fails[k] < failure[i] else max(0.0, c + noise[i] * shocks[k])
            lp.update(i, r, epoch_sps)
            practised[i] += 1.0
            label_index[j] = i
            reward[j] = r
            latent[j] = c
            fast[j] = lp.F
            slow[j] = lp.S
        # Per-epoch practice bookkeeping: transfer to every label, forgetting where idle.
        per_label = np.bincount(label_index[lo:hi], minlength=n_labels)
        practice = np.asarray(practised) + params.transfer * n / n_labels
        practice = np.where(per_label == 0, practice * (1.0 - params.forgetting), practice)
        epoch_competence[e] = competence(params, practice)
        mean_lp[e] = lp.scores().mean()

    epoch = np.repeat(np.arange(n_epochs), counts)
    # Agent-step offsets inside the epoch, ascending within each epoch (epoch is sorted).
    offsets = episode_rng.integers(1, steps + 1, total)
    offsets = offsets[np.lexsort((offsets, epoch))]
    buckets = episode_rng.integers(0, spec.n_buckets, total)
    fraction = offsets / steps
    wall_time = epoch_start_time[epoch] + fraction * (epoch_end_time - epoch_start_time)[epoch]
    sums = np.bincount(epoch, weights=reward, minlength=n_epochs)
    with np.errstate(invalid="ignore", divide="ignore"):
        reward_mean = np.where(counts > 0, sums / counts, np.nan)
    fresh = np.zeros((n_epochs, n_labels), dtype=bool)
    fresh[epoch, label_index] = True
    # Episode ends interleave across environments (episode lengths vary, starts are
    # desynchronised): each completion ends an episode in a uniformly drawn environment.
    env_id = env_rng.integers(0, spec.n_envs, total)
    label_means = held_value_epoch_means(epoch, env_id, label_index, reward, n_epochs, n_labels)
    # The tracker's window is the task's (its baseline LP memory), whatever the arm.
    mean_recent = recent_score_means(label_index, reward, bounds, n_labels, spec.lp.memory)

    return SimulatedRun(
        task=spec,
        seed=int(seed),
        labels=spec.labels,
        params=params,
        curriculum=config,
        label_index=label_index,
        reward=reward,
        competence=latent,
        agent_step=epoch * steps + offsets,
        epoch=epoch,
        task_id=label_index * spec.n_buckets + buckets,
        env_id=env_id,
        wall_time=wall_time,
        probabilities=probabilities,
        fast=fast,
        slow=slow,
        epoch_agent_step=(np.arange(n_epochs, dtype=np.int64) + 1) * steps,
        epoch_wall_time=epoch_end_time,
        sps=sps,
        epoch_completions=counts,
        label_means=label_means,
        label_fresh=fresh,
        reward_mean=reward_mean,
        mean_learning_progress=mean_lp,
        mean_recent_score=mean_recent,
        num_evicted=np.zeros(n_epochs, dtype=np.int64),
        epoch_competence=epoch_competence,
    )
