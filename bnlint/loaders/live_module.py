"""A live torch.nn.Module (Python API, training-loop guard) as a ModelInfo.

Only called with a module the user already holds, so torch is already imported; nothing is run.
"""

from __future__ import annotations

from typing import Any

from bnlint.model import ArrayTensor, BNLayer, ModelInfo, ModuleRecord
from bnlint.norms import classify, is_batchnorm_class, is_stochastic


def _array(tensor: Any) -> ArrayTensor:
    import torch

    stored = str(tensor.dtype).replace("torch.", "")
    data = tensor.detach().cpu()
    if data.dtype == torch.bfloat16:
        data = data.float()
    return ArrayTensor(data.numpy().copy(), stored_dtype=stored)


def module_classes(module: Any) -> list[str]:
    """The module's class and its bases, most derived first (a subclass of BatchNorm2d is BatchNorm)."""
    return [cls.__name__ for cls in type(module).__mro__]


def module_to_model(module: Any, name: str = "<module>") -> ModelInfo:
    model = ModelInfo(path=name, format="torch-live", framework="torch")
    stochastic_seen = False
    for order, (path, sub) in enumerate(module.named_modules()):
        cls = type(sub)
        stochastic_seen = stochastic_seen or is_stochastic(cls.__name__)
        has_weights = any(True for _ in sub.parameters(recurse=False))
        model.modules[path] = ModuleRecord(name=path, class_name=f"{cls.__module__}.{cls.__qualname__}", training=sub.training,
                                           has_weights=has_weights, order=order)
        if classify(cls.__name__, "torch") == "other-norm":
            model.other_norms.append(f"{cls.__name__} '{path}'")
            continue
        if not is_batchnorm_class(module_classes(sub)):
            continue
        layer = BNLayer(name=path or cls.__name__, kind=cls.__name__, framework="torch", order=order, after_stochastic=stochastic_seen)
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
    return model
