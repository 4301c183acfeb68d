"""The reader's own protobuf decoding of `.wandb` records against wandb's protobuf classes.

wandb's generated classes (`wandb_internal_pb2`) are the reference here; the reader itself
never imports wandb (checked in a subprocess at the end).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2 as pb

from rts_dagster.sources import wandb_file
from rts_dagster.sources.wandb_file import (
    RecordLog,
    WandbFileError,
    iter_records,
    read_run_file,
    scan_run_file,
    wait_for_exit_record,
)
from rts_dagster_tests.sources.test_wandb_file import _frame_records, _wandb_env

PATH = "mem.wandb"
OFFSET = 7

# --- our decoder, the reference, raw wire bytes ---------------------------------------------


def ours(payload: bytes) -> tuple[str | None, Any]:
    """`(record type, decoded member)` of one serialized Record, by the reader's decoder."""
    log = RecordLog(
        path=PATH,
        data=payload,
        offsets=np.array([OFFSET]),
        starts=np.array([0]),
        ends=np.array([len(payload)]),
        in_blob=np.array([False]),
        blob=b"",
        truncated=False,
    )
    return wandb_file._parse_record(log, 0)


def _config(record: Any) -> wandb_file._ConfigRecord:
    def items(repeated: Any) -> tuple[wandb_file._ConfigItem, ...]:
        return tuple(
            wandb_file._ConfigItem(i.key, tuple(i.nested_key), i.value_json) for i in repeated
        )

    return wandb_file._ConfigRecord(items(record.update), items(record.remove))


def reference(payload: bytes) -> tuple[str | None, Any]:
    """The same through wandb's protobuf classes (raises protobuf's DecodeError)."""
    rec = pb.Record.FromString(payload)
    kind = rec.WhichOneof("record_type")
    if kind == "run":
        run = rec.run
        return kind, wandb_file._RunInfo(
            run_id=run.run_id,
            entity=run.entity,
            project=run.project,
            display_name=run.display_name,
            tags=tuple(run.tags),
            start_seconds=run.start_time.seconds,
            start_nanos=run.start_time.nanos,
            config=_config(run.config),
        )
    if kind == "config":
        return kind, _config(rec.config)
    if kind == "exit":
        return kind, wandb_file._ExitInfo(rec.exit.exit_code, rec.exit.runtime)
    if kind == "history":
        items = rec.history.item
        return kind, [(".".join(i.nested_key) or i.key, i.value_json) for i in items]
    return kind, None


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers: two's complement, 10 bytes
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, body: bytes) -> bytes:
    """A length-delimited field."""
    return tag(number, 2) + varint(len(body)) + body


def vi(number: int, value: int) -> bytes:
    """A varint field."""
    return tag(number, 0) + varint(value)


# --- field numbers --------------------------------------------------------------------------

F = FieldDescriptor
SCHEMA = {  # (message, field): (number, type, repeated), as the decoder reads them
    ("Record", "num"): (1, F.TYPE_INT64, False),
    ("RunRecord", "run_id"): (1, F.TYPE_STRING, False),
    ("RunRecord", "entity"): (2, F.TYPE_STRING, False),
    ("RunRecord", "project"): (3, F.TYPE_STRING, False),
    ("RunRecord", "config"): (4, F.TYPE_MESSAGE, False),
    ("RunRecord", "display_name"): (8, F.TYPE_STRING, False),
    ("RunRecord", "tags"): (10, F.TYPE_STRING, True),
    ("RunRecord", "start_time"): (17, F.TYPE_MESSAGE, False),
    ("ConfigRecord", "update"): (1, F.TYPE_MESSAGE, True),
    ("ConfigRecord", "remove"): (2, F.TYPE_MESSAGE, True),
    ("ConfigItem", "key"): (1, F.TYPE_STRING, False),
    ("ConfigItem", "nested_key"): (2, F.TYPE_STRING, True),
    ("ConfigItem", "value_json"): (16, F.TYPE_STRING, False),
    ("RunExitRecord", "exit_code"): (1, F.TYPE_INT32, False),
    ("RunExitRecord", "runtime"): (2, F.TYPE_INT32, False),
    ("HistoryRecord", "item"): (1, F.TYPE_MESSAGE, True),
    ("HistoryItem", "key"): (1, F.TYPE_STRING, False),
    ("HistoryItem", "nested_key"): (2, F.TYPE_STRING, True),
    ("HistoryItem", "value_json"): (16, F.TYPE_STRING, False),
}
MESSAGE_TYPES = {
    ("RunRecord", "config"): "wandb_internal.ConfigRecord",
    ("RunRecord", "start_time"): "google.protobuf.Timestamp",
    ("ConfigRecord", "update"): "wandb_internal.ConfigItem",
    ("ConfigRecord", "remove"): "wandb_internal.ConfigItem",
    ("HistoryRecord", "item"): "wandb_internal.HistoryItem",
}


