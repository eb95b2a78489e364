"""Small readers for the protobuf *wire format* and *text format*, written from the public specs.

Why our own: bnlint reads Caffe models without Caffe or a compiled schema, and nothing in an input
file may steer the reader beyond the bytes it describes. The reader is generic (no Caffe names)
and lazy: iterating a message yields `Field` records that carry byte ranges, so a caller can skip a
100 MB float array by its length prefix and decode it with numpy only when asked.

Guarantees, for any input bytes:
- every failure is a `WireError` (a `ValueError`) with a short message, never an IndexError;
- a length or varint that runs past the end of its message is an error, never a short slice;
- varints are at most 10 bytes; groups (wire types 3 and 4) and wire types 6/7 are rejected;
- time is linear in the bytes visited (runs of unpacked numbers are coalesced with numpy,
  probing in doubling chunks so that each byte is compared a bounded number of times);
- nested messages go through `MessageView.sub`, which refuses more than `MAX_DEPTH` levels.
`parse_text` is the text-format counterpart: schema-free, linear, depth-bounded (see below).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

VARINT, FIXED64, LEN, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5
MAX_VARINT_BYTES = 10
MAX_DEPTH = 64
MAX_FIELD_NUMBER = (1 << 29) - 1
_MASK64 = (1 << 64) - 1
_WIDTH = {FIXED32: 4, FIXED64: 8}

Buffer = bytes | bytearray | memoryview


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message (the message says where and why)."""


class Field(NamedTuple):
    """One field occurrence, or a coalesced run of identical-key unpacked fixed-width values.

    value: the number for VARINT; the raw unsigned bits of the first element for FIXED32/64;
           the payload length for LEN.
    start, end: the byte range of the value (VARINT, single fixed), of the payload (LEN), or of a
           run (first value's start to last value's end, keys in between).
    n_values: number of elements in a fixed-width run (1 otherwise).
    key_len: bytes of the key before each value (a run's stride is key_len + width).
    """

    number: int
    wire_type: int
    value: int
    start: int
    end: int
    n_values: int = 1
    key_len: int = 1


