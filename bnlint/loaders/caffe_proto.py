"""Caffe `.caffemodel` (binary NetParameter) and `.prototxt` (protobuf text) without Caffe.

Why hand-written: Caffe is rarely installable today, and a reader built from the field numbers of
BVLC caffe's `src/caffe/proto/caffe.proto` executes nothing from the file. Both formats are first
decoded into the same small typed tree (field name -> values, by the `_SCHEMA` table below) and
then mapped once into plain dataclasses. Unknown fields are skipped in both formats, as protobuf
does; a known field with an unexpected wire type is also skipped (protobuf treats it as unknown).
Optional scalars keep their last value and repeated occurrences of a sub-message merge, as in protobuf.

Blob data is never decoded while reading: a `CaffeBlob` keeps the byte ranges of its `data`
(float32) or `double_data` (float64) and decodes with numpy on `.numpy()`. Its element count is
checked against its shape at read time, from the lengths alone. Float parameters (eps,
moving_average_fraction) are float32 in caffe.proto; both readers return that float32 value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from bnlint import protowire as pw
from bnlint.errors import InputError

_CHUNK = 16 << 20  # read size for files whose size the OS does not report (pipes)
MAX_MODEL_BYTES = (1 << 31) - 1  # Caffe's own read limit (kProtoReadBytesLimit = INT_MAX)
MAX_TEXT_BYTES = 8 << 20  # a network definition is kilobytes; parsing 8 MiB of tiny tokens takes ~5 s
MAX_TEXT_DEPTH = 64
MAX_FIELDS = 4_000_000  # real nets have far fewer; bounds a file of tiny fields to a few seconds
MAX_AXES = 32  # Caffe's kMaxBlobAxes
PHASES = ("TRAIN", "TEST")
# V1LayerParameter.LayerType (caffe.proto): number -> (enum identifier, type name from upgrade_proto.cpp).
V1_TYPES = {
    0: ("NONE", ""), 1: ("ACCURACY", "Accuracy"), 2: ("BNLL", "BNLL"), 3: ("CONCAT", "Concat"),
    4: ("CONVOLUTION", "Convolution"), 5: ("DATA", "Data"), 6: ("DROPOUT", "Dropout"),
    7: ("EUCLIDEAN_LOSS", "EuclideanLoss"), 8: ("FLATTEN", "Flatten"), 9: ("HDF5_DATA", "HDF5Data"),
    10: ("HDF5_OUTPUT", "HDF5Output"), 11: ("IM2COL", "Im2col"), 12: ("IMAGE_DATA", "ImageData"),
    13: ("INFOGAIN_LOSS", "InfogainLoss"), 14: ("INNER_PRODUCT", "InnerProduct"), 15: ("LRN", "LRN"),
    16: ("MULTINOMIAL_LOGISTIC_LOSS", "MultinomialLogisticLoss"), 17: ("POOLING", "Pooling"), 18: ("RELU", "ReLU"),
    19: ("SIGMOID", "Sigmoid"), 20: ("SOFTMAX", "Softmax"), 21: ("SOFTMAX_LOSS", "SoftmaxWithLoss"),
    22: ("SPLIT", "Split"), 23: ("TANH", "TanH"), 24: ("WINDOW_DATA", "WindowData"), 25: ("ELTWISE", "Eltwise"),
    26: ("POWER", "Power"), 27: ("SIGMOID_CROSS_ENTROPY_LOSS", "SigmoidCrossEntropyLoss"), 28: ("HINGE_LOSS", "HingeLoss"),
    29: ("MEMORY_DATA", "MemoryData"), 30: ("ARGMAX", "ArgMax"), 31: ("THRESHOLD", "Threshold"),
    32: ("DUMMY_DATA", "DummyData"), 33: ("SLICE", "Slice"), 34: ("MVN", "MVN"), 35: ("ABSVAL", "AbsVal"),
    36: ("SILENCE", "Silence"), 37: ("CONTRASTIVE_LOSS", "ContrastiveLoss"), 38: ("EXP", "Exp"),
    39: ("DECONVOLUTION", "Deconvolution"),
}
V1_ENUM_NUMBERS = {ident: number for number, (ident, _) in V1_TYPES.items()}

# message -> {field number: (text name, kind)}. A kind is another message of this table or a scalar:
# str, int (int32/int64/uint32), ints (repeated int64, packed or not), bool, f32, enum (phase or V1
# type), floats/doubles (repeated, packed or not: lazy blob data).
_SCHEMA: dict[str, dict[int, tuple[str, str]]] = {
    "Net": {1: ("name", "str"), 2: ("layers", "V1Layer"), 3: ("input", "str"), 4: ("input_dim", "ints"),
            6: ("state", "State"), 8: ("input_shape", "Shape"), 100: ("layer", "Layer")},
    "Layer": {1: ("name", "str"), 2: ("type", "str"), 3: ("bottom", "str"), 4: ("top", "str"), 7: ("blobs", "Blob"),
              8: ("include", "Rule"), 9: ("exclude", "Rule"), 106: ("convolution_param", "Conv"),
              117: ("inner_product_param", "Conv"), 139: ("batch_norm_param", "BN"), 142: ("scale_param", "Scale")},
    "V1Layer": {2: ("bottom", "str"), 3: ("top", "str"), 4: ("name", "str"), 5: ("type", "enum"), 6: ("blobs", "Blob"),
                10: ("convolution_param", "Conv"), 17: ("inner_product_param", "Conv"), 32: ("include", "Rule"),
                33: ("exclude", "Rule")},
    "Blob": {1: ("num", "int"), 2: ("channels", "int"), 3: ("height", "int"), 4: ("width", "int"),
             5: ("data", "floats"), 7: ("shape", "Shape"), 8: ("double_data", "doubles")},
    "Shape": {1: ("dim", "ints")},
    "State": {1: ("phase", "enum")},
    "Rule": {1: ("phase", "enum"), 4: ("stage", "str"), 5: ("not_stage", "str")},
    "BN": {1: ("use_global_stats", "bool"), 2: ("moving_average_fraction", "f32"), 3: ("eps", "f32")},
    "Scale": {1: ("axis", "int"), 2: ("num_axes", "int"), 4: ("bias_term", "bool")},
    "Conv": {1: ("num_output", "int"), 2: ("bias_term", "bool")},
}
_BY_NAME = {msg: {name: kind for name, kind in fields.values()} for msg, fields in _SCHEMA.items()}
_WIRE = {"str": (pw.LEN,), "int": (pw.VARINT,), "ints": (pw.VARINT, pw.LEN), "bool": (pw.VARINT,), "f32": (pw.FIXED32,),
         "enum": (pw.VARINT,), "floats": (pw.LEN, pw.FIXED32), "doubles": (pw.LEN, pw.FIXED64)}

Value = Union[str, int, float, bool, pw.Field, "Node"]
Node = dict[str, list[Value]]


class _FormatError(ValueError):
    """A problem found while decoding; turned into InputError(path, message) at the entry points."""


def _f32(value: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(value))


@dataclass(frozen=True)
class CaffeBlob:
    """One BlobProto. `numpy()` decodes its data on demand (a writable copy); `byte_range` is
    (offset, length) of the little-endian values in the file when they are one packed run (patchable
    in place), else None. As in Caffe's Blob::FromProto, non-empty double_data wins over data."""

    shape: tuple[int, ...]
    dtype: str  # "float32" (data, field 5) or "float64" (double_data, field 8)
    byte_range: tuple[int, int] | None
    path: str = ""
    _buf: pw.Buffer = field(default=b"", repr=False, compare=False)
    _segments: tuple[pw.Field, ...] = field(default=(), repr=False, compare=False)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def numpy(self) -> np.ndarray:
        code = "<f8" if self.dtype == "float64" else "<f4"
        try:
            parts = [pw.decode_fixed(self._buf, segment, code) for segment in self._segments]
        except pw.WireError as exc:
            raise InputError(self.path, f"corrupt blob data: {exc}") from None
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, code)
        return flat.astype(self.dtype, copy=False).reshape(self.shape)


