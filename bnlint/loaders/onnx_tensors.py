"""Lazy ONNX tensors: initializers and Constant values decoded only on `.numpy()`, and external
data whose location is checked to stay inside the model's folder before a byte is read.

Decoding follows `onnx.numpy_helper.to_array` (1.23) field for field, without importing onnx: raw
data becomes a numpy view of the memory-mapped model (no copy), typed fields (float_data,
int32_data, ...) are decoded from their packed or unpacked varints / fixed-width values. Types
numpy lacks (bfloat16, float8, 4/2/6-bit) come back as float32, exactly: bfloat16 by a bit shift,
the others through ml_dtypes (a dependency of onnx), imported only when such a tensor is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Protocol

import numpy as np

from bnlint.errors import InputError
from bnlint.loaders import onnx_wire as ow
from bnlint.loaders.onnx_wire import EXTERNAL, WireError, WireTensor, parse_tensor
from bnlint.model import TensorRef
from bnlint.protowire import decode_fixed, decode_varints

# TensorProto.DataType, by number: numpy-style name (FLOAT -> float32, DOUBLE -> float64, BFLOAT16 -> bfloat16).
_NAMES = ("undefined", "float32", "uint8", "int8", "uint16", "int16", "int32", "int64", "string", "bool", "float16", "float64",
          "uint32", "uint64", "complex64", "complex128", "bfloat16", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2",
          "float8e5m2fnuz", "uint4", "int4", "float4e2m1", "float8e8m0", "uint2", "int2", "float6e2m3", "float6e3m2")
STRING, BFLOAT16 = 8, 16
# Types numpy has, as stored (little-endian), and the field that holds them when not in raw_data.
_NATIVE = {1: ("<f4", ow.FLOAT_DATA), 2: ("u1", ow.INT32_DATA), 3: ("i1", ow.INT32_DATA), 4: ("<u2", ow.INT32_DATA), 5: ("<i2", ow.INT32_DATA),
           6: ("<i4", ow.INT32_DATA), 7: ("<i8", ow.INT64_DATA), 9: ("?", ow.INT32_DATA), 10: ("<f2", ow.INT32_DATA), 11: ("<f8", ow.DOUBLE_DATA),
           12: ("<u4", ow.UINT64_DATA), 13: ("<u8", ow.UINT64_DATA), 14: ("<c8", ow.FLOAT_DATA), 15: ("<c16", ow.DOUBLE_DATA)}
# Types numpy lacks: ml_dtypes name and bits per element (packed that densely in raw_data).
_EXOTIC = {16: ("bfloat16", 16), 17: ("float8_e4m3fn", 8), 18: ("float8_e4m3fnuz", 8), 19: ("float8_e5m2", 8),
           20: ("float8_e5m2fnuz", 8), 21: ("uint4", 4), 22: ("int4", 4), 23: ("float4_e2m1fn", 4), 24: ("float8_e8m0fnu", 8),
           25: ("uint2", 2), 26: ("int2", 2), 27: ("float6_e2m3fn", 6), 28: ("float6_e3m2fn", 6)}


def _dtype_name(data_type: int) -> str:
    """numpy-style name of an ONNX element type: FLOAT -> float32, DOUBLE -> float64, BFLOAT16 -> bfloat16."""
    return _NAMES[data_type] if 0 <= data_type < len(_NAMES) else f"unknown({data_type})"


def _count(dims: Any) -> int:
    return int(np.prod([int(d) for d in dims], dtype=np.int64)) if len(dims) else 1


def _nbytes(proto: WireTensor) -> int | None:
    """Bytes the tensor's raw data must hold, or None for types without a fixed element size."""
    if proto.data_type in _NATIVE:
        return _count(proto.dims) * np.dtype(_NATIVE[proto.data_type][0]).itemsize
    if proto.data_type in _EXOTIC:
        return -(-_count(proto.dims) * _EXOTIC[proto.data_type][1] // 8)
    return None


def _raw_bytes(proto: WireTensor) -> np.ndarray:
    """raw_data as a read-only uint8 view of the (mapped) buffer: no copy."""
    start, length = proto.raw if proto.raw is not None else (0, 0)
    return np.frombuffer(proto.buf, dtype=np.uint8, count=length, offset=start)


def _payload(proto: WireTensor, number: int) -> Any:
    """A typed payload field's values in file order: float32/float64 for float_data/double_data, the
    raw uint64 of each varint for int32_data/int64_data/uint64_data, a list of bytes for string_data."""
    fields = proto.payload.get(number, [])
    if number == ow.STRING_DATA:
        return [bytes(proto.buf[f.start:f.end]) for f in fields]
    if number in (ow.FLOAT_DATA, ow.DOUBLE_DATA):
        kind = "<f4" if number == ow.FLOAT_DATA else "<f8"
        parts = [decode_fixed(proto.buf, f, kind) for f in fields]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=kind)
    # no field can usefully hold more values than the shape has: refuse before decoding a huge run
    count = _count(proto.dims)
    limit = count if count >= 0 and all(int(d) >= 0 for d in proto.dims) else None
    parts = [decode_varints(proto.buf, f, limit) for f in fields]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def _ml_dtype(name: str) -> np.dtype:
    try:
        import ml_dtypes
    except ImportError:
        raise ValueError(f"reading {name} needs the ml_dtypes package") from None
    return np.dtype(getattr(ml_dtypes, name))


