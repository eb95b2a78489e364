"""safetensors files, parsed by hand (no safetensors package): 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the
tensor bytes (little-endian, C order). Tensors stay lazy; only the header is read here.

A file is refused (one line, exit 2) exactly where the `safetensors` library refuses it (its Rust
`read_metadata` and `Metadata::validate`, checked against the installed library in the tests):
a header over 100,000,000 bytes or not UTF-8 JSON (NaN and Infinity are not JSON); a header that
is not an object; `__metadata__` given twice or not null / an object of strings; an entry that is
not an object, or names a field twice, or lacks dtype, shape or data_offsets; an unknown dtype;
shape and offsets that are not unsigned 64-bit integers; and, once the entries are sorted by
offsets, any gap, overlap or size that does not match dtype x shape, or data bytes after the last
tensor. A tensor name listed twice keeps its last entry, as the library's map does (the offset
checks then refuse the file unless both entries describe the same bytes).
Linear in the header: one pass over the entries and one sort by offsets.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnlint.errors import InputError
from bnlint.loaders.lazy_tensor import ByteSource, LazyTensor, StorageRef
from bnlint.loaders.state_dict import BN_SUFFIXES, to_model_info
from bnlint.loaders.torch_objects import Extracted
from bnlint.loaders.unicode_text import json_has_surrogates
from bnlint.model import ModelInfo

DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "BOOL": "bool", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
# Every dtype the library knows, with its size in bits; those missing from DTYPES are read by
# no rule (a tensor of them is listed, and refused only if something reads it).
BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "U16": 16,
        "U32": 32, "U64": 64, "BOOL": 8, "C64": 64, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
        "F6_E3M2": 6}
MAX_HEADER = 100_000_000  # the format's own limit
_FIELDS = ("dtype", "shape", "data_offsets")
_U64 = (1 << 64) - 1


class _Repeated(dict[str, Any]):
    """A JSON object that named some keys more than once (the last value kept, as serde's maps do)."""

    repeated: frozenset[str] = frozenset()


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) == len(pairs):
        return found
    seen: set[str] = set()
    twice = {key for key, _ in pairs if key in seen or seen.add(key)}  # type: ignore[func-returns-value]
    marked = _Repeated(found)
    marked.repeated = frozenset(twice)
    return marked


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _is_u64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _U64


@dataclass(frozen=True)
class UnreadableTensor:
    """A tensor of a dtype the format has but bnlint does not decode (F4, F6_*, F8_E8M0)."""

    path: str
    name: str
    stored_dtype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.stored_dtype

    def numpy(self) -> np.ndarray:
        raise InputError(self.path, f"tensor {self.name!r} has dtype {self.stored_dtype}, which bnlint cannot decode")


