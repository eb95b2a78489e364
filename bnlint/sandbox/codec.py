"""Results of the isolated child, as data only: JSON plus numeric arrays in an .npz.

The child may be running hostile code, so what it sends back is never unpickled: the parent
decodes JSON, loads arrays with `allow_pickle=False`, rebuilds only the dataclasses listed in
`KINDS` from their declared fields, and checks every value against the field's annotation before
any rule reads it. Anything else is a ResultError (one line).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Union

import numpy as np

from bnlint.measurements import (
    BatchDependence,
    BatchNoise,
    ChannelMetrics,
    DependentLayer,
    DriftSummary,
    DynamicThresholds,
    LayerDrift,
    Measurements,
)

# Every class a measuring run returns, nested ones included. LayerStats is not here: the parent
# rebuilds the reported records from the checked layers rather than trusting the child's.
KINDS: dict[str, type] = {cls.__name__: cls for cls in (Measurements, LayerDrift, BatchDependence, DependentLayer, ChannelMetrics,
                                                       DriftSummary, BatchNoise, DynamicThresholds)}
MAX_RESULT_BYTES = 256 << 20


class ResultError(ValueError):
    """The child's result is not what a measuring run produces."""


def encode(value: Any, folder: Path) -> None:
    """Write `value` (JSON-able values, numeric arrays, dataclasses of KINDS) to folder/result.json + arrays.npz."""
    arrays: dict[str, np.ndarray] = {}

    def walk(item: Any) -> Any:
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return {"__kind__": type(item).__name__, **{f.name: walk(getattr(item, f.name)) for f in dataclasses.fields(item)}}
        if isinstance(item, np.ndarray):
            key = f"a{len(arrays)}"
            arrays[key] = np.ascontiguousarray(item)
            return {"__array__": key}
        if isinstance(item, np.generic):
            return item.item()
        if isinstance(item, dict):
            return {str(k): walk(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(v) for v in item]
        return item

    text = json.dumps(walk(value))
    (folder / "result.json").write_text(text, encoding="utf-8")
    save: Any = np.savez  # keyword arrays: numpy's stub types the keywords as its own options
    save(folder / "arrays.npz", **arrays)


def decode(folder: Path) -> Any:
    """Read back what `encode` wrote; raises ResultError for anything else."""
    try:
        files = [folder / "result.json", folder / "arrays.npz"]
        if sum(f.stat().st_size for f in files) > MAX_RESULT_BYTES:
            raise ResultError("the result is larger than any measuring run produces")
        raw = json.loads(files[0].read_text(encoding="utf-8"))
        with np.load(files[1], allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ResultError(f"unreadable result ({type(exc).__name__})") from None
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise ResultError(f"array {key} has dtype {array.dtype}")

    def build(item: Any, depth: int = 0) -> Any:
        if depth > 32:
            raise ResultError("nested too deeply")
        if isinstance(item, dict):
            if "__array__" in item:
                key = item["__array__"]
                if not isinstance(key, str) or key not in arrays:
                    raise ResultError("a reference to a missing array")
                return arrays[key]
            if "__kind__" in item:
                cls = KINDS.get(item["__kind__"]) if isinstance(item["__kind__"], str) else None
                if cls is None:
                    raise ResultError(f"unknown kind {str(item['__kind__'])[:40]!r}")
                names = {f.name for f in dataclasses.fields(cls)}
                fields = {k: build(v, depth + 1) for k, v in item.items() if k != "__kind__"}
                if set(fields) - names:
                    raise ResultError(f"unknown fields of {cls.__name__}")
                try:
                    instance = cls(**fields)
                except TypeError:
                    raise ResultError(f"incomplete {cls.__name__}") from None
                _check_fields(instance)
                if isinstance(instance, LayerDrift):
                    _check_channels(instance)
                if isinstance(instance, Measurements):
                    try:
                        instance.layer_stats = instance.records()
                    except (ValueError, TypeError, ArithmeticError, IndexError):
                        raise ResultError("inconsistent layer statistics") from None
                return instance
            return {k: build(v, depth + 1) for k, v in item.items()}
        if isinstance(item, list):
            return [build(v, depth + 1) for v in item]
        return item

    return build(raw)


def _check_fields(instance: Any) -> None:
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        if not _matches(getattr(instance, field.name), hints[field.name]):
            raise ResultError(f"{type(instance).__name__}.{field.name} has the wrong type")


def _check_channels(layer: LayerDrift) -> None:
    """Every per-channel array of a layer holds one number per channel (rules index them together)."""
    arrays = [layer.mean_t, layer.var_t]
    if layer.per_channel is not None:
        arrays += [array for _, array in layer.per_channel.items()]
    if layer.batch_noise is not None:
        arrays += [a for a in (layer.batch_noise.rms_smd, layer.batch_noise.rms_lvr) if a is not None]
    if layer.channels < 0 or any(array.shape != (layer.channels,) for array in arrays):
        raise ResultError(f"LayerDrift {layer.name[:40]!r} has arrays of the wrong shape")


def _matches(value: Any, hint: Any) -> bool:
    """Whether value fits a field annotation (the small subset the measurement classes use)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return False
