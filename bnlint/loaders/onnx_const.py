"""What onnxruntime feeds a BatchNormalization whose statistics are not a plain initializer.

Two things the runtime does before the BN node runs, redone here with numpy:
- a `sparse_initializer` (or a Constant node's `sparse_value`) is densified: ONNX's
  SparseTensorProto holds values [NNZ] and int64 indices, either [NNZ] (linearised) or [NNZ, rank];
  unset positions are zero, a repeated index keeps its last value (as onnxruntime does), an index
  out of range is refused (onnxruntime refuses the model);
- a constant expression (Reshape, Unsqueeze, Concat, Mul, ... of stored tensors) is folded, for a
  small, explicit set of shape-only and elementwise ops. Anything else stays unresolved, with a
  one-line reason the loader records in `BNLayer.unchecked`, never silently skipped.

Folding is iterative (an explicit stack, no recursion), memoised per name, and bounded: every
result's element count is checked before it is allocated, and all folding for a file shares one
budget of newly allocated elements, so a chain of doubling Concats or a 50,000-node chain costs
linear time and bounded memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnlint.errors import InputError
from bnlint.loaders.onnx_tensors import _EXOTIC, _NATIVE, _dtype_name, _ml_dtype, _tensor_ref
from bnlint.loaders.onnx_wire import WireNode, WireSparseTensor
from bnlint.model import TensorRef

MAX_ELEMENTS = 1 << 22  # one densified or folded tensor (BN statistics have one value per channel)
MAX_TOTAL = 1 << 24  # elements newly allocated by all folding of one file (the memo keeps them until the load ends)
Source = tuple[str, "TensorRef | None"]  # (kind, tensor) as the loader's scope stores names


class Unresolved(Exception):
    """A value bnlint does not compute; the message is the one-line reason."""


def _count(shape: Any) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def densify(sparse: WireSparseTensor, path: Path) -> np.ndarray:
    """The dense array onnxruntime builds from a SparseTensorProto (InputError where it refuses one)."""
    name = sparse.values.name if sparse.values is not None else ""

    def refuse(problem: str) -> InputError:
        return InputError(str(path), f"sparse tensor {name!r} {problem} (onnxruntime refuses the model)")

    dims = [int(d) for d in sparse.dims]
    if any(d < 0 for d in dims):
        raise refuse(f"has a negative dimension in {dims}")
    size = _count(dims)
    if size > MAX_ELEMENTS:
        raise Unresolved(f"sparse tensor {name!r} densifies to {size} values, more than bnlint reads ({MAX_ELEMENTS})")
    if sparse.values is None or sparse.indices is None:
        raise refuse("has no values or no indices")
    values = np.asarray(_tensor_ref(sparse.values, path).numpy())
    indices = np.asarray(_tensor_ref(sparse.indices, path).numpy())
    if values.ndim != 1:
        raise refuse(f"has values of shape {values.shape}, not [NNZ]")
    if values.dtype == object:
        raise Unresolved(f"sparse tensor {name!r} holds strings")
    nnz = values.shape[0]
    if indices.dtype.kind not in "iu":
        raise refuse(f"has indices of type {indices.dtype}")
    if indices.shape == (nnz,):
        flat = indices.astype(np.int64)
    elif indices.shape == (nnz, len(dims)):
        if nnz and ((indices < 0).any() or (indices >= np.asarray(dims, dtype=np.int64)).any()):
            raise refuse("has an index out of range")
        flat = np.ravel_multi_index(tuple(indices.astype(np.int64).T), dims) if nnz else np.zeros(0, np.int64)
    else:
        raise refuse(f"has indices of shape {indices.shape} for {nnz} values of a {len(dims)}-D tensor")
    if nnz and (flat.min() < 0 or flat.max() >= size):
        raise refuse("has an index out of range")
    dense = np.zeros(size, dtype=values.dtype)
    dense[flat] = values  # a repeated index: numpy keeps the last value, as onnxruntime does
    return dense.reshape(dims)


@dataclass(frozen=True)
class SparseTensor:
    """A TensorRef over a sparse initializer: densified (bounded) on `.numpy()`."""

    proto: WireSparseTensor
    path: Path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.proto.dims)

    @property
    def dtype(self) -> str:
        return _dtype_name(self.proto.values.data_type) if self.proto.values is not None else "undefined"

    def numpy(self) -> np.ndarray:
        try:
            return densify(self.proto, self.path)
        except Unresolved as exc:
            raise InputError(str(self.path), str(exc)) from None


def _attrs(node: WireNode) -> dict[str, Any]:
    return {a.name: a for a in node.attribute}


def _ints(array: np.ndarray | None, what: str) -> list[int]:
    if array is None or array.dtype.kind not in "iu" or array.ndim > 1:
        raise Unresolved(f"its {what} is not a 1-D integer tensor")
    return [int(v) for v in array.reshape(-1)]


def _axes(node: WireNode, inputs: list[np.ndarray | None]) -> list[int] | None:
    """Squeeze/Unsqueeze axes as written: the attribute (opsets < 13) or the second input."""
    attr = _attrs(node).get("axes")
    if attr is not None:
        return list(attr.ints)
    return _ints(inputs[1], "axes") if len(inputs) > 1 and inputs[1] is not None else None


def _normalise(raw: list[int], rank: int) -> list[int]:
    axes = [a + rank if a < 0 else a for a in raw]
    if any(not 0 <= a < rank for a in axes) or len(set(axes)) != len(axes):
        raise Unresolved(f"axes {raw} are invalid for rank {rank}")
    return axes


def _reshape(node: WireNode, inputs: list[np.ndarray | None]) -> np.ndarray:
    x = inputs[0]
    assert x is not None
    attrs = _attrs(node)
    shape = _ints(inputs[1], "shape") if len(inputs) > 1 else list(attrs["shape"].ints) if "shape" in attrs else None
    if shape is None:
        raise Unresolved("it has no shape")
    allowzero = "allowzero" in attrs and attrs["allowzero"].i == 1
    if not allowzero:
        if any(d == 0 and i >= x.ndim for i, d in enumerate(shape)):
            raise Unresolved(f"shape {shape} copies a dimension the input lacks")
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    if shape.count(-1) > 1 or any(d < -1 for d in shape):
        raise Unresolved(f"shape {shape} is invalid")
    try:
        return x.reshape(shape)
    except ValueError:
        raise Unresolved(f"an input of shape {x.shape} cannot take shape {shape}") from None


def _cast(x: np.ndarray, to: int) -> np.ndarray:
    native = _NATIVE.get(to, ("", 0))[0]
    if to in _EXOTIC:  # narrow types: round as the Cast does, then widen exactly
        return x.astype(_ml_dtype(_EXOTIC[to][0])).astype(np.float32)
    if native in ("", "<c8", "<c16"):
        raise Unresolved(f"it casts to {_dtype_name(to)}")
    return x.astype(native)


def _broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    try:
        shape = np.broadcast_shapes(*shapes)
    except ValueError:
        raise Unresolved(f"shapes {', '.join(map(str, shapes))} do not broadcast") from None
    if _count(shape) > MAX_ELEMENTS:
        raise Unresolved(f"its result has {_count(shape)} values, more than bnlint folds")
    return shape


def _binary(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype != b.dtype:
        raise Unresolved(f"its inputs differ in type ({a.dtype}, {b.dtype})")  # the runtime refuses the model
    if op == "Div" and a.dtype.kind != "f":
        raise Unresolved("it divides integers")
    _broadcast([a.shape, b.shape])
    with np.errstate(all="ignore"):
        result: np.ndarray = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b)
    return result.astype(a.dtype, copy=False)


def _fold(node: WireNode, inputs: list[np.ndarray | None], path: Path) -> np.ndarray:
    """One op over constant inputs, as the ONNX spec defines it (Unresolved for what is not covered)."""
    op, attrs = node.op_type, _attrs(node)
    x = inputs[0] if inputs else None
    if op == "ConstantOfShape":
        shape = _ints(x, "shape") if x is not None else []
        if any(d < 0 for d in shape) or _count(shape) > MAX_ELEMENTS:
            raise Unresolved(f"shape {shape} is negative or too large")
        fill = np.asarray(_tensor_ref(attrs["value"].t, path).numpy()) if "value" in attrs else np.zeros(1, np.float32)
        if fill.size != 1 or fill.dtype == object:
            raise Unresolved("its value is not one number")
        return np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype)
    if op == "Concat":
        parts = [p for p in inputs if p is not None]
        axis = attrs["axis"].i if "axis" in attrs else None
        if not parts or axis is None or len({p.ndim for p in parts}) != 1 or len({p.dtype for p in parts}) != 1:
            raise Unresolved("its inputs or axis are invalid")
        if sum(p.size for p in parts) > MAX_ELEMENTS:
            raise Unresolved("its result is larger than bnlint folds")
        try:
            return np.concatenate(parts, axis=axis)
        except (ValueError, IndexError):  # numpy's AxisError is both
            raise Unresolved(f"its inputs do not concatenate on axis {axis}") from None
    if x is None:
        raise Unresolved("its first input is missing")
    if op == "Identity":
        return x
    if op == "Cast":
        if "to" not in attrs:
            raise Unresolved("it has no 'to' attribute")
        return _cast(x, attrs["to"].i)
    if op == "Reshape":
        return _reshape(node, inputs)
    if op == "Flatten":
        axis = attrs["axis"].i if "axis" in attrs else 1
        axis = axis + x.ndim if axis < 0 else axis
        if not 0 <= axis <= x.ndim:
            raise Unresolved(f"axis {axis} is invalid for rank {x.ndim}")
        return x.reshape(_count(x.shape[:axis]), _count(x.shape[axis:]))
    if op == "Squeeze":
        raw = _axes(node, inputs)
        axes = _normalise(raw, x.ndim) if raw is not None else None
        if axes is not None and any(x.shape[a] != 1 for a in axes):
            raise Unresolved(f"it squeezes axes {axes} of shape {x.shape}")
        return np.squeeze(x, axis=tuple(axes) if axes is not None else None)
    if op == "Unsqueeze":
        raw = _axes(node, inputs)
        if not raw:
            raise Unresolved("it has no axes")
        return np.expand_dims(x, tuple(_normalise(raw, x.ndim + len(raw))))
    if op == "Expand":
        shape = _ints(inputs[1] if len(inputs) > 1 else None, "shape")
        return np.broadcast_to(x, _broadcast([x.shape, tuple(shape)]))
    if op == "Transpose":
        perm = list(attrs["perm"].ints) if "perm" in attrs else list(range(x.ndim))[::-1]
        if sorted(perm) != list(range(x.ndim)):
            raise Unresolved(f"perm {perm} is invalid for rank {x.ndim}")
        return np.transpose(x, perm)
    if op in ("Neg", "Abs"):
        return np.negative(x) if op == "Neg" else np.abs(x)
    if op in ("Add", "Sub", "Mul", "Div"):
        b = inputs[1] if len(inputs) > 1 else None
        if b is None:
            raise Unresolved("its second input is missing")
        return _binary(op, x, b)
    raise Unresolved(f"{op} is not folded")


FOLDED_OPS = frozenset({"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Concat", "Transpose",
                        "Neg", "Abs", "Add", "Sub", "Mul", "Div", "ConstantOfShape"})


class Folder:
    """Values of constant tensors in one graph scope, memoised; `value` raises Unresolved."""

    def __init__(self, tensors: Mapping[str, Source], producers: Mapping[str, WireNode], budget: list[int], path: Path) -> None:
        self.path = path  # the model: external data of a ConstantOfShape value is found beside it
        self.tensors = tensors
        self.producers = producers
        self.memo: dict[str, np.ndarray | Unresolved] = {}
        self.budget = budget  # shared by all scopes of a file: [elements left]

    def _stored(self, name: str, kind: str, ref: TensorRef | None) -> np.ndarray | Unresolved:
        if ref is None:
            return Unresolved(f"{name!r} comes from a Constant node whose value bnlint cannot read")
        if kind == "sparse" or isinstance(ref, SparseTensor):
            try:
                dense = densify(ref.proto, ref.path) if isinstance(ref, SparseTensor) else np.asarray(ref.numpy())
            except Unresolved as exc:
                return exc
            self.budget[0] -= dense.size
            if self.budget[0] < 0:
                return Unresolved(f"sparse tensor {name!r}: constant expressions of this file exceed bnlint's folding budget")
            return dense
        array = np.asarray(ref.numpy())  # a corrupt stored tensor refuses the file, as before
        return Unresolved(f"{name!r} holds strings") if array.dtype == object else array

    def _compute(self, name: str, node: WireNode) -> np.ndarray | Unresolved:
        values: list[np.ndarray | None] = []
        for source in node.input:
            found = self.memo.get(source) if source else None
            if isinstance(found, Unresolved):
                return found
            values.append(found)
        label = f"{node.op_type} node {node.name or name!r}"
        if node.output[0] != name:
            return Unresolved(f"{name!r} is not the first output of {label}")
        try:
            result = np.asarray(_fold(node, values, self.path))
        except Unresolved as exc:
            return Unresolved(f"{label} cannot be folded: {exc}")
        except (ValueError, TypeError, IndexError, OverflowError, MemoryError) as exc:
            return Unresolved(f"{label} cannot be folded: {type(exc).__name__}")
        if result.base is None and not any(result is value for value in values):  # views and pass-throughs are free
            self.budget[0] -= result.size
        if self.budget[0] < 0:
            return Unresolved(f"{label}: constant expressions of this file exceed bnlint's folding budget")
        return result

    def value(self, name: str) -> np.ndarray:
        """The value the runtime computes for `name`, or Unresolved with the first reason found."""
        memo, stack, active = self.memo, [name], set()
        while stack:
            current = stack[-1]
            if current in memo:
                stack.pop()
                continue
            stored = self.tensors.get(current)
            node = self.producers.get(current) if stored is None else None
            if stored is not None:
                memo[current] = self._stored(current, *stored)
            elif node is None:
                memo[current] = Unresolved(f"{current!r} is neither stored nor computed in the graph")
            elif node.domain not in ("", "ai.onnx") or node.op_type not in FOLDED_OPS:
                memo[current] = Unresolved(f"{current!r} is computed by {node.op_type}, which bnlint does not fold")
            else:
                pending = [source for source in node.input if source and source not in memo]
                if any(source in active for source in pending):
                    memo[current] = Unresolved(f"{current!r} depends on itself (a cycle)")
                elif pending and current not in active:
                    active.add(current)
                    stack.extend(pending)
                    continue
                else:
                    memo[current] = self._compute(current, node)
            active.discard(current)
            stack.pop()
        found = memo[name]
        if isinstance(found, Unresolved):
            raise found
        return found

