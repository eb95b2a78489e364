"""Keras loader: a `.keras` archive or an `.h5`/`.hdf5` file, read as JSON and HDF5 data, as the
framework-neutral ModelInfo. Keras and TensorFlow are never imported; no layer is deserialised.

`bnlint.loaders.keras_archive.read_keras` reads the file (config, lazily read weights); this module
says what it means for the rules:
- BatchNormalization settings: `momentum` is Keras' (the weight of the OLD value: PyTorch's is
  1 - it), `epsilon` is judged against Keras' default 1e-3, `axis` against the channel axis;
  tf.keras 2's `renorm` / `virtual_batch_size` and `synchronized` are training options (BN307).
- Modes: Keras saves no train/eval flag. `trainable: false` on a BatchNormalization layer is the
  correct freeze (it then runs in inference mode even inside fit()); a trainable BN layer next to
  frozen layers is the classic trap (BN408), judged from each layer's `trainable` and the
  enclosing models'.
- Statistics are the ones Keras itself would load (`keras_weights`: `.keras` by group path as
  saving_lib reads it, legacy `.h5` by position in `weight_names` as legacy_h5_format reads it);
  what Keras could not load or bnlint cannot read as a vector of the layer's channels is listed in
  `BNLayer.unchecked` (BN110), never dropped silently.
- The producer of each BN's input (previous layer of a Sequential, or the layer named in a
  Functional config's inbound nodes), for the conv-bias rule (BN506).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from bnlint.conventions import conventions
from bnlint.loaders.keras_archive import KerasFile, KerasLayer, read_keras
from bnlint.loaders.keras_h5 import UnreadableTensor
from bnlint.model import BNLayer, GraphInput, ModelInfo, ModuleRecord, OpKind, Producer, TensorRef
from bnlint.norms import is_stochastic

FORMAT_OF_KIND = {"keras-v3": "keras", "keras-h5": "keras-h5", "keras-h5-weights": "keras-weights", "keras-v3-weights": "keras-weights"}
ROLES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
# Keras layer classes as the neutral graph rules see them.
OP_KINDS: dict[str, OpKind] = {
    "Conv1D": "conv", "Conv2D": "conv", "Conv3D": "conv", "DepthwiseConv1D": "conv", "DepthwiseConv2D": "conv",
    "SeparableConv1D": "conv", "SeparableConv2D": "conv", "Convolution2D": "conv",
    "Conv1DTranspose": "conv_transpose", "Conv2DTranspose": "conv_transpose", "Conv3DTranspose": "conv_transpose",
    "Dense": "dense",
}


def _int_axis(value: Any) -> int | None:
    """A BatchNormalization `axis`: an int, or a one-element list as tf.keras 2 writes it."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _rank(layer: KerasLayer) -> int | None:
    """The rank of the layer's input, from Keras 3's build_config or tf.keras 2's batch_input_shape."""
    build = layer.build_config
    shape = build.get("input_shape") if isinstance(build, dict) else layer.config.get("batch_input_shape")
    return len(shape) if isinstance(shape, list) else None


def _channel_axis(layer: KerasLayer, channels_first: bool) -> tuple[int | None, bool | None]:
    """(axis as stored, whether it is the data's channel axis; None when the file cannot tell)."""
    axis = _int_axis(layer.config.get("axis", -1))
    rank = _rank(layer)
    if axis is None:
        return None, None
    if rank is None:
        return axis, True if axis == -1 and not channels_first else None
    channel = 1 if channels_first and rank > 2 else rank - 1
    return axis, axis % rank == channel


def _producer(layer: KerasLayer, by_path: dict[str, KerasLayer], siblings: list[KerasLayer], consumers: dict[str, int]) -> Producer | None:
    """The layer feeding this BN: the previous one in a Sequential, else the inbound node's."""
    source = _inbound(layer)
    parent = f"{layer.parent}/" if layer.parent else ""
    found = by_path.get(parent + source) if source else None
    if found is None and source is None:
        before = [s for s in siblings if s.order < layer.order and s.class_name != "InputLayer"]
        found = before[-1] if before else None
    if found is None:
        return None
    kind = OP_KINDS.get(found.class_name, "other")
    use_bias = found.config.get("use_bias")
    bias: TensorRef | None = None
    if kind != "other" and use_bias:
        bias = found.weights.get("bias") or found.weights.get("1")
    return Producer(name=found.path, op=found.class_name, kind=kind, has_bias=bool(use_bias) if kind != "other" else None,
                    bias=bias, exclusive=consumers.get(found.path, 1) == 1)


def _inbound(layer: KerasLayer) -> str | None:
    """The name of the layer whose output this layer consumes, from a Functional config."""
    nodes = layer.inbound_nodes
    if not isinstance(nodes, list) or not nodes:
        return None
    first = nodes[0]
    if isinstance(first, dict):  # Keras 3: {"args": [{"config": {"keras_history": [name, node, tensor]}}]}
        args = first.get("args")
        arg = args[0] if isinstance(args, list) and args else None
        config = arg.get("config") if isinstance(arg, dict) else None
        history = config.get("keras_history") if isinstance(config, dict) else None
        return history[0] if isinstance(history, list) and history and isinstance(history[0], str) else None
    if isinstance(first, list) and first and isinstance(first[0], list) and first[0]:  # tf.keras 2: [[name, 0, 0, {}]]
        return first[0][0] if isinstance(first[0][0], str) else None
    return None


