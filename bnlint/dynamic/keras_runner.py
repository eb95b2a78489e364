"""Run Keras models for --data: Keras 3 on the torch backend (no TensorFlow), in inference mode.

The model is loaded with `keras.saving.load_model(path, safe_mode=True)`: a `Lambda` layer's
bytecode or a custom class needs `--trust` (and, for custom classes, `--arch MODULE` naming the
module that registers them, imported like --arch). Every BatchNormalization layer's `call` is
wrapped, for the duration of a run only, to hand its input to the statistics; the wrappers are
removed in `finally`. The model always runs with `training=False`: BatchNormalization reads its
moving statistics and updates nothing.

Keras data are channels-last by default: each layer's `axis` says which axis holds its
channels, and the per-sample moments are taken over every other axis but the batch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any, Callable, Iterator

import numpy as np

from bnlint.conventions import conventions
from bnlint.dynamic.runner import Batches, Capture, LayerSpec, flatten_outputs
from bnlint.errors import DataError, InputError, TrustRequired, UsageError
from bnlint.model import ModelInfo
from bnlint.norms import classify


def import_keras() -> Any:
    """Keras 3 on the torch backend; one clear line when it is missing or set to another backend."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"  # before the first import: Keras reads it once
    try:
        import keras
    except ImportError:
        raise UsageError("running a Keras model on --data needs Keras 3 and torch (pip install bnlint[keras])") from None
    if not hasattr(keras, "saving") or int(keras.__version__.split(".")[0]) < 3:
        raise UsageError(f"running a Keras model on --data needs Keras 3 (found {keras.__version__}; pip install bnlint[keras])")
    if keras.backend.backend() != "torch":
        raise UsageError(f"Keras was already imported with the {keras.backend.backend()} backend; bnlint runs Keras on "
                         "torch: set KERAS_BACKEND=torch")
    return keras


def _import_custom(spec: str) -> dict[str, Any] | None:
    """--arch for Keras: `module` or `path/file.py` whose import registers custom classes, or
    `module:NAME` naming a dict of custom objects."""
    from bnlint.dynamic.loading import import_target

    target, _, attribute = spec.partition(":") if ":" in spec and not spec.endswith(".py") else (spec, "", "")
    module = import_target(target, "--arch")
    if not attribute:
        return None
    objects = getattr(module, attribute, None)
    if not isinstance(objects, dict):
        raise UsageError(f"--arch: {target}.{attribute} is not a dict of custom objects")
    return objects


