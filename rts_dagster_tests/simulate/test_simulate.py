"""The closed-loop simulator and the offline wandb writer."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from rts_dagster.analysis.lp import LearningProgress, ZScoreLearningProgress, ZScoreLPConfig
from rts_dagster.recorder import list_chunks, read_reward_stream
from rts_dagster.simulate.model import (
    DEFAULT_ARMS,
    DEFAULT_EPOCHS,
    TASKS,
    LPArm,
    SimulatedRun,
    label_params,
    recent_score_means,
    simulate,
)
from rts_dagster.simulate.writer import (
    KEY_EVICTED,
    KEY_MEAN_LP,
    KEY_RECENT_SCORE,
    LABEL_PREFIX,
    epoch_rows,
    run_config,
    run_id,
    simulate_default,
    simulate_run,
)

SHORT = 40  # epochs: ~2-3k completions, a fraction of a second


@pytest.fixture(scope="module")
def full_fixed_maps() -> SimulatedRun:
    return simulate("fixed_maps", 1)


@pytest.fixture(scope="module")
def full_variants() -> SimulatedRun:
    return simulate("variants_curriculum", 1)


@pytest.fixture(scope="module")
def short_variants() -> SimulatedRun:
    return simulate("variants_curriculum", 2, epochs=SHORT)


def _arrays(run: SimulatedRun) -> dict[str, np.ndarray]:
    return {
        f.name: getattr(run, f.name)
        for f in dataclasses.fields(run)
        if isinstance(getattr(run, f.name), np.ndarray)
    }


def test_same_seed_same_run_different_seed_differs() -> None:
    a = simulate("assembly_lines", 1, epochs=SHORT)
    b = simulate("assembly_lines", 1, epochs=SHORT)
    c = simulate("assembly_lines", 2, epochs=SHORT)
    for name, array in _arrays(a).items():
        np.testing.assert_array_equal(array, _arrays(b)[name], err_msg=name)
    assert not np.array_equal(a.reward[:100], c.reward[:100])
    assert not np.array_equal(a.sps, c.sps)
    # Label parameters are shared by the seeds of a task; seeds change speed and start.
    np.testing.assert_array_equal(a.params.noise, c.params.noise)
    assert not np.array_equal(a.params.half_practice, c.params.half_practice)
    base = label_params(TASKS["assembly_lines"])
    np.testing.assert_array_equal(base.ceiling, label_params(TASKS["assembly_lines"]).ceiling)


def test_labels_per_task() -> None:
    fixed = TASKS["fixed_maps"].labels
    assert len(fixed) == 10 and all(re.fullmatch(r"[a-z_]+\.[a-z_0-9]+", x) for x in fixed)
    assert "training_facility.extractor_hub_30" in fixed
    lines = TASKS["assembly_lines"].labels
    assert len(lines) == 2
    assert all(re.fullmatch(r"[a-z]+_\d+chain_\d+sinks_[a-z]+", x) for x in lines)
    variants = TASKS["variants_curriculum"].labels
    assert len(variants) >= 8 and len(set(variants)) == len(variants)
    assert TASKS["variants_curriculum"].lp.ema_timescale != TASKS["fixed_maps"].lp.ema_timescale


def test_shapes_and_ranges(short_variants: SimulatedRun) -> None:
    run = short_variants
    n, n_labels, n_epochs = run.reward.size, len(run.labels), SHORT
    assert run.probabilities.shape == run.fast.shape == (n, n_labels)
    assert run.label_means.shape == run.label_fresh.shape == (n_epochs, n_labels)
    assert run.epoch_bounds[-1] == n and run.epoch_completions.sum() == n
    assert np.all(run.reward >= 0) and np.mean(run.reward <= 1) > 0.9
    np.testing.assert_allclose(run.probabilities.sum(axis=1), 1.0)
    assert np.all(run.probabilities >= 0)
    # Completions sit inside their epoch's agent-step window, in order.
    steps = run.task.steps_per_epoch
    assert np.all(run.agent_step > run.epoch * steps)
    assert np.all(run.agent_step <= (run.epoch + 1) * steps)
    assert np.all(np.diff(run.agent_step) >= 0) and np.all(np.diff(run.wall_time) >= 0)
    np.testing.assert_array_equal(run.epoch_agent_step, np.arange(1, n_epochs + 1) * steps)
    assert np.all(run.task_id // run.task.n_buckets == run.label_index)
    assert run.env_id.shape == (n,) and run.env_id.dtype == np.int64
    assert np.all(run.num_evicted == 0) and np.all(run.sps > 0)


def _stats_tracker_reference(run: SimulatedRun) -> np.ndarray:
    """Metta's logging path, step by step: each environment keeps a dict of the last
    reward per label; every episode end appends that whole dict to the epoch's infos; the
    epoch value of a label is the mean of all its appended values."""
    held: dict[int, dict[int, float]] = {}
    out = np.full((run.n_epochs, len(run.labels)), np.nan)
    infos: dict[int, list[float]] = {}
    current = 0
    for j in range(run.reward.size):
        e = int(run.epoch[j])
        if e != current:
            for label, values in infos.items():
                out[current, label] = sum(values) / len(values)
            infos, current = {}, e
        tracker = held.setdefault(int(run.env_id[j]), {})
        tracker[int(run.label_index[j])] = float(run.reward[j])
        for label, value in tracker.items():
            infos.setdefault(label, []).append(value)
    for label, values in infos.items():
        out[current, label] = sum(values) / len(values)
    return out


@pytest.mark.parametrize(
    ("task", "n_envs", "seed"),
    [("variants_curriculum", None, 2), ("fixed_maps", 16, 1), ("assembly_lines", 3, 4)],
)
def test_epoch_means_follow_the_stats_tracker(task: str, n_envs: int | None, seed: int) -> None:
    spec = TASKS[task] if n_envs is None else dataclasses.replace(TASKS[task], n_envs=n_envs)
    run = simulate(spec, seed, epochs=25)
    assert run.env_id.min() >= 0 and run.env_id.max() < spec.n_envs
    expected = _stats_tracker_reference(run)
    np.testing.assert_array_equal(np.isnan(run.label_means), np.isnan(expected))
    np.testing.assert_allclose(run.label_means, expected, rtol=1e-12, atol=0)
    # label_fresh: the label was completed in that epoch (not: the value is fresh)
    fresh = np.zeros_like(run.label_fresh)
    for e, label in zip(run.epoch, run.label_index, strict=True):
        fresh[e, label] = True
    np.testing.assert_array_equal(run.label_fresh, fresh)


def test_env_assignment_is_seeded_and_leaves_the_stream_unchanged() -> None:
    few = dataclasses.replace(TASKS["fixed_maps"], n_envs=4)
    a, b = simulate(few, 1, epochs=SHORT), simulate(few, 1, epochs=SHORT)
    default = simulate("fixed_maps", 1, epochs=SHORT)
    np.testing.assert_array_equal(a.env_id, b.env_id)
    assert not np.array_equal(simulate(few, 2, epochs=SHORT).env_id[:50], a.env_id[:50])
    # The number of environments changes only the logged epoch values.
    np.testing.assert_array_equal(a.reward, default.reward)
    np.testing.assert_array_equal(a.wall_time, default.wall_time)
    assert not np.allclose(a.label_means[5:], default.label_means[5:], equal_nan=True)
    # 4 environments x ~64 completions: each holds every label after epoch 1 or so.
    assert np.all(np.isfinite(a.label_means[3:]))
    with pytest.raises(ValueError, match="n_envs"):
        simulate(dataclasses.replace(few, n_envs=0), 1, epochs=2)


def _repeat_fraction(means: np.ndarray) -> float:
    both = np.isfinite(means[1:]) & np.isfinite(means[:-1])
    return float(np.sum((means[1:] == means[:-1]) & both) / both.sum())


def test_exact_repeats_are_rare_on_the_default_tasks(
    full_fixed_maps: SimulatedRun, full_variants: SimulatedRun
) -> None:
    # Measured (seed 1, 300 epochs): 0 for fixed_maps, 0.06 % for variants_curriculum
    # (early epochs where one environment, or two holding a failed episode's 0, report the
    # label); the old "repeat when not completed" rule gave 1.4 % and 17 %.
    assert _repeat_fraction(full_fixed_maps.label_means) < 0.001
    assert _repeat_fraction(full_variants.label_means) < 0.005
    not_completed = ~full_variants.label_fresh & np.isfinite(full_variants.label_means)
    assert not_completed.mean() > 0.1  # labels often miss an epoch, yet are rarely repeated
    # Smoothing: epoch-to-epoch noise far below the per-completion noise.
    late = full_fixed_maps.label_means[150:]
    diff_noise = np.std(np.diff(late, axis=0), axis=0) / math.sqrt(2)
    assert np.all(diff_noise < 0.5 * full_fixed_maps.params.noise)


def test_competence_rises(full_fixed_maps: SimulatedRun) -> None:
    run = full_fixed_maps
    assert run.n_epochs == DEFAULT_EPOCHS
    fifth = run.n_epochs // 5
    early = np.nanmean(run.label_means[:fifth], axis=0)
    late = np.nanmean(run.label_means[-fifth:], axis=0)
    assert np.sum(late > early) >= 0.8 * len(run.labels)
    assert np.all(run.epoch_competence[-1] >= run.params.floor)
    assert 10_000 <= run.reward.size <= 25_000
    # Throughput: a warm-up epoch and at least one dip below 75 % of the base SPS.
    assert run.sps[0] < 0.75 * run.task.base_sps


def test_lp_trace_equals_a_fresh_replay(short_variants: SimulatedRun) -> None:
    run = short_variants
    lp = LearningProgress(len(run.labels), run.task.lp)
    for j, (label, reward) in enumerate(zip(run.label_index, run.reward, strict=True)):
        np.testing.assert_array_equal(lp.probabilities(), run.probabilities[j])
        lp.update(label, reward)
        np.testing.assert_array_equal(lp.F, run.fast[j])
        np.testing.assert_array_equal(lp.S, run.slow[j])
    last = run.n_epochs - 1
    assert lp.scores().mean() == run.mean_learning_progress[last]


def test_epoch_rows_and_config(short_variants: SimulatedRun) -> None:
    run = short_variants
    rows = list(epoch_rows(run))
    assert len(rows) == SHORT
    for e, row in enumerate(rows):
        assert row["metric/epoch"] == e and row["metric/agent_step"] == run.epoch_agent_step[e]
        for key in ("overview/sps", KEY_MEAN_LP, KEY_EVICTED, KEY_RECENT_SCORE):
            assert key in row
        seen = ~np.isnan(run.label_means[e])
        assert sum(k.startswith(LABEL_PREFIX) for k in row) == seen.sum()
    config = run_config(run)
    algorithm = config["trainer"]["curriculum"]["algorithm"]
    assert algorithm["type"] == "learning_progress" and algorithm["ema_timescale"] == 0.01
    assert config["recipe"] == "recipes.experiment.cvc.variants_curriculum.train"
    assert config["seed"] == 2 and config["trainer"]["curriculum"]["num_active_tasks"] == 1500
    assert config["training_env"]["num_envs"] == run.task.n_envs == 1024
    assert run_id("fixed_maps", 3) == "alice.fixed_maps.seed3"


def test_simulate_run_through_offline_wandb(tmp_path: Path) -> None:
    epochs = 6
    mode_before = os.environ.get("WANDB_MODE")
    path = simulate_run("fixed_maps", 2, tmp_path, epochs=epochs)
    assert path.is_file() and path.name == "run-alice.fixed_maps.seed2.wandb"
    assert re.fullmatch(r"offline-run-\d{8}_\d{6}-alice\.fixed_maps\.seed2", path.parent.name)
    assert path.parent.parent == (tmp_path / "wandb").resolve()
    assert path.read_bytes()[:4] == b":W&B"
    # The completion stream round-trips through the run's files/reward_stream chunks.
    chunks = list_chunks(path.parent)
    assert chunks and chunks[0].parent == path.parent / "files" / "reward_stream"
    frame = pl.read_parquet(chunks)
    sim = simulate("fixed_maps", 2, epochs=epochs)
    assert frame["completion_index"].to_list() == list(range(sim.reward.size))
    np.testing.assert_array_equal(frame["reward"].to_numpy(), sim.reward)
    np.testing.assert_array_equal(frame["agent_step"].to_numpy(), sim.agent_step)
    np.testing.assert_array_equal(frame["epoch"].to_numpy(), sim.epoch)
    np.testing.assert_array_equal(frame["task_id"].to_numpy(), sim.task_id)
    np.testing.assert_array_equal(frame["wall_time"].to_numpy(), sim.wall_time)
    assert frame["label"].to_list() == [sim.labels[i] for i in sim.label_index]
    assert read_reward_stream(path.parent).equals(frame)
    # Writing the same run again replaces its folder instead of adding a second one.
    again = simulate_run("fixed_maps", 2, tmp_path, epochs=epochs)
    assert again.is_file()
    assert len(list((tmp_path / "wandb").glob("offline-run-*-alice.fixed_maps.seed2"))) == 1
    assert os.environ.get("WANDB_MODE") == mode_before  # the caller's environment is restored


def test_simulate_default_writes_baselines_then_arms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Tiny runs (3 epochs) in 2 spawned processes: ~2-3 s, mostly wandb start-up.
    paths = simulate_default(tmp_path, n_jobs=2, epochs=3)
    assert len(paths) == 12 and all(p.is_file() for p in paths)
    names = [p.name for p in paths]
    assert names[:3] == [f"run-alice.fixed_maps.seed{seed}.wandb" for seed in (1, 2, 3)]
    assert names[9:] == [f"run-alice.fixed_maps.z30.seed{seed}.wandb" for seed in (1, 2, 3)]
    out = capsys.readouterr().out
    assert out.count("\n") == 12 and "] alice.fixed_maps.z30.seed2: 3 epochs" in out
    # The arm set is data: none gives the nine baseline runs alone.
    only = simulate_default(tmp_path / "baseline", n_jobs=1, epochs=2, quiet=True, arms=())
    assert len(only) == 9 and not any(".z30." in p.name for p in only)


# --- the demo's A/B experiment: fixed_maps under the z-score variant, Z = 30 ---------------------
Z30 = DEFAULT_ARMS[0]


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_default_arm_is_fixed_maps_zscore_30() -> None:
    assert (Z30.task, Z30.tag, Z30.variant) == ("fixed_maps", "z30", "zscore")
    curriculum = Z30.curriculum()
    assert curriculum.variant == "zscore" and curriculum.zscore.z_score_amplification == 30.0
    # Shared settings: the task's baseline values (fixed_maps runs Metta main's defaults).
    zscore = curriculum.zscore
    assert (zscore.ema_timescale, zscore.slow_timescale_factor) == (0.001, 0.2)
    assert (zscore.exploration_bonus, zscore.progress_smoothing) == (0.1, 0.05)
    assert run_id("fixed_maps", 2, arm="z30") == "alice.fixed_maps.z30.seed2"


def test_arm_config_differs_from_the_baseline_only_in_lp_variant_keys() -> None:
    for seed in (1, 3):
        base = _flatten(run_config(simulate("fixed_maps", seed, epochs=3)))
        arm_run = simulate("fixed_maps", seed, epochs=3, curriculum=Z30.curriculum())
        arm = _flatten(run_config(arm_run, arm="z30"))
        assert base.pop("run") == f"alice.fixed_maps.seed{seed}"
        assert arm.pop("run") == f"alice.fixed_maps.z30.seed{seed}"
        lp = "trainer.curriculum.algorithm."
        # Main's own settings are gone, the variant's own are there (DOMAIN.md defaults)...
        assert {k for k in base if k not in arm} == {
            lp + "lp_gain",
            lp + "memory",
            lp + "use_bidirectional",
        }
        assert {k: v for k, v in arm.items() if k not in base} == {
            lp + "z_score_amplification": 30.0,
            lp + "performance_bonus_weight": 0.0,
            lp + "lp_score_temperature": 0.0,
            lp + "early_progress_amplification": 0.5,
            lp + "use_baseline_normalization": True,
            lp + "min_samples_for_lp": 10,
        }
        # ... and every key both have holds the same value, shared LP settings included.
        common = {k for k in base if k in arm}
        assert {k: arm[k] for k in common} == {k: base[k] for k in common}
        assert base[lp + "ema_timescale"] == 0.001 and base[lp + "progress_smoothing"] == 0.05
        assert base[lp + "type"] == arm[lp + "type"] == "learning_progress"


def test_task_generator_identifies_the_task_across_seeds_and_arms() -> None:
    def generator(task: str, seed: int, arm: LPArm | None = None) -> dict:
        run = simulate(task, seed, epochs=2, curriculum=arm and arm.curriculum())
        config = run_config(run, arm=arm and arm.tag)
        assert config["training_env"]["num_envs"] == 1024
        return config["training_env"]["curriculum"]["task_generator"]

    fixed = generator("fixed_maps", 1)
    assert fixed == generator("fixed_maps", 2) == generator("fixed_maps", 3, Z30)
    assert fixed["recipe"] == "recipes.prod.cvc.fixed_maps.train"
    assert fixed["labels"] == sorted(TASKS["fixed_maps"].labels) != list(TASKS["fixed_maps"].labels)
    others = [generator(task, 1) for task in ("assembly_lines", "variants_curriculum")]
    assert fixed not in others and others[0] != others[1]


def test_arm_lp_trace_is_the_zscore_variant_with_its_settings() -> None:
    """A straightforward stepwise z-score LP with the arm's settings, fed the arm's
    (label, reward) stream, gives the distributions the simulator drew from; Metta main's
    LP on the same stream does not."""
    run = simulate("fixed_maps", 2, epochs=SHORT, curriculum=Z30.curriculum())
    settings = ZScoreLPConfig(
        ema_timescale=0.001, progress_smoothing=0.05, z_score_amplification=30.0
    )
    lp, main = ZScoreLearningProgress(len(run.labels), settings), LearningProgress(10)
    worst_main = 0.0
    for j, (label, reward) in enumerate(zip(run.label_index, run.reward, strict=True)):
        np.testing.assert_allclose(lp.probabilities(), run.probabilities[j], rtol=0, atol=1e-13)
        worst_main = max(
            worst_main, float(np.abs(main.probabilities() - run.probabilities[j]).max())
        )
        lp.update(label, reward)
        main.update(label, reward)
        np.testing.assert_array_equal(lp.F, run.fast[j])
        np.testing.assert_array_equal(lp.S, run.slow[j])
    assert worst_main > 0.1
    assert lp.scores().mean() == run.mean_learning_progress[-1]


def test_written_arm_config_replays_to_the_recorded_lp_choices(tmp_path: Path) -> None:
    """Through the files a user has: the LP settings in the written run config, replayed
    on the recorded stream, give the simulator's own distributions (the config is truthful)."""
    from rts_dagster.analysis.lp_replay import CurriculumConfig, replay
    from rts_dagster.analysis.lp_sweep import replay_stream
    from rts_dagster.analysis.streams import completion_streams
    from rts_dagster.sources.offline import OfflineRunSource

    path = simulate_run("fixed_maps", 1, tmp_path, epochs=SHORT, arm=Z30)
    assert path.name == "run-alice.fixed_maps.z30.seed1.wandb"
    config = OfflineRunSource(tmp_path).get_run(str(path)).config
    algorithm = dict(config["trainer"]["curriculum"]["algorithm"])
    assert algorithm.pop("type") == "learning_progress"
    written = CurriculumConfig(name="written", variant="zscore", zscore=ZScoreLPConfig(**algorithm))
    stream = replay_stream(completion_streams(read_reward_stream(path.parent), None, "t", 1, "r"))
    run = simulate("fixed_maps", 1, epochs=SHORT, curriculum=Z30.curriculum())
    to_sorted = np.array([stream.labels.index(label) for label in run.labels])
    np.testing.assert_array_equal(stream.label_index, to_sorted[run.label_index])
    n = run.reward.size
    result = replay(stream.label_index, stream.reward, 10, written, eval_index=np.arange(n))
    expected = run.probabilities[1:][:, _inverse(to_sorted)]
    # the replay's EMAs (blocked, analysis/recurrence.py) and the simulator's
    # sequential ones differ in the last bits; the z-score's division by a small spread
    # scales that up to ~3e-12 here. A 1% change to any setting that acts here (all but
    # progress_smoothing) moves them by >= 2e-3.
    np.testing.assert_allclose(result.probability[:-1], expected, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="arm of 'fixed_maps'"):
        simulate_run("assembly_lines", 1, tmp_path, epochs=2, arm=Z30)


