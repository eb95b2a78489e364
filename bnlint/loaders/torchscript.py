"""TorchScript archives: the module tree from data.pkl plus facts read from the code text.

TorchScript pickles each module as an object of a `__torch__...` class whose attributes are flat
(tensors, submodules, `training`). The class bodies in `code/**.py` say which attributes are
parameters and buffers and hold `Final` constants (eps, momentum, affine, ...). A *traced* model
keeps no constants; its forward calls `torch.batch_norm(x, w, b, mean, var, training, momentum,
eps, cudnn)` with literals, and `training=True` there means it was traced in train mode (BN405).
The code is parsed as text; nothing is compiled or run. What in it is not recognisably tensor
computation (`torchscript_safety.unsafe_operations`) becomes `ModelInfo.unsafe_code` (BN004).
The text comes from the file, so every pattern here is linear: whitespace classes never span
lines, a call's arguments are read by one bracket-free match (falling back to a bounded bracket
walk), and line numbers and enclosing methods come from precomputed positions instead of
rescanning the text per call.
"""

from __future__ import annotations

import ast
import bisect
import re
from dataclasses import dataclass, field
from typing import Any

from bnlint.loaders.lazy_tensor import LazyTensor
from bnlint.loaders.pickle_stubs import Stub, stub_name
from bnlint.loaders.torch_objects import ATTRIBUTE_TYPES, Extracted, ModuleNode, attribute_value, normalize_class
from bnlint.loaders.torchscript_safety import unsafe_operations
from bnlint.model import TensorRef, TracedCall

CLASS_RE = re.compile(r"^class ([\w.]+)(\((\w+)\))?:", re.M)
# `[ \t]`, never `\s`: a `\s+` anchored at every line start re-scans runs of blank lines (quadratic).
LIST_RE = re.compile(r"^[ \t]+(__parameters__|__buffers__) = \[([^\n]*)\][ \t]*$", re.M)
FINAL_RE = re.compile(r"^[ \t]+(\w+) : Final\[[^\n]*?\] = ([^\n]+)$", re.M)
DEF_RE = re.compile(r"^[ \t]+def (\w+)\(", re.M)
# Batch-norm ops whose 6th argument is `training` (then momentum, eps).
BN_CALL_RE = re.compile(r"torch\.(batch_norm|_batch_norm_impl_index|native_batch_norm|_native_batch_norm_legit"
                        r"|cudnn_batch_norm|miopen_batch_norm)\(")
# A call's arguments without brackets inside (what TorchScript writes): stops at the first bracket,
# so the spans read for successive calls never overlap.
SIMPLE_ARGS_RE = re.compile(r"([^()\[\]{}\n]*)\)")
MAX_LITERAL = 200  # characters given to ast.literal_eval
MAX_BN_CALLS = 10_000  # batch_norm calls recorded per archive
MAX_TRACED = 10_000  # BN405 entries per archive
ARG_WINDOW = 1000  # characters a bracketed argument list may span


@dataclass
class ScriptClass:
    qualname: str
    is_module: bool
    parameters: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)
    bn_calls: list[dict[str, Any]] = field(default_factory=list)


def _split_args(text: str, start: int, budget: list[int]) -> list[str] | None:
    """Top-level comma-separated arguments of the call whose '(' is at text[start - 1]."""
    simple = SIMPLE_ARGS_RE.match(text, start)
    if simple is not None:
        return [a.strip() for a in simple.group(1).split(",") if a.strip()]
    if budget[0] <= 0:
        return None
    budget[0] -= ARG_WINDOW
    depth = 0
    args: list[str] = []
    current: list[str] = []
    for char in text[start:start + ARG_WINDOW]:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                args.append("".join(current).strip())
                return [a for a in args if a]
            depth -= 1
        if char == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    return None


def _literal(text: str) -> Any:
    text = text.strip()
    if len(text) > MAX_LITERAL:
        return text[:MAX_LITERAL]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return text