def read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """Decode one varint at `pos` (not reading at or past `end`); return (value mod 2**64, next pos)."""
    if pos >= end:
        raise WireError(f"truncated varint at byte {pos}")
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    result = byte & 0x7F
    shift = 7
    pos += 1
    while True:
        if shift >= 7 * MAX_VARINT_BYTES:
            raise WireError(f"varint longer than {MAX_VARINT_BYTES} bytes at byte {pos - MAX_VARINT_BYTES}")
        if pos >= end:
            raise WireError(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _MASK64, pos
        shift += 7


def to_int64(value: int) -> int:
    """Reinterpret a decoded varint as int64 (how protobuf stores negative int32/int64)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _run_length(buf: Buffer, first_key: int, end: int, key: bytes, stride: int) -> int:
    """How many consecutive `stride`-byte records starting at `first_key` begin with `key`.

    Doubling chunks keep the total work proportional to the run found, not to the rest of the buffer.
    """
    total = (end - first_key) // stride
    count, chunk = 1, 16  # the caller has already seen the first record
    key_row = np.frombuffer(key, dtype=np.uint8)
    while count < total:
        take = min(chunk, total - count)
        block = np.frombuffer(buf, dtype=np.uint8, count=take * stride, offset=first_key + count * stride)
        same = (block.reshape(take, stride)[:, : len(key)] == key_row).all(axis=1)
        if not same.all():
            return count + int(np.argmin(same))
        count += take
        chunk *= 2
    return count


def iter_fields(buf: Buffer, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """Yield the fields of the message in buf[start:end] in order, checking every length.

    Consecutive unpacked FIXED32/FIXED64 values of one field come back as one `Field` with n_values > 1.
    """
    if isinstance(buf, memoryview) and buf.format != "B":
        buf = buf.cast("B")
    stop = len(buf) if end is None else end
    if not 0 <= start <= stop <= len(buf):
        raise WireError(f"message range [{start}, {stop}) lies outside a buffer of {len(buf)} bytes")
    pos = start
    while pos < stop:
        key_start = pos
        key, pos = read_varint(buf, pos, stop)
        number, wire_type = key >> 3, key & 7
        if number == 0 or number > MAX_FIELD_NUMBER:
            raise WireError(f"invalid field number {number} at byte {key_start}")
        if wire_type == VARINT:
            value, after = read_varint(buf, pos, stop)
            yield Field(number, VARINT, value, pos, after)
            pos = after
        elif wire_type == LEN:
            length, payload = read_varint(buf, pos, stop)
            if length > stop - payload:
                raise WireError(f"field {number} at byte {key_start} has length {length}, past the end of its message")
            yield Field(number, LEN, length, payload, payload + length)
            pos = payload + length
        elif wire_type in _WIDTH:
            width = _WIDTH[wire_type]
            if width > stop - pos:
                raise WireError(f"truncated fixed{8 * width} field {number} at byte {key_start}")
            key_len = pos - key_start
            stride = key_len + width
            count = 1
            following = pos + width
            if following + stride <= stop and buf[following:following + key_len] == buf[key_start:pos]:
                count = _run_length(buf, key_start, stop, bytes(buf[key_start:pos]), stride)
            raw = int.from_bytes(buf[pos:pos + width], "little")
            yield Field(number, wire_type, raw, pos, key_start + count * stride, count, key_len)
            pos = key_start + count * stride
        elif wire_type in (START_GROUP, END_GROUP):
            raise WireError(f"field {number} at byte {key_start} is a group (wire type {wire_type}), which is not supported")
        else:
            raise WireError(f"invalid wire type {wire_type} at byte {key_start}")


def leading_fields(head: bytes, count: int) -> list[Field]:
    """Up to `count` leading fields of a message's first bytes (a sniffer's window): a field whose
    key or value runs past `head` ends the list, and so does a group or an unknown wire type."""
    out: list[Field] = []
    pos = 0
    try:
        while pos < len(head) and len(out) < count:
            key, after = read_varint(head, pos, len(head))
            number, wire = key >> 3, key & 7
            if number == 0 or wire not in (VARINT, LEN, FIXED32, FIXED64):
                break
            if wire == VARINT:
                value, nxt = read_varint(head, after, len(head))
                out.append(Field(number, wire, value, after, nxt))
            elif wire == LEN:
                length, payload = read_varint(head, after, len(head))
                out.append(Field(number, wire, length, payload, payload + length))
                nxt = payload + length
            else:
                nxt = after + (4 if wire == FIXED32 else 8)
                out.append(Field(number, wire, 0, after, nxt))
            pos = nxt
    except WireError:
        pass
    return out


class MessageView:
    """A message as a byte range of a shared buffer, with its nesting depth; nothing is copied."""

    __slots__ = ("buf", "depth", "end", "start")

    def __init__(self, buf: Buffer, start: int = 0, end: int | None = None, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise WireError(f"messages nested deeper than {MAX_DEPTH} levels")
        if isinstance(buf, memoryview) and buf.format != "B":
            buf = buf.cast("B")
        self.buf = buf
        self.start = start
        self.end = len(buf) if end is None else end
        self.depth = depth

    def fields(self) -> Iterator[Field]:
        return iter_fields(self.buf, self.start, self.end)

    def sub(self, field: Field) -> MessageView:
        """The embedded message carried by a LEN field, one level deeper."""
        if field.wire_type != LEN:
            raise WireError(f"field {field.number} is not a message (wire type {field.wire_type})")
        return MessageView(self.buf, field.start, field.end, self.depth + 1)


def fixed_count(field: Field, width: int) -> int:
    """Element count of a packed (LEN) or unpacked (run) field of `width`-byte values, without decoding."""
    if field.wire_type == LEN:
        if field.value % width:
            raise WireError(f"packed field {field.number} has {field.value} bytes, not a multiple of {width}")
        return field.value // width
    if _WIDTH.get(field.wire_type) != width:
        raise WireError(f"field {field.number} has wire type {field.wire_type}, expected {width}-byte values")
    return field.n_values


def decode_fixed(buf: Buffer, field: Field, dtype: str) -> np.ndarray:
    """Decode a packed or unpacked fixed-width field ('<f4', '<f8', '<i4', '<u8', ...) to a writable array."""
    kind = np.dtype(dtype)
    count = fixed_count(field, kind.itemsize)
    if field.wire_type == LEN:
        packed: np.ndarray = np.frombuffer(buf, dtype=kind, count=count, offset=field.start).copy()
        return packed
    stride = field.key_len + kind.itemsize
    records = np.frombuffer(buf, dtype=np.uint8, count=count * stride, offset=field.start - field.key_len)
    values = np.ascontiguousarray(records.reshape(count, stride)[:, field.key_len:])
    return values.view(kind).reshape(count)


def decode_varints(buf: Buffer, field: Field, limit: int | None = None) -> np.ndarray:
    """Decode a packed (LEN) or single (VARINT) varint field to uint64, vectorised with numpy.

    Each value is the sum of its 7-bit groups shifted into place (groups never overlap, so the sum
    equals the bitwise OR; bits past 64 wrap away as protobuf truncates them). More than `limit`
    values is an error, raised before any large allocation.
    """
    if field.wire_type == VARINT:
        return np.array([field.value], dtype=np.uint64)
    if field.wire_type != LEN:
        raise WireError(f"field {field.number} has wire type {field.wire_type}, expected varints")
    raw = np.frombuffer(buf, dtype=np.uint8, count=field.value, offset=field.start)
    if limit is not None and np.count_nonzero(raw < 0x80) > limit:
        raise WireError(f"packed field {field.number} holds more than {limit} varints")
    if raw.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size == 0 or ends[-1] != raw.size - 1:
        raise WireError(f"packed field {field.number} ends inside a varint")
    starts = np.concatenate(([0], ends[:-1] + 1))
    if int((ends - starts).max()) >= MAX_VARINT_BYTES:
        raise WireError(f"packed field {field.number} holds a varint longer than {MAX_VARINT_BYTES} bytes")
    position = np.arange(raw.size) - np.repeat(starts, ends - starts + 1)
    parts = (raw & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
    return np.add.reduceat(parts, starts)


def float_value(buf: Buffer, field: Field) -> float:
    """The last value of a FIXED32 (float32) or FIXED64 (float64) field or run: for optional fields the last one wins."""
    width = _WIDTH.get(field.wire_type)
    if width is None:
        raise WireError(f"field {field.number} has wire type {field.wire_type}, expected a float")
    return float(struct.unpack("<f" if width == 4 else "<d", bytes(buf[field.end - width:field.end]))[0])


# ---- text format ------------------------------------------------------------------------------
# A schema-free parser of protobuf text format into a tree, so each caller maps names to its own
# types. One regex match per token (no backtracking across tokens), so time is linear; recursion
# stops at MAX_DEPTH; every problem is a TextError naming the line.

class TextError(WireError):
    """Malformed protobuf text format (the message starts with the line number)."""


class TextValue(NamedTuple):
    """A scalar as written: kind 'str' (escapes decoded), 'num' or 'ident' (a leading '-' kept in text)."""

    kind: str
    text: str
    line: int

    def _bad(self, expected: str) -> TextError:
        return TextError(f"line {self.line}: expected {expected}, found {self.text!r}")

    def as_int(self) -> int:
        """Decimal, 0x hex or 0-prefixed octal, optionally negative, within the int64/uint64 range."""
        digits = self.text.removeprefix("-")
        base = 16 if digits[:2] in ("0x", "0X") else 8 if digits[:1] == "0" and len(digits) > 1 else 10
        try:
            number = int(digits, base) * (-1 if self.text.startswith("-") else 1)
        except ValueError:
            raise self._bad("an integer") from None
        if self.kind != "num" or not -(1 << 63) <= number < 1 << 64:
            raise self._bad("an integer")
        return number

    def as_float(self) -> float:
        """A number (an optional f suffix, hex integers too) or inf, infinity, nan in any case."""
        if self.kind == "ident" and self.text.lower().lstrip("-") in ("inf", "infinity", "nan"):
            return float(self.text)
        if self.kind != "num":
            raise self._bad("a number")
        return float(self.as_int()) if self.text.lstrip("-")[:2] in ("0x", "0X") else float(self.text.rstrip("fF"))

    def as_bool(self) -> bool:
        if self.text not in ("true", "True", "t", "1", "false", "False", "f", "0"):
            raise self._bad("true or false")
        return self.text in ("true", "True", "t", "1")


class TextMessage(dict[str, list["TextValue | TextMessage"]]):
    """A message: field name -> values in order (scalars or messages), with the line it starts on."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line


