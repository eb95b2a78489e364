"""safetensors files, parsed by hand (no safetensors package): 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the
tensor bytes (little-endian, C order). Tensors stay lazy; only the header is read here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bnlint.errors import InputError
from bnlint.loaders.lazy_tensor import ByteSource, LazyTensor, StorageRef, element_size
from bnlint.loaders.state_dict import to_model_info
from bnlint.loaders.torch_objects import Extracted
from bnlint.loaders.unicode_text import json_has_surrogates
from bnlint.model import ModelInfo

DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "BOOL": "bool", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
MAX_HEADER = 100_000_000  # the format's own limit


def _tensor(path: str, name: str, entry: Any, data_start: int, data_size: int) -> LazyTensor:
    if not isinstance(entry, dict):
        raise InputError(path, f"corrupt safetensors header: entry {name!r} is not an object")
    dtype = DTYPES.get(str(entry.get("dtype")))
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise InputError(path, f"corrupt safetensors header: tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InputError(path, f"corrupt safetensors header: tensor {name!r} has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise InputError(path, f"corrupt safetensors header: tensor {name!r} has invalid data_offsets")
    begin, end = offsets
    numel = 1
    for dim in shape:
        numel *= dim
    if not 0 <= begin <= end <= data_size:
        raise InputError(path, f"corrupt or truncated safetensors file: tensor {name!r} lies outside the data")
    if end - begin != numel * element_size(dtype):
        raise InputError(path, f"corrupt safetensors header: tensor {name!r} size does not match its shape")
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    storage = StorageRef(name, dtype, numel, source=ByteSource(path, data_start + begin, end - begin))
    return LazyTensor(storage, 0, tuple(shape), tuple(reversed(strides)))


def extract_safetensors(path: Path) -> Extracted:
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
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError(name, "corrupt safetensors header: not valid JSON") from None
    if json_has_surrogates(text, header):
        raise InputError(name, "corrupt safetensors header: a string holds an unpaired surrogate (not valid Unicode text)")
    if not isinstance(header, dict):
        raise InputError(name, "corrupt safetensors header: not a JSON object")
    result = Extracted(name, "safetensors")
    metadata = header.pop("__metadata__", None)
    if isinstance(metadata, dict):
        result.metadata["safetensors_metadata"] = {str(k): str(v) for k, v in metadata.items()}
    data_start = 8 + length
    for key, entry in header.items():
        result.tensors[str(key)] = _tensor(name, str(key), entry, data_start, size - data_start)
    return result


def load_safetensors(path: Path, companion: Path | None = None) -> ModelInfo:
    return to_model_info(extract_safetensors(path))