@dataclass(frozen=True)
class StateRule:
    """NetStateRule of `include` / `exclude`: phase None when the rule does not name one."""

    phase: str | None = None
    stage: tuple[str, ...] = ()
    not_stage: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchNormParam:
    use_global_stats: bool | None = None  # None: absent, Caffe then uses phase == TEST
    moving_average_fraction: float = _f32(0.999)
    eps: float = _f32(1e-5)


@dataclass(frozen=True)
class ScaleParam:
    axis: int = 1
    num_axes: int = 1
    bias_term: bool = False


@dataclass(frozen=True)
class ConvParam:
    """ConvolutionParameter or InnerProductParameter: both have num_output 1 and bias_term 2."""

    num_output: int | None = None
    bias_term: bool = True


@dataclass
class CaffeLayer:
    name: str = ""
    type: str = ""  # V1 layers: the modern name of their enum (e.g. "Convolution"), or "V1_<n>" if unknown
    bottom: list[str] = field(default_factory=list)
    top: list[str] = field(default_factory=list)
    blobs: list[CaffeBlob] = field(default_factory=list)
    include: list[StateRule] = field(default_factory=list)
    exclude: list[StateRule] = field(default_factory=list)
    batch_norm_param: BatchNormParam | None = None
    scale_param: ScaleParam | None = None
    convolution_param: ConvParam | None = None
    inner_product_param: ConvParam | None = None
    v1: bool = False
    v1_type: int | None = None  # the V1LayerParameter.LayerType number, for V1 layers
    path: str = ""