def _exotic(codes: np.ndarray, data_type: int) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (uint16) or of narrow-type codes (uint8, one per element)."""
    if data_type == BFLOAT16:
        return (codes.astype(np.uint32) << 16).view(np.float32)
    return codes.astype(np.uint8).view(_ml_dtype(_EXOTIC[data_type][0])).astype(np.float32)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Elements of `bits` bits packed little-endian into bytes (ONNX's int4/int2/float6 layout) as uint8 codes."""
    if packed.size * 8 < count * bits:
        raise ValueError(f"packed {bits}-bit data ({packed.size} bytes) is too small for {count} elements")
    stream = np.unpackbits(packed, bitorder="little")[:count * bits].reshape(count, bits)
    return np.packbits(stream, axis=1, bitorder="little")[:, 0]


def decode(proto: WireTensor, raw: np.ndarray | None) -> np.ndarray:
    """A tensor's values, from `raw` (its raw bytes as uint8, inline or external) or its typed fields.

    Raises ValueError/TypeError/WireError for what onnx.numpy_helper.to_array would refuse.
    """
    kind, dims = proto.data_type, [int(d) for d in proto.dims]
    if proto.has_segment:
        raise ValueError("Currently not supporting loading segments.")
    if kind == 0:
        raise TypeError("The element type in the input tensor is UNDEFINED.")
    if kind == STRING:
        return np.asarray([s.decode("utf-8") for s in _payload(proto, ow.STRING_DATA)]).astype(object).reshape(dims)
    if kind not in _NATIVE and kind not in _EXOTIC:
        raise ValueError(f"unknown element type {kind}")
    if raw is not None:
        if kind in _NATIVE:
            return raw.view(_NATIVE[kind][0]).reshape(dims)
        bits = _EXOTIC[kind][1]
        if bits == 16:
            return _exotic(raw.view("<u2"), kind).reshape(dims)
        return _exotic(raw if bits == 8 else _unpack(raw, bits, _count(dims)), kind).reshape(dims)
    if kind in _EXOTIC:
        bits = _EXOTIC[kind][1]
        stored = np.asarray(_payload(proto, ow.INT32_DATA))
        codes: np.ndarray = stored.astype(np.uint16) if bits == 16 else stored.astype(np.uint8)
        if bits == 6:
            codes = codes & 0x3F
        elif bits < 8:
            codes = _unpack(codes, bits, _count(dims))
        return _exotic(codes, kind).reshape(dims)
    dtype, number = _NATIVE[kind]
    values = np.asarray(_payload(proto, number))
    if number == ow.INT32_DATA:  # int32 values held as varints: keep the low 32 bits, then narrow
        values = values.astype(np.uint32).view(np.int32)
        if dtype in ("<f2", "<u2", "<i2", "?"):  # bit patterns, as numpy_helper reads them
            values = values.astype(np.uint16 if dtype != "?" else np.uint8).view(dtype)
        else:
            values = values.astype(dtype)
    elif number == ow.INT64_DATA:
        values = values.view(np.int64)
    elif dtype in ("<c8", "<c16"):
        values = values.view(dtype)
    else:
        values = values.astype(dtype)
    return values.reshape(dims)


