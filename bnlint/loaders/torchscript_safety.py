"""Is it safe to run this TorchScript archive? Its `code/` text, read before torch.jit.load.

Running a model is running code: TorchScript can call `torch.save`, `torch.from_file` and
`print`, and a scripted `__setstate__` runs inside `torch.jit.load` itself. Two checks guard a run
(for --data and `bnlint fix`) without --trust:

1. This module, on the text (static, no torch import). Loading must run nothing from the archive:
   a class hook that `torch.jit.load` (or `torch.jit.save`) calls is refused (`LOAD_HOOKS`). The
   rest of the scan is CONSERVATIVE: what it cannot positively recognise as tensor computation is
   reported (rule BN004): `getattr`/`setattr`/`hasattr` on an op namespace or with a computed name,
   a namespace (`torch`, `ops`, `math`) used as a value or bound to a local name (`x = torch`),
   operators outside `pure_kind`, imports, `print`, `fork`, file functions, unknown builtins, calls
   of computed values. The archive's spelling cannot be trusted (TorchScript recompiles this text
   on load, and `getattr(torch, "save")` compiles to `aten::save`), so this is a first filter.
2. `bnlint.dynamic.torchscript_ir`, on the compiled graph after the (hook-free) load: every node
   kind of every method and hook must pass `pure_kind`. Whatever the spelling, that is what runs.

`pure_kind` is shared by both and documents why each allowed family is pure. The code is parsed
with `ast` and never compiled or run here.
"""

from __future__ import annotations

import ast
import zipfile
from pathlib import Path

from bnlint.errors import InputError

# Methods torch.jit.load runs while unpickling (`__setstate__`), or torch.jit.save (`__getstate__`),
# and Python object hooks that have no business in a model: a class defining one needs --trust.
LOAD_HOOKS = frozenset({"__setstate__", "__getstate__", "__reduce__", "__reduce_ex__", "__new__", "__del__",
                        "__init_subclass__", "__set_name__", "__class_getitem__"})

# ATen operators that are not tensor computation: files (save, from_file; `load` is not an op but
# is refused by name), the console (_print), process-global state (the RNG seed), futures of
# forked work (wait), and internal ops that skip the bounds or invariant checks which keep
# indexing inside a tensor's memory (_unsafe_index*, _reshape_alias, set_, nested/sparse views
# built from raw offsets). aten::warn stays allowed: it raises a Python warning (the caller's
# filters decide where it goes), and torch.nn.functional uses it in healthy models.
ATEN_DENIED = frozenset({
    "save", "from_file", "load", "_print", "manual_seed", "seed", "wait", "record_stream", "set", "set_", "set_data",
    "_reshape_alias", "_reshape_alias_copy", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put",
    "_unsafe_masked_index", "_unsafe_masked_index_put_accumulate",
})
ATEN_DENIED_PREFIXES = ("_nested_view_from", "_test_", "_sparse_")
# prim:: nodes that are structure or value plumbing, never I/O: constants, attribute reads and
# writes on the module tree, tuple/list/dict building and unpacking, If/Loop, calls of the
# archive's own methods and functions (the IR walk inlines them and checks their bodies),
# exceptions (which end the run), type refinements, placeholders for values defined on one branch
# only (Uninitialized), scalar/tensor conversions and tensor property reads. Not allowed:
# Print, PythonOp (Python callbacks), fork/awaitable/rpc_* (other threads and hosts), Enter/Exit
# (context managers run arbitrary __enter__), profiling/JIT-internal nodes (never serialised).
PRIM_ALLOWED = frozenset({
    "Constant", "GetAttr", "SetAttr", "ListConstruct", "ListUnpack", "TupleConstruct", "TupleUnpack", "TupleIndex",
    "TupleSlice", "DictConstruct", "DictIndex", "If", "Loop", "CallMethod", "CallFunction", "RaiseException",
    "unchecked_cast", "unchecked_unwrap_optional", "Uninitialized", "NumToTensor", "ImplicitTensorToNum",
    "isinstance", "CreateObject", "EnumName", "EnumValue", "StringIndex", "index", "tolist", "rangelist", "min", "max",
    "abs", "device", "dtype", "layout", "requires_grad", "data", "grad", "name", "itemsize", "nbytes", "type", "id",
    "shape", "ConstantChunk", "BroadcastSizes", "AutogradZero", "AutogradAdd", "AutogradAnyNonZero",
    "AutogradAllZero", "AutogradAllNonZero", "is_cpu", "is_cuda", "is_ipu", "is_maia", "is_meta", "is_mkldnn",
    "is_mps", "is_mtia", "is_nested", "is_quantized", "is_sparse", "is_sparse_csr", "is_vulkan", "is_xla", "is_xpu",
})
# Names the TorchScript compiler resolves to op namespaces: `torch.x` and `math.x` are aten::x,
# `ops.ns.x` is ns::x. Used as anything but the head of a call, they hide what is called.
NAMESPACE_ROOTS = frozenset({"torch", "ops", "math"})
# Builtins TorchScript knows that compute (getattr/hasattr/setattr are judged separately).
BUILTINS = frozenset({
    "annotate", "unchecked_cast", "uninitialized", "isinstance", "len", "range", "int", "float", "bool", "str", "list",
    "dict", "tuple", "min", "max", "abs", "round", "enumerate", "zip", "divmod", "ord", "chr", "hash", "sorted",
    "reversed", "any", "all", "sum", "complex", "bin", "hex", "oct", "__range_length", "__derive_index",
})
ATTRIBUTE_BUILTINS = frozenset({"getattr", "hasattr", "setattr"})
MAX_CODE_BYTES = 32 << 20


