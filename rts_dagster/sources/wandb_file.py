"""Read `.wandb` run files (wandb's transaction log) without wandb's reader or a server.

File layout, verified against files written by wandb 0.31 (unchanged since 0.19):

- a 7-byte header: `:W&B`, uint16 LE 0xBEE1, uint8 version 0;
- LevelDB-log framing in 32 KiB blocks counted from the start of the file: each chunk has a
  7-byte header (uint32 LE zlib crc32 of the type byte + payload, uint16 LE payload length,
  uint8 type 1 full / 2 first / 3 middle / 4 last); a block with < 7 bytes left is padding;
- each logical record is a serialized `wandb.proto.wandb_internal_pb2.Record`.

Why it is fast (a 100k-row run is ~460 MB, half of it summary records):

- chunk headers are walked for all 32 KiB blocks at once with numpy, and CRCs are checked
  with one zlib pass per block (see `_bad_crcs`), on a worker thread;
- records are classified by peeking at their first field tag, so summary records are never
  decoded, and the few metadata records (run, config, exit) are decoded by a small
  pure-Python protobuf reader (`_wire`): importing wandb's classes costs ~0.45 s;
- history items are found by a vectorised protobuf walk, 16 MB at a time on 2 threads; their
  key/value bytes become Arrow binary views over the file buffer (no copies), arrow
  dictionary-encodes the keys, polars parses the numbers, numpy scatters them into columns.

Records the vectorised walk does not recognise (nested-dict keys, unexpected fields) are
decoded one by one by that reader: the result is the same either way. Reading a file never
imports wandb.
"""

from __future__ import annotations

import functools
import itertools
import json
import mmap
import os
import stat
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from rts_dagster.sources import _wire
from rts_dagster.sources.base import RunReadError

MAGIC = b":W&B"
IDENT = 0xBEE1
VERSION = 0
FILE_HEADER_LEN = 7
BLOCK_LEN = 32 * 1024
CHUNK_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4

# First field tag of a Record after `num`: fields are serialized in field-number order, so
# for every record type numbered below `control` (16) the type is the first field.
TAG_HISTORY = 0x12  # field 2, length-delimited
# Numerous record types never needed here: summary, output, files, stats, tbrecord,
# telemetry, metric, output_raw. Other records (run, exit, config, ...) are few: decoded.
SKIPPED_TAGS = (0x1A, 0x22, 0x32, 0x3A, 0x4A, 0x5A, 0x62, 0x6A)

STATE_FINISHED = "finished"
STATE_FAILED = "failed"
STATE_RUNNING = "running"
STATE_CRASHED = "crashed"
DEFAULT_RUNNING_GRACE_S = 300.0

ALWAYS_KEPT = ("_step", "_timestamp")
HEAD_COLUMNS = ("_step", "_timestamp", "_runtime")

MMAP_MIN_BYTES = 1 << 20  # map bigger files instead of copying them
CHUNK_BYTES = 16 << 20  # history payload decoded per vectorised pass
THREADS = min(4, os.cpu_count() or 1)  # numpy, arrow, polars and zlib release the GIL
_NUMERIC_FIRST_BYTES = np.frombuffer(b"-0123456789NI", dtype=np.uint8)  # JSON number/NaN/Inf


class WandbFileError(RunReadError):
    """A `.wandb` file is corrupt or not a `.wandb` file; names the file and byte offset."""

    def __init__(self, path: str | os.PathLike[str], offset: int | None, problem: str) -> None:
        self.path = str(path)
        self.offset = offset
        self.problem = problem
        where = "" if offset is None else f" at byte offset {offset}"
        super().__init__(f"{self.path}: {problem}{where}")


@dataclass(frozen=True)
class RunFile:
    """What one `.wandb` file says about its run. `history` is None from `scan_run_file`."""

    path: str
    run_id: str
    display_name: str
    project: str
    entity: str
    tags: tuple[str, ...]
    config: dict[str, Any]  # run config as logged (nested dicts), without `_wandb`
    start_time: datetime | None  # UTC
    state: str  # finished | failed | running | crashed
    exit_code: int | None  # None without an exit record
    last_timestamp: datetime | None  # UTC: last history `_timestamp`, or end of run
    truncated: bool  # the file ends inside a record (killed writer, or still being written)
    num_history_rows: int
    size: int  # bytes read
    mtime_ns: int  # at the time of reading
    history: pl.DataFrame | None = field(default=None, repr=False, compare=False)


