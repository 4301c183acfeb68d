"""Smoke tests of the MettaGrid engine (no torch): real environments, the random policy,
Metta's logging path into an offline wandb run, read back with the project's reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mettagrid", reason="needs the mettagrid package (the dev extra)")

from rts_dagster.analysis.lp import LPConfig
from rts_dagster.mettagrid_engine.run import DEFAULT_LP, TASK_SETS, train_run
from rts_dagster.mettagrid_engine.tasks import (
    FAMILIES,
    Task,
    make_pool,
    make_task_config,
)
from rts_dagster.mettagrid_engine.vec import (
    OBJECT_TYPES,
    ObservationEncoder,
    VecEnv,
)
from rts_dagster.sources.offline import OfflineRunSource

N_WORKERS, STEPS, EPOCHS, SEED = 8, 48, 12, 5
LABELS = TASK_SETS["nav"]


def _train(out: Path, seed: int = SEED):
    return train_run(
        seed,
        out,
        policy="random",
        epochs=EPOCHS,
        n_workers=N_WORKERS,
        steps_per_worker=STEPS,
        progress=None,
        keep_episodes=True,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("mg_smoke")
    result = _train(out)
    source = OfflineRunSource(out)
    runs, unreadable = source.list_runs()
    assert unreadable == []
    assert len(runs) == 1
    run = runs[0]
    return result, run, source.read_history(run), source.read_completions(run)


def _epoch_of(agent_step: int) -> int:
    return (agent_step - 1) // (N_WORKERS * STEPS)


def test_run_identity_config_and_metta_keys(smoke) -> None:
    result, run, history, _ = smoke
    assert run.run_id == run.run_name == "alice.mettagrid_nav.seed5"
    assert {"engine:mettagrid", "user:alice"} <= set(run.tags)
    assert run.state == "finished"
    assert run.config["engine"] == "mettagrid 0.26.22"
    assert run.config["recipe"] == "rts.mettagrid.nav"
    assert run.config["training_env"]["num_envs"] == N_WORKERS
    algorithm = run.config["trainer"]["curriculum"]["algorithm"]
    assert LPConfig.model_validate(algorithm) == DEFAULT_LP
    assert run.config["training_env"]["curriculum"]["task_generator"]["labels"] == list(LABELS)
    expected = [f"env_per_label_rewards/{label}" for label in LABELS] + [
        "metric/agent_step",
        "metric/epoch",
        "overview/sps",
        "env_agent/heart.gained",
        "env_game/objects.wall",
        "env_env_curriculum/algorithm/lp/mean_learning_progress",
    ]
    assert set(expected) <= set(history.columns)
    assert history.height == EPOCHS
    steps = history["metric/agent_step"].to_numpy()
    np.testing.assert_array_equal(steps, N_WORKERS * STEPS * np.arange(1, EPOCHS + 1))
    np.testing.assert_array_equal(history["_step"].to_numpy(), steps)
    np.testing.assert_array_equal(history["metric/epoch"].to_numpy(), np.arange(EPOCHS))
    assert result.agent_steps == steps[-1]


def test_epoch_means_equal_mean_of_episode_infos(smoke) -> None:
    """Each logged env_<key> is the mean over the epoch's episode-end infos carrying it."""
    result, _, history, _ = smoke
    assert len(result.episodes) >= 200  # a few hundred episodes
    keys = [f"per_label_rewards/{label}" for label in LABELS] + [
        "agent/heart.gained",
        "game/heart.made",
        "attributes/steps",
    ]
    for key in keys:
        logged = history[f"env_{key}"].to_numpy()
        for epoch in range(EPOCHS):
            values = [
                end.info[key]
                for end in result.episodes
                if _epoch_of(end.agent_step) == epoch and key in end.info
            ]
            if values:
                assert logged[epoch] == pytest.approx(sum(values) / len(values), abs=1e-12)
            else:
                assert np.isnan(logged[epoch]), (key, epoch)


def test_per_label_rewards_are_held_last_values_per_worker(smoke) -> None:
    """Independent of the tracker: rebuild each worker's last score per label from the
    completion stream; the logged epoch value is the mean of those held values over the
    epoch's episode ends (of workers that have seen the label)."""
    _, _, history, stream = smoke
    rows = stream.sort("agent_step").iter_rows(named=True)
    held: dict[int, dict[str, float]] = {}
    per_epoch: dict[tuple[int, str], list[float]] = {}
    for row in rows:
        worker_held = held.setdefault(row["worker"], {})
        worker_held[row["label"]] = row["reward"]
        for label, value in worker_held.items():
            per_epoch.setdefault((row["epoch"], label), []).append(value)
    for label in LABELS:
        logged = history[f"env_per_label_rewards/{label}"].to_numpy()
        for epoch in range(EPOCHS):
            values = per_epoch.get((epoch, label))
            if values is None:
                assert np.isnan(logged[epoch])
            else:
                # the tracker holds float32 means; the stream keeps them as float64
                assert logged[epoch] == pytest.approx(np.mean(values), abs=1e-6)


