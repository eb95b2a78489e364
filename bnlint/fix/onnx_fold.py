"""Fold inference-form BatchNormalization nodes into the Conv / ConvTranspose / Gemm before them.

In inference form (ONNX operator spec, BatchNormalization v1-v15) BN is a per-channel affine map,
Y = s * (X - mean) + B with s = scale / sqrt(var + epsilon); when X is the output of a linear op
that nothing else reads, the map moves into that op's weights:

- Conv, W (C_out, C_in/group, k...):  W'[o] = W[o] * s[o];
- ConvTranspose, W (C_in, C_out/group, k...): output channel o = g * C_out/group + j is column j
  of group g's block of input rows, so W' = W viewed as (group, C_in/group, C_out/group, k...)
  times s viewed as (group, 1, C_out/group, 1...);
- Gemm, Y = alpha * A' B' + beta * C with B' = B^T when transB=1: output column n is row n of B
  (transB=1) or column n (transB=0), scaled by s[n];
- bias: b' = (b - mean) * s + B, a new bias (zeros before folding) when the op had none; for Gemm
  C' = (beta * C - mean) * s + B with beta set to 1 (C broadcast to at least (N,)).

Arithmetic is float64, cast back to the weight's dtype. A layer is refused (left as it is, with
the reason in `refused`) when it is in training form, its statistics are not stored, it has
per-activation statistics (spatial=0), its input comes from another op or is read elsewhere, the
weights are not stored float tensors, var + epsilon is not positive, or a folded weight or bias
would not fit the dtype: above 65504 for float16 (where a folded tiny variance typically lands),
above float32's 3.4e38, or non-finite.

The result is checked numerically against the unfolded model on the first `check_samples`
samples of the data (or seeded random inputs), with onnxruntime's optimisations off for both so
that its own Conv+BN fusion cannot hide a mistake: `fold_max_abs_diff` and `fold_max_rel_diff`
(max |folded - unfolded| / max |unfolded|) in `metrics`.
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from bnlint.conventions import conventions
from bnlint.errors import BnlintError
from bnlint.fix.onnx_graph import (
    GraphFacts,
    attribute,
    bn_version,
    is_bn,
    model_opset,
    prune_dead,
    set_attribute,
    training_reasons,
    write_tensor,
)
from bnlint.fix.onnx_write import OnnxFix, load_fix, pick_engine, sample_inputs, session
from bnlint.fix.recalibrate import select

_LIMITS = {"float16": 65504.0, "bfloat16": 3.3895e38,
           "float32": float(np.finfo(np.float32).max), "float64": float(np.finfo(np.float64).max)}
_FOLDS_INTO = ("Conv", "ConvTranspose", "Gemm")


def _dtype(array: np.ndarray) -> str:
    return "bfloat16" if "bfloat16" in str(array.dtype) else str(array.dtype)


def _folded(op: onnx.NodeProto, w: np.ndarray, b: np.ndarray | None, s: np.ndarray,
            shift: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
    """(W', b') in float64, or why the shapes do not fit. `shift` = B - mean * s."""
    channels = s.size
    w64 = w.astype(np.float64)
    if op.op_type == "Conv":
        if w.ndim < 2 or w.shape[0] != channels:
            return f"its weight has shape {w.shape}, not {channels} output channels"
        new_w = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
    elif op.op_type == "ConvTranspose":
        group = int(attribute(op, "group", 1))
        if w.ndim < 2 or w.shape[1] * group != channels or w.shape[0] % group:
            return f"its weight has shape {w.shape} with group={group}, not {channels} output channels"
        blocks = w64.reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
        new_w = (blocks * s.reshape(group, 1, w.shape[1], *(1,) * (w.ndim - 2))).reshape(w.shape)
    else:
        trans_b = int(attribute(op, "transB", 0)) == 1
        if w.ndim != 2 or w.shape[0 if trans_b else 1] != channels:
            return f"its B has shape {w.shape} (transB={int(trans_b)}), not {channels} output columns"
        new_w = w64 * (s[:, None] if trans_b else s[None, :])
    if op.op_type == "Gemm":
        beta = float(attribute(op, "beta", 1.0))
        c = np.zeros(channels) if b is None else beta * b.astype(np.float64)
        if np.broadcast_shapes(c.shape, (channels,))[-1] != channels:
            return f"its C has shape {c.shape}, which does not broadcast to {channels} columns"
        return new_w, np.broadcast_to(c, np.broadcast_shapes(c.shape, (channels,))) * s + shift
    if b is not None and b.shape != (channels,):
        return f"its bias has shape {b.shape}, not ({channels},)"
    return new_w, (np.zeros(channels) if b is None else b.astype(np.float64)) * s + shift


def _plan(fix: OnnxFix, facts: GraphFacts, index: int, version: int) -> tuple[int, np.ndarray, np.ndarray] | str:
    """(producer index, W', b') for one BN, cast to the stored dtypes, or why it cannot be folded."""
    graph = fix.model.graph
    node = graph.node[index]
    if training_reasons(node, version):
        return "it is in training form (rewrite it to inference form first)"
    if version <= 7 and int(attribute(node, "spatial", 1)) == 0:
        return "it has per-activation statistics (spatial=0)"
    params = [facts.value(n) for n in node.input[1:5]] if len(node.input) >= 5 else [None]
    if any(p is None for p in params):
        return "its scale, bias, mean and variance are not all stored tensors"
    scale, bias, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    producer = facts.producer.get(node.input[0])
    op = graph.node[producer] if producer is not None else None
    if producer is None or op is None or op.op_type not in _FOLDS_INTO or op.domain not in ("", "ai.onnx"):
        return f"its input comes from {op.op_type if op is not None else 'a graph input'}, not Conv, ConvTranspose or Gemm"
    if facts.consumers.get(node.input[0]) != [index] or node.input[0] in facts.outputs:
        return f"the output of {op.op_type} {op.name!r} is also read elsewhere"
    w_name, b_name = op.input[1], (op.input[2] if len(op.input) > 2 else "")
    w = facts.value(w_name) if (w_name in facts.initializers or facts.constant(w_name)) else None
    b = facts.value(b_name) if b_name and (b_name in facts.initializers or facts.constant(b_name)) else None
    if w is None or (b_name and b is None):
        return f"the weights of {op.op_type} {op.name!r} are not stored tensors"
    if _dtype(w) not in _LIMITS:
        return f"the weights of {op.op_type} {op.name!r} are {w.dtype}, not float"
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = scale / np.sqrt(var + float(np.float32(attribute(node, "epsilon", conventions("onnx").default_eps))))
        shift = bias - mean * s
    if not (np.isfinite(s).all() and np.isfinite(shift).all()):
        return "var + epsilon is not positive (or a statistic is NaN) in some channel"
    folded = _folded(op, w, b, s, shift)
    if isinstance(folded, str):
        return folded
    new_w, new_b = folded
    limit = _LIMITS[_dtype(w)]
    peak = max(float(np.abs(new_w).max(initial=0.0)), float(np.abs(new_b).max(initial=0.0)))
    if not np.isfinite(peak) or peak > limit:
        return f"folded weights would reach {peak:.3g}, beyond {_dtype(w)}'s {limit:.6g} (a tiny variance or huge scale)"
    return producer, new_w.astype(w.dtype), new_b.astype(w.dtype if b is None else b.dtype)


def _apply(fix: OnnxFix, facts: GraphFacts, index: int, producer: int, new_w: np.ndarray, new_b: np.ndarray) -> None:
    """Write W' and b' (in place when only this op reads them, else as new initializers), route
    the op's output to the BN's output name, and remove the BN node and whatever it alone read."""
    graph = fix.model.graph
    node, op = graph.node[index], graph.node[producer]
    replaced: set[str] = set()
    for slot, values in ((1, new_w), (2, new_b)):
        name = op.input[slot] if len(op.input) > slot else ""
        if name and facts.owned(name, producer):
            write_tensor(graph, name, values)
            continue
        weight = op.input[1]
        fresh = f"{weight[:-len('.weight')]}.bias" if weight.endswith(".weight") else f"{weight}_bias"  # conv1.weight -> conv1.bias
        new = facts.unique(f"{name}_folded" if name else fresh)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values), new))
        replaced.add(name)
        while len(op.input) <= slot:
            op.input.append("")
        op.input[slot] = new
    if op.op_type == "Gemm":
        set_attribute(op, "beta", 1.0)
    x, y = node.input[0], node.output[0]
    op.output[list(op.output).index(x)] = y
    stale = [v for v in graph.value_info if v.name != x]
    del graph.value_info[:]
    graph.value_info.extend(stale)
    params = set(node.input[1:])
    del graph.node[index]
    prune_dead(graph, (params | replaced) - {""})


def fold(source: str | os.PathLike[str] | OnnxFix, data: str | os.PathLike[str] | None = None, *, inputs: Mapping[str, str] | None = None,
         layers: str | list[str] | None = None, engine: str = "auto", check_samples: int = 4, seed: int = 0,
         dry_run: bool = False) -> OnnxFix:
    """Fold every foldable inference BN (or those matching the glob(s) `layers`); see the module
    doc. `dry_run`: fold and check in memory, refuse to write."""
    started = time.perf_counter()
    fix = load_fix(source)
    unfolded = onnx.ModelProto()
    unfolded.CopyFrom(fix.model)
    graph = fix.model.graph
    version = bn_version(model_opset(fix.model))
    order = GraphFacts(graph).topological()
    outputs = [graph.node[i].output[0] for i in order if is_bn(graph.node[i]) and graph.node[i].output]
    index_of = {n.output[0]: i for i, n in enumerate(graph.node) if is_bn(n) and n.output}
    modules = {fix.layer_name(index_of[y], graph.node[index_of[y]]): fix.module_name(index_of[y], graph.node[index_of[y]]) for y in outputs}
    wanted = set(select(list(modules), layers, modules))
    for y in outputs:
        facts = GraphFacts(graph)
        index = next(i for i, n in enumerate(graph.node) if is_bn(n) and n.output and n.output[0] == y)
        name = fix.layer_name(index, graph.node[index])
        if name not in wanted:
            continue
        plan = _plan(fix, facts, index, version)
        if isinstance(plan, str):
            fix.refused[name] = plan
            continue
        _apply(fix, facts, index, *plan)
        fix.folded.append(name)
    fix.metrics["fold_seconds"] = time.perf_counter() - started
    if fix.folded:
        _check(fix, unfolded, sample_inputs(fix, data, inputs, check_samples, seed), engine, data is not None)
    else:
        fix.notes.append("no BatchNormalization was folded")
    fix.dry_run = dry_run
    return fix


def _check(fix: OnnxFix, unfolded: onnx.ModelProto, feeds: dict[str, np.ndarray] | None, engine: str, from_data: bool) -> None:
    if not feeds:
        fix.notes.append("fold not checked numerically: no data and the inputs' shapes are not all known (give --data)")
        return
    started = time.perf_counter()
    engine = pick_engine(engine)
    names = [v.name for v in unfolded.graph.output]
    try:
        before = session(unfolded, engine, fix.source, level="none")(names, feeds)
        after = session(fix.model, engine, fix.source, level="none")(names, feeds)
    except BnlintError as exc:  # e.g. a dtype this runtime has no kernel for
        fix.notes.append(f"fold not checked numerically: {exc}")
        return
    diff = scale = 0.0
    for a, b in zip(before, after):
        if np.issubdtype(a.dtype, np.floating):
            diff = max(diff, float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0)))
            scale = max(scale, float(np.abs(a.astype(np.float64)).max(initial=0.0)))
    fix.metrics.update({"fold_max_abs_diff": diff, "fold_max_rel_diff": diff / scale if scale else diff,
                        "fold_check_samples": float(next(iter(feeds.values())).shape[0]),
                        "fold_check_seconds": time.perf_counter() - started})
    source = "the data" if from_data else "seeded random inputs"
    fix.notes.append(f"folded {len(fix.folded)} layer(s); outputs on {int(fix.metrics['fold_check_samples'])} samples of {source} "
                     f"differ from the unfolded model by at most {diff:.3g} ({fix.metrics['fold_max_rel_diff']:.3g} relative)")
