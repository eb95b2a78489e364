"""`run_dynamic`: run a model over --data, measure every BatchNorm layer, and apply the BN6xx rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnlint.config import Config
from bnlint.dynamic.data import Dataset, check_layout, zip_batches
from bnlint.dynamic.metrics import LayerDrift, analyse_layer, layer_record
from bnlint.dynamic.options import DynamicOptions, DynamicResult, dynamic_settings, override, parse_arch_kwargs
from bnlint.dynamic.runner import LayerSpec, Progress, Runner
from bnlint.dynamic.stats import Collector
from bnlint.errors import UsageError
from bnlint.model import ModelInfo


@dataclass
class BatchDependence:
    """Outputs of samples run one at a time versus together (eval mode must not care)."""

    samples: int
    max_abs_diff: float
    relative_diff: float
    layers: list[dict[str, Any]] = field(default_factory=list)  # BN layers whose output changes while their input does not
    skipped: str | None = None  # why the check could not run


@dataclass
class DynamicAnalysis:
    """What the BN6xx rules see (the `subject` of dynamic-scope rules)."""

    model: ModelInfo
    layers: list[LayerDrift]  # in execution order
    samples: int
    settings: dict[str, Any]
    engine: str
    train_batch_size: int | None
    train_batch_source: str | None
    dependence: BatchDependence | None
    batch_stats_layers: list[str]  # layers known to normalise with batch statistics at inference
    notes: list[str] = field(default_factory=list)


def _train_batch_size(model: ModelInfo, options: DynamicOptions) -> tuple[int | None, str | None]:
    if options.train_batch_size is not None:
        if options.train_batch_size < 1:
            raise UsageError("--train-batch-size must be a positive integer")
        return options.train_batch_size, "--train-batch-size"
    hyper = model.metadata.get("hyper_parameters")
    if isinstance(hyper, dict):
        for key in ("batch_size", "train_batch_size"):
            value = hyper.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"the checkpoint's hyper_parameters.{key}"
    return None, None


def _open_runner(model: ModelInfo, options: DynamicOptions, settings: dict[str, Any], module: Any = None) -> Runner:
    if module is not None:  # a live nn.Module from the Python API: run it where it already is
        from bnlint.dynamic.torch_runner import ModuleRunner, pick_device

        device = next((p.device for p in module.parameters()), None) or pick_device("cpu")
        return ModuleRunner(module, device, options.data, "live module")
    if model.format == "onnx":
        if options.arch:
            raise UsageError("--arch applies to PyTorch weights, not to an ONNX file")
        from bnlint.dynamic.onnx_runner import OnnxRunner

        return OnnxRunner(model, settings["onnx_engine"], settings["device"], options.data)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("running a PyTorch model on --data needs torch (pip install bnlint[torch])") from None
    from bnlint.dynamic.loading import open_torch
    from bnlint.dynamic.torch_runner import pick_device

    device = pick_device(settings["device"])
    runner: Runner = open_torch(model, options.arch, parse_arch_kwargs(options.arch_kwargs), options.trust, device, options.data)
    return runner


def _relative(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if a.shape != b.shape or a.size == 0:
        return 0.0, 0.0
    diff = float(np.max(np.abs(a.astype(np.float64) - b)))
    scale = float(np.max(np.abs(b))) or 1.0
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


def check_batch_dependence(runner: Runner, arrays: list[np.ndarray], tolerance: float) -> BatchDependence:
    """Run k samples one at a time and as one batch; compare outputs and every BN layer's input/output.

    A layer is blamed when its output changes while its input does not, or (when the model's
    output does depend on the batch) when its output is not the eval-mode normalisation of its
    input with its stored statistics (inputs of later layers already differ, so only this test
    can tell whether they, too, use batch statistics).
    """
    k = arrays[0].shape[0]
    skipped = None
    if runner.fixed_batch is not None:  # cannot vary the batch: only the eval-form test below can run
        if k < runner.fixed_batch:
            return BatchDependence(k, 0.0, 0.0, skipped=f"fewer samples than the model's fixed batch size {runner.fixed_batch}")
        arrays = [a[: runner.fixed_batch] for a in arrays]
        k, skipped = runner.fixed_batch, f"the model's batch size is fixed at {runner.fixed_batch}"
    together = runner.capture(arrays)
    alone = [] if skipped else [runner.capture([a[i : i + 1] for a in arrays]) for i in range(k)]
    max_abs = rel = 0.0
    for single, batched in zip([np.concatenate(g) for g in zip(*(c.outputs for c in alone))], together.outputs):
        diff, ratio = _relative(single, batched)
        max_abs, rel = max(max_abs, diff), max(rel, ratio)
    suspect = rel > tolerance or skipped is not None
    specs = {spec.name: spec for spec in runner.layers}
    culprits = []
    for name, calls in together.layers.items():
        singles = [c.layers.get(name, []) for c in alone]
        x_b, y_b = calls[0]
        entry = None
        if alone and all(s for s in singles):
            _, x_rel = _relative(np.concatenate([s[0][0] for s in singles]), x_b)
            y_abs, y_rel = _relative(np.concatenate([s[0][1] for s in singles]), y_b)
            if x_rel <= tolerance < y_rel:
                entry = {"layer": name, "max_abs_diff": y_abs, "relative_diff": y_rel, "evidence": "its input is the same alone and in the batch, its output is not"}
        expected = _eval_form(specs[name], x_b) if name in specs else None
        if entry is None and suspect and expected is not None:
            f_abs, f_rel = _relative(y_b, expected)
            if f_rel > tolerance:
                entry = {"layer": name, "max_abs_diff": f_abs, "relative_diff": f_rel, "evidence": "its output is not its input normalised with its stored statistics"}
        if entry is None and rel > tolerance and name in specs and specs[name].uses_batch_stats:
            entry = {"layer": name, "max_abs_diff": None, "relative_diff": None, "evidence": "its stored form computes mean and variance from the batch"}
        if entry is not None:
            culprits.append(entry)
    return BatchDependence(k, max_abs, rel, culprits, skipped=skipped)


def run_dynamic(model: ModelInfo, options: DynamicOptions, config: Config, module: Any = None) -> DynamicResult:
    """Run `model` over `options.data`; return BN6xx findings, per-layer statistics and notes.

    Raises DataError (bad data), InputError/TrustRequired (model cannot be run), UsageError.
    """
    settings = dynamic_settings(config)
    for key in ("batch_size", "device", "onnx_engine"):
        override(settings, key, getattr(options, key))
    dataset = Dataset(options.data)
    runner = _open_runner(model, options, settings, module)
    sources = dataset.select(runner.input_names, options.inputs)
    for source, shape, name in zip(sources, runner.input_shapes, runner.input_names):
        check_layout(source, shape, name, options.data)
    samples = sources[0].samples
    batch_size = runner.fixed_batch or int(settings["batch_size"])
    notes = list(runner.notes)
    usable = samples - samples % batch_size if runner.fixed_batch else samples
    if runner.fixed_batch and usable < samples:
        notes.append(f"the model's batch size is fixed at {batch_size}: used {usable} of {samples} samples")
    train_batch, train_source = _train_batch_size(model, options)

    collector = Collector(runner.ops, {spec.name: spec.eps for spec in runner.layers}, train_batch)
    progress = Progress(usable, "bnlint: running the model on the data", quiet=options.quiet)
    done = 0

    def end_batch() -> None:
        nonlocal done
        collector.end_batch()
        done = min(usable, done + batch_size)
        progress.update(done)

    try:
        if usable:
            runner.collect(zip_batches(sources, batch_size, limit=usable), collector.add, end_batch)
    finally:
        progress.close()

    specs = {spec.name: spec for spec in runner.layers}
    layers = []
    measured = collector.layers()
    for order, (name, moments) in enumerate(measured.items()):
        spec = specs.get(name)
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
    count = min(max(int(settings["dependence_samples"]), runner.fixed_batch or 0), samples)
    if count >= 2 or (runner.fixed_batch and count >= runner.fixed_batch):
        first = next(zip_batches(sources, count, limit=count))[1]
        dependence = check_batch_dependence(runner, first, float(settings["batch_dependence_rtol"]))
    analysis = DynamicAnalysis(
        model=model, layers=layers, samples=samples, settings=settings, engine=runner.engine,
        train_batch_size=train_batch, train_batch_source=train_source, dependence=dependence,
        batch_stats_layers=[s.name for s in runner.layers if s.uses_batch_stats], notes=notes,
    )
    from bnlint.engine import RuleContext, run_rules

    findings = run_rules(RuleContext(model=model, config=config), scopes=("dynamic",), subject=analysis)
    return DynamicResult(
        findings=findings,
        layer_stats=[layer_record(layer, settings) for layer in layers],
        engine=runner.engine,
        samples=samples,
        notes=notes,
        batch_dependence=None if dependence is None else {
            "samples": dependence.samples, "max_abs_diff": dependence.max_abs_diff, "relative_diff": dependence.relative_diff,
            "layers": dependence.layers, "skipped": dependence.skipped},
    )