def parse_code(sources: dict[str, str]) -> dict[str, ScriptClass]:
    """Classes by qualified name (e.g. `__torch__.torch.nn.modules.batchnorm.BatchNorm2d`)."""
    classes: dict[str, ScriptClass] = {}
    budget = [2_000_000]  # characters the bracket walk may read, all files together
    calls_left = MAX_BN_CALLS
    for member, text in sources.items():
        module = member.removeprefix("code/").removesuffix(".py").replace("/", ".")
        newlines = [m.start() for m in re.finditer("\n", text)]
        headers = list(CLASS_RE.finditer(text))
        for index, header in enumerate(headers):
            end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
            body = text[header.end():end]
            cls = ScriptClass(f"{module}.{header.group(1)}", header.group(3) == "Module")
            for match in LIST_RE.finditer(body):
                names = [_literal(n) for n in match.group(2).split(",") if n.strip()]
                target = cls.parameters if match.group(1) == "__parameters__" else cls.buffers
                target.extend(str(n) for n in names)
            for match in FINAL_RE.finditer(body):
                cls.constants[match.group(1)] = _literal(match.group(2))
            def_starts: list[int] = []
            def_names: list[str] = []
            for m in DEF_RE.finditer(body):
                def_starts.append(m.start())
                def_names.append(m.group(1))
            for call in BN_CALL_RE.finditer(body):
                if calls_left <= 0:
                    break
                args = _split_args(body, call.end(), budget)
                if args is None or len(args) < 8:
                    continue
                calls_left -= 1
                before = bisect.bisect_left(def_starts, call.start())
                method = def_names[before - 1] if before else "?"
                line = bisect.bisect_left(newlines, header.end() + call.start()) + 1
                code = f"torch.{call.group(1)}({', '.join(a[:MAX_LITERAL] for a in args)})"
                cls.bn_calls.append({"file": member, "line": line, "method": method, "op": call.group(1), "code": code[:200],
                                     "training": _literal(args[5]), "momentum": _literal(args[6]),
                                     "eps": _literal(args[7])})
            classes[cls.qualname] = cls
    return classes


def _walk(top: Any, classes: dict[str, ScriptClass]) -> tuple[dict[str, ModuleNode], dict[str, TensorRef], dict[str, list[str]]]:
    """Flatten the scripted module tree: modules, state_dict-style tensors, class -> module names."""
    modules: dict[str, ModuleNode] = {}
    tensors: dict[str, TensorRef] = {}
    by_class: dict[str, list[str]] = {}
    stack: list[tuple[str, Any]] = [("", top)]
    seen: set[int] = set()
    while stack:
        name, obj = stack.pop()
        if not isinstance(obj, Stub) or id(obj) in seen:
            continue
        seen.add(id(obj))
        qualname = stub_name(obj) or "?"
        cls = classes.get(qualname)
        node = ModuleNode(name, normalize_class(qualname))
        by_class.setdefault(qualname, []).append(name)
        dot = f"{name}." if name else ""
        children: list[tuple[str, Any]] = []
        params = set(cls.parameters) if cls else set()
        buffers = set(cls.buffers) if cls else set()
        declared = params | buffers
        for key, value in obj.state.items():
            if not isinstance(key, str):
                continue
            if isinstance(value, LazyTensor) or (value is None and key in declared):
                is_param = key in params if cls else bool(value is not None and value.requires_grad)
                (node.params if is_param else node.buffers)[key] = value
                if value is not None:
                    tensors[dot + key] = value
            elif isinstance(value, Stub) and (stub_name(value) or "").startswith("__torch__."):
                child_cls = classes.get(stub_name(value) or "")
                if child_cls is None or child_cls.is_module:
                    children.append((dot + key, value))
            elif isinstance(value, ATTRIBUTE_TYPES):
                node.attrs[key] = attribute_value(value)
        if cls:
            for key, value in cls.constants.items():
                node.attrs.setdefault(key, value)
            literal_calls = [c for c in cls.bn_calls if c["method"] == "forward"]
            if len(literal_calls) == 1:  # traced modules: eps/momentum live only in the call
                call = literal_calls[0]
                if isinstance(call["eps"], float):
                    node.attrs.setdefault("eps", call["eps"])
                if isinstance(call["momentum"], float):
                    node.attrs.setdefault("momentum", call["momentum"])
        modules[name] = node
        stack.extend(reversed(children))
    return modules, tensors, by_class


def extract_torchscript(path: str, top: Any, unsafe: list[str], sources: dict[str, str]) -> Extracted:
    classes = parse_code(sources)
    modules, tensors, by_class = _walk(top, classes)
    result = Extracted(path, "torchscript", tensors=tensors, modules=modules, unsafe_globals=list(unsafe))
    # One entry per module whose code has the literal (or per call site when no module uses the class).
    for cls in classes.values():
        for call in cls.bn_calls:
            if call["training"] is not True:
                continue
            location = f"{call['file']}:{call['line']}"
            owners = by_class.get(cls.qualname, [])[:MAX_TRACED - len(result.traced_training)]
            result.traced_training.extend(TracedCall(owner or "(root)", call["code"], location) for owner in owners)
            if not owners and len(result.traced_training) < MAX_TRACED:
                result.traced_training.append(TracedCall(None, call["code"], location))
    result.metadata["scripted_classes"] = len(classes)
    result.unsafe_code = unsafe_operations(sources)  # ModelInfo.unsafe_code: BN004
    if not isinstance(top, Stub):
        result.notes.append("TorchScript data.pkl does not hold a module object")
    return result
