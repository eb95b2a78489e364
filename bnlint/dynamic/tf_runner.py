"""Run TensorFlow SavedModels for --data, with TensorFlow, in the isolated child only.

A SavedModel is a graph plus a variables bundle: loading it (`tf.saved_model.load`) builds ops
and reads tensors and runs no Python from the file, but graph ops can read and write files, so
without --trust every op is first vetted from the file's bytes (bnlint.dynamic.tf_gate: pure
arithmetic on the serving path, checkpoint I/O only off it), before TensorFlow is imported. The serving
signature (or the only one) is frozen: its variables become constants
(`convert_to_constants`, functions inlined, control flow lowered), and then every
FusedBatchNorm/V2/V3 node's mean and variance inputs are replaced by placeholders. One imported
graph then serves every use: a run feeds the data and each layer's statistics (the stored ones
to measure, new ones while recalibrating) and fetches any BN node's input `x`, output `y` and
the model outputs in one call. Variable-writing ops (a training-mode graph's moving-average
updates) are dropped from the copy: a measurement never changes the model.

Only fused BatchNorm nodes are measured: unfused arithmetic (Keras 3 exports) is named in a note
and its layers are reported as never reached. is_training=true nodes normalise with the batch's
moments: they are `uses_batch_stats` layers, like an ONNX training-mode node.

Layer names are the static loader's (bnlint.loaders.tf_savedmodel) so findings, baselines and
per-layer ignores line up: a node whose name ends with one of a static layer's site names
(`convnet/bn1/FusedBatchNormV3`, inlined under `StatefulPartitionedCall/`), else the one layer
left, else the layer whose stored statistics are the node's constants.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from bnlint.dynamic.ops import NumpyOps
from bnlint.dynamic.runner import Batches, Capture, LayerSpec
from bnlint.dynamic.stats import per_sample_moments_numpy
from bnlint.errors import DataError, InputError, UsageError
from bnlint.model import ModelInfo

BN_OPS = frozenset({"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"})
# Ops that write variables: dropped from the measured copy of the graph (a training graph's updates).
WRITE_OPS = frozenset({"AssignVariableOp", "AssignNewValue", "AssignAddVariableOp", "AssignSubVariableOp", "Assign",
                       "AssignAdd", "AssignSub"})
INSTALL = "pip install 'bnlint[tensorflow]' (tensorflow-cpu)"


def import_tensorflow() -> Any:
    """TensorFlow, quiet; one line naming the extra when it is missing."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # its C++ start-up chatter is not bnlint's output
    try:
        import tensorflow as tf  # type: ignore[import-untyped]  # no stubs (pyproject's overrides could list it)
    except ImportError:
        raise UsageError(f"running a TensorFlow SavedModel on --data needs TensorFlow: {INSTALL}") from None
    return tf


@dataclass
class BNNode:
    """One FusedBatchNorm node of the frozen graph, with the placeholders that feed its statistics."""

    node: str
    x: str  # its input tensor's name
    y: str
    channels_last: bool
    training: bool
    eps: float
    mean: np.ndarray  # the stored statistics (float64)
    var: np.ndarray
    mean_feed: str
    var_feed: str
    dtype: Any  # the statistics' numpy dtype


def _tensor_name(name: str) -> str:
    return name if ":" in name else f"{name}:0"


def _const(nodes: dict[str, Any], name: str, tf: Any) -> np.ndarray | None:
    """The value behind a tensor name, through Identity ops, or None if it is not a constant."""
    for _ in range(64):
        node = nodes.get(name.lstrip("^").split(":")[0])
        if node is None:
            return None
        if node.op == "Const":
            return np.asarray(tf.make_ndarray(node.attr["value"].tensor))
        if node.op not in ("Identity", "IdentityN", "Snapshot") or not node.input:
            return None
        name = node.input[0]
    return None