def test_same_seed_same_learner_and_draws_across_arms() -> None:
    base = simulate("fixed_maps", 3, epochs=SHORT)
    arm = simulate("fixed_maps", 3, epochs=SHORT, curriculum=Z30.curriculum())
    assert not np.array_equal(base.label_index, arm.label_index)  # LP made them differ
    for name in ("floor", "ceiling", "half_practice", "width", "noise", "failure_rate"):
        np.testing.assert_array_equal(getattr(base.params, name), getattr(arm.params, name))
    for name in ("sps", "epoch_completions", "agent_step", "epoch", "env_id", "wall_time"):
        np.testing.assert_array_equal(getattr(base, name), getattr(arm, name), err_msg=name)
    n_buckets = base.task.n_buckets
    np.testing.assert_array_equal(base.task_id % n_buckets, arm.task_id % n_buckets)
    # The same reward noise draw at every completion: recover it from each run's reward,
    # its latent competence and its label's noise sd (where neither episode scored 0).
    both = (base.reward > 0) & (arm.reward > 0)
    assert both.mean() > 0.5  # 74 % here: early competence is low, many episodes score 0
    shock_base = (base.reward - base.competence) / base.params.noise[base.label_index]
    shock_arm = (arm.reward - arm.competence) / arm.params.noise[arm.label_index]
    np.testing.assert_allclose(shock_base[both], shock_arm[both], rtol=0, atol=1e-9)

    # The same uniform draw picked each label: one u lies in both runs' chosen intervals.
    def interval(run: SimulatedRun) -> tuple[np.ndarray, np.ndarray]:
        upper = np.cumsum(run.probabilities, axis=1)
        rows = np.arange(run.reward.size)
        hi = upper[rows, run.label_index]
        return hi - run.probabilities[rows, run.label_index], hi

    (lo_b, hi_b), (lo_a, hi_a) = interval(base), interval(arm)
    assert np.all(np.maximum(lo_b, lo_a) <= np.minimum(hi_b, hi_a) + 1e-12)
    other = simulate("fixed_maps", 2, epochs=SHORT, curriculum=Z30.curriculum())
    assert not np.array_equal(other.sps, arm.sps)


