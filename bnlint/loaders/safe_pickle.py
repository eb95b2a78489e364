"""Read torch pickles without importing or calling anything from them, and judge what they would run.

Every pickle goes through two passes.

1. `scan_pickle` walks the opcode stream the way CPython's C unpickler does, but pushes only
   markers ("this value is global X", "this is what calling X returned") instead of objects. It
   bounds the stream (every length within the bytes that exist, memo indices no larger than the
   pickle, no out-of-band buffers) and records every global that *loading* would call: REDUCE,
   NEWOBJ, NEWOBJ_EX, INST, OBJ, the class arguments of `copyreg._reconstructor` & co, calls of
   computed objects, and BUILD/SETITEM/APPEND on a global (which mutate a live object). Each is
   judged by the policy below: an **allowlist** of tensor rebuilders and data-only classes,
   execution primitives (errors, BN001; also reported when only referenced), and everything else
   (unknown callables: warnings, BN003). The scan builds nothing, so its findings survive
   whatever happens to the load afterwards.
2. `SafeUnpickler` (the C unpickler with a `find_class` that never imports) then builds the
   objects: allowlisted names map to builders written here that only arrange data (lazy tensors,
   tuples, dicts); every other global becomes an inert `Stub` class that records arguments and
   state. A budget stops shared (memoised) values from being copied into gigabytes.

How to extend the allowlist: add a qualified name to `ALLOWED_CALLABLES` (exact) or a pattern to
`ALLOWED_PATTERNS`, with the reason, only for callables whose reconstruction arranges data and
calls nothing it is given. A callable that instantiates or calls some of its arguments also goes
in `CALLS_ARGUMENTS` so that those arguments are judged too. Never allowlist anything that
imports, evaluates, opens files or processes, or calls its arguments.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import mmap
import pickle
import re
import struct
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Literal, Union

import numpy as np

from bnlint.errors import InputError, UnsafeInputError
from bnlint.loaders.lazy_tensor import LazyTensor, StorageRef, check_view

# =============================================================================================
# Policy: what loading a pickle may call

Verdict = Literal["allowed", "unknown", "primitive"]

# Data-only callables, by family. Tensor rebuilders and torch types are what torch's own
# weights_only unpickler accepts; the rest are containers and configuration classes whose
# reconstruction only stores the data it is given.
ALLOWED_CALLABLES: frozenset[str] = frozenset({
    # torch tensor rebuilders and torch value types
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state", "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_nested_tensor", "torch._utils._rebuild_wrapper_subclass",
    "torch._utils._rebuild_device_tensor_from_numpy", "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch._tensor._rebuild_from_type_v2", "torch.nn.parameter.Parameter", "torch.Tensor", "torch.Size",
    "torch.device", "torch.serialization._get_layout", "torch.torch_version.TorchVersion",
    "torch.storage.UntypedStorage", "torch.storage.TypedStorage", "torch.UntypedStorage", "torch.TypedStorage",
    # TorchScript pickles (list builders: return their argument)
    "torch.jit._pickle.build_intlist", "torch.jit._pickle.build_doublelist", "torch.jit._pickle.build_boollist",
    "torch.jit._pickle.build_tensorlist", "torch.jit._pickle.build_genericlist", "torch.jit._pickle.build_complexlist",
    "torch.jit._pickle.restore_type_tag",
    # containers and plain values (protocol 0-3 spell sets, bytes and NoneType this way)
    "collections.OrderedDict", "collections.defaultdict", "collections.Counter", "collections.deque",
    "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex", "builtins.bytearray", "builtins.bytes",
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.int", "builtins.float", "builtins.str",
    "builtins.bool", "builtins.object", "builtins.range", "_codecs.encode",
    # object reconstruction helpers (the classes they instantiate are judged via CALLS_ARGUMENTS)
    "copyreg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__",
    # configuration and hyper-parameter values
    "argparse.Namespace", "types.SimpleNamespace", "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath",
    "pathlib.PurePath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "datetime.datetime", "datetime.date",
    "datetime.time", "datetime.timedelta", "datetime.timezone", "decimal.Decimal", "fractions.Fraction", "uuid.UUID",
    "enum.Enum", "enum.IntEnum", "enum.Flag", "enum.IntFlag",
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.Metadata",
    "omegaconf.base.ContainerMetadata", "omegaconf.base.UnionNode",
    "pytorch_lightning.utilities.parsing.AttributeDict", "lightning.pytorch.utilities.parsing.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict", "lightning_fabric.utilities.data.AttributeDict",
    # numpy array, scalar and dtype reconstruction
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar", "numpy.dtype", "numpy.ndarray", "numpy.core.numeric._frombuffer",
    "numpy._core.numeric._frombuffer", "numpy.random._pickle.__randomstate_ctor",
    "numpy.random._pickle.__bit_generator_ctor", "numpy.random._pickle.__generator_ctor",
})

ALLOWED_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"__torch__(\.\w+)+"),  # TorchScript classes: defined by the archive's own code/, never imported
    re.compile(r"torch\.nn\.modules(\.[a-z_0-9]+)+\.[A-Z]\w*"),  # torch layers: object.__new__ + Module.__setstate__
    re.compile(r"torch\.(cuda\.)?[A-Z]\w*Storage"),  # legacy typed storages
    re.compile(r"torch\.(cuda\.)?(sparse\.)?[A-Z]\w*Tensor"),  # legacy tensor classes
    re.compile(r"omegaconf\.nodes\.[A-Z]\w*Node"),  # omegaconf value nodes (AnyNode, StringNode, ...)
    re.compile(r"numpy\.dtypes\.[A-Z]\w*DType"),  # numpy 2 dtype classes
)

# Allowlisted callables that instantiate or call some of their positional arguments.
CALLS_ARGUMENTS: dict[str, tuple[int, ...]] = {
    "copyreg._reconstructor": (0, 1),  # (cls, base, state): base.__new__(cls), base.__init__
    "copyreg.__newobj__": (0,),
    "copyreg.__newobj_ex__": (0,),
    "torch._tensor._rebuild_from_type_v2": (0, 1),  # (func, new_type, args, state)
    "torch._utils._rebuild_wrapper_subclass": (0,),
    "numpy.core.multiarray._reconstruct": (0,),
    "numpy._core.multiarray._reconstruct": (0,),
    "numpy.random._pickle.__randomstate_ctor": (1,),
    "numpy.random._pickle.__generator_ctor": (1,),
}


# Allowlisted constructors that iterate or convert their arguments (`__iter__`, `__str__`,
# `__index__`...): a module-level object handed to them directly runs its class's code. Picklers
# never write that (they pickle the content), so such an argument is judged as a call.
READS_ARGUMENTS = frozenset({
    "builtins.list", "builtins.tuple", "builtins.set", "builtins.frozenset", "builtins.dict", "builtins.str",
    "builtins.bytes", "builtins.bytearray", "builtins.int", "builtins.float", "builtins.complex", "builtins.bool",
    "collections.OrderedDict", "collections.Counter", "collections.deque", "_codecs.encode",
})


def _one_argument(args: list[str | None] | None) -> bool:
    return args is not None and len(args) == 1  # type(None): how NoneType is pickled


def _typing_subscript(args: list[str | None] | None) -> bool:
    if args is None or len(args) != 2:
        return False
    origin = args[0]
    return origin is not None and origin.startswith("typing.")


# Allowed only with these arguments (globals by name, None for other values); unknown otherwise.
CONDITIONAL: dict[str, Callable[[list[str | None] | None], bool]] = {
    "builtins.type": _one_argument,
    "operator.getitem": _typing_subscript,  # typing.List[int] & co pickle as getitem(typing.X, args)
    "_operator.getitem": _typing_subscript,
}

# Execution primitives: modules (and their submodules) whose globals run code, touch files,
# processes or the network, import things, or call what they are given ...
PRIMITIVE_MODULES: frozenset[str] = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "shutil", "socket",
    "_socket", "ssl", "select", "selectors", "importlib", "imp", "pkgutil", "zipimport", "runpy", "site",
    "pickle", "_pickle", "pickletools", "cPickle", "copyreg", "copy_reg", "shelve", "dbm", "marshal", "code",
    "codeop", "compileall", "py_compile", "ctypes", "_ctypes", "cffi", "pty", "tty", "pdb", "bdb", "trace",
    "cProfile", "profile", "timeit", "webbrowser", "antigravity", "this", "__hello__", "__phello__", "idlelib",
    "turtledemo", "tkinter", "_tkinter", "turtle", "pydoc", "doctest", "unittest", "imaplib", "poplib", "smtplib",
    "ftplib", "telnetlib", "nntplib", "http", "urllib", "urllib2", "urllib3", "requests", "httplib", "xmlrpc",
    "socketserver", "wsgiref", "asyncio", "asyncore", "asynchat", "multiprocessing", "concurrent", "threading",
    "_thread", "signal", "atexit", "gc", "inspect", "types", "builtins", "__builtin__", "__builtins__",
    "functools", "_functools", "operator", "_operator", "itertools", "tempfile", "io", "_io", "fileinput",
    "mmap", "logging", "zipfile", "tarfile", "_osx_support", "_aix_support", "platform", "uuid", "mailcap",
    "pipes", "sched", "venv", "ensurepip", "distutils", "setuptools", "pip", "commands", "popen2", "resource",
    "faulthandler", "msvcrt", "winreg", "_winreg", "_winapi", "weakref", "_weakref", "contextlib", "dill",
    "cloudpickle", "joblib", "yaml", "ruamel", "jinja2", "mako", "numexpr", "sympy", "IPython",
    "torch.hub", "torch.serialization", "torch.package", "torch.jit", "torch._jit_internal", "torch.fx",
    "torch._C", "torch.ops", "torch._ops", "torch.classes", "torch.library", "torch.utils.cpp_extension",
    "torch.utils.benchmark", "torch._dynamo", "torch._inductor", "torch._export", "torch.export",
    "torch.compiler", "torch.distributed", "torch.multiprocessing", "numpy.testing", "numpy.distutils",
    "numpy.f2py", "numpy.ctypeslib", "numpy.lib.npyio", "numpy.lib.format", "pandas.io", "pandas.core.computation",
})
# ... and names that are primitives wherever they appear in a dotted path (`torch.serialization.os.system`).
PRIMITIVE_NAMES: frozenset[str] = frozenset({
    "os", "sys", "subprocess", "posix", "nt", "builtins", "__builtin__", "__builtins__", "importlib", "pickle",
    "_pickle", "marshal", "runpy", "ctypes", "pty", "webbrowser", "shutil", "socket", "eval", "exec", "execfile",
    "compile", "__import__", "open", "system", "popen", "Popen", "spawnl", "spawnle", "spawnlp", "spawnlpe",
    "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "execl", "execle", "execlp",
    "execlpe", "execv", "execve", "execvp", "execvpe", "fork", "forkpty", "startfile", "check_call",
    "check_output", "getoutput", "getstatusoutput", "run_path", "run_module", "import_module", "load_module",
    "_import_dotted_name", "locate", "resolve_name", "getattr", "setattr", "delattr", "globals", "locals", "vars",
    "input", "breakpoint", "help", "load", "loads", "_load_from_bytes", "read_pickle", "save", "_exec_with_source",
    "execWrapper", "debug_script", "debug_src", "pipepager", "tempfilepager", "pager", "_read_output",
    "_get_command_stdout", "_syscmd_file", "_syscmd_ver", "methodcaller", "attrgetter", "itemgetter", "call",
    "write_text", "write_bytes", "unlink", "remove", "rmtree", "rmdir", "removedirs", "rename", "renames", "touch",
    "mkdir", "makedirs", "symlink", "symlink_to", "hardlink_to", "chmod", "chown", "chdir", "putenv", "kill",
    "killpg", "register", "add_extension", "interact", "set_trace", "post_mortem", "urlopen", "urlretrieve",
    "fromfile", "from_file", "FunctionType", "CodeType", "MethodType", "LambdaType", "evaluate", "sympify",
})
# Dunder components that are not attribute traversal (`__torch__` is TorchScript's namespace).
PLAIN_DUNDERS = frozenset({"__main__", "__torch__", "__builtin__", "__newobj__", "__newobj_ex__"})


@lru_cache(maxsize=8192)
def is_primitive(qualname: str) -> bool:
    """True for globals that run code, touch files/processes/network, import, call what they are
    given, or reach into interpreter internals (dunder attributes, `pkg.__main__` modules)."""
    if qualname in ALLOWED_CALLABLES or qualname in CONDITIONAL:
        return False
    parts = qualname.split(".")
    if any(".".join(parts[:i]) in PRIMITIVE_MODULES for i in range(1, len(parts) + 1)):
        return True
    if any(part in PRIMITIVE_NAMES for part in parts):
        return True
    if "__main__" in parts[1:]:
        return True  # importing `pkg.__main__` runs the package's command line
    return any(len(p) > 4 and p.startswith("__") and p.endswith("__") and p not in PLAIN_DUNDERS for p in parts)


def _allowed(qualname: str) -> bool:
    return qualname in ALLOWED_CALLABLES or any(p.fullmatch(qualname) for p in ALLOWED_PATTERNS)


def judge_call(qualname: str, args: list[str | None] | None = None) -> Verdict:
    """Whether calling `qualname` (with arguments naming these globals, None for other values;
    `args` None when unknown) is allowed, an execution primitive, or unknown code."""
    condition = CONDITIONAL.get(qualname)
    if condition is not None:
        return "allowed" if condition(args) else "unknown"
    if qualname in ALLOWED_CALLABLES:
        return "allowed"
    if is_primitive(qualname):
        return "primitive"
    return "allowed" if _allowed(qualname) else "unknown"


# =============================================================================================
# Pass 1: the scan


class _Sym:
    """What the scan knows about one stack value: by default, nothing that matters."""

    __slots__ = ()


class _Str(_Sym):
    __slots__ = ("text",)

    def __init__(self, text: str | None) -> None:
        self.text = text  # None when too long to be a name


class _Global(_Sym):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Made(_Sym):
    """What calling `origin` returned (origin None: the callee was itself computed)."""

    __slots__ = ("origin",)

    def __init__(self, origin: str | None) -> None:
        self.origin = origin


class _Tuple(_Sym):
    __slots__ = ("items",)

    def __init__(self, items: list[_Sym]) -> None:
        self.items = items


class _Persistent(_Sym):
    """What persistent_load returned: torch's legacy loaders hand back an element of the id itself
    (`("module", cls, ...)` -> cls; the tar format's tuples -> their first element)."""

    __slots__ = ("globals",)

    def __init__(self, pid: _Sym) -> None:
        items = pid.items[:2] if isinstance(pid, _Tuple) else []
        self.globals = [item for item in items if isinstance(item, _Global)]


_DATA = _Sym()
_MAX_NAME = 1024
_IDENTIFIER_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

Buffer = Union[bytes, bytearray, mmap.mmap]


class _Invalid(Exception):
    """The stream is not a pickle the C unpickler would load (or breaks a bound)."""


class _Truncated(_Invalid):
    """The stream ends in the middle of an opcode."""


@dataclass
class PickleScan:
    """What one pickle would do if loaded: its extent, findings and (if it is invalid) why."""

    start: int
    end: int = 0  # just past STOP; where the scan stopped if `error`
    unsafe: list[str] = field(default_factory=list)  # execution primitives: BN001
    unknown: list[str] = field(default_factory=list)  # other callables outside the allowlist: BN003
    globals_seen: set[str] = field(default_factory=set)
    opcodes: int = 0
    error: str | None = None
    truncated: bool = False


class _Scanner:
    """CPython's C unpickler (Modules/_pickle.c) step for step, over markers instead of objects."""

    def __init__(self, data: Buffer, start: int, stop: int, strict_names: bool) -> None:
        self.data = data
        self.pos = start
        self.stop = stop
        self.strict_names = strict_names
        self.stack: list[_Sym] = []
        self.marks: list[int] = []
        self.memo: dict[int, _Sym] = {}
        # A real pickler numbers memo entries 0, 1, 2...: an index past the pickle's size can only
        # be a request for a huge memo table (the C unpickler allocates up to the index).
        self.memo_limit = max(256, stop - start)
        self.proto = 0
        self.result = PickleScan(start)
        self._unsafe: dict[str, None] = {}
        self._unknown: dict[str, None] = {}

    # -- reading ------------------------------------------------------------------------------

    def take(self, count: int) -> bytes:
        pos = self.pos
        end = pos + count
        if count < 0 or end > self.stop:
            raise _Truncated(f"an opcode at byte {pos} needs {count} bytes, only {self.stop - pos} remain")
        self.pos = end
        return bytes(self.data[pos:end])  # bytes: no copy for bytes input, a slice for an mmap

    def uint(self, count: int) -> int:
        return int.from_bytes(self.take(count), "little")

    def line(self) -> bytes:
        end = self.data.find(b"\n", self.pos, self.stop)
        if end < 0:
            raise _Truncated("a text opcode is missing its end of line")
        chunk = bytes(self.data[self.pos:end])
        self.pos = end + 1
        return chunk

    def name_line(self) -> str:
        try:
            text = self.line().decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid("a global's name is not UTF-8") from None
        if not text:
            raise _Invalid("a global with an empty name")
        if self.strict_names and not _IDENTIFIER_PATH.fullmatch(text):
            raise _Invalid("a global's name is not a dotted identifier")
        return text

    def counted(self, width: int, signed: bool = False) -> bytes:
        size = int.from_bytes(self.take(width), "little", signed=signed)
        if size < 0:
            raise _Invalid("negative byte count")
        return self.take(size)

    # -- stack, as Pdata in _pickle.c -----------------------------------------------------------

    @property
    def fence(self) -> int:
        return self.marks[-1] if self.marks else 0

    def push(self, value: _Sym) -> None:
        self.stack.append(value)

    def pop(self) -> _Sym:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Invalid("unpickling stack underflow")
        return self.stack.pop()

    def top(self) -> _Sym:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Invalid("unpickling stack underflow")
        return self.stack[-1]

    def pop_from(self, start: int) -> list[_Sym]:
        if start < self.fence or start > len(self.stack):
            raise _Invalid("unpickling stack underflow")
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def marker(self) -> int:
        if not self.marks:
            raise _Invalid("could not find MARK")
        return self.marks.pop()

    def target(self, first: int, what: str) -> _Sym:
        """The object that APPENDS/SETITEMS/ADDITEMS fill (do_append/do_setitems' checks)."""
        if first > len(self.stack) or first <= self.fence:
            raise _Invalid("unpickling stack underflow")
        target = self.stack[first - 1]
        if first < len(self.stack):
            self.mutated(target, what)
        return target

    def mutated(self, target: _Sym, what: str) -> None:
        """BUILD/SETITEM/APPEND on a global: it changes a live object of the loading process."""
        for name in _global_names(target):
            self.flag_unsafe(f"{name} [changed by {what}]")

    # -- findings -------------------------------------------------------------------------------

    def flag_unsafe(self, name: str) -> None:
        self._unsafe.setdefault(name)

    def flag_unknown(self, name: str) -> None:
        self._unknown.setdefault(name)

    def global_(self, module: str, name: str) -> _Global:
        self.result.globals_seen.add(f"{module}.{name}")
        if self.proto < 3:  # the C unpickler maps Python 2 names (fix_imports) below protocol 3
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        qualname = f"{module}.{name}"
        self.result.globals_seen.add(qualname)
        if is_primitive(qualname):  # named is enough: importing or fetching it is the first step
            self.flag_unsafe(qualname)
        return _Global(qualname)

    def call(self, callee: _Sym, args: _Sym | None) -> _Sym:
        if isinstance(callee, _Global):
            name = callee.name
            items = args.items if isinstance(args, _Tuple) else None
            names = [a.name if isinstance(a, _Global) else None for a in items] if items is not None else None
            verdict = judge_call(name, names)
            if verdict == "primitive":
                self.flag_unsafe(name)
            elif verdict == "unknown":
                self.flag_unknown(name)
            elif name in READS_ARGUMENTS and items is not None:
                for item in items:
                    for other in _global_names(item):
                        if judge_call(other) == "unknown":
                            self.flag_unknown(f"{other} [read by {name}]")
            elif name in CALLS_ARGUMENTS:
                if items is None:
                    self.flag_unsafe(f"{name} [computed arguments]")
                else:
                    for index in CALLS_ARGUMENTS[name]:
                        if index < len(items) and isinstance(items[index], (_Global, _Made)):
                            self.call(items[index], None)
            return _Made(name)
        if isinstance(callee, _Persistent):
            for option in callee.globals:
                self.call(option, args)
            return _Made(callee.globals[0].name if callee.globals else None)
        if isinstance(callee, _Made):  # calls what a call returned: `getattr(...)(...)`
            made = f"{callee.origin or '?'}(...)"
            made = made if len(made) <= 200 else callee.origin or "?"  # chains stay short
            self.flag_unsafe(f"{made}(...)")
            return _Made(made)
        return _Made(None)  # a number, string or container: not callable, nothing runs

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> PickleScan:
        result = self.result
        data, stop, table, stack, marks, memo = self.data, self.stop, _TABLE, self.stack, self.marks, self.memo
        push = stack.append
        count = 0
        try:
            while True:
                pos = self.pos
                if pos >= stop:
                    raise _Truncated("the pickle ends without a STOP opcode")
                code = data[pos]
                count += 1
                # The commonest opcodes of torch pickles inline (same checks as their handlers).
                if code == 0x72 and pos + 5 <= stop:  # LONG_BINPUT
                    index = int.from_bytes(data[pos + 1:pos + 5], "little")
                    if len(stack) <= (marks[-1] if marks else 0) or index >= self.memo_limit:
                        self.pos = pos + 1
                        _op_long_binput(self)  # raises with the right message
                    memo[index] = stack[-1]
                    self.pos = pos + 5
                    continue
                if code in _PUSHES_DATA:
                    push(_DATA)
                    self.pos = pos + _PUSHES_DATA[code]
                    if self.pos > stop:
                        raise _Truncated("the pickle ends inside an opcode")
                    continue
                if code == 0x28:  # MARK
                    marks.append(len(stack))
                    self.pos = pos + 1
                    continue
                self.pos = pos + 1
                handler = table[code]
                if handler is None:
                    raise _Invalid(f"invalid opcode 0x{code:02x} at byte {pos}")
                if handler(self):
                    break
        except _Invalid as exc:
            result.error = str(exc)
            result.truncated = isinstance(exc, _Truncated)
        except (ValueError, OverflowError, UnicodeDecodeError) as exc:
            result.error = f"malformed opcode argument before byte {self.pos} ({exc})"
        result.opcodes = count
        result.end = self.pos
        result.unsafe = list(self._unsafe)
        result.unknown = [name for name in self._unknown if name not in self._unsafe]
        return result


def _int_text(text: bytes, base: int = 0) -> int:
    digits = text.strip()
    if digits.endswith(b"L"):
        digits = digits[:-1]
    try:
        return int(digits, base)
    except ValueError:
        return int(digits, 10)  # strtol base 0 reads leading zeros as octal; any number will do here


def _op_stop(s: _Scanner) -> bool:
    s.pop()
    return True


def _op_mark(s: _Scanner) -> None:
    s.marks.append(len(s.stack))  # a memo value of None never exists: _get's .get() relies on it


def _op_pop(s: _Scanner) -> None:
    if s.marks and s.marks[-1] == len(s.stack):
        s.marks.pop()
    else:
        s.pop()


def _op_pop_mark(s: _Scanner) -> None:
    del s.stack[s.marker():]


def _op_dup(s: _Scanner) -> None:
    s.push(s.top())


def _push_data(s: _Scanner) -> None:
    s.stack.append(_DATA)


def _fixed(width: int) -> Callable[[_Scanner], None]:
    def handler(s: _Scanner) -> None:
        if s.pos + width > s.stop:
            raise _Truncated("the pickle ends inside an opcode")
        s.pos += width
        s.stack.append(_DATA)
    return handler


def _counted(width: int, signed: bool = False, text: bool = False, utf8: bool = True) -> Callable[[_Scanner], None]:
    def handler(s: _Scanner) -> None:
        raw = s.counted(width, signed)
        if not text:
            s.push(_DATA)
            return
        decoded = raw.decode("utf-8", "surrogatepass") if utf8 else raw.decode("latin-1")
        s.push(_Str(decoded if len(decoded) <= _MAX_NAME else None))
    return handler


def _op_int(s: _Scanner) -> None:
    text = s.line()
    if text not in (b"00", b"01"):
        _int_text(text)
    s.push(_DATA)


def _op_long(s: _Scanner) -> None:
    _int_text(s.line())
    s.push(_DATA)


def _op_float(s: _Scanner) -> None:
    float(s.line())
    s.push(_DATA)


def _op_string(s: _Scanner) -> None:
    text = s.line()
    if len(text) < 2 or text[0] != text[-1] or text[:1] not in (b"'", b'"'):
        raise _Invalid("the STRING opcode argument must be quoted")
    decoded = codecs.escape_decode(text[1:-1])[0].decode("latin-1")
    s.push(_Str(decoded if len(decoded) <= _MAX_NAME else None))


def _op_unicode(s: _Scanner) -> None:
    decoded = s.line().decode("raw-unicode-escape")
    s.push(_Str(decoded if len(decoded) <= _MAX_NAME else None))


def _global_names(value: _Sym) -> list[str]:
    if isinstance(value, _Global):
        return [value.name]
    if isinstance(value, _Persistent):
        return [g.name for g in value.globals]
    return []


def _op_persid(s: _Scanner) -> None:
    s.line().decode("ascii")
    s.push(_Persistent(_DATA))


def _op_binpersid(s: _Scanner) -> None:
    s.push(_Persistent(s.pop()))


def _op_reduce(s: _Scanner) -> None:
    args = s.pop()
    callee = s.pop()
    s.push(s.call(callee, args))


def _op_build(s: _Scanner) -> None:
    if len(s.stack) - 2 < s.fence:
        raise _Invalid("unpickling stack underflow")
    s.pop()
    s.mutated(s.stack[-1], "BUILD")


def _op_global(s: _Scanner) -> None:
    module = s.name_line()
    name = s.name_line()
    s.push(s.global_(module, name))


def _op_stack_global(s: _Scanner) -> None:
    name = s.pop()
    module = s.pop()
    if isinstance(module, _Str) and isinstance(name, _Str) and module.text is not None and name.text is not None:
        s.push(s.global_(module.text, name.text))
    elif isinstance(module, (_Made, _Global, _Persistent)) or isinstance(name, (_Made, _Global, _Persistent)):
        s.flag_unsafe("<STACK_GLOBAL with a computed name>")
        s.push(_Global("<computed global>"))
    else:
        raise _Invalid("STACK_GLOBAL requires two names")


def _op_inst(s: _Scanner) -> None:
    module = s.name_line()
    name = s.name_line()
    args = s.pop_from(s.marker())
    s.push(s.call(s.global_(module, name), _Tuple(args)))


def _op_obj(s: _Scanner) -> None:
    first = s.marker()
    if len(s.stack) - first < 1:
        raise _Invalid("unpickling stack underflow")
    args = s.pop_from(first + 1)
    cls = s.pop()
    s.push(s.call(cls, _Tuple(args)))


def _op_newobj(s: _Scanner) -> None:
    args = s.pop()
    cls = s.pop()
    s.push(s.call(cls, args))


def _op_newobj_ex(s: _Scanner) -> None:
    s.pop()  # kwargs
    args = s.pop()
    cls = s.pop()
    s.push(s.call(cls, args))


def _op_dict(s: _Scanner) -> None:
    first = s.marker()
    if (len(s.stack) - first) % 2:
        raise _Invalid("odd number of items for DICT")
    s.pop_from(first)
    s.push(_DATA)


def _op_list_or_frozenset(s: _Scanner) -> None:
    s.pop_from(s.marker())
    s.push(_DATA)


def _op_tuple(s: _Scanner) -> None:
    s.push(_Tuple(s.pop_from(s.marker())))


def _counted_tuple(size: int) -> Callable[[_Scanner], None]:
    def handler(s: _Scanner) -> None:
        if len(s.stack) < size:
            raise _Invalid("unpickling stack underflow")
        s.push(_Tuple(s.pop_from(len(s.stack) - size)))
    return handler


def _op_append(s: _Scanner) -> None:
    if len(s.stack) - 1 <= s.fence:
        raise _Invalid("unpickling stack underflow")
    s.target(len(s.stack) - 1, "APPEND")
    s.stack.pop()


def _op_appends(s: _Scanner) -> None:
    first = s.marker()
    s.target(first, "APPENDS")
    del s.stack[first:]


def _op_setitem(s: _Scanner) -> None:
    s.target(len(s.stack) - 2, "SETITEM")
    del s.stack[len(s.stack) - 2:]


def _op_setitems(s: _Scanner) -> None:
    first = s.marker()
    s.target(first, "SETITEMS")
    if (len(s.stack) - first) % 2:
        raise _Invalid("odd number of items for SETITEMS")
    del s.stack[first:]


def _op_additems(s: _Scanner) -> None:
    first = s.marker()
    s.target(first, "ADDITEMS")
    del s.stack[first:]


def _get(index: int, s: _Scanner) -> None:
    if index not in s.memo:
        raise _Invalid(f"memo value not found at index {index}")
    s.push(s.memo[index])


def _put(index: int, s: _Scanner) -> None:
    if len(s.stack) <= (s.marks[-1] if s.marks else 0):
        raise _Invalid("unpickling stack underflow")
    value = s.stack[-1]
    if index < 0:
        raise _Invalid("negative PUT argument")
    if index >= s.memo_limit:
        raise _Invalid(f"memo index {index} is larger than the pickle (a request for a huge memo table)")
    s.memo[index] = value


def _op_get(s: _Scanner) -> None:
    _get(int(s.line(), 10), s)


def _op_put(s: _Scanner) -> None:
    _put(int(s.line(), 10), s)


def _op_memoize(s: _Scanner) -> None:
    _put(len(s.memo), s)


def _op_proto(s: _Scanner) -> None:
    version = s.uint(1)
    if version > 5:
        raise _Invalid(f"unsupported pickle protocol {version}")
    s.proto = version


def _op_frame(s: _Scanner) -> None:
    size = s.uint(8)
    if size > s.stop - s.pos:
        raise _Truncated(f"a frame of {size} bytes is larger than what remains of the file")


def _op_ext(width: int) -> Callable[[_Scanner], None]:
    def handler(s: _Scanner) -> None:
        code = int.from_bytes(s.take(width), "little", signed=width == 4)
        if code <= 0:
            raise _Invalid("EXT specifies code <= 0")
        s.push(_Global(f"<copyreg extension {code}>"))
    return handler


def _op_next_buffer(s: _Scanner) -> None:
    raise _Invalid("out-of-band buffer (NEXT_BUFFER) without buffers")


def _op_readonly_buffer(s: _Scanner) -> None:
    s.top()


# Hand-inlined versions of the most frequent opcodes in torch pickles (memo traffic and short
# strings are most of a checkpoint's data.pkl): same checks, fewer calls.


def _op_binput(s: _Scanner) -> None:
    pos = s.pos
    if pos >= s.stop:
        raise _Truncated("the pickle ends inside BINPUT")
    s.pos = pos + 1
    if len(s.stack) <= (s.marks[-1] if s.marks else 0):
        raise _Invalid("unpickling stack underflow")
    s.memo[s.data[pos]] = s.stack[-1]


def _op_binget(s: _Scanner) -> None:
    pos = s.pos
    if pos >= s.stop:
        raise _Truncated("the pickle ends inside BINGET")
    s.pos = pos + 1
    value = s.memo.get(s.data[pos])
    if value is None:
        raise _Invalid(f"memo value not found at index {s.data[pos]}")
    s.stack.append(value)


def _op_long_binput(s: _Scanner) -> None:
    _put(s.uint(4), s)


def _op_long_binget(s: _Scanner) -> None:
    _get(s.uint(4), s)


def _op_short_binunicode(s: _Scanner) -> None:
    pos = s.pos
    if pos >= s.stop:
        raise _Truncated("the pickle ends inside SHORT_BINUNICODE")
    end = pos + 1 + s.data[pos]
    if end > s.stop:
        raise _Truncated("a string runs past the end of the pickle")
    s.pos = end
    s.stack.append(_Str(bytes(s.data[pos + 1:end]).decode("utf-8", "surrogatepass")))


def _op_binunicode(s: _Scanner) -> None:
    pos = s.pos
    if pos + 4 > s.stop:
        raise _Truncated("the pickle ends inside BINUNICODE")
    end = pos + 4 + int.from_bytes(s.data[pos:pos + 4], "little")
    if end > s.stop:
        raise _Truncated(f"a string of {end - pos - 4} bytes runs past the end of the pickle")
    s.pos = end
    text = bytes(s.data[pos + 4:end]).decode("utf-8", "surrogatepass")
    s.stack.append(_Str(text if len(text) <= _MAX_NAME else None))


def _op_empty_tuple(s: _Scanner) -> None:
    s.stack.append(_Tuple([]))


_HANDLERS: dict[int, Callable[[_Scanner], Any]] = {
    ord(k): v for k, v in {
        "(": _op_mark, ".": _op_stop, "0": _op_pop, "1": _op_pop_mark, "2": _op_dup, "F": _op_float, "I": _op_int,
        "J": _fixed(4), "K": _fixed(1), "L": _op_long, "M": _fixed(2), "N": _push_data, "P": _op_persid,
        "Q": _op_binpersid, "R": _op_reduce, "S": _op_string, "T": _counted(4, signed=True, text=True, utf8=False),
        "U": _counted(1, text=True, utf8=False), "V": _op_unicode, "X": _op_binunicode, "a": _op_append,
        "b": _op_build, "c": _op_global, "d": _op_dict, "}": _push_data, "e": _op_appends,
        "g": _op_get, "h": _op_binget, "i": _op_inst, "j": _op_long_binget,
        "l": _op_list_or_frozenset, "]": _push_data, "o": _op_obj, "p": _op_put, "q": _op_binput,
        "r": _op_long_binput, "s": _op_setitem, "t": _op_tuple, ")": _op_empty_tuple,
        "u": _op_setitems, "G": _fixed(8), "\x80": _op_proto, "\x81": _op_newobj, "\x82": _op_ext(1),
        "\x83": _op_ext(2), "\x84": _op_ext(4), "\x85": _counted_tuple(1), "\x86": _counted_tuple(2),
        "\x87": _counted_tuple(3), "\x88": _push_data, "\x89": _push_data, "\x8a": _counted(1),
        "\x8b": _counted(4, signed=True), "B": _counted(4), "C": _counted(1), "\x8c": _op_short_binunicode,
        "\x8d": _counted(8, text=True), "\x8e": _counted(8), "\x8f": _push_data, "\x90": _op_additems,
        "\x91": _op_list_or_frozenset, "\x92": _op_newobj_ex, "\x93": _op_stack_global, "\x94": _op_memoize,
        "\x95": _op_frame, "\x96": _counted(8), "\x97": _op_next_buffer, "\x98": _op_readonly_buffer,
    }.items()
}


_TABLE: list[Callable[[_Scanner], Any] | None] = [_HANDLERS.get(code) for code in range(256)]
# Opcodes that push a plain value: their total length (opcode + fixed argument).
_PUSHES_DATA: dict[int, int] = {ord("N"): 1, 0x88: 1, 0x89: 1, ord("}"): 1, ord("]"): 1, 0x8F: 1, ord("K"): 2, ord("M"): 3,
                                ord("J"): 5, ord("G"): 9}


def scan_pickle(data: Buffer, start: int = 0, stop: int | None = None, *, strict_names: bool = False) -> PickleScan:
    """Walk one pickle starting at `start` (nothing is built, imported or called).

    Work and memory are linear in the bytes walked; `error` says why the stream is not a pickle the
    unpickler would load, and `unsafe`/`unknown` hold what was found up to that point.
    """
    end = len(data) if stop is None else min(stop, len(data))
    return _Scanner(data, start, end, strict_names).run()


def looks_like_pickle(head: bytes, window_full: bool = False) -> bool:
    """Whether a file's first bytes are a pickle stream (protocol 0/1 has no PROTO header).

    Text rarely survives this: every byte must be an opcode with a well-formed argument, names
    must be dotted identifiers and the stack must balance, up to STOP or, for a long pickle, to
    the end of a full read window.
    """
    if not head or head[0] not in _HANDLERS:
        return False
    scan = scan_pickle(head, strict_names=True)
    if scan.error is None:
        return scan.opcodes >= 2
    return scan.truncated and window_full and scan.opcodes >= 64


@dataclass
class PickleFindings:
    """What the scans of every pickle in one file found (names kept once, in order)."""

    unsafe: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def add(self, scan: PickleScan) -> None:
        self.add_names(scan.unsafe, scan.unknown)

    def add_names(self, unsafe: list[str], unknown: list[str]) -> None:
        self.unsafe.extend(n for n in unsafe if n not in self.unsafe)
        self.unknown.extend(n for n in unknown if n not in self.unknown and n not in self.unsafe)
        self.unknown = [n for n in self.unknown if n not in self.unsafe]

    def __bool__(self) -> bool:
        return bool(self.unsafe or self.unknown)

    def error(self, path: str, problem: str) -> InputError:
        """The error to raise for an unreadable file: it keeps the findings if there are any."""
        if self:
            return UnsafeInputError(path, problem, self.unsafe, self.unknown)
        return InputError(path, problem)

    def wrap(self, exc: InputError) -> InputError:
        if not self or isinstance(exc, UnsafeInputError):
            return exc
        wrapped = UnsafeInputError(exc.path, exc.problem, self.unsafe, self.unknown)
        return wrapped


# =============================================================================================
# Pass 2: building objects (never importing)


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


def _safe_set(items: Any = ()) -> set[Any]:
    if not isinstance(items, (list, tuple, set, frozenset)):
        return set()
    _charge(len(items))
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
        return tuple(args[0])
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


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class never imports and whose persistent ids go to a callback."""

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, persistent: Callable[[Any], Any] | None = None) -> None:
        # latin1: Python 2 `str` payloads decode without error (they only name things here).
        super().__init__(file, encoding="latin1")
        self._persistent = persistent
        self.globals_seen: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        # Protocol <= 2 pickles written by Python 3 name Python 2 modules (__builtin__, commands
        # for subprocess...): map them back like pickle's own find_class (a table, no import).
        self.globals_seen.add(f"{module}.{name}")
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        self.globals_seen.add(f"{module}.{name}")
        return resolve_global(module, name)

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
        raise BadPickle(f"unexpected persistent id type {str(typename)[:40]!r}")
    storage_type, key, location, numel = pid[1:5]
    if not isinstance(storage_type, StorageType):
        raise BadPickle(f"unknown storage type {stub_name(storage_type) or type(storage_type).__name__}")
    if not isinstance(numel, int) or numel < 0 or numel > 1 << 48:
        raise BadPickle("storage size is not a sane non-negative int")
    if not isinstance(key, (str, bytes, int)) or len(str(key)) > 256:
        raise BadPickle("storage key is not a short name")
    storage = make_source(str(key), storage_type.dtype, numel)
    if isinstance(location, bytes):
        location = location.decode("ascii", "replace")
    storage.location = str(location)[:64]
    return storage


def safe_load(data: Buffer, persistent: Callable[[Any], Any] | None = None, scan: PickleScan | None = None) -> tuple[Any, PickleScan]:
    """Scan, then unpickle one pickle safely: (object, scan). Raises BadPickle / pickle errors.

    `scan` (of the same buffer) saves scanning twice; the pickle is `data[scan.start:scan.end]`.
    """
    scan = scan if scan is not None else scan_pickle(data)
    if scan.error is not None:
        raise BadPickle(scan.error)
    body = bytes(data[scan.start:scan.end])
    unpickler = SafeUnpickler(io.BytesIO(body), persistent)
    token = _EXPANSION.set([4 * len(body) + 1_000_000])
    try:
        obj = unpickler.load()
    finally:
        _EXPANSION.reset(token)
    # The scan and the C unpickler must agree on what the stream names; a global only the latter
    # saw means the two parsers read different streams, so judge it now.
    for name in sorted(unpickler.globals_seen - scan.globals_seen):
        verdict = judge_call(name)
        if verdict == "primitive" and name not in scan.unsafe:
            scan.unsafe.append(name)
        elif verdict == "unknown" and name not in scan.unknown:
            scan.unknown.append(name)
    return obj, scan


PICKLE_ERRORS = (pickle.UnpicklingError, BadPickle, EOFError, ValueError, TypeError, AttributeError,
                 KeyError, IndexError, RecursionError, MemoryError, struct.error, UnicodeDecodeError, OverflowError)