def _topological(graph_def: Any) -> list[str]:
    """Node names in an order where every node comes after its inputs (Kahn's algorithm)."""
    names = [n.name for n in graph_def.node]
    known = set(names)
    inputs = {n.name: {i.lstrip("^").split(":")[0] for i in n.input} & known for n in graph_def.node}
    users: dict[str, list[str]] = {}
    for name, deps in inputs.items():
        for dep in deps:
            users.setdefault(dep, []).append(name)
    ready = [n for n in names if not inputs[n]]
    order = []
    while ready:
        name = ready.pop()
        order.append(name)
        for user in users.get(name, []):
            inputs[user].discard(name)
            if not inputs[user]:
                ready.append(user)
    return order


class TFGraph:
    """A SavedModel's serving signature frozen into one graph whose BN statistics are inputs."""

    def __init__(self, path: str) -> None:
        tf = self.tf = import_tensorflow()
        from tensorflow.python.framework import convert_to_constants as freeze  # type: ignore[import-untyped]

        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."  # saved_model.pb given: its folder
        try:
            loaded = tf.saved_model.load(folder)  # graphs and tensors only: no Python from the file runs
        except Exception as exc:  # TensorFlow raises many types for unreadable SavedModels
            raise InputError(path, f"tf.saved_model.load failed: {_first_line(exc)}") from None
        signatures = dict(getattr(loaded, "signatures", {}) or {})
        key = "serving_default" if "serving_default" in signatures else next(iter(signatures)) if len(signatures) == 1 else None
        if key is None:
            what = f"{len(signatures)} signatures and none is serving_default" if signatures else "no signature"
            raise InputError(path, f"{what}: bnlint runs a SavedModel's serving signature")
        self.signature = key
        function = signatures[key]
        try:
            data = freeze._FunctionConverterDataInEager(func=function, lower_control_flow=True, aggressive_inlining=True)
            graph_def, _ = freeze._replace_variables_by_constants(converter_data=data)
        except Exception as exc:  # a graph TensorFlow cannot freeze: one line, not a traceback
            raise InputError(path, f"the serving signature could not be frozen: {_first_line(exc)}") from None
        self.inputs = [t for t in function.inputs if t.dtype != tf.resource][:len(function.structured_input_signature[1]) or None]
        self.input_names = [t.name.split(":")[0] for t in self.inputs]
        self.outputs = [_tensor_name(t.name) for t in function.outputs]
        self.bn = self._rewrite(graph_def)
        body = graph_def

        def imported() -> None:
            tf.graph_util.import_graph_def(body, name="")

        try:
            self.wrapped = tf.compat.v1.wrap_function(imported, [])
        except Exception as exc:  # noqa: BLE001 - an odd graph: one line
            raise InputError(path, f"the frozen serving graph could not be imported: {_first_line(exc)}") from None
        self._pruned: dict[tuple[str, ...], Any] = {}

    def _rewrite(self, graph_def: Any) -> list[BNNode]:
        """Drop variable writes; give every fused BN node placeholders for its mean and variance."""
        tf = self.tf
        dropped = {n.name for n in graph_def.node if n.op in WRITE_OPS}
        kept = [n for n in graph_def.node if n.name not in dropped]
        del graph_def.node[:]
        graph_def.node.extend(kept)
        for node in graph_def.node:
            inputs = [i for i in node.input if i.lstrip("^").split(":")[0] not in dropped]
            if len(inputs) != len(node.input):
                del node.input[:]
                node.input.extend(inputs)
        nodes = {n.name: n for n in graph_def.node}
        order = {name: k for k, name in enumerate(_topological(graph_def))}
        found: list[BNNode] = []
        for node in sorted((n for n in graph_def.node if n.op in BN_OPS), key=lambda n: order.get(n.name, 1 << 30)):
            if len(node.input) < 5:
                continue
            stat_type = node.attr["U"].type if "U" in node.attr else node.attr["T"].type
            dtype = tf.dtypes.as_dtype(stat_type).as_numpy_dtype
            values = [_const(nodes, node.input[k], tf) for k in (3, 4)]
            feeds = []
            for k, role in ((3, "mean"), (4, "variance")):
                feed = graph_def.node.add()
                feed.name = f"bnlint_statistics/{len(found)}/{role}"
                feed.op = "Placeholder"
                feed.attr["dtype"].type = stat_type
                node.input[k] = feed.name
                feeds.append(feed.name + ":0")
            channels = max((v.size for v in values if v is not None), default=0)
            mean, var = (np.asarray(v, np.float64).reshape(-1) if v is not None and v.size else np.zeros(channels)
                         for v in values)
            fmt = node.attr["data_format"].s.decode() if "data_format" in node.attr else "NHWC"
            training = bool(node.attr["is_training"].b) if "is_training" in node.attr else True  # the op's default
            found.append(BNNode(node.name, _tensor_name(node.input[0]), node.name + ":0", fmt in ("NHWC", "NDHWC"), training,
                                float(node.attr["epsilon"].f), mean, var, feeds[0], feeds[1], dtype))
        return found

    def run(self, arrays: list[np.ndarray], fetches: list[str], stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
            ) -> list[np.ndarray]:
        """Fetch `fetches` for the data; `stats` maps BN node -> (mean, var) fed instead of the stored ones."""
        tf = self.tf
        key = tuple(fetches)
        if key not in self._pruned:
            graph = self.wrapped.graph
            feeds = [graph.get_tensor_by_name(_tensor_name(n)) for n in self.input_names]
            feeds += [graph.get_tensor_by_name(f) for b in self.bn for f in (b.mean_feed, b.var_feed)]
            self._pruned[key] = self.wrapped.prune(feeds=feeds, fetches=[graph.get_tensor_by_name(f) for f in fetches])
        values = [tf.constant(np.asarray(a, dtype=t.dtype.as_numpy_dtype)) for a, t in zip(arrays, self.inputs)]
        for b in self.bn:
            mean, var = (stats or {}).get(b.node, (b.mean, b.var))
            values += [tf.constant(np.asarray(mean, b.dtype)), tf.constant(np.asarray(var, b.dtype))]
        result = self._pruned[key](*values)
        return [np.asarray(r.numpy()) for r in (result if isinstance(result, (list, tuple)) else [result])]