def _load(path: str) -> tuple[Any, os.stat_result]:
    """The file's bytes (memory-mapped when large: no copy) and its stat when opened.

    Regular files only, checked on the opened descriptor (no race with a swap): a FIFO is
    opened without blocking and refused, a link to `/dev/zero` is refused before reading.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise WandbFileError(path, None, f"cannot read file ({exc})") from exc
    try:
        with open(fd, "rb", closefd=True) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise WandbFileError(path, None, "not a regular file: not read")
            if st.st_size >= MMAP_MIN_BYTES:
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), st
            return f.read(st.st_size), st
    except (OSError, ValueError) as exc:
        raise WandbFileError(path, None, f"cannot read file ({exc})") from exc


# --------------------------------------------------------------------------------------
# Framing


@dataclass
class RecordLog:
    """The logical records of one `.wandb` file, in file order.

    A record is one FULL chunk (a slice of `data`) or FIRST..LAST chunks joined into `blob`.
    `truncated` is True when the file ends inside a record (that record is left out).
    """

    path: str
    data: Any  # bytes or mmap
    offsets: np.ndarray  # file offset of each record's first chunk header
    starts: np.ndarray  # payload start, in `blob` where `in_blob` else in `data`
    ends: np.ndarray
    in_blob: np.ndarray
    blob: bytes
    truncated: bool

    def __len__(self) -> int:
        return len(self.offsets)

    def payload(self, i: int) -> bytes:
        """The serialized `Record` number `i`."""
        src = self.blob if self.in_blob[i] else self.data
        return src[int(self.starts[i]) : int(self.ends[i])]

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """Yield `(byte offset, serialized Record)` for every record."""
        for i in range(len(self)):
            yield int(self.offsets[i]), self.payload(i)


def open_record_log(path: str | os.PathLike[str], data: Any = None) -> RecordLog:
    """Frame a `.wandb` file (or its bytes `data`) into records, checking every CRC.

    Raises `WandbFileError` naming the byte offset of a bad header, chunk type, length,
    sequence or CRC. A file cut inside a record (killed writer) stops cleanly before it.
    """
    path = str(path)
    if data is None:
        data, _ = _load(path)
    log, check_crcs = _frame(path, data)
    _raise_bad_crcs(path, check_crcs())
    return log


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """Yield `(byte offset, serialized Record)` for each whole record of a `.wandb` file."""
    yield from open_record_log(path)


def _raise_bad_crcs(path: str, bad: list[int]) -> None:
    if bad:
        raise WandbFileError(path, min(bad), "bad CRC in record")


def _frame(
    path: str, data: Any, pool: Executor | None = None
) -> tuple[RecordLog, Callable[[], list[int]]]:
    """Frame `data` into records; returns the log and a callable returning the offsets of
    chunks with a bad CRC. With a `pool`, the CRCs are checked there in the meantime."""
    if len(data) < FILE_HEADER_LEN or data[:4] != MAGIC or data[4:6] != IDENT.to_bytes(2, "little"):
        raise WandbFileError(path, None, "not a .wandb file (bad header)")
    if data[6] != VERSION:
        raise WandbFileError(path, 6, f"unsupported .wandb format version {data[6]}")
    buf = np.frombuffer(data, dtype=np.uint8)
    off, length, ctype, truncated_at, errors = _walk_chunks(buf)
    # FIRST must be followed by MIDDLE* LAST; MIDDLE and LAST need an open FIRST.
    if len(ctype):
        in_fragment = np.zeros(len(ctype), dtype=bool)
        in_fragment[1:] = (ctype[:-1] == FIRST) | (ctype[:-1] == MIDDLE)
        continuing = (ctype == MIDDLE) | (ctype == LAST)
        for o in off[in_fragment != continuing].tolist():
            errors.append((o, f"bad record sequence (chunk type {int(buf[o + 6])} out of order)"))
    if errors:  # the file is broken anyway: report its first problem, CRCs included
        errors.extend((o, "bad CRC in record") for o in _bad_crcs(data, off, length))
        offset, problem = min(errors)
        raise WandbFileError(path, offset, problem)
    check = functools.partial(_bad_crcs, data, off, length)
    if pool is not None:
        check = pool.submit(check).result

    truncated = truncated_at is not None
    if len(ctype) and ctype[-1] in (FIRST, MIDDLE):
        truncated = True  # the writer stopped inside a fragmented record: drop its pieces
        keep = int(np.flatnonzero(ctype == FIRST)[-1])
        off, length, ctype = off[:keep], length[:keep], ctype[:keep]

    first = np.flatnonzero((ctype == FULL) | (ctype == FIRST))
    starts = off[first] + CHUNK_HEADER_LEN
    ends = starts + length[first]
    in_blob = ctype[first] == FIRST
    # Fragmented records: all their chunk payloads joined into one blob in file order, so a
    # record spans from its FIRST chunk's blob offset to its LAST chunk's end.
    frag = np.flatnonzero(ctype != FULL)
    lo = off[frag] + CHUNK_HEADER_LEN
    hi = lo + length[frag]
    blob = b"".join(map(data.__getitem__, map(slice, lo.tolist(), hi.tolist())))
    blob_end = np.cumsum(length[frag])
    starts[in_blob] = (blob_end - length[frag])[ctype[frag] == FIRST]
    ends[in_blob] = blob_end[ctype[frag] == LAST]
    log = RecordLog(path, data, off[first], starts, ends, in_blob, blob, truncated)
    return log, check


def _walk_chunks(
    buf: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None, list[tuple[int, str]]]:
    """Chunk headers of all blocks, walked in parallel (each block is its own chain).

    Returns chunk offsets, payload lengths and types sorted by offset, the offset where the
    file is cut inside a chunk (or None) and framing errors as (offset, problem).
    """
    n = len(buf)
    nblocks = (n + BLOCK_LEN - 1) // BLOCK_LEN
    block_end = (np.arange(nblocks, dtype=np.int64) + 1) * BLOCK_LEN
    limit = np.minimum(block_end, n)
    cur = block_end - BLOCK_LEN
    cur[0] = FILE_HEADER_LEN
    active = np.arange(nblocks, dtype=np.int64)
    offs: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    types: list[np.ndarray] = []
    cut_at: list[int] = []
    zero_at: list[int] = []
    errors: list[tuple[int, str]] = []
    while active.size:
        c = cur[active]
        has_room = block_end[active] - c >= CHUNK_HEADER_LEN  # else: padding, block done
        avail = limit[active] - c
        partial_header = has_room & (avail > 0) & (avail < CHUNK_HEADER_LEN)
        cut_at.extend(c[partial_header].tolist())
        readable = has_room & (avail >= CHUNK_HEADER_LEN)
        active, c = active[readable], c[readable]
        if not active.size:
            break
        length = buf[c + 4].astype(np.int64) | (buf[c + 5].astype(np.int64) << 8)
        ctype = buf[c + 6]
        end = c + CHUNK_HEADER_LEN + length
        zero = (ctype == 0) & (length == 0) & ((buf[c] | buf[c + 1] | buf[c + 2] | buf[c + 3]) == 0)
        bad_type = ~zero & ((ctype < FULL) | (ctype > LAST))
        bad_len = ~zero & ~bad_type & (end > block_end[active])
        cut = ~zero & ~bad_type & ~bad_len & (end > n)
        zero_at.extend(c[zero].tolist())
        errors.extend((o, f"bad record type {int(buf[o + 6])}") for o in c[bad_type].tolist())
        errors.extend((o, "bad record length") for o in c[bad_len].tolist())
        cut_at.extend(c[cut].tolist())
        ok = ~(zero | bad_type | bad_len | cut)
        offs.append(c[ok])
        lens.append(length[ok])
        types.append(ctype[ok])
        active = active[ok]
        cur[active] = end[ok]
    off = np.concatenate(offs) if offs else np.zeros(0, np.int64)
    length = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    ctype = np.concatenate(types) if types else np.zeros(0, np.uint8)
    if zero_at:
        # All-zero space (preallocated, or a crash of the filesystem) may only end the file.
        z = min(zero_at)
        if buf[z:].any():
            errors.append((z, "zeroed chunk header inside the file"))
        else:
            cut_at.append(z)
            keep = off < z
            off, length, ctype = off[keep], length[keep], ctype[keep]
    order = np.argsort(off, kind="stable")
    return off[order], length[order], ctype[order], (min(cut_at) if cut_at else None), errors


# --------------------------------------------------------------------------------------
# CRC checks

_CRC_POLY = 0xEDB88320  # zlib's CRC-32 (reflected)
_ONES = 0xFFFFFFFF


@functools.cache
def _crc_tables() -> tuple[np.ndarray, np.ndarray]:
    """zlib's byte table, and for k < 16 byte-sliced tables of the linear map "append 2**k
    zero bytes" on the CRC register."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC_POLY), table >> 1)
    table = table.astype(np.uint32)
    basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
    images = table[basis & 0xFF] ^ (basis >> 8)  # one zero byte, applied to each basis bit
    powers = np.zeros((16, 4, 256), dtype=np.uint32)
    byte = np.arange(256)
    for k in range(16):
        for j in range(4):
            for bit in range(8):
                powers[k, j, ((byte >> bit) & 1) == 1] ^= images[8 * j + bit]
        images = _crc_apply(powers[k], images)  # 2**(k+1) zeros = 2**k zeros, twice
    return table, powers


