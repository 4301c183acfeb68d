"""`rts refresh` and `dagster asset materialize` as a user runs them, in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl

from rts_dagster.cli import build_parser

BIN = Path(sys.executable).parent


def _env(tmp_path: Path, offline: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RTS_DATA_DIR=str(tmp_path / "data"),
        RTS_OFFLINE_DIR=str(offline),
        DAGSTER_HOME=str(tmp_path / "home"),
        WANDB_ERROR_REPORTING="false",
    )
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def test_help_lists_commands():
    text = build_parser().format_help()
    for word in ("simulate", "refresh", "RTS_DATA_DIR", "RTS_OFFLINE_DIR"):
        assert word in text


def test_refresh_then_incremental_then_cli_materialize(tiny_offline_dir, tmp_path):
    env = _env(tmp_path, tiny_offline_dir)
    first = _run([str(BIN / "rts"), "refresh"], env)
    assert first.returncode == 0, first.stdout + first.stderr
    data = tmp_path / "data"
    for key, path in [
        ("fixed_maps.seed1", data / "fixed_maps" / "1.parquet"),
        ("assembly_lines.seed2", data / "assembly_lines" / "2.parquet"),
    ]:
        assert path.exists(), key
        assert str(path) in first.stdout
    assert "4 new or changed" in first.stdout
    assert "unmatched-run-name" in first.stdout  # the ignored run is reported by name
    assert f"report: {data / 'report' / 'report.md'}" in first.stdout
    lp_recs = data / "lp" / "recommendations.parquet"
    assert f"LP recommendations (2 tasks, with evidence in the report): {lp_recs}" in first.stdout
    assert (tmp_path / "home" / "dagster.yaml").exists()
    # discovery ran without a Dagster run, yet the instance (and so the UI) records it
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("discovered_runs"))
        assert event is not None and event.run_id == ""
        meta = event.asset_materialization.metadata
        assert meta["written_by"].value == "rts refresh"
        assert sorted(instance.get_dynamic_partitions("runs")) == sorted(
            pl.read_parquet(data / "discovered_runs.parquet")
            .filter(pl.col("status") == "matched")["partition_key"]
            .to_list()
        )

    second = _run([str(BIN / "rts"), "refresh"], env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 new or changed, 4 up to date" in second.stdout

    # the README's single-partition command, against the same persistent instance
    before = (data / "fixed_maps" / "1.metadata.json").stat().st_mtime_ns
    one = _run(
        [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "rts_dagster.definitions",
            "--select",
            "reward_streams",
            "--partition",
            "fixed_maps.seed1",
        ],
        env,
    )
    assert one.returncode == 0, one.stdout + one.stderr
    assert (data / "fixed_maps" / "1.metadata.json").stat().st_mtime_ns > before
    assert pl.read_parquet(data / "fixed_maps" / "1.parquet").height > 0


def test_refresh_batch_default_is_the_refresh_default() -> None:
    """`rts refresh` without --batch batches as `refresh.refresh()` does (they drifted once:
    the CLI said 50 after the library moved to 100)."""
    import inspect

    from rts_dagster import refresh

    args = build_parser().parse_args(["refresh"])
    assert inspect.signature(refresh.refresh).parameters["batch"].default == args.batch


def test_exit_now_runs_exit_handlers_flushes_and_keeps_the_code(tmp_path: Path) -> None:
    marker = tmp_path / "handler_ran"
    code = (
        "import atexit, pathlib, sys\n"
        "from rts_dagster.cli import exit_now\n"
        f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
        "sys.stdout.write('x' * 100000)\n"  # buffered, no newline: must still arrive
        "sys.stderr.write('err')\n"
        "exit_now(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "x" * 100000
    assert done.stderr.endswith("err")
    assert marker.read_text() == "yes"


def test_the_console_script_keeps_usage_exit_codes() -> None:
    ok = subprocess.run([str(BIN / "rts"), "--help"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "refresh" in ok.stdout
    bad = subprocess.run([str(BIN / "rts"), "bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
