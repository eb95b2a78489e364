"""Make sense of what a torch pickle held: a state_dict, a training checkpoint, a Lightning checkpoint
or a pickled nn.Module (a tree of stubs). Shared by the zip and legacy loaders.

The result is an `Extracted`: flat state_dict-style tensors plus, where the file had one, the module
tree. `bnlint.loaders.state_dict.to_model_info` turns it into the ModelInfo rules see.

A pickle's memo lets one value appear in many places (a DAG); code that walks the result as a tree
can take exponential time. Every walk here visits each object once (sets of ids) or stops at a
budget, and a container shared by several modules is read for the first one only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from bnlint.loaders.lazy_tensor import LazyTensor
from bnlint.loaders.pickle_stubs import NumpyArray, Stub, stub_name
from bnlint.model import ArrayTensor, TensorRef, TracedCall

# Keys under which training checkpoints keep the model, in order of preference.
MODEL_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "model_state", "module",
              "weights", "params", "generator", "ema", "model_ema", "state_dict_ema", "ema_state_dict")
ATTRIBUTE_TYPES = (bool, int, float, str, type(None))


@dataclass
class ModuleNode:
    """One module of a pickled or scripted model."""

    name: str  # dotted path, "" for the root
    class_name: str  # qualified, TorchScript mangling removed
    attrs: dict[str, Any] = field(default_factory=dict)  # plain attributes: training, eps, momentum, ...
    params: dict[str, TensorRef | None] = field(default_factory=dict)
    buffers: dict[str, TensorRef | None] = field(default_factory=dict)


@dataclass
class Extracted:
    """What a loader read, before it becomes a ModelInfo."""

    path: str
    format: str
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    modules: dict[str, ModuleNode] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    unsafe_globals: list[str] = field(default_factory=list)  # execution primitives the pickles name (BN001)
    unknown_callables: list[str] = field(default_factory=list)  # other callables loading would run (BN003)
    unsafe_code: list[str] = field(default_factory=list)  # TorchScript operations that are not tensor computation (BN004)
    notes: list[str] = field(default_factory=list)
    traced_training: list[TracedCall] = field(default_factory=list)  # TorchScript: batch_norm(training=True) calls

    def set_pickle_findings(self, unsafe: list[str], unknown: list[str]) -> None:
        self.unsafe_globals = list(unsafe)
        self.unknown_callables = list(unknown)


def normalize_class(qualname: str) -> str:
    """`__torch__.torch.nn.modules.batchnorm.___torch_mangle_3.BatchNorm2d` -> `torch.nn.modules.batchnorm.BatchNorm2d`."""
    name = qualname.removeprefix("__torch__.")
    return re.sub(r"\.___torch_mangle_\d+", "", name)


def as_tensor(value: Any) -> TensorRef | None:
    if isinstance(value, LazyTensor):
        return value
    if isinstance(value, NumpyArray) and value.array is not None:
        return ArrayTensor(value.array)
    return None


def stub_items(obj: Stub) -> dict[Any, Any]:
    """Mapping content of a dict-subclass stub (SETITEMS recorded as pairs)."""
    return {pair[0]: pair[1] for pair in obj.items if isinstance(pair, tuple) and len(pair) == 2}


def attribute_value(value: Any) -> Any:
    """A scalar as kept: ints past 64 bits become text (str() of huge ints raises, rules expect sane ints)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 63:
        return f"<int of {value.bit_length()} bits>"
    if isinstance(value, str) and len(value) > 4096:
        return value[:4096]
    return value


def key_text(key: Any) -> str:
    """A mapping key as text, without str() of huge ints (which raises past 4300 digits)."""
    if isinstance(key, int) and not isinstance(key, bool) and key.bit_length() > 63:
        return f"<int of {key.bit_length()} bits>"
    if isinstance(key, (str, int, float, bool, type(None))):
        return str(key)
    if isinstance(key, bytes):
        return key[:256].decode("latin-1")
    return f"<{stub_name(key) or type(key).__name__}>"


def as_mapping(obj: Any) -> Mapping[Any, Any] | None:
    """A dict, or a stub of a dict subclass (AttributeDict, OmegaConf content...) as a dict."""
    if isinstance(obj, Mapping):
        return obj
    if isinstance(obj, Stub) and obj.items and all(isinstance(p, tuple) and len(p) == 2 for p in obj.items):
        return stub_items(obj)
    return None


