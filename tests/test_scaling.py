"""Judging is linear in the number of layers: a graph built with one finding per layer must not
make the engine quadratic (it looked each finding's layer up by scanning every layer)."""

from __future__ import annotations

import time

import numpy as np

from bnlint.config import Config
from bnlint.context import RuleContext
from bnlint.engine import run_rules
from bnlint.model import ModelInfo
from tests.helpers import make_layer


def test_one_finding_per_layer_over_many_layers_is_fast() -> None:
    count = 20_000
    layers = [make_layer(f"bn{i}", channels=2, seed=i, running_var=np.array([np.nan, 1.0], dtype=np.float32)) for i in range(count)]
    model = ModelInfo(path="chain.onnx", format="onnx", framework="onnx", layers=layers)
    started = time.perf_counter()
    findings = run_rules(RuleContext(model=model, config=Config(select=("BN101",))))
    elapsed = time.perf_counter() - started
    assert len(findings) == count
    assert elapsed < 30, elapsed  # about a second; a scan per finding took minutes
