"""Rewrite BatchNormalization nodes that normalise with batch statistics into inference form.

Training form, by operator version (ONNX operator spec, BatchNormalization):
- v1 and v6 (opsets 1-6): `is_test` 0 (its default) means training; outputs Y, mean, var,
  saved_mean, saved_var. Inference: `is_test=1` and only Y.
- v7 and v9 (opsets 7-13): no flag; training mode is told by the outputs (Y plus the running and
  saved mean/var: 5). Inference: only Y.
- v14 and v15 (opsets 14+): `training_mode=1`, outputs Y, running_mean, running_var (v15 lets
  scale/B and mean/var have their own float types). Inference: `training_mode=0`, only Y.
In inference form every version computes Y = (X - input_mean) / sqrt(input_var + epsilon) * scale + B
with the stored mean/var, which is what the training-mode export's eval-mode model would do.

The rewrite drops the training outputs, sets the flag, and keeps every other node, attribute and
name. When another node (or the graph's output list) reads a training output, there is no honest
inference-form value for it, so the rewrite is refused rather than guessed.

A BN whose mean/var are computed from the batch by other nodes (the dynamo export of
`track_running_stats=False`: ReduceMean over (N, H, W), Sub, Mul, ReduceMean) has no stored
statistics at all. With `data`, its mean/var inputs become new initializers holding the exact
population statistics of its input (`bnlint.fix.onnx_recalibrate`: sequential, unbiased
variance), and the computing nodes left without readers are pruned; without data it is refused:
bnlint never invents numbers. Stored variances that are NaN, negative or zero (and non-finite
means) are recalibrated the same way from data, or reported as unfixable without it.

Verification (onnxruntime, optimisations off so every BN really runs, on a few samples of the
data or seeded random inputs): the rewritten graph's outputs for each sample alone vs in a batch
(`batch_dependence_max_abs`, ~1e-6 when nothing depends on the batch), and every BN's output vs
numpy's eval-mode formula on its captured input with the stored statistics (`eval_form_max_abs`).
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import numpy as np
import onnx

from bnlint.conventions import conventions
from bnlint.errors import InputError
from bnlint.fix.onnx_graph import GraphFacts, attribute, bn_version, is_bn, model_opset, own_statistics, set_attribute, training_reasons
from bnlint.fix.onnx_recalibrate import DEFAULT_BUDGET, population_statistics, report_run, store
from bnlint.fix.onnx_write import OnnxFix, load_fix, open_data, pick_engine, sample_inputs, session
from bnlint.fix.recalibrate import RecalibrationError

_OUTPUT_ROLES = ("Y", "mean (running)", "var (running)", "saved_mean", "saved_var")


def _bad_statistics(mean: np.ndarray, var: np.ndarray) -> str | None:
    problems = [f"{int(count)} {what}" for what, count in (
        ("non-finite mean(s)", (~np.isfinite(mean)).sum()), ("NaN/Inf variance(s)", (~np.isfinite(var)).sum()),
        ("negative variance(s)", (var < 0).sum()), ("zero variance(s)", (var == 0).sum())) if count]
    return ", ".join(problems) or None


def rewrite_training_mode(source: str | os.PathLike[str] | OnnxFix, data: str | os.PathLike[str] | None = None, *,
                          inputs: Mapping[str, str] | None = None, batch_size: int = 32, engine: str = "auto", strategy: str = "auto",
                          memory_budget: int = DEFAULT_BUDGET, verify: bool = True, verify_samples: int = 4,
                          dry_run: bool = False) -> OnnxFix:
    """Every top-level BatchNormalization in inference form (see the module doc). Raises
    RecalibrationError / InputError for what cannot be rewritten honestly; per-layer problems that
    leave a usable model (bad stored variances without data) are in `refused`."""
    started = time.perf_counter()
    fix = load_fix(source)
    graph = fix.model.graph
    version = bn_version(model_opset(fix.model))
    facts = GraphFacts(graph)
    problems, computed, bad = [], [], []
    for index, node in enumerate(graph.node):
        if not is_bn(node):
            continue
        name = fix.layer_name(index, node)
        for position, out in enumerate(node.output[1:], start=1):
            readers = [graph.node[i].name or graph.node[i].op_type for i in facts.consumers.get(out, [])] if out else []
            if readers or out in facts.outputs:
                where = f"read by {', '.join(readers[:3])}" if readers else "a graph output"
                problems.append(f"{name}: training output {out!r} ({_OUTPUT_ROLES[min(position, 4)]}) is {where}")
        if len(node.input) >= 5 and any(facts.value(n) is None and facts.depends_on_data(n) for n in node.input[3:5]):
            computed.append(node.output[0])
        elif len(node.input) >= 5 and (mean := facts.value(node.input[3])) is not None and (var := facts.value(node.input[4])) is not None:
            why = _bad_statistics(np.asarray(mean, np.float64), np.asarray(var, np.float64))
            if why:
                bad.append((node.output[0], name, why))
    if problems:
        raise InputError(fix.source, f"cannot rewrite to inference form without guessing: {'; '.join(problems[:3])}"
                                     f"{' ...' if len(problems) > 3 else ''} (inference form has only Y)")
    if computed and data is None:
        names = ", ".join(fix.names.get(y, y) for y in computed[:3]) + (", ..." if len(computed) > 3 else "")
        raise RecalibrationError(f"{len(computed)} BatchNormalization layer(s) ({names}) compute mean/var "
                                 "from each batch (an export of track_running_stats=False): the statistics to store must come from data "
                                 "(--data TARGET); bnlint never invents numbers")
    dropped: set[str] = set()
    for index, node in enumerate(graph.node):
        if is_bn(node) and (training_reasons(node, version) or node.output[0] in computed):
            dropped.update(out for out in node.output[1:] if out)
            del node.output[1:]
            if version <= 6:
                set_attribute(node, "is_test", 1)
            elif version >= 14 and attribute(node, "training_mode") is not None:
                set_attribute(node, "training_mode", 0)
            fix.rewritten.append(fix.layer_name(index, node))
    infos = [v for v in graph.value_info if v.name not in dropped]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    targets = list(computed)
    for y, name, why in bad:
        if data is None:
            fix.refused[name] = f"stored statistics hold {why}: unfixable without data (--data)"
        else:
            targets.append(y)
            fix.notes.append(f"{name}: stored statistics held {why}; recalibrated from the data")
    if targets and data is not None:
        feed = open_data(fix, data, inputs, batch_size)
        own_statistics(fix.model.graph, targets, fix.layer_name, fix.module_name)
        placeholders = set(computed)
        run = population_statistics(fix, feed, targets, lambda layer: store(fix, layer, layer.y in placeholders),
                                    engine=engine, strategy=strategy, memory_budget=memory_budget)
        report_run(fix, run, feed, time.perf_counter() - started)
    if verify:
        verify_inference(fix, sample_inputs(fix, data, inputs, verify_samples), engine)
    fix.dry_run = dry_run
    return fix


def _eval_form(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    factor = (scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)).reshape(shape)
    return (x.astype(np.float64) - mean.astype(np.float64).reshape(shape)) * factor + bias.astype(np.float64).reshape(shape)


def verify_inference(fix: OnnxFix, feeds: dict[str, np.ndarray] | None, engine: str = "auto") -> None:
    """Record `batch_dependence_max_abs` and `eval_form_max_abs` in fix.metrics (module doc)."""
    if not feeds:
        fix.notes.append("not verified: no data and the inputs' shapes are not all known (give --data)")
        return
    model = onnx.ModelProto()
    model.CopyFrom(fix.model)
    graph = model.graph
    facts = GraphFacts(graph)
    outputs = [v.name for v in graph.output]
    bns = [node for node in graph.node if is_bn(node)]
    extra = [n for node in bns for n in (node.input[0], node.output[0]) if n not in outputs]
    graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(extra))
    names = list(dict.fromkeys(outputs + extra))
    run = session(model, pick_engine(engine), fix.source, level="none")
    together = dict(zip(names, run(names, feeds)))
    count = next(iter(feeds.values())).shape[0]
    fixed = any(v.type.tensor_type.shape.dim[0].dim_value > 0 for v in graph.input
                if v.name in feeds and len(v.type.tensor_type.shape.dim))
    if fixed or count < 2:
        fix.notes.append(f"batch dependence not checked: {'the batch size is fixed in the graph' if fixed else 'one sample'}")
    else:
        worst = 0.0
        for i in range(count):
            alone = run(outputs, {k: v[i:i + 1] for k, v in feeds.items()})
            for name, value in zip(outputs, alone):
                if np.issubdtype(value.dtype, np.floating):
                    worst = max(worst, float(np.abs(value.astype(np.float64) - together[name][i:i + 1]).max(initial=0.0)))
        fix.metrics["batch_dependence_max_abs"] = worst
    worst_form = 0.0
    for node in bns:
        params = [facts.value(n) for n in node.input[1:5]]
        x = together.get(node.input[0])
        if x is None or node.output[0] not in together or any(p is None or p.size != x.shape[1] for p in params):
            continue  # not stored, or per-activation statistics (spatial=0)
        scale, bias, mean, var = (np.asarray(p) for p in params)
        with np.errstate(invalid="ignore", divide="ignore"):  # channels with var + eps <= 0 (reported in `refused`) have no eval form
            expected = _eval_form(x, scale, bias, mean, var, float(np.float32(attribute(node, "epsilon", conventions("onnx").default_eps))))
        diff = np.abs(together[node.output[0]].astype(np.float64) - expected)
        worst_form = max(worst_form, float(diff[np.isfinite(expected)].max(initial=0.0)))
    fix.metrics["eval_form_max_abs"] = worst_form
