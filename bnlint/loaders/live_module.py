"""A live torch.nn.Module (Python API, training-loop guard) as a ModelInfo.

Only called with a module the user already holds, so torch is already imported; nothing is run.
"""

from __future__ import annotations

from typing import Any

from bnlint.model import ArrayTensor, BNLayer, ModelInfo, ModuleRecord

_NORM_NAMES = ("InstanceNorm", "GroupNorm", "LayerNorm", "RMSNorm", "LocalResponseNorm")


def _array(tensor: Any) -> ArrayTensor:
    import torch

    stored = str(tensor.dtype).replace("torch.", "")
    data = tensor.detach().cpu()
    if data.dtype == torch.bfloat16:
        data = data.float()
    return ArrayTensor(data.numpy().copy(), stored_dtype=stored)


def module_to_model(module: Any, name: str = "<module>") -> ModelInfo:
    from bnlint.dynamic.hooks import is_batchnorm  # the same test the dynamic runner uses

    model = ModelInfo(path=name, format="torch-live")
    others: list[str] = []
    for order, (path, sub) in enumerate(module.named_modules()):
        cls = type(sub)
        model.modules[path] = ModuleRecord(name=path, class_name=f"{cls.__module__}.{cls.__qualname__}", training=sub.training)
        if any(n in cls.__name__ for n in _NORM_NAMES):
            others.append(f"{cls.__name__} '{path}'")
            continue
        if not is_batchnorm(sub):
            continue
        layer = BNLayer(name=path or cls.__name__, kind=cls.__name__, framework="torch", order=order)
        for tensor in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(sub, tensor, None)
            if value is not None:
                layer.tensors[tensor] = _array(value)
        counter = getattr(sub, "num_batches_tracked", None)
        layer.num_batches_tracked = None if counter is None else int(counter)
        layer.channels = getattr(sub, "num_features", None) or (layer.tensors["running_var"].shape[0] if "running_var" in layer.tensors else None)
        for attribute in ("eps", "momentum", "affine", "track_running_stats"):
            if hasattr(sub, attribute):
                setattr(layer, attribute, getattr(sub, attribute))
                layer.known.add(attribute)
        layer.training = sub.training
        layer.known.add("training")
        layer.requires_grad = {n: p.requires_grad for n, p in sub.named_parameters(recurse=False)}
        model.layers.append(layer)
    if others:
        model.metadata["other_norms"] = others
    return model