def test_field_numbers_match_wandb_descriptors() -> None:
    for (message, name), (number, kind, repeated) in SCHEMA.items():
        field = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name[name]
        assert (field.number, field.type) == (number, kind), (message, name)
        assert (field.label == F.LABEL_REPEATED) == repeated, (message, name)
        if (message, name) in MESSAGE_TYPES:
            assert field.message_type.full_name == MESSAGE_TYPES[message, name]
    timestamp = pb.RunRecord.DESCRIPTOR.fields_by_name["start_time"].message_type
    assert [(f.name, f.number, f.type) for f in timestamp.fields] == [
        ("seconds", 1, F.TYPE_INT64),
        ("nanos", 2, F.TYPE_INT32),
    ]
    # The record_type oneof, complete: every member is a message (read as length-delimited).
    oneof = pb.Record.DESCRIPTOR.oneofs_by_name["record_type"]
    assert {f.number: f.name for f in oneof.fields} == wandb_file.RECORD_TYPES
    assert all(f.type == F.TYPE_MESSAGE for f in oneof.fields)
    fields = pb.Record.DESCRIPTOR.fields_by_name
    assert fields["control"].number == 16 and fields["control"].containing_oneof is None
    # The classification by first tag (wandb_file.TAG_HISTORY, SKIPPED_TAGS) agrees too.
    number = {name: n for n, name in wandb_file.RECORD_TYPES.items()}
    assert number["history"] << 3 | 2 == wandb_file.TAG_HISTORY
    skipped = ["summary", "output", "files", "stats", "tbrecord", "telemetry", "metric"]
    assert tuple(number[k] << 3 | 2 for k in [*skipped, "output_raw"]) == wandb_file.SKIPPED_TAGS


