"""TensorFlow's protobuf messages (SavedModel, GraphDef, TensorProto, checkpoint bundle entries) read
as data with bnlint's own wire reader (`bnlint.protowire`): no tensorflow, no generated classes.

Field numbers are those of tensorflow/core/framework/{graph,node_def,attr_value,function,op_def,
tensor,tensor_shape,types}.proto and tensorflow/core/protobuf/{saved_model,meta_graph,
saved_object_graph,trackable_object_graph,tensor_bundle}.proto (TF 2.x; stable for years).

Messages are decoded lazily: `Msg` groups one message's fields by number (byte ranges only) and a
sub-message is parsed when asked for, one level deeper (at most `protowire.MAX_DEPTH`). Protobuf
semantics kept where they matter here: the last value of a singular field wins, repeated numbers
may be packed or not, unknown fields are skipped. Every failure is a `WireError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnlint import protowire as pw
from bnlint.errors import InputError
from bnlint.loaders.onnx_wire import MODEL_FIELD_WIRES
from bnlint.protowire import FIXED32, FIXED64, LEN, VARINT, Buffer, Field, WireError

# types.proto DataType -> numpy-style name (as bnlint.model.TensorRef.dtype spells them). A
# reference type (number + 100) is the same dtype.
DTYPES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64",
    9: "int64", 10: "bool", 11: "qint8", 12: "quint8", 13: "qint32", 14: "bfloat16", 17: "uint16",
    18: "complex128", 19: "float16", 20: "resource", 21: "variant", 22: "uint32", 23: "uint64",
}
MAX_ELEMENTS = 1 << 31  # a Const / variable BN tensor is tiny; this bounds allocation by declared shapes
MAX_RANK = 32


def dtype_name(number: int) -> str:
    number = number - 100 if number > 100 else number
    return DTYPES.get(number, f"dtype{number}")


class Msg:
    """One message: its fields grouped by number, with the nesting depth for `sub`."""

    __slots__ = ("buf", "depth", "fields", "start", "end")

    def __init__(self, buf: Buffer, start: int = 0, end: int | None = None, depth: int = 0) -> None:
        if depth > pw.MAX_DEPTH:
            raise WireError(f"messages nested deeper than {pw.MAX_DEPTH} levels")
        self.buf, self.start, self.end, self.depth = buf, start, len(buf) if end is None else end, depth
        self.fields: dict[int, list[Field]] = {}
        for f in pw.iter_fields(buf, start, self.end):
            self.fields.setdefault(f.number, []).append(f)

    def _last(self, number: int, *wire: int) -> Field | None:
        found = self.fields.get(number)
        if not found:
            return None
        last = found[-1]
        if last.wire_type not in wire:
            raise WireError(f"field {number} at byte {last.start} has wire type {last.wire_type}, expected {wire[0]}")
        return last

    def has(self, number: int) -> bool:
        return number in self.fields

    def sub(self, f: Field) -> Msg:
        if f.wire_type != LEN:
            raise WireError(f"field {f.number} at byte {f.start} is not a message")
        return Msg(self.buf, f.start, f.end, self.depth + 1)

    def msg(self, number: int) -> Msg | None:
        last = self._last(number, LEN)
        return None if last is None else self.sub(last)

    def msgs(self, number: int) -> list[Msg]:
        return [self.sub(f) for f in self.fields.get(number, ())]

    def raw(self, number: int) -> bytes:
        last = self._last(number, LEN)
        return b"" if last is None else bytes(self.buf[last.start:last.end])

    def text(self, number: int) -> str:
        return self.raw(number).decode("utf-8", "replace")

    def texts(self, number: int) -> list[str]:
        out = []
        for f in self.fields.get(number, ()):
            if f.wire_type != LEN:
                raise WireError(f"field {number} at byte {f.start} is not a string")
            out.append(str(self.buf[f.start:f.end], "utf-8", "replace"))
        return out

    def num(self, number: int, default: int = 0) -> int:
        last = self._last(number, VARINT)
        return default if last is None else pw.to_int64(last.value)

    def flag(self, number: int) -> bool:
        return bool(self.num(number))

    def f32(self, number: int, default: float = 0.0) -> float:
        last = self._last(number, FIXED32)
        return default if last is None else pw.float_value(self.buf, last)

    def fixed32(self, number: int) -> int | None:
        last = self._last(number, FIXED32)
        return None if last is None else int.from_bytes(bytes(self.buf[last.end - 4:last.end]), "little")

    def ints(self, number: int, limit: int = MAX_ELEMENTS) -> list[int]:
        out: list[int] = []
        for f in self.fields.get(number, ()):
            if f.wire_type == VARINT:
                out.append(pw.to_int64(f.value))
            else:
                out.extend(pw.decode_varints(self.buf, f, limit).view(np.int64).tolist())
            if len(out) > limit:
                raise WireError(f"field {number} holds more than {limit} values")
        return out

    def map(self, number: int) -> dict[str, Msg]:
        """A map<string, Message> field (entries: key 1, value 2); the last entry of a key wins."""
        out: dict[str, Msg] = {}
        for entry in self.msgs(number):
            value = entry.msg(2)
            out[entry.text(1)] = value if value is not None else Msg(b"", depth=entry.depth + 1)
        return out

    def str_map(self, number: int) -> dict[str, str]:
        return {entry.text(1): entry.text(2) for entry in self.msgs(number)}


def read_shape(shape: Msg | None) -> tuple[int, ...] | None:
    """TensorShapeProto (dim 2 {size 1}, unknown_rank 3) -> sizes (-1 unknown); None: unknown rank."""
    if shape is None:
        return ()
    if shape.flag(3):
        return None
    dims = tuple(d.num(1) for d in shape.msgs(2))
    if len(dims) > MAX_RANK:
        raise WireError(f"tensor shape has {len(dims)} dimensions (at most {MAX_RANK})")
    return dims


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        if dim < 0:
            raise WireError(f"tensor shape {shape[:8]} has an unknown or negative dimension")
        count *= dim
        if count > MAX_ELEMENTS:
            raise WireError(f"tensor shape {shape[:8]} declares more than {MAX_ELEMENTS} elements")
    return count


# TensorProto typed value lists: dtype -> (field number, how the field stores it).
_VALUE_FIELDS: dict[str, tuple[int, str]] = {
    "float32": (5, "<f4"), "float64": (6, "<f8"), "int32": (7, "varint"), "int16": (7, "varint"), "int8": (7, "varint"),
    "uint8": (7, "varint"), "uint16": (7, "varint"), "int64": (10, "varint"), "bool": (11, "varint"),
    "float16": (13, "varint"), "bfloat16": (13, "varint"), "uint32": (16, "varint"), "uint64": (17, "varint"),
}
_NUMPY = {"float32": "<f4", "float64": "<f8", "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "uint16": "<u2",
          "int64": "<i8", "bool": "?", "float16": "<f2", "bfloat16": "<u2", "uint32": "<u4", "uint64": "<u8"}


@dataclass
class ConstTensor:
    """A TensorProto (a Const node's value): TensorRef protocol, decoded on `.numpy()` only."""

    message: Msg
    origin: str = "<tensor>"  # the node, for messages
    path: str = "<file>"  # the file, for InputError


    @property
    def dtype(self) -> str:
        return dtype_name(self.message.num(1))

    @property
    def shape(self) -> tuple[int, ...]:
        shape = read_shape(self.message.msg(2))
        return shape if shape is not None else ()

    def numpy(self) -> np.ndarray:
        try:
            return self._decode()
        except WireError as exc:
            raise InputError(self.path, f"constant {self.origin}: {exc}") from None

    def _decode(self) -> np.ndarray:
        dtype, shape = self.dtype, self.shape
        if dtype not in _NUMPY:
            raise WireError(f"tensor dtype {dtype} cannot be read")
        count = numel(shape)
        code = np.dtype(_NUMPY[dtype])
        content = self.message._last(4, LEN)
        if content is not None:
            if content.end - content.start != count * code.itemsize:
                raise WireError(f"tensor_content holds {content.end - content.start} bytes, "
                                f"shape {shape[:8]} of {dtype} needs {count * code.itemsize}")
            values = np.frombuffer(self.message.buf, dtype=code, count=count, offset=content.start)
        else:
            number, kind = _VALUE_FIELDS[dtype]
            values = self._typed(number, kind, code, count)
        array = np.array(values.reshape(shape), dtype=code.newbyteorder("="))
        if dtype == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def _typed(self, number: int, kind: str, code: np.dtype[Any], count: int) -> np.ndarray:
        """A typed value list; fewer values than elements repeat the last one (TF's rule)."""
        parts: list[np.ndarray] = []
        total = 0
        for f in self.message.fields.get(number, ()):
            if kind == "varint":
                part = pw.decode_varints(self.message.buf, f, count + 1)
            else:
                if f.wire_type not in (LEN, FIXED32 if kind == "<f4" else FIXED64):
                    raise WireError(f"field {number} has the wrong wire type")
                part = pw.decode_fixed(self.message.buf, f, kind)
            total += part.size
            if total > max(count, 1):
                raise WireError(f"tensor holds more values than its shape {self.shape[:8]}")
            parts.append(part)
        if not parts:
            return np.zeros(count, dtype=code)
        flat = np.concatenate(parts)
        if kind == "varint":  # int32 fields hold the low bits; half_val holds the 16 raw bits
            flat = flat.astype(np.uint64).view(np.int64).astype(code) if code.kind in "iub" else flat.astype(code)
        if flat.size < count:
            flat = np.concatenate([flat, np.full(count - flat.size, flat[-1], dtype=flat.dtype)])
        return flat.astype(code, copy=False)


class Node:
    """A NodeDef: name 1, op 2, input 3, device 4, attr 5 (map<string, AttrValue>).

    Read by a scanner of its own (a graph has thousands of nodes, and every one's name, op and
    inputs are needed); the attribute map is parsed on first use: most nodes are never asked for one."""

    __slots__ = ("_attrs", "_range", "device", "inputs", "name", "op")

    def __init__(self, buf: Buffer, start: int, end: int, depth: int) -> None:
        if depth > pw.MAX_DEPTH:
            raise WireError(f"messages nested deeper than {pw.MAX_DEPTH} levels")
        self.name, self.op, self.device, self.inputs = _scan_node(buf, start, end)
        self._range: tuple[Buffer, int, int, int] | None = (buf, start, end, depth)
        self._attrs: dict[str, Msg] | None = None

    @property
    def attrs(self) -> dict[str, Msg]:
        if self._attrs is None:
            self._attrs = Msg(*self._range).map(5) if self._range is not None else {}
            self._range = None
        return self._attrs

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.attrs.get(name)
        return default if value is None else attr_value(value, self.name)


def _scan_node(buf: Buffer, pos: int, end: int) -> tuple[str, str, str, tuple[str, ...]]:
    """(name, op, device, inputs) of the NodeDef in buf[pos:end], every length checked as
    protowire.iter_fields checks it; one-byte keys and lengths (nearly all) decoded inline."""
    if isinstance(buf, memoryview) and buf.format != "B":
        buf = buf.cast("B")
    if not 0 <= pos <= end <= len(buf):
        raise WireError(f"message range [{pos}, {end}) lies outside a buffer of {len(buf)} bytes")
    texts: dict[int, str] = {}
    inputs: list[str] = []
    while pos < end:
        at = pos
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = pw.read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0 or number > pw.MAX_FIELD_NUMBER:
            raise WireError(f"invalid field number {number} at byte {at}")
        if wire == LEN:
            if pos >= end:
                raise WireError(f"truncated varint at byte {pos}")
            size = buf[pos]
            if size < 0x80:
                pos += 1
            else:
                size, pos = pw.read_varint(buf, pos, end)
            if size > end - pos:
                raise WireError(f"field {number} at byte {at} has length {size}, past the end of its message")
            if number == 3:
                inputs.append(str(buf[pos:pos + size], "utf-8", "replace"))
            elif number in (1, 2, 4):
                texts[number] = str(buf[pos:pos + size], "utf-8", "replace")  # the last one wins
            pos += size
        elif number in (1, 2, 3, 4):
            raise WireError(f"field {number} at byte {at} has wire type {wire}, expected {LEN}")
        elif wire == VARINT:
            _, pos = pw.read_varint(buf, pos, end)
        elif wire in (FIXED32, FIXED64):
            pos += 4 if wire == FIXED32 else 8
            if pos > end:
                raise WireError(f"truncated fixed field {number} at byte {at}")
        else:
            raise WireError(f"invalid wire type {wire} at byte {at}")
    return texts.get(1, ""), texts.get(2, ""), texts.get(4, ""), tuple(inputs)


def read_node(message: Msg) -> Node:
    return Node(message.buf, message.start, message.end, message.depth)


def read_nodes(message: Msg, number: int) -> list[Node]:
    """The NodeDefs in a repeated field, without building a Msg for each."""
    out = []
    for f in message.fields.get(number, ()):
        if f.wire_type != LEN:
            raise WireError(f"field {f.number} at byte {f.start} is not a message")
        out.append(Node(message.buf, f.start, f.end, message.depth + 1))
    return out


@dataclass(frozen=True)
class FuncRef:
    """An AttrValue func (NameAttrList: name 1, attr 2)."""

    name: str
    attrs: dict[str, Any]


def attr_value(value: Msg, origin: str = "") -> Any:
    """AttrValue (oneof: list 1, s 2, i 3, f 4, b 5, type 6, shape 7, tensor 8, placeholder 9, func 10)
    as a plain value: str (s as text), int, float, bool, dtype name, shape tuple, ConstTensor, list, FuncRef."""
    present = [n for n in value.fields if 1 <= n <= 10]
    if not present:
        return None
    number = max(present, key=lambda n: value.fields[n][-1].start)  # the oneof member written last
    if number == 1:
        items = value.msg(1)
        assert items is not None
        out: list[Any] = [s.decode("utf-8", "replace") for s in
                          (bytes(items.buf[f.start:f.end]) for f in items.fields.get(2, ()))]
        out += items.ints(3)
        for f in items.fields.get(4, ()):
            out += pw.decode_fixed(items.buf, f, "<f4").tolist()
        out += [bool(v) for v in items.ints(5)]
        out += [dtype_name(v) for v in items.ints(6)]
        out += [read_shape(s) for s in items.msgs(7)]
        out += [ConstTensor(t, origin) for t in items.msgs(8)]
        out += [_func(f, origin) for f in items.msgs(9)]
        return out
    if number == 2:
        return value.text(2)
    if number == 3:
        return value.num(3)
    if number == 4:
        return value.f32(4)
    if number == 5:
        return value.flag(5)
    if number == 6:
        return dtype_name(value.num(6))
    if number == 7:
        return read_shape(value.msg(7))
    if number == 8:
        tensor = value.msg(8)
        assert tensor is not None
        return ConstTensor(tensor, origin)
    if number == 9:
        return FuncRef("$" + value.text(9), {})
    func = value.msg(10)
    assert func is not None
    return _func(func, origin)


def _func(message: Msg, origin: str) -> FuncRef:
    return FuncRef(message.text(1), {k: attr_value(v, origin) for k, v in message.map(2).items()})


@dataclass
class Function:
    """A FunctionDef: signature (OpDef: name 1, input_arg 2, output_arg 3; ArgDef name 1, type 3),
    node_def 3, ret 4 (output name -> node output)."""

    name: str
    inputs: list[str]
    nodes: list[Node]
    ret: dict[str, str]


def read_function(message: Msg) -> Function:
    signature = message.msg(1)
    name = signature.text(1) if signature is not None else ""
    inputs = [arg.text(1) for arg in signature.msgs(2)] if signature is not None else []
    return Function(name, inputs, read_nodes(message, 3), message.str_map(4))


@dataclass
class Graph:
    """A GraphDef: node 1, library 2 (FunctionDefLibrary: function 1), versions 4 (VersionDef producer 1)."""

    nodes: list[Node]
    functions: list[Function]
    producer: int | None = None


def read_graph(message: Msg) -> Graph:
    library = message.msg(2)
    versions = message.msg(4)
    return Graph(read_nodes(message, 1),
                 [read_function(f) for f in library.msgs(1)] if library is not None else [],
                 versions.num(1) if versions is not None else None)


@dataclass
class ObjectRef:
    node_id: int
    local_name: str


@dataclass
class SavedObj:
    """A SavedObject (children 1; oneof user_object 4 {identifier 1, metadata 3}, function 6
    {concrete_functions 1}, variable 7 {dtype 1, shape 2, trainable 3, name 6}, bare_concrete_function
    8 {concrete_function_name 1}) or a TrackableObject (children 1, attributes 2 {name 1, full_name 2,
    checkpoint_key 3})."""

    children: list[ObjectRef]
    kind: str = ""  # "user_object", "function", "variable", "bare_concrete_function", ...
    identifier: str = ""
    variable_name: str = ""
    trainable: bool | None = None
    functions: list[str] = field(default_factory=list)
    attributes: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (full_name, checkpoint_key)


_KINDS = {4: "user_object", 5: "asset", 6: "function", 7: "variable", 8: "bare_concrete_function", 9: "constant",
          10: "resource", 12: "captured_tensor"}


def read_object(message: Msg) -> SavedObj:
    children = [ObjectRef(c.num(1), c.text(2)) for c in message.msgs(1)]
    obj = SavedObj(children)
    kinds = [n for n in message.fields if n in _KINDS]
    if kinds:
        number = max(kinds, key=lambda n: message.fields[n][-1].start)
        obj.kind = _KINDS[number]
        body = message.msg(number)
        assert body is not None
        if number == 4:
            obj.identifier = body.text(1)
        elif number == 6:
            obj.functions = body.texts(1)
        elif number == 7:
            obj.variable_name, obj.trainable = body.text(6), body.flag(3)
        elif number == 8:
            obj.functions = [body.text(1)]
    for attribute in message.msgs(2):  # TrackableObject.attributes (SavedObject reserves 2)
        obj.attributes[attribute.text(1)] = (attribute.text(2), attribute.text(3))
    return obj


@dataclass
class MetaGraph:
    """A MetaGraphDef: meta_info_def 1 {tags 4, tensorflow_version 5}, graph_def 2, signature_def 5,
    object_graph_def 7 (SavedObjectGraph: nodes 1, concrete_functions 2 {bound_inputs 2})."""

    tags: list[str]
    tf_version: str
    graph: Graph
    signatures: list[str]
    objects: list[SavedObj]
    bound_inputs: dict[str, list[int]]


def read_meta_graph(message: Msg) -> MetaGraph:
    info = message.msg(1)
    graph = message.msg(2)
    objects = message.msg(7)
    bound: dict[str, list[int]] = {}
    saved: list[SavedObj] = []
    if objects is not None:
        saved = [read_object(o) for o in objects.msgs(1)]
        bound = {name: fn.ints(2) for name, fn in objects.map(2).items()}
    return MetaGraph(info.texts(4) if info is not None else [], info.text(5) if info is not None else "",
                     read_graph(graph) if graph is not None else Graph([], []),
                     list(message.map(5)), saved, bound)


def read_saved_model(buf: Buffer) -> list[MetaGraph]:
    """SavedModel: saved_model_schema_version 1, meta_graphs 2."""
    return [read_meta_graph(m) for m in Msg(buf).msgs(2)]


# ---- content sniffing -------------------------------------------------------------------------

def _looks_like_node(head: bytes, f: Field) -> bool:
    """A NodeDef starts with name (1) then op (2), both strings."""
    inner = pw.leading_fields(head[f.start:min(f.end, len(head))], 2)
    return len(inner) >= 1 and inner[0].number == 1 and inner[0].wire_type == LEN and \
        (len(inner) == 1 or (inner[1].number in (2, 3, 4, 5) and inner[1].wire_type == LEN))


_ONNX_KEYS = {(number, wire) for number, wire in MODEL_FIELD_WIRES.items() if number != 1}  # what follows ir_version


def sniff_pb(head: bytes, path: object = None) -> str | None:
    """'savedmodel', 'graphdef', 'onnx' or None, from a .pb file's first bytes (512 are plenty).

    SavedModel: schema version (1, varint, value 1) then meta_graphs (2, a message starting with
    meta_info_def 1 or graph_def 2). GraphDef: node (1, a message starting with the node's name and
    op), or only library (2) / versions (4). ONNX ModelProto: ir_version (1, varint) then its own
    fields. `path` breaks ties: a file named saved_model.pb is a SavedModel when the bytes allow it.
    """
    fields = pw.leading_fields(head, 3)
    if not fields:
        return None
    first = fields[0]
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1] if path is not None else ""
    if first.number == 1 and first.wire_type == VARINT:
        second = fields[1] if len(fields) > 1 else None
        if second is None:
            return "savedmodel" if name == "saved_model.pb" and first.value == 1 else None
        # a MetaGraphDef starts with a message (0x0A, 0x12); an ONNX producer_name with a letter
        if second.number == 2 and second.wire_type == LEN and first.value == 1 and second.start < len(head) \
                and head[second.start] in (0x0A, 0x12):
            return "savedmodel"
        if (second.number, second.wire_type) in _ONNX_KEYS and 1 <= first.value <= 64:
            return "onnx"
        return None
    if first.number == 1 and first.wire_type == LEN and _looks_like_node(head, first):
        return "graphdef"
    if first.number in (2, 4) and first.wire_type == LEN and name != "saved_model.pb":
        return "graphdef"
    return None