def _entries(path: str, header: dict[str, Any], data_size: int) -> list[tuple[int, int, str, str, list[int]]]:
    """(begin, end, name, dtype, shape) of every tensor, sorted by offsets and validated as the library does."""
    def corrupt(problem: str) -> InputError:
        return InputError(path, f"corrupt safetensors header: {problem}")

    if "__metadata__" in getattr(header, "repeated", ()):
        raise corrupt("__metadata__ is given twice")
    entries: list[tuple[int, int, str, str, list[int]]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if type(entry) is not dict:
            if not isinstance(entry, dict):
                raise corrupt(f"entry {key!r} is not an object")
            twice = sorted(getattr(entry, "repeated", frozenset()).intersection(_FIELDS))
            if twice:
                raise corrupt(f"tensor {key!r} gives {twice[0]} twice")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        bits = BITS.get(dtype) if type(dtype) is str else None
        if bits is None:
            raise corrupt(f"tensor {key!r} has unknown dtype {dtype!r}")
        if type(shape) is not list:
            raise corrupt(f"tensor {key!r} has an invalid shape")
        for dim in shape:
            if type(dim) is not int or not 0 <= dim <= _U64:
                raise corrupt(f"tensor {key!r} has an invalid shape")
            bits *= dim
        if not (type(offsets) is list and len(offsets) == 2 and _is_u64(offsets[0]) and _is_u64(offsets[1])):
            raise corrupt(f"tensor {key!r} has invalid data_offsets")
        if bits > _U64 or bits % 8:
            raise corrupt(f"tensor {key!r} has a size that is not a whole number of bytes")
        if offsets[1] - offsets[0] != bits // 8:
            raise corrupt(f"tensor {key!r} size does not match its shape")
        entries.append((offsets[0], offsets[1], key, str(dtype), shape))
    entries.sort()  # the library validates in offset order
    position = 0
    for begin, end, key, _, _ in entries:
        if begin != position:
            raise corrupt(f"tensor {key!r} does not start where the previous one ends (gap or overlap at byte {begin})")
        position = end
    if position != data_size:
        raise InputError(path, f"corrupt or truncated safetensors file: the tensors cover {position} of the {data_size} data bytes")
    return entries


class DeferredTensor:
    """A tensor no BN layer is named after: its LazyTensor is built only if something reads it
    (--arch loading does; the static lint does not), which keeps 400,000-entry headers fast."""

    __slots__ = ("args", "shape", "stored_dtype")

    def __init__(self, args: tuple[str, str, str, list[int], int, int, int]) -> None:
        self.args = args
        self.shape = tuple(args[3])
        self.stored_dtype = DTYPES.get(args[2], args[2])

    @property
    def dtype(self) -> str:
        return self.stored_dtype

    def numpy(self) -> np.ndarray:
        array: np.ndarray = _tensor(*self.args).numpy()
        return array


def _tensor(path: str, name: str, dtype: str, shape: list[int], begin: int, end: int, data_start: int) -> Any:
    if dtype not in DTYPES:
        return UnreadableTensor(path, name, dtype, tuple(shape))
    numel = 1
    for dim in shape:
        numel *= dim
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    storage = StorageRef(name, DTYPES[dtype], numel, source=ByteSource(path, data_start + begin, end - begin))
    return LazyTensor(storage, 0, tuple(shape), tuple(reversed(strides)))


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic collector off while a header's objects are built: a 400,000-entry header
    makes millions of acyclic objects, and the collector re-scanning them tripled the load time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def extract_safetensors(path: Path) -> Extracted:
    with _collector_paused():
        return _extract(path)


def _extract(path: Path) -> Extracted:
    name = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise InputError(name, "truncated safetensors file: no header length")
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER or 8 + length > size:
                raise InputError(name, f"truncated or corrupt safetensors file: header of {length} bytes does not fit")
            raw = handle.read(length)
    except OSError as exc:
        raise InputError(name, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_object, parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(name, "corrupt safetensors header: not valid JSON") from None
    if json_has_surrogates(text, header):
        raise InputError(name, "corrupt safetensors header: a string holds an unpaired surrogate (not valid Unicode text)")
    if not isinstance(header, dict):
        raise InputError(name, "corrupt safetensors header: not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise InputError(name, "corrupt safetensors header: __metadata__ is not an object of strings")
    data_start = 8 + length
    entries = _entries(name, header, size - data_start)
    result = Extracted(name, "safetensors")
    if metadata:
        result.metadata["safetensors_metadata"] = dict(metadata)
    # in header order (definition order of the layers), not offset order
    by_name = {key: (begin, end, dtype, shape) for begin, end, key, dtype, shape in entries}
    tensors = result.tensors
    for key in header:
        if key != "__metadata__":
            begin, end, dtype, shape = by_name[key]
            args = (name, key, dtype, shape, begin, end, data_start)
            # BN buffers stay LazyTensors (bnlint fix patches their bytes in place)
            tensors[key] = _tensor(*args) if key.rpartition(".")[2] in BN_SUFFIXES else DeferredTensor(args)
    return result


def load_safetensors(path: Path, companion: Path | None = None) -> ModelInfo:
    with _collector_paused():
        return to_model_info(_extract(path))
