"""Pass 2 of a safe load: what the unpickler builds for each global, without importing anything.

`safe_pickle.SafeUnpickler.find_class` hands every global to `resolve_global`, which returns one of:

- a data-only builder from `BUILDERS` for allowlisted names: tensor rebuilders that return lazy
  tensors (`rebuild_tensor` & co), containers (`_ordered_dict`, `_safe_set`...), numpy arrays,
  scalars and dtypes (`NumpyArray`, `NumpyDtype`), none of which calls what it is given;
- a torch storage type or dtype, as a name (`StorageType`, `TorchDtype`);
- for everything else, an inert `Stub` class (one per qualified name, `stub_class`) that records
  its arguments, BUILD state and container items; loaders read them back with `stub_name`.

The builders copy data, so a value memoised once could be copied thousands of times: every copy
is charged to a budget (`_EXPANSION`, set by `safe_pickle.safe_load`) that raises `BadPickle`
instead of growing into gigabytes. Which globals are *allowed* is decided in `pickle_policy`;
this module only says what the allowed ones become.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from contextvars import ContextVar
from typing import Any

import numpy as np

from bnlint.loaders.lazy_tensor import LazyTensor, StorageRef, check_view


class BadPickle(Exception):
    """The pickle is well-formed but does not describe tensors the way torch writes them."""


# How much the builders below may copy, in elements/bytes, for the load in progress. A value that
# is memoised once can be handed to a copying builder thousands of times (a DAG that expands like
# a tree): the budget turns that into an error instead of gigabytes.
_EXPANSION: ContextVar[list[int] | None] = ContextVar("bnlint_pickle_expansion", default=None)


def _charge(count: int) -> None:
    budget = _EXPANSION.get()
    if budget is not None:
        budget[0] -= count
        if budget[0] < 0:
            raise BadPickle("the pickle expands to far more data than it holds (shared values copied over and over)")


def _size(value: Any) -> int:
    try:
        return len(value)
    except TypeError:
        return 1


class Stub:
    """An instance of a class (or the result of a call) that was never imported or run."""

    qualname = "?"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: dict[Any, Any]
    items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> "Stub":
        _charge(1 + len(args) + len(kwargs))
        obj = object.__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = {}
        obj.items = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # arguments were recorded by __new__ (NEWOBJ calls only __new__)

    def __setstate__(self, state: Any) -> None:
        # BUILD: (dict) or (dict | None, slot dict); anything else is kept as-is.
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                if part:
                    _charge(len(part))
                    self.state.update(part)
        elif isinstance(state, dict):
            _charge(len(state))
            self.state.update(state)
        else:
            self.state["__state__"] = state

    # Container opcodes (APPEND(S), SETITEM(S), ADDITEMS) on a stub only record what was added.
    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        _charge(_size(items))
        self.items.extend(items)

    def add(self, item: Any) -> None:
        self.items.append(item)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def __repr__(self) -> str:
        return f"<stub {self.qualname}>"


_STUB_CLASSES: dict[str, type[Stub]] = {}


def stub_class(qualname: str) -> type[Stub]:
    """One stub class per qualified name, so identical globals compare equal."""
    if qualname not in _STUB_CLASSES:
        if len(_STUB_CLASSES) > 50_000:  # hostile files invent names: keep the cache bounded
            _STUB_CLASSES.clear()
        short = qualname.rsplit(".", 1)[-1] or "Stub"
        if not short.isidentifier():
            short = "Stub"
        _STUB_CLASSES[qualname] = type(short, (Stub,), {"qualname": qualname, "__module__": __name__})
    return _STUB_CLASSES[qualname]


def stub_name(obj: Any) -> str | None:
    """Qualified name of a stub instance or stub class, else None."""
    if isinstance(obj, Stub):
        return type(obj).qualname
    if isinstance(obj, type) and issubclass(obj, Stub):
        return obj.qualname
    return None


class StorageType:
    """torch.FloatStorage & co: only carries the dtype."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"StorageType({self.dtype})"


