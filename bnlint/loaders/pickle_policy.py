"""What loading a pickle may call: the allowlist, the execution primitives, and the verdict on one global.

The scan (`pickle_scan`) and the entry point (`safe_pickle.safe_load`) ask `judge_call` about
every global a pickle would call, and `is_primitive` about every global it merely names. The
answer is one of three verdicts:

- "allowed": a tensor rebuilder or a data-only class, named EXACTLY (`ALLOWED_CALLABLES`, the
  generated table `pickle_allowlist.GENERATED_CLASSES`, TorchScript's own `__torch__` classes), or
  a `CONDITIONAL` entry whose arguments pass its check. A dotted name (an attribute walk from the
  module, which protocol 4 unpicklers follow) is never allowed;
- "primitive": a global that runs code, touches files, processes or the network, imports, or
  calls what it is given (`PRIMITIVE_MODULES`, `PRIMITIVE_NAMES`, dunder attribute paths):
  errors, BN001, reported even when only referenced;
- "unknown": anything else: warnings, BN003.

This is policy only (tables and pure functions over qualified names, no pickle parsing), kept
apart so that a reviewer can read and change what is trusted without reading the opcode walker.

How to extend the allowlist: add a qualified name to `ALLOWED_CALLABLES` (a class enumerable from
the installed torch goes in scripts/make_pickle_allowlist.py instead), with the reason, only for callables whose reconstruction arranges data and
calls nothing it is given. A callable that instantiates or calls some of its arguments also goes
in `CALLS_ARGUMENTS` so that those arguments are judged too; one that iterates or converts its
arguments goes in `READS_ARGUMENTS`; one that is safe only with certain arguments goes in
`CONDITIONAL` with a check. If the object the pickle builds for it matters to the loaders, add a
data-only builder in `pickle_stubs.BUILDERS` (otherwise it becomes an inert stub). Never
allowlist anything that imports, evaluates, opens files or processes, or calls its arguments.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Literal

from bnlint.loaders.pickle_allowlist import GENERATED_CLASSES

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

# Every exact name allowed: the hand-picked callables above and the classes enumerated from the
# installed torch/numpy by scripts/make_pickle_allowlist.py (nn.Module subclasses of
# torch.nn.modules.*, legacy typed storages and tensor types, numpy dtype classes).
ALLOWED_NAMES: frozenset[str] = ALLOWED_CALLABLES | GENERATED_CLASSES

# TorchScript classes (`__torch__.<module path>.Name`): defined by the archive's own code/, which
# torch.jit.load compiles instead of importing; torch.load cannot import them at all. The only
# pattern left: every other global must be listed exactly.
ALLOWED_PATTERNS: tuple[re.Pattern[str], ...] = (re.compile(r"__torch__(\.\w+)+"),)

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
    # classes whose construction opens files, starts threads/processes or runs a program, wherever
    # a module re-exports them (`from io import FileIO`)
    "FileIO", "BufferedWriter", "BufferedRandom", "BufferedReader", "TextIOWrapper", "open_code", "TestProgram",
    "TextTestRunner", "FileHandler", "RotatingFileHandler", "TimedRotatingFileHandler", "WatchedFileHandler",
    "SocketHandler", "DatagramHandler", "SysLogHandler", "SMTPHandler", "HTTPHandler", "QueueListener",
    "ZipFile", "PyZipFile", "TarFile", "Thread", "Process", "ThreadPoolExecutor", "ProcessPoolExecutor",
    "ThreadPool", "TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "TemporaryDirectory",
    "mkstemp", "mkdtemp", "Unpickler", "Pickler", "CDLL", "PyDLL", "LoadLibrary", "dlopen",
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


@lru_cache(maxsize=8192)
def walk_reaches_primitive(path: str) -> bool:
    """Whether an attribute walk (a global's dotted name: `unittest.TestProgram` fetched from some
    module that imported unittest) passes through an execution primitive's module or name."""
    parts = path.split(".")
    # PRIMITIVE_MODULES entries have at most three components: windows of 1-3 parts, linear.
    return any(".".join(parts[i:i + width]) in PRIMITIVE_MODULES for i in range(len(parts)) for width in (1, 2, 3)) \
        or is_primitive(path)


def is_walk(name: str) -> bool:
    """A global's name with a dot is an attribute walk from its module (protocol 4 unpicklers follow
    it), never a plain class: it is never allowed, whatever the names it joins to."""
    return "." in name


def _allowed(qualname: str) -> bool:
    return qualname in ALLOWED_NAMES or (qualname.startswith("__torch__.") and ALLOWED_PATTERNS[0].fullmatch(qualname) is not None)


def judge_call(qualname: str, args: list[str | None] | None = None, walk: str | None = None) -> Verdict:
    """Whether calling `qualname` (with arguments naming these globals, None for other values;
    `args` None when unknown) is allowed, an execution primitive, or unknown code. `walk` is the
    global's name when it holds a dot (an attribute walk): never allowed."""
    if walk is not None:
        return "primitive" if is_primitive(qualname) or walk_reaches_primitive(walk) else "unknown"
    condition = CONDITIONAL.get(qualname)
    if condition is not None:
        return "allowed" if condition(args) else "unknown"
    if qualname in ALLOWED_CALLABLES:
        return "allowed"
    if is_primitive(qualname):
        return "primitive"
    return "allowed" if _allowed(qualname) else "unknown"