_TOKEN = re.compile(r"""
    (?P<skip>\s+|\#[^\n]*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<num>(?:0[xX][0-9A-Fa-f]+|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)[fF]?)
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<sym>[{}\[\]<>:,;\-/.])
  | (?P<bad>(?s:.))
""", re.VERBOSE)
_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|(.))", re.DOTALL)
_SIMPLE_ESCAPES = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"a": b"\a", b"b": b"\b", b"f": b"\f", b"v": b"\v",
                   b"\\": b"\\", b"'": b"'", b'"': b'"', b"?": b"?"}
_CLOSERS = {"{": "}", "<": ">"}


def _unescape(body: str, line: int) -> bytes:
    def one(match: re.Match[bytes]) -> bytes:
        octal, hex2, u4, u8, simple = match.groups()
        if octal or hex2:
            return bytes([int(octal, 8) & 0xFF if octal else int(hex2, 16)])
        if u4 or u8:
            point = int(u4 or u8, 16)
            if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
                raise TextError(f"line {line}: invalid unicode escape")
            return chr(point).encode("utf-8")
        if simple not in _SIMPLE_ESCAPES:
            raise TextError(f"line {line}: unknown escape \\{simple.decode('latin-1')}")
        return _SIMPLE_ESCAPES[simple]

    return _ESCAPE.sub(one, body.encode("utf-8"))


