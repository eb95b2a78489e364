"""A lazy, read-only ONNX `ModelProto` reader on bnlint's own protobuf wire reader (`bnlint.protowire`).

Why not `onnx.load`: importing onnx (and protobuf) costs more than the rest of a static lint, and
parsing copies every weight's bytes although the linter reads only the graph and a few tensors.
Here the file is memory-mapped once; the graph's structure (nodes, attributes, value infos, tensor
headers) is read eagerly, so every malformed byte is found at load time, but a tensor's payload
stays a byte range of the mapping until `onnx_tensors.OnnxTensor.numpy()` asks for it.

The objects mirror the attribute names of onnx's protobuf classes (`node.input`, `attr.t`,
`graph.initializer`, ...), so code that walks a graph works on either (bnlint.fix passes real
protos to a few helpers of `onnx_file`). Each class's SCHEMA lists the field numbers it reads, as
in onnx's `onnx.proto` (1.23); other fields are skipped. Protobuf semantics kept: the last value
of a singular field wins, a singular message given twice is merged, a oneof keeps its last member,
repeated numbers may be packed or not, closed enums ignore unknown values. Stricter than protobuf:
a known field with the wrong wire type is an error rather than an unknown field.
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Union

import numpy as np

from bnlint import protowire as pw
from bnlint.errors import InputError
from bnlint.protowire import FIXED32, FIXED64, LEN, VARINT, Buffer, Field, WireError

# AttributeProto.AttributeType
UNDEFINED, FLOAT, INT, STRING, TENSOR, GRAPH, FLOATS, INTS, STRINGS, TENSORS, GRAPHS, SPARSE_TENSOR = range(12)
_VALUE_FIELDS = {FLOAT: "f", INT: "i", STRING: "s", TENSOR: "t", GRAPH: "g", FLOATS: "floats", INTS: "ints", STRINGS: "strings",
                 TENSORS: "tensors", GRAPHS: "graphs"}
EXTERNAL = 1  # TensorProto.DataLocation
# ModelProto's fields and their wire types (onnx.proto): ir_version 1, producer_name 2,
# producer_version 3, domain 4, model_version 5, doc_string 6, graph 7, opset_import 8,
# metadata_props 14, training_info 20, functions 25. Sniffers tell a model from other protobufs by them.
MODEL_FIELD_WIRES: Mapping[int, int] = MappingProxyType({1: VARINT, 2: LEN, 3: LEN, 4: LEN, 5: VARINT, 6: LEN, 7: LEN, 8: LEN,
                                                          14: LEN, 20: LEN, 25: LEN})
# TensorProto payload fields
FLOAT_DATA, INT32_DATA, STRING_DATA, INT64_DATA, DOUBLE_DATA, UINT64_DATA = 4, 5, 6, 7, 10, 11
# How a schema entry (attribute name, kind, extra) reads its field. extra: the message class for
# MESSAGE(S), the known values for ENUM, the allowed wire types for PAYLOAD.
TEXT, TEXTS, MESSAGE, MESSAGES, INT64, INT32, ENUM, INT64S, FLOAT32, FLOAT32S, BYTES, BYTES_LIST, RANGE, PAYLOAD, PRESENT, CLEAR = range(16)
_WIRE_NAMES = {VARINT: "varint", FIXED64: "fixed64", LEN: "length-delimited", FIXED32: "fixed32"}

Raw = tuple  # (number, wire_type, value, start, end): a protowire Field, or a plain tuple from _fields


def _fields(buf: Buffer, start: int, end: int) -> list[Raw]:
    """protowire.iter_fields for the common case, with one-byte keys and lengths decoded inline.

    A message holding anything else than varint and length-delimited fields (fixed-width values,
    groups, bad keys, a length past its end) goes to iter_fields whole: it coalesces runs of
    fixed-width values and words every error. Linear either way: a message is scanned at most twice.
    """
    out: list[Raw] = []
    pos = start
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = pw.read_varint(buf, pos, end)
        wire = key & 7
        if key < 8 or key >> 3 > pw.MAX_FIELD_NUMBER or (wire != LEN and wire != VARINT) or pos >= end:
            return list(pw.iter_fields(buf, start, end))
        first = pos
        value = buf[pos]
        if value < 0x80:
            pos += 1
        else:
            value, pos = pw.read_varint(buf, pos, end)
        if wire == VARINT:
            out.append((key >> 3, VARINT, value, first, pos))
        elif value > end - pos:
            return list(pw.iter_fields(buf, start, end))
        else:
            out.append((key >> 3, LEN, value, pos, pos + value))
            pos += value
    return out


def _field(raw: Raw) -> Field:
    return raw if isinstance(raw, Field) else Field(*raw)


def _want(raw: Raw, *wire_types: int) -> None:
    if raw[1] not in wire_types:
        expected = " or ".join(_WIRE_NAMES[w] for w in wire_types)
        raise WireError(f"field {raw[0]} at byte {raw[3]} is {_WIRE_NAMES.get(raw[1], raw[1])}, not {expected}")


def _text(buf: Buffer, raw: Raw) -> str:
    """A string field; invalid UTF-8 is replaced (names end up in reports) rather than refused."""
    if raw[1] != LEN:
        _want(raw, LEN)
    return str(buf[raw[3]:raw[4]], "utf-8", "replace")


def _int(raw: Raw, bits: int = 64) -> int:
    """An int64, or int32/enum (protobuf keeps the varint's low 32 bits), field."""
    _want(raw, VARINT)
    low: int = raw[2] & ((1 << bits) - 1)
    return low - (1 << bits) if low >= 1 << (bits - 1) else low


class _Message:
    """A message read by its SCHEMA: field number -> (attribute, kind, extra). Unset fields read as
    the class defaults (repeated ones as an empty tuple until the first value makes a list)."""

    SCHEMA: ClassVar[dict[int, tuple[str, int, Any]]] = {}

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf


def _parse(cls: type[_Message], buf: Buffer, raw: Raw, depth: int) -> Any:
    message = cls(buf)
    _fill(message, buf, raw, depth)
    return message


def _list(message: _Message, name: str) -> list[Any]:
    values: list[Any] | None = message.__dict__.get(name)
    if values is None:
        values = message.__dict__[name] = []
    return values


def _fill(message: _Message, buf: Buffer, raw: Raw, depth: int) -> None:
    """Read the LEN field `raw` into `message` (merging into what it holds), one level deeper than `depth`."""
    _want(raw, LEN)
    depth += 1
    if depth > pw.MAX_DEPTH:
        raise WireError(f"messages nested deeper than {pw.MAX_DEPTH} levels")
    schema = message.SCHEMA
    for f in _fields(buf, raw[3], raw[4]):
        spec = schema.get(f[0])
        if spec is None:
            continue
        name, kind, extra = spec
        if kind == TEXT:
            setattr(message, name, _text(buf, f))
        elif kind == TEXTS:
            _list(message, name).append(_text(buf, f))
        elif kind == MESSAGES:
            _list(message, name).append(_parse(extra, buf, f, depth))
        elif kind == MESSAGE:  # a singular message given twice is merged
            current = getattr(message, name)
            if current is None:
                current = extra(buf)
                setattr(message, name, current)
            _fill(current, buf, f, depth)
        elif kind == INT64:
            setattr(message, name, _int(f))
        elif kind == INT32 or kind == ENUM:
            value = _int(f, 32)
            if kind == INT32 or value in extra:
                setattr(message, name, value)
        elif kind == INT64S:  # one varint (unpacked) or a packed run
            if f[1] == VARINT:
                _list(message, name).append(pw.to_int64(f[2]))
            else:
                _want(f, VARINT, LEN)
                _list(message, name).extend(pw.decode_varints(buf, _field(f)).view(np.int64).tolist())
        elif kind == FLOAT32:
            _want(f, FIXED32)
            setattr(message, name, pw.float_value(buf, _field(f)))
        elif kind == FLOAT32S:
            _want(f, FIXED32, LEN)
            _list(message, name).extend(pw.decode_fixed(buf, _field(f), "<f4").tolist())
        elif kind == CLEAR:
            setattr(message, name, None)
        elif kind == PAYLOAD:
            _want(f, *extra)
            if f[0] in (FLOAT_DATA, DOUBLE_DATA):
                pw.fixed_count(_field(f), 4 if f[0] == FLOAT_DATA else 8)  # a packed length must hold whole values
            message.__dict__.setdefault(name, {}).setdefault(f[0], []).append(_field(f))
        else:
            _want(f, LEN)
            if kind == BYTES_LIST:
                _list(message, name).append(bytes(buf[f[3]:f[4]]))
            else:  # BYTES, RANGE (offset, length), PRESENT
                setattr(message, name, bytes(buf[f[3]:f[4]]) if kind == BYTES else (f[3], f[2]) if kind == RANGE else True)


class StringEntry(_Message):
    """StringStringEntryProto (metadata_props, external_data)."""

    SCHEMA = {1: ("key", TEXT, None), 2: ("value", TEXT, None)}
    key = value = ""


class OpsetId(_Message):
    """OperatorSetIdProto."""

    SCHEMA = {1: ("domain", TEXT, None), 2: ("version", INT64, None)}
    domain, version = "", 0


_PAYLOAD = {FLOAT_DATA: (FIXED32, LEN), INT32_DATA: (VARINT, LEN), STRING_DATA: (LEN,), INT64_DATA: (VARINT, LEN),
            DOUBLE_DATA: (FIXED64, LEN), UINT64_DATA: (VARINT, LEN)}


class WireTensor(_Message):
    """TensorProto header; the payload stays byte ranges of the buffer (decoded by onnx_tensors)."""

    SCHEMA = {1: ("dims", INT64S, None), 2: ("data_type", INT32, None), 3: ("has_segment", PRESENT, None),
              8: ("name", TEXT, None), 9: ("raw", RANGE, None), 13: ("external_data", MESSAGES, StringEntry),
              14: ("data_location", ENUM, (0, EXTERNAL)), **{n: ("payload", PAYLOAD, w) for n, w in _PAYLOAD.items()}}
    name = ""
    dims: Sequence[int] = ()
    data_type = data_location = 0
    external_data: Sequence[StringEntry] = ()
    raw: tuple[int, int] | None = None  # raw_data as (offset, length) in buf
    payload: Mapping[int, list[Field]] = MappingProxyType({})  # typed data fields by number, in file order
    has_segment = False

    def has_raw_data(self) -> bool:
        return self.raw is not None


class WireSparseTensor(_Message):
    """SparseTensorProto: values [NNZ], indices [NNZ] (linearised) or [NNZ, rank], dense dims."""

    SCHEMA = {1: ("values", MESSAGE, WireTensor), 2: ("indices", MESSAGE, WireTensor), 3: ("dims", INT64S, None)}
    values: WireTensor | None = None
    indices: WireTensor | None = None
    dims: Sequence[int] = ()


Dim = Union[int, str, None]


class _Dimension(_Message):
    SCHEMA = {1: ("value", INT64, None), 2: ("value", TEXT, None)}  # the oneof: dim_value or dim_param, the last one
    value: Dim = None


class _Shape(_Message):
    SCHEMA = {1: ("dim", MESSAGES, _Dimension)}
    dim: Sequence[_Dimension] = ()


class _TensorType(_Message):
    SCHEMA = {1: ("elem_type", INT32, None), 2: ("shape", MESSAGE, _Shape)}
    elem_type = 0
    shape: _Shape | None = None


class _Type(_Message):
    # the `value` oneof: a sequence/map/opaque/sparse/optional type replaces a tensor type
    SCHEMA = {1: ("tensor_type", MESSAGE, _TensorType), **{n: ("tensor_type", CLEAR, None) for n in (4, 5, 7, 8, 9)}}
    tensor_type: _TensorType | None = None


class WireValueInfo(_Message):
    """ValueInfoProto: a name, and the element type and shape of a tensor type."""

    SCHEMA = {1: ("name", TEXT, None), 2: ("type", MESSAGE, _Type)}
    name = ""
    type: _Type | None = None

    @property
    def elem_type(self) -> int:
        """The tensor element type (0 when not a tensor or unset)."""
        tensor = self.type.tensor_type if self.type is not None else None
        return tensor.elem_type if tensor is not None else 0

    @property
    def shape(self) -> list[Dim] | None:
        """Dimensions (an int, a symbolic name, or None for neither); None when no shape is recorded."""
        tensor = self.type.tensor_type if self.type is not None else None
        return [d.value for d in tensor.shape.dim] if tensor is not None and tensor.shape is not None else None


class WireAttribute(_Message):
    """AttributeProto. `t` and `g` read as empty messages when absent, as protobuf's do."""

    name = ref_attr_name = ""
    type, f, i, s = UNDEFINED, 0.0, 0, b""
    _t: WireTensor | None = None
    _g: WireGraph | None = None
    floats: Sequence[float] = ()
    ints: Sequence[int] = ()
    strings: Sequence[bytes] = ()
    tensors: Sequence[WireTensor] = ()
    graphs: Sequence[WireGraph] = ()
    sparse_tensor: WireSparseTensor | None = None  # a Constant node's sparse_value

    @property
    def t(self) -> WireTensor:
        return self._t if self._t is not None else WireTensor(self.buf)

    @property
    def g(self) -> WireGraph:
        return self._g if self._g is not None else WireGraph(self.buf)

    def value(self) -> Any:
        """The value as onnx.helper.get_attribute_value gives it; None for a reference to a function's
        attribute, a missing or unknown type, or the (unread) sparse-tensor and type-proto kinds."""
        field_name = _VALUE_FIELDS.get(self.type)
        if self.ref_attr_name or field_name is None:
            return None
        value = getattr(self, field_name)
        return list(value) if isinstance(value, (list, tuple)) else value


class WireNode(_Message):
    """NodeProto."""

    SCHEMA = {1: ("input", TEXTS, None), 2: ("output", TEXTS, None), 3: ("name", TEXT, None), 4: ("op_type", TEXT, None),
              5: ("attribute", MESSAGES, WireAttribute), 7: ("domain", TEXT, None), 9: ("metadata_props", MESSAGES, StringEntry)}
    input: Sequence[str] = ()
    output: Sequence[str] = ()
    name = op_type = domain = ""
    attribute: Sequence[WireAttribute] = ()
    metadata_props: Sequence[StringEntry] = ()


class WireGraph(_Message):
    """GraphProto."""

    SCHEMA = {1: ("node", MESSAGES, WireNode), 2: ("name", TEXT, None), 5: ("initializer", MESSAGES, WireTensor),
              11: ("input", MESSAGES, WireValueInfo), 12: ("output", MESSAGES, WireValueInfo), 13: ("value_info", MESSAGES, WireValueInfo),
              15: ("sparse_initializer", MESSAGES, WireSparseTensor), 16: ("metadata_props", MESSAGES, StringEntry)}
    name = ""
    node: Sequence[WireNode] = ()
    initializer: Sequence[WireTensor] = ()
    sparse_initializer: Sequence[WireSparseTensor] = ()
    input: Sequence[WireValueInfo] = ()
    output: Sequence[WireValueInfo] = ()
    value_info: Sequence[WireValueInfo] = ()
    metadata_props: Sequence[StringEntry] = ()


WireAttribute.SCHEMA = {
    1: ("name", TEXT, None), 2: ("f", FLOAT32, None), 3: ("i", INT64, None), 4: ("s", BYTES, None), 5: ("_t", MESSAGE, WireTensor),
    6: ("_g", MESSAGE, WireGraph), 7: ("floats", FLOAT32S, None), 8: ("ints", INT64S, None), 9: ("strings", BYTES_LIST, None),
    10: ("tensors", MESSAGES, WireTensor), 11: ("graphs", MESSAGES, WireGraph), 20: ("type", ENUM, frozenset(range(15))),
    21: ("ref_attr_name", TEXT, None), 22: ("sparse_tensor", MESSAGE, WireSparseTensor),
}


class WireFunction(_Message):
    """FunctionProto: its nodes are counted, not linted."""

    SCHEMA = {1: ("name", TEXT, None), 7: ("node", MESSAGES, WireNode), 9: ("opset_import", MESSAGES, OpsetId), 10: ("domain", TEXT, None)}
    name = domain = ""
    node: Sequence[WireNode] = ()
    opset_import: Sequence[OpsetId] = ()


class WireModel(_Message):
    """ModelProto. `graph` is None when the file has none; `buf` is the (mapped) file."""

    SCHEMA = {1: ("ir_version", INT64, None), 2: ("producer_name", TEXT, None), 3: ("producer_version", TEXT, None),
              4: ("domain", TEXT, None), 5: ("model_version", INT64, None), 7: ("graph", MESSAGE, WireGraph),
              8: ("opset_import", MESSAGES, OpsetId), 14: ("metadata_props", MESSAGES, StringEntry), 25: ("functions", MESSAGES, WireFunction)}
    ir_version = model_version = 0
    producer_name = producer_version = domain = ""
    graph: WireGraph | None = None
    opset_import: Sequence[OpsetId] = ()
    metadata_props: Sequence[StringEntry] = ()
    functions: Sequence[WireFunction] = ()


def _parse_all(cls: type[_Message], buf: Buffer) -> Any:
    if isinstance(buf, memoryview) and buf.format != "B":
        buf = buf.cast("B")
    return _parse(cls, buf, (0, LEN, len(buf), 0, len(buf)), -1)


def parse_model(buf: Buffer) -> WireModel:
    """A ModelProto from bytes (or a mapping); raises WireError for malformed input."""
    model: WireModel = _parse_all(WireModel, buf)
    return model


def parse_tensor(buf: Buffer) -> WireTensor:
    """A serialized TensorProto (e.g. `onnx.TensorProto.SerializeToString()`)."""
    tensor: WireTensor = _parse_all(WireTensor, buf)
    return tensor


def map_file(path: Path) -> Buffer:
    """The file's bytes, memory-mapped read-only (only the pages touched are read); a plain read
    for files mmap refuses (empty, pipes). Raises OSError."""
    with open(path, "rb") as handle:
        try:
            return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
        except (ValueError, OSError):
            return handle.read()


def read_model(path: Path) -> WireModel:
    """Map and parse an ONNX file. InputError (one line) when it cannot be read or is not protobuf.

    The mapping lives as long as the model and the arrays viewing it; the fix writes to a temporary
    file and renames it, so a mapped input is never truncated under a reader by bnlint itself.
    """
    try:
        buf = map_file(path)
    except OSError as exc:
        raise InputError(str(path), f"cannot read: {exc.strerror or exc}") from None
    try:
        return parse_model(buf)
    except (WireError, RecursionError) as exc:
        raise InputError(str(path), f"not a valid ONNX file (truncated or corrupt protobuf: {exc})") from None