def channels_second(x: np.ndarray, channels_last: bool) -> np.ndarray:
    """A BN input with its channel axis at position 1 (what the moments expect)."""
    return np.moveaxis(x, -1, 1) if channels_last and x.ndim > 2 else x


def static_names(info: ModelInfo, graph: TFGraph) -> dict[str, str]:
    """BN node -> the static loader's layer name (see the module docstring)."""
    names: dict[str, str] = {}
    left = list(info.layers)
    for b in graph.bn:
        match = [layer for layer in left if any(b.node == site or b.node.endswith("/" + site) for site in layer.aliases)]
        if len(match) == 1:
            names[b.node] = match[0].name
            left.remove(match[0])
    rest = [b for b in graph.bn if b.node not in names]
    if len(rest) == 1 and len(left) == 1:
        names[rest[0].node] = left[0].name
        return names
    for b in rest:
        same = [layer for layer in left if _same_stats(layer, b)]
        if len(same) == 1:
            names[b.node] = same[0].name
            left.remove(same[0])
        else:
            names[b.node] = b.node.removeprefix("StatefulPartitionedCall/").removesuffix("/" + b.node.rpartition("/")[2])
    return names


def _same_stats(layer: Any, b: BNNode) -> bool:
    try:
        mean, var = layer.array("running_mean"), layer.array("running_var")
    except InputError:
        return False
    return mean is not None and var is not None and np.array_equal(np.asarray(mean, np.float64).reshape(-1), b.mean, equal_nan=True) \
        and np.array_equal(np.asarray(var, np.float64).reshape(-1), b.var, equal_nan=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def open_tf_runner(model: ModelInfo, options: Any, settings: Any) -> TFRunner:
    """The tf-savedmodel record's runner (bnlint.formats): the SavedModel's serving graph on --data."""
    if options.arch:
        raise UsageError("--arch applies to PyTorch weights and Keras custom classes, not to a TensorFlow SavedModel")
    if settings.device == "cuda":
        raise UsageError("--device cuda: bnlint runs TensorFlow SavedModels on the CPU (use --device cpu or auto)")
    return TFRunner(model, options.data, options.trust)


class TFRunner:
    """A SavedModel's frozen serving graph, measured at every fused BatchNorm's input."""

    def __init__(self, info: ModelInfo, data_path: str, trust: bool = False) -> None:
        from bnlint.dynamic.tf_gate import vet_savedmodel

        vet_savedmodel(info.path, trust)  # before TensorFlow is imported: every op checked from the bytes
        self.graph = TFGraph(info.path)
        tf = self.graph.tf
        self.data_path = data_path
        self.ops = NumpyOps()
        self.notes: list[str] = []
        self.names = static_names(info, self.graph)
        self.input_names = list(self.graph.input_names)
        shapes = [tuple(t.shape.as_list()) if t.shape.rank is not None else None for t in self.graph.inputs]
        self.input_shapes: list[tuple[int | None, ...] | None] = [s[1:] if s else None for s in shapes]
        batch = {s[0] for s in shapes if s and s[0] is not None}
        self.fixed_batch: int | None = min(batch) if batch else None
        static = {layer.name: layer for layer in info.layers}
        self.layers = [self._spec(b, static.get(self.names[b.node])) for b in self.graph.bn]
        unfused = [layer.name for layer in info.layers if "unfused" in layer.kind]
        if unfused:
            self.notes.append(f"{len(unfused)} unfused BatchNorm layer(s) ({', '.join(unfused[:3])}) are plain arithmetic in the "
                              "graph: not measured (only FusedBatchNorm nodes are)")
        self.engine = f"tensorflow {tf.__version__} (cpu, frozen serving signature '{self.graph.signature}')"

    def _spec(self, b: BNNode, layer: Any) -> LayerSpec:
        def known(role: str) -> np.ndarray | None:
            try:
                value = layer.array(role) if layer is not None else None
            except InputError:
                return None
            return None if value is None else np.asarray(value, np.float64).reshape(-1)

        return LayerSpec(name=self.names[b.node], eps=b.eps, running_mean=b.mean, running_var=b.var, weight=known("weight"),
                         bias=known("bias"), uses_batch_stats=True if b.training else None)

    def run(self, arrays: list[np.ndarray], fetches: list[str], stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
            ) -> list[np.ndarray]:
        try:
            return self.graph.run(arrays, fetches, stats)
        except Exception as exc:  # TensorFlow's errors for data of the wrong shape or type
            shape = tuple(arrays[0].shape) if arrays else ()
            raise DataError(self.data_path, f"the model rejected the data (batch shape {shape}): {_first_line(exc)}") from None

    def collect(self, batches: Batches, add: Callable[[str, Any, Any, int], None], end_batch: Callable[[], None]) -> None:
        bn = self.graph.bn
        for _, arrays in batches:
            if bn:
                for b, x in zip(bn, self.run(arrays, [b.x for b in bn])):
                    moved = channels_second(x, b.channels_last)
                    if moved.ndim >= 2 and moved.shape[0] > 0:
                        var, mean = per_sample_moments_numpy(moved)
                        add(self.names[b.node], var, mean, int(np.prod(moved.shape[2:], dtype=np.int64)))
            end_batch()

    def capture(self, arrays: list[np.ndarray]) -> Capture:
        bn = self.graph.bn
        fetches = [*self.graph.outputs, *(t for b in bn for t in (b.x, b.y))]
        values = self.run(arrays, fetches)
        outputs = [np.asarray(v, np.float32) for v in values[:len(self.graph.outputs)]]
        pairs = values[len(self.graph.outputs):]
        layers = {self.names[b.node]: [(np.asarray(channels_second(pairs[2 * k], b.channels_last), np.float32),
                                        np.asarray(channels_second(pairs[2 * k + 1], b.channels_last), np.float32))]
                  for k, b in enumerate(bn)}
        return Capture(outputs=outputs, layers=layers)
