"""Run ONNX models with onnxruntime (when installed) or onnx's reference evaluator.

The graph is copied and, for every top-level BatchNormalization node, a few nodes are appended
that reduce its X input to per-sample mean and variance (Reshape to (N, C, L), ReduceMean,
Sub, Mul, ReduceMean: an exact two-pass variance in the input's precision, float32 at least);
those small tensors become the graph's outputs, and nodes no output needs are dropped.

Why not let onnxruntime run the original graph and read X: its optimiser folds BN into the Conv
before it (X then no longer exists), and a training_mode=1 node was seen giving run-to-run
different outputs under full optimisation. The reductions consume X, which keeps it alive, and
the session runs with graph optimisation limited to ORT_ENABLE_BASIC (constant folding and
redundancy removal) when any BN node is in training form; otherwise fully, since nothing may
remove or fold a tensor the appended reductions consume. The few-sample batch-dependence runs,
which read BN outputs too, always use basic optimisation.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnlint.dynamic.runner import Batches, Capture, LayerSpec
from bnlint.dynamic.stats import NumpyOps
from bnlint.errors import DataError, InputError, UsageError
from bnlint.model import ModelInfo

_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def _needed(graph: onnx.GraphProto, outputs: list[str]) -> list[onnx.NodeProto]:
    """Nodes the given outputs depend on, in their original order."""
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    keep: set[int] = set()
    stack = list(outputs)
    while stack:
        index = producers.get(stack.pop())
        if index is None or index in keep:
            continue
        keep.add(index)
        node = graph.node[index]
        stack.extend(node.input)
        for attribute in node.attribute:  # subgraphs (If/Loop) may read outer tensors
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                stack.extend(name for inner in sub.node for name in inner.input)
    return [node for i, node in enumerate(graph.node) if i in keep]


class OnnxRunner:
    def __init__(self, info: ModelInfo, engine: str, device: str, data_path: str) -> None:
        self.data_path = data_path
        self.model_path = info.path
        self.ops = NumpyOps()
        self.notes: list[str] = []
        try:
            self.model = onnx.load(info.path)  # with external data, unlike the linting loader
        except Exception as exc:  # protobuf/IO errors come in many types
            raise InputError(info.path, f"onnx.load failed: {exc}") from None
        graph = self.model.graph
        self.opset = _opset(self.model)
        initializers = {t.name for t in graph.initializer}
        self.inputs = [v for v in graph.input if v.name not in initializers]
        self.input_names = [v.name for v in self.inputs]
        self.input_types = [v.type.tensor_type.elem_type for v in self.inputs]
        self.input_shapes: list[tuple[int | None, ...] | None] = []
        fixed: set[int] = set()
        for value in self.inputs:
            dims = value.type.tensor_type.shape.dim if value.type.tensor_type.HasField("shape") else None
            if dims is None:
                self.input_shapes.append(None)
                continue
            self.input_shapes.append(tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in list(dims)[1:]))
            if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                fixed.add(dims[0].dim_value)
        self.fixed_batch = min(fixed) if fixed else None
        try:
            typed = onnx.shape_inference.infer_shapes(self.model)
            values = [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]
            self.types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}
            self.spatial = {v.name: _static_spatial(v) for v in values}
        except Exception:  # onnx raises several types; without inference, float32 is assumed
            self.types, self.spatial = {}, {}
        self.bn_nodes = [(i, n) for i, n in enumerate(graph.node) if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]
        nested = sum(1 for n in _all_nodes(graph) if n.op_type == "BatchNormalization") - len(self.bn_nodes)
        if nested:
            self.notes.append(f"{nested} BatchNormalization node(s) inside subgraphs (If/Loop) were not measured")
        by_node = {layer.node_index: layer for layer in info.layers if layer.node_index is not None}
        stored = {t.name: t for t in graph.initializer}
        self.layers = [self._spec(i, node, by_node.get(i), stored) for i, node in self.bn_nodes]
        self.engine_name = self._pick_engine(engine)
        self.device = device
        # Full optimisation is safe for the statistics: the appended reductions consume every X,
        # so no rewrite may remove or fold it. A BN node in training form is the exception (run-to-run
        # differences were seen under full optimisation): then only basic rewrites.
        self.level = "basic" if any(spec.uses_batch_stats for spec in self.layers) else "all"
        self._stats = self._session(self._stats_model(), self.level) if self.bn_nodes else None
        self.engine = self._describe()

    def _spec(self, index: int, node: onnx.NodeProto, layer: Any, values: dict[str, onnx.TensorProto]) -> LayerSpec:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

        def array(position: int, key: str) -> np.ndarray | None:
            if layer is not None and layer.array(key) is not None:
                return layer.array(key)
            name = node.input[position] if len(node.input) > position else ""
            return numpy_helper.to_array(values[name]).astype(np.float64).reshape(-1) if name in values else None

        training = bool(layer.training) if layer is not None and layer.training is not None else attrs.get("training_mode", 0) == 1
        if layer is not None and layer.stats_source == "computed":  # mean/var computed from the batch in-graph
            training = True
        return LayerSpec(
            name=layer.name if layer is not None else (node.name or f"BatchNormalization_{index}"),
            eps=float(attrs.get("epsilon", 1e-5)),
            running_mean=array(3, "running_mean"),
            running_var=array(4, "running_var"),
            weight=array(1, "weight"),
            bias=array(2, "bias"),
            uses_batch_stats=True if training else None,
        )

    def _pick_engine(self, engine: str) -> str:
        if engine in ("auto", "onnxruntime"):
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                if engine == "onnxruntime":
                    raise UsageError("onnx engine onnxruntime requested but onnxruntime is not installed (pip install bnlint[onnxruntime])") from None
                self.notes.append("onnxruntime is not installed: used onnx.reference.ReferenceEvaluator (slow)")
                return "reference"
            return "onnxruntime"
        return "reference"

    def _describe(self) -> str:
        if self.engine_name == "onnxruntime":
            import onnxruntime

            provider = self._stats.get_providers()[0] if self._stats is not None else "CPUExecutionProvider"
            return f"onnxruntime {onnxruntime.__version__} ({provider}, graph optimisation {self.level})"
        return f"onnx.reference.ReferenceEvaluator (onnx {onnx.__version__})"

    def _stats_model(self) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        types = self.types
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "bnlint/shape_ncl"))
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0], dtype=np.int64), "bnlint/shape_nc"))
        if self.opset >= 18:
            graph.initializer.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "bnlint/axis2"))
        self.stat_outputs: list[tuple[str, ...]] = []
        out_types: dict[str, int] = {}
        for number, (_, node) in enumerate(self.bn_nodes):
            x, p = node.input[0], f"bnlint/{number}/"
            kind = types.get(x, TensorProto.FLOAT)
            if kind not in _FLOATS:
                kind = TensorProto.FLOAT
                graph.node.append(helper.make_node("Cast", [x], [p + "x32"], to=TensorProto.FLOAT))
                x = p + "x32"
            graph.node.extend([
                helper.make_node("Reshape", [x, "bnlint/shape_ncl"], [p + "ncl"]),
                self._reduce_mean(p + "ncl", p + "mean3"),
                helper.make_node("Sub", [p + "ncl", p + "mean3"], [p + "centred"]),
                helper.make_node("Mul", [p + "centred", p + "centred"], [p + "square"]),
                self._reduce_mean(p + "square", p + "var3"),
                helper.make_node("Reshape", [p + "var3", "bnlint/shape_nc"], [p + "var"]),
                helper.make_node("Reshape", [p + "mean3", "bnlint/shape_nc"], [p + "mean"]),
            ])
            if self.spatial.get(node.input[0]) is None:  # spatial size unknown until run time: fetch the shape
                graph.node.append(helper.make_node("Shape", [p + "ncl"], [p + "shape"]))
                self.stat_outputs.append((p + "var", p + "mean", p + "shape"))
            else:
                self.stat_outputs.append((p + "var", p + "mean"))
            out_types.update({p + "var": kind, p + "mean": kind, p + "shape": TensorProto.INT64})
        names = [n for group in self.stat_outputs for n in group]
        kept = _needed(graph, names)
        del graph.node[:]
        graph.node.extend(kept)
        del graph.output[:]
        for name in names:
            graph.output.append(helper.make_tensor_value_info(name, out_types[name], None))
        return model

    def _reduce_mean(self, source: str, target: str) -> onnx.NodeProto:
        if self.opset >= 18:
            return helper.make_node("ReduceMean", [source, "bnlint/axis2"], [target], keepdims=1)
        return helper.make_node("ReduceMean", [source], [target], axes=[2], keepdims=1)

    def _io_model(self) -> tuple[onnx.ModelProto, list[str]]:
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        existing = [o.name for o in model.graph.output]
        extra = [name for _, node in self.bn_nodes for name in (node.input[0], node.output[0])]
        for name in dict.fromkeys(extra):
            if name not in existing:
                model.graph.output.append(helper.make_tensor_value_info(name, self.types.get(name, TensorProto.FLOAT), None))
        return model, existing

    def _session(self, model: onnx.ModelProto, level: str = "basic") -> Any:
        if self.engine_name == "reference":
            from onnx.reference import ReferenceEvaluator

            return ReferenceEvaluator(model)
        import onnxruntime as ort

        options = ort.SessionOptions()
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
        options.graph_optimization_level = levels[level]
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if self.device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InputError(self.model_path, f"onnxruntime could not load the graph: {str(exc).splitlines()[0][:300]}") from None

    def _feeds(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {}
        for name, kind, array in zip(self.input_names, self.input_types, arrays):
            dtype = helper.tensor_dtype_to_np_dtype(kind) if kind else np.dtype(np.float32)
            feeds[name] = np.ascontiguousarray(array, dtype=dtype)
        return feeds

    def _run(self, session: Any, names: list[str] | None, arrays: list[np.ndarray]) -> list[Any]:
        try:
            return list(session.run(names, self._feeds(arrays)))
        except Exception as exc:  # engine errors: shape/type mismatches with the data
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise DataError(self.data_path, f"the model rejected the data (batch shape {arrays[0].shape}): {text}") from None

    def collect(self, batches: Batches, add: Callable[[str, Any, Any, int], None], end_batch: Callable[[], None]) -> None:
        if self._stats is None:
            return
        names = [n for group in self.stat_outputs for n in group]
        sizes = [self.spatial.get(node.input[0]) for _, node in self.bn_nodes]
        for _, arrays in batches:
            values = iter(self._run(self._stats, names, arrays))
            for layer, group, size in zip(self.layers, self.stat_outputs, sizes):
                var, mean = next(values), next(values)
                if len(group) == 3:
                    size = int(np.asarray(next(values))[2])
                add(layer.name, var, mean, int(size or 1))
            end_batch()

    def capture(self, arrays: list[np.ndarray]) -> Capture:
        model, outputs = self._io_model()
        if not hasattr(self, "_io_session"):
            self._io_session = self._session(model)
        pairs = [(node.input[0], node.output[0]) for _, node in self.bn_nodes]
        names = list(dict.fromkeys([*outputs, *(n for pair in pairs for n in pair)]))
        values = dict(zip(names, self._run(self._io_session, names, arrays)))
        layers = {spec.name: [(np.asarray(values[x], np.float32), np.asarray(values[y], np.float32))] for spec, (x, y) in zip(self.layers, pairs)}
        return Capture(outputs=[np.asarray(values[n], np.float32) for n in outputs], layers=layers)


def _static_spatial(value: onnx.ValueInfoProto) -> int | None:
    """Product of the dims after (N, C) when shape inference knows them all, else None."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape") or len(tensor.shape.dim) < 2:
        return None
    size = 1
    for dim in list(tensor.shape.dim)[2:]:
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            return None
        size *= dim.dim_value
    return size


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                nodes.extend(_all_nodes(sub))
    return nodes
