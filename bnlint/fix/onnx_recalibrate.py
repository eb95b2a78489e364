"""Exact, layer-by-layer recalibration of an ONNX model's stored BatchNormalization statistics.

What is computed (see `bnlint.fix.recalibrate` for the definition shared with the PyTorch side):
every selected inference-form BatchNormalization (operator versions 1/6/7/9/14/15; `input_mean`
and `input_var` stored in initializers or Constant nodes) gets the population mean and variance
of its input X on the target data, in topological order, each layer measured with the layers
before it already holding their new statistics: the fixed point inference sees. The variance is
stored as PyTorch and its ONNX exporters store running_var: unbiased, M2 / (n - 1) with
n = samples x spatial positions (Bessel's n/(n-1); ONNX's inference formula
Y = (X - mean) / sqrt(var + epsilon) * scale + B simply uses what is stored).

How, without one pass per layer ("segments"). The graph is cut just before each selected BN, in
topological order. At cut k the *live* tensors are those produced before the cut and read after
it (by a node some later BN input depends on, or by BN j >= k as its X); for all data they are
kept in memory, one array per data chunk. Segment k, the nodes strictly between BN k-1 and BN k,
is extracted as a sub-model whose inputs are the live tensors it reads and whose outputs are the
live tensors it makes, and onnxruntime runs it over every cached chunk. BN k's statistics are then
computed exactly from its cached X and written into the working model; BN k itself is applied to
the cached X with numpy (Y = X * a + b from the values as stored; in place when nothing else reads
X: about 4x cheaper than onnxruntime's BatchNormalization kernel outside a Conv fusion); tensors
no longer live are dropped and their buffers reused for later segments' outputs (an IO binding:
no page faults for fresh 100 MB arrays). Nodes no later BN input depends on (the head after the
last BN, side branches) never run; nodes whose outputs do not depend on the data (Constant, shape
arithmetic on initializers) are copied into every segment that reads them instead of being cached.

Cost: each needed node runs once per chunk, plus two numpy passes over each selected BN's input
(its moments: per sample and channel a mean and population variance by numpy's pairwise float32
summation, relative error ~1e-7, merged exactly in float64 with Chan's update in
`bnlint.dynamic.stats.Accumulator`, so any batch split gives the same statistics to rounding; and
the BN itself). What this cannot match is onnxruntime's fused inference: with every BN input
materialised, Conv+BN+ReLU no longer fuse and each cut crosses NCHW <-> NCHWc reorders. Measured
on a ResNet-50 (bench/bench_fold.py, 224x224, 256 images, shared 2-core CPU): 2.0-2.8x the CPU
time of plain onnxruntime inference over the same data, of which the segments' onnxruntime runs
are ~1.85x (the cost of materialising every BN input: the floor for any exact method run by
onnxruntime) and the numpy moments and BNs ~0.65x.

Memory: the widest cut's live tensors x samples, plus one segment's new outputs and at most
`memory_budget / 8` of recycled buffers, measured as the run goes (2.7-3.1 GiB for the ResNet-50
above), and one onnxruntime arena shared by all segments. When the data alone, or a cut projected
from its first chunk, would exceed `memory_budget` (default 4 GiB), the remaining layers fall back
to *truncated passes*: for each layer, the sub-model from the graph inputs to its X runs over the
data streamed from disk (flat memory, cost ~ one partial pass per layer); `strategy` forces either.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from bnlint.conventions import conventions
from bnlint.dynamic.stats import Accumulator, LayerMoments, NumpyOps
from bnlint.errors import UsageError
from bnlint.fix.onnx_graph import GraphFacts, bn_version, is_bn, model_opset, node_reads, own_statistics, training_reasons, write_tensor
from bnlint.fix.onnx_write import DataFeed, OnnxFix, load_fix, open_data, pick_engine, session
from bnlint.fix.recalibrate import RecalibrationError, finish_layer, gib, select

DEFAULT_BUDGET = 4 * 2**30


def sample_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample, per-channel population variance and mean of an (N, C, ...) array, float64 (N, C).

    Two passes per block with numpy's pairwise summation along the contiguous axis (float32 in,
    float32 sums: relative error ~1e-7, no E[x^2] - E[x]^2 cancellation); the mean is corrected by
    the mean residual. Blocks of ~256K values (several samples, or some channels of one sample)
    keep the temporaries in the core's cache: about 2 ns per value on a cold 100 MB tensor.
    """
    work = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
    flat = work.reshape(work.shape[0], work.shape[1], -1)
    samples, channels, size = flat.shape
    target = 1 << 18
    rows = max(1, target // max(1, channels * size))  # whole samples per block, or
    lanes = channels if rows > 1 or channels * size <= target else max(1, target // max(1, size))  # channels per block
    variance, mean = np.empty((samples, channels)), np.empty((samples, channels))
    for start in range(0, samples, rows):
        for lane in range(0, channels, lanes):
            block = flat[start:start + rows, lane:lane + lanes]
            first = block.sum(-1) / block.dtype.type(size)
            centred = block - first[..., None]
            residual = centred.sum(-1).astype(np.float64) / size
            np.square(centred, out=centred)
            variance[start:start + rows, lane:lane + lanes] = centred.sum(-1).astype(np.float64) / size - residual * residual
            mean[start:start + rows, lane:lane + lanes] = first.astype(np.float64) + residual
    return np.maximum(variance, 0.0), mean


class _Layer:
    """One BN being recalibrated: its node, and the moments of its X accumulated so far."""

    def __init__(self, fix: OnnxFix, index: int, order: int) -> None:
        node = fix.model.graph.node[index]
        self.y, self.x = node.output[0], node.input[0]
        self.name, self.module, self.order = fix.layer_name(index, node), fix.module_name(index, node), order
        self.eps = float(np.float32(next((a.f for a in node.attribute if a.name == "epsilon"), conventions("onnx").default_eps)))
        self.accumulator: Accumulator | None = None
        self.calls = 0

    def add(self, x: np.ndarray) -> None:
        if x.ndim < 2:
            raise RecalibrationError(f"layer {self.name}: its input has rank {x.ndim}; BatchNormalization needs (N, C, ...)")
        var, mean = sample_moments(x)
        if self.accumulator is None:
            size = int(np.prod(x.shape[2:], dtype=np.int64))
            self.accumulator = Accumulator(NumpyOps(), np.full(x.shape[1], size), np.full(x.shape[1], self.eps))
        self.accumulator.add(var, mean)
        self.calls += 1

    def moments(self) -> LayerMoments:
        if self.accumulator is None:
            raise RecalibrationError(f"layer {self.name}: no data reached it")
        return self.accumulator.result()


class _Plan:
    """Topological positions, data-dependent tensors, and the cuts before each target BN."""

    def __init__(self, graph: onnx.GraphProto, targets: list[str]) -> None:
        self.graph = graph
        facts = GraphFacts(graph)
        order = facts.topological()
        self.position = {index: pos for pos, index in enumerate(order)}
        self.reads = [list(dict.fromkeys(node_reads(node))) for node in graph.node]
        self.made_at: dict[str, int] = {name: -1 for name in facts.inputs}
        self.maker = facts.producer
        self.inputs = facts.inputs
        dynamic = set(facts.inputs)
        for index in order:
            if any(name in dynamic for name in self.reads[index]):
                dynamic.update(o for o in graph.node[index].output if o)
            for out in graph.node[index].output:
                if out:
                    self.made_at[out] = self.position[index]
        self.dynamic = dynamic
        self.bn_index = {graph.node[i].output[0]: i for i in range(len(graph.node)) if is_bn(graph.node[i])}
        self.targets = sorted(targets, key=lambda y: self.position[self.bn_index[y]])
        xs = [graph.node[self.bn_index[y]].input[0] for y in self.targets]
        for y, x in zip(self.targets, xs):
            if x not in dynamic:
                raise RecalibrationError(f"layer {y}: its input does not depend on the data; there is nothing to measure")
        self.needed = self.closure(xs)
        self.last_use: dict[str, int] = {}
        for index in self.needed:
            for name in self.reads[index]:
                self.last_use[name] = max(self.last_use.get(name, -1), self.position[index])
        for y, x in zip(self.targets, xs):
            self.last_use[x] = max(self.last_use.get(x, -1), self.position[self.bn_index[y]])

    def closure(self, names: list[str], dynamic_only: bool = True) -> set[int]:
        """Nodes the tensors `names` need: data-dependent ones, or (dynamic_only=False) the static ones."""
        found: set[int] = set()
        stack = [n for n in names if (n in self.dynamic) == dynamic_only]
        while stack:
            index = self.maker.get(stack.pop())
            if index is None or index in found:
                continue
            found.add(index)
            stack.extend(n for n in self.reads[index] if (n in self.dynamic) == dynamic_only)
        return found

    def live(self, cut: int) -> set[str]:
        return {name for name, last in self.last_use.items() if name in self.dynamic and self.made_at.get(name, cut) < cut <= last}

    def submodel(self, model: onnx.ModelProto, nodes: set[int], inputs: Mapping[str, np.ndarray | None],
                 outputs: list[str]) -> onnx.ModelProto:
        """`nodes` (plus the static nodes they need) as a model: the given inputs (graph inputs as
        declared, others typed from an example chunk with a symbolic batch dimension), the given
        outputs, the initializers read."""
        static = self.closure([n for i in nodes for n in self.reads[i]], dynamic_only=False)
        chosen = sorted(nodes | static, key=lambda i: self.position[i])
        reads = {n for i in chosen for n in self.reads[i]}
        sub = onnx.ModelProto()
        sub.ir_version = max(model.ir_version, 4)  # IR >= 4: initializers need not be listed as inputs
        sub.opset_import.extend(model.opset_import)
        sub.functions.extend(model.functions)
        graph = sub.graph
        graph.name = "bnlint_segment"
        graph.node.extend(self.graph.node[i] for i in chosen)
        graph.initializer.extend(t for t in self.graph.initializer if t.name in reads)
        graph.sparse_initializer.extend(t for t in self.graph.sparse_initializer if t.values.name in reads)
        originals = {v.name: v for v in self.graph.input}
        for name, example in inputs.items():
            if name in originals or example is None:
                graph.input.append(originals[name])
            else:
                elem = helper.np_dtype_to_tensor_dtype(example.dtype)
                graph.input.append(helper.make_tensor_value_info(name, elem, ["N", *example.shape[1:]]))
        graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
        return sub


@dataclass
class _Run:
    """How the statistics were computed: for OnnxFix.metrics and notes."""

    strategy: str = "segments"
    layers: int = 0
    segments: int = 0
    passes: int = 0
    peak: int = 0
    fallback: str | None = None
    chunks: list[int] = field(default_factory=list)


def population_statistics(fix: OnnxFix, feed: DataFeed, targets: list[str], finish: Callable[[_Layer], None], *,
                          engine: str = "auto", strategy: str = "auto", memory_budget: int = DEFAULT_BUDGET) -> _Run:
    """Measure the BNs whose outputs are `targets`, in topological order; `finish(layer)` must write
    each layer's statistics into `fix.model` (the next segment reads them)."""
    if strategy not in ("auto", "segments", "passes"):
        raise UsageError(f"strategy must be auto, segments or passes, not {strategy!r}")
    engine = pick_engine(engine)
    plan = _Plan(fix.model.graph, targets)
    layers = [_Layer(fix, plan.bn_index[y], order) for order, y in enumerate(plan.targets)]
    run = _Run(layers=len(layers))
    start = 0
    if strategy == "passes" or (strategy == "auto" and feed.bytes() > memory_budget):
        run.fallback = None if strategy == "passes" else f"the data alone is {gib(feed.bytes())}, over the {gib(memory_budget)} budget"
    else:
        start = _segments(fix, feed, plan, layers, finish, engine, strategy == "auto", memory_budget, run)
    if start < len(layers):
        run.strategy = "segments + truncated passes" if start else "truncated passes"
        for layer in layers[start:]:
            nodes = plan.closure([layer.x])
            inputs = sorted({n for i in nodes for n in plan.reads[i] if n in plan.inputs})
            runner = session(plan.submodel(fix.model, nodes, dict.fromkeys(inputs), [layer.x]), engine, fix.source) if nodes else None
            for feeds in feed.batches():
                layer.add(runner([layer.x], {n: feeds[n] for n in inputs})[0] if runner is not None else feeds[layer.x])
            run.passes += 1
            finish(layer)
    return run


def _host_bn(fix: OnnxFix, layer: _Layer, chunks: list[np.ndarray], in_place: bool) -> list[np.ndarray]:
    """The just-recalibrated BN applied to its cached input with numpy, Y = X * a + b with
    a = scale / sqrt(var + epsilon), b = B - mean * a (its inference formula, from the values as
    stored): about 4x faster than onnxruntime's BatchNormalization kernel, in place when nothing
    else reads X."""
    graph = fix.model.graph
    facts = GraphFacts(graph)
    node = graph.node[facts.producer[layer.y]]
    scale, bias, mean, var = (np.asarray(facts.value(n), dtype=np.float64).reshape(-1) for n in node.input[1:5])
    factor = scale / np.sqrt(var + layer.eps)
    shift = bias - mean * factor
    out = []
    for x in chunks:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        kind = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        a, b = factor.astype(kind).reshape(shape), shift.astype(kind).reshape(shape)
        y = x if in_place and x.dtype == kind and x.flags.writeable else np.empty(x.shape, kind)
        np.multiply(x, a, out=y)
        np.add(y, b, out=y)
        out.append(y if y.dtype == x.dtype else y.astype(x.dtype))
    return out


def _recycle(pool: dict[tuple[tuple[int, ...], str], list[np.ndarray]], dropped: list[np.ndarray],
             cache: dict[str, list[np.ndarray]], limit: int) -> None:
    """Keep dropped chunk buffers for later segments' outputs (at most `limit` bytes, newest
    first). Only memory nothing live can see: a BN applied in place shares its input's arrays."""
    live = [a for arrays in cache.values() for a in arrays]
    kept = {id(a) for a in live} | {id(a.base) for a in live if a.base is not None}
    for array in dropped:
        hidden = id(array) not in kept and (array.base is None or id(array.base) not in kept)
        if hidden and array.flags.c_contiguous and array.flags.writeable:
            pool.setdefault((array.shape, array.dtype.str), []).append(array)
    total = _bytes(pool)
    for key in list(pool):
        while pool[key] and total > limit:
            total -= pool[key].pop(0).nbytes
        if not pool[key]:
            del pool[key]


def _bytes(cache: dict[Any, list[np.ndarray]]) -> int:
    return sum(a.nbytes for arrays in cache.values() for a in arrays)


def _segments(fix: OnnxFix, feed: DataFeed, plan: _Plan, layers: list[_Layer], finish: Callable[[_Layer], None],
              engine: str, may_fall_back: bool, budget: int, run: _Run) -> int:
    """The segmented pass; returns how many layers it finished (all, unless memory ran over)."""
    wanted = plan.live(0)
    cache: dict[str, list[np.ndarray]] = {name: [] for name in plan.inputs if name in wanted}
    for feeds in feed.batches():
        for name in cache:
            cache[name].append(feeds[name])
        run.chunks.append(next(iter(feeds.values())).shape[0] if feeds else 0)
    run.peak = _bytes(cache)
    previous = -1
    host = {plan.bn_index[layer.y] for layer in layers}
    pool: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}  # dropped buffers, reused as outputs
    for number, layer in enumerate(layers):
        cut = plan.position[plan.bn_index[layer.y]]
        nodes = {i for i in plan.needed if previous < plan.position[i] < cut and i not in host}
        live = plan.live(cut)
        made = {o for i in nodes for o in fix.model.graph.node[i].output if o}
        outputs = sorted(live & made)
        if nodes and outputs:
            inputs = sorted({n for i in nodes for n in plan.reads[i] if n in plan.dynamic and n not in made})
            runner = session(plan.submodel(fix.model, nodes, {n: cache[n][0] for n in inputs}, outputs), engine, fix.source)
            run.segments += 1
            for name in outputs:
                cache[name] = []
            for chunk, size in enumerate(run.chunks):
                shapes = [(size, *cache[n][0].shape[1:]) if chunk and cache[n][0].shape[0] == run.chunks[0] else None for n in outputs]
                into = [pool[key].pop() if shape and pool.get(key := (shape, cache[n][0].dtype.str)) else None
                        for n, shape in zip(outputs, shapes)]
                for name, value in zip(outputs, runner(outputs, {n: cache[n][chunk] for n in inputs}, into)):
                    cache[name].append(value)
                if chunk == 0 and may_fall_back:
                    first = sum(cache[n][0].nbytes for n in outputs)
                    projected = _bytes(cache) + _bytes(pool) + first * (len(run.chunks) - 1)
                    if projected > budget:
                        run.fallback = (f"the live tensors before layer {layer.name} would take {gib(projected)}, "
                                        f"over the {gib(budget)} budget")
                        return number
            run.peak = max(run.peak, _bytes(cache) + _bytes(pool))
        for value in cache[layer.x]:
            layer.add(value)
        finish(layer)
        if plan.bn_index[layer.y] in plan.needed:
            cache[layer.y] = _host_bn(fix, layer, cache[layer.x], in_place=plan.last_use[layer.x] <= cut)
        dropped = [a for n in [n for n in cache if n not in plan.live(cut + 1)] for a in cache.pop(n)]
        _recycle(pool, dropped, cache, budget // 8)
        previous = cut
    return len(layers)


def recalibrate_onnx(source: str | os.PathLike[str] | OnnxFix, data: str | os.PathLike[str], *, layers: str | list[str] | None = None,
                     engine: str = "auto", dry_run: bool = False, inputs: Mapping[str, str] | None = None, batch_size: int = 32,
                     strategy: str = "auto", memory_budget: int = DEFAULT_BUDGET) -> OnnxFix:
    """Recalibrate every top-level inference-form BatchNormalization (or those whose bnlint name
    matches the glob(s) `layers`) to the population statistics of its input on `data`.

    Layers not selected keep their statistics (later layers are measured with them). BNs in
    training form, or with mean/var computed from the batch, must be rewritten first
    (`bnlint.fix.onnx_rewrite.rewrite_training_mode`): they would make every statistic depend on
    how the data is split. `dry_run` computes everything and refuses to write.
    """
    started = time.perf_counter()
    fix = load_fix(source)
    graph = fix.model.graph
    facts = GraphFacts(graph)
    version = bn_version(model_opset(fix.model))
    candidates: list[str] = []
    batch_stats = []
    modules: dict[str, str] = {}  # layer name -> PyTorch module path (dynamo exports): --layers matches either
    for index, node in enumerate(graph.node):
        if not is_bn(node):
            continue
        name = fix.layer_name(index, node)
        computed = [n for n in node.input[3:5] if facts.value(n) is None and facts.depends_on_data(n)]
        if training_reasons(node, version) or computed:
            batch_stats.append(name)
        elif len(node.input) < 5 or any(facts.value(n) is None for n in node.input[3:5]):
            fix.refused[name] = "its mean/var are not stored tensors (nor computed from the batch)"
        elif version <= 7 and int(next((a.i for a in node.attribute if a.name == "spatial"), 1)) == 0:
            fix.refused[name] = "spatial=0 (per-activation statistics) is not supported"
        else:
            candidates.append(node.output[0])
            modules[name] = fix.module_name(index, node)
    if batch_stats:
        listed = ", ".join(batch_stats[:3]) + (", ..." if len(batch_stats) > 3 else "")
        raise RecalibrationError(f"{len(batch_stats)} BatchNormalization node(s) normalise with batch statistics ({listed}); "
                                 "rewrite them to inference form first (rewrite_training_mode)")
    chosen = set(select([fix.names.get(y, y) for y in candidates], layers, modules))
    targets = [y for y in candidates if fix.names.get(y, y) in chosen]
    if layers is not None and not targets:
        known = ", ".join(fix.names.get(y, y) for y in candidates[:5])
        more = ", ..." if len(candidates) > 5 else ""
        raise UsageError(f"--layers {layers!r} matches no recalibratable BatchNormalization layer (layers: {known}{more})")
    if not targets:
        fix.notes.append("no inference-form BatchNormalization with stored statistics: nothing to recalibrate")
        fix.dry_run = dry_run
        return fix
    feed = open_data(fix, data, inputs, batch_size)
    own_statistics(fix.model.graph, targets, fix.layer_name, fix.module_name)
    run = population_statistics(fix, feed, targets, lambda layer: store(fix, layer), engine=engine, strategy=strategy,
                                memory_budget=memory_budget)
    report_run(fix, run, feed, time.perf_counter() - started)
    fix.dry_run = dry_run
    return fix


def store(fix: OnnxFix, layer: _Layer, placeholder: bool = False) -> None:
    """Write a measured layer's statistics into the working model and record them (`placeholder`:
    the stored values were only placeholders, so there are no old statistics to compare)."""
    graph = fix.model.graph
    facts = GraphFacts(graph)
    index = next(i for i, n in enumerate(graph.node) if is_bn(n) and n.output[0] == layer.y)
    node = graph.node[index]
    old = {key: (None if (v := facts.value(name)) is None else v.astype(np.float64).reshape(-1))
           for key, name in (("running_mean", node.input[3]), ("running_var", node.input[4]), ("weight", node.input[1]))}
    if placeholder:
        old["running_mean"] = old["running_var"] = None
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # the drift from NaN/negative stored variances is meaningless
        result = finish_layer(layer.name, layer.module, layer.order, layer.moments(), layer.calls, layer.eps, old, None, has_counter=False)
    for name, values in ((node.input[3], result.mean), (node.input[4], result.var)):
        holder = facts.value(name)
        limit = np.finfo(holder.dtype).max if holder is not None and holder.dtype.kind == "f" else np.inf
        if np.abs(values).max(initial=0.0) > limit:
            kind = holder.dtype if holder is not None else "?"
            raise RecalibrationError(f"layer {layer.name}: the new statistics exceed the range of {kind} "
                                     f"({float(np.abs(values).max()):.3g}); nothing was written")
        write_tensor(graph, name, values)
    fix.layers.append(result)


def report_run(fix: OnnxFix, run: _Run, feed: DataFeed, seconds: float) -> None:
    fix.metrics.update({"recalibrate_seconds": seconds, "recalibrate_peak_cache_bytes": float(run.peak),
                        "recalibrate_segments": float(run.segments), "recalibrate_truncated_passes": float(run.passes)})
    how = f"{run.strategy} ({run.segments} segments, {run.passes} truncated passes; peak cache {gib(run.peak)})"
    fix.notes.append(f"statistics of {run.layers} layer(s) from {feed.samples} samples in batches of {feed.batch_size}: {how}")
    if run.fallback:
        fix.notes.append(f"truncated passes because {run.fallback}")
