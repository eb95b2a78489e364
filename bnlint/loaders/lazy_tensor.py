"""Lazy tensors over bytes in a file: nothing is read until a rule calls `.numpy()`.

A `ByteSource` says where one storage's bytes are (a byte range of a plain file, or a compressed
zip member). A `LazyTensor` is a strided view of a storage, like a torch tensor, and reads only
the byte range its view covers. Used by the torch (zip, legacy) and safetensors loaders.

Shapes come from the file, so nothing is allocated before it is checked: a view must lie inside
its storage (`check_view`, as torch's own `set_` demands), and `.numpy()` refuses a tensor whose
size is far beyond the bytes it reads (a stride-0 view declaring 1e9 elements over one stored
element) or beyond an absolute cap.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from bnlint.errors import InputError
from bnlint.loaders.zip_members import ZIP_ERRORS, describe

# Stored dtype name -> (numpy dtype code without byte order, element size).
# bfloat16 has no numpy dtype: it is read as uint16 and widened to float32 (exact).
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("f8", 8),
    "float32": ("f4", 4),
    "float16": ("f2", 2),
    "bfloat16": ("u2", 2),
    "int64": ("i8", 8),
    "int32": ("i4", 4),
    "int16": ("i2", 2),
    "int8": ("i1", 1),
    "uint8": ("u1", 1),
    "uint16": ("u2", 2),
    "uint32": ("u4", 4),
    "uint64": ("u8", 8),
    "bool": ("b1", 1),
    "complex64": ("c8", 8),
    "complex128": ("c16", 16),
}

# Element sizes of dtypes we can describe but not decode (their tensors raise on .numpy()).
OPAQUE_SIZES: dict[str, int] = {
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "complex32": 4,
}


MAX_DIMS = 32
MAX_EXTENT = 1 << 48  # any one size, stride or offset, in elements
MAX_TENSOR_BYTES = 1 << 34  # 16 GiB: one tensor materialised in memory
# How far a view may expand beyond the bytes it reads (stride-0 / overlapping views are legal in
# torch, e.g. `x.expand(n)`, but a BN tensor built that way is tiny).
BROADCAST_ALLOWANCE = 1 << 20
MAX_INFLATE_BYTES = 64 << 20  # from a compressed (never torch-written) storage member


def element_size(dtype: str) -> int:
    if dtype in DTYPES:
        return DTYPES[dtype][1]
    return OPAQUE_SIZES.get(dtype, 1)


@dataclass
class ByteSource:
    """Where a storage's bytes lie: `length` bytes at `offset` of `path`, or inside zip member `member`."""

    path: str
    offset: int = 0
    length: int = 0
    member: str | None = None  # set only for compressed zip members (read through zipfile)

    def read(self, start: int, count: int) -> bytes:
        if start < 0 or count < 0 or start + count > self.length:
            raise InputError(self.path, f"tensor view [{start}, {start + count}) lies outside its storage of {self.length} bytes")
        if self.member is not None:
            # Compressed members cannot be read at an offset: read the member (rare: torch stores).
            # What they inflate to is not backed by bytes in the file, so it is capped.
            if start + count > MAX_INFLATE_BYTES:
                raise InputError(self.path, f"refusing to inflate {start + count} bytes of compressed zip member {self.member} "
                                 f"(at most {MAX_INFLATE_BYTES})")
            try:
                with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as handle:
                    handle.seek(start)
                    data = handle.read(count)
            except ZIP_ERRORS as exc:
                raise InputError(self.path, f"cannot read zip member {self.member}: {describe(exc)}") from None
        else:
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    data = os.pread(fd, count, self.offset + start)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise InputError(self.path, f"cannot read tensor data: {exc.strerror or exc}") from None
        if len(data) != count:
            raise InputError(self.path, "file is truncated: tensor data ends early")
        return data


@dataclass
class StorageRef:
    """A torch storage as named in a pickle; `source` may be attached after unpickling (legacy files)."""

    key: str
    dtype: str
    numel: int
    location: str = "cpu"
    source: ByteSource | None = None
    big_endian: bool = False


