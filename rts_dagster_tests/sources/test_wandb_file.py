"""The `.wandb` reader against runs written here by the real wandb library (offline mode).

Expected values are what each test logged itself, never what the reader returned.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from rts_dagster.sources import wandb_file
from rts_dagster.sources.base import RunReadError
from rts_dagster.sources.wandb_file import (
    WandbFileError,
    iter_records,
    open_record_log,
    read_run_file,
    scan_run_file,
    wait_for_exit_record,
)

WANDB_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_ERROR_REPORTING": "false",
    "WANDB_CONSOLE": "off",
}
N_ROWS = 80
LABEL_KEYS = [
    "env_per_label_rewards/training_facility.extractor_hub_30",
    "env_per_label_rewards/training_facility.extractor_hub_50",
    "env_per_label_rewards/machina_1.collect_far",
    "env_per_label_rewards/machina_1.oxygen_bottleneck",
]
FLOAT_KEYS = [
    *LABEL_KEYS,
    "overview/sps",
    "overview/reward",
    "env_agent/heart.amount",
    "experience/rewards",
    "env_env_curriculum/algorithm/lp/mean_learning_progress",
    "loss",
    "weird key with spaces/and-dashes_ünïcode",
    "long/" + "k" * 150,  # lengths >= 128 take 2-byte varints: the decoder's generic path
]
INT_KEYS = ["metric/epoch", "env_env_curriculum/num_evicted"]
BIG_ROW = 37  # this row also logs a 40 kB string: its history record spans 3 blocks


def _wandb_env(root: Path) -> dict[str, str]:
    return {
        **WANDB_ENV,
        "WANDB_CONFIG_DIR": str(root / ".wandb_config"),
        "WANDB_CACHE_DIR": str(root / ".wandb_cache"),
        "WANDB_DATA_DIR": str(root / ".wandb_data"),
    }


def make_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Random rows: >= 10 numeric keys, some absent per row, NaN/inf/-inf mixed in, plus
    values the reader must skip (strings, bools) and a nested dict."""
    rng = np.random.default_rng(seed)
    specials = [math.nan, math.inf, -math.inf]
    rows = []
    for step in range(n):
        row: dict[str, Any] = {}
        for key in FLOAT_KEYS:
            if rng.random() < 0.2:  # absent on this row
                continue
            value = float(rng.normal() * 10.0 ** int(rng.integers(-3, 6)))
            if rng.random() < 0.08:
                value = specials[int(rng.integers(3))]
            row[key] = value
        row["metric/epoch"] = step
        if step % 3:
            row["env_env_curriculum/num_evicted"] = int(rng.integers(0, 1000))
        row["status"] = "ok" if step % 2 else "warm"  # a string: skipped
        row["flag"] = bool(step % 2)  # a bool: skipped
        if step % 4 == 0:
            row["nested"] = {"inner": float(step) / 8, "label": "x"}  # -> "nested.inner"
        if step == BIG_ROW:
            row["big_text"] = "y" * 40_000
        rows.append(row)
    return rows


