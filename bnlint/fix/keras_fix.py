"""The Keras side of `bnlint fix`: exact recalibration of every BatchNormalization layer, and writing
the result into a copy of the `.keras` / `.h5` file.

Recalibration runs the model as the linter does (Keras 3 on the torch backend, inference mode,
`bnlint.dynamic.keras_runner`), one layer at a time in execution order: a pass over the data
stops right after the layer's input has been measured (the rest of the network is not run), the
layer's moving statistics are set, and the next layer is measured with them in place. That costs
about K/2 forward passes for K layers; Keras models are not traced into a graph here, so the
layer-major single pass of the PyTorch engine is not available.

Keras stores the *biased* batch variance in `moving_variance` (its update averages
`ops.moments`, which divides by n), so that is what is written (PyTorch stores the unbiased one).

Writing patches only the moving_mean / moving_variance datasets of a copy: for a `.keras` archive
the weights member `model.weights.h5` is copied out, patched with h5py, and the archive rebuilt
with every other member's bytes unchanged; an `.h5` file is copied and patched in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bnlint.dynamic.keras_runner import KerasRunner
from bnlint.dynamic.stats import Collector
from bnlint.errors import InputError
from bnlint.fix.recalibrate import LayerRecalibration, RecalibrationError, RecalibrationResult, finish_layer, select
from bnlint.model import ModelInfo

WEIGHTS_MEMBER = "model.weights.h5"


class _Measured(Exception):
    """Raised inside the measured layer's call: the rest of the forward pass is not needed."""


def recalibrate_keras(info: ModelInfo, data: str, *, layers: str | Sequence[str] | None = None, trust: bool = False,
                      arch: str | None = None, inputs: Mapping[str, str] | None = None, batch_size: int = 32) -> RecalibrationResult:
    """Set every selected BN layer's moving statistics to the population statistics of its input on
    `data`, in execution order, in the loaded model (the file is not written: see `write_keras_fix`)."""
    import torch

    from bnlint.dynamic.data import Dataset, check_layout, zip_batches
    from bnlint.dynamic.hooks import per_sample_moments

    runner = KerasRunner(info, None, data, trust, arch)
    sources = Dataset(data).select(runner.input_names, dict(inputs or {}))
    for source, shape, name in zip(sources, runner.input_shapes, runner.input_names):
        check_layout(source, shape, name, data)
    chosen = select(list(runner.bn), layers)
    results: list[LayerRecalibration] = []
    passes = 0
    for order, name in enumerate(runner.bn):
        if name not in chosen:
            continue
        layer = runner.bn[name]
        spec = next(s for s in runner.layers if s.name == name)
        collector = Collector(runner.ops, {name: spec.eps})

        def call(*args: Any, _name: str = name, _layer: Any = layer, _collector: Collector = collector, **kwargs: Any) -> Any:
            x = args[0] if args else kwargs.get("inputs")
            moved = runner._channels_second(x, _layer)
            if moved is None:
                raise RecalibrationError(f"layer {_name}: its axis {getattr(_layer, 'axis', None)!r} cannot be recalibrated")
            var, mean = per_sample_moments(moved)
            _collector.add(_name, var, mean, moved[0, 0].numel())
            raise _Measured

        layer.call = call
        try:
            with torch.no_grad():
                for _, arrays in zip_batches(sources, batch_size):
                    try:
                        runner._run(arrays)
                    except _Measured:
                        pass
                    collector.end_batch()
        finally:
            del layer.call
        passes += 1
        moments = collector.layers().get(name)
        if moments is None:
            continue
        old = {"running_mean": spec.running_mean, "running_var": spec.running_var, "weight": spec.weight}
        result = finish_layer(name, name, order, moments, collector.calls.get(name, 1), spec.eps, old, None, False)
        count = result.count
        biased = result.var * ((count - 1.0) / count)  # Keras keeps the biased variance
        layer.moving_mean.assign(result.mean.astype(np.float32))
        layer.moving_variance.assign(biased.astype(np.float32))
        results.append(result)
    samples = sources[0].samples if sources else 0
    return RecalibrationResult(results, "keras-truncated", passes, samples, -(-samples // batch_size),
                               notes=["Keras: one truncated pass per layer (about K/2 forward passes for K layers); "
                                      "moving_variance stored biased, as Keras does"])


def write_keras_fix(info: ModelInfo, output: str | os.PathLike[str] | None, result: RecalibrationResult,
                    *, in_place: bool = False) -> Path:
    """Copy the Keras file and patch only the recalibrated layers' moving_mean / moving_variance."""
    import h5py

    from bnlint.loaders.keras_archive import read_keras

    source = Path(info.path)
    target = source if in_place else Path(output) if output is not None else None
    if target is None:
        raise RecalibrationError("give an output file (-o FIXED) or --in-place")
    if not in_place and target.resolve() == source.resolve():
        raise RecalibrationError(f"{target}: the output would overwrite the input; use --in-place to mean it")
    with read_keras(source, isolate=False) as keras_file:
        labels = {layer.path: {role: ref.label for role, ref in layer.weights.items() if hasattr(ref, "label")}
                  for layer in keras_file.batchnorm_layers}
    patches: dict[str, np.ndarray] = {}
    for layer in result.layers:
        places = labels.get(layer.name, {})
        if "moving_mean" not in places or "moving_variance" not in places:
            raise RecalibrationError(f"layer {layer.name}: its moving statistics were not found in {source}")
        biased = layer.var * ((layer.count - 1.0) / layer.count)
        patches[places["moving_mean"]] = layer.mean
        patches[places["moving_variance"]] = biased
    folder = target.parent
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        if zipfile.is_zipfile(source):
            _patch_archive(source, Path(temp), patches, h5py)
        else:
            shutil.copyfile(source, temp)
            _patch_h5(Path(temp), patches, h5py)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target


def _patch_h5(path: Path, patches: Mapping[str, np.ndarray], h5py: Any) -> None:
    with h5py.File(path, "r+") as store:
        for label, values in patches.items():
            dataset = store[label]
            if tuple(dataset.shape) != tuple(values.shape):
                raise InputError(str(path), f"{label}: shape {tuple(dataset.shape)} in the file, {values.shape} computed")
            dataset[...] = values.astype(dataset.dtype)


def _patch_archive(source: Path, target: Path, patches: Mapping[str, np.ndarray], h5py: Any) -> None:
    """Rebuild the .keras zip with a patched weights member; every other member copied as it was."""
    with tempfile.TemporaryDirectory() as scratch:
        weights = Path(scratch) / WEIGHTS_MEMBER
        with zipfile.ZipFile(source) as archive:
            if WEIGHTS_MEMBER not in archive.namelist():
                raise InputError(str(source), f"no {WEIGHTS_MEMBER} in the archive: only HDF5 weights can be patched")
            with archive.open(WEIGHTS_MEMBER) as member, open(weights, "wb") as out:
                shutil.copyfileobj(member, out)
            _patch_h5(weights, patches, h5py)
            with zipfile.ZipFile(target, "w") as rebuilt:
                for item in archive.infolist():
                    if item.filename == WEIGHTS_MEMBER:
                        rebuilt.write(weights, item.filename, compress_type=item.compress_type)
                    else:
                        rebuilt.writestr(item, archive.read(item.filename), compress_type=item.compress_type)
