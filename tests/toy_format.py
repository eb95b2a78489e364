"""A toy model format registered from this one module, for tests/test_format_plugin.py.

A `.bntoy` file is JSON: {"bntoy": 1, "layers": [{"name", "mean", "var", "eps"}]}, a chain of
BatchNorm layers over an (N, C) input. Everything bnlint needs to find, read, lint and run it is
here: the sniffer, the loader, the runner and the registration. The runner runs in bnlint's
isolated child, which imports this module because it registered a format (formats.plugin_modules).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bnlint.dynamic.ops import NumpyOps
from bnlint.dynamic.runner import Batches, Capture, LayerSpec
from bnlint.dynamic.stats import per_sample_moments_numpy
from bnlint.errors import InputError
from bnlint.formats import FormatRecord, Sniff, register_format
from bnlint.model import BNLayer, ModelInfo


@dataclass
class ArrayTensor:
    values: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self) -> str:
        return str(self.values.dtype)

    def numpy(self) -> np.ndarray:
        return self.values


def sniff(file: Sniff) -> bool:
    return file.head.lstrip().startswith(b'{"bntoy"')


def load(path: Path, companion: Path | None = None) -> ModelInfo:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        layers = document["layers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(str(path), f"not a valid toy model ({exc})") from None
    info = ModelInfo(path=str(path), format="toy", framework="onnx", exported=True)
    for order, entry in enumerate(layers):
        mean, var = np.asarray(entry["mean"], dtype=np.float32), np.asarray(entry["var"], dtype=np.float32)
        layer = BNLayer(entry["name"], "BatchNormalization", "onnx", order=order, channels=len(mean),
                        tensors={"running_mean": ArrayTensor(mean), "running_var": ArrayTensor(var)}, eps=float(entry["eps"]))
        info.layers.append(layer)
    return info


class ToyRunner:
    """Runs the chain in numpy: each layer normalises with its stored statistics."""

    engine = "numpy (toy)"
    input_names = ["x"]
    fixed_batch = None

    def __init__(self, model: ModelInfo, options: Any, settings: Any) -> None:
        self.layers = [LayerSpec(layer.name, eps=float(layer.eps or 1e-5), running_mean=layer.array("running_mean"),
                                 running_var=layer.array("running_var")) for layer in model.layers]
        self.input_shapes: list[tuple[int | None, ...] | None] = [(self.layers[0].running_mean.shape[0],)] if self.layers else [None]  # type: ignore[union-attr]
        self.notes: list[str] = []

    @property
    def ops(self) -> NumpyOps:
        return NumpyOps()

    def _forward(self, x: np.ndarray, seen: Callable[[str, np.ndarray, np.ndarray], None]) -> np.ndarray:
        for spec in self.layers:
            assert spec.running_mean is not None and spec.running_var is not None
            y = (x - spec.running_mean) / np.sqrt(spec.running_var + spec.eps)
            seen(spec.name, x, y)
            x = y
        return x

    def collect(self, batches: Batches, add: Callable[[str, Any, Any, int], None], end_batch: Callable[[], None]) -> None:
        for _, arrays in batches:
            self._forward(np.asarray(arrays[0], np.float64), lambda name, x, y: add(name, *per_sample_moments_numpy(x[:, :, None]), 1))
            end_batch()

    def capture(self, arrays: list[np.ndarray]) -> Capture:
        store: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        out = self._forward(np.asarray(arrays[0], np.float64), lambda name, x, y: store.setdefault(name, []).append((x, y)))
        return Capture(outputs=[out.astype(np.float32)], layers=store)


def open_runner(model: ModelInfo, options: Any, settings: Any) -> ToyRunner:
    return ToyRunner(model, options, settings)


RECORD = register_format(FormatRecord("toy", "onnx", "toy model", "tests.toy_format:load", sniffers=((5, "tests.toy_format:sniff"),),
                                      extensions=(".bntoy",), runner="tests.toy_format:open_runner",
                                      records=frozenset({"run"})))