class _TextParser:
    def __init__(self, text: str, max_depth: int) -> None:
        self.tokens, self.line, self.max_depth = _TOKEN.finditer(text), 1, max_depth
        self.kind, self.value = "", ""
        self.advance()

    def advance(self) -> None:
        """Move to the next token (kind 'end' at the end of the text)."""
        for match in self.tokens:
            kind = match.lastgroup
            if kind == "skip":
                self.line += match.group().count("\n")
                continue
            if kind == "bad":
                char = match.group()
                raise TextError(f"line {self.line}: " + ("unterminated string" if char in "\"'" else f"unexpected character {char!r}"))
            self.kind, self.value = kind or "", match.group()
            return
        self.kind, self.value = "end", ""

    def is_sym(self, chars: str) -> bool:
        return self.kind == "sym" and self.value in chars

    def message(self, depth: int, closer: str) -> TextMessage:
        if depth > self.max_depth:
            raise TextError(f"line {self.line}: messages nested deeper than {self.max_depth} levels")
        node = TextMessage(self.line)
        while not (closer and self.is_sym(closer)):
            if self.kind == "end":
                if closer:
                    raise TextError(f"line {self.line}: missing {closer!r} at the end of the text")
                return node
            name = self.field_name()
            colon = self.is_sym(":")
            if colon:
                self.advance()
            values = node.setdefault(name, [])
            if self.is_sym("{<"):
                values.append(self.submessage(depth))
            elif self.is_sym("["):
                self.advance()
                while not self.is_sym("]"):
                    values.append(self.submessage(depth) if self.is_sym("{<") else self.scalar())
                    if not self.is_sym(",]"):
                        raise TextError(f"line {self.line}: expected ',' or ']' in the list of {name!r}")
                    if self.is_sym(","):
                        self.advance()
                self.advance()
            elif colon:
                values.append(self.scalar())
            else:
                raise TextError(f"line {self.line}: expected ':' or '{{' after {name!r}")
            if self.is_sym(",;"):
                self.advance()
        self.advance()
        return node

    def submessage(self, depth: int) -> TextMessage:
        closer = _CLOSERS[self.value]
        self.advance()
        return self.message(depth + 1, closer)

    def field_name(self) -> str:
        if self.kind == "ident":
            name = self.value
            self.advance()
            return name
        if not self.is_sym("["):
            raise TextError(f"line {self.line}: expected a field name, found {self.value!r}")
        parts = []  # an extension or Any type URL: [pkg.ext] or [type.googleapis.com/pkg.Msg]
        self.advance()
        while not self.is_sym("]"):
            if self.kind not in ("ident", "sym") or self.is_sym("{}<>[:,;"):
                raise TextError(f"line {self.line}: malformed extension name")
            parts.append(self.value)
            self.advance()
        self.advance()
        return "[" + "".join(parts) + "]"

    def scalar(self) -> TextValue:
        line = self.line
        if self.kind == "str":
            chunks = []
            while self.kind == "str":  # adjacent strings concatenate
                chunks.append(_unescape(self.value[1:-1], self.line))
                self.advance()
            return TextValue("str", b"".join(chunks).decode("utf-8", errors="replace"), line)
        sign = ""
        if self.is_sym("-"):
            sign = "-"
            self.advance()
        if self.kind not in ("num", "ident"):
            raise TextError(f"line {self.line}: expected a value, found {self.value or 'the end'!r}")
        value = TextValue(self.kind, sign + self.value, line)
        self.advance()
        return value


def parse_text(text: str, max_depth: int = MAX_DEPTH) -> TextMessage:
    """Parse a whole protobuf text-format message into a schema-free tree."""
    return _TextParser(text, max_depth).message(0, "")