# --- real runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run written by wandb with unicode names, a nested config updated mid-run (a config
    record), nested-dict rows (the record-by-record history path) and exit code -3."""
    import wandb

    root = tmp_path_factory.mktemp("meta")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _wandb_env(root).items():
            mp.setenv(key, value)
        run = wandb.init(
            id="meta-run",
            dir=root,
            project="prøject",
            entity="ëntity",
            name="名前 ✓ ünï",
            tags=["ü-tag", "t" * 64],
            config={"lr": 1e-3, "ünï": {"déep": {"x": [1, 2, None]}}, "empty": "", "y": "y" * 300},
        )
        for i in range(5):
            run.log({"a": i / 2, "nested": {"inner": float(i), "ß": -i}}, step=i)
            if i == 2:
                run.config.update({"late": {"a": 1}, "lr": 2e-3}, allow_val_change=True)
        run.finish(exit_code=-3)
    (path,) = root.glob("wandb/offline-run-*-meta-run/run-meta-run.wandb")
    wait_for_exit_record(path)
    return path


def _run_files(tiny_offline_dir: Path, written: Path) -> list[Path]:
    return [*sorted(tiny_offline_dir.rglob("run-*.wandb")), written]


def test_every_record_of_real_runs_decodes_as_protobuf_does(
    tiny_offline_dir: Path, written: Path
) -> None:
    kinds: Counter[str | None] = Counter()
    for path in _run_files(tiny_offline_dir, written):
        for offset, payload in iter_records(path):
            got = ours(payload)
            assert got == reference(payload), (path, offset)
            kinds[got[0]] += 1
    for kind in ("run", "exit", "config", "history", "header", "summary"):
        assert kinds[kind], kind


def reference_metadata(path: Path) -> dict[str, Any]:
    """What the reader reported before it had its own decoder: `_read_meta` through
    protobuf (every record parsed, first run record, config records in order)."""
    run, config, exit_code = None, {}, None
    for _, payload in iter_records(path):
        rec = pb.Record.FromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run" and run is None:
            run = rec.run
            wandb_file._apply_config(config, rec.run.config)  # duck-typed: same attributes
        elif kind == "config":
            wandb_file._apply_config(config, rec.config)
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    config.pop("_wandb", None)
    assert run is not None
    ts = run.start_time
    return {
        "run_id": run.run_id,
        "display_name": run.display_name,
        "project": run.project,
        "entity": run.entity,
        "tags": tuple(run.tags),
        "config": config,
        "start_time": wandb_file._timestamp_utc(ts.seconds, ts.nanos),
        "exit_code": exit_code,
    }


def test_read_and_scan_report_what_protobuf_reads(tiny_offline_dir: Path, written: Path) -> None:
    for path in _run_files(tiny_offline_dir, written):
        want = reference_metadata(path)
        for reader in (scan_run_file, read_run_file):
            got = reader(path)
            assert {k: getattr(got, k) for k in want} == want, (reader, path)
    run = read_run_file(written)
    assert (run.display_name, run.project, run.entity) == ("名前 ✓ ünï", "prøject", "ëntity")
    assert run.tags == ("ü-tag", "t" * 64)
    assert run.config == {
        "lr": 2e-3,
        "ünï": {"déep": {"x": [1, 2, None]}},
        "empty": "",
        "y": "y" * 300,
        "late": {"a": 1},
    }
    assert run.exit_code == -3 and run.state == "failed"
    assert run.history is not None and run.history["nested.inner"].to_list() == [0, 1, 2, 3, 4]


def test_history_items_decode_as_protobuf_does(written: Path) -> None:
    """The record-by-record history path (nested-dict rows go there) against protobuf."""
    log = wandb_file.open_record_log(written)
    hist = np.flatnonzero(wandb_file._record_tags(log) == wandb_file.TAG_HISTORY)
    assert hist.size == 5
    for i in hist.tolist():
        want = reference(log.payload(i))[1]
        assert wandb_file._history_items_slow(log, i) == want
        assert any(key == "nested.ß" for key, _ in want)


# --- records built with protobuf, and raw wire bytes -----------------------------------------


def _record(**members: Any) -> pb.Record:
    rec = pb.Record()
    for name, fill in members.items():
        getattr(rec, name).SetInParent()
        if fill is not None:
            fill(getattr(rec, name))
    return rec


def _fill_run(run: Any) -> None:
    run.run_id, run.entity, run.project = "r-1", "ëntity", ""
    run.display_name = "名前"
    run.notes, run.host, run.starting_step = "skipped", "h", 7  # fields not read
    run.tags.extend(["ü", "", "t" * 300])
    run.start_time.seconds, run.start_time.nanos = 1_700_000_000, 123_456_789
    up = run.config.update
    up.add(key="a", value_json="1")
    up.add(nested_key=["b", "c"], value_json='{"d": 2}')
    up.add(key="", value_json="")
    up.add(key="ünï", nested_key=["x", "ß"], value_json='"ß"')
    run.config.remove.add(key="a")
    run.config.remove.add(nested_key=["b", "c"])
    run.telemetry.python_version = "3.12"
    run.settings.SetInParent()


def _fill_config(config: Any) -> None:
    config.update.add(key="k", value_json="[1, 2]")
    config.remove.add(nested_key=["p", "q", "r"])


def _fill_history(history: Any) -> None:
    history.item.add(key="a", value_json="1.5")
    history.item.add(nested_key=["n", "ü"], value_json="NaN")
    history.item.add(key="", value_json="")
    history.item.add(key="t", text="not read", value_json='"x"')
    history.step.num = 3


def _exit(code: int, runtime: int = 0) -> pb.Record:
    return _record(exit=lambda e: (setattr(e, "exit_code", code), setattr(e, "runtime", runtime)))


def _built_records() -> dict[str, bytes]:
    run = _record(run=_fill_run).SerializeToString()
    cases = {
        "run": run,
        "run with num and control": pb.Record(
            num=5, control=pb.Control(local=True)
        ).SerializeToString()
        + ld(17, ld(1, b"x")),
        "empty run": _record(run=None).SerializeToString(),
        "config": _record(config=_fill_config).SerializeToString(),
        "history": _record(history=_fill_history).SerializeToString(),
        "no record type": pb.Record(num=3, uuid="u").SerializeToString(),
        "empty payload": b"",
    }
    for code in (0, 1, -1, -3, 2**31 - 1, -(2**31)):
        cases[f"exit {code}"] = _exit(code, runtime=-(code // 3)).SerializeToString()
    for member in pb.Record.DESCRIPTOR.oneofs_by_name["record_type"].fields:
        cases[f"member {member.name}"] = _record(**{member.name: None}).SerializeToString()
    unknown = vi(1000, 5) + tag(1001, 1) + b"8 bytes!" + tag(1002, 5) + b"4byt" + ld(1003, b"\xff")
    cases |= {
        "unknown fields around": unknown + run + unknown,
        "unknown fields in the run": ld(17, unknown + ld(1, b"id") + unknown + ld(4, unknown)),
        "unknown fields in items": ld(5, ld(1, unknown + ld(1, b"k") + unknown)),
        "unknown field in exit": ld(18, vi(1, 4) + unknown + vi(3, 1)),
        "largest field number": vi(2**29 - 1, 1) + run,
        # oneof: the last member wins; the same member repeated is merged
        "run twice: merged": ld(17, ld(1, b"a") + ld(10, b"t1"))
        + ld(17, ld(2, b"e") + ld(10, b"t2")),
        "run then exit": run + _exit(2).SerializeToString(),
        "exit, run, run": _exit(2).SerializeToString() + ld(17, ld(1, b"a")) + ld(17, ld(3, b"p")),
        "run, exit, run: not merged": ld(17, ld(1, b"a")) + ld(18, b"") + ld(17, ld(2, b"e")),
        "history then header": _record(history=_fill_history).SerializeToString() + ld(21, b""),
        "config twice": ld(5, ld(1, ld(1, b"a"))) + ld(5, ld(2, ld(1, b"a"))),
        "start_time merged": ld(17, ld(17, vi(1, 5))) + ld(17, ld(17, vi(2, 6))),
        "config in the run twice": ld(17, ld(4, ld(1, ld(1, b"a"))) + ld(4, ld(1, ld(1, b"b")))),
        # scalars and strings: the last value wins
        "run_id twice": ld(17, ld(1, b"first") + ld(1, b"second")),
        "exit code twice": ld(18, vi(1, 3) + vi(1, 4) + vi(2, 1)),
        "value_json twice": ld(5, ld(1, ld(16, b"1") + ld(16, b"2"))),
        # a known field of another wire type is an unknown field
        "run as a varint": ld(17, ld(1, b"a")) + vi(17, 5),
        "run as fixed32 only": tag(17, 5) + b"abcd",
        "run_id as a varint": ld(17, vi(1, 5) + ld(2, b"e")),
        "exit code as fixed64": ld(18, tag(1, 1) + b"\x01" * 8 + vi(2, 9)),
        "start_time as a varint": ld(17, vi(17, 5)),
        # integers: two's complement, int32 keeps the low 32 bits, non-canonical varints
        "int32 from 2**32 + 5": ld(18, vi(1, 2**32 + 5)),
        "int32 from 2**63": ld(18, vi(1, 2**63 + 2**31)),
        "10-byte varint, extra bits dropped": ld(18, b"\x08" + b"\xff" * 9 + b"\x7f"),
        "int32 as 5 bytes": ld(18, b"\x08\xff\xff\xff\xff\x0f"),
        "padded varint": ld(18, b"\x08\x85\x80\x80\x80\x80\x80\x80\x80\x80\x00"),
        "padded tag and length": b"\x88\x80\x80\x80\x00\x01"
        + tag(17, 2)
        + b"\x83\x80\x00"
        + ld(1, b"a"),
        "negative start time": ld(17, ld(17, vi(1, -5) + vi(2, -7))),
        "nanos from 2**33 + 3": ld(17, ld(17, vi(2, 2**33 + 3))),
    }
    return cases


BUILT = _built_records()


@pytest.mark.parametrize("name", list(BUILT))
def test_built_record_decodes_as_protobuf_does(name: str) -> None:
    payload = BUILT[name]
    assert ours(payload) == reference(payload)


def test_built_records_say_what_they_were_built_for() -> None:
    # Guards the comparisons above: the interesting values are really there.
    run = ours(BUILT["run"])[1]
    assert run.tags == ("ü", "", "t" * 300) and run.display_name == "名前"
    assert run.config.update[3] == wandb_file._ConfigItem("ünï", ("x", "ß"), '"ß"')
    assert run.config.remove[1].nested_key == ("b", "c")
    assert ours(BUILT["exit -3"]) == ("exit", wandb_file._ExitInfo(-3, 1))
    assert len(BUILT["exit -3"]) > 12  # a negative int32 takes 10 bytes
    assert ours(BUILT["run twice: merged"])[1].tags == ("t1", "t2")
    assert ours(BUILT["run, exit, run: not merged"])[1] == wandb_file._RunInfo(entity="e")
    assert ours(BUILT["history then header"]) == ("header", None)
    assert ours(BUILT["start_time merged"])[1].start_seconds == 5
    assert ours(BUILT["int32 from 2**32 + 5"])[1].exit_code == 5
    assert ours(BUILT["no record type"]) == (None, None)


def test_config_of_a_file_with_removals_and_nested_keys(tmp_path: Path) -> None:
    run = _record(run=_fill_run)
    later = [
        _record(config=_fill_config),
        _record(config=lambda c: c.update.add(nested_key=["b", "e"], value_json="3")),
        _record(config=lambda c: c.remove.add(key="missing")),
        _record(config=lambda c: c.remove.add(nested_key=["no", "such"])),
        _record(history=_fill_history),
    ]
    payloads = [r.SerializeToString() for r in [run, *later]] + [_exit(-7, 60).SerializeToString()]
    path = tmp_path / "run-built.wandb"
    path.write_bytes(_frame_records(payloads))
    want = reference_metadata(path)
    for reader in (scan_run_file, read_run_file):
        got = reader(path)
        assert {k: getattr(got, k) for k in want} == want
    # nested_key, when given, wins over key
    assert want["config"] == {"": None, "x": {"ß": "ß"}, "k": [1, 2], "b": {"e": 3}}
    assert want["exit_code"] == -7


# --- malformed bytes ----------------------------------------------------------------------------

BAD_UTF8 = {
    "0xff": b"\xff",
    "overlong": b"\xc0\x80",
    "surrogate": b"\xed\xa0\x80",
    "above U+10FFFF": b"\xf4\x90\x80\x80",
    "cut sequence": b"ok\xe2\x82",
}


def _bad_strings() -> dict[str, bytes]:
    """A bad UTF-8 string in each string field that is read."""
    cases = {}
    for what, bad in BAD_UTF8.items():
        item = {n: ld(n, bad) for n in (1, 2, 16)}
        for number, name in ((1, "run_id"), (2, "entity"), (3, "project"), (8, "display_name")):
            cases[f"{what} in {name}"] = ld(17, ld(number, bad))
        cases[f"{what} in a tag"] = ld(17, ld(10, b"fine") + ld(10, bad))
        for n, name in ((1, "key"), (2, "nested_key"), (16, "value_json")):
            cases[f"{what} in a run config {name}"] = ld(17, ld(4, ld(1, item[n])))
            cases[f"{what} in a config removal {name}"] = ld(5, ld(2, item[n]))
            cases[f"{what} in a history item {name}"] = ld(2, ld(1, item[n]))
        cases[f"{what} in a superseded run_id"] = ld(17, ld(1, bad) + ld(1, b"fine"))
    return cases


# (payload, protobuf rejects it too)
MALFORMED: dict[str, tuple[bytes, bool]] = {
    "truncated field": (ld(17, ld(1, b"abc"))[:-1], True),
    "truncated inside the run": (ld(17, b"\x0a\x05ab"), True),
    "truncated varint": (b"\x08\xff", True),
    "truncated tag": (b"\x80", True),
    "11-byte varint": (b"\x08" + b"\xff" * 10 + b"\x01", True),
    "11-byte varint in the exit record": (ld(18, b"\x08" + b"\xff" * 10 + b"\x01"), True),
    "truncated fixed64": (tag(50, 1) + b"1234", True),
    "truncated fixed32": (tag(50, 5) + b"12", True),
    "length past the end": (tag(50, 2) + varint(2**40), True),
    "negative length": (tag(50, 2) + varint(-1), True),
    "field number 0": (b"\x00\x00", True),
    "field number 0, two-byte tag": (b"\x80\x00\x00", True),
    "field number 2**29": (vi(2**29, 0), True),
    "6-byte tag": (b"\x88\x80\x80\x80\x80\x00\x00", True),
    "wire type 6": (b"\x0e", True),
    "wire type 7": (ld(17, b"\x0f"), True),
    "end group without a start": (tag(50, 4), True),
    "unterminated group": (tag(50, 3), True),
    # protobuf skips a well-formed group as an unknown field; groups are deprecated and no
    # writer of these files uses them, so the reader refuses them (less code, one rule)
    "unknown group": (tag(50, 3) + vi(1, 1) + tag(50, 4), False),
    "group with the run's field number": (tag(17, 3) + tag(17, 4), False),
    "group in the run": (ld(17, tag(50, 3) + tag(50, 4)), False),
    **{name: (payload, True) for name, payload in _bad_strings().items()},
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_record_names_file_and_offset(name: str) -> None:
    payload, protobuf_rejects = MALFORMED[name]
    with pytest.raises(WandbFileError) as info:
        ours(payload)
    err = info.value
    assert (err.path, err.offset) == (PATH, OFFSET)
    assert err.problem.startswith("undecodable record (") and err.problem.endswith(")")
    assert str(err) == f"{PATH}: {err.problem} at byte offset {OFFSET}"
    if protobuf_rejects:
        with pytest.raises(DecodeError):
            pb.Record.FromString(payload)
    else:
        pb.Record.FromString(payload)
        assert "group" in err.problem


# protobuf checks every field it knows; the reader looks only at what it reads, so it takes
# these records that protobuf rejects (a CRC-valid file with them has a buggy writer).
LENIENT = {
    "bad UTF-8 in run notes": (ld(17, ld(9, b"\xff") + ld(1, b"id")), wandb_file._RunInfo("id")),
    "bad UTF-8 in Record.uuid": (ld(19, b"\xff") + ld(18, vi(1, 2)), wandb_file._ExitInfo(2)),
    "malformed run settings": (ld(17, ld(11, b"\xff")), wandb_file._RunInfo()),
    "malformed header": (ld(21, b"\xff"), None),
    "bad UTF-8 in a history item's text": (ld(2, ld(1, ld(7, b"\xff") + ld(1, b"k"))), [("k", "")]),
    "a run in two parts, each malformed": (
        ld(17, b"\x0a\x02") + ld(17, b"ab"),
        wandb_file._RunInfo("ab"),
    ),
}


@pytest.mark.parametrize("name", list(LENIENT))
def test_fields_not_read_are_not_checked(name: str) -> None:
    payload, want = LENIENT[name]
    with pytest.raises(DecodeError):
        pb.Record.FromString(payload)
    assert ours(payload)[1] == want


def test_malformed_record_in_a_file_names_the_file_and_record(tmp_path: Path) -> None:
    header = _record(header=None).SerializeToString()
    good_run = _record(run=_fill_run).SerializeToString()
    nested_row = _record(history=_fill_history).SerializeToString()  # record-by-record path
    for bad in (ld(17, ld(1, b"\xff")), ld(2, ld(1, ld(2, b"a") + ld(2, b"\xff"))), b"\x08\xff"):
        payloads = [header, good_run, nested_row, bad]
        path = tmp_path / "run-bad.wandb"
        path.write_bytes(_frame_records(payloads))
        bad_offset = 7 + sum(7 + len(p) for p in payloads[:-1])  # all in the first block
        for reader in (scan_run_file, read_run_file):
            with pytest.raises(WandbFileError) as info:
                reader(path)
            err = info.value
            assert (err.path, err.offset) == (str(path), bad_offset), reader
            assert err.problem.startswith("undecodable record (")


def _damaged(payload: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(payload)
    how = int(rng.integers(4))
    if how == 0 or not data:  # a few bytes changed
        for _ in range(int(rng.integers(1, 4))):
            if data:
                data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
    elif how == 1:  # one bit flipped
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    elif how == 2:  # cut
        del data[int(rng.integers(len(data))) :]
    else:  # random bytes inserted
        at = int(rng.integers(len(data) + 1))
        data[at:at] = rng.bytes(int(rng.integers(1, 6)))
    return bytes(data)


def test_damaged_records_fail_cleanly_or_decode_as_protobuf_does(
    tiny_offline_dir: Path, written: Path
) -> None:
    by_kind: dict[str | None, list[bytes]] = {}
    for path in _run_files(tiny_offline_dir, written):
        for _, payload in iter_records(path):
            by_kind.setdefault(ours(payload)[0], []).append(payload)
    pool = [p for payloads in by_kind.values() for p in payloads[:20]]
    pool += list(BUILT.values())
    rng = np.random.default_rng(2024)
    outcomes: Counter[str] = Counter()
    for _ in range(4000):
        payload = _damaged(pool[int(rng.integers(len(pool)))], rng)
        try:
            want = reference(payload)
        except DecodeError:
            want = None
        try:
            got = ours(payload)  # anything but WandbFileError fails the test
        except WandbFileError as exc:
            assert (exc.path, exc.offset) == (PATH, OFFSET)
            # where protobuf decodes it, only a group is refused by the reader alone
            assert want is None or "group" in exc.problem, payload
            outcomes["both refuse" if want is None else "group"] += 1
            continue
        if want is not None:
            assert got == want, payload
        outcomes["both decode" if want is not None else "lenient"] += 1
    assert outcomes["both decode"] > 500 and outcomes["both refuse"] > 500, outcomes


def test_cut_records_fail_exactly_where_protobuf_fails(written: Path) -> None:
    # Every cut of real run, config, exit and history records: either both decoders refuse
    # it or both read the same (a cut between two top-level fields is a valid record).
    for _, payload in iter_records(written):
        if ours(payload)[0] not in ("run", "config", "exit", "history"):
            continue
        for cut in range(len(payload)):
            try:
                want = reference(payload[:cut])
            except DecodeError:
                with pytest.raises(WandbFileError):
                    ours(payload[:cut])
            else:
                assert ours(payload[:cut]) == want


# --- no wandb import ------------------------------------------------------------------------------


def test_reading_run_files_never_imports_wandb(tiny_offline_dir: Path, written: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from rts_dagster.sources.offline import OfflineRunSource
        from rts_dagster.sources.wandb_file import read_run_file, scan_run_file

        for path in sys.argv[2:]:
            scan, run = scan_run_file(path), read_run_file(path)
            assert scan.run_id and scan.config and scan.exit_code is not None
            assert run.history is not None and run.history.height
        source = OfflineRunSource(sys.argv[1])
        runs, unreadable = source.list_runs()
        assert runs and not unreadable
        source.read_history(runs[0])
        loaded = [m for m in sys.modules if m.split(".")[0] == "wandb" or "protobuf" in m]
        assert not loaded, loaded
        print("no wandb")
        """
    )
    tiny = next(tiny_offline_dir.rglob("run-*.wandb"))
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_offline_dir), str(tiny), str(written)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no wandb"
