"""The ONNX statistics graph frees each BatchNorm input as soon as it is reduced.

onnxruntime schedules nodes by a walk back from the graph's outputs. With one output per layer it
ran every reduction after the whole network and held every BatchNorm input of the batch at once
(5.3 GB against 0.8 GB for plain inference on ResNet-50, batch 32: bench/bench_onnx_memory.py).
The runner chains the layers' statistics into one output so that each layer's reductions run
right after its input exists. Memory itself is a bench figure, not a test; what is tested here is
the schedule that produces it, read from onnxruntime's own profile, and that the one chained
output decodes to the same statistics as a direct numpy computation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bnlint.loaders import load_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "fixtures" / "convnet.onnx"
DATA = ROOT / "fixtures" / "data" / "convnet_indomain.npz"


def _runner():  # type: ignore[no-untyped-def]
    from bnlint.dynamic.onnx_runner import OnnxRunner

    return OnnxRunner(load_model(MODEL), "onnxruntime", "cpu", str(DATA))


def test_each_layer_is_reduced_before_the_network_moves_on(tmp_path: Path) -> None:
    runner = _runner()
    model = runner._full_stats_model()
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    images = np.load(DATA)["input"][:4]
    session.run(None, {runner.input_names[0]: images})
    events = json.loads(Path(session.end_profiling()).read_text())
    order = [e["name"][: -len("_kernel_time")] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    layer_of = [int(m.group(1)) if (m := re.match(r"bnlint/(\d+)/", name)) else None for name in order]
    layers = len(runner.layers)
    assert layers == 3 and {layer for layer in layer_of if layer is not None} == set(range(layers)), order
    # Layer k's reductions all run before any of layer k+1's, with network nodes in between:
    # not all of them after the whole network (which is what held every input alive at once).
    for k in range(layers - 1):
        last_k = max(i for i, layer in enumerate(layer_of) if layer == k)
        first_next = min(i for i, layer in enumerate(layer_of) if layer == k + 1)
        assert last_k < first_next, order
        assert any(layer is None for layer in layer_of[last_k:first_next]), order


def test_the_chained_output_decodes_to_exact_per_sample_moments() -> None:
    """Per sample and channel: the mean and the population variance over the spatial positions,
    against numpy on the BatchNorm inputs onnxruntime itself produces (io capture)."""
    runner = _runner()
    images = np.load(DATA)["input"][:5]
    capture = runner.capture([images])
    seen: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    runner.collect(iter([(5, [images])]), lambda name, var, mean, size: seen.__setitem__(name, (var, mean, size)), lambda: None)
    assert list(seen) == [spec.name for spec in runner.layers]
    for spec in runner.layers:
        x = capture.layers[spec.name][0][0].astype(np.float64)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        var, mean, size = seen[spec.name]
        assert size == flat.shape[2]
        np.testing.assert_allclose(mean, flat.mean(axis=2), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, flat.var(axis=2), rtol=1e-4, atol=1e-6)
