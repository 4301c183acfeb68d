"""`rts refresh`'s decisions, with the Dagster runs replaced by fakes: when the aggregates
are rebuilt, what it exits with, and what reaches the terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from rts_dagster import refresh as refresh_mod
from rts_dagster import storage

ESC_NAME = "\x1b]0;pwned\x07\x1b[2Jevil.run"


def _discovered(fingerprint: str) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "run_id": ["r1", "r2"],
            "run_name": ["alice.fixed_maps.seed1", ESC_NAME],
            "task": ["fixed_maps", None],
            "seed": [1, None],
            "partition_key": ["fixed_maps.seed1", None],
            "status": ["matched", "ignored"],
            "reason": ["rule", "name does not match\x1b[31m"],
            "location": ["/x/run-r1.wandb", "/x/run-r2.wandb"],
            "fingerprint": [fingerprint, "f"],
        },
        schema_overrides={"seed": pl.Int64},
    )


class FakePipeline:
    """Stands in for `_materialize`: discovery writes discovered_runs; the aggregates write
    report.md and succeed unless `aggregates_fail`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.fingerprint = "v1"
        self.partitions_current = False
        self.aggregates_fail = False
        self.aggregate_runs = 0
        self.delay_s = 0.0
        self.calls: list[tuple[str | None, bool]] = []  # (partition key, with the aggregates)

    def materialize(self, instance, keys, partition_key=None):
        self.calls.append((partition_key, dg.AssetKey("report") in keys))
        if keys == [dg.AssetKey("discovered_runs")]:
            storage.write_parquet(
                _discovered(self.fingerprint), storage.discovered_runs_path(self.data_dir)
            )
            return True, ""
        if partition_key is not None and dg.AssetKey("report") not in keys:
            return True, ""  # the per-run assets alone
        self.aggregate_runs += 1  # the aggregates, alone or with one partition
        time.sleep(self.delay_s)
        storage.write_text("# report\n", storage.report_dir(self.data_dir) / "report.md")
        if self.aggregates_fail:
            return False, "variance_table: boom"
        return True, ""


_REAL_DISCOVER = refresh_mod._discover  # the fixture replaces it; one test needs it