@dataclass
class CaffeNet:
    """A NetParameter. `layers` holds the `layer` entries, then the V1 `layers` entries (Caffe
    refuses a net with both). `input_shapes` comes from `input_shape`, else `input_dim` in fours."""

    path: str
    format: str  # "caffemodel" or "prototxt"
    name: str = ""
    layers: list[CaffeLayer] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    input_dim: list[int] = field(default_factory=list)
    phase: str | None = None  # NetState.phase, when the file has a `state`


def batchnorm_statistics(layer: CaffeLayer) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, variance, factor) of a Caffe BatchNorm layer, in float64.

    Caffe stores running SUMS: blobs[0] = mean sum, blobs[1] = variance sum (with the m/(m-1)
    correction already applied), blobs[2] = the one-element scale factor. The statistics Caffe uses
    are blob / factor; a factor of 0 means "never updated" and Caffe then uses zeros (every
    variance becomes eps): we return zeros too, and the factor 0.0 tells the caller so.
    """
    if len(layer.blobs) < 3:
        raise InputError(layer.path, f"BatchNorm layer {layer.name!r} has {len(layer.blobs)} blobs, needs 3")
    with np.errstate(all="ignore"):  # NaN, inf and signalling NaNs in the file reach the caller as they are
        mean_sum, var_sum, scale = (blob.numpy().astype(np.float64).ravel() for blob in layer.blobs[:3])
        if scale.size != 1 or mean_sum.size != var_sum.size:
            raise InputError(layer.path, f"BatchNorm layer {layer.name!r} has blobs of sizes "
                             f"{mean_sum.size}, {var_sum.size}, {scale.size}; expected C, C, 1")
        factor = float(scale[0])
        if factor == 0.0:
            return np.zeros_like(mean_sum), np.zeros_like(var_sum), 0.0
        return mean_sum / factor, var_sum / factor, factor


# ---- binary -----------------------------------------------------------------------------------

def _decode(view: pw.MessageView, message: str, budget: list[int]) -> Node:
    """The known fields of one binary message as a typed Node; blob data stays a lazy pw.Field.

    `budget` (shared by the whole file) counts fields and integers down from MAX_FIELDS.
    """
    node: Node = {}
    schema = _SCHEMA[message]
    for item in view.fields():
        budget[0] -= 1
        if budget[0] < 0:
            raise _FormatError(f"more than {MAX_FIELDS} fields or values: not a plausible Caffe model")
        spec = schema.get(item.number)
        if spec is None:
            continue
        name, kind = spec
        values = node.setdefault(name, [])
        if kind in _SCHEMA:
            if item.wire_type == pw.LEN:
                values.append(_decode(view.sub(item), kind, budget))
        elif item.wire_type not in _WIRE[kind]:
            continue
        elif kind in ("floats", "doubles"):
            values.append(item)
        elif kind == "str":
            values.append(bytes(view.buf[item.start:item.end]).decode("utf-8", errors="replace"))
        elif kind == "f32":
            values.append(pw.float_value(view.buf, item))
        elif kind == "ints" and item.wire_type == pw.LEN:
            numbers = pw.decode_varints(view.buf, item, limit=max(budget[0], 0))
            budget[0] -= numbers.size
            values.extend(pw.to_int64(int(v)) for v in numbers)
        else:  # int, ints (unpacked), bool, enum
            values.append(bool(item.value) if kind == "bool" else pw.to_int64(item.value))
    return node


def _read(name: str, limit: int, why: str, text: bool) -> bytes:
    """The whole file, never more than `limit` bytes and never a buffer larger than what the file
    holds: `handle.read(limit + 1)` would ask for a 2 GiB buffer up front, which fails under a
    2 GiB address-space limit (`ulimit -v`, common in CI containers) whatever the file's size."""
    try:
        with open(name, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise InputError(name, f"larger than {limit >> 20} MiB, {why}")
            chunks = [handle.read(size + 1)] if size else []
            total = sum(len(chunk) for chunk in chunks)
            ended = bool(size) and total <= size  # a short read of size + 1 bytes: the end of the file
            while not ended and total <= limit:  # a pipe or a file that grew: read on, in bounded chunks
                chunk = handle.read(min(_CHUNK, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
    except OSError as exc:
        raise InputError(name, f"cannot read: {exc.strerror or exc}") from None
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) > limit:
        raise InputError(name, f"larger than {limit >> 20} MiB, {why}")
    if not data.strip(b" \t\r\n" if text else b""):
        raise InputError(name, "empty file")
    return data


def read_caffemodel(path: str | os.PathLike[str]) -> CaffeNet:
    """Read a binary .caffemodel: one bounded read, then one pass over the structure (blob data skipped)."""
    name = os.fspath(path)
    data = _read(name, MAX_MODEL_BYTES, "which Caffe cannot read either", text=False)
    try:
        return _net(_decode(pw.MessageView(data), "Net", [MAX_FIELDS]), name, "caffemodel", data)
    except (pw.WireError, _FormatError) as exc:
        raise InputError(name, f"not a valid Caffe model: {exc}") from None


def looks_like_caffemodel(head: bytes) -> bool:
    """Whether a file's first bytes can start a NetParameter (the key of one of its fields)."""
    try:
        key, _ = pw.read_varint(head, 0, min(len(head), 3))
    except pw.WireError:
        return False
    return key in (0x0A, 0x12, 0x1A, 0x20, 0x22, 0x28, 0x32, 0x38, 0x42, (100 << 3) | pw.LEN)


# ---- shared mapping ---------------------------------------------------------------------------

def _merged(node: Node, name: str) -> Node | None:
    """All occurrences of an optional sub-message merged (protobuf semantics), or None if absent."""
    parts = [value for value in node.get(name, []) if isinstance(value, dict)]
    if not parts:
        return None
    merged: Node = {}
    for part in parts:
        for key, values in part.items():
            merged.setdefault(key, []).extend(values)
    return merged


def _last(node: Node | None, name: str, default: Value | None) -> Value | None:
    values = node.get(name) if node else None
    return values[-1] if values else default


def _int(node: Node | None, name: str, default: int) -> int:
    value = _last(node, name, default)
    return int(value) if isinstance(value, int) else default


def _float(node: Node | None, name: str, default: float) -> float:
    value = _last(node, name, default)
    return float(value) if isinstance(value, (int, float)) else default


def _strs(node: Node, name: str) -> list[str]:
    return [str(v) for v in node.get(name, [])]


def _ints(node: Node, name: str) -> list[int]:
    return [int(v) for v in node.get(name, []) if isinstance(v, int)]


def _phase(value: Value | None) -> str | None:
    return PHASES[int(value)] if isinstance(value, int) and value in (0, 1) else None  # unknown numbers: "not set"


def _short(shape: tuple[int, ...]) -> str:
    return str(shape) if len(shape) <= 8 else f"({', '.join(map(str, shape[:8]))}, ... {len(shape)} axes)"


def _checked(shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    if len(shape) > MAX_AXES or any(d < 0 for d in shape):
        raise _FormatError(f"{what} has an impossible shape {_short(shape)} (negative, or over {MAX_AXES} axes)")
    return shape


def _blob(node: Node, what: str, path: str, buf: pw.Buffer) -> CaffeBlob:
    legacy = [node[k] for k in ("num", "channels", "height", "width") if node.get(k)]
    if legacy:  # Caffe's Blob::FromProto: any legacy field wins over `shape`
        shape = _checked(tuple(_int(node, k, 0) for k in ("num", "channels", "height", "width")), what)
    else:
        shape = _checked(tuple(_ints(_merged(node, "shape") or {}, "dim")), what)
    double = bool(node.get("double_data"))
    segments = tuple(v for v in node.get("double_data" if double else "data", []) if isinstance(v, pw.Field))
    width = 8 if double else 4
    held = sum(pw.fixed_count(segment, width) for segment in segments)
    if held != math.prod(shape):
        raise _FormatError(f"{what} has shape {_short(shape)} ({math.prod(shape)} values) but holds {held} values")
    packed = len(segments) == 1 and segments[0].wire_type == pw.LEN
    byte_range = (segments[0].start, segments[0].value) if packed else None
    return CaffeBlob(shape, "float64" if double else "float32", byte_range, path, buf, segments)


def _rules(node: Node, name: str) -> list[StateRule]:
    return [StateRule(_phase(_last(rule, "phase", None)), tuple(_strs(rule, "stage")), tuple(_strs(rule, "not_stage")))
            for rule in node.get(name, []) if isinstance(rule, dict)]


def _conv(node: Node, name: str) -> ConvParam | None:
    sub = _merged(node, name)
    if sub is None:
        return None
    num_output = _int(sub, "num_output", -1)
    return ConvParam(None if num_output < 0 else num_output, bool(_last(sub, "bias_term", True)))


def _layer(node: Node, v1: bool, path: str, buf: pw.Buffer) -> CaffeLayer:
    layer = CaffeLayer(name=str(_last(node, "name", "")), bottom=_strs(node, "bottom"), top=_strs(node, "top"),
                       include=_rules(node, "include"), exclude=_rules(node, "exclude"), v1=v1, path=path,
                       convolution_param=_conv(node, "convolution_param"),
                       inner_product_param=_conv(node, "inner_product_param"))
    kind = _last(node, "type", "")
    if v1 and isinstance(kind, int):
        layer.v1_type = kind
        layer.type = V1_TYPES[kind][1] if kind in V1_TYPES else f"V1_{kind}"
    else:
        layer.type = str(kind)
    blobs = [b for b in node.get("blobs", []) if isinstance(b, dict)]
    layer.blobs = [_blob(b, f"layer {layer.name!r} blob {i}", path, buf) for i, b in enumerate(blobs)]
    bn = _merged(node, "batch_norm_param")
    if bn is not None:
        use_global = _last(bn, "use_global_stats", None)
        layer.batch_norm_param = BatchNormParam(
            None if use_global is None else bool(use_global),
            _float(bn, "moving_average_fraction", BatchNormParam.moving_average_fraction),
            _float(bn, "eps", BatchNormParam.eps))
    scale = _merged(node, "scale_param")
    if scale is not None:
        layer.scale_param = ScaleParam(_int(scale, "axis", 1), _int(scale, "num_axes", 1),
                                       bool(_last(scale, "bias_term", False)))
    return layer


def _net(node: Node, path: str, fmt: str, buf: pw.Buffer) -> CaffeNet:
    if not node.get("layer") and not node.get("layers"):  # e.g. a solver definition, or unrelated bytes
        raise _FormatError("not a Caffe network: no layers")
    net = CaffeNet(path=path, format=fmt, name=str(_last(node, "name", "")), inputs=_strs(node, "input"),
                   input_dim=_ints(node, "input_dim"), phase=_phase(_last(_merged(node, "state"), "phase", None)))
    net.layers = [_layer(n, False, path, buf) for n in node.get("layer", []) if isinstance(n, dict)]
    net.layers += [_layer(n, True, path, buf) for n in node.get("layers", []) if isinstance(n, dict)]
    shapes = [s for s in node.get("input_shape", []) if isinstance(s, dict)]
    net.input_shapes = [_checked(tuple(_ints(s, "dim")), "input_shape") for s in shapes]
    if not shapes and net.input_dim and len(net.input_dim) % 4 == 0:
        net.input_shapes = [tuple(net.input_dim[i:i + 4]) for i in range(0, len(net.input_dim), 4)]
    return net


# ---- text -------------------------------------------------------------------------------------

def _text_scalar(value: pw.TextValue, kind: str, message: str) -> Value:
    """Convert one text-format scalar for a field of `kind` (float32 rounding as in the binary file)."""
    if kind in ("int", "ints") or (kind == "enum" and value.kind == "num"):
        return value.as_int()
    if kind == "bool":
        return value.as_bool()
    if kind == "f32":
        return _f32(value.as_float())
    if kind == "str" and value.kind == "str":
        return value.text
    if kind == "enum" and message == "V1Layer" and value.kind in ("ident", "str"):
        return V1_ENUM_NUMBERS.get(value.text, value.text)  # an identifier we do not know stays the type name
    if kind == "enum" and value.text in PHASES:
        return PHASES.index(value.text)
    raise _FormatError(f"line {value.line}: expected {'a string' if kind == 'str' else 'an enum value'}, found {value.text!r}")


def _typed_text(raw: pw.TextMessage, message: str) -> Node:
    """Keep and convert the fields `_SCHEMA` knows; blob data in text is skipped (prototxt holds no weights)."""
    node: Node = {}
    kinds = _BY_NAME[message]
    for name, values in raw.items():
        kind = kinds.get(name)
        if kind is None or name == "blobs":
            continue
        typed = node.setdefault(name, [])
        for value in values:
            if kind in _SCHEMA and isinstance(value, pw.TextMessage):
                typed.append(_typed_text(value, kind))
            elif kind not in _SCHEMA and isinstance(value, pw.TextValue):
                typed.append(_text_scalar(value, kind, message))
            else:
                raise _FormatError(f"line {value.line}: {name!r} must be {'a message' if kind in _SCHEMA else 'a value'}")
    return node


def read_prototxt(path: str | os.PathLike[str]) -> CaffeNet:
    """Read a NetParameter in protobuf text format (structure and parameters; no weights)."""
    name = os.fspath(path)
    data = _read(name, MAX_TEXT_BYTES, "too large for a network definition", text=True)
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise InputError(name, f"not UTF-8 text (byte {exc.start}): not a prototxt") from None
    try:
        return _net(_typed_text(pw.parse_text(text, MAX_TEXT_DEPTH), "Net"), name, "prototxt", b"")
    except (pw.WireError, _FormatError) as exc:
        raise InputError(name, f"invalid prototxt: {exc}") from None