def module_state(obj: Any) -> dict[str, Any] | None:
    """The recorded attribute dict of a pickled nn.Module stub, or None if obj is not one."""
    if not isinstance(obj, Stub):
        return None
    for candidate in (obj.state, obj.args[0] if obj.args else None):
        # torch.fx GraphModule pickles as a call whose first argument is the module __dict__.
        if isinstance(candidate, dict) and ("_modules" in candidate or ("_parameters" in candidate and "_buffers" in candidate)):
            return candidate
    return None


def walk_module(root: Any, prefix: str = "") -> tuple[dict[str, ModuleNode], dict[str, TensorRef]]:
    """Flatten a pickled nn.Module stub into module records and state_dict-style tensors.

    Linear in the pickle: each module is visited once, and each `_parameters`/`_buffers`/`_modules`
    container is read for the first module that holds it (real modules never share them; a crafted
    file sharing one container between thousands of modules would otherwise be read thousands of times).
    """
    modules: dict[str, ModuleNode] = {}
    tensors: dict[str, TensorRef] = {}
    stack: list[tuple[str, Any]] = [(prefix, root)]
    seen: set[int] = set()
    consumed: set[int] = set()

    def once(container: Any) -> Mapping[Any, Any]:
        if container is None or id(container) in consumed:
            return {}
        consumed.add(id(container))
        return as_mapping(container) or {}

    while stack:
        name, obj = stack.pop()
        state = module_state(obj)
        if state is None or id(obj) in seen or id(state) in consumed:
            continue
        seen.add(id(obj))
        consumed.add(id(state))
        node = ModuleNode(name, normalize_class(stub_name(obj) or "?"))
        node.attrs = {k: attribute_value(v) for k, v in state.items()
                      if isinstance(k, str) and isinstance(v, ATTRIBUTE_TYPES) and not k.startswith("__")}
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset, list, tuple)) else ()
        dot = f"{name}." if name else ""
        for group, target in (("_parameters", node.params), ("_buffers", node.buffers)):
            for key, value in once(state.get(group)).items():
                tensor = as_tensor(value)
                target[key_text(key)] = tensor
                if tensor is not None and not (group == "_buffers" and _member(key, skip)):
                    tensors[dot + key_text(key)] = tensor
        modules[name] = node
        children = once(state.get("_modules"))
        # Reverse so that popping from the stack keeps definition order.
        stack.extend((dot + key_text(key), child) for key, child in reversed(list(children.items())))
    return modules, tensors


def _member(key: Any, collection: Any) -> bool:
    try:
        return key in collection
    except TypeError:
        return False


def tensor_dict(obj: Any, cache: dict[int, dict[str, TensorRef] | None] | None = None) -> dict[str, TensorRef] | None:
    """A mapping whose values are (mostly) tensors, flattened with dotted keys; None if it has none.

    `cache` (by object id) makes repeated questions about one shared mapping cost nothing.
    """
    if cache is not None and id(obj) in cache:
        return cache[id(obj)]
    mapping = as_mapping(obj)
    out: dict[str, TensorRef] = {}
    for key, value in (mapping or {}).items():
        tensor = as_tensor(value)
        if tensor is not None:
            out[key_text(key)] = tensor
    if cache is not None:
        cache[id(obj)] = out or None
    return out or None


def _spend(budget: list[int], count: int) -> bool:
    budget[0] -= count
    return budget[0] >= 0