@dataclass(frozen=True)
class OnnxTensor:
    """A TensorRef over an initializer or Constant tensor; decoded only when `.numpy()` is called."""

    proto: WireTensor
    path: str  # the model file, for error messages
    external: Path | None = None  # checked data file when the bytes live outside the model
    offset: int = 0
    length: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.proto.dims)

    @property
    def dtype(self) -> str:
        return _dtype_name(self.proto.data_type)

    def numpy(self) -> np.ndarray:
        proto = self.proto
        if self.external is not None:
            raw: np.ndarray | None = np.frombuffer(self._read_external(), dtype=np.uint8)
        else:
            raw = _raw_bytes(proto) if proto.has_raw_data() else None
        try:
            return decode(proto, raw)
        except (ValueError, TypeError, WireError) as exc:
            raise InputError(self.path, f"tensor {proto.name!r} cannot be decoded: {exc}") from None

    def _read_external(self) -> bytes:
        size = _nbytes(self.proto)
        count = self.length if self.length is not None else size
        try:
            with open(self.external, "rb") as handle:  # type: ignore[arg-type]
                handle.seek(self.offset)
                data = handle.read(-1 if count is None else count)
        except OSError as exc:
            raise InputError(self.path, f"cannot read external data for {self.proto.name!r}: {exc.strerror or exc}") from None
        if size is not None and len(data) < size:
            raise InputError(self.path, f"external data for {self.proto.name!r} is truncated ({len(data)} of {size} bytes)")
        return data[:size] if size is not None else data


@dataclass(frozen=True)
class CastTensor:
    """A stored tensor seen through a Cast node: the values the BN node actually receives."""

    source: TensorRef
    to: int  # ONNX element type

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def dtype(self) -> str:
        return _dtype_name(self.to)

    def numpy(self) -> np.ndarray:
        path = str(getattr(self.source, "path", "<onnx>"))
        native = _NATIVE.get(self.to, ("", 0))[0]
        if self.to not in _EXOTIC and native in ("", "<c8", "<c16"):  # strings, complex, unknown: not BN statistics
            raise InputError(path, f"a Cast to element type {self.to} ({_dtype_name(self.to)}) feeds BatchNormalization statistics")
        array = self.source.numpy()
        try:  # narrow types: round as the Cast does, then widen exactly
            return array.astype(native) if native else array.astype(_ml_dtype(_EXOTIC[self.to][0])).astype(np.float32)
        except (ValueError, TypeError) as exc:
            raise InputError(path, f"a Cast to {_dtype_name(self.to)} cannot be computed: {exc}") from None


def _refuse(path: Path, name: str, problem: str) -> InputError:
    return InputError(str(path), f"external data of tensor {name!r} {problem}; refusing to read it")


def _external_ref(proto: WireTensor, path: Path) -> OnnxTensor:
    """Check an external-data tensor's location, offset and length; never reads outside the folder."""
    info = {entry.key: entry.value for entry in proto.external_data}
    location = info.get("location", "")
    if not location:
        raise _refuse(path, proto.name, "has no location")
    # Both flavours of path syntax: a Windows-made file may use backslashes or a drive letter.
    windows = PureWindowsPath(location)
    if PurePosixPath(location).is_absolute() or windows.anchor or ".." in windows.parts:
        raise _refuse(path, proto.name, f"points outside the model's folder ({location!r})")
    folder = path.absolute().parent
    target = (folder / location).resolve()  # resolves symlinks: a link out of the folder is refused
    if not target.is_relative_to(folder.resolve()):
        raise _refuse(path, proto.name, f"resolves outside the model's folder ({location!r} -> {target})")
    if not target.is_file():
        raise InputError(str(path), f"external data file {location!r} of tensor {proto.name!r} not found")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(str(path), f"tensor {proto.name!r}: external data offset/length is not a number") from None
    size = target.stat().st_size
    needed = _nbytes(proto)
    available = (size - offset) if length is None else length
    if offset < 0 or (length is not None and (length < 0 or offset + length > size)) or (
        needed is not None and available < needed
    ):
        raise InputError(str(path), f"external data of tensor {proto.name!r} is truncated or out of range in {location!r}")
    return OnnxTensor(proto, str(path), target, offset, length)


class SerializedTensor(Protocol):
    """An `onnx.TensorProto` (bnlint.fix checks real protos with `_tensor_ref`), seen without importing onnx."""

    def SerializeToString(self) -> bytes: ...


def _tensor_ref(proto: WireTensor | SerializedTensor, path: Path) -> OnnxTensor:
    """A lazy tensor; for external data, after checking where it points (InputError if outside the folder)."""
    if not isinstance(proto, WireTensor):
        try:
            proto = parse_tensor(proto.SerializeToString())
        except WireError as exc:  # protobuf's own output: cannot happen short of a bug
            raise InputError(str(path), f"tensor cannot be read: {exc}") from None
    if proto.data_location == EXTERNAL:
        return _external_ref(proto, path)
    return OnnxTensor(proto, str(path))