def pure_kind(kind: str) -> bool:
    """Whether an operator (`aten::add`, `prim::Print`) is pure tensor computation or control flow.

    aten: the tensor library's operators compute on tensors and scalars (and TorchScript's list,
    dict and string builtins live there too), except `ATEN_DENIED`. quantized: quantized kernels,
    tensors in and out. prim: only `PRIM_ALLOWED`. Every other namespace (`prims`, `c10d`,
    `profiler`, an extension's `foo::bar`, ...) is code bnlint cannot vouch for.
    """
    namespace, _, name = kind.partition("::")
    if not name or "." in name:
        return False
    if namespace == "aten":
        return name not in ATEN_DENIED and not name.startswith(ATEN_DENIED_PREFIXES)
    if namespace == "prim":
        return name in PRIM_ALLOWED
    return namespace == "quantized"


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _op_kind(name: str) -> str | None:
    """`torch.add` -> `aten::add`, `ops.prim.Print` -> `prim::Print`; None for other spellings."""
    parts = name.split(".")
    if parts[0] in ("torch", "math") and len(parts) == 2:
        return f"aten::{parts[1]}"
    if parts[0] == "ops" and len(parts) == 3:
        return f"{parts[1]}::{parts[2]}"
    return None


def _is_namespace(node: ast.AST) -> bool:
    """`torch`, `ops.aten`, `torch.ops` ...: an expression rooted at an op namespace."""
    name = _dotted(node)
    return name is not None and name.split(".", 1)[0] in NAMESPACE_ROOTS


