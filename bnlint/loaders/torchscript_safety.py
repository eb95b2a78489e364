"""Is it safe to run this TorchScript archive? Read its code as text and decide before torch.jit.load.

Running a model is running code: TorchScript can call `torch.save`, `torch.load`, `torch.from_file`
and `print`, and a scripted `__setstate__` runs inside `torch.jit.load` itself. bnlint runs a
TorchScript file for --data (and for `bnlint fix`) only when every method of every class in its
`code/` folder uses nothing but tensor computation, or when the user passes --trust.

The code is parsed with `ast` (TorchScript serialises Python syntax) and never compiled or run.
What is allowed:
- calls of functions and methods of the archive itself (`__torch__.*` names, `self.*`, values),
  which are checked in turn as part of the same code;
- `torch.*` and `ops.aten.*` / `ops.prim.*` / `ops.quantized.*` operators, except those that touch
  files, processes or the console (`DENIED`), and the builtins TorchScript knows that compute
  (`len`, `range`, `int`, ... in `BUILTINS`);
- methods called on values (tensor methods such as `x.add_`).
Everything else refuses, naming the operator, its file and line, and --trust.
"""

from __future__ import annotations

import ast
import zipfile
from pathlib import Path

from bnlint.errors import InputError

# Operators that read or write files, talk to processes or print: never run without --trust.
DENIED = frozenset({
    "torch.save", "torch.load", "torch.from_file", "torch.ops.aten.from_file", "ops.aten.from_file", "ops.aten.save",
    "ops.prim.Print", "torch.ops.prim.Print", "print", "open", "exec", "eval", "compile", "__import__", "input",
    "torch.hub", "torch.distributed", "torch.classes", "ops.prim.Uninitialized_unsafe", "torch._C", "torch.utils",
})
# Operator namespaces whose members are tensor computation.
NAMESPACES = ("ops.aten.", "ops.prim.", "ops.quantized.", "torch.ops.aten.", "torch.ops.prim.", "torch.ops.quantized.")
BUILTINS = frozenset({
    "annotate", "unchecked_cast", "uninitialized", "isinstance", "len", "range", "int", "float", "bool", "str", "list",
    "dict", "tuple", "min", "max", "abs", "round", "enumerate", "zip", "divmod", "ord", "chr", "hash", "sorted",
    "reversed", "any", "all", "sum", "getattr", "hasattr", "complex", "math", "Tensor", "Optional", "List", "Dict",
    "Tuple", "Union", "Final", "NoneType", "Future", "Device", "Any",
})
MAX_CODE_BYTES = 32 << 20


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _judge(name: str, local: set[str], called: bool) -> str | None:
    """Why `name` may not run, or None when it may."""
    if name in local:
        return None  # a parameter or local value called (a function bound to a name in this file)
    for denied in DENIED:
        if name == denied or name.startswith(denied + "."):
            return name
    root = name.split(".", 1)[0]
    if root in ("__torch__", "self") or name.startswith(NAMESPACES):
        return None
    if root == "torch":
        return None if not name.startswith("torch.ops.") else name  # other op namespaces: C++ extensions, unknown
    if root == "ops":
        return name
    if not called or "." in name:
        return None  # a value's attribute or method (x.add_, self.bn.weight)
    return None if name in BUILTINS or name in local else name


def unsafe_operations(sources: dict[str, str]) -> list[str]:
    """`op (file:line)` for everything in the code that may not run without --trust, sorted."""
    found: set[str] = set()
    for member, text in sources.items():
        try:
            tree = ast.parse(text, filename=member)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            found.add(f"code that does not parse ({member})")
            continue
        local = {target.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign, ast.For))
                 for target in ast.walk(node.target if not isinstance(node, ast.Assign) else node.targets[0])
                 if isinstance(target, ast.Name)}
        local |= {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        local |= {arg.arg for node in ast.walk(tree) if isinstance(node, ast.arguments) for arg in node.args}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "__setstate__":
                found.add(f"__setstate__ (runs inside torch.jit.load) ({member}:{node.lineno})")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names]
                if any(name != "torch" and not name.startswith("torch.") for name in names):
                    found.add(f"import {', '.join(names)} ({member}:{node.lineno})")
            elif isinstance(node, ast.Call):
                name = _dotted(node.func)
                why = _judge(name, local, called=True) if name else None
                if why:
                    found.add(f"{why} ({member}:{node.lineno})")
            elif isinstance(node, (ast.Attribute, ast.Name)) and isinstance(getattr(node, "ctx", None), ast.Load):
                name = _dotted(node)
                if name and "." in name and any(name == d or name.startswith(d + ".") for d in DENIED):
                    found.add(f"{name} ({member}:{node.lineno})")  # aliased, e.g. `_0 = torch.save`
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