def test_recent_score_is_the_trackers_whatever_the_arm() -> None:
    """Against a loop over completions keeping each label's last 25 clipped scores."""
    for curriculum in (None, Z30.curriculum()):
        run = simulate("fixed_maps", 1, epochs=25, curriculum=curriculum)
        recent: dict[int, list[float]] = {}
        expected = np.full(run.n_epochs, np.nan)
        bounds = run.epoch_bounds
        for e in range(run.n_epochs):
            for j in range(int(bounds[e]), int(bounds[e + 1])):
                kept = recent.setdefault(int(run.label_index[j]), [])
                kept.append(min(max(float(run.reward[j]), 0.0), 1.0))
                del kept[:-25]
            if recent:
                expected[e] = sum(sum(v) / len(v) for v in recent.values()) / len(recent)
        np.testing.assert_allclose(run.mean_recent_score, expected, rtol=0, atol=1e-12)
    # Epochs without any completion yet, and a label that appears late.
    bounds = np.array([0, 0, 2, 5])
    means = recent_score_means(
        np.array([1, 1, 0, 1, 1]), np.array([0.2, 1.4, 0.5, -1, 0.3]), bounds, 3, 2
    )
    np.testing.assert_allclose(means, [np.nan, 0.6, (0.5 + 0.15) / 2])


