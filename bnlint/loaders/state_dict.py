"""Find BatchNorm layers in state_dict-style tensors (plus the module tree when the file has one).

With a module tree (pickled nn.Module, TorchScript) the class decides: BatchNorm1d/2d/3d,
SyncBatchNorm, LazyBatchNorm*, FrozenBatchNorm2d are BN ("known"); InstanceNorm/GroupNorm/LayerNorm
are not (their names go to ModelInfo.other_norms); a class with another name that carries
running_mean/running_var buffers and an eps is BN-like ("inferred").

Without one (bare state dicts, safetensors) a module prefix with 1-D running_mean and running_var
of equal length is BN-like ("inferred"). InstanceNorm with track_running_stats=True writes the same
keys, so a prefix whose path has an instance-norm hint (a component such as `in`, `in1`, `in_...`,
`inorm`, `instance...`) is skipped and reported in other_norms instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from bnlint.loaders.lazy_tensor import LazyTensor
from bnlint.loaders.torch_objects import Extracted, ModuleNode
from bnlint.model import BNLayer, ModelInfo, ModuleRecord, TensorRef
from bnlint.norms import NormKind, classify, is_stochastic, short_name

INSTANCE_HINT = re.compile(r"^(in\d*|in_.*|inorm.*|.*instance.*|instnorm.*)$", re.IGNORECASE)
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
ATTRIBUTES = ("eps", "momentum", "affine", "track_running_stats", "training")


def classify_module(node: ModuleNode) -> NormKind:
    """'bn' (known class), 'bn-like' (inferred), 'other-norm' or 'other' (bnlint.norms decides)."""
    has_stats = "running_mean" in node.buffers and "running_var" in node.buffers
    return classify(node.class_name, "torch", has_running_stats=has_stats, has_eps="eps" in node.attrs)


def _count(tensor: TensorRef | None) -> int | None:
    """num_batches_tracked as an int (a one-element tensor: reading it costs 8 bytes)."""
    if tensor is None:
        return None
    try:
        values = tensor.numpy().reshape(-1)
    except Exception:  # noqa: BLE001 - an unreadable counter is simply unknown
        return None
    return int(values[0]) if values.size == 1 else None


def _channels(tensors: Mapping[str, TensorRef]) -> int | None:
    for key in ("running_mean", "running_var", "weight", "bias"):
        ref = tensors.get(key)
        if ref is not None and len(ref.shape) == 1:
            return int(ref.shape[0])
    return None


def _layer_from_module(node: ModuleNode, certainty: str, order: int) -> BNLayer:
    tensors = {k: v for k, v in {**node.params, **node.buffers}.items() if v is not None and k in BN_SUFFIXES}
    layer = BNLayer(name=node.name or "(root)", kind=short_name(node.class_name), framework="torch",
                    certainty=certainty, order=order)
    layer.tensors = {k: v for k, v in tensors.items() if k != "num_batches_tracked"}
    for attribute in ATTRIBUTES:
        if attribute not in node.attrs:
            continue
        value = node.attrs[attribute]
        if attribute == "momentum" and not (value is None or isinstance(value, (int, float))):
            continue
        if attribute in ("eps",) and not isinstance(value, (int, float)):
            continue
        if attribute in ("affine", "track_running_stats", "training") and not isinstance(value, bool):
            continue
        setattr(layer, attribute, float(value) if attribute in ("eps", "momentum") and value is not None else value)
        layer.known.add(attribute)
    num_features = node.attrs.get("num_features")
    layer.channels = num_features if isinstance(num_features, int) and not isinstance(num_features, bool) else _channels(tensors)
    for name in ("weight", "bias"):
        ref = node.params.get(name)
        if isinstance(ref, LazyTensor):
            layer.requires_grad[name] = ref.requires_grad
    if layer.requires_grad:
        layer.known.add("requires_grad")
    if "num_batches_tracked" in tensors:
        layer.num_batches_tracked = _count(tensors["num_batches_tracked"])
        if layer.num_batches_tracked is not None:
            layer.known.add("num_batches_tracked")
    return layer


def _group_by_prefix(tensors: Mapping[str, TensorRef]) -> dict[str, dict[str, TensorRef]]:
    groups: dict[str, dict[str, TensorRef]] = {}
    for key, ref in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = ref
    return groups


def _instance_hinted(prefix: str) -> bool:
    parts = [part for part in prefix.split(".") if part]
    bn_named = any("bn" in part.lower() or "batch" in part.lower() for part in parts)
    return not bn_named and any(INSTANCE_HINT.match(part) for part in parts)


def layers_from_state_dict(
    tensors: Mapping[str, TensorRef], modules: Mapping[str, ModuleNode] | None = None
) -> tuple[list[BNLayer], list[str]]:
    """(BN layers in definition order, names of other normalisation layers deliberately skipped)."""
    layers: list[BNLayer] = []
    other_norms: list[str] = []
    if modules:
        stochastic_seen = False
        for node in modules.values():
            stochastic_seen = stochastic_seen or is_stochastic(node.class_name)
            kind = classify_module(node)
            if kind == "other-norm":
                other_norms.append(node.name)
            elif kind in ("bn", "bn-like"):
                layers.append(_layer_from_module(node, "known" if kind == "bn" else "inferred", len(layers)))
                layers[-1].after_stochastic = stochastic_seen
        return layers, other_norms
    for prefix, group in _group_by_prefix(tensors).items():
        mean, var = group.get("running_mean"), group.get("running_var")
        if mean is None or var is None or len(mean.shape) != 1 or tuple(mean.shape) != tuple(var.shape):
            continue
        if _instance_hinted(prefix):
            other_norms.append(prefix)
            continue
        layer = BNLayer(name=prefix or "(root)", kind="BatchNorm", framework="torch", certainty="inferred",
                        order=len(layers), channels=int(mean.shape[0]))
        layer.tensors = {k: v for k, v in group.items() if k in BN_SUFFIXES and k != "num_batches_tracked"}
        if "num_batches_tracked" in group:
            layer.num_batches_tracked = _count(group["num_batches_tracked"])
            if layer.num_batches_tracked is not None:
                layer.known.add("num_batches_tracked")
        layers.append(layer)
    return layers, other_norms


def key_prefix(keys: list[str]) -> str:
    """The dotted prefix every key shares (e.g. 'module.' from DataParallel), '' if none."""
    if len(keys) < 2:
        return ""
    split = [k.split(".") for k in keys]
    shared: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        shared.append(parts[0])
    shared = shared[: min(len(s) for s in split) - 1]  # keep at least the leaf name
    return ".".join(shared) + "." if shared else ""


def to_model_info(extracted: Extracted) -> ModelInfo:
    """The ModelInfo rules see, from what a torch/safetensors loader read."""
    info = ModelInfo(path=extracted.path, format=extracted.format, framework="torch")
    info.unsafe_globals = list(extracted.unsafe_globals)
    info.unknown_callables = list(extracted.unknown_callables)
    info.unsafe_code = list(extracted.unsafe_code)
    info.notes = list(extracted.notes)
    info.metadata.update(extracted.metadata)
    layers, other_norms = layers_from_state_dict(extracted.tensors, extracted.modules)
    info.layers = layers
    if extracted.modules:
        for order, node in enumerate(extracted.modules.values()):
            training = node.attrs.get("training")
            info.modules[node.name] = ModuleRecord(node.name, node.class_name, training if isinstance(training, bool) else None,
                                                   has_weights=any(v is not None for v in node.params.values()), order=order)
    keys = list(extracted.tensors)
    info.key_prefix = key_prefix(keys)
    info.averaged_buffers = [k for k in keys if k.rsplit(".", 1)[-1] == "n_averaged"]
    info.other_norms = other_norms
    info.traced_training = list(extracted.traced_training)
    hyper = extracted.metadata.get("hyper_parameters")
    info.hyper_parameters = hyper if isinstance(hyper, Mapping) else None
    info.metadata["tensor_count"] = len(keys)
    return info
