"""Lazy ONNX tensors: initializers and Constant values decoded only on `.numpy()`, and external
data whose location is checked to stay inside the model's folder before a byte is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import numpy_helper

from bnlint.errors import InputError
from bnlint.model import TensorRef

_PACKED = {"int4": 2, "uint4": 2, "float4e2m1": 2, "int2": 4, "uint2": 4}  # elements per byte


def _dtype_name(data_type: int) -> str:
    """numpy-style name of an ONNX element type: FLOAT -> float32, DOUBLE -> float64, BFLOAT16 -> bfloat16."""
    try:
        name = onnx.TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"unknown({data_type})"
    return {"float": "float32", "double": "float64"}.get(name, name)


def _nbytes(proto: onnx.TensorProto) -> int | None:
    """Bytes the tensor's raw data must hold, or None for types without a fixed element size."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(proto.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    if proto.data_type == onnx.TensorProto.STRING:
        return None
    count = int(np.prod(proto.dims, dtype=np.int64)) if len(proto.dims) else 1
    per_byte = _PACKED.get(_dtype_name(proto.data_type))
    return -(-count // per_byte) if per_byte else count * itemsize


# TensorProto data types whose raw_data is plain little-endian numpy (read without numpy_helper).
_FAST_DTYPES: dict[int, str] = {onnx.TensorProto.FLOAT: "<f4", onnx.TensorProto.DOUBLE: "<f8", onnx.TensorProto.FLOAT16: "<f2",
                onnx.TensorProto.INT64: "<i8", onnx.TensorProto.INT32: "<i4"}


@dataclass(frozen=True)
class OnnxTensor:
    """A TensorRef over an initializer or Constant tensor; decoded only when `.numpy()` is called."""

    proto: onnx.TensorProto
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
        fast = _FAST_DTYPES.get(int(proto.data_type))
        if self.external is None and fast is not None and proto.HasField("raw_data"):
            # The common case (float32/float16/int64 raw bytes): no generic decoding needed.
            raw = proto.raw_data
            dims = tuple(int(d) for d in proto.dims)
            count = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if len(raw) == count * np.dtype(fast).itemsize:
                return np.frombuffer(raw, dtype=fast).reshape(dims)
        if self.external is not None:
            proto = onnx.TensorProto()
            proto.CopyFrom(self.proto)  # no payload to copy: the bytes are external
            del proto.external_data[:]
            proto.data_location = onnx.TensorProto.DEFAULT
            proto.raw_data = self._read_external()
        try:
            array = numpy_helper.to_array(proto)
        except (ValueError, TypeError, KeyError) as exc:
            raise InputError(self.path, f"tensor {self.proto.name!r} cannot be decoded: {exc}") from None
        if array.dtype.kind == "V":  # bfloat16 / float8 (ml_dtypes): widen, exactly, to float32
            array = array.astype(np.float32)
        return array

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
        target = onnx.helper.tensor_dtype_to_np_dtype(self.to)
        array = self.source.numpy().astype(target)
        return array.astype(np.float32) if array.dtype.kind == "V" else array


def _refuse(path: Path, name: str, problem: str) -> InputError:
    return InputError(str(path), f"external data of tensor {name!r} {problem}; refusing to read it")


def _external_ref(proto: onnx.TensorProto, path: Path) -> OnnxTensor:
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


def _tensor_ref(proto: onnx.TensorProto, path: Path) -> OnnxTensor:
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        return _external_ref(proto, path)
    return OnnxTensor(proto, str(path))
