"""The TensorFlow side of `bnlint fix`: exact recalibration of a SavedModel's fused BatchNorm nodes,
written into a copy of the SavedModel directory. Runs in the isolated child, with TensorFlow.

Recalibration runs the frozen serving graph of `bnlint.dynamic.tf_runner`, whose BN statistics
are placeholders: layer k (in topological order) is measured by a pass over the data that fetches
only its input (the graph is pruned there, so the rest is not run), with every layer before it
fed its new statistics in inference form; its new mean and variance are then fed to every later
pass. That costs K truncated passes for K layers (about K/2 full forward passes): fine for the
small graphs this is for; a layer-major single pass would need TensorFlow's graph to be cut per
layer, which it is not here.

The variance is stored unbiased (n/(n-1)): FusedBatchNorm's training output, which Keras 2 and
TensorFlow average into moving_variance, is Bessel-corrected.

Writing: the SavedModel directory is copied byte for byte except its variables bundle, which is
rewritten whole: every tensor is read with TensorFlow's checkpoint reader, the recalibrated
moving mean/variance replaced (cast to their stored dtype), and all written with
`tf.raw_ops.SaveV2` into a single shard. `fingerprint.pb` is left out: it holds a hash of the old
checkpoint, and TensorFlow loads a SavedModel without it. A plain checkpoint (`ckpt.index`) has
no graph to run: `bnlint fix` refuses it and names the SavedModel route (formats.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bnlint.dynamic.stats import Collector
from bnlint.errors import InputError, UsageError
from bnlint.fix.recalibrate import LayerRecalibration, RecalibrationError, RecalibrationResult, finish_layer, select
from bnlint.model import ModelInfo

# Left out of the copy: hashes of the old files (TensorFlow does not need them to load).
STALE = frozenset({"fingerprint.pb"})


def recalibrate_tf(info: ModelInfo, data: str, *, layers: str | Sequence[str] | None = None, inputs: Mapping[str, str] | None = None,
                   batch_size: int = 32, trust: bool = False) -> tuple[RecalibrationResult, Any]:
    """New statistics for every selected fused BN node, in topological order; returns the result and
    the runner (its graph knows the nodes). Training-mode nodes are refused: their statistics are
    never read by the serving graph."""
    from bnlint.dynamic.data import Dataset, check_layout, zip_batches
    from bnlint.dynamic.stats import per_sample_moments_numpy
    from bnlint.dynamic.tf_runner import TFRunner, channels_second

    runner = TFRunner(info, data, trust)
    sources = Dataset(data).select(runner.input_names, dict(inputs or {}))
    for source, shape, name in zip(sources, runner.input_shapes, runner.input_names):
        check_layout(source, shape, name, data)
    if runner.fixed_batch is not None:
        batch_size = runner.fixed_batch
    names = {b.node: runner.names[b.node] for b in runner.graph.bn}
    chosen = set(select(list(names.values()), layers))
    new: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    results: list[LayerRecalibration] = []
    skipped: dict[str, str] = {}
    passes = 0
    for order, (b, spec) in enumerate(zip(runner.graph.bn, runner.layers)):
        name = names[b.node]
        if name not in chosen:
            continue
        if b.training:
            skipped[name] = (f"its node {b.node.removeprefix('StatefulPartitionedCall/')} has is_training=true: the serving "
                             "graph normalises with each batch's moments and never reads its statistics; export the model "
                             "with training=False")
            continue
        collector = Collector(runner.ops, {name: spec.eps})
        for _, arrays in zip_batches(sources, batch_size, limit=sources[0].samples - sources[0].samples % batch_size
                                     if runner.fixed_batch else None):
            (x,) = runner.run(arrays, [b.x], new)
            moved = channels_second(x, b.channels_last)
            var, mean = per_sample_moments_numpy(moved)
            collector.add(name, var, mean, int(np.prod(moved.shape[2:], dtype=np.int64)))
            collector.end_batch()
        passes += 1
        moments = collector.layers().get(name)
        if moments is None:
            continue
        old = {"running_mean": spec.running_mean, "running_var": spec.running_var, "weight": spec.weight}
        result = finish_layer(name, b.node, order, moments, collector.calls.get(name, 1), spec.eps, old, None, False)
        new[b.node] = (result.mean, result.var)  # unbiased, as stored: what inference will read
        results.append(result)
    samples = sources[0].samples if sources else 0
    notes = [f"TensorFlow: one truncated pass per layer ({passes} for {len(results)} layer(s)); moving_variance stored "
             "unbiased, as FusedBatchNorm's own update does", *runner.notes]
    return RecalibrationResult(results, "tf-truncated", passes, samples, -(-samples // max(batch_size, 1)), skipped=skipped,
                               notes=notes), runner


def bundle_keys(info: ModelInfo, name: str) -> tuple[str, str]:
    """The variables-bundle keys of a layer's moving mean and variance (from the static loader)."""
    layer = info.layer(name)
    keys = []
    for role in ("running_mean", "running_var"):
        ref = layer.tensors.get(role) if layer is not None else None
        entry = getattr(ref, "entry", None)
        if entry is None or getattr(entry, "sliced", False):
            raise RecalibrationError(f"layer {name}: its {role} is not a variable of variables/variables.index "
                                     "(a constant or a partitioned variable): nothing can be written back")
        keys.append(str(entry.key))
    return keys[0], keys[1]


