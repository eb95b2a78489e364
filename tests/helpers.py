"""Builders for synthetic layers and models used by rule unit tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from bnlint.config import Config
from bnlint.context import RuleContext
from bnlint.engine import run_rules
from bnlint.model import ArrayTensor, BNLayer, ModelInfo


def make_layer(name: str = "bn1", channels: int = 8, seed: int = 0, known: dict[str, Any] | None = None, **tensors: Any) -> BNLayer:
    """A healthy-looking trained BN layer; keyword tensors (weight=..., running_var=...) override."""
    rng = np.random.default_rng(seed)
    values = {
        "weight": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "bias": rng.normal(0, 0.1, channels).astype(np.float32),
        "running_mean": rng.normal(0, 0.5, channels).astype(np.float32),
        "running_var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }
    values.update({k: np.asarray(v) for k, v in tensors.items() if v is not None})
    for key in [k for k, v in tensors.items() if v is None]:
        values.pop(key)
    layer = BNLayer(name=name, kind="BatchNorm2d", framework="torch", channels=channels,
                    tensors={k: ArrayTensor(v) for k, v in values.items()}, num_batches_tracked=1000)
    for attribute, value in (known or {}).items():
        if attribute in ("num_batches_tracked",):
            layer.num_batches_tracked = value
            continue
        setattr(layer, attribute, value)
        layer.known.add(attribute)
    return layer


def codes(layers: list[BNLayer], config: Config | None = None, reference: ModelInfo | None = None, **model_fields: Any) -> list[str]:
    model = ModelInfo(path="m.pt", format="torch-module", layers=layers, **model_fields)
    findings = run_rules(RuleContext(model=model, config=config or Config(), reference=reference))
    return sorted(f.code for f in findings)


def findings(layers: list[BNLayer], **model_fields: Any):  # type: ignore[no-untyped-def]
    model = ModelInfo(path="m.pt", format="torch-module", layers=layers, **model_fields)
    return run_rules(RuleContext(model=model, config=Config()))
