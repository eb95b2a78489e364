"""`bnlint fix`, end to end: pick the repair for the file's framework, write the result, and measure
the drift on the data before and after with the linter itself.

    outcome = run_fix(FixOptions(model="m.pt", data="target.npz", output="fixed.pt", arch="models.py:net"))

The before/after table is the linter's own dynamic analysis (`bnlint.dynamic.measure`, judged by
`bnlint.api.lint_file`) on the input and on the output: the same metrics BN601/BN602 judge, so "fixed" means bnlint on
the output with the same data reports no drift.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bnlint.config import Config
from bnlint.errors import TrustRequired, UsageError
from bnlint.findings import Report
from bnlint.fix.recalibrate import RecalibrationError

# Statistics re-estimated from a handful of samples are noise, not population statistics, and they
# would overwrite trained ones (test-time BN from tiny batches degrades: DELTA, TTN). 32 is a floor,
# not a recommendation: precise BN uses thousands.
MIN_SAMPLES = 32


@dataclass
class FixOptions:
    model: str
    data: str | None = None
    output: str | None = None
    in_place: bool = False
    layers: str | None = None  # glob(s), comma-separated
    dry_run: bool = False
    fold: bool = False
    arch: str | None = None
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    trust: bool = False
    inputs: Mapping[str, str] = field(default_factory=dict)
    batch_size: int = 32
    device: str = "cpu"
    onnx_engine: str = "auto"
    timeout: float | None = None  # seconds for the isolated child that runs the model (None: sized to the work)
    process_group: Any = None  # torch.distributed group under torchrun: statistics merged across processes
    min_samples: int = MIN_SAMPLES  # fewer samples in --data: refused (their statistics would be noise)


@dataclass
class FixOutcome:
    """What was repaired, where it was written, and the drift before and after."""

    model: str
    output: str | None
    framework: str
    actions: list[str]  # recalibrated, rewritten to inference form, folded
    layers: list[dict[str, Any]]  # per layer: name and before/after mean |SMD|, mean KL (from the linter)
    first_drift_before: str | None
    first_drift_after: str | None
    refused: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # method, passes, fold max abs difference, ...
    before: Report | None = None
    after: Report | None = None
    # Set in the isolated child: the engines' per-layer results (LayerRecalibration), and whether
    # the repair changed more than statistics (an ONNX rewrite or fold), which needs a full re-run.
    recalibrated: list[Any] = field(default_factory=list, repr=False)
    restructured: bool = False
    # In the child: the runner the input was measured with, which a torch repair reuses instead of
    # opening the model again (measuring leaves the module as it was: hooks are removed, and a
    # TorchScript archive's own methods are never rewritten).
    opened: Any = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        return {"model": self.model, "output": self.output, "framework": self.framework, "actions": self.actions,
                "layers": self.layers, "first_drift_before": self.first_drift_before,
                "first_drift_after": self.first_drift_after, "refused": self.refused, "notes": self.notes,
                "details": self.details}


def _dynamic_options(options: FixOptions) -> Any:
    from bnlint.dynamic import DynamicOptions

    return DynamicOptions(data=options.data or "", inputs=dict(options.inputs), batch_size=options.batch_size, arch=options.arch,
                          arch_kwargs=dict(options.arch_kwargs), trust=options.trust, device=options.device,
                          onnx_engine=options.onnx_engine, quiet=True, timeout=options.timeout)


def _measure_here(info: Any, path: str, options: FixOptions, config: Config) -> Report | None:
    """The linter's report on `path` from measuring the already loaded `info` in this process (None
    without data): under torchrun the processes torchrun started are the isolation, and the
    model is not loaded again to be measured."""
    if options.data is None:
        return None
    from bnlint.dynamic import measure

    return _judge(path, options, config, measure(info, _dynamic_options(options), config), model=info)


def _judge(path: str, options: FixOptions, config: Config, measured: Any, model: Any = None) -> Report | None:
    """The linter's report on `path` from measurements the isolated child already made (`model`:
    the file already loaded here)."""
    if measured is None:
        return None
    from bnlint.api import lint_file

    result = lint_file(Path(path), config, dynamic=_dynamic_options(options), measured=measured, model=model)
    return Report(files=[result] if result is not None else [])


def _first_drift(report: Report | None) -> str | None:
    if report is None:
        return None
    return next((f.layer for f in report.findings if f.code == "BN602"), None)


def _table(before: Report | None, after: Report | None) -> list[dict[str, Any]]:
    stats_before = {s["layer"]: s for r in (before.files if before else []) for s in r.layer_stats}
    stats_after = {s["layer"]: s for r in (after.files if after else []) for s in r.layer_stats}
    rows = []
    for name in dict.fromkeys([*stats_before, *stats_after]):
        b, a = stats_before.get(name, {}), stats_after.get(name, {})
        rows.append({"layer": name, "mean_abs_smd_before": b.get("mean_abs_smd"), "mean_abs_smd_after": a.get("mean_abs_smd"),
                     "mean_kl_before": b.get("mean_kl"), "mean_kl_after": a.get("mean_kl")})
    return rows


def _target(options: FixOptions) -> str | None:
    if options.dry_run:
        return None
    if options.in_place:
        return options.model
    if not options.output:
        raise UsageError("bnlint fix needs -o FIXED (or --in-place, or --dry-run)")
    if Path(options.output).resolve() == Path(options.model).resolve():
        raise UsageError(f"{options.output}: the output is the input; say --in-place to overwrite it")
    return options.output


def _refuse_unsafe(info: Any, options: FixOptions) -> None:
    """A file whose pickles or TorchScript code name code that would run is never fixed (and so
    never copied into an output) without --trust."""
    if options.trust:
        return
    named = [*info.unsafe_globals, *info.unknown_callables, *info.unsafe_code]
    if named:
        codes = "BN001" if info.unsafe_globals else "BN004" if info.unsafe_code else "BN003"
        raise TrustRequired(options.model, f"{codes}: the file names code that loading or running it would execute "
                            f"({', '.join(sorted(named)[:3])}{', ...' if len(named) > 3 else ''}); bnlint fix refuses it "
                            "without --trust and writes nothing")


def run_fix(options: FixOptions, config: Config | None = None) -> FixOutcome:
    """Repair the model as its framework allows; raises BnlintError subclasses (one line each).

    The repair and both measurements run in one isolated child (bnlint.sandbox), which writes the
    output into its private folder; only then is it published next to the target
    (bnlint.fix.publish). Under torchrun the ranks run in process (their process group cannot
    cross into a child): the processes torchrun started are the isolation there.
    """
    from bnlint.loaders import load_model

    config = config or Config()
    info = load_model(options.model)
    _refuse_unsafe(info, options)
    target = _target(options)
    _fixer(info, options)  # a format without a repair is refused before anything runs
    if options.data is not None:
        _refuse_small_sample(_largest_array(options.data), options)
    if options.process_group is not None:
        return _run_in_process(info, options, config, target)
    return _run_isolated(options, config, target, info)


def _refuse_small_sample(samples: int, options: FixOptions) -> None:
    """Refuse to re-estimate statistics from fewer than options.min_samples samples."""
    if samples < options.min_samples:
        raise UsageError(f"{options.data}: {samples} sample(s): statistics estimated from so few are noise and would replace "
                         f"the trained ones; give at least {options.min_samples} samples of the deployment data (hundreds are "
                         f"better), or --min-samples {samples} to write them anyway")


def _largest_array(data: str) -> int:
    """Samples in the largest array of --data (headers only): the model's input can hold no more,
    so a sample smaller than the floor is refused before any model runs, and nothing larger is."""
    from bnlint.dynamic.data import Dataset

    return max((source.stored for source in Dataset(data).sources.values()), default=0)


def _run_isolated(options: FixOptions, config: Config, target: str | None, info: Any) -> FixOutcome:
    import dataclasses
    import shutil

    from bnlint.dynamic.options import dynamic_settings
    from bnlint.sandbox import arch_file, config_record, default_timeout, preload_for, run_job

    settings = dynamic_settings(config)
    timeout = options.timeout or settings.timeout or 3 * default_timeout([options.model, options.data])
    record = {k: v for k, v in dataclasses.asdict(options).items() if k != "process_group"}
    job = {"kind": "fix", "options": record, "config": config_record(config),
           "staged": Path(target).name if target is not None else None}
    folder = str(Path(options.model).resolve().parent)
    ran = run_job(job, reads=[folder, options.data or "", arch_file(options.arch) or ""], trust=options.trust,
                  device=options.device, timeout=float(timeout), describe=options.model, preload=preload_for(info.file_format))
    try:
        result = ran.result
        if not isinstance(result, dict) or not isinstance(result.get("record"), dict):
            raise RecalibrationError("the isolated fix sent back something other than its outcome")
        outcome = _outcome(result["record"], options, target)
        outcome.notes.extend(ran.notes)
        if target is not None:
            from bnlint.fix.publish import publish

            staged = ran.folder / "staged" / Path(target).name
            publish(staged, Path(target), source=Path(options.model), in_place=options.in_place)
        outcome.before = _judge(options.model, options, config, result.get("before"), model=info)
        outcome.first_drift_before = _first_drift(outcome.before)
        if target is not None:
            outcome.after = _judge(target, options, config, result.get("after"))
            outcome.first_drift_after = _first_drift(outcome.after)
        outcome.layers = _table(outcome.before, outcome.after)
        return outcome
    finally:
        shutil.rmtree(ran.folder, ignore_errors=True)


def _outcome(record: dict[str, Any], options: FixOptions, target: str | None) -> FixOutcome:
    """A FixOutcome from the child's record, every field checked (the child is not trusted)."""
    def strings(value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecalibrationError("the isolated fix sent back a malformed outcome")
        return value

    refused, details = record.get("refused"), record.get("details")
    if not isinstance(refused, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in refused.items()):
        raise RecalibrationError("the isolated fix sent back a malformed outcome")
    framework = record.get("framework")
    return FixOutcome(options.model, target, framework if isinstance(framework, str) else "", strings(record.get("actions")), [],
                      None, None, refused=refused, notes=strings(record.get("notes")),
                      details=details if isinstance(details, dict) else {})


def fix_in_child(options: FixOptions, config: Config, staged_name: str | None, out: Path) -> dict[str, Any]:
    """The isolated part of `bnlint fix` (bnlint.sandbox.child): measure, repair into the private
    folder's staged/ (the input itself is read-only here), measure the output."""
    import dataclasses

    from bnlint.dynamic import measure
    from bnlint.loaders import load_model
    from bnlint.sandbox import events

    staged = None
    if staged_name is not None:
        (out / "staged").mkdir()
        staged = str(out / "staged" / staged_name)
    info = load_model(options.model)
    _refuse_unsafe(info, options)  # the parent checked too: a second wall costs nothing
    local = dataclasses.replace(options, output=staged, in_place=False)
    events.stage("measuring the input")
    opened = None
    if options.data is not None and info.framework == "torch":
        from bnlint.dynamic.analysis import open_runner

        opened = open_runner(info, _dynamic_options(options), config)
    before = measure(info, _dynamic_options(options), config, runner=opened) if options.data is not None else None
    if before is not None:
        _refuse_small_sample(before.samples, options)  # the array the model reads, now known exactly
    outcome = FixOutcome(options.model, staged, info.framework, [], [], None, None, opened=opened)
    events.stage("repairing")
    _repair(info, local, outcome, staged)
    after = None
    if staged is not None and options.data is not None:
        after = _judged_by_recalibration(before, outcome, info) if not outcome.restructured else None
        if after is None:
            events.stage("measuring the output")
            after = measure(load_model(staged), _dynamic_options(options), config)
    return {"record": outcome.record(), "before": before, "after": after}


def _stored_dtype(layer: Any) -> Any:
    name = layer.dtype("running_var") if layer is not None else None
    return np.float64 if name == "float64" else np.float16 if name == "float16" else np.float32


def _judged_by_recalibration(before: Any, outcome: FixOutcome, info: Any) -> Any:
    """The output's measurements from the recalibration's own pass, or None when they cannot stand in.

    Exact recalibration measures every layer's input in the fixed network over all the data (its
    upstream layers already fixed, eval mode): the very moments a second `measure` of the output
    would collect. So when every measured layer was recalibrated and the repair changed nothing
    but statistics, the output is judged from those moments against the new statistics, without
    running the model again. What recalibration does not change is carried over from the input's
    run: the batch dependence check (modes are untouched) and the training-batch noise (a
    property of the training batch size, not of the stored statistics).
    """
    import dataclasses

    from bnlint.dynamic.metrics import analyse_layer, layer_record

    if before is None or not before.layers:
        return None
    by_name = {layer.name: layer for layer in outcome.recalibrated}
    if any(layer.name not in by_name or by_name[layer.name].moments is None for layer in before.layers):
        return None
    layers = []
    for old in before.layers:
        fixed = by_name[old.name]
        moments = dataclasses.replace(fixed.moments, samples=fixed.moments.samples // max(old.calls_per_forward, 1))
        static = info.layer(old.name)
        weight = static.array("weight") if static is not None else None
        stored = _stored_dtype(static)  # the statistics as the file holds them after writing
        mean, var = (np.asarray(np.asarray(v, dtype=stored), dtype=np.float64) for v in (fixed.mean, fixed.var))
        new = analyse_layer(old.name, old.order, moments, old.eps, mean, var, weight)
        new.calls_per_forward, new.batch_size, new.batch_noise = old.calls_per_forward, old.batch_size, old.batch_noise
        layers.append(new)
    return dataclasses.replace(
        before, layers=layers, layer_stats=[layer_record(layer, before.settings) for layer in layers],
        notes=[*before.notes, "the output was judged from the exact recalibration's own measurements (no second run)"])


def _fixer(info: Any, options: FixOptions) -> Any:
    """The repair function of the model's format record, or a UsageError saying why there is none."""
    import importlib.util

    from bnlint.formats import FORMATS

    record = FORMATS.get(info.file_format or "")
    if record is not None and record.engine is not None and importlib.util.find_spec(record.engine[0]) is None:
        raise UsageError(f"{options.model}: bnlint fix of a {record.description} needs {record.engine[1]}, which is not installed "
                         f"(pip install 'bnlint[{record.extra}]')")
    if record is None or record.fixer is None:
        raise UsageError(f"{options.model}: bnlint fix does not repair {info.framework} models (no runtime to run them)")
    return record.function(record.fixer)


def _repair(info: Any, options: FixOptions, outcome: FixOutcome, target: str | None) -> None:
    _fixer(info, options)(info, options, outcome, target)


def _run_in_process(info: Any, options: FixOptions, config: Config, target: str | None) -> FixOutcome:
    """torchrun: every rank recalibrates its shard in process; rank 0 measures and writes."""
    leader = _rank(options.process_group) == 0
    if info.framework != "torch":
        raise UsageError("distributed recalibration (torchrun) is for PyTorch models; run ONNX and Keras fixes in one process")
    before = _measure_here(info, options.model, options, config) if leader else None
    outcome = FixOutcome(options.model, target, info.framework, [], [], _first_drift(before), None, before=before)
    fix_torch(info, options, outcome, target)
    if not leader:
        outcome.output = None  # rank 0 writes and measures; the others only contributed statistics
        return outcome
    if target is not None and options.data is not None:
        from bnlint.loaders import load_model

        outcome.after = _measure_here(load_model(target), target, options, config)
        outcome.first_drift_after = _first_drift(outcome.after)
    outcome.layers = _table(before, outcome.after)
    return outcome


def _rank(group: Any) -> int:
    import torch.distributed as dist

    return int(dist.get_rank(group))


def distributed_group(device: str) -> Any:
    """The default process group when launched by torchrun (WORLD_SIZE > 1), created on first use:
    gloo on the CPU, nccl on CUDA. None in a plain single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.group.WORLD


def _needs_data(options: FixOptions, what: str) -> str:
    if options.data is None:
        raise UsageError(f"{what} needs --data (the statistics come from the data; bnlint never invents them)")
    return options.data


def fix_torch(info: Any, options: FixOptions, outcome: FixOutcome, target: str | None) -> None:
    from bnlint.fix.torch_recalibrate import recalibrate_file
    from bnlint.fix.torch_write import write_torch_fix

    if options.fold:
        raise UsageError("--fold applies to ONNX files (export with do_constant_folding=False, then bnlint fix --fold model.onnx)")
    data = _needs_data(options, "recalibrating a PyTorch model")
    result = recalibrate_file(options.model, data, arch=options.arch, arch_kwargs=options.arch_kwargs, trust=options.trust,
                              inputs=options.inputs, batch_size=options.batch_size, layers=options.layers, device=options.device,
                              process_group=options.process_group, info=info, runner=outcome.opened)
    outcome.actions.append(f"recalibrated {len(result.layers)} layer(s) ({result.method}, {result.passes} pass(es) over "
                           f"{result.samples} samples)")
    outcome.refused.update(result.skipped)
    outcome.notes.extend(result.notes)
    outcome.details.update(method=result.method, passes=result.passes, recalibrated=result.records())
    outcome.recalibrated = list(result.layers)
    if target is not None and (options.process_group is None or _rank(options.process_group) == 0):
        report = write_torch_fix(options.model, target, result.new_stats(), in_place=options.in_place)
        outcome.details["patched_tensors"] = len(report.tensors)
        outcome.notes.extend(report.notes)


def fix_keras(info: Any, options: FixOptions, outcome: FixOutcome, target: str | None) -> None:
    from bnlint.fix.keras_fix import recalibrate_keras, write_keras_fix

    if options.fold:
        raise UsageError("--fold applies to ONNX files")
    data = _needs_data(options, "recalibrating a Keras model")
    result = recalibrate_keras(info, data, layers=options.layers, trust=options.trust, arch=options.arch,
                               inputs=options.inputs, batch_size=options.batch_size)
    outcome.actions.append(f"recalibrated {len(result.layers)} layer(s) ({result.passes} truncated pass(es))")
    outcome.notes.extend(result.notes)
    outcome.details.update(method=result.method, passes=result.passes, recalibrated=result.records())
    outcome.recalibrated = list(result.layers)
    if target is not None:
        write_keras_fix(info, target, result, in_place=options.in_place)


def fix_onnx(info: Any, options: FixOptions, outcome: FixOutcome, target: str | None) -> None:
    from bnlint.fix.onnx_fold import fold
    from bnlint.fix.onnx_recalibrate import recalibrate_onnx
    from bnlint.fix.onnx_rewrite import rewrite_training_mode
    from bnlint.fix.onnx_write import load_fix

    inputs, engine = dict(options.inputs) or None, options.onnx_engine
    fix = load_fix(options.model)
    if any(layer.training_reasons or layer.stats_source == "computed" for layer in info.layers):
        fix = rewrite_training_mode(fix, options.data, batch_size=options.batch_size, inputs=inputs, engine=engine)
        outcome.actions.append(f"rewrote {len(fix.rewritten)} layer(s) to inference form")
        outcome.restructured = True
    if options.data is not None:
        fix = recalibrate_onnx(fix, options.data, layers=options.layers, batch_size=options.batch_size, inputs=inputs, engine=engine)
        outcome.actions.append(f"recalibrated {len(fix.layers)} layer(s)")
    if options.fold:
        fix = fold(fix, options.data, layers=options.layers, inputs=inputs, engine=engine)
        outcome.actions.append(f"folded {len(fix.folded)} layer(s) into the op before them")
        outcome.restructured = True
    if not outcome.actions:
        raise UsageError(f"{options.model}: nothing to do without --data (no training-mode BatchNorm to rewrite); "
                         "give --data to recalibrate or --fold to fold")
    outcome.refused.update(fix.refused)
    outcome.notes.extend(fix.notes)
    outcome.details.update({k: v for k, v in fix.metrics.items()}, recalibrated=[layer.record() for layer in fix.layers])
    outcome.recalibrated = list(fix.layers)
    if target is not None:
        fix.write(target, in_place=options.in_place)


__all__ = ["FixOptions", "FixOutcome", "RecalibrationError", "run_fix"]