def write_tf_fix(source: str, target: str, patches: Mapping[str, np.ndarray]) -> Path:
    """Copy the SavedModel directory to `target` (a new folder) with its variables bundle rewritten:
    every tensor as it was except `patches` (bundle key -> new values, cast to the stored dtype)."""
    from bnlint.dynamic.tf_runner import import_tensorflow

    tf = import_tensorflow()
    src, out = Path(source), Path(target)
    if not (src / "saved_model.pb").is_file():
        raise InputError(source, "not a SavedModel directory (no saved_model.pb): only a SavedModel directory is written")
    if out.exists():
        raise RecalibrationError(f"{target}: exists; the fixed SavedModel is written to a new folder")
    prefix = src / "variables" / "variables"
    reader = tf.train.load_checkpoint(str(prefix))
    dtypes = reader.get_variable_to_dtype_map()
    missing = sorted(set(patches) - set(dtypes))
    if missing:
        raise RecalibrationError(f"{source}: variables/variables.index has no tensor {missing[0]}")
    shutil.copytree(src, out, ignore=lambda folder, names: [n for n in names if n in STALE or
                                                            (Path(folder) == src / "variables" and n.startswith("variables."))])
    keys = sorted(dtypes)
    tensors = []
    for key in keys:
        value = reader.get_tensor(key)
        if key in patches:
            stored = np.asarray(value)
            new = np.asarray(patches[key], dtype=np.float64).reshape(stored.shape)
            value = new.astype(stored.dtype)
        tensors.append(tf.constant(value, dtype=dtypes[key]))
    (out / "variables").mkdir(exist_ok=True)
    tf.raw_ops.SaveV2(prefix=str(out / "variables" / "variables"), tensor_names=keys, shape_and_slices=[""] * len(keys),
                      tensors=tensors)
    return out


def fix_tf(info: ModelInfo, options: Any, outcome: Any, target: str | None) -> None:
    """The tf-savedmodel record's fixer (bnlint.fix.run calls it in the isolated child)."""
    if getattr(options, "fold", False):
        raise UsageError("--fold applies to ONNX files")
    if options.data is None:
        raise UsageError("recalibrating a TensorFlow SavedModel needs --data (the statistics come from the data; bnlint never "
                         "invents them)")
    if not Path(info.path).is_dir():
        raise UsageError(f"{info.path}: give the SavedModel directory, not its saved_model.pb (the fix rewrites the folder)")
    result, _ = recalibrate_tf(info, options.data, layers=options.layers, inputs=options.inputs, batch_size=options.batch_size,
                               trust=options.trust)
    if not result.layers:  # an unchanged copy would pass for a repair
        why = next((f"layer {name}: {reason}" for name, reason in result.skipped.items()),
                   "no FusedBatchNorm node was selected (unfused BatchNorm arithmetic, as Keras 3 exports it, is not recalibrated)")
        raise RecalibrationError(f"{info.path}: nothing to recalibrate, nothing written: {why}")
    outcome.actions.append(f"recalibrated {len(result.layers)} layer(s) ({result.passes} truncated pass(es))")
    outcome.refused.update(result.skipped)
    outcome.notes.extend(result.notes)
    outcome.details.update(method=result.method, passes=result.passes, recalibrated=result.records())
    outcome.recalibrated = list(result.layers)
    if target is not None:
        patches: dict[str, np.ndarray] = {}
        for layer in result.layers:
            mean_key, var_key = bundle_keys(info, layer.name)
            patches[mean_key], patches[var_key] = layer.mean, layer.var
        write_tf_fix(info.path, target, patches)
        outcome.details["patched_tensors"] = len(patches)