class _Scan(ast.NodeVisitor):
    """Collects what one code file may not run without --trust."""

    def __init__(self, member: str, found: set[str]) -> None:
        self.member = member
        self.found = found
        self.defined: set[str] = set()  # names assigned, defined or bound as parameters in this file

    def report(self, what: str, node: ast.AST) -> None:
        self.found.add(f"{what} ({self.member}:{getattr(node, 'lineno', 0)})")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name in LOAD_HOOKS:
            self.report(f"{node.name} (runs inside torch.jit.load or save)", node)
        for stmt in node.body:  # annotations and defaults are types and literals, never run
            self.visit(stmt)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self.report("async def", node)

    def visit_Import(self, node: ast.Import) -> None:
        self.report(f"import {', '.join(alias.name for alias in node.names)}", node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.report(f"from {node.module} import {', '.join(alias.name for alias in node.names)}", node)

    def generic_visit(self, node: ast.AST) -> None:
        # `with` is not here: TorchScript's context managers are classes compiled from the archive's
        # own code (`with torch.no_grad():` serialises grad_mode.no_grad beside the model), whose
        # __enter__/__exit__ this scan reads like every other method. The graph gate still refuses
        # prim::Enter before a run without --trust, because it cannot walk those methods' graphs.
        if isinstance(node, (ast.Lambda, ast.Global, ast.Nonlocal, ast.AsyncWith, ast.Await, ast.Yield,
                             ast.YieldFrom, ast.NamedExpr)):
            self.report(type(node).__name__.lower(), node)  # nothing TorchScript serialises for a model
        super().generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:  # `eps : Final[float] = 1e-05`: the annotation is a type
            self.visit(node.value)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = _dotted(func)
        if name in ATTRIBUTE_BUILTINS:
            self._attribute_builtin(name, node)
            return
        if name is not None and name.split(".", 1)[0] in NAMESPACE_ROOTS:
            kind = _op_kind(name)
            if kind is None or not pure_kind(kind):
                self.report(name, node)
            for arg in (*node.args, *(k.value for k in node.keywords)):
                self.visit(arg)
            return  # the namespace is the head of a call here, not a value
        elif isinstance(func, ast.Name):
            if func.id not in BUILTINS and func.id not in self.defined:
                self.report(func.id, node)  # print, open, fork, rpc_async, exec, ... and unknown names
        elif name is not None and name.startswith("__torch__.torch.classes."):
            self.report(name, node)  # a C++ class registered by an extension
        elif not isinstance(func, (ast.Attribute, ast.Call, ast.Subscript)):
            self.report("call of a computed value", node)
        self.generic_visit(node)

    def _attribute_builtin(self, name: str, node: ast.Call) -> None:
        target = node.args[0] if node.args else None
        key = node.args[1] if len(node.args) > 1 else None
        if target is None or _is_namespace(target):
            self.report(f"{name}({_dotted(target) if target is not None else ''}, ...)", node)
        elif not (isinstance(key, ast.Constant) and isinstance(key.value, str)) or node.keywords:
            self.report(f"{name} with a computed attribute name", node)
        for arg in node.args[1:]:
            self.visit(arg)
        if target is not None and not _is_namespace(target):
            self.visit(target)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _is_namespace(node):
            self.report(f"{_dotted(node)} used as a value", node)  # `f = torch.save`, `g(ops.aten)`
        else:
            self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in NAMESPACE_ROOTS:
            self.report(f"{node.id} used as a value", node)  # `x = torch` then `x.save(...)`


def _defined_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)  # calls through such a name are judged at its assignment
    return names - NAMESPACE_ROOTS - ATTRIBUTE_BUILTINS


def _parse(member: str, text: str, found: set[str]) -> ast.Module | None:
    try:
        return ast.parse(text, filename=member)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        found.add(f"code that does not parse ({member})")  # then nothing about it can be vouched for
        return None


def load_time_hooks(sources: dict[str, str]) -> list[str]:
    """`hook (file:line)` for every class hook torch.jit.load would run (and unparsable code), sorted."""
    found: set[str] = set()
    for member, text in sources.items():
        tree = _parse(member, text, found)
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in LOAD_HOOKS:
                found.add(f"{node.name} (runs inside torch.jit.load or save) ({member}:{node.lineno})")
    return sorted(found)


def unsafe_operations(sources: dict[str, str]) -> list[str]:
    """`op (file:line)` for everything in the code not recognised as tensor computation, sorted."""
    found: set[str] = set()
    for member, text in sources.items():
        tree = _parse(member, text, found)
        if tree is None:
            continue
        scan = _Scan(member, found)
        scan.defined = _defined_names(tree)
        try:
            scan.visit(tree)
        except RecursionError:
            found.add(f"code nested too deeply to read ({member})")
    return sorted(found)


def torchscript_sources(path: str | Path) -> dict[str, str]:
    """Every `code/**.py` member of a TorchScript archive, as text (bounded)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [info for info in archive.infolist() if "/code/" in f"/{info.filename}" and info.filename.endswith(".py")]
            if sum(info.file_size for info in members) > MAX_CODE_BYTES:
                raise InputError(str(path), f"TorchScript code over {MAX_CODE_BYTES >> 20} MiB: refused")
            return {info.filename: archive.read(info).decode("utf-8", "replace") for info in members}
    except (zipfile.BadZipFile, OSError, KeyError, RuntimeError) as exc:
        raise InputError(str(path), f"cannot read the TorchScript code ({exc})") from None
