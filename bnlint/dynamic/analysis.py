"""`measure`: run a model over --data and measure every BatchNorm layer's input (no judging here).

The result is a `bnlint.measurements.Measurements` whose layer names are the static loader's
(`ModelInfo.layers`), so the engine can judge static and measured facts in one pass.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from bnlint.config import Config
from bnlint.dynamic.data import Dataset, check_layout, zip_batches
from bnlint.dynamic.metrics import analyse_layer, layer_record
from bnlint.dynamic.options import DynamicOptions, dynamic_settings
from bnlint.dynamic.runner import Capture, LayerSpec, Progress, Runner
from bnlint.dynamic.stats import Collector
from bnlint.errors import UsageError
from bnlint.findings import DATA_WARNING
from bnlint.measurements import BatchDependence, DependentLayer, Measurements
from bnlint.model import ModelInfo
from bnlint.sandbox import events
from bnlint.settings import DynamicThresholds, override


def align_names(model: ModelInfo, runner_names: list[str], hints: dict[str, str]) -> dict[str, str]:
    """Runner layer name -> the static loader's name for the same layer.

    A runner names layers as the running network does (an --arch module without the checkpoint's
    `model.` prefix, say); findings and baselines must use one name per layer. `hints` are the
    runner's own knowledge (weights loaded from file key X into module Y); otherwise an exact
    name or alias match, then a unique dotted-suffix match. Unmatched names are kept.
    """
    static = {name: layer.name for layer in model.layers for name in layer.names()}
    aligned: dict[str, str] = {}
    for name in runner_names:
        for candidate in (hints.get(name), name):
            if candidate is not None and candidate in static:
                aligned[name] = static[candidate]
                break
        else:
            suffix = [layer.name for layer in model.layers if layer.name.endswith("." + name) or name.endswith("." + layer.name)]
            if len(suffix) == 1:
                aligned[name] = suffix[0]
    return aligned


def _renamed(capture: Capture, names: dict[str, str] | None) -> Capture:
    if not names:
        return capture
    return Capture(capture.outputs, {names.get(k, k): v for k, v in capture.layers.items()})


def _train_batch_size(model: ModelInfo, options: DynamicOptions) -> tuple[int | None, str | None]:
    if options.train_batch_size is not None:
        if options.train_batch_size < 1:
            raise UsageError("--train-batch-size must be a positive integer")
        return options.train_batch_size, "--train-batch-size"
    hyper = model.hyper_parameters
    if hyper is not None:
        for key in ("batch_size", "train_batch_size"):
            value = hyper.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"the checkpoint's hyper_parameters.{key}"
    return None, None


def _open_runner(model: ModelInfo, options: DynamicOptions, settings: DynamicThresholds, module: Any = None) -> Runner:
    """The runner for the model: a live module as it is, a file through its format record."""
    if module is not None:  # a live nn.Module from the Python API: run it where it already is
        from bnlint.dynamic.torch_runner import ModuleRunner, pick_device

        device = next((p.device for p in module.parameters()), None) or pick_device("cpu")
        return ModuleRunner(module, device, options.data, "live module")
    from bnlint.formats import FORMATS

    record = FORMATS.get(model.file_format or "")
    if record is None:
        raise UsageError(f"{model.path}: no runner for a {model.format} model read from {model.file_format or 'no file'}")
    if record.runner is None:
        raise UsageError(record.cannot_run or f"running a {record.description} on --data is not supported")
    runner: Runner = record.function(record.runner)(model, options, settings)
    return runner


def _relative(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if a.shape != b.shape or a.size == 0:
        return 0.0, 0.0
    both = np.isfinite(a) & np.isfinite(b)  # overflowed outputs compare as nothing (BN608 reports them)
    if not both.any():
        return 0.0, 0.0
    diff = float(np.max(np.abs(a[both].astype(np.float64) - b[both])))
    scale = float(np.max(np.abs(b[both]))) or 1.0
    return diff, diff / scale


def _eval_form(spec: LayerSpec, x: np.ndarray) -> np.ndarray | None:
    """What an eval-mode BN with the stored statistics outputs for x, or None if they are unknown."""
    if spec.running_mean is None or spec.running_var is None or x.ndim < 2 or spec.running_mean.size != x.shape[1]:
        return None
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = 1.0 / np.sqrt(spec.running_var + spec.eps)
    if spec.weight is not None and spec.weight.size == scale.size:
        scale = scale * spec.weight
    shift = spec.bias if spec.bias is not None and spec.bias.size == scale.size else 0.0
    return (x.astype(np.float64) - spec.running_mean.reshape(shape)) * scale.reshape(shape) + np.reshape(shift, shape if np.ndim(shift) else ())


def _compositions(runner: Runner, arrays: list[np.ndarray], names: dict[str, str] | None
                  ) -> tuple[Capture, Iterable[tuple[Capture, int, int]], str | None]:
    """The reference batch, and (capture, sample's row in the reference, its row there) for the
    same samples run in other batch compositions; plus why none could be made, if so.

    A free batch size runs each sample alone. A batch size fixed at B > 1 runs sample 0 twice:
    with samples 1..B-1 and with samples B..2B-2, so its batch mates change and its batch size
    does not. A batch fixed at 1 cannot vary at all.
    """
    k, fixed = arrays[0].shape[0], runner.fixed_batch
    if fixed is None:
        together = _renamed(runner.capture(arrays), names)
        # A generator: each single-sample capture (every BN input and output) is compared and
        # dropped before the next is made, so memory holds one of them, not k.
        alone = ((_renamed(runner.capture([a[i:i + 1] for a in arrays]), names), i, 0) for i in range(k))
        return together, alone, None
    if fixed > 1 and k >= 2 * fixed - 1:
        together = _renamed(runner.capture([a[:fixed] for a in arrays]), names)
        mates = _renamed(runner.capture([np.concatenate([a[:1], a[fixed:2 * fixed - 1]]) for a in arrays]), names)
        return together, [(mates, 0, 0)], None
    together = _renamed(runner.capture([a[:fixed] for a in arrays]), names)
    why = (f"the model's batch size is fixed at {fixed}" if fixed == 1 else
           f"the model's batch size is fixed at {fixed} and fewer than {2 * fixed - 1} samples were given")
    return together, [], why


def check_batch_dependence(runner: Runner, arrays: list[np.ndarray], tolerance: float,
                           names: dict[str, str] | None = None) -> BatchDependence:
    """Run samples in two batch compositions; compare outputs and every BN layer's input/output.

    In inference form BatchNorm is a fixed per-channel affine map, so a sample's results must not
    depend on its batch mates. A layer is blamed when its output changes while its input does not,
    or (when the model's output does depend on the batch, or no composition could be varied) when
    its output is not the eval-mode normalisation of its input with its stored statistics (inputs
    of later layers already differ, so only this test can tell whether they, too, use batch
    statistics).
    """
    together, others, skipped = _compositions(runner, arrays, names)
    max_abs = rel = 0.0
    compared = 0
    # Per layer over every other composition: max relative input change, max output change (abs, rel),
    # and how many compositions reached the layer at all.
    x_diff: dict[str, float] = {}
    y_abs: dict[str, float] = {}
    y_rel: dict[str, float] = {}
    reached: dict[str, int] = {}
    for capture, row, other_row in others:
        compared += 1
        for batched, single in zip(together.outputs, capture.outputs):
            if batched.shape[1:] == single.shape[1:] and row < batched.shape[0] and other_row < single.shape[0]:
                diff, ratio = _relative(single[other_row:other_row + 1], batched[row:row + 1])
                max_abs, rel = max(max_abs, diff), max(rel, ratio)
        for name, calls in together.layers.items():
            if not capture.layers.get(name):
                continue
            (x_b, y_b), (x, y) = calls[0], capture.layers[name][0]
            reached[name] = reached.get(name, 0) + 1
            x_diff[name] = max(x_diff.get(name, 0.0), _relative(x[other_row:other_row + 1], x_b[row:row + 1])[1])
            diff, ratio = _relative(y[other_row:other_row + 1], y_b[row:row + 1])
            y_abs[name], y_rel[name] = max(y_abs.get(name, 0.0), diff), max(y_rel.get(name, 0.0), ratio)
        del capture
    suspect = rel > tolerance or skipped is not None
    specs = {spec.name: spec for spec in runner.layers}
    culprits = []
    verified = 0  # layers whose output was checked against the eval-form normalisation of their input
    for name, calls in together.layers.items():
        x_b, y_b = calls[0]
        entry = None
        if compared and reached.get(name) == compared:
            if x_diff[name] <= tolerance < y_rel[name]:
                entry = DependentLayer(name, y_abs[name], y_rel[name], "its input is the same in both batches, its output is not")
        expected = _eval_form(specs[name], x_b) if name in specs else None
        verified += expected is not None
        if entry is None and suspect and expected is not None:
            f_abs, f_rel = _relative(y_b, expected)
            if f_rel > tolerance:
                entry = DependentLayer(name, f_abs, f_rel, "its output is not its input normalised with its stored statistics")
        if entry is None and rel > tolerance and name in specs and specs[name].uses_batch_stats:
            entry = DependentLayer(name, None, None, "its stored form computes mean and variance from the batch")
        if entry is not None:
            culprits.append(entry)
    samples = arrays[0].shape[0] if runner.fixed_batch is None else min(arrays[0].shape[0], 2 * runner.fixed_batch - 1)
    method = "alone" if runner.fixed_batch is None else "mates"
    not_batchnorm = False
    if rel > tolerance and not culprits and skipped is None and together.layers and verified == len(together.layers):
        # Every BN layer is in eval form: run the reference batch again to tell randomness (dropout
        # left in train mode) from arithmetic that merely differs with the batch size.
        reference = arrays if runner.fixed_batch is None else [a[:runner.fixed_batch] for a in arrays]
        again = runner.capture(reference)
        repeat = max((_relative(a, b)[1] for a, b in zip(again.outputs, together.outputs)), default=0.0)
        not_batchnorm = repeat <= tolerance
    return BatchDependence(samples, max_abs, rel, culprits, skipped=skipped, method=method, not_batchnorm=not_batchnorm)


def measure(model: ModelInfo, options: DynamicOptions, config: Config, module: Any = None,
            runner: Runner | None = None) -> Measurements:
    """Run `model` over `options.data`; return per-layer statistics named like `model.layers`.

    `runner`: one `open_runner` already opened for this model (bnlint fix measures with the runner
    its repair then reuses), else one is opened here.
    Raises DataError (bad data), InputError/TrustRequired (model cannot be run), UsageError.
    Activations that overflow to Inf/NaN are measured as such (BN608 reports them), so numpy's
    floating-point warnings are silenced here rather than printed to the user.
    """
    with np.errstate(all="ignore"):
        return _measure(model, options, config, module, runner)


def _settings(options: DynamicOptions, config: Config) -> DynamicThresholds:
    settings = dynamic_settings(config)
    for key in ("batch_size", "device", "onnx_engine"):
        settings = override(settings, key, getattr(options, key))
    return settings


def open_runner(model: ModelInfo, options: DynamicOptions, config: Config, module: Any = None) -> Runner:
    """The runner `measure` runs the model with (`module`: a live nn.Module, run where it is)."""
    events.stage("opening the model")
    return _open_runner(model, options, _settings(options, config), module)


def _measure(model: ModelInfo, options: DynamicOptions, config: Config, module: Any, runner: Runner | None = None) -> Measurements:
    settings = _settings(options, config)
    dataset = Dataset(options.data, max_samples=settings.max_samples)
    runner = runner if runner is not None else open_runner(model, options, config, module)
    sources = dataset.select(runner.input_names, options.inputs)
    for source, shape, name in zip(sources, runner.input_shapes, runner.input_names):
        check_layout(source, shape, name, options.data)
    samples = sources[0].samples
    batch_size = runner.fixed_batch or settings.batch_size
    notes = [*runner.notes, *dataset.notes]
    for source in sources:
        if source.dtype.kind in "ui" and source.dtype.itemsize <= 2:
            # A warning about the data, not a finding: reporters print it before the findings it explains.
            notes.append(f"{DATA_WARNING} array '{source.key}' holds {source.dtype} integers: if these are raw pixels "
                         "(0-255), normalise them as in training first, or every layer will look drifted")
    usable = samples - samples % batch_size if runner.fixed_batch else samples
    if runner.fixed_batch and usable < samples:
        notes.append(f"the model's batch size is fixed at {batch_size}: used {usable} of {samples} samples")
    train_batch, train_source = _train_batch_size(model, options)
    names = align_names(model, [spec.name for spec in runner.layers], getattr(runner, "file_names", {}))
    for each in runner.layers:
        each.name = names.get(each.name, each.name)

    collector = Collector(runner.ops, {spec.name: spec.eps for spec in runner.layers}, train_batch)

    def add(name: str, var: Any, mean: Any, values_per_sample: int) -> None:
        collector.add(names.get(name, name), var, mean, values_per_sample)
        events.layer(names.get(name, name))

    progress = Progress(usable, "bnlint: running the model on the data", quiet=options.quiet)
    done = 0

    def end_batch() -> None:
        nonlocal done
        collector.end_batch()
        done = min(usable, done + batch_size)
        progress.update(done)
        events.progress(done, usable)

    events.stage("running the model on the data")
    try:
        if usable:
            runner.collect(zip_batches(sources, batch_size, limit=usable), add, end_batch)
    finally:
        progress.close()

    by_name = {spec.name: spec for spec in runner.layers}
    layers = []
    measured = collector.layers()
    for order, (name, moments) in enumerate(measured.items()):
        spec = by_name.get(name)
        calls = collector.calls.get(name, 1)
        if calls > 1:  # a shared module saw each sample several times per forward
            moments.samples //= calls
        layer = analyse_layer(name, order, moments, spec.eps if spec else 1e-5,
                              spec.running_mean if spec else None, spec.running_var if spec else None, spec.weight if spec else None)
        layer.calls_per_forward = calls
        layers.append(layer)
    unreached = [spec.name for spec in runner.layers if spec.name not in measured]
    if unreached:
        notes.append(f"{len(unreached)} BatchNorm layer(s) never ran on this data: {', '.join(unreached[:5])}")

    dependence = None
    wanted = 2 * runner.fixed_batch - 1 if runner.fixed_batch else 0  # sample 0 in two compositions
    count = min(max(settings.dependence_samples, wanted), samples)
    if count >= 2 or (runner.fixed_batch and count >= runner.fixed_batch):
        first = next(zip_batches(sources, count, limit=count))[1]
        events.stage("checking batch dependence")
        dependence = check_batch_dependence(runner, first, settings.batch_dependence_rtol, names)
    return Measurements(
        layers=layers, samples=samples, settings=settings, engine=runner.engine,
        train_batch_size=train_batch, train_batch_source=train_source, dependence=dependence,
        batch_stats_layers=[s.name for s in runner.layers if s.uses_batch_stats],
        after_stochastic=sorted({s.name for s in runner.layers if s.after_stochastic}
                                | {layer.name for layer in model.layers if layer.after_stochastic}),
        layer_stats=[layer_record(layer, settings) for layer in layers], notes=notes,
    )