def walk_layers(model: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, layer) for every layer, nested models included, named like the static loader:
    config names joined with '/'."""
    for layer in getattr(model, "layers", []):
        path = f"{prefix}{layer.name}"
        yield path, layer
        if hasattr(layer, "layers"):
            yield from walk_layers(layer, path + "/")


def _numpy(variable: Any) -> np.ndarray | None:
    if variable is None:
        return None
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64).reshape(-1)


class KerasRunner:
    """A Keras model whose BatchNormalization inputs are read through wrapped `call` methods."""

    def __init__(self, info: ModelInfo, device: Any, data_path: str, trust: bool, arch: str | None) -> None:
        keras = import_keras()
        import torch

        from bnlint.dynamic.stats import TorchOps

        self.data_path = data_path
        self.device = device
        self.ops = TorchOps(torch.device("cpu"))
        self.notes: list[str] = []
        self.fixed_batch: int | None = None
        custom = _import_custom(arch) if arch else None
        if info.format == "keras-weights":
            raise UsageError(f"{info.path}: holds Keras weights only (no model config); save the whole model "
                             "(model.save('model.keras')) to run it on --data")
        try:
            # safe_mode=True refuses Lambda bytecode; --trust lifts it, the user's explicit choice.
            self.model = keras.saving.load_model(info.path, custom_objects=custom, compile=False,
                                                 safe_mode=not trust)  # trusted: safe_mode off only with --trust
        except Exception as exc:  # Keras raises many types for unreadable or unsafe files
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            if not trust and ("safe_mode" in text or "Lambda" in text or "lambda" in text):
                raise TrustRequired(info.path, "holds a Lambda layer (Python bytecode): running it runs code from the file; "
                                    "pass --trust if you trust it") from None
            if "Could not locate" in text or "Unknown layer" in text or "custom" in text.lower():
                raise InputError(info.path, f"Keras could not rebuild the model: {text} (custom classes: pass --trust and "
                                 "--arch MODULE, the module that registers them)") from None
            raise InputError(info.path, f"keras.saving.load_model failed: {text}") from None
        self.bn = {path: layer for path, layer in walk_layers(self.model)
                   if classify(type(layer).__name__, "keras") == "bn"}
        self.layers = [self._spec(path, layer) for path, layer in self.bn.items()]
        self.input_names = [str(getattr(t, "name", f"input_{i}")).split(":")[0] for i, t in enumerate(self.model.inputs)]
        self.input_shapes: list[tuple[int | None, ...] | None] = [
            tuple(None if d is None else int(d) for d in tuple(t.shape)[1:]) for t in self.model.inputs]
        self.engine = f"keras {keras.__version__} (torch backend, cpu, inference mode)"
        if device is not None and getattr(device, "type", "cpu") != "cpu":
            self.notes.append("Keras models run on the CPU here (the torch backend picks its own device)")

    @staticmethod
    def _spec(path: str, layer: Any) -> LayerSpec:
        return LayerSpec(
            name=path,
            eps=float(getattr(layer, "epsilon", conventions("keras").default_eps)),
            running_mean=_numpy(getattr(layer, "moving_mean", None)),
            running_var=_numpy(getattr(layer, "moving_variance", None)),
            weight=_numpy(getattr(layer, "gamma", None)),
            bias=_numpy(getattr(layer, "beta", None)),
            uses_batch_stats=None,
        )

    @contextlib.contextmanager
    def _wrapped(self, record: Callable[[str, Any, Any, Any], None]) -> Iterator[None]:
        """Wrap every BN layer's `call` to record (layer, input, output); always unwrapped."""
        wrapped = []
        try:
            for path, layer in self.bn.items():
                original = layer.call

                def call(*args: Any, _path: str = path, _layer: Any = layer, _original: Any = original, **kwargs: Any) -> Any:
                    output = _original(*args, **kwargs)
                    record(_path, _layer, args[0] if args else kwargs.get("inputs"), output)
                    return output

                layer.call = functools.wraps(original)(call)
                wrapped.append(layer)
            yield
        finally:
            for layer in wrapped:
                with contextlib.suppress(AttributeError):
                    del layer.call  # the class's own method shows through again

    def _run(self, arrays: list[np.ndarray]) -> Any:
        import torch

        tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]
        try:
            with torch.no_grad():
                return self.model(tensors[0] if len(tensors) == 1 else tensors, training=False)
        except (ValueError, TypeError, RuntimeError, IndexError) as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            hint = ""
            shape = arrays[0].shape if arrays else ()
            if len(shape) == 4 and shape[1] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
                hint = " (the data looks channels-first, NCHW; Keras models expect channels-last, NHWC: np.moveaxis(x, 1, -1))"
            raise DataError(self.data_path, f"the model rejected the data (batch shape {tuple(shape)}): {text}{hint}") from None

    @staticmethod
    def _channels_second(x: Any, layer: Any) -> Any:
        """The layer's input with its normalised axis moved to position 1 (what the moments expect)."""
        axis = getattr(layer, "axis", -1)
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        if not isinstance(axis, int):
            return None
        axis = axis % x.dim()
        return x if axis == 1 else x.movedim(axis, 1)

    def collect(self, batches: Batches, add: Callable[[str, Any, Any, int], None], end_batch: Callable[[], None]) -> None:
        from bnlint.dynamic.hooks import per_sample_moments

        def record(path: str, layer: Any, x: Any, _output: Any) -> None:
            moved = self._channels_second(x, layer) if x is not None and x.dim() >= 2 else None
            if moved is not None and moved.shape[0] > 0:
                var, mean = per_sample_moments(moved)
                add(path, var, mean, moved[0, 0].numel())

        with self._wrapped(record):
            for _, arrays in batches:
                self._run(arrays)
                end_batch()

    def capture(self, arrays: list[np.ndarray]) -> Capture:
        store: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

        def record(path: str, layer: Any, x: Any, output: Any) -> None:
            moved_x, moved_y = self._channels_second(x, layer), self._channels_second(output, layer)
            if moved_x is not None and moved_y is not None:
                store.setdefault(path, []).append((moved_x.detach().float().numpy().copy(), moved_y.detach().float().numpy().copy()))

        with self._wrapped(record):
            output = self._run(arrays)
        outputs = [np.asarray(t.detach().float().numpy() if hasattr(t, "detach") else t, np.float32) for t in flatten_outputs(output)]
        return Capture(outputs=outputs, layers=store)
