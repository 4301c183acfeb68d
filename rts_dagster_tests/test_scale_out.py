"""The scale-out path (docs/scale_out.md).

The end-to-end test runs deploy/scale_demo.sh for real (Postgres, Redis, 2 Celery workers,
the daemon, the webserver): opt in with RTS_SCALE_TESTS=1; it takes a few minutes. It is
skipped, with the script's reason, when the services or the `scale` extra are missing.
The config tests are fast and run whenever the `scale` extra is installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
INSTANCE_YAML = DEPLOY / "dagster.scale-out.example.yaml"
SKIP_EXIT = 77

needs_scale_extra = pytest.mark.skipif(
    importlib.util.find_spec("dagster_postgres") is None
    or importlib.util.find_spec("dagster_celery") is None,
    reason="the `scale` extra is not installed (pip install -e '.[scale]')",
)


@needs_scale_extra
def test_tested_instance_yaml_is_a_valid_postgres_queued_instance(tmp_path, monkeypatch) -> None:
    from dagster._core.instance.config import dagster_instance_config

    shutil.copyfile(INSTANCE_YAML, tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    config, _ = dagster_instance_config(str(tmp_path))  # raises on any schema error

    pg = config["storage"]["postgres"]["postgres_db"]
    assert pg["scheme"] == "postgresql+psycopg2"  # SQLAlchemy 2.1 would pick psycopg 3
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["runs"]["max_concurrent_runs"] >= 1
    assert "run_launcher" not in config  # the untested K8s launcher stays commented out


@needs_scale_extra
def test_scale_code_location_sends_every_job_to_celery() -> None:
    spec = importlib.util.spec_from_file_location(
        "scale_definitions", DEPLOY / "scale_definitions.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defs = module.defs
    partition_job = defs.resolve_job_def("scale_partition")
    assert partition_job.partitions_def is not None
    assert set(partition_job.graph.node_dict) == {"reward_streams", "series_metrics", "lp_replay"}
    aggregates = set(defs.resolve_job_def("scale_aggregates").graph.node_dict)
    assert "report" in aggregates and "reward_streams" not in aggregates
    for name in ("scale_discover", "scale_partition", "scale_aggregates"):
        assert defs.resolve_job_def(name).executor_def.name == "celery_from_env"


def test_max_overlap_matches_a_brute_force_count() -> None:
    import numpy as np

    sys.path.insert(0, str(DEPLOY))
    try:
        from scale_demo_tools import max_overlap
    finally:
        sys.path.remove(str(DEPLOY))
    rng = np.random.default_rng(7)
    starts = rng.uniform(0, 10, 40)
    ends = starts + rng.uniform(0.1, 3, 40)
    # reference: count the open intervals at every instant where one starts (the maximum of
    # a step function that only rises at starts is reached at one of them)
    brute = int(((starts[:, None] >= starts) & (starts[:, None] < ends)).sum(axis=1).max())
    assert max_overlap(list(zip(starts, ends, strict=True))) == brute
    assert max_overlap([(0, 1), (1, 2)]) == 1  # touching intervals do not overlap
    assert max_overlap([]) == 0


@pytest.mark.skipif(
    os.environ.get("RTS_SCALE_TESTS") != "1",
    reason="opt-in: set RTS_SCALE_TESTS=1 to run deploy/scale_demo.sh (Postgres, Redis, "
    "Celery workers, daemon, webserver; a few minutes)",
)
def test_scale_demo_materializes_on_postgres_with_two_workers() -> None:
    env = dict(os.environ, PYTHON_BIN=sys.executable)
    proc = subprocess.run(
        ["bash", str(DEPLOY / "scale_demo.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode == SKIP_EXIT:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    out = proc.stdout
    print(out)  # the evidence and timings, shown with `pytest -s`
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]

    n_runs = int(re.search(r"runs table: (\d+) runs \{'SUCCESS': (\d+)\}", out).group(1))
    n_success = int(re.search(r"runs table: \d+ runs \{'SUCCESS': (\d+)\}", out).group(1))
    assert n_runs == n_success >= 3  # discover, >= 1 partition, aggregates; all succeeded
    assert int(re.search(r"event_logs table: (\d+) rows", out).group(1)) > 0
    workers = set(re.findall(r"^\s+(w\d+@\S+) pid (\d+): \d+ steps$", out, re.MULTILINE))
    assert len({pid for _, pid in workers}) >= 2
    ui_runs = int(re.search(r"UI \(GraphQL runsOrError\): (\d+) runs", out).group(1))
    assert ui_runs == n_runs
    assert "PROBLEM" not in out
    assert "stopped everything it started" in out
