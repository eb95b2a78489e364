"""A restricted unpickler: reads torch pickles without importing or calling anything from the file.

Policy (why it is safe): `find_class` never imports. A short allowlist of names maps to builders
written here that only arrange data (lazy tensors, tuples, dicts). *Every* other global becomes an
inert `Stub` class named after it: "calling" or constructing it only records the arguments, and
BUILD only records the state. So a pickled nn.Module comes back as a tree of stubs whose recorded
state (`training`, `_parameters`, `_buffers`, `_modules`, `eps`, ...) can be walked, and a payload
such as `os.system("...")` comes back as a stub that was never run. Names that are code-execution
primitives are additionally listed in `unsafe_globals`, so rule BN001 can report them.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from bnlint.loaders.lazy_tensor import LazyTensor, StorageRef

# ---------------------------------------------------------------------------------------------
# Stubs


class Stub:
    """An instance of a class (or the result of a call) that was never imported or run."""

    qualname = "?"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: dict[Any, Any]
    items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> "Stub":
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
                    self.state.update(part)
        elif isinstance(state, dict):
            self.state.update(state)
        else:
            self.state["__state__"] = state

    # Container opcodes (APPEND(S), SETITEM(S), ADDITEMS) on a stub only record what was added.
    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
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


# ---------------------------------------------------------------------------------------------
# Torch types and tensor builders (data only)


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


class BadPickle(Exception):
    """The pickle is well-formed but does not describe tensors the way torch writes them."""


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise BadPickle(f"tensor {what} is not a tuple of ints")
    return tuple(value)


def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> LazyTensor:
    """torch._utils._rebuild_tensor / _v2 (rest = requires_grad, backward_hooks, metadata)."""
    if not isinstance(storage, StorageRef):
        raise BadPickle("tensor storage is not a storage reference")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise BadPickle("tensor storage offset is not a non-negative int")
    requires_grad = bool(rest[0]) if rest and isinstance(rest[0], bool) else False
    shape, steps = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(steps) or any(v < 0 for v in shape + steps):
        raise BadPickle(f"tensor has an invalid size {shape} or stride {steps}")
    return LazyTensor(storage, storage_offset, shape, steps, requires_grad)


def rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                      dtype: Any, metadata: Any = None) -> LazyTensor:
    tensor = rebuild_tensor(storage, offset, size, stride, requires_grad, hooks)
    if isinstance(dtype, TorchDtype):
        tensor.view_dtype = dtype.name
    return tensor


def rebuild_parameter(data: Any, requires_grad: Any = True, hooks: Any = None, state: Any = None) -> Any:
    """torch._utils._rebuild_parameter(_with_state) and nn.Parameter(data, requires_grad)."""
    if isinstance(data, LazyTensor):
        return LazyTensor(data.storage, data.offset, data.size, data.stride, bool(requires_grad),
                          data.view_dtype, True, dict(data.extra))
    return data


def rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """torch._tensor._rebuild_from_type_v2: call the (allowlisted or stub) builder, note the subclass."""
    result = func(*args) if callable(func) and isinstance(args, tuple) else None
    if isinstance(result, LazyTensor) and stub_name(new_type):
        result.extra["tensor_type"] = stub_name(new_type)
    return result


def rebuild_meta(dtype: Any, size: Any, stride: Any, requires_grad: Any = False) -> LazyTensor:
    """A tensor without data (meta device): shape only."""
    name = dtype.name if isinstance(dtype, TorchDtype) else "float32"
    return LazyTensor(StorageRef("meta", name, 0, "meta"), 0, _ints(size, "size"), _ints(stride, "stride"), bool(requires_grad))


def _first(value: Any = None, *_: Any) -> Any:
    return value  # torch.jit._pickle.build_intlist & co: the list itself


# ---------------------------------------------------------------------------------------------
# Safe replacements for builtins / stdlib / numpy reconstruction


def _safe_set(items: Any = ()) -> set[Any]:
    return set(items) if isinstance(items, (list, tuple, set, frozenset)) else set()


def _safe_frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_safe_set(items))


def _safe_complex(real: Any = 0, imag: Any = 0) -> Any:
    ok = all(isinstance(v, (int, float)) for v in (real, imag))
    return complex(real, imag) if ok else stub_class("builtins.complex")(real, imag)


def _safe_slice(*args: Any) -> Any:
    return slice(*args) if len(args) <= 3 else stub_class("builtins.slice")(*args)


def _safe_bytearray(data: Any = b"", encoding: Any = None) -> Any:
    if isinstance(data, (bytes, bytearray)):
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin-1", "latin1"):
        return bytearray(data.encode("latin-1"))
    return stub_class("builtins.bytearray")(data, encoding)


def _codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> Any:
    """_codecs.encode: protocol-2 pickles store bytes as (latin-1 text, 'latin1')."""
    if isinstance(obj, str) and encoding in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
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


def _defaultdict(factory: Any = None, *args: Any) -> dict[Any, Any]:
    return dict(args[0]) if args and isinstance(args[0], dict) else {}  # the factory is never kept


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
        if not isinstance(self.spec, str) or not self.spec or self.spec[0] not in "bBhHiIlLqQefdgFDG?uif":
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
        try:
            flat = np.frombuffer(bytes(raw), dtype=resolved)
            self.array = flat.reshape(shape, order="F" if fortran else "C").astype(resolved.newbyteorder("="))
        except ValueError:
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

ALLOWED: dict[str, Any] = {
    "torch._utils._rebuild_tensor": rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
    "torch._utils._rebuild_meta_tensor_no_storage": rebuild_meta,
    "torch.nn.parameter.Parameter": rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2,
    "torch.Size": lambda *a: tuple(a[0]) if a and isinstance(a[0], (list, tuple)) else (),
    "torch.device": lambda *a: ":".join(str(x) for x in a),
    "torch.jit._pickle.build_intlist": _first, "torch.jit._pickle.build_doublelist": _first,
    "torch.jit._pickle.build_boollist": _first, "torch.jit._pickle.build_tensorlist": _first,
    "torch.jit._pickle.build_genericlist": _first, "torch.jit._pickle.restore_type_tag": _first,
    "collections.OrderedDict": OrderedDict,
    "collections.defaultdict": _defaultdict,
    "builtins.set": _safe_set, "builtins.frozenset": _safe_frozenset, "builtins.slice": _safe_slice,
    "builtins.complex": _safe_complex, "builtins.bytearray": _safe_bytearray,
    "__builtin__.set": _safe_set, "__builtin__.frozenset": _safe_frozenset,
    "_codecs.encode": _codecs_encode,
    "copyreg._reconstructor": _reconstructor, "copy_reg._reconstructor": _reconstructor,
    "copyreg.__newobj__": _newobj,
    "numpy.dtype": NumpyDtype,
}

# ---------------------------------------------------------------------------------------------
# What counts as a code-execution primitive (reported; never executed either way)

UNSAFE_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "shutil",
    "socket", "importlib", "pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "runpy",
    "code", "codeop", "ctypes", "_ctypes", "pty", "pdb", "bdb", "webbrowser", "multiprocessing",
    "asyncio", "threading", "_thread", "signal", "tempfile", "io", "_io", "urllib", "urllib2",
    "http", "httplib", "requests", "ftplib", "smtplib", "telnetlib", "commands", "popen2", "inspect",
    "zipimport", "pkgutil", "site", "distutils", "setuptools", "pip", "timeit", "trace", "cProfile",
    "profile", "yaml", "torch.hub", "torch.serialization", "torch.ops", "torch._ops", "torch.classes",
    "numpy.testing", "numpy.distutils", "numpy.f2py", "numpy.ctypeslib", "numpy.lib.npyio",
})
# Module names that are unsafe wherever they appear in a dotted path (e.g. `torch.serialization.os`).
UNSAFE_ANYWHERE = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "pickle", "_pickle",
    "builtins", "__builtin__", "__builtins__", "marshal", "runpy", "ctypes", "pty", "webbrowser",
})
# Unsafe as the attribute part of a global (`module name`), whatever the module.
UNSAFE_NAMES = frozenset({
    "eval", "exec", "execfile", "compile", "__import__", "open", "getattr", "setattr", "delattr",
    "globals", "locals", "vars", "input", "breakpoint", "apply", "reload", "system", "popen", "Popen",
    "spawnl", "spawnv", "spawnve", "spawnlp", "execv", "execve", "execl", "execlp", "execvp", "fork",
    "check_call", "check_output", "getoutput", "getstatusoutput", "import_module", "load", "loads",
    "load_module", "run_path", "run_module", "methodcaller", "attrgetter", "__globals__", "__code__",
    "__subclasses__", "fromfile", "FunctionType", "CodeType", "MethodType", "LambdaType",
})
BUILTIN_MODULES = ("builtins", "__builtin__", "__builtins__")


def is_unsafe(module: str, name: str) -> bool:
    """True for globals that run code, touch files/processes/network, or load more pickles."""
    module_parts = module.split(".")
    name_parts = name.split(".")
    if module_parts[0] in UNSAFE_MODULES or any(module.startswith(m + ".") or module == m for m in UNSAFE_MODULES if "." in m):
        return True
    if any(part in UNSAFE_ANYWHERE for part in module_parts[1:] + name_parts):
        return True
    return any(part in UNSAFE_NAMES for part in name_parts)


def resolve_global(module: str, name: str) -> tuple[Any, bool]:
    """The object a global stands for here, and whether it is unsafe. Never imports."""
    qualname = f"{module}.{name}"
    if qualname in ALLOWED:
        return ALLOWED[qualname], False
    if is_unsafe(module, name):
        return stub_class(qualname), True
    if module in ("torch", "torch.cuda") and name in STORAGE_DTYPES:
        return StorageType(STORAGE_DTYPES[name]), False
    if module in ("torch.storage", "torch") and name in ("UntypedStorage", "TypedStorage", "_UntypedStorage"):
        return StorageType("uint8"), False
    if module == "torch" and name in TORCH_DTYPES:
        return TorchDtype(TORCH_DTYPES[name]), False
    if module.startswith("numpy") and module.endswith("multiarray"):
        builder = _NUMPY.get("multiarray." + name)
        if builder is not None:
            return builder, False
    return stub_class(qualname), False


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class never imports and whose persistent ids go to a callback."""

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, persistent: Callable[[Any], Any] | None = None) -> None:
        # latin1: Python 2 `str` payloads decode without error (they only name things here).
        super().__init__(file, encoding="latin1")
        self._persistent = persistent
        self.unsafe_globals: list[str] = []
        self.globals_seen: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        # Protocol <= 2 pickles written by Python 3 name Python 2 modules (__builtin__, commands
        # for subprocess...): map them back like pickle's own find_class (a table, no import).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualname = f"{module}.{name}"
        self.globals_seen.add(qualname)
        obj, unsafe = resolve_global(module, name)
        if unsafe and qualname not in self.unsafe_globals:
            self.unsafe_globals.append(qualname)
        return obj

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent id in a pickle that should have none")
        return self._persistent(pid)