def test_arm_validation() -> None:
    with pytest.raises(ValueError, match="no zscore LP setting"):
        LPArm("fixed_maps", "typo", "zscore", (("z_score_amplificaton", 30.0),))
    with pytest.raises(ValueError, match="arm tag"):
        LPArm("fixed_maps", "Z.30", "zscore")
    with pytest.raises(ValueError, match="arm tag"):
        LPArm("fixed_maps", "seed4", "zscore")
    with pytest.raises(ValueError, match="unknown task"):
        LPArm("nope", "z30", "zscore")
    slower = LPArm("variants_curriculum", "slow", "main", (("slow_timescale_factor", 0.1),))
    main = slower.curriculum().main
    assert (main.ema_timescale, main.slow_timescale_factor) == (0.01, 0.1)  # task's 0.01 kept


def test_simulator_lp_trace_equals_the_replay_of_its_stream(short_variants: SimulatedRun) -> None:
    """The simulator drew every label from LP's distribution before feeding the reward;
    the vectorised replay of (label, reward) must give those exact distributions."""
    from rts_dagster.analysis.lp_replay import CurriculumConfig, replay

    run = short_variants
    n = run.reward.size
    config = CurriculumConfig(name="task_default", main=run.task.lp)
    result = replay(run.label_index, run.reward, len(run.labels), config, eval_index=np.arange(n))
    # replay gives the state after completion j; the simulator drew completion j + 1 from it
    np.testing.assert_allclose(result.probability[:-1], run.probabilities[1:], rtol=0, atol=1e-13)
    np.testing.assert_allclose(result.fast, run.fast, rtol=0, atol=1e-13)
    np.testing.assert_allclose(result.slow, run.slow, rtol=0, atol=1e-13)