@dataclass
class LazyTensor:
    """A strided view of a storage (TensorRef protocol). Reads its bytes on `.numpy()` only."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False
    view_dtype: str | None = None  # set when the tensor dtype differs from the storage's (untyped storage)
    is_parameter: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size

    @property
    def dtype(self) -> str:
        return self.view_dtype or self.storage.dtype

    @property
    def byte_range(self) -> tuple[int, int] | None:
        """(file offset, length) of the bytes this view covers, when they lie plainly in the file
        (not inside a compressed member): where a finding about this tensor points in SARIF."""
        source = self.storage.source
        if source is None or source.member is not None or not self.size:
            return None
        itemsize = element_size(self.dtype)
        extent = 1 + sum((dim - 1) * abs(step) for dim, step in zip(self.size, self.stride) if dim > 0)
        return source.offset + self.offset * itemsize, extent * itemsize

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.size:
            count *= dim
        return count

    def numpy(self) -> np.ndarray:
        dtype = self.dtype
        path = self.storage.source.path if self.storage.source else "<tensor>"
        if dtype not in DTYPES:
            raise InputError(path, f"tensor dtype {dtype} cannot be read")
        problem = _shape_problem(self)
        if problem:
            raise InputError(path, problem)
        code, itemsize = DTYPES[dtype]
        order = ">" if self.storage.big_endian and itemsize > 1 else "<"
        stored = np.dtype(order + code if code != "b1" else "?")
        numel = self.numel
        if numel == 0:
            try:
                return np.zeros(self.size, dtype=np.float32 if dtype == "bfloat16" else stored.newbyteorder("="))
            except ValueError as exc:
                raise InputError(path, f"empty tensor with an impossible shape {self.size[:8]} ({exc})") from None
        if self.storage.source is None:
            raise InputError(path, f"storage {self.storage.key} has no data in the file")
        # Read only the elements this view can touch: [offset, offset + extent).
        extent = view_extent(self.size, self.stride)
        nbytes = numel * itemsize
        if nbytes > MAX_TENSOR_BYTES:
            raise InputError(path, f"tensor of {numel} elements ({nbytes} bytes) is larger than the {MAX_TENSOR_BYTES} bytes bnlint reads")
        if nbytes > max(extent * itemsize, BROADCAST_ALLOWANCE):
            raise InputError(path, f"tensor declares {numel} elements over only {extent} stored element(s) "
                             "(a stride-0 or overlapping view): refusing to expand it")
        raw = self.storage.source.read(self.offset * itemsize, extent * itemsize)
        flat = np.frombuffer(raw, dtype=stored)
        view = np.lib.stride_tricks.as_strided(
            flat, shape=self.size, strides=tuple(step * itemsize for step in self.stride), writeable=False
        )
        array = np.array(view, dtype=stored.newbyteorder("="))  # a writable native-order copy
        if dtype == "bfloat16":
            # bfloat16 is the top half of a float32: shift into place, bit-exact.
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array


def view_extent(size: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """How many storage elements a (non-empty) view spans from its offset."""
    return 1 + sum((dim - 1) * step for dim, step in zip(size, stride))


def _shape_problem(tensor: LazyTensor) -> str | None:
    size, stride = tensor.size, tensor.stride
    if len(size) != len(stride):
        return f"tensor size {size[:8]} and stride {stride[:8]} differ in length"
    if len(size) > MAX_DIMS:
        return f"tensor has {len(size)} dimensions (at most {MAX_DIMS})"
    if not 0 <= tensor.offset <= MAX_EXTENT or any(not 0 <= v <= MAX_EXTENT for v in size + stride):
        return f"tensor has an invalid size {size[:8]}, stride {stride[:8]} or offset"
    return None


def check_view(tensor: LazyTensor) -> str | None:
    """Why a tensor view cannot be backed by its storage (None when it can).

    Checked when the pickle is read, before anything is allocated: the view's last element must
    lie inside the storage's declared size (torch's `set_` refuses the same files).
    """
    problem = _shape_problem(tensor)
    if problem or tensor.numel == 0:
        return problem
    storage = tensor.storage
    if storage.location == "meta" and storage.source is None and storage.numel == 0:
        return None  # a meta tensor: a shape without data
    end = (tensor.offset + view_extent(tensor.size, tensor.stride)) * element_size(tensor.dtype)
    available = storage.numel * element_size(storage.dtype)
    if end > available:
        return (f"tensor view of shape {tensor.size[:8]} at offset {tensor.offset} needs {end} bytes "
                f"but its storage holds {available}")
    return None