def storage_from_pid(pid: Any, make_source: Callable[[str, str, int], StorageRef]) -> StorageRef:
    """Interpret a torch persistent id ('storage', storage_type, key, location, numel[, view]).

    `make_source(key, dtype, numel)` returns the StorageRef (shared per key) to use.
    """
    if not isinstance(pid, tuple) or len(pid) < 5:
        raise BadPickle("unexpected persistent id in a torch pickle")
    typename = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
    if typename != "storage":
        raise BadPickle(f"unexpected persistent id type {typename!r}")
    storage_type, key, location, numel = pid[1:5]
    if not isinstance(storage_type, StorageType):
        raise BadPickle(f"unknown storage type {stub_name(storage_type) or storage_type!r}")
    if not isinstance(numel, int) or numel < 0:
        raise BadPickle("storage size is not a non-negative int")
    storage = make_source(str(key), storage_type.dtype, numel)
    if isinstance(location, bytes):
        location = location.decode("ascii", "replace")
    storage.location = str(location)
    return storage


def safe_load(data: bytes | io.BufferedIOBase, persistent: Callable[[Any], Any] | None = None) -> tuple[Any, list[str]]:
    """Unpickle `data` safely: (object, unsafe global names). Raises pickle/BadPickle errors."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    unpickler = SafeUnpickler(stream, persistent)
    return unpickler.load(), unpickler.unsafe_globals