class TorchDtype:
    """torch.float32 & co, as a name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"


STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
    "UntypedStorage": "uint8", "TypedStorage": "uint8", "_UntypedStorage": "uint8",
}

TORCH_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16", "int64": "int64",
    "long": "int64", "int32": "int32", "int": "int32", "int16": "int16", "short": "int16",
    "int8": "int8", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "bool": "bool", "complex64": "complex64", "cfloat": "complex64", "complex128": "complex128",
    "cdouble": "complex128", "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
    "qint8": "qint8", "quint8": "quint8", "qint32": "qint32", "complex32": "complex32",
}


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise BadPickle(f"tensor {what} is not a tuple of ints")
    _charge(len(value))
    return tuple(value)


def _checked(tensor: LazyTensor) -> LazyTensor:
    problem = check_view(tensor)
    if problem:
        raise BadPickle(problem)
    return tensor


def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> LazyTensor:
    """torch._utils._rebuild_tensor / _v2 (rest = requires_grad, backward_hooks, metadata)."""
    if not isinstance(storage, StorageRef):
        raise BadPickle("tensor storage is not a storage reference")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise BadPickle("tensor storage offset is not a non-negative int")
    requires_grad = bool(rest[0]) if rest and isinstance(rest[0], bool) else False
    shape, steps = _ints(size, "size"), _ints(stride, "stride")
    return _checked(LazyTensor(storage, storage_offset, shape, steps, requires_grad))


def rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                      dtype: Any, metadata: Any = None) -> LazyTensor:
    tensor = rebuild_tensor(storage, offset, size, stride, requires_grad, hooks)
    if isinstance(dtype, TorchDtype):
        tensor.view_dtype = dtype.name
    return _checked(tensor)


def rebuild_parameter(data: Any, requires_grad: Any = True, hooks: Any = None, state: Any = None) -> Any:
    """torch._utils._rebuild_parameter(_with_state) and nn.Parameter(data, requires_grad)."""
    if isinstance(data, LazyTensor):
        return LazyTensor(data.storage, data.offset, data.size, data.stride, bool(requires_grad),
                          data.view_dtype, True, dict(data.extra))
    return data


def rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2: call the (allowlisted or stub) builder, note the subclass."""
    if not (callable(func) and isinstance(args, tuple)):
        return None
    _charge(len(args))
    result = func(*args)
    if isinstance(result, LazyTensor) and stub_name(new_type):
        result.extra["tensor_type"] = stub_name(new_type)
    return result


def rebuild_meta(dtype: Any, size: Any, stride: Any, requires_grad: Any = False) -> LazyTensor:
    """A tensor without data (meta device): shape only."""
    name = dtype.name if isinstance(dtype, TorchDtype) else "float32"
    tensor = LazyTensor(StorageRef("meta", name, 0, "meta"), 0, _ints(size, "size"), _ints(stride, "stride"), bool(requires_grad))
    return _checked(tensor)


def _first(value: Any = None, *_: Any) -> Any:
    return value  # torch.jit._pickle.build_intlist & co: the list itself


def _hash_work(values: Any) -> None:
    """Charge the nodes that hashing these values visits (tuples and frozensets are hashed and
    compared element by element, and a memoised tuple nested twice per level is 2**depth nodes):
    counted once per object by an iterative walk, so refusing costs linear time, never the hash."""
    weights: dict[int, int] = {}
    for value in values:
        stack: list[tuple[Any, bool]] = [(value, False)]
        while stack:
            node, done = stack.pop()
            if not isinstance(node, (tuple, frozenset)):
                weights[id(node)] = 1
            elif done:
                weights[id(node)] = min(1 << 62, 1 + sum(weights[id(child)] for child in node))
            elif id(node) not in weights:
                stack.append((node, True))
                stack.extend((child, False) for child in node if id(child) not in weights)
        _charge(weights[id(value)])


def _safe_set(items: Any = ()) -> set[Any]:
    if not isinstance(items, (list, tuple, set, frozenset)):
        return set()
    _charge(len(items))
    _hash_work(items)
    return set(items)


def _safe_frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_safe_set(items))


def _safe_complex(real: Any = 0, imag: Any = 0) -> Any:
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and (not isinstance(v, int) or v.bit_length() < 1024)
             for v in (real, imag))
    return complex(real, imag) if ok else stub_class("builtins.complex")(real, imag)


def _safe_slice(*args: Any) -> Any:
    return slice(*args) if len(args) <= 3 else stub_class("builtins.slice")(*args)


def _safe_bytearray(data: Any = b"", encoding: Any = None) -> Any:
    if isinstance(data, (bytes, bytearray)):
        _charge(len(data))
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin-1", "latin1"):
        _charge(len(data))
        return bytearray(data.encode("latin-1"))
    return stub_class("builtins.bytearray")(data, encoding)  # never bytearray(n): n zero bytes


def _codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> Any:
    """_codecs.encode: protocol-2 pickles store bytes as (latin-1 text, 'latin1')."""
    if isinstance(obj, str) and encoding in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        _charge(len(obj))
        return obj.encode(encoding, "strict")
    return stub_class("_codecs.encode")(obj, encoding)


def _reconstructor(cls: Any, base: Any = None, state: Any = None) -> Any:
    """copyreg._reconstructor (protocol 0/1 objects): instantiate the stub, nothing else."""
    if isinstance(cls, type) and issubclass(cls, Stub):
        return cls.__new__(cls)
    if cls is OrderedDict:
        return OrderedDict()
    return stub_class("copyreg._reconstructor")(cls, base, state)


def _newobj(cls: Any, *args: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, Stub):
        return cls.__new__(cls, *args)
    return stub_class("copyreg.__newobj__")(cls, *args)


def _ordered_dict(*args: Any) -> OrderedDict[Any, Any]:
    if args and isinstance(args[0], (dict, list, tuple)):
        _charge(len(args[0]))
        if not isinstance(args[0], dict):  # pairs: their keys are hashed
            _hash_work([pair[0] for pair in args[0] if isinstance(pair, (tuple, list)) and pair])
        try:
            return OrderedDict(args[0])
        except (TypeError, ValueError):
            raise BadPickle("OrderedDict built from something that is not pairs") from None
    return OrderedDict()