def _crc_apply(tables: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (
        tables[0][v & 0xFF]
        ^ tables[1][(v >> 8) & 0xFF]
        ^ tables[2][(v >> 16) & 0xFF]
        ^ tables[3][v >> 24]
    )


def _crc_zeros(v: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The CRC registers `v` after appending `n` (< 65536) zero bytes to each."""
    powers = _crc_tables()[1]
    v = v.astype(np.uint32)
    for k in range(16):
        sel = np.flatnonzero((n >> k) & 1)
        if sel.size:
            v[sel] = _crc_apply(powers[k], v[sel])
    return v


def _bad_crcs(data: Any, off: np.ndarray, length: np.ndarray) -> list[int]:
    """Offsets of chunks whose stored CRC (of type byte + payload) does not match.

    One zlib pass per 32 KiB block instead of one call per chunk: the CRC register is
    linear, so the register over a block's bytes, from its first chunk's type byte to its
    last chunk's end, is predicted from the stored CRCs and the header bytes in between.
    Prediction and zlib's result differ by the sum of every chunk's CRC error, each times
    an invertible matrix: a block with one bad chunk always fails (several bad chunks
    cancel out with probability 2**-32, like a CRC collision). Failing blocks are checked
    chunk by chunk to name the offset.
    """
    if not len(off):
        return []
    table = _crc_tables()[0]
    buf = np.frombuffer(data, dtype=np.uint8)
    stored = _word_at(data, off, 4)
    end = off + CHUNK_HEADER_LEN + length
    block = off // BLOCK_LEN
    first = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
    last = np.r_[first[1:] - 1, len(off) - 1]
    span_start, span_end = off[first] + 6, end[last]
    block_of = np.repeat(np.arange(len(first)), np.diff(np.r_[first, len(off)]))
    after_payload = span_end[block_of] - end
    after_header = after_payload + length + 1  # a header's (crc, length) precede its M
    # Register over a header's 6 bytes; a block's first header lies before the span.
    head = np.zeros(len(off), dtype=np.uint32)
    inner = np.ones(len(off), dtype=bool)
    inner[first] = False
    h = np.zeros(int(inner.sum()), dtype=np.uint32)
    for j in range(6):
        h = table[(h ^ buf[off[inner] + j]) & 0xFF] ^ (h >> 8)
    head[inner] = h
    # crc32(M) == s  <=>  register(M, from 0) == s ^ ones ^ zeros**len(M)(ones)
    contrib = _crc_zeros(stored ^ np.uint32(_ONES), after_payload)
    contrib ^= _crc_zeros(head ^ np.uint32(_ONES), after_header)
    expected = np.bitwise_xor.reduceat(contrib, first)
    view = memoryview(data)
    try:
        actual = np.fromiter(
            (
                zlib.crc32(view[a:b], _ONES) ^ _ONES
                for a, b in zip(span_start.tolist(), span_end.tolist(), strict=True)
            ),
            dtype=np.uint32,
            count=len(first),
        )
    finally:
        view.release()
    bad: list[int] = []
    for blk in np.flatnonzero(expected != actual).tolist():
        for c in range(int(first[blk]), int(last[blk]) + 1):
            o = int(off[c])
            if zlib.crc32(data[o + 6 : o + CHUNK_HEADER_LEN + int(length[c])]) != int(stored[c]):
                bad.append(o)
    return bad


# --------------------------------------------------------------------------------------
# Vectorised protobuf helpers


def _word_at(data: Any, pos: np.ndarray, width: int) -> np.ndarray:
    """Little-endian uint32/uint64 (`width` 4 or 8) at each byte position, unaligned.

    Positions less than `width` bytes before the end read a clamped position: callers
    must not trust those words (they check `pos + width <= len(data)` themselves).
    """
    n = len(data)
    dtype = "<u4" if width == 4 else "<u8"
    if n < width or not len(pos):
        return np.zeros(len(pos), dtype=dtype)
    # A view with a 1-byte stride reads a word at any byte offset in one gather.
    words = np.ndarray(shape=(n - width + 1,), dtype=dtype, buffer=data, strides=(1,))
    return words[np.minimum(pos, n - width)]


def _varint(
    buf: np.ndarray, pos: np.ndarray, limit: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one varint at each `pos` (up to 8 bytes: values < 2**56).

    Returns (value, size, ok); `ok` is False where it is longer or runs past `limit`.
    """
    last = len(buf) - 1
    b0 = buf[np.minimum(pos, last)].astype(np.int64)
    value = b0.copy()
    size = np.ones(len(pos), dtype=np.int64)
    ok = pos < limit
    multi = np.flatnonzero(ok & (b0 >= 0x80))
    if multi.size:
        p, lim = pos[multi], limit[multi]
        val = b0[multi] & 0x7F
        done = np.zeros(multi.size, dtype=bool)
        sz = np.ones(multi.size, dtype=np.int64)
        for k in range(1, 8):
            live = ~done & (p + k < lim)
            b = buf[np.minimum(p + k, last)].astype(np.int64)
            val = np.where(live, val | ((b & 0x7F) << (7 * k)), val)
            ended = live & (b < 0x80)
            sz = np.where(ended, k + 1, sz)
            done |= ended
        value[multi] = val
        size[multi] = sz
        ok[multi] = done
    return value, size, ok


def _skip_field(
    buf: np.ndarray, pos: np.ndarray, limit: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the field at each `pos`: (field number, wire type, content start, end, ok).

    `end` is where the next field starts; content start means something for wire type 2.
    """
    tag, tsize, ok = _varint(buf, pos, limit)
    wire = tag & 7
    p = pos + tsize
    n, nsize, nok = _varint(buf, p, limit)
    start = p + nsize
    end = np.where(wire == 2, start + n, p)
    end = np.where(wire == 0, p + nsize, end)
    end = np.where(wire == 1, p + 8, end)
    end = np.where(wire == 5, p + 4, end)
    ok &= (wire == 2) | (wire == 0) | (wire == 1) | (wire == 5)
    ok &= np.where((wire == 2) | (wire == 0), nok, True)
    ok &= end <= limit
    return tag >> 3, wire, start, end, ok


_BYTE_MASKS = np.array([0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF], dtype=np.uint32)
_VIEW_WINDOW = 1 << 30


def _binary_views(
    data: Any, starts: np.ndarray, lens: np.ndarray, first4: np.ndarray | None = None
) -> pa.Array:
    """Arrow binary views of `data[starts[i] : starts[i] + lens[i]]`, pointing into `data`
    without copying it (values of <= 12 bytes are inlined, as Arrow requires).

    `first4` is each value's first 4 bytes as a uint32, when the caller already read them.
    """
    n = len(starts)
    size = len(data)
    views = np.zeros((n, 4), dtype="<u4")
    views[:, 0] = lens
    views[:, 1] = _word_at(data, starts, 4) if first4 is None else first4
    whole = pa.py_buffer(data)
    if size <= _VIEW_WINDOW:
        views[:, 3] = starts
        buffers = [whole]
    else:  # view offsets are int32: address big buffers through overlapping windows
        idx = starts // _VIEW_WINDOW
        views[:, 2] = idx
        views[:, 3] = starts - idx * _VIEW_WINDOW
        overlap = int(lens.max()) if n else 0
        buffers = [
            whole.slice(w * _VIEW_WINDOW, min(_VIEW_WINDOW + overlap, size - w * _VIEW_WINDOW))
            for w in range(int(idx.max()) + 1 if n else 1)
        ]
    inline = np.flatnonzero(lens <= 12)
    if inline.size:
        st, ln = starts[inline], lens[inline]
        views[inline, 1] &= _BYTE_MASKS[np.clip(ln, 0, 4)]
        for w in (1, 2):
            word = _word_at(data, st + 4 * w, 4) & _BYTE_MASKS[np.clip(ln - 4 * w, 0, 4)]
            views[inline, 1 + w] = word
        for i in inline[st + 12 > size].tolist():  # the buffer's last bytes: no word reads
            raw = bytes(data[int(starts[i]) : int(starts[i] + lens[i])]).ljust(12, b"\0")
            views[i, 1:] = np.frombuffer(raw, dtype="<u4")
    return pa.Array.from_buffers(pa.binary_view(), n, [None, pa.py_buffer(views), *buffers])


def _as_string_view(views: pa.Array) -> pa.Array:
    """The same views typed as UTF-8 strings, unchecked (only for parsing numbers)."""
    return pa.Array.from_buffers(pa.string_view(), len(views), views.buffers())


# --------------------------------------------------------------------------------------
# Records: classification and metadata

# The `record_type` oneof of `Record` (wandb 0.31): field number -> name. Every member is
# a message. Fields outside it (num 1, control 16, uuid 19, _info 200) are not read.
RECORD_TYPES = {
    2: "history",
    3: "summary",
    4: "output",
    5: "config",
    6: "files",
    7: "stats",
    8: "artifact",
    9: "tbrecord",
    10: "alert",
    11: "telemetry",
    12: "metric",
    13: "output_raw",
    17: "run",
    18: "exit",
    20: "final",
    21: "header",
    22: "footer",
    23: "preempting",
    24: "noop_link_artifact",
    25: "use_artifact",
    26: "environment",
    27: "output_logger",
    100: "request",
}


def _first_tags(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """First byte of each record's first field after `num` (-1 if there is none)."""
    if not len(starts) or not len(buf):
        return np.full(len(starts), -1, dtype=np.int64)
    last = len(buf) - 1
    has_num = (starts < ends) & (buf[np.minimum(starts, last)] == 0x08)
    _, size, ok = _varint(buf, starts + 1, ends)
    pos = np.where(has_num & ok, starts + 1 + size, starts)
    tag = buf[np.minimum(pos, last)].astype(np.int64)
    tag[(pos >= ends) | (has_num & ~ok)] = -1
    return tag


def _record_tags(log: RecordLog) -> np.ndarray:
    tags = np.full(len(log), -1, dtype=np.int64)
    for in_blob, src in ((False, log.data), (True, log.blob)):
        sel = np.flatnonzero(log.in_blob == in_blob)
        if sel.size:
            buf = np.frombuffer(src, dtype=np.uint8)
            tags[sel] = _first_tags(buf, log.starts[sel], log.ends[sel])
    return tags


@dataclass(frozen=True)
class _ConfigItem:
    """A `ConfigItem`: key=1, nested_key=2 (repeated), value_json=16 (strings)."""

    key: str = ""
    nested_key: tuple[str, ...] = ()
    value_json: str = ""


@dataclass(frozen=True)
class _ConfigRecord:
    """A `ConfigRecord`: update=1, remove=2 (repeated ConfigItem)."""

    update: tuple[_ConfigItem, ...] = ()
    remove: tuple[_ConfigItem, ...] = ()


@dataclass(frozen=True)
class _RunInfo:
    """What is used of a `RunRecord`: run_id=1, entity=2, project=3, config=4,
    display_name=8, tags=10 (repeated), start_time=17 (a Timestamp: seconds=1, nanos=2)."""

    run_id: str = ""
    entity: str = ""
    project: str = ""
    display_name: str = ""
    tags: tuple[str, ...] = ()
    start_seconds: int = 0
    start_nanos: int = 0
    config: _ConfigRecord = _ConfigRecord()


@dataclass(frozen=True)
class _ExitInfo:
    """A `RunExitRecord`: exit_code=1, runtime=2 (int32)."""

    exit_code: int = 0
    runtime: int = 0


# Decoders of the messages read here. Fields not read are skipped without looking inside
# (protobuf would check them too: see `_parse_record`). A field of the wrong wire type is
# an unknown field for protobuf, so each decoder checks the wire type it expects.


def _joined(parts: list[bytes]) -> bytes:
    """The bytes of a message field given `len(parts)` times: protobuf merges occurrences,
    the same as decoding their bytes concatenated (none: an empty message)."""
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _record_type(payload: bytes) -> tuple[str | None, bytes]:
    """A `Record`'s `record_type` and the bytes of that member, as protobuf reads a oneof:
    the last member present wins, merged with its occurrences since the previous member."""
    number, parts = 0, []
    for num, _, value in _wire.fields(payload):
        if isinstance(value, bytes) and num in RECORD_TYPES:
            if num != number:  # another member clears the one before
                number, parts = num, []
            parts.append(value)
    return (RECORD_TYPES[number], _joined(parts)) if number else (None, b"")


def _decode_item(body: bytes) -> tuple[str, tuple[str, ...], str]:
    """`(key, nested_key, value_json)` of a ConfigItem or a HistoryItem (same numbers;
    the HistoryItem `value` oneof, 3..8, is not read)."""
    key = value_json = ""
    nested: list[str] = []
    for number, _, value in _wire.fields(body):
        if isinstance(value, bytes):
            if number == 2:
                nested.append(_wire.string(value, 2))
            elif number == 16:
                value_json = _wire.string(value, 16)
            elif number == 1:
                key = _wire.string(value, 1)
    return key, tuple(nested), value_json


def _decode_config(body: bytes) -> _ConfigRecord:
    lists: dict[int, list[_ConfigItem]] = {1: [], 2: []}
    for number, _, value in _wire.fields(body):
        if isinstance(value, bytes) and number in lists:
            lists[number].append(_ConfigItem(*_decode_item(value)))
    return _ConfigRecord(update=tuple(lists[1]), remove=tuple(lists[2]))


def _decode_run(body: bytes) -> _RunInfo:
    text = {1: "", 2: "", 3: "", 8: ""}  # run_id, entity, project, display_name
    tags: list[str] = []
    config: list[bytes] = []
    start: list[bytes] = []
    for number, _, value in _wire.fields(body):
        if not isinstance(value, bytes):
            continue
        if number in text:
            text[number] = _wire.string(value, number)
        elif number == 10:
            tags.append(_wire.string(value, 10))
        elif number == 4:
            config.append(value)
        elif number == 17:
            start.append(value)
    seconds = nanos = 0
    for number, wire, value in _wire.fields(_joined(start)):
        if wire == _wire.VARINT and number == 1:
            seconds = _wire.int64(value)  # type: ignore[arg-type]
        elif wire == _wire.VARINT and number == 2:
            nanos = _wire.int32(value)  # type: ignore[arg-type]
    return _RunInfo(
        run_id=text[1],
        entity=text[2],
        project=text[3],
        display_name=text[8],
        tags=tuple(tags),
        start_seconds=seconds,
        start_nanos=nanos,
        config=_decode_config(_joined(config)),
    )


def _decode_exit(body: bytes) -> _ExitInfo:
    exit_code = runtime = 0
    for number, wire, value in _wire.fields(body):
        if wire == _wire.VARINT and number == 1:
            exit_code = _wire.int32(value)  # type: ignore[arg-type]
        elif wire == _wire.VARINT and number == 2:
            runtime = _wire.int32(value)  # type: ignore[arg-type]
    return _ExitInfo(exit_code, runtime)


def _decode_history(body: bytes) -> list[tuple[str, str]]:
    """`(key, value_json)` of each item of a HistoryRecord (item=1), nested keys joined."""
    items = []
    for number, _, value in _wire.fields(body):
        if number == 1 and isinstance(value, bytes):
            key, nested, value_json = _decode_item(value)
            items.append((".".join(nested) or key, value_json))
    return items


_BODY_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "run": _decode_run,
    "config": _decode_config,
    "exit": _decode_exit,
    "history": _decode_history,
}


def _parse_record(log: RecordLog, i: int) -> tuple[str | None, Any]:
    """Record `i`'s type and, for run/config/exit/history, its decoded member.

    Only what is read is checked: protobuf would also reject malformed bytes or bad UTF-8
    inside the fields and record types skipped here (CRCs catch corruption anyway), and
    it accepts groups, which no writer of these files uses.
    """
    try:
        kind, body = _record_type(log.payload(i))
        decode = _BODY_DECODERS.get(kind) if kind else None
        return kind, decode(body) if decode else None
    except _wire.WireError as exc:
        raise WandbFileError(log.path, int(log.offsets[i]), f"undecodable record ({exc})") from exc


@dataclass
class _Meta:
    run: _RunInfo | None = None
    config: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    exit_runtime: int = 0
    history: list[int] = field(default_factory=list)  # history records not found by tag


def _apply_config(config: dict[str, Any], record: _ConfigRecord) -> None:
    """Apply a ConfigRecord's updates and removals (keys may be nested paths)."""
    for item in record.update:
        path = list(item.nested_key) or [item.key]
        try:
            value = json.loads(item.value_json) if item.value_json else None
        except ValueError:
            value = item.value_json
        node = config
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    for item in record.remove:
        path = list(item.nested_key) or [item.key]
        node = config
        for part in path[:-1]:
            node = node.get(part) if isinstance(node.get(part), dict) else {}
        node.pop(path[-1], None)


def _read_meta(log: RecordLog, tags: np.ndarray) -> _Meta:
    meta = _Meta()
    for i in np.flatnonzero(~np.isin(tags, (TAG_HISTORY, *SKIPPED_TAGS))).tolist():
        kind, body = _parse_record(log, i)
        if kind == "run" and meta.run is None:
            meta.run = body
            _apply_config(meta.config, body.config)
        elif kind == "config":
            _apply_config(meta.config, body)
        elif kind == "exit":
            meta.exit_code = body.exit_code
            meta.exit_runtime = body.runtime
        elif kind == "history":  # a writer that puts another field first: still a row
            meta.history.append(i)
    meta.config.pop("_wandb", None)
    return meta


# --------------------------------------------------------------------------------------
# History


@dataclass
class _FastItems:
    """History items found by the vectorised walk (in file order within each record)."""

    rec: np.ndarray  # index of the item's record in the walked `starts`
    key_s: np.ndarray
    key_n: np.ndarray
    key_first4: np.ndarray  # uint32: the key's first 4 bytes
    val_s: np.ndarray
    val_n: np.ndarray
    val_first4: np.ndarray
    bad: np.ndarray  # per record: not decoded here (left to the record-by-record path)


def _history_items_fast(data: Any, starts: np.ndarray, ends: np.ndarray) -> _FastItems:
    """Vectorised protobuf walk of the history Records `data[starts:ends]`.

    Records it does not decode (nested-dict keys, unexpected fields, malformed bytes) are
    flagged in `bad` and their items left out. Memory reads dominate the cost, so each
    item is read twice: 8 bytes at its field tag, 8 bytes at the end of its key.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    size = len(buf)
    nrec = len(starts)
    last = size - 1
    bad = np.zeros(nrec, dtype=bool)
    # Record: optional `num` (field 1, varint), then `history` (field 2, length-delimited).
    has_num = (starts < ends) & (buf[np.minimum(starts, last)] == 0x08)
    _, vsize, ok = _varint(buf, starts + 1, ends)
    bad |= has_num & ~ok
    pos = np.where(has_num, starts + 1 + vsize, starts)
    fnum, wire, hs, he, ok = _skip_field(buf, pos, ends)
    bad |= ~ok | (fnum != 2) | (wire != 2)

    # HistoryRecord fields, one per round for every record still inside its message:
    # `item` (field 1) mostly, then `step` and `_info`, skipped. Round k yields the k-th
    # item of each record; items are then put back in file order, as later passes read
    # the items' bytes and memory is much faster read in order.
    rounds: list[tuple[np.ndarray, ...]] = []
    count = np.zeros(nrec, dtype=np.int64)
    cur = hs.copy()
    act = np.flatnonzero(~bad)
    while act.size:
        act = act[cur[act] < he[act]]
        if not act.size:
            break
        c, lim = cur[act], he[act]
        head = _word_at(data, c, 8)  # tag 0x0a, 1-byte length, the item's first 6 bytes
        length = ((head >> 8) & 0xFF).astype(np.int64)
        nxt = c + 2 + length
        fast = ((head & 0xFF) == 0x0A) & (length < 0x80) & (nxt <= lim) & (c + 8 <= size)
        rec, s_, e_, h_ = act[fast], c[fast] + 2, nxt[fast], head[fast] >> 16
        cur[rec] = e_
        slow = np.flatnonzero(~fast)
        if slow.size:
            fnum, wire, fs, fe, ok = _skip_field(buf, c[slow], lim[slow])
            ok &= (fnum != 1) | (wire == 2)
            bad[act[slow[~ok]]] = True
            is_item = ok & (fnum == 1)
            rec = np.concatenate([rec, act[slow[is_item]]])
            s_ = np.concatenate([s_, fs[is_item]])
            e_ = np.concatenate([e_, fe[is_item]])
            h_ = np.concatenate([h_, _word_at(data, fs[is_item], 8)])
            cur[act[slow]] = fe
            act = np.concatenate([act[fast], act[slow[ok]]])
        rounds.append((rec, count[rec], s_, e_, h_))
        count[rec] += 1
    first_slot = np.cumsum(count) - count
    nitem = int(count.sum())
    irec = np.zeros(nitem, dtype=np.int64)
    istart = np.zeros(nitem, dtype=np.int64)
    iend = np.zeros(nitem, dtype=np.int64)
    ihead = np.zeros(nitem, dtype=np.uint64)
    for rec, k, s_, e_, h_ in rounds:
        slot = first_slot[rec] + k  # the record's first slot + items it yielded before
        irec[slot], istart[slot], iend[slot], ihead[slot] = rec, s_, e_, h_

    # HistoryItem as wandb writes it: nested_key (field 2) once, then value_json (field 16),
    # both with 1-byte lengths: 0x12 klen key 0x82 0x01 vlen value, spanning the item.
    key_s = istart + 2
    key_n = ((ihead >> 8) & 0xFF).astype(np.int64)
    key_first4 = ((ihead >> 16) & 0xFFFFFFFF).astype(np.uint32)
    p = key_s + key_n
    tail = _word_at(data, p, 8)
    val_s = p + 3
    val_n = ((tail >> 16) & 0xFF).astype(np.int64)
    val_first4 = ((tail >> 24) & 0xFFFFFFFF).astype(np.uint32)
    simple = ((ihead & 0xFF) == 0x12) & (key_n < 0x80) & ((tail & 0xFFFF) == 0x0182)
    simple &= (val_n < 0x80) & (val_s + val_n == iend) & (p + 8 <= size)

    # Anything else: a generic field walk over the remaining items.
    other = np.flatnonzero(~simple)
    if other.size:
        key_n[other] = -1
        val_n[other] = -1
        nparts = np.zeros(nitem, np.int64)
        plain_s = np.zeros(nitem, np.int64)
        plain_n = np.full(nitem, -1, np.int64)
        item_bad = np.zeros(nitem, dtype=bool)
        cur = istart.copy()
        act = other
        while act.size:
            act = act[cur[act] < iend[act]]
            if not act.size:
                break
            fnum, wire, fs, fe, ok = _skip_field(buf, cur[act], iend[act])
            ok &= wire == 2
            for number, starts_, lens_ in ((1, plain_s, plain_n), (2, key_s, key_n)):
                hit = ok & (fnum == number)
                starts_[act[hit]] = fs[hit]
                lens_[act[hit]] = fe[hit] - fs[hit]
            nparts[act[ok & (fnum == 2)]] += 1
            hit = ok & (fnum == 16)
            val_s[act[hit]] = fs[hit]
            val_n[act[hit]] = fe[hit] - fs[hit]
            item_bad[act[~(ok & ((fnum == 1) | (fnum == 2) | (fnum == 16)))]] = True
            cur[act] = fe
            act = act[ok]
        item_bad |= nparts > 1  # a nested dict key: the record-by-record path joins its parts
        bad[irec[item_bad]] = True
        plain = other[nparts[other] == 0]  # `key` counts only when nested_key is absent
        key_s[plain] = plain_s[plain]
        key_n[plain] = plain_n[plain]
        key_first4[other] = _word_at(data, key_s[other], 4)
        val_first4[other] = _word_at(data, val_s[other], 4)
    keep_mask = ~bad[irec] & (key_n > 0) & (val_n > 0)
    if keep_mask.all():  # the usual case: no copies
        return _FastItems(irec, key_s, key_n, key_first4, val_s, val_n, val_first4, bad)
    keep = np.flatnonzero(keep_mask)
    return _FastItems(
        irec[keep],
        key_s[keep],
        key_n[keep],
        key_first4[keep],
        val_s[keep],
        val_n[keep],
        val_first4[keep],
        bad,
    )


@dataclass
class _Parsed:
    """Decoded history items of a part of the file, ready to scatter into columns."""

    keys: list[str]  # local key codes index this list
    rows: np.ndarray  # per numeric item of a wanted key
    codes: np.ndarray
    numbers: np.ndarray  # float64, NaN/inf as logged
    step_rows: np.ndarray
    step_values: np.ndarray  # int64
    left_rows: np.ndarray  # rows this part could not decode (record-by-record path)


def _wanted(keys: list[str], prefixes: tuple[str, ...] | None) -> np.ndarray:
    """Per key: 1 for a wanted value column, 2 for `_step`, 0 for dropped."""
    return np.array(
        [
            2
            if k == "_step"
            else int(prefixes is None or k in ALWAYS_KEPT or k.startswith(prefixes))
            for k in keys
        ],
        dtype=np.int8,
    )


def _int32_values(array: Any) -> np.ndarray:
    """The values of a null-free int32 arrow array, read from its buffer: pyarrow's own
    `to_numpy` imports pandas on first use (~0.2 s, once per process)."""
    if array.type != pa.int32() or array.null_count:
        raise TypeError(f"expected null-free int32 indices, got {array.type}")
    return np.frombuffer(
        array.buffers()[1], dtype=np.int32, count=len(array), offset=array.offset * 4
    )


def _decode_chunk(
    path: str,
    data: Any,
    starts: np.ndarray,
    ends: np.ndarray,
    rows: np.ndarray,
    prefixes: tuple[str, ...] | None,
) -> _Parsed:
    """Decode the history Records `data[starts:ends]` (row numbers `rows`) vectorised."""
    found = _history_items_fast(data, starts, ends)
    encoded = _binary_views(data, found.key_s, found.key_n, found.key_first4).dictionary_encode()
    keys = []
    for raw in encoded.dictionary.to_pylist():
        try:
            keys.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise WandbFileError(path, None, f"history key {raw!r} is not UTF-8") from exc
    codes = _int32_values(encoded.indices).astype(np.int64)
    item_rows = rows[found.rec]
    kind = _wanted(keys, prefixes)[codes] if len(codes) else np.zeros(0, np.int8)
    # Only values that can be JSON numbers are parsed: strings, dicts, bools are skipped.
    candidate = np.isin(found.val_first4 & 0xFF, _NUMERIC_FIRST_BYTES)
    parsed: list[tuple[np.ndarray, np.ndarray]] = []
    for which, dtype in ((1, pl.Float64), (2, pl.Int64)):
        sel = np.flatnonzero((kind == which) & candidate)
        views = _binary_views(data, found.val_s[sel], found.val_n[sel], found.val_first4[sel])
        # Typed as strings without a UTF-8 check: polars parses numbers from the bytes
        # (non-UTF-8 bytes just fail to parse) and the strings are dropped right after.
        text = pl.Series(pl.from_arrow(_as_string_view(views)))
        values = text.cast(dtype, strict=False)
        ok = values.is_not_null().to_numpy()
        parsed.append((sel[ok], values.to_numpy()[ok]))
    (num_sel, numbers), (step_sel, step_values) = parsed
    return _Parsed(
        keys=keys,
        rows=item_rows[num_sel],
        codes=codes[num_sel],
        numbers=numbers,
        step_rows=item_rows[step_sel],
        step_values=step_values,
        left_rows=rows[found.bad],
    )


def _history_items_slow(log: RecordLog, i: int) -> list[tuple[str, str]]:
    """(key, value_json) of one history record, decoded record by record."""
    kind, items = _parse_record(log, i)
    return items if kind == "history" else []


def _decode_slow(
    log: RecordLog, hist_idx: np.ndarray, rows: np.ndarray, prefixes: tuple[str, ...] | None
) -> _Parsed:
    """Decode history records one by one (the reference path)."""
    index: dict[str, int] = {}
    num_rows, num_codes, num_text = [], [], []
    step_rows, step_text = [], []
    for row, i in zip(rows.tolist(), hist_idx.tolist(), strict=True):
        for key, val in _history_items_slow(log, i):
            if not key or not val:
                continue
            if key not in index:
                index[key] = len(index)
            if key == "_step":
                step_rows.append(row)
                step_text.append(val)
            elif prefixes is None or key in ALWAYS_KEPT or key.startswith(prefixes):
                num_rows.append(row)
                num_codes.append(index[key])
                num_text.append(val)
    numbers = pl.Series(num_text, dtype=pl.String).cast(pl.Float64, strict=False)
    steps = pl.Series(step_text, dtype=pl.String).cast(pl.Int64, strict=False)
    ok, step_ok = numbers.is_not_null().to_numpy(), steps.is_not_null().to_numpy()
    return _Parsed(
        keys=list(index),
        rows=np.array(num_rows, dtype=np.int64)[ok],
        codes=np.array(num_codes, dtype=np.int64)[ok],
        numbers=numbers.to_numpy()[ok],
        step_rows=np.array(step_rows, dtype=np.int64)[step_ok],
        step_values=steps.to_numpy()[step_ok],
        left_rows=np.zeros(0, dtype=np.int64),
    )


class _HistoryBuilder:
    """Scatters parsed parts into dense per-key columns (missing stays null, NaN stays NaN)."""

    def __init__(self, nrows: int) -> None:
        self.nrows = nrows
        self.column: dict[str, int] = {}
        self.values: list[np.ndarray] = []
        self.valid: list[np.ndarray] = []
        self.step = np.zeros(nrows, dtype=np.int64)
        self.step_valid = np.zeros(nrows, dtype=bool)

    def _column_of(self, key: str) -> int:
        if key not in self.column:
            self.column[key] = len(self.values)
            self.values.append(np.full(self.nrows, np.nan))
            self.valid.append(np.zeros(self.nrows, dtype=bool))
        return self.column[key]

    def add(self, part: _Parsed) -> None:
        self.step[part.step_rows] = part.step_values
        self.step_valid[part.step_rows] = True
        if not len(part.codes):
            return
        used = np.flatnonzero(np.bincount(part.codes, minlength=len(part.keys)))
        remap = np.full(len(part.keys), -1, dtype=np.int64)
        remap[used] = [self._column_of(part.keys[k]) for k in used.tolist()]
        cols = remap[part.codes]
        # Group the items by column with a stable (radix) sort, then fill column by column.
        ncols = len(self.values)
        cols = cols.astype(np.uint16 if ncols < (1 << 16) else np.int64)
        order = np.argsort(cols, kind="stable")
        bounds = np.searchsorted(cols[order], np.arange(ncols + 1))
        for j in np.flatnonzero(np.diff(bounds)).tolist():
            chunk = order[bounds[j] : bounds[j + 1]]
            rows = part.rows[chunk]
            self.values[j][rows] = part.numbers[chunk]
            self.valid[j][rows] = True

    def frame(self) -> pl.DataFrame:
        """`_step`, `_timestamp`, `_runtime`, then the other numeric keys sorted.

        (Sorted, not in order of appearance: wandb writes a row's keys in random order.)
        """
        keys = sorted(self.column)
        keys = [k for k in HEAD_COLUMNS if k in keys] + [k for k in keys if k not in HEAD_COLUMNS]
        columns = [pl.Series("_step", _masked(self.step, self.step_valid), pl.Int64)]
        if "_timestamp" not in keys:
            columns.append(pl.Series("_timestamp", [None] * self.nrows, dtype=pl.Float64))
        for key in keys:
            j = self.column[key]
            columns.append(pl.Series(key, _masked(self.values[j], self.valid[j])))
        return pl.DataFrame(columns)


def _masked(values: np.ndarray, valid: np.ndarray) -> Any:
    """An arrow array of `values` (a numeric numpy array), null where not `valid`, built
    from buffers: `pa.array(values, mask=...)` makes pyarrow import pandas (~0.2 s)."""
    values = np.ascontiguousarray(values)
    bitmap = pa.py_buffer(np.packbits(valid.astype(bool), bitorder="little"))
    arrow_type = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(arrow_type, len(values), [bitmap, pa.py_buffer(values)])


def _chunks(starts: np.ndarray, ends: np.ndarray, target_bytes: int) -> list[slice]:
    """Consecutive slices of records holding about `target_bytes` of payload each."""
    if not len(starts):
        return []
    total = np.cumsum(ends - starts)
    cuts = np.searchsorted(total, np.arange(target_bytes, int(total[-1]), target_bytes))
    bounds = [0, *sorted(set((cuts + 1).tolist())), len(starts)]
    return [slice(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def _history_frame(
    log: RecordLog,
    hist_idx: np.ndarray,
    key_prefixes: Sequence[str] | None,
    pool: Executor,
    fast: bool = True,
) -> pl.DataFrame:
    """The wide history frame of `RunSource.read_history` for history records `hist_idx`."""
    nrows = len(hist_idx)
    prefixes = None if key_prefixes is None else tuple(key_prefixes)
    rows = np.arange(nrows, dtype=np.int64)
    tasks = []
    left: list[np.ndarray] = []
    for in_blob, src in ((False, log.data), (True, log.blob)):
        sel = np.flatnonzero(log.in_blob[hist_idx] == in_blob)
        if not fast:
            left.append(rows[sel])
            continue
        rec = hist_idx[sel]
        # Chunks of a few MB keep temporaries small and in cache (fresh memory is costly)
        # and let two threads share the work: numpy, arrow and polars release the GIL.
        for part in _chunks(log.starts[rec], log.ends[rec], CHUNK_BYTES):
            r = rec[part]
            args = (log.path, src, log.starts[r], log.ends[r], rows[sel][part], prefixes)
            tasks.append(pool.submit(_decode_chunk, *args))
    builder = _HistoryBuilder(nrows)
    for task in tasks:
        parsed = task.result()
        builder.add(parsed)
        left.append(parsed.left_rows)
    slow = np.sort(np.concatenate(left)) if left else rows[:0]
    if slow.size:
        builder.add(_decode_slow(log, hist_idx[slow], slow, prefixes))
    return builder.frame()


# --------------------------------------------------------------------------------------
# Public entry points


def _timestamp_utc(seconds: int, nanos: int) -> datetime | None:
    if seconds == 0 and nanos == 0:
        return None
    return datetime.fromtimestamp(seconds + nanos / 1e9, tz=UTC)


def _last_history_timestamp(log: RecordLog, hist_idx: np.ndarray) -> float | None:
    """`_timestamp` of the last history record that has one (looks back a few records)."""
    for i in hist_idx[::-1][:16].tolist():
        for key, val in _history_items_slow(log, i):
            if key == "_timestamp":
                try:
                    return float(val)
                except ValueError:
                    break
    return None


def run_state(
    exit_code: int | None,
    mtime_ns: int,
    running_grace_s: float = DEFAULT_RUNNING_GRACE_S,
    now: float | None = None,
) -> str:
    """A run's state: from the exit code if there is an exit record ("finished" if 0, else
    "failed"); without one the writer is taken as alive ("running") if the file changed in
    the last `running_grace_s` seconds, else as dead ("crashed": killed, out of memory...)."""
    if exit_code is not None:
        return STATE_FINISHED if exit_code == 0 else STATE_FAILED
    age = (time.time() if now is None else now) - mtime_ns / 1e9
    return STATE_RUNNING if age < running_grace_s else STATE_CRASHED


def _run_file(
    path: str | os.PathLike[str],
    key_prefixes: Sequence[str] | None,
    with_history: bool,
    running_grace_s: float,
    now: float | None,
    fast: bool = True,
) -> RunFile:
    path = str(path)
    data, st = _load(path)
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        log, bad_crcs = _frame(path, data, pool)
        try:
            tags = _record_tags(log)
            meta = _read_meta(log, tags)
            hist_idx = np.flatnonzero(tags == TAG_HISTORY)
            if meta.history:
                hist_idx = np.union1d(hist_idx, meta.history)
            history = None
            if with_history:
                history = _history_frame(log, hist_idx, key_prefixes, pool, fast=fast)
                timestamps = history.get_column("_timestamp").drop_nans()
                last_ts = timestamps.max() if timestamps.len() else None
            else:
                last_ts = _last_history_timestamp(log, hist_idx) if hist_idx.size else None
        except Exception as exc:
            _raise_bad_crcs(path, bad_crcs())  # a bad CRC explains any decoding error
            if isinstance(exc, WandbFileError):
                raise
            problem = f"cannot decode ({type(exc).__name__}: {exc})"
            raise WandbFileError(path, None, problem) from exc
        _raise_bad_crcs(path, bad_crcs())

    run = meta.run
    start_time = _timestamp_utc(run.start_seconds, run.start_nanos) if run is not None else None
    candidates = [float(last_ts)] if last_ts is not None else []  # type: ignore[arg-type]
    if start_time is not None:
        candidates.append(start_time.timestamp())
        if meta.exit_code is not None:
            candidates.append(start_time.timestamp() + meta.exit_runtime)
    last_timestamp = datetime.fromtimestamp(max(candidates), tz=UTC) if candidates else None

    state = run_state(meta.exit_code, st.st_mtime_ns, running_grace_s, now)
    return RunFile(
        path=path,
        run_id=run.run_id if run is not None else "",
        display_name=run.display_name if run is not None else "",
        project=run.project if run is not None else "",
        entity=run.entity if run is not None else "",
        tags=tuple(run.tags) if run is not None else (),
        config=meta.config,
        start_time=start_time,
        state=state,
        exit_code=meta.exit_code,
        last_timestamp=last_timestamp,
        truncated=log.truncated,
        num_history_rows=int(hist_idx.size),
        size=len(data),
        mtime_ns=st.st_mtime_ns,
        history=history,
    )


def read_run_file(
    path: str | os.PathLike[str],
    key_prefixes: Sequence[str] | None = None,
    *,
    running_grace_s: float = DEFAULT_RUNNING_GRACE_S,
    now: float | None = None,
) -> RunFile:
    """Read a `.wandb` file: run metadata, state and the wide history frame.

    History: `_step` (Int64), `_timestamp`, `_runtime` and one Float64 column per numeric
    key (nested keys joined with "."), one row per history record in file order, null
    where a row lacks the key, NaN/inf as logged; non-numeric values are skipped. With
    `key_prefixes`, only keys starting with one of them (plus `_step`, `_timestamp`).
    State: "finished"/"failed" from the exit record's code; without one, "running" if the
    file changed in the last `running_grace_s` seconds (before `now`), else "crashed".
    Raises `WandbFileError` (a `RunReadError`) naming the file and the byte offset.
    """
    return _run_file(path, key_prefixes, True, running_grace_s, now)


def scan_run_file(
    path: str | os.PathLike[str],
    *,
    running_grace_s: float = DEFAULT_RUNNING_GRACE_S,
    now: float | None = None,
) -> RunFile:
    """`read_run_file` without the history items (still checks every CRC); `history` is None."""
    return _run_file(path, None, False, running_grace_s, now)


def wait_for_exit_record(
    path: str | os.PathLike[str], timeout_s: float = 30.0, poll_s: float = 0.02
) -> RunFile:
    """Scan `path` until it has an exit record; raise `TimeoutError` after `timeout_s`.

    wandb quirk (0.31, offline): `run.finish()` returns before wandb-core has written the
    file's last partial 32 KiB block, so a file read right after `finish()` can lack its
    last rows and its exit record (seen: 76 of 80 rows). Call this before reading a run
    that was just written.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            scan = scan_run_file(path)
            if scan.exit_code is not None:
                return scan
        except WandbFileError:  # not even the file header yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record {timeout_s} s after the run finished")
        time.sleep(poll_s)