def test_completion_stream_is_complete(smoke) -> None:
    result, _, _, stream = smoke
    episodes = sorted(result.episodes, key=lambda end: (end.worker, end.agent_step))
    assert stream.height == len(episodes)
    assert stream["worker"].to_list() == [end.worker for end in episodes]
    assert stream["label"].to_list() == [end.label for end in episodes]
    assert stream["task_id"].to_list() == [end.task_id for end in episodes]
    assert stream["reward"].to_list() == [end.score for end in episodes]
    assert stream["agent_step"].to_list() == [end.agent_step for end in episodes]
    assert stream["epoch"].to_list() == [_epoch_of(end.agent_step) for end in episodes]
    for worker in range(N_WORKERS):  # per worker: 0, 1, 2, ... in completion order
        index = stream.filter(worker=worker)["completion_index"].to_numpy()
        np.testing.assert_array_equal(index, np.arange(index.size))
    pool = make_pool(LABELS)
    assert all(pool[end.task_id].label == end.label for end in episodes)
    # one agent per task: the score is that agent's return, a heart (1) or nothing (0)
    assert set(stream["reward"].unique().to_list()) <= {0.0, 1.0}
    assert set(stream["label"].unique().to_list()) == set(LABELS)


def test_same_seed_same_stream(smoke, tmp_path: Path) -> None:
    result, _, history, stream = smoke
    again = _train(tmp_path)
    assert [end.info for end in again.episodes] == [end.info for end in result.episodes]
    source = OfflineRunSource(tmp_path)
    (run,), _ = source.list_runs()
    columns = ["worker", "completion_index", "label", "task_id", "reward", "agent_step", "epoch"]
    assert source.read_completions(run).select(columns).equals(stream.select(columns))
    label_keys = [f"env_per_label_rewards/{label}" for label in LABELS]
    assert source.read_history(run).select(label_keys).equals(history.select(label_keys))


def test_other_seed_other_stream() -> None:
    pool = make_pool(LABELS)
    streams = []
    for seed in (1, 2):
        env = VecEnv(pool, seed, 4, DEFAULT_LP)
        rng = np.random.default_rng(0)  # same actions: only the env seed differs
        ends = []
        for _ in range(200):
            ends += env.step(rng.integers(0, 5, env.n_agents))[3]
        env.close()
        streams.append([(e.worker, e.task_id, e.score, e.agent_step) for e in ends])
    assert streams[0] != streams[1]


def test_score_is_mean_over_agents_of_episode_return() -> None:
    """Two agents per environment: the score fed to LP and recorded is the mean of the
    two agents' returns, summed here from the per-step rewards."""
    family = FAMILIES["reach_5x5"]
    pool = [
        Task(j, family.label, make_task_config(family, 14, 10 * j, num_agents=2)) for j in (0, 1)
    ]
    env = VecEnv(pool, 3, 4, DEFAULT_LP)
    rng = np.random.default_rng(1)
    returns = np.zeros(env.n_agents)
    checked = 0
    for _ in range(300):
        _, rewards, dones, ends = env.step(rng.integers(0, 5, env.n_agents))
        returns += rewards
        for end in ends:
            mine = returns[2 * end.worker : 2 * end.worker + 2]
            assert end.score == pytest.approx(mine.mean(), abs=1e-6)
            checked += 1
        returns[dones] = 0.0
    env.close()
    assert checked > 20
    # each worker's LP was fed exactly its own completions
    assert sum(int(w.lp.counts.sum()) for w in env.workers) == checked


def test_observation_encoding_matches_token_loop() -> None:
    pool = make_pool(LABELS)
    env = VecEnv(pool, 4, 6, DEFAULT_LP)
    rng = np.random.default_rng(2)
    for _ in range(5):
        env.step(rng.integers(0, 5, env.n_agents))
    tokens = np.concatenate([w.observations() for w in env.workers])
    encoded = env.observations()
    encoder: ObservationEncoder = env.encoder
    id_map = pool[0].config.game.id_map()
    ids = {f.name: f.id for f in id_map.features()}
    tags = id_map.tag_names()
    size = encoder.height * encoder.width
    for n in range(tokens.shape[0]):
        expected = np.zeros(encoder.size, dtype=np.float32)
        for coord, feature, value in tokens[n].astype(int).tolist():
            if coord == 0xFF:  # padding
                continue
            if feature == ids["tag"] and coord != 0xFE:  # 0xFE: global, not a cell
                plane = OBJECT_TYPES.index(tags[value])
                expected[plane * size + (coord >> 4) * encoder.width + (coord & 15)] = 1.0
            for j, name in enumerate(("inv:ore", "inv:heart", "episode_completion_pct")):
                if feature == ids[name]:
                    expected[len(OBJECT_TYPES) * size + j] = value / (255.0 if j == 2 else 1.0)
        np.testing.assert_array_equal(encoded[n], expected)
    # every view shows the agent itself at the centre
    centre = (encoder.height // 2) * encoder.width + encoder.width // 2
    assert (encoded[:, centre] == 1.0).all()
    env.close()


def test_lp_chooses_from_its_own_probabilities() -> None:
    """Worker LP states are independent and start uniform over the pool."""
    pool = make_pool(LABELS)
    env = VecEnv(pool, 6, 3, DEFAULT_LP)
    for worker in env.workers:
        np.testing.assert_allclose(worker.lp.probabilities(), np.full(len(pool), 1 / len(pool)))
    rng = np.random.default_rng(3)
    for _ in range(150):
        env.step(rng.integers(0, 5, env.n_agents))
    counts = [w.lp.counts.copy() for w in env.workers]
    assert all(c.sum() > 0 for c in counts)
    assert not all(np.array_equal(counts[0], c) for c in counts[1:])
    env.close()


def test_importing_the_engine_leaves_the_root_log_level_alone() -> None:
    import logging
    import subprocess
    import sys

    code = (
        "import logging; import rts_dagster.mettagrid_engine.run; "
        "print(logging.getLogger().getEffectiveLevel())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == logging.WARNING
