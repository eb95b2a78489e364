"""TensorFlow checkpoints (tensor bundles) read as data: `prefix.index` + `prefix.data-0000i-of-0000N`.

The `.index` file is a LevelDB-format table (tensorflow/core/lib/io: format.cc, block.cc,
table.cc): data blocks of prefix-compressed keys with restart points, an index block mapping keys
to data blocks by BlockHandle (two varints: offset, size), each block followed by a one-byte
compression type and a masked crc32c of block + type, and a 48-byte footer ending in the magic
0xdb4775248b80fb57. Key "" holds a BundleHeaderProto (num_shards 1, endianness 2); every other
key is a tensor name mapped to a BundleEntryProto (dtype 1, shape 2, shard_id 3, offset 4, size 5,
crc32c 6: masked crc32c of the stored bytes). Snappy blocks (not what BundleWriter writes, but
legal) are inflated by a small bounded decoder here.

Tensors are lazy (`BundleTensor`): only those a rule reads are read, after their size is checked
against the shape and the shard, and their checksum verified. Shard files are named from the
index's own prefix, so they always lie in the checkpoint's folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnlint import protowire as pw
from bnlint.errors import InputError
from bnlint.formats import Sniff
from bnlint.loaders.tf_proto import Msg, dtype_name, numel, read_shape
from bnlint.model import BNLayer, ModelInfo
from bnlint.protowire import WireError

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
TRAILER_SIZE = 5  # compression type + masked crc32c
MAX_INDEX_BYTES = 1 << 30  # an index is kilobytes to megabytes
MAX_BLOCK_BYTES = 256 << 20
MAX_SHARDS = 100_000
_MASK_DELTA = 0xA282EAD8
_NUMPY = {"float32": "f4", "float64": "f8", "float16": "f2", "bfloat16": "u2", "int64": "i8", "int32": "i4",
          "int16": "i2", "int8": "i1", "uint8": "u1", "uint16": "u2", "uint32": "u4", "uint64": "u8", "bool": "?"}


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc_table()


def _register(data: bytes | memoryview, register: int) -> int:
    table = _TABLE
    for byte in data:
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


LANE_BYTES = 512  # bytes per lane of the vectorised CRC
MAX_LANES = 1 << 16
_NP_TABLE = np.array(_TABLE, dtype=np.uint32)
_SHIFTS: dict[int, np.ndarray] = {}  # lane length -> (4, 256) tables of "feed that many zero bytes"


def _shift_tables(length: int) -> np.ndarray:
    """The register after `length` zero bytes is linear in the register before: its images of the
    32 basis registers, spread into 4 byte-indexed tables."""
    if length not in _SHIFTS:
        basis = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
        for _ in range(length):
            basis = _NP_TABLE[basis & 0xFF] ^ (basis >> 8)
        bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8): the bits of each byte value
        tables = np.zeros((4, 256), dtype=np.uint32)
        for k in range(4):
            images = basis[8 * k:8 * k + 8]
            tables[k] = np.bitwise_xor.reduce(np.where(bits.astype(bool), images, np.uint32(0)), axis=1)
        _SHIFTS[length] = tables
    return _SHIFTS[length]


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as LevelDB and TF compute it.

    Large inputs (a conv kernel a rule reads) are split into lanes whose registers numpy computes
    side by side; since the register update is linear over GF(2), lane k's contribution is chained
    in by "feed LANE_BYTES zeros" (4 table lookups): the same value as the byte loop, ~50x faster.
    """
    register = crc ^ 0xFFFFFFFF
    view, start = memoryview(data), 0
    s0, s1, s2, s3 = _shift_tables(LANE_BYTES).tolist() if len(data) >= 8 * LANE_BYTES else ([], [], [], [])
    while len(data) - start >= 8 * LANE_BYTES:
        lanes = min((len(data) - start) // LANE_BYTES, MAX_LANES)
        body = np.frombuffer(data, dtype=np.uint8, count=lanes * LANE_BYTES, offset=start)
        columns = body.reshape(lanes, LANE_BYTES).T.copy()
        lane = np.zeros(lanes, dtype=np.uint32)
        for column in columns:
            lane = _NP_TABLE[(lane ^ column) & 0xFF] ^ (lane >> 8)
        for value in lane.tolist():
            register = s0[register & 0xFF] ^ s1[(register >> 8) & 0xFF] ^ s2[(register >> 16) & 0xFF] ^ s3[register >> 24] ^ value
        start += lanes * LANE_BYTES
    return _register(view[start:], register) ^ 0xFFFFFFFF


def unmask(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def snappy_decompress(data: bytes, limit: int = MAX_BLOCK_BYTES) -> bytes:
    """Raw snappy (no framing): a varint length, then literals and back-references. Bounded."""
    length, pos = pw.read_varint(data, 0, len(data))
    if length > limit:
        raise WireError(f"snappy block declares {length} bytes (at most {limit})")
    out = bytearray()
    end = len(data)
    while pos < end:
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                if pos + extra > end:
                    raise WireError("truncated snappy literal length")
                size = int.from_bytes(data[pos:pos + extra], "little")
                pos += extra
            size += 1
            if pos + size > end:
                raise WireError("snappy literal runs past the block")
            out += data[pos:pos + size]
            pos += size
        else:
            if kind == 1:
                if pos >= end:
                    raise WireError("truncated snappy copy")
                size, offset = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | data[pos]
                pos += 1
            else:
                width = 2 if kind == 2 else 4
                if pos + width > end:
                    raise WireError("truncated snappy copy")
                size, offset = (tag >> 2) + 1, int.from_bytes(data[pos:pos + width], "little")
                pos += width
            if offset == 0 or offset > len(out):
                raise WireError("snappy copy points outside the output")
            for _ in range(size):  # overlapping copies repeat bytes, so one at a time
                out.append(out[-offset])
        if len(out) > length:
            raise WireError("snappy block inflates past its declared length")
    if len(out) != length:
        raise WireError(f"snappy block inflates to {len(out)} bytes, not the declared {length}")
    return bytes(out)


def _handle(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    offset, pos = pw.read_varint(buf, pos, end)
    size, pos = pw.read_varint(buf, pos, end)
    return offset, size, pos


def _block(buf: bytes, offset: int, size: int) -> bytes:
    """A block's contents, checksum verified and inflated."""
    if offset + size + TRAILER_SIZE > len(buf) or size > MAX_BLOCK_BYTES:
        raise WireError(f"block [{offset}, {offset + size}) lies outside the {len(buf)}-byte index")
    data = buf[offset:offset + size]
    kind = buf[offset + size]
    stored = int.from_bytes(buf[offset + size + 1:offset + size + TRAILER_SIZE], "little")
    if unmask(stored) != crc32c(buf[offset:offset + size + 1]):
        raise WireError(f"block at byte {offset}: checksum mismatch")
    if kind == 1:
        return snappy_decompress(data)
    if kind != 0:
        raise WireError(f"block at byte {offset} has unknown compression type {kind}")
    return data


def _entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Key/value pairs of a block (shared-prefix keys; the restart array is checked, not needed)."""
    if len(block) < 4:
        raise WireError("block too short for its restart count")
    restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * restarts
    if restarts > len(block) // 4 or limit < 0:
        raise WireError(f"block declares {restarts} restart points, more than it can hold")
    out: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < limit:
        shared, pos = pw.read_varint(block, pos, limit)
        unshared, pos = pw.read_varint(block, pos, limit)
        size, pos = pw.read_varint(block, pos, limit)
        if shared > len(key) or unshared + size > limit - pos:
            raise WireError(f"block entry at byte {pos} runs past its block")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        out.append((key, block[pos:pos + size]))
        pos += size
    return out


def read_table(buf: bytes) -> dict[bytes, bytes]:
    """Every key/value of a LevelDB-format table held in `buf`."""
    if len(buf) < FOOTER_SIZE:
        raise WireError(f"{len(buf)} bytes: too short for a table footer")
    footer = buf[-FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != MAGIC:
        raise WireError("no table magic number at the end (not a TensorFlow checkpoint index)")
    _, _, pos = _handle(footer, 0, 40)  # the metaindex block: filters only
    index_offset, index_size, _ = _handle(footer, pos, 40)
    table: dict[bytes, bytes] = {}
    for _, value in _entries(_block(buf, index_offset, index_size)):
        offset, size, _ = _handle(value, 0, len(value))
        for key, data in _entries(_block(buf, offset, size)):
            table.setdefault(key, data)
    return table


@dataclass(frozen=True)
class BundleEntry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None
    sliced: bool = False  # a partitioned variable: the data lives under slice keys


@dataclass
class Bundle:
    prefix: str  # path prefix: shards are prefix.data-%05d-of-%05d
    num_shards: int
    big_endian: bool
    entries: dict[str, BundleEntry]

    def shard_path(self, shard: int) -> str:
        return f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}"

    def tensor(self, key: str) -> BundleTensor:
        return BundleTensor(self, self.entries[key])

    def read_bytes(self, entry: BundleEntry) -> bytes:
        """The stored bytes of one entry: shard and range checked, checksum verified."""
        if not 0 <= entry.shard_id < self.num_shards:
            raise InputError(self.prefix, f"tensor '{entry.key}' is in shard {entry.shard_id}, but the bundle has {self.num_shards}")
        path = self.shard_path(entry.shard_id)
        folder = os.path.realpath(os.path.dirname(self.prefix) or ".")
        if os.path.dirname(os.path.realpath(path)) != folder:
            raise InputError(self.prefix, f"data shard {os.path.basename(path)} resolves outside the checkpoint's folder")
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(self.prefix, f"cannot open data shard {os.path.basename(path)}: {exc.strerror or exc}") from None
        try:
            available = os.fstat(fd).st_size
            if entry.offset < 0 or entry.size < 0 or entry.offset + entry.size > available:
                raise InputError(self.prefix, f"tensor '{entry.key}' lies at [{entry.offset}, {entry.offset + entry.size}), "
                                 f"past the end of its {available}-byte data shard")
            data = os.pread(fd, entry.size, entry.offset)
        finally:
            os.close(fd)
        if len(data) != entry.size:
            raise InputError(self.prefix, f"data shard ends early in tensor '{entry.key}'")
        if entry.crc32c is not None and entry.dtype != "string" and unmask(entry.crc32c) != crc32c(data):
            raise InputError(self.prefix, f"tensor '{entry.key}': checksum mismatch (corrupt data shard)")
        return data

    def string(self, key: str) -> bytes:
        """A scalar string tensor (e.g. _CHECKPOINTABLE_OBJECT_GRAPH): varint length, 4-byte length
        checksum, then the bytes."""
        entry = self.entries[key]
        if entry.dtype != "string" or numel(entry.shape) != 1:
            raise InputError(self.prefix, f"'{key}' is not a scalar string tensor")
        data = self.read_bytes(entry)
        try:
            length, pos = pw.read_varint(data, 0, len(data))
        except WireError as exc:
            raise InputError(self.prefix, f"'{key}': {exc}") from None
        if pos + 4 + length != len(data):
            raise InputError(self.prefix, f"'{key}': string length {length} does not match its {len(data)} stored bytes")
        # TF checksums the length as a little-endian uint32 (uint64 past 4 GiB), not its varint bytes,
        # then the stored (masked) length checksum and the string itself.
        crc = crc32c(length.to_bytes(4 if length <= 0xFFFFFFFF else 8, "little"))
        stored = int.from_bytes(data[pos:pos + 4], "little")
        total = crc32c(data[pos + 4:], crc32c(data[pos:pos + 4], crc))
        if unmask(stored) != crc or (entry.crc32c is not None and unmask(entry.crc32c) != total):
            raise InputError(self.prefix, f"tensor '{key}': checksum mismatch (corrupt data shard)")
        return data[pos + 4:]


@dataclass(frozen=True)
class BundleTensor:
    """One bundle entry as a TensorRef: read from its shard on `.numpy()` only."""

    bundle: Bundle
    entry: BundleEntry

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def dtype(self) -> str:
        return self.entry.dtype

    def numpy(self) -> np.ndarray:
        entry = self.entry
        if entry.sliced or entry.dtype not in _NUMPY:
            what = "a partitioned (sliced) variable" if entry.sliced else f"dtype {entry.dtype}"
            raise InputError(self.bundle.prefix, f"tensor '{entry.key}' is {what}: not read")
        code = np.dtype(("<" if not self.bundle.big_endian else ">") + _NUMPY[entry.dtype])
        count = numel(entry.shape)
        if count * code.itemsize != entry.size:  # checked before anything is read or allocated
            raise InputError(self.bundle.prefix, f"tensor '{entry.key}' of shape {entry.shape[:8]} needs "
                             f"{count * code.itemsize} bytes but its entry declares {entry.size}")
        array = np.frombuffer(self.bundle.read_bytes(entry), dtype=code).reshape(entry.shape)
        array = np.array(array, dtype=code.newbyteorder("="))
        if entry.dtype == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array


def read_bundle(index: str | os.PathLike[str]) -> Bundle:
    """Open a checkpoint by its `.index` file (or prefix); InputError (one line) if unreadable."""
    path = os.fspath(index)
    if not path.endswith(".index"):
        path += ".index"
    try:
        size = os.path.getsize(path)
        if size > MAX_INDEX_BYTES:
            raise InputError(path, f"checkpoint index of {size} bytes (at most {MAX_INDEX_BYTES})")
        buf = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        table = read_table(buf)
        header = table.get(b"")
        if header is None:
            raise WireError("no bundle header (empty key)")
        head = Msg(header)
        shards, big_endian = head.num(1, 1), head.num(2) == 1
        if not 0 < shards <= MAX_SHARDS:
            raise WireError(f"bundle declares {shards} data shards")
        entries: dict[str, BundleEntry] = {}
        for raw_key, value in table.items():
            if not raw_key:
                continue
            entry = Msg(value)
            shape = read_shape(entry.msg(2)) or ()
            numel(shape)
            key = raw_key.decode("utf-8", "replace")
            entries[key] = BundleEntry(key, dtype_name(entry.num(1)), shape, entry.num(3), entry.num(4), entry.num(5),
                                       entry.fixed32(6), entry.has(7))
    except (WireError, RecursionError) as exc:
        raise InputError(path, f"not a valid TensorFlow checkpoint index ({exc})") from None
    return Bundle(path[:-len(".index")], shards, big_endian, entries)


def is_checkpoint_index(path: str | os.PathLike[str]) -> bool:
    """Whether a file ends with the table magic (what the dispatcher asks of a `.index` file)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() < FOOTER_SIZE:
                return False
            handle.seek(-8, os.SEEK_END)
            return int.from_bytes(handle.read(8), "little") == MAGIC
    except OSError:
        return False


# ---- a checkpoint as a model --------------------------------------------------------------------
# Name-based (TF1 Saver, tf.compat.v1): keys are variable names, `scope/gamma`, `scope/moving_mean`.
# Object-based (tf.train.Checkpoint, TF2): keys are object paths ending in /.ATTRIBUTES/VARIABLE_VALUE,
# and _CHECKPOINTABLE_OBJECT_GRAPH (a TrackableObjectGraph) gives each one its variable's name.
ROLES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
ATTRIBUTE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
MAX_STATE_BYTES = 1 << 20


def checkpoint_prefix(path: str | os.PathLike[str]) -> str:
    """The bundle prefix for a `.index` file, a data shard, a prefix, or a folder with a `checkpoint`
    state file (whose model_checkpoint_path must name a checkpoint inside that folder)."""
    text = os.fspath(path)
    if os.path.isdir(text):
        state = os.path.join(text, "checkpoint")
        try:
            if os.path.getsize(state) > MAX_STATE_BYTES:
                raise InputError(state, "checkpoint state file larger than 1 MiB")
            parsed = pw.parse_text(Path(state).read_text("utf-8", "replace"))
            value = parsed.get("model_checkpoint_path", [None])[-1]
        except OSError:
            raise InputError(text, "no checkpoint state file (`checkpoint`) in this folder") from None
        except WireError as exc:
            raise InputError(state, f"not a checkpoint state file ({exc})") from None
        if not isinstance(value, pw.TextValue) or value.kind != "str":
            raise InputError(state, "no model_checkpoint_path in the checkpoint state file")
        named = value.text
        if os.path.isabs(named) or named[1:3] in (":\\", ":/"):
            # written by the training machine (TF1 Saver): the same file name, looked up in this folder
            named = named.replace("\\", "/").rsplit("/", 1)[-1]
        target = os.path.realpath(os.path.join(text, named))
        inside = os.path.commonpath([target, os.path.realpath(text)]) == os.path.realpath(text)
        if ".." in named.replace("\\", "/").split("/") or not inside:
            raise InputError(state, f"model_checkpoint_path {named!r} is outside the checkpoint's folder: not followed")
        return os.path.join(text, named)
    base = os.path.basename(text)
    if base.endswith(".index"):
        return text[:-len(".index")]
    if ".data-" in base:
        return text[:text.rindex(".data-")]
    return text


def _object_names(bundle: Bundle) -> dict[str, str]:
    """checkpoint key -> the variable's full name, from the object graph (empty when there is none)."""
    if OBJECT_GRAPH_KEY not in bundle.entries:
        return {}
    try:
        graph = Msg(bundle.string(OBJECT_GRAPH_KEY))
        names = {}
        for node in graph.msgs(1):
            for attribute in node.msgs(2):  # SerializedTensor: name 1, full_name 2, checkpoint_key 3
                if attribute.text(1) == "VARIABLE_VALUE" and attribute.text(2):
                    names[attribute.text(3)] = attribute.text(2)
        return names
    except (WireError, RecursionError) as exc:
        raise InputError(bundle.prefix, f"the checkpoint's object graph is not readable ({exc})") from None


def _role(key: str) -> tuple[str, str] | None:
    """(group path, role) of a BN variable's key, or None for anything else (optimizer slots too)."""
    path = key.removesuffix(ATTRIBUTE_SUFFIX)
    if ".OPTIMIZER_SLOT" in path or path.startswith("optimizer/"):
        return None
    group, _, last = path.rpartition("/")
    return (group, ROLES[last]) if last in ROLES and group else None


def load_tf_checkpoint(path: Path, companion: Path | None = None) -> ModelInfo:
    """A TF checkpoint (either layout) as ModelInfo: BN layers inferred from variable names."""
    bundle = read_bundle(checkpoint_prefix(path))
    names = _object_names(bundle)
    layout = "object-based" if names or any(k.endswith(ATTRIBUTE_SUFFIX) for k in bundle.entries) else "name-based"
    info = ModelInfo(path=str(path), format="tf-checkpoint", framework="tensorflow", format_version=f"{layout} checkpoint")
    groups: dict[str, dict[str, str]] = {}
    for key in bundle.entries:
        found = _role(key)
        if found is not None:
            groups.setdefault(found[0], {})[found[1]] = key
    for group, roles in groups.items():
        if "running_mean" not in roles or "running_var" not in roles:
            continue
        full = names.get(roles["running_var"], "")
        name = full.rpartition("/")[0] if "/" in full else group
        bn = BNLayer(name=name, kind="BatchNormalization", framework="tensorflow", certainty="inferred", order=len(info.layers))
        bn.aliases = (group,) if group != name else ()
        for role, key in roles.items():
            entry = bundle.entries[key]
            if len(entry.shape) != 1:
                bn.unchecked.append(f"{key.removesuffix(ATTRIBUTE_SUFFIX)}: shape {list(entry.shape)}, not a vector of per-channel values")
            else:
                bn.tensors[role] = BundleTensor(bundle, entry)
        anchor = bn.tensors.get("running_var") or bn.tensors.get("running_mean")
        bn.channels = anchor.shape[0] if anchor is not None else None
        info.layers.append(bn)
    info.metadata.update(layout=layout, tensors=len(bundle.entries), shards=bundle.num_shards)
    info.notes.append("a checkpoint holds variables only: eps, momentum and the training mode are not in it")
    return info


SHARD_NAME = re.compile(r"\.data-\d{5}-of-\d{5}$")


def sniff(file: Sniff) -> bool:
    """A checkpoint's `.index` (its table magic) or one of its data shards, for bnlint.formats."""
    name = file.path.name
    if SHARD_NAME.search(name):
        return Path(checkpoint_prefix(file.path) + ".index").is_file()
    return name.endswith(".index") and is_checkpoint_index(file.path)


def is_checkpoint_dir(path: Path) -> bool:
    """A folder whose `checkpoint` state file names a checkpoint in it (what tf.train.latest_checkpoint reads)."""
    return (path / "checkpoint").is_file() and any(path.glob("*.index"))
