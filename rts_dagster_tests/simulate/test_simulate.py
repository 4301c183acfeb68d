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

from rts_dagster.analysis.lp import LearningProgress
from rts_dagster.recorder import list_chunks, read_reward_stream
from rts_dagster.simulate.model import (
    DEFAULT_EPOCHS,
    TASKS,
    SimulatedRun,
    label_params,
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


def test_simulate_default_writes_nine_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Tiny runs (3 epochs) in 2 spawned processes: ~2-3 s, mostly wandb start-up.
    paths = simulate_default(tmp_path, n_jobs=2, epochs=3)
    assert len(paths) == 9 and all(p.is_file() for p in paths)
    assert [p.name for p in paths][:3] == [
        f"run-alice.fixed_maps.seed{seed}.wandb" for seed in (1, 2, 3)
    ]
    assert capsys.readouterr().out.count("\n") == 9


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