def _statistics(layer: KerasLayer) -> tuple[dict[str, TensorRef], list[str]]:
    """The layer's four tensors that can be judged, and why the others cannot: Keras assigns only
    a 1-D array of the layer's channel count (`Variable.assign` checks the shape), so anything
    else (not numbers, a scalar, 2-D, empty, another length) is unchecked, not silently absent."""
    unchecked = [ref.reason for ref in layer.weights.values() if isinstance(ref, UnreadableTensor)]
    tensors: dict[str, TensorRef] = {}
    for role, keras in ROLES.items():
        ref = layer.weights.get(keras)
        if ref is None or isinstance(ref, UnreadableTensor):
            continue
        if len(ref.shape) != 1 or ref.shape[0] == 0:
            unchecked.append(f"{keras}: shape {list(ref.shape)}, not a vector of per-channel values")
            continue
        tensors[role] = ref
    lengths = Counter(ref.shape[0] for ref in tensors.values())
    if len(lengths) > 1:
        anchor = tensors.get("running_var") or tensors.get("running_mean")
        channels = anchor.shape[0] if anchor is not None else lengths.most_common(1)[0][0]
        for role in [r for r, ref in tensors.items() if ref.shape[0] != channels]:
            unchecked.append(f"{ROLES[role]}: {tensors.pop(role).shape[0]} values where the layer has {channels} channels")
    return tensors, unchecked


def _bn_layer(layer: KerasLayer, order: int, channels_first: bool) -> BNLayer:
    config = layer.config
    bn = BNLayer(name=layer.path, kind=layer.class_name or "BatchNormalization", framework="keras", order=order)
    bn.tensors, bn.unchecked = _statistics(layer)
    ref = bn.tensors.get("running_mean") or bn.tensors.get("running_var")
    bn.channels = int(ref.shape[0]) if ref is not None and len(ref.shape) == 1 else None
    # NaN and Inf pass through (json.loads accepts NaN/Infinity): the rules judge them (BN202, BN304).
    eps, momentum = config.get("epsilon", conventions("keras").default_eps), config.get("momentum", conventions("keras").default_momentum)
    if isinstance(eps, (int, float)) and not isinstance(eps, bool):
        bn.eps = float(eps)
        bn.known.add("eps")
    if isinstance(momentum, (int, float)) and not isinstance(momentum, bool):
        bn.raw_momentum = float(momentum)
        bn.momentum = 1.0 - float(momentum)
        bn.known.add("momentum")
    center, scale = config.get("center", True), config.get("scale", True)
    bn.affine = bool(center or scale)
    bn.trainable, bn.effective_trainable = layer.trainable, layer.effective_trainable
    bn.call_training = layer.call_training
    bn.axis, bn.channel_axis = _channel_axis(layer, channels_first)
    options = {key: config[key] for key in ("renorm", "synchronized") if config.get(key)}
    if isinstance(config.get("virtual_batch_size"), int):
        options["virtual_batch_size"] = config["virtual_batch_size"]
    bn.training_options = options
    return bn


def to_model_info(keras: KerasFile) -> ModelInfo:
    """The ModelInfo rules see, from what `read_keras` read."""
    info = ModelInfo(path=keras.path, format=FORMAT_OF_KIND.get(keras.kind, "keras"), framework="keras",
                     format_version=f"Keras {keras.keras_version}" if keras.keras_version else None)
    channels_first = any(layer.config.get("data_format") == "channels_first" for layer in keras.layers)
    by_path = {layer.path: layer for layer in keras.layers}
    consumers: dict[str, int] = {}
    for layer in keras.layers:
        source = _inbound(layer)
        if source:
            key = f"{layer.parent}/{source}" if layer.parent else source
            consumers[key] = consumers.get(key, 0) + 1
    stochastic_seen = False
    for layer in keras.layers:
        stochastic_seen = stochastic_seen or is_stochastic(layer.class_name)
        has_weights = bool(layer.weights) or layer.class_name in OP_KINDS
        info.modules[layer.path] = ModuleRecord(name=layer.path, class_name=layer.class_name, trainable=layer.trainable,
                                                effective_trainable=layer.effective_trainable, parent=layer.parent,
                                                has_weights=has_weights and layer.class_name != "InputLayer", order=layer.order)
        if not layer.is_batchnorm:
            continue
        bn = _bn_layer(layer, len(info.layers), channels_first)
        siblings = [s for s in keras.layers if s.parent == layer.parent]
        bn.producer = _producer(layer, by_path, siblings, consumers)
        bn.after_stochastic = stochastic_seen
        info.layers.append(bn)
    info.other_norms = list(keras.other_norms)
    info.inputs = [GraphInput(name, shape, None) for name, shape in keras.inputs]
    info.notes = list(keras.notes)
    info.metadata.update(keras_version=keras.keras_version, backend=keras.backend, kind=keras.kind, model_class=keras.model_class)
    return info


def load_keras(path: Path, companion: Path | None = None) -> ModelInfo:
    """Read a Keras model or weights file as data. InputError (NotAModel for plain HDF5) otherwise."""
    return to_model_info(read_keras(path))
