"""A small reader of the protobuf wire format: what decoding a few `.wandb` records needs.

Why not protobuf itself: wandb's generated classes import the whole `wandb` package
(~0.45 s per process), for a handful of records per file.

It follows protobuf's own parser (upb, protobuf 6) where that matters for what we read:

- a message is a sequence of fields `tag value`, tag = field number << 3 | wire type;
  field numbers are 1 .. 2**29 - 1 and a tag takes at most 5 bytes;
- wire types 0 (varint), 1 (8 bytes), 2 (length-delimited), 5 (4 bytes); any of them may
  be an unknown field, skipped;
- varints take at most 10 bytes, bits past 64 are dropped; int32 and int64 are two's
  complement (a negative int32 is sign-extended to 10 bytes), int32 keeps the low 32 bits;
- strings must be valid UTF-8.

Stricter than protobuf, on purpose: groups (wire types 3 and 4, deprecated in proto2 and
never written by wandb) are an error even as unknown fields. Malformed bytes, including a
cut anywhere, raise `WireError`.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
MAX_FIELD_NUMBER = (1 << 29) - 1
_U64 = (1 << 64) - 1


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """The unsigned varint at `buf[pos]` (kept to 64 bits) and the position after it."""
    value = shift = 0
    stop = min(end, pos + 10)
    while pos < stop:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _U64, pos
        shift += 7
    raise WireError("truncated varint" if stop == end else "varint longer than 10 bytes")


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield `(field number, wire type, value)` for each field of the message `buf`.

    The value is the integer for wire types 0, 1 and 5 (unsigned, little-endian for the
    fixed ones) and the content bytes for wire type 2.
    """
    pos, end = 0, len(buf)
    while pos < end:
        # Short tags (fields 1..2047) and one-byte lengths are read inline: they are most
        # of them, and a call per varint would cost as much as the rest.
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        elif pos + 1 < end and buf[pos + 1] < 0x80:
            tag = (tag & 0x7F) | buf[pos + 1] << 7
            pos += 2
        else:
            tag_start = pos
            tag, pos = varint(buf, pos, end)
            if pos - tag_start > 5:
                raise WireError("field tag longer than 5 bytes")
        number, wire = tag >> 3, tag & 7
        if not 1 <= number <= MAX_FIELD_NUMBER:
            raise WireError(f"invalid field number {number}")
        value: int | bytes
        if wire == LEN:
            if pos < end and buf[pos] < 0x80:
                size = buf[pos]
                pos += 1
            else:
                size, pos = varint(buf, pos, end)
            if size > end - pos:
                raise WireError(f"truncated field {number}")
            value = buf[pos : pos + size]
            pos += size
        elif wire == VARINT:
            value, pos = varint(buf, pos, end)
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            if size > end - pos:
                raise WireError(f"truncated field {number}")
            value = int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        elif wire in (3, 4):
            raise WireError(f"field {number} is a group (wire type {wire}): not supported")
        else:
            raise WireError(f"invalid wire type {wire} for field {number}")
        yield number, wire, value


def string(value: bytes, number: int) -> str:
    """The UTF-8 text of a length-delimited field `number` (protobuf rejects bad UTF-8)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"invalid UTF-8 in string field {number}") from exc


def int32(value: int) -> int:
    """A varint read as protobuf's int32: its low 32 bits, two's complement."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def int64(value: int) -> int:
    """A varint read as protobuf's int64: two's complement."""
    return value - (1 << 64) if value >= 1 << 63 else value