def plain(obj: Any, depth: int = 0, budget: list[int] | None = None) -> Any:
    """Hyper-parameters as plain Python values (dict/list/scalars); stubs become their names.

    `budget` caps the work: every value visited and every element of a container iterated costs
    one, charged before iterating, so a crafted pickle that shares one big list many times over (a
    tree exponentially large when expanded) costs at most the budget.
    """
    budget = budget if budget is not None else [20_000]
    if depth > 20 or not _spend(budget, 1):
        return "..."
    if isinstance(obj, ATTRIBUTE_TYPES):
        return attribute_value(obj)
    if isinstance(obj, (list, tuple, set, frozenset)):
        if not _spend(budget, len(obj)):
            return "..."
        return [plain(v, depth + 1, budget) for v in obj]
    if isinstance(obj, bytes):
        return obj.decode("latin-1")
    if isinstance(obj, LazyTensor):
        return f"tensor(shape={list(obj.shape)}, dtype={obj.dtype})"
    if isinstance(obj, NumpyArray):
        return obj.array.tolist() if obj.array is not None and obj.array.size <= 64 else "ndarray"
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Stub):
        # OmegaConf DictConfig/ListConfig keep their content in `_content`; nodes in `_val`.
        for key in ("_content", "_val"):
            if key in obj.state:
                return plain(obj.state[key], depth + 1, budget)
        if not _spend(budget, len(obj.items) + len(obj.state) + len(obj.args)):
            return "..."
        mapping = as_mapping(obj)
        if mapping is not None:
            return {key_text(k): plain(v, depth + 1, budget) for k, v in mapping.items()}
        if obj.state:
            return {key_text(k): plain(v, depth + 1, budget) for k, v in obj.state.items() if not key_text(k).startswith("_")}
        if obj.args and all(isinstance(a, str) for a in obj.args) and (stub_name(obj) or "").endswith("Path"):
            return str(PurePosixPath(*obj.args))  # pathlib paths pickle as their parts
        return f"<{stub_name(obj)}>"
    if isinstance(obj, Mapping):
        if not _spend(budget, len(obj)):
            return "..."
        return {key_text(k): plain(v, depth + 1, budget) for k, v in obj.items()}
    if isinstance(obj, type) and stub_name(obj):
        return f"<class {stub_name(obj)}>"
    return repr(obj)


def is_lightning(top: Mapping[Any, Any]) -> bool:
    if "pytorch-lightning_version" in top or "lightning_version" in top:
        return True
    return "state_dict" in top and any(k in top for k in ("hyper_parameters", "callbacks", "optimizer_states", "loops"))


def extract_from_object(path: str, top: Any, unsafe: list[str], unknown: list[str] | None = None) -> Extracted:
    """Classify the unpickled top object and pull out its tensors and module tree."""
    result = Extracted(path, "torch-checkpoint")
    result.set_pickle_findings(unsafe, unknown or [])
    cache: dict[int, dict[str, TensorRef] | None] = {}
    if module_state(top) is not None:
        result.format = "torch-module"
        result.modules, result.tensors = walk_module(top)
        return result
    mapping = as_mapping(top)
    if mapping is None:
        result.notes.append(f"the file holds a {stub_name(top) or type(top).__name__}, not a state_dict, checkpoint or module")
        return result
    if is_lightning(mapping):
        result.format = "lightning"
        hyper = mapping.get("hyper_parameters", mapping.get("hparams"))
        if hyper is not None:
            result.metadata["hyper_parameters"] = plain(hyper)
        for key in ("pytorch-lightning_version", "epoch", "global_step"):
            if isinstance(mapping.get(key), (str, int)):
                result.metadata[key.replace("-", "_")] = attribute_value(mapping[key])
        result.tensors = tensor_dict(mapping.get("state_dict"), cache) or {}
        return result
    direct = tensor_dict(mapping, cache)
    if direct is not None and len(direct) * 2 >= len(mapping):
        result.format = "torch-state-dict"
        result.tensors = direct
        return result
    # A training checkpoint: find the model inside.
    candidates = [k for k in MODEL_KEYS if k in mapping] + [k for k in mapping if k not in MODEL_KEYS]
    tried: set[int] = set()
    for key in candidates:
        value = mapping[key]
        if id(value) in tried:  # one object under many keys: it was no model the first time either
            continue
        tried.add(id(value))
        if module_state(value) is not None:
            result.modules, result.tensors = walk_module(value)
        else:
            result.tensors = tensor_dict(value, cache) or {}
        if result.tensors or result.modules:
            result.metadata["checkpoint_key"] = key_text(key)
            others = [key_text(k) for k in candidates if k != key and (tensor_dict(mapping[k], cache) or module_state(mapping[k]))]
            if others:
                result.metadata["other_state_dicts"] = others
                shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
                result.notes.append(f"linted the model under {key_text(key)!r}; also present: {shown}")
            return result
    if direct is not None:
        result.format = "torch-state-dict"
        result.tensors = direct
        return result
    result.notes.append("no tensors found in the checkpoint")
    return result