@pytest.fixture
def pipeline(tmp_path, monkeypatch) -> FakePipeline:
    data_dir = tmp_path / "data"
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("RTS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    fake = FakePipeline(data_dir)
    instance = dg.DagsterInstance.ephemeral()  # no sqlite set-up per refresh
    monkeypatch.setattr(dg.DagsterInstance, "get", staticmethod(lambda: instance))
    monkeypatch.setattr(refresh_mod, "_materialize", fake.materialize)
    monkeypatch.setattr(
        refresh_mod,
        "_discover",
        lambda instance: fake.materialize(instance, [dg.AssetKey("discovered_runs")]),
    )
    # nothing renders here: no browser to boot (the e2e tests boot it for real)
    monkeypatch.setattr(refresh_mod, "_warm_renderer", contextlib.nullcontext)
    monkeypatch.setattr(
        refresh_mod, "partition_is_current", lambda root, row, *memo: fake.partitions_current
    )
    return fake


def test_failed_aggregates_are_rebuilt_by_the_next_refresh(pipeline):
    assert refresh_mod.refresh(quiet=True) == 0
    assert pipeline.aggregate_runs == 1
    pipeline.partitions_current = True
    assert refresh_mod.refresh(quiet=True) == 0
    assert pipeline.aggregate_runs == 1  # nothing changed: not rebuilt

    # a run changed; its partition is redone but the aggregates fail (report.md is stale):
    # the combined run fails, then the partition and the aggregates run apart (and fail)
    pipeline.fingerprint, pipeline.partitions_current = "v2", False
    pipeline.aggregates_fail = True
    pipeline.calls.clear()
    assert refresh_mod.refresh(quiet=True) == 1
    assert pipeline.calls == [
        (None, False),  # discovery
        ("fixed_maps.seed1", True),  # the partition with the aggregates: failed
        ("fixed_maps.seed1", False),  # the partition alone
        (None, True),  # the aggregates alone
    ]
    assert pipeline.aggregate_runs == 3
    # next refresh: the partition is current, the report is not: rebuild, never exit 0
    pipeline.partitions_current = True
    assert refresh_mod.refresh(quiet=True) == 1
    assert pipeline.aggregate_runs == 4
    pipeline.aggregates_fail = False
    assert refresh_mod.refresh(quiet=True) == 0
    assert pipeline.aggregate_runs == 5
    assert refresh_mod.refresh(quiet=True) == 0
    assert pipeline.aggregate_runs == 5


def test_a_source_error_in_discovery_stops_the_refresh_with_its_message(
    pipeline, monkeypatch, capsys
):
    def unreadable(instance, run_source, root):
        raise OSError("/runs/run-r9.wandb: permission denied")

    monkeypatch.setattr(refresh_mod, "_discover", _REAL_DISCOVER)
    monkeypatch.setattr(refresh_mod, "discover_runs", unreadable)
    assert refresh_mod.refresh(quiet=True) == 1
    out = capsys.readouterr().out
    assert "discovered_runs failed: OSError: /runs/run-r9.wandb: permission denied" in out
    assert pipeline.calls == []  # nothing else ran
    assert not storage.discovered_runs_path(pipeline.data_dir).exists()


def test_one_new_run_and_the_aggregates_take_one_dagster_run(pipeline, capsys):
    assert refresh_mod.refresh() == 0
    assert pipeline.calls == [(None, False), ("fixed_maps.seed1", True)]
    assert pipeline.aggregate_runs == 1
    out = capsys.readouterr().out
    assert "[partitions+aggregate] fixed_maps.seed1 and the aggregates in one Dagster run" in out
    assert storage.aggregates_manifest_path(pipeline.data_dir).exists()


def test_killed_aggregates_are_rebuilt(pipeline, monkeypatch):
    """A kill mid-aggregate (here an exception out of the step) leaves no manifest."""
    assert refresh_mod.refresh(quiet=True) == 0
    pipeline.partitions_current = True

    def killed(instance, keys, partition_key=None):
        if dg.AssetKey("report") not in keys:
            return FakePipeline.materialize(pipeline, instance, keys, partition_key)
        raise KeyboardInterrupt

    monkeypatch.setattr(refresh_mod, "_materialize", killed)
    with pytest.raises(KeyboardInterrupt):
        refresh_mod.refresh(quiet=True, force=True)
    monkeypatch.setattr(refresh_mod, "_materialize", pipeline.materialize)
    assert refresh_mod.refresh(quiet=True) == 0
    assert pipeline.aggregate_runs == 2


def test_new_code_rebuilds_the_aggregates(pipeline, monkeypatch):
    assert refresh_mod.refresh(quiet=True) == 0
    pipeline.partitions_current = True
    monkeypatch.setattr(refresh_mod, "code_fingerprint", lambda: "other code")
    assert refresh_mod.refresh(quiet=True) == 0
    assert pipeline.aggregate_runs == 2


def test_run_names_and_reasons_reach_the_terminal_escaped(pipeline, capsys):
    assert refresh_mod.refresh() == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07\\x1b[2Jevil.run" in out  # shown, not dropped


def test_a_long_step_prints_progress(pipeline, capsys, monkeypatch):
    monkeypatch.setattr(refresh_mod, "HEARTBEAT_S", 0.1)
    pipeline.delay_s = 0.45
    assert refresh_mod.refresh() == 0
    beats = [ln for ln in capsys.readouterr().out.splitlines() if "still running" in ln]
    assert len(beats) >= 3 and all("aggregate]" in ln for ln in beats)


def test_the_browser_drivers_ignored_messages_stay_out_of_the_log(caplog, monkeypatch):
    """A message Chromium sends that choreographer cannot decode (and ignores) prints no
    traceback once the report writer is set up; the next good message still arrives."""
    from choreographer.channels.pipe import Pipe

    from rts_dagster.report.document import quiet_ignored_browser_messages

    def read(payload: bytes) -> list:
        pipe = Pipe()
        pipe.open()
        try:
            os.write(pipe.from_external_to_choreo, payload)
            return pipe.read_jsons(blocking=True)[0]
        finally:
            pipe.close()

    pipe_logger = logging.getLogger("choreographer.channels.pipe")
    monkeypatch.setattr(pipe_logger, "filters", [])  # as before any report was written
    payload = b'{"id": 1, "result": {}\x00{"id": 2}\x00'  # the first one is cut short
    caplog.set_level(logging.DEBUG, logger="choreographer")
    assert read(payload) == [{"id": 2}]
    assert any("JSONError" in r.getMessage() for r in caplog.records)  # what users saw

    caplog.clear()
    quiet_ignored_browser_messages()
    quiet_ignored_browser_messages()  # idempotent: one filter
    assert len(pipe_logger.filters) == 1
    assert read(payload) == [{"id": 2}]
    assert not any("JSONError" in r.getMessage() for r in caplog.records)
    # a genuine error on the same logger is still shown
    pipe_logger.error("Error in trying to decode JSON off our read.")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "Error in trying to decode JSON off our read."
    ]


_BROWSER_PIPE_SCRIPT = """
import os, sys
from rts_dagster.report.document import quiet_ignored_browser_messages
if sys.argv[1] == "quiet":
    quiet_ignored_browser_messages()  # before choreographer is imported, as in a refresh
from choreographer.channels.pipe import Pipe
pipe = Pipe()
pipe.open()
os.write(pipe.from_external_to_choreo, b'{"id": 1, "result": {}\\x00{"id": 2}\\x00')
print(pipe.read_jsons(blocking=True)[0])
pipe.close()
"""


@pytest.mark.parametrize("mode", ["loud", "quiet"])
def test_a_fresh_process_renders_with_the_filter_and_prints_no_traceback(mode):
    """What a user's terminal shows: without the filter, choreographer's traceback; with it
    (installed before choreographer is first imported), nothing, and the reads still work."""
    done = subprocess.run(
        [sys.executable, "-c", _BROWSER_PIPE_SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[{'id': 2}]"
    if mode == "loud":
        assert "JSONError decoding message" in done.stderr and "Traceback" in done.stderr
    else:
        assert done.stderr == ""


def test_a_large_refresh_prints_a_line_per_batch_and_the_folder(pipeline, capsys, monkeypatch):
    """Beyond LIST_PARTITIONS_UP_TO partitions: one progress line per batch (first .. last
    key, how many ok) and the partitions' folder instead of a path per run."""
    monkeypatch.setattr(refresh_mod, "LIST_PARTITIONS_UP_TO", 0)
    assert refresh_mod.refresh() == 0
    out = capsys.readouterr().out
    assert "  [1/1] fixed_maps.seed1 .. fixed_maps.seed1: 1 of 1 ok" in out
    assert "-> " not in out  # no per-partition path line
    assert "reward_streams partitions (1): " in out and "<task>/<seed>.parquet" in out
    assert "discovered_runs.parquet" in out


def test_a_small_refresh_lists_every_partition(pipeline, capsys):
    assert refresh_mod.refresh() == 0
    out = capsys.readouterr().out
    assert "  [1/1] fixed_maps.seed1: ok (" in out
    assert "reward_streams partitions (1):\n" in out


def test_many_verdicts_are_summed_up_on_the_terminal():
    from rts_dagster.analysis.verdict import Verdict

    def verdict(task: str, action: str, confidence: str) -> Verdict:
        proposal = "ema_timescale=0.002" if action == "change" else None
        return Verdict(task, action, proposal, confidence, False, "t")

    few = [verdict("a", "keep_default", "none"), verdict("b", "change", "moderate")]
    lines = refresh_mod.verdict_lines(few, limit=5)
    assert lines[0] == "verdicts:" and len(lines) == 3 and lines[1].startswith("  a: ")

    many = [verdict(f"t{i:02d}", "keep_default", "none" if i % 3 else "low") for i in range(9)]
    many += [verdict(ESC_NAME, "change", "moderate"), verdict("u", "change", "high")]
    lines = refresh_mod.verdict_lines(many, limit=5)
    assert lines[0] == "verdicts (11 tasks; every one in the report):"
    assert lines[1] == "  2 change an LP setting:"
    assert len([ln for ln in lines if ln.startswith("    ")]) == 2
    assert lines[-1] == "  9 keep Metta's default LP settings (confidence: 3 low, 6 none)"
    assert not any("\x1b" in ln or "\x07" in ln for ln in lines)  # a run name stays inert
    capped = refresh_mod.verdict_lines(many, limit=1)
    assert "    ... and 1 more" in capped


def test_running_steps_names_the_step_in_progress_and_not_the_finished_ones():
    """The heartbeat's step list, read from a real instance's event log: inside a step it
    names that step; after the run, nothing."""
    seen: dict[str, list[str]] = {}

    @dg.asset
    def first() -> None:
        return None

    @dg.asset(deps=[first])
    def second(context) -> None:  # unannotated: Dagster rejects a string annotation
        seen["during"] = refresh_mod._running_steps(context.instance, context.run_id)

    with dg.instance_for_test() as instance:
        result = dg.materialize([first, second], instance=instance)
        assert result.success
        assert seen["during"] == ["second"]
        assert refresh_mod._running_steps(instance, result.run_id) == []
        assert refresh_mod._running_steps(instance, None) == []