def _defaultdict(factory: Any = None, *args: Any) -> dict[Any, Any]:
    if args and isinstance(args[0], dict):
        _charge(len(args[0]))
        return dict(args[0])
    return {}  # the factory is never kept


def _torch_size(*args: Any) -> tuple[Any, ...]:
    if args and isinstance(args[0], (list, tuple)):
        _charge(len(args[0]))
        # torch.Size holds ints: anything else would make a hashable tuple of arbitrary values
        return tuple(v for v in args[0] if isinstance(v, int))
    return ()


class NumpyDtype:
    """numpy.dtype(...) + BUILD state, resolved to a plain numeric dtype only."""

    def __init__(self, spec: Any = "f8", align: Any = False, copy: Any = True) -> None:
        self.spec = spec
        self.order = "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]

    @property
    def dtype(self) -> np.dtype | None:
        # Plain numeric codes only ("f4", "i8", ...): no structured or sub-array dtypes.
        if not isinstance(self.spec, str) or not re.fullmatch(r"[bBhHiIlLqQefdgFDG?uifc]\d{0,2}", self.spec):
            return None
        try:
            dtype = np.dtype(self.spec)
        except TypeError:
            return None
        if self.order == "<":
            return dtype.newbyteorder("<")
        return dtype.newbyteorder(">") if self.order == ">" else dtype


class NumpyArray:
    """numpy.core.multiarray._reconstruct + BUILD: becomes `.array` for numeric raw data only."""

    def __init__(self, *args: Any) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            return
        _, shape, dtype, fortran, raw = state
        resolved = dtype.dtype if isinstance(dtype, NumpyDtype) else None
        if resolved is None or not isinstance(raw, (bytes, bytearray)) or not isinstance(shape, tuple):
            return
        _charge(len(raw))
        try:
            flat = np.frombuffer(bytes(raw), dtype=resolved)
            self.array = flat.reshape(shape, order="F" if fortran else "C").astype(resolved.newbyteorder("="))
        except (ValueError, TypeError):
            self.array = None


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    resolved = dtype.dtype if isinstance(dtype, NumpyDtype) else None
    if resolved is not None and isinstance(data, bytes) and len(data) == resolved.itemsize:
        return np.frombuffer(data, dtype=resolved)[0].item()
    return stub_class("numpy.core.multiarray.scalar")(dtype, data)


_NUMPY = {
    "multiarray._reconstruct": NumpyArray,
    "multiarray.scalar": _numpy_scalar,
}

# What find_class hands the C unpickler for these names: builders written above.
BUILDERS: dict[str, Any] = {
    "torch._utils._rebuild_tensor": rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
    "torch._utils._rebuild_meta_tensor_no_storage": rebuild_meta,
    "torch.nn.parameter.Parameter": rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2,
    "torch.Size": _torch_size,
    "torch.device": lambda *a: ":".join(str(x)[:64] for x in a[:2]),
    "torch.jit._pickle.build_intlist": _first, "torch.jit._pickle.build_doublelist": _first,
    "torch.jit._pickle.build_boollist": _first, "torch.jit._pickle.build_tensorlist": _first,
    "torch.jit._pickle.build_genericlist": _first, "torch.jit._pickle.restore_type_tag": _first,
    "collections.OrderedDict": _ordered_dict,
    "collections.defaultdict": _defaultdict,
    "builtins.set": _safe_set, "builtins.frozenset": _safe_frozenset, "builtins.slice": _safe_slice,
    "builtins.complex": _safe_complex, "builtins.bytearray": _safe_bytearray,
    "__builtin__.set": _safe_set, "__builtin__.frozenset": _safe_frozenset,
    "_codecs.encode": _codecs_encode,
    "copyreg._reconstructor": _reconstructor, "copy_reg._reconstructor": _reconstructor,
    "copyreg.__newobj__": _newobj,
    "numpy.dtype": NumpyDtype,
}


def resolve_global(module: str, name: str) -> Any:
    """The object a global stands for here: a data-only builder, a torch type, or a stub. Never imports."""
    qualname = f"{module}.{name}"
    if "." in name:  # an attribute walk (pickle_policy.is_walk): never a builder, whatever it joins to
        return stub_class(qualname)
    if qualname in BUILDERS:
        return BUILDERS[qualname]
    if module in ("torch", "torch.cuda") and name in STORAGE_DTYPES:
        return StorageType(STORAGE_DTYPES[name])
    if module in ("torch.storage", "torch") and name in ("UntypedStorage", "TypedStorage", "_UntypedStorage"):
        return StorageType("uint8")
    if module == "torch" and name in TORCH_DTYPES:
        return TorchDtype(TORCH_DTYPES[name])
    if module.startswith("numpy") and module.endswith("multiarray"):
        builder = _NUMPY.get("multiarray." + name)
        if builder is not None:
            return builder
    return stub_class(qualname)
