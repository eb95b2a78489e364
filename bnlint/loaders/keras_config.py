"""Keras model configs read as plain JSON data: the layer walk, the weights-path rule, trainability.

Nothing here imports Keras or deserialises a layer. A config is only ever walked as dicts and
lists, so a `Lambda` layer's marshalled bytecode stays an inert string.

Sources for every rule below are Keras 3.15 (`keras/src/saving/saving_lib.py`,
`keras/src/models/{functional,sequential}.py`, `keras/src/layers/layer.py`) and tf.keras 2
(`keras/layers/normalization/batch_normalization.py`, `keras/engine/base_layer.py`), checked by
saving real models with Keras 3 (torch backend); the loader's tests repeat those checks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from bnlint.errors import InputError
from bnlint.loaders.unicode_text import json_has_surrogates
from bnlint.norms import classify

MAX_MODEL_DEPTH = 64  # sub-models inside sub-models; real models nest a handful of levels
MAX_LAYERS = 200_000
MAX_CALLS = 1000  # inbound nodes read per layer for call arguments (a layer is called once per node)

# BatchNormalization variables in creation order, the order `Layer.save_own_variables` stores
# them as vars/0, vars/1, ... (trainable first, then non-trainable; both BN builds create gamma,
# beta, moving_mean, moving_variance, then with renorm moving_stddev, renorm_mean, renorm_stddev).
RENORM_ROLES = ("moving_stddev", "renorm_mean", "renorm_stddev")
# Legacy HDF5 variable names -> role. Keras 1 named the variance buffer `<layer>_running_std`;
# from Keras 1.1 it held the variance (K.normalize_batch_in_training returns the variance), and
# Keras 2 loads it into moving_variance unchanged.
NAME_ROLES = {
    "gamma": "gamma", "beta": "beta", "moving_mean": "moving_mean", "moving_variance": "moving_variance",
    "moving_stddev": "moving_stddev", "renorm_mean": "renorm_mean", "renorm_stddev": "renorm_stddev",
    "running_mean": "moving_mean", "running_std": "moving_variance",
}
# Keras 3 classes that are never Layers in `model.layers` (functional-API ops such as keras.ops.add)
_OP_MODULES = ("keras.src.ops", "keras.ops")


def bn_roles_by_index(config: dict[str, Any]) -> list[str]:
    """Roles of vars/0.. for a BatchNormalization config: gamma if scale, beta if center, then the
    moving statistics (and renorm's three extra variables when renorm is on)."""
    roles = []
    if config.get("scale", True) is not False:
        roles.append("gamma")
    if config.get("center", True) is not False:
        roles.append("beta")
    roles += ["moving_mean", "moving_variance"]
    if config.get("renorm") is True:
        roles += list(RENORM_ROLES)
    return roles


def to_snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case, the name a saveable gets in the weights file."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def parse_json(raw: bytes | str, path: str, what: str, limit: int) -> Any:
    """json.loads with a size bound; deep nesting and bad text become InputError (the C scanner
    raises RecursionError near the interpreter's recursion limit, before using much memory)."""
    if len(raw) > limit:
        raise InputError(path, f"{what} is {len(raw)} bytes (limit {limit})")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        doc = json.loads(text)
    except RecursionError:
        raise InputError(path, f"{what} is nested too deeply to be a Keras config") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"{what} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if json_has_surrogates(text, doc):
        raise InputError(path, f"{what} holds a string with an unpaired surrogate (\\uD800-\\uDFFF): not valid Unicode text")
    return doc


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    """'2.2.4-tf' -> (2, 2, 4); None or unparsable -> None."""
    if not version:
        return None
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if not match:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def effective_trainable(own: bool | None, enclosing: list[bool | None], is_bn: bool, version: tuple[int, ...] | None) -> bool | None:
    """Whether `fit()` changes this layer, as the Keras that wrote the file does it.

    - Keras 3: the layer's own flag, nothing else. Setting `trainable` on a model pushes the value
      into every sub-layer at that moment (layer.py, `trainable.setter`), so Keras-written configs
      already carry it; a layer switched back on afterwards trains fully (weights and, for BN,
      moving statistics: checked with fit()), and loading does not re-propagate a model's flag
      (Functional sets it before tracking its layers; Sequential.from_config drops it).
    - tf.keras 2: a frozen enclosing model returns no trainable weights (base_layer
      `trainable_weights`), so other layers need their own flag and every enclosing one. A
      BatchNormalization's mode follows its own flag only (`_get_training_value`: training=False
      when not self.trainable), so its statistics move whenever its own flag is on.
    - Keras before 2.1.3 (and Keras 1): trainable=False froze gamma/beta but not the moving
      statistics (keras-team/keras#4762, #6570), so a BN layer's statistics always move.
    None when the layer's own flag is unknown.
    """
    if own is None:
        return None
    if version is None or version[0] >= 3:
        return own
    if is_bn:
        return True if version < (2, 1, 3) else own
    return own and all(flag is not False for flag in enclosing)


@dataclass
class ConfigLayer:
    """One layer found in a model config, before weights are attached."""

    path: str
    name: str
    class_name: str
    module: str | None
    config: dict[str, Any]
    trainable: bool | None
    parent: str
    order: int
    enclosing: list[bool | None]  # own flags of the enclosing models, outermost (the model) first
    v3_group: str | None  # Keras 3 weights-file group predicted by the saving rule
    top_name: str  # name of the top-level layer holding it (the legacy model_weights/<name> group)
    is_container: bool = False
    inbound_nodes: list[Any] = field(default_factory=list)  # raw, from the entry (Functional models)
    build_config: dict[str, Any] | None = None  # raw, from the entry (Keras 3)
    # The `training` argument recorded at the call of this layer or, when its own calls record
    # none, of the nearest enclosing sub-model whose calls do (see `call_training`).
    call_training: bool | None = None


@dataclass
class WalkResult:
    layers: list[ConfigLayer]
    model_class: str | None
    model_name: str | None
    model_trainable: bool | None
    inputs: list[tuple[str, tuple[int | None, ...] | None]]
    notes: list[str]


def _container_layers(entry: dict[str, Any]) -> list[Any] | None:
    """The layer list of a model entry: {"config": {"layers": [...]}}, or Keras 1/2.0's
    Sequential whose config *is* the list."""
    config = entry.get("config")
    if isinstance(config, list):
        return config
    if isinstance(config, dict) and isinstance(config.get("layers"), list):
        return config["layers"]
    return None


def _bool_or_none(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _is_op(entry: dict[str, Any]) -> bool:
    module = entry.get("module")
    return isinstance(module, str) and module.startswith(_OP_MODULES)


def walk_config(model: Any, path: str) -> WalkResult:
    """Depth-first walk of a model config (Keras 3 config.json, or a legacy `model_config`).

    The order is the config's own layer order, which is execution order for Sequential and
    Functional models as saved (Functional.get_config lists `self.operations`, earliest first).
    """
    if not isinstance(model, dict) or not isinstance(model.get("class_name"), str):
        raise InputError(path, "model config is not a Keras object (no class_name)")
    notes: list[str] = []
    layers: list[ConfigLayer] = []
    top = _container_layers(model)
    config = model.get("config")
    own = _bool_or_none(config.get("trainable")) if isinstance(config, dict) else None
    name = config.get("name") if isinstance(config, dict) and isinstance(config.get("name"), str) else None
    if top is None:
        notes.append(f"the model class {model['class_name']} does not list its layers in its config "
                     "(a subclassed model): layers are taken from the weights file alone")
    else:
        _walk(path, model, top, "", "", [own], layers, depth=0)
    return WalkResult(layers, model["class_name"], name, own, model_inputs(model, top or []), notes)


def _node_kwargs(node: Any) -> Any:
    """The call's keyword arguments in one inbound node: Keras 3 {"args": [...], "kwargs": {...}};
    tf.keras 2 [[name, node, tensor, {kwargs}], ...] (the kwargs ride on each input's entry)."""
    if isinstance(node, dict):
        return node.get("kwargs")
    if isinstance(node, list) and node and isinstance(node[0], list) and len(node[0]) >= 4:
        return node[0][3]
    return None


def call_training(inbound_nodes: Any) -> bool | None:
    """The `training` value every recorded call of a layer passes, as the config proves it.

    True/False only when each of its (first MAX_CALLS) calls passes that same bool; None when no
    call passes one, when calls disagree, or when the value is not a bool (untrusted JSON: "yes",
    a list, ... prove nothing).
    """
    if not isinstance(inbound_nodes, list):
        return None
    seen: set[bool] = set()
    for node in inbound_nodes[:MAX_CALLS]:
        kwargs = _node_kwargs(node)
        value = kwargs.get("training") if isinstance(kwargs, dict) else None
        if not isinstance(value, bool):
            return None
        seen.add(value)
    return seen.pop() if len(seen) == 1 else None


def _walk(path: str, model: dict[str, Any], entries: list[Any], prefix: str, group: str,
          enclosing: list[bool | None], out: list[ConfigLayer], depth: int, inherited: bool | None = None) -> None:
    if depth > MAX_MODEL_DEPTH:
        raise InputError(path, f"models nested more than {MAX_MODEL_DEPTH} deep")
    is_sequential = model.get("class_name") == "Sequential"
    counts: dict[str, int] = {}
    base = f"{group}/layers" if group else "layers"
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("class_name"), str):
            raise InputError(path, f"layer {index} of {prefix or 'the model'} is not a Keras object")
        if len(out) >= MAX_LAYERS:
            raise InputError(path, f"more than {MAX_LAYERS} layers")
        if _is_op(entry):
            continue  # a keras.ops node: in the config, not in model.layers, no weights
        class_name = entry["class_name"]
        raw_config = entry.get("config")
        layer_config: dict[str, Any] = raw_config if isinstance(raw_config, dict) else {}
        found_name = layer_config.get("name") or entry.get("name")
        name = found_name if isinstance(found_name, str) and found_name else f"{to_snake_case(class_name)}#{index}"
        # Sequential.layers omits the InputLayer it starts with, so it takes no weights slot.
        skipped = is_sequential and index == 0 and class_name == "InputLayer"
        v3_group = None
        if not skipped:
            snake = to_snake_case(class_name)
            seen = counts.get(snake)
            counts[snake] = 0 if seen is None else seen + 1
            v3_group = f"{base}/{snake}" if seen is None else f"{base}/{snake}_{seen + 1}"
        module = entry.get("module") if isinstance(entry.get("module"), str) else None
        own = _bool_or_none(layer_config.get("trainable"))
        layer_path = f"{prefix}/{name}" if prefix else name
        node = ConfigLayer(layer_path, name, class_name, module, layer_config, own, prefix, len(out),
                           list(enclosing), v3_group, prefix.split("/", 1)[0] if prefix else name)
        inbound, build = entry.get("inbound_nodes"), entry.get("build_config")
        node.inbound_nodes = inbound if isinstance(inbound, list) else []
        node.build_config = build if isinstance(build, dict) else None
        # An explicit value at a layer's own call is the one its call sees (layer.py
        # `_resolve_and_populate_arg`); otherwise it inherits the enclosing call's.
        own_call = call_training(node.inbound_nodes)
        node.call_training = inherited if own_call is None else own_call
        out.append(node)
        children = _container_layers(entry)
        if children is not None:
            node.is_container = True
            _walk(path, entry, children, layer_path, v3_group or "", enclosing + [own], out, depth + 1, node.call_training)
        elif isinstance(layer_config.get("layer"), dict):
            _walk_wrapped(node, layer_config["layer"], enclosing + [own], out)


def _walk_wrapped(wrapper: ConfigLayer, inner: dict[str, Any], enclosing: list[bool | None], out: list[ConfigLayer]) -> None:
    """A wrapper such as TimeDistributed keeps its layer in attribute `layer`: saved at
    <wrapper group>/layer (saving_lib walks a layer's attributes by name)."""
    if not isinstance(inner.get("class_name"), str):
        return
    raw_config = inner.get("config")
    config: dict[str, Any] = raw_config if isinstance(raw_config, dict) else {}
    name = config["name"] if isinstance(config.get("name"), str) else "layer"
    group = f"{wrapper.v3_group}/layer" if wrapper.v3_group else None
    out.append(ConfigLayer(f"{wrapper.path}/{name}", name, inner["class_name"],
                           inner.get("module") if isinstance(inner.get("module"), str) else None,
                           config, _bool_or_none(config.get("trainable")), wrapper.path, len(out),
                           enclosing, group, wrapper.top_name, call_training=wrapper.call_training))


def _shape(value: Any) -> tuple[int | None, ...] | None:
    if not isinstance(value, list) or len(value) > 64:
        return None
    if all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
        return tuple(value)
    return None


def _input_shape(config: dict[str, Any]) -> tuple[int | None, ...] | None:
    """Keras 3 writes batch_shape; tf.keras 2 batch_input_shape."""
    for key in ("batch_shape", "batch_input_shape"):
        if key in config:
            return _shape(config[key])
    return None


def _input_names(spec: Any) -> list[str]:
    """Functional input_layers: ['x', 0, 0] (Keras 3, one input), [['x', 0, 0], ...], or a dict."""
    if isinstance(spec, dict):
        spec = list(spec.values())
    if isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str):
        return [spec[0]]
    names: list[str] = []
    if isinstance(spec, list):
        for item in spec[:1000]:
            names += _input_names(item)
    return names


def model_inputs(model: dict[str, Any], entries: list[Any]) -> list[tuple[str, tuple[int | None, ...] | None]]:
    """(name, batch shape) of each model input, from the config where it says."""
    config = model.get("config")
    by_name = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
            name = entry["config"].get("name") or entry.get("name")
            if isinstance(name, str):
                by_name[name] = entry
    if isinstance(config, dict) and "input_layers" in config:
        result = []
        for name in _input_names(config["input_layers"]):
            entry = by_name.get(name)
            result.append((name, _input_shape(entry["config"]) if entry else None))
        return result
    first = next((e for e in entries if isinstance(e, dict) and isinstance(e.get("config"), dict)), None)
    if first is None:
        return []
    first_name = first["config"].get("name")
    if first.get("class_name") == "InputLayer":
        return [(str(first_name), _input_shape(first["config"]))]
    if isinstance(config, dict) and "build_input_shape" in config:
        return [("input", _shape(config["build_input_shape"]))]
    shape = _input_shape(first["config"])
    return [("input", shape)] if shape is not None else []


def norm_kind(class_name: str) -> str:
    """'bn', 'other-norm' or 'other' (bnlint.norms decides, once for every framework)."""
    return classify(class_name, "keras")