def expected_columns(rows: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Numeric columns as logged: one value per row, None where the row lacks the key."""
    flat_rows = []
    for row in rows:
        flat = {}
        for key, value in row.items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        flat_rows.append(flat)
    keys = sorted(
        {
            k
            for flat in flat_rows
            for k, v in flat.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    return {k: [flat.get(k) for flat in flat_rows] for k in keys}


def assert_column(frame: pl.DataFrame, key: str, expected: list[float | None]) -> None:
    got = frame.get_column(key)
    assert got.dtype == pl.Float64, key
    assert got.is_null().to_list() == [v is None for v in expected], key
    want = np.array([np.nan if v is None else v for v in expected], dtype=float)
    have = got.fill_null(np.nan).to_numpy()
    # NaN, inf and -inf must come back as such; every other value bit-exact.
    np.testing.assert_array_equal(have, want, err_msg=key)


def write_run(
    root: Path,
    run_id: str,
    rows: list[dict[str, Any]],
    *,
    exit_code: int = 0,
    **init: Any,
) -> Path:
    """Log `rows` (row i at step 10*i) through the real wandb library; return the file."""
    import wandb

    with pytest.MonkeyPatch.context() as mp:
        for key, value in _wandb_env(root).items():
            mp.setenv(key, value)
        run = wandb.init(id=run_id, dir=root, **init)
        for i, row in enumerate(rows):
            run.log(row, step=10 * i)
        run.finish(exit_code=exit_code)
    (path,) = root.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    wait_for_exit_record(path)  # finish() returns before the file's last block is written
    return path


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("logged")
    rows = make_rows(N_ROWS, seed=7)
    config = {"lr": 0.001, "trainer": {"curriculum": {"ema_timescale": 0.001}}, "tags": [1, 2]}
    path = write_run(
        root,
        "alice.fixed.maps.seed1",
        rows,
        project="metta",
        entity="metta-research",
        name="alice.fixed.maps.seed1",
        config=config,
        tags=["user:alice", "lp"],
    )
    return {"path": path, "rows": rows, "config": config}


@pytest.fixture(scope="module")
def failed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("failed")
    return write_run(root, "bob.t.seed2", make_rows(5, seed=3), exit_code=1, project="p")


KILLED_SCRIPT = textwrap.dedent(
    """
    import math, sys, time
    import wandb
    run = wandb.init(project="p", id="killed", name="killed", dir=sys.argv[1])
    for step in range(10**7):
        run.log({"a": step * 0.5, "b": math.sin(step), "c": math.nan if step % 7 == 0 else -step},
                step=step)
        if step % 25 == 0:
            print(step, flush=True)
        time.sleep(0.001)
    """
)


def killed_value(key: str, step: int) -> float:
    """What the killed run logged for `key` at `step`."""
    if key == "a":
        return step * 0.5
    if key == "b":
        return math.sin(step)
    return math.nan if step % 7 == 0 else float(-step)


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose process is SIGKILLed while it logs: no exit record, maybe a cut tail."""
    root = tmp_path_factory.mktemp("killed")
    script = root / "log_forever.py"
    script.write_text(KILLED_SCRIPT)
    env = {**os.environ, **_wandb_env(root)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        path = None
        while time.monotonic() < deadline:  # until >= 100 rows are on disk
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line or proc.poll() is None, "the logging subprocess died"
            found = list(root.glob("wandb/offline-run-*-killed/run-killed.wandb"))
            try:
                if found and scan_run_file(found[0]).num_history_rows >= 100:
                    path = found[0]
                    break
            except WandbFileError:  # not even the file header yet
                pass
        assert path is not None, "the logging subprocess did not write 100 rows in 60 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.3)  # wandb-core (its own session) notices and stops writing
    return path


# --- history and metadata ----------------------------------------------------------------


def test_every_row_key_and_special_value_round_trips(logged: dict[str, Any]) -> None:
    run = read_run_file(logged["path"])
    history = run.history
    assert history is not None
    rows = logged["rows"]
    assert history.height == len(rows)
    assert history.get_column("_step").dtype == pl.Int64
    assert history.get_column("_step").to_list() == [10 * i for i in range(len(rows))]
    expected = expected_columns(rows)
    assert "nested.inner" in expected
    assert set(history.columns) == {"_step", "_timestamp", "_runtime", *expected}
    assert history.columns[:3] == ["_step", "_timestamp", "_runtime"]
    for key, values in expected.items():
        assert_column(history, key, values)
    timestamps = history.get_column("_timestamp")
    assert timestamps.null_count() == 0
    assert timestamps.is_sorted()
    assert abs(timestamps[0] - time.time()) < 3600


def test_special_values_and_gaps_are_present_in_the_data(logged: dict[str, Any]) -> None:
    # Guards the round-trip test above: the random rows really contain what it must cover.
    values = [v for row in logged["rows"] for v in row.values() if isinstance(v, float)]
    assert any(math.isnan(v) for v in values)
    assert math.inf in values
    assert -math.inf in values
    assert any(LABEL_KEYS[0] not in row for row in logged["rows"])


def test_run_metadata(logged: dict[str, Any]) -> None:
    run = read_run_file(logged["path"])
    assert run.run_id == "alice.fixed.maps.seed1"
    assert run.display_name == "alice.fixed.maps.seed1"
    assert run.project == "metta"
    assert run.entity == "metta-research"
    assert run.tags == ("user:alice", "lp")
    assert run.config == logged["config"]
    assert run.state == "finished"
    assert run.exit_code == 0
    assert not run.truncated
    assert run.num_history_rows == N_ROWS
    assert run.start_time is not None and run.start_time.tzinfo is not None
    assert run.last_timestamp is not None and run.last_timestamp >= run.start_time
    last_logged = run.history["_timestamp"].max()  # type: ignore[index]
    # the last logged row or the end of the run (start + exit runtime), to the microsecond
    assert run.last_timestamp.timestamp() >= last_logged - 1e-6
    assert run.last_timestamp.timestamp() <= time.time()


def test_scan_matches_read_without_history(logged: dict[str, Any]) -> None:
    scan = scan_run_file(logged["path"])
    full = read_run_file(logged["path"])
    assert scan.history is None
    for name in ("run_id", "display_name", "project", "entity", "tags", "config", "state"):
        assert getattr(scan, name) == getattr(full, name), name
    assert scan.num_history_rows == full.num_history_rows
    assert scan.last_timestamp == full.last_timestamp


def test_key_prefixes(logged: dict[str, Any]) -> None:
    prefixes = ["env_per_label_rewards/", "overview/sps"]
    history = read_run_file(logged["path"], key_prefixes=prefixes).history
    assert history is not None
    assert history.columns == ["_step", "_timestamp", *sorted(LABEL_KEYS), "overview/sps"]
    expected = expected_columns(logged["rows"])
    for key in [*LABEL_KEYS, "overview/sps"]:
        assert_column(history, key, expected[key])
    nothing = read_run_file(logged["path"], key_prefixes=["no/such/key"]).history
    assert nothing is not None
    assert nothing.columns == ["_step", "_timestamp"]
    assert nothing.height == N_ROWS


def test_vectorised_decoder_equals_record_by_record_decoder(logged: dict[str, Any]) -> None:
    # the record-by-record decoder is checked against protobuf in test_wandb_meta_decoder
    path = logged["path"]
    fast = read_run_file(path).history
    reference = wandb_file._run_file(path, None, True, 300.0, None, fast=False).history
    assert fast is not None and reference is not None
    assert fast.equals(reference)


def test_record_iterator(logged: dict[str, Any]) -> None:
    from wandb.proto import wandb_internal_pb2

    kinds: dict[str, int] = {}
    offsets = []
    for offset, payload in iter_records(logged["path"]):
        record = wandb_internal_pb2.Record.FromString(payload)
        kind = record.WhichOneof("record_type")
        kinds[kind] = kinds.get(kind, 0) + 1
        offsets.append(offset)
    assert kinds["history"] == N_ROWS
    assert kinds["run"] == 1 and kinds["exit"] == 1
    assert offsets == sorted(offsets) and offsets[0] == 7
    log = open_record_log(logged["path"])
    assert log.in_blob.any()  # the big row and block-crossing records are fragmented


def test_failed_run(failed: Path) -> None:
    run = read_run_file(failed)
    assert run.state == "failed"
    assert run.exit_code == 1
    assert run.history is not None and run.history.height == 5


def test_killed_run_reads_every_whole_record(killed: Path) -> None:
    run = read_run_file(killed, running_grace_s=0)
    assert run.state == "crashed"
    assert run.exit_code is None
    history = run.history
    assert history is not None
    assert history.height >= 100
    steps = history.get_column("_step").to_list()
    assert steps == list(range(len(steps)))
    for key in ("a", "b", "c"):
        want = np.array([killed_value(key, s) for s in steps])
        np.testing.assert_array_equal(history.get_column(key).to_numpy(), want, err_msg=key)
    # Without an exit record, a file written to moments ago belongs to a live writer.
    assert read_run_file(killed, running_grace_s=3600).state == "running"


# --- damaged files -----------------------------------------------------------------------


def record_kinds(path: Path) -> list[tuple[int, str]]:
    """(offset, record type) of every record, decoded with wandb's protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    return [
        (offset, wandb_internal_pb2.Record.FromString(payload).WhichOneof("record_type"))
        for offset, payload in iter_records(path)
    ]


def _inside_one_block(records: list[tuple[int, str]], near: int) -> tuple[int, int]:
    """Byte span of a record near index `near` that has no block padding before the next
    record (padding is not covered by any CRC)."""
    for i in range(near, len(records) - 1):
        start, end = records[i][0], records[i + 1][0]
        if start // wandb_file.BLOCK_LEN == (end - 1) // wandb_file.BLOCK_LEN:
            return start, end
    raise AssertionError("no record inside one block")


def test_file_cut_inside_a_record_reads_up_to_the_last_whole_record(
    logged: dict[str, Any], tmp_path: Path
) -> None:
    data = logged["path"].read_bytes()
    full = read_run_file(logged["path"]).history
    assert full is not None
    records = record_kinds(logged["path"])
    history_offsets = [offset for offset, kind in records if kind == "history"]
    (exit_offset,) = [offset for offset, kind in records if kind == "exit"]
    rng = np.random.default_rng(0)
    cases = []
    for n_whole in (0, 1, BIG_ROW, BIG_ROW + 1, N_ROWS - 1):
        start = history_offsets[n_whole]
        end = history_offsets[n_whole + 1] if n_whole + 1 < N_ROWS else exit_offset
        # inside the chunk header, or anywhere in the record up to its last byte
        cases += [(n_whole, start + 3), (n_whole, int(rng.integers(start + 8, end)))]
    for n_whole, cut in cases:
        path = tmp_path / f"run-cut{cut}.wandb"
        path.write_bytes(data[:cut])
        run = read_run_file(path, running_grace_s=0)
        assert run.history is not None
        assert run.history.height >= n_whole, cut
        assert run.history.height <= n_whole + 1, cut
        assert run.history.equals(full.head(run.history.height).select(run.history.columns))
        assert run.state == "crashed" and run.exit_code is None
        if run.history.height == n_whole:
            assert run.truncated, cut


def test_flipped_byte_names_file_and_offset(logged: dict[str, Any], tmp_path: Path) -> None:
    data = logged["path"].read_bytes()
    records = record_kinds(logged["path"])
    middle = records[len(records) // 2][0]
    other, _ = _inside_one_block(records, len(records) // 3)
    # payload byte, stored CRC, chunk type, chunk length
    for position in (middle + 20, middle + 2, middle + 6, other + 4):
        broken = bytearray(data)
        broken[position] ^= 0x10
        path = tmp_path / f"run-flip{position}.wandb"
        path.write_bytes(bytes(broken))
        for reader in (read_run_file, scan_run_file, open_record_log):
            with pytest.raises(WandbFileError) as info:
                reader(path)
            err = info.value
            assert isinstance(err, RunReadError)
            assert err.path == str(path)
            assert err.offset is not None and err.offset <= position
            assert str(path) in str(err) and f"byte offset {err.offset}" in str(err)
    broken = bytearray(data)
    broken[middle + 20] ^= 0x10
    path = tmp_path / "run-crc.wandb"
    path.write_bytes(bytes(broken))
    with pytest.raises(WandbFileError, match=f"bad CRC in record at byte offset {middle}$"):
        read_run_file(path)


def test_every_single_bit_flip_in_a_record_is_detected(
    logged: dict[str, Any], tmp_path: Path
) -> None:
    data = logged["path"].read_bytes()
    start, end = _inside_one_block(record_kinds(logged["path"]), 40)
    rng = np.random.default_rng(1)
    for position in rng.integers(start, end, 25).tolist():
        broken = bytearray(data)
        broken[position] ^= 1 << int(rng.integers(8))
        with pytest.raises(WandbFileError):
            open_record_log("mem", bytes(broken))


def test_not_a_wandb_file(tmp_path: Path) -> None:
    text = tmp_path / "run-notes.wandb"
    text.write_text("just some notes\n" * 100)
    empty = tmp_path / "run-empty.wandb"
    empty.write_bytes(b"")
    for path in (text, empty):
        with pytest.raises(WandbFileError, match=r"not a \.wandb file") as info:
            read_run_file(path)
        assert info.value.path == str(path) and str(path) in str(info.value)
    with pytest.raises(WandbFileError, match="cannot read file"):
        read_run_file(tmp_path / "missing.wandb")


# --- cross-check against wandb's own tool ------------------------------------------------


def _leet_history(path: Path) -> Iterator[dict[str, Any]]:
    exe = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(exe) if exe.exists() else "wandb", "leet", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    for line in out.splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            yield record["history"]["item"]


def test_matches_wandb_leet_inspect(logged: dict[str, Any]) -> None:
    history = read_run_file(logged["path"]).history
    assert history is not None
    leet_rows = list(_leet_history(logged["path"]))
    assert len(leet_rows) == history.height
    specials = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    compared = 0
    for i, item in enumerate(leet_rows):
        for key, value in item.items():
            if isinstance(value, str) and value in specials:
                value = specials[value]
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue  # strings, bools, dicts: not in the frame
            got = history.get_column(key)[i]
            assert got == value or (math.isnan(value) and math.isnan(got)), (i, key)
            compared += 1
    assert compared > N_ROWS * 10


# --- vectorised helpers ------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 1000])
def test_binary_views_point_at_the_right_bytes(
    window: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if window is not None:  # big-file addressing through windows, on a small buffer
        monkeypatch.setattr(wandb_file, "_VIEW_WINDOW", window)
    rng = np.random.default_rng(3)
    data = rng.bytes(5000)
    lens = rng.integers(0, 40, 300)
    starts = np.array([int(rng.integers(0, len(data) - n + 1)) for n in lens.tolist()])
    starts[:3], lens[:3] = [len(data) - 5, len(data) - 12, len(data) - 13], [5, 12, 13]
    views = wandb_file._binary_views(data, starts, lens)
    assert views.to_pylist() == [data[s : s + n] for s, n in zip(starts, lens, strict=True)]
    as_polars = pl.Series(pl.from_arrow(views))
    assert as_polars.to_list() == views.to_pylist()


def test_varint_and_field_walk() -> None:
    values = [0, 1, 127, 128, 300, 2**21 + 5, 2**35 + 7, 2**55 + 1]
    encoded = b""
    positions = []
    for v in values:
        positions.append(len(encoded))
        while True:
            byte, v = v & 0x7F, v >> 7
            encoded += bytes([byte | (0x80 if v else 0)])
            if not v:
                break
    buf = np.frombuffer(encoded, dtype=np.uint8)
    pos = np.array(positions)
    value, size, ok = wandb_file._varint(buf, pos, np.full(len(pos), len(buf)))
    assert ok.all() and value.tolist() == values
    assert (pos + size).tolist() == [*positions[1:], len(buf)]
    _, _, cut = wandb_file._varint(buf, pos[-1:], pos[-1:] + 3)  # runs past its limit
    assert not cut.any()


def test_wait_for_exit_record(logged: dict[str, Any], tmp_path: Path) -> None:
    assert wait_for_exit_record(logged["path"]).exit_code == 0
    (exit_offset,) = [o for o, kind in record_kinds(logged["path"]) if kind == "exit"]
    cut = tmp_path / "run-cut.wandb"
    cut.write_bytes(logged["path"].read_bytes()[:exit_offset])
    with pytest.raises(TimeoutError, match="no exit record"):
        wait_for_exit_record(cut, timeout_s=0.1)


# --- a run whose own clock is old (late arrivals) ---------------------------------------------
def _frame_records(payloads: list[bytes]) -> bytes:
    """A `.wandb` file of `payloads`, framed as the leveldb-style log wandb writes: 7-byte
    header, 32 KiB blocks, chunks `crc32(type + data)`, length, type (FULL/FIRST/MIDDLE/LAST),
    a block tail too short for a chunk header padded with zeros."""
    import zlib

    block, header = 32 * 1024, 7
    out = bytearray(b":W&B" + (0xBEE1).to_bytes(2, "little") + b"\x00")
    for payload in payloads:
        rest, first = payload, True
        while True:
            room = block - len(out) % block
            if room < header:
                out += b"\x00" * room
                room = block
            piece, rest = rest[: room - header], rest[room - header :]
            kind = (1 if not rest else 2) if first else (4 if not rest else 3)
            crc = zlib.crc32(bytes([kind]) + piece)
            out += crc.to_bytes(4, "little") + len(piece).to_bytes(2, "little") + bytes([kind])
            out += piece
            first = False
            if not rest:
                break
    return bytes(out)


def write_with_old_clock(source: Path, target: Path, seconds: float) -> None:
    """Copy the run file `source` to `target` with every logged time (run start, history
    and summary `_timestamp`) moved `seconds` into the past, and mtime/atime as well:
    the file of a run that finished `seconds` ago."""
    from wandb.proto import wandb_internal_pb2

    payloads = []
    for _, payload in iter_records(source):
        record = wandb_internal_pb2.Record.FromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            record.run.start_time.seconds -= int(seconds)
        items = {"history": record.history.item, "summary": record.summary.update}.get(kind, [])
        for item in items:
            key = item.key or ".".join(item.nested_key)
            if key == "_timestamp":
                item.value_json = json.dumps(float(json.loads(item.value_json)) - seconds)
        payloads.append(record.SerializeToString())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_frame_records(payloads))
    stamp = int((time.time() - seconds) * 1e9)
    os.utime(target, ns=(stamp, stamp))


def test_old_clock_copy_reads_back_shifted(logged: dict[str, Any], tmp_path: Path) -> None:
    hours = 3 * 3600.0
    target = tmp_path / "run-old.wandb"
    write_with_old_clock(logged["path"], target, hours)
    new, old = read_run_file(logged["path"]), read_run_file(target)
    assert old.run_id == new.run_id and old.exit_code == new.exit_code == 0
    assert old.start_time is not None and new.start_time is not None
    assert (new.start_time - old.start_time).total_seconds() == pytest.approx(hours, abs=1)
    assert old.last_timestamp is not None and new.last_timestamp is not None
    assert (new.last_timestamp - old.last_timestamp).total_seconds() == pytest.approx(hours, abs=1)
    shifted = old.history["_timestamp"].to_numpy() + hours
    np.testing.assert_allclose(shifted, new.history["_timestamp"].to_numpy(), rtol=0, atol=1e-3)
    assert time.time() - target.stat().st_mtime > hours - 60
