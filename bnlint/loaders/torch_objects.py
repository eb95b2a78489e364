"""Make sense of what a torch pickle held: a state_dict, a training checkpoint, a Lightning checkpoint
or a pickled nn.Module (a tree of stubs). Shared by the zip and legacy loaders.

The result is an `Extracted`: flat state_dict-style tensors plus, where the file had one, the module
tree. `bnlint.loaders.state_dict.to_model_info` turns it into the ModelInfo rules see.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from bnlint.loaders.lazy_tensor import LazyTensor
from bnlint.loaders.safe_pickle import NumpyArray, Stub, stub_name
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
    unsafe_globals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    traced_training: list[TracedCall] = field(default_factory=list)  # TorchScript: batch_norm(training=True) calls


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
    """Flatten a pickled nn.Module stub into module records and state_dict-style tensors."""
    modules: dict[str, ModuleNode] = {}
    tensors: dict[str, TensorRef] = {}
    stack: list[tuple[str, Any]] = [(prefix, root)]
    seen: set[int] = set()
    while stack:
        name, obj = stack.pop()
        state = module_state(obj)
        if state is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        node = ModuleNode(name, normalize_class(stub_name(obj) or "?"))
        node.attrs = {k: v for k, v in state.items() if isinstance(v, ATTRIBUTE_TYPES) and not k.startswith("__")}
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset, list, tuple)) else ()
        dot = f"{name}." if name else ""
        for group, target in (("_parameters", node.params), ("_buffers", node.buffers)):
            entries = as_mapping(state.get(group)) or {}
            for key, value in entries.items():
                tensor = as_tensor(value)
                target[str(key)] = tensor
                if tensor is not None and not (group == "_buffers" and key in skip):
                    tensors[dot + str(key)] = tensor
        modules[name] = node
        children = as_mapping(state.get("_modules")) or {}
        # Reverse so that popping from the stack keeps definition order.
        stack.extend((dot + str(key), child) for key, child in reversed(list(children.items())))
    return modules, tensors


def tensor_dict(obj: Any) -> dict[str, TensorRef] | None:
    """A mapping whose values are (mostly) tensors, flattened with dotted keys; None if it has none."""
    mapping = as_mapping(obj)
    if mapping is None:
        return None
    out: dict[str, TensorRef] = {}
    for key, value in mapping.items():
        tensor = as_tensor(value)
        if tensor is not None:
            out[str(key)] = tensor
    return out or None


def plain(obj: Any, depth: int = 0, budget: list[int] | None = None) -> Any:
    """Hyper-parameters as plain Python values (dict/list/scalars); stubs become their names.

    `budget` caps the number of values visited: a crafted pickle can share one list many times
    over (a tree that is exponentially large when expanded).
    """
    budget = budget if budget is not None else [20_000]
    budget[0] -= 1
    if depth > 20 or budget[0] < 0:
        return "..."
    if isinstance(obj, ATTRIBUTE_TYPES):
        return obj
    if isinstance(obj, (list, tuple, set, frozenset)):
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
        mapping = as_mapping(obj)
        if mapping is not None:
            return plain(dict(mapping), depth + 1, budget)
        if obj.state:
            return {str(k): plain(v, depth + 1, budget) for k, v in obj.state.items() if not str(k).startswith("_")}
        if obj.args and all(isinstance(a, str) for a in obj.args) and (stub_name(obj) or "").endswith("Path"):
            return str(PurePosixPath(*obj.args))  # pathlib paths pickle as their parts
        return f"<{stub_name(obj)}>"
    if isinstance(obj, Mapping):
        return {str(k): plain(v, depth + 1, budget) for k, v in obj.items()}
    if isinstance(obj, type) and stub_name(obj):
        return f"<class {stub_name(obj)}>"
    return repr(obj)


def is_lightning(top: Mapping[Any, Any]) -> bool:
    if "pytorch-lightning_version" in top or "lightning_version" in top:
        return True
    return "state_dict" in top and any(k in top for k in ("hyper_parameters", "callbacks", "optimizer_states", "loops"))


def extract_from_object(path: str, top: Any, unsafe: list[str]) -> Extracted:
    """Classify the unpickled top object and pull out its tensors and module tree."""
    result = Extracted(path, "torch-checkpoint", unsafe_globals=list(unsafe))
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
                result.metadata[key.replace("-", "_")] = mapping[key]
        result.tensors = tensor_dict(mapping.get("state_dict")) or {}
        return result
    direct = tensor_dict(mapping)
    if direct is not None and len(direct) * 2 >= len(mapping):
        result.format = "torch-state-dict"
        result.tensors = direct
        return result
    # A training checkpoint: find the model inside.
    candidates = [k for k in MODEL_KEYS if k in mapping] + [k for k in mapping if k not in MODEL_KEYS]
    for key in candidates:
        value = mapping[key]
        if module_state(value) is not None:
            result.modules, result.tensors = walk_module(value)
        else:
            result.tensors = tensor_dict(value) or {}
        if result.tensors or result.modules:
            result.metadata["checkpoint_key"] = str(key)
            others = [str(k) for k in candidates if k != key and (tensor_dict(mapping[k]) or module_state(mapping[k]))]
            if others:
                result.metadata["other_state_dicts"] = others
                result.notes.append(f"linted the model under {key!r}; also present: {', '.join(others)}")
            return result
    if direct is not None:
        result.format = "torch-state-dict"
        result.tensors = direct
        return result
    result.notes.append("no tensors found in the checkpoint")
    return result
