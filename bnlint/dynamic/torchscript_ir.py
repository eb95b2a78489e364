"""The gate before a loaded TorchScript module runs: every node of its compiled graphs must be pure.

The archive's `code/` text is recompiled by `torch.jit.load`, so its spelling proves nothing:
`getattr(torch, "save")`, `x = torch; x.save`, `ops.aten.from_file` all compile to the same
`aten::save` / `aten::from_file` node. This module judges what will actually run. It is called
after a load that ran nothing from the archive (`bnlint.loaders.torchscript_safety.load_time_hooks`
refused `__setstate__` first) and before anything is called.

What is walked: every method of every submodule (one walk per module type: a type's methods are
the same for all its instances) and every forward hook and pre-hook (the module call runs them
around `forward`). Each graph is copied and inlined (`torch._C._jit_pass_inline`), which replaces
`prim::CallMethod` / `prim::CallFunction` by the callee's body, free functions and methods of
TorchScript class objects included; nested blocks (`prim::If`, `prim::Loop`) are walked too. A
call left after inlining (an interface call, a C++ class's method) is allowed only when it
targets a module type walked here. The graphs are only read: no optimisation pass runs (constant
propagation would evaluate `aten::from_file("/etc/hostname")` while optimising).

What is allowed is `bnlint.loaders.torchscript_safety.pure_kind` (its docstring says why each
family is pure): aten operators except those touching files, the console, global state or raw
memory; quantized kernels; structural prim nodes. A loop that never ends is allowed (control
flow): the isolation deadline handles hangs, not this check. Kernel bugs (memory safety inside an
ATen kernel) are out of reach of any graph check; the isolated child process contains those.
"""

from __future__ import annotations

from typing import Any, Iterator

from bnlint.errors import TrustRequired
from bnlint.loaders.torchscript_safety import pure_kind

MAX_LISTED = 3  # ops named in the one-line refusal


def _graphs(module: Any) -> Iterator[tuple[str, Any]]:
    """(where, graph) for each method and hook of each module type in the tree."""
    seen: set[str] = set()
    for name, sub in module.named_modules():
        cpp = sub._c
        qualname = cpp._type().qualified_name()
        if qualname in seen:
            continue
        seen.add(qualname)
        prefix = f"{name}." if name else ""
        for method in cpp._method_names():
            yield f"{prefix}{method}", cpp._get_method(method).graph
        for hook in (*cpp._get_forward_pre_hooks(), *cpp._get_forward_hooks()):
            yield f"{prefix}{hook.name} (hook)", hook.graph


def _module_types(module: Any) -> set[str]:
    return {sub._c._type().qualified_name() for _, sub in module.named_modules()}


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of the graph, nested blocks included (iteratively: no recursion limit)."""
    stack = [graph.block()] if hasattr(graph, "block") else [graph]
    while stack:
        block = stack.pop()
        for node in block.nodes():
            yield node
            stack.extend(node.blocks())


def _why(node: Any, module_types: set[str]) -> str | None:
    kind = node.kind()
    if kind == "prim::CallMethod":
        target = node.inputsAt(0).type()
        qualname = target.qualified_name() if hasattr(target, "qualified_name") else str(target)
        return None if qualname in module_types else f"{kind} {node.s('name')} of {qualname}"
    if kind == "prim::CallFunction":
        return f"{kind} (a call that cannot be followed)"
    if not pure_kind(kind):
        return kind
    if any(node.kindOf(attr) in ("g", "gs") for attr in node.attributeNames()):
        return f"{kind} (holds a subgraph)"
    return None


def check_scripted_module(module: Any, path: str) -> list[str]:
    """`kind (method)` for every node of the module's graphs that is not pure tensor computation, sorted.

    `module` is a loaded `torch.jit.ScriptModule`; `path` names the file in what cannot be walked.
    """
    import torch

    found: set[str] = set()
    try:
        module_types = _module_types(module)
        for where, graph in _graphs(module):
            inlined = graph.copy()
            torch._C._jit_pass_inline(inlined)
            for node in _nodes(inlined):
                why = _why(node, module_types)
                if why is not None:
                    found.add(f"{why} ({where})")
    except (RuntimeError, AttributeError, TypeError) as exc:  # a module torch cannot describe: nothing vouched for
        found.add(f"a graph that cannot be read in {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    return sorted(found)


def require_safe(module: Any, path: str, trust: bool) -> None:
    """Raise TrustRequired (one line, naming the ops) unless the graphs are pure or `trust` is set."""
    if trust:
        return
    found = check_scripted_module(module, path)
    if found:
        listed = "; ".join(found[:MAX_LISTED]) + (f"; ... (+{len(found) - MAX_LISTED})" if len(found) > MAX_LISTED else "")
        raise TrustRequired(path, f"TorchScript graph runs {listed}: not pure tensor computation (it could read or write "
                            "files or print); pass --trust if you trust it")