def test_recorded_stream_replays_to_the_simulator_trace(tmp_path: Path) -> None:
    """Through the files a user has: the recorder's parquet chunks -> reward_streams ->
    the replay input. Same distributions as the simulator used, to 1e-13."""
    from rts_dagster.analysis.lp_replay import CurriculumConfig, replay
    from rts_dagster.analysis.lp_sweep import replay_stream
    from rts_dagster.analysis.streams import completion_streams

    run = simulate("fixed_maps", 3, epochs=SHORT)
    assert np.unique(run.agent_step).size == run.agent_step.size  # no ties: order is exact
    wandb_file = simulate_run("fixed_maps", 3, tmp_path, epochs=SHORT)
    recorded = read_reward_stream(wandb_file.parent)
    streams = completion_streams(recorded, None, "fixed_maps", 3, "r")
    stream = replay_stream(streams)
    assert stream.granularity == "completion" and stream.reward.size == run.reward.size
    # the replay input numbers labels in sorted order: map the simulator's indices
    to_sorted = np.array([stream.labels.index(label) for label in run.labels])
    np.testing.assert_array_equal(stream.label_index, to_sorted[run.label_index])
    np.testing.assert_array_equal(stream.reward, run.reward)
    config = CurriculumConfig(name="task_default", main=run.task.lp)
    result = replay(
        stream.label_index,
        stream.reward,
        len(run.labels),
        config,
        eval_index=np.arange(run.reward.size),
    )
    expected = run.probabilities[1:][:, _inverse(to_sorted)]
    np.testing.assert_allclose(result.probability[:-1], expected, rtol=0, atol=1e-13)


def _inverse(permutation: np.ndarray) -> np.ndarray:
    """Column order turning simulator label columns into sorted-label columns."""
    out = np.empty_like(permutation)
    out[permutation] = np.arange(permutation.size)
    return out
