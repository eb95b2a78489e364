"""Run ONNX models with onnxruntime (when installed) or onnx's reference evaluator.

The graph is copied and, for every top-level BatchNormalization node, a few nodes are added
that reduce its X input to per-sample mean and sum of squared deviations (Reshape to (N, C, L),
ReduceMean, Sub, ReduceSumSquare: an exact two-pass variance in the input's precision, float32
at least); those small tensors are chained into the graph's one output (see `_stats_model` for
why one chain and not one output per layer: memory), and nodes it does not need are dropped.

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

from bnlint.conventions import conventions
from bnlint.dynamic.runner import Batches, Capture, LayerSpec
from bnlint.dynamic.stats import NumpyOps
from bnlint.errors import DataError, InputError, UsageError
from bnlint.model import ModelInfo
from bnlint.norms import is_batchnorm_op

_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE)
STATS_OUTPUT = "bnlint/stats"


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
            loaded = onnx.load(info.path)  # with external data, unlike the linting loader
        except Exception as exc:  # protobuf/IO errors come in many types
            raise InputError(info.path, f"onnx.load failed: {exc}") from None
        # Only the graph's structure is kept (self.model); the weights go into the statistics graph,
        # built in `loaded` itself, so no second copy is held while onnxruntime builds its own, and
        # the few-sample io graph reads them from the file again.
        self.model = _skeleton(loaded)
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
        except Exception:  # onnx raises several types; without inference, float32 is assumed
            self.types = {}
        self.bn_nodes = [(i, n) for i, n in enumerate(graph.node) if is_batchnorm_op(n.op_type, n.domain)]
        nested = sum(1 for n in _all_nodes(graph) if is_batchnorm_op(n.op_type, n.domain)) - len(self.bn_nodes)
        if nested:
            self.notes.append(f"{nested} BatchNormalization node(s) inside subgraphs (If/Loop) were not measured")
        by_node = {layer.node_index: layer for layer in info.layers if layer.node_index is not None}
        stored = {t.name: t for t in loaded.graph.initializer}
        self.layers = [self._spec(i, node, by_node.get(i), stored) for i, node in self.bn_nodes]
        del stored
        self.engine_name = self._pick_engine(engine)
        self.device = device
        # Full optimisation is safe for the statistics: the appended reductions consume every X,
        # so no rewrite may remove or fold it. A BN node in training form is the exception (run-to-run
        # differences were seen under full optimisation): then only basic rewrites.
        self.level = "basic" if any(spec.uses_batch_stats for spec in self.layers) else "all"
        handed = [loaded]  # the builder takes the only reference, so the proto dies once serialised
        del loaded
        self._stats = self._session(lambda: self._stats_model(handed.pop()), self.level) if self.bn_nodes else None
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
            eps=float(attrs.get("epsilon", conventions("onnx").default_eps)),
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

    def _stats_model(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`model` changed so that its one output, STATS_OUTPUT, holds every layer's per-sample moments.

        Per layer, in order: Shape of X as (N, C, L), then the (N, C) means, then the (N, C) sums
        of squared deviations from each sample's mean (exact two-pass, in X's precision, float32 at
        least), all cast to float64 (exactly) and concatenated into one 1-D tensor.

        Why one chained output: onnxruntime orders execution by a depth-first walk back from the
        graph's outputs, so with one output per layer it ran every reduction after the whole
        network and kept every BatchNorm input of the batch alive until then (5.3 GB against
        0.8 GB for plain inference on ResNet-50, batch 32). A chain of Concats, layer k's after
        layer k-1's, makes each layer's reductions run as soon as its X exists, X is freed right
        after, and is reduced while still in cache.
        """
        graph = model.graph  # changed in place: the caller hands over a copy it no longer needs
        types = self.types
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "bnlint/shape_ncl"))
        graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "bnlint/flat"))
        if self.opset >= 18:
            graph.initializer.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "bnlint/axis2"))
        producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
        inserted: dict[int, list[onnx.NodeProto]] = {}  # reductions placed after X's producer (for node-order engines)
        chain: str | None = None
        links: list[onnx.NodeProto] = []
        for number, (_, node) in enumerate(self.bn_nodes):
            x, p = node.input[0], f"bnlint/{number}/"
            added = inserted.setdefault(producer.get(x, -1), [])
            if types.get(x, TensorProto.FLOAT) not in _FLOATS:
                added.append(helper.make_node("Cast", [x], [p + "x32"], to=TensorProto.FLOAT))
                x = p + "x32"
            added.extend([
                helper.make_node("Reshape", [x, "bnlint/shape_ncl"], [p + "ncl"]),
                self._reduce("ReduceMean", p + "ncl", p + "mean3"),
                helper.make_node("Sub", [p + "ncl", p + "mean3"], [p + "centred"]),
                self._reduce("ReduceSumSquare", p + "centred", p + "m2_3"),
                helper.make_node("Shape", [p + "ncl"], [p + "shape"]),
            ])
            parts = []
            for name in ("shape", "mean3", "m2_3"):
                added.append(helper.make_node("Reshape", [p + name, "bnlint/flat"], [p + name + "_flat"]))
                added.append(helper.make_node("Cast", [p + name + "_flat"], [p + name + "_f64"], to=TensorProto.DOUBLE))
                parts.append(p + name + "_f64")
            link = p + "chain"
            links.append(helper.make_node("Concat", ([chain] if chain else []) + parts, [link], axis=0))
            chain = link
        ordered = list(inserted.get(-1, []))  # X is a graph input or initializer: reduce it first
        for index, original in enumerate(graph.node):
            ordered.extend([original, *inserted.get(index, [])])
        # The Concats go last, in layer order: onnxruntime's walk visits a node's inputs from the
        # highest node index down, so each link's predecessor (a later node than the layer's own
        # reductions) is walked first, and layer k's reductions are scheduled before layer k+1's
        # part of the network. tests/test_onnx_runner_memory.py checks the resulting order.
        ordered.extend(links)
        if chain is not None:
            ordered.append(helper.make_node("Identity", [chain], [STATS_OUTPUT]))
        for added_node in [*(n for nodes in inserted.values() for n in nodes), *links]:
            added_node.name = added_node.output[0]  # "bnlint/<layer>/...": recognisable in profiles
        del graph.node[:]
        graph.node.extend(ordered)
        kept = _needed(graph, [STATS_OUTPUT])
        del graph.node[:]
        graph.node.extend(kept)
        del graph.output[:]
        graph.output.append(helper.make_tensor_value_info(STATS_OUTPUT, TensorProto.DOUBLE, None))
        return model

    def _reduce(self, op: str, source: str, target: str) -> onnx.NodeProto:
        """`op` over axis 2 of an (N, C, L) tensor, keeping dims (axes an input from opset 18)."""
        if self.opset >= 18:
            return helper.make_node(op, [source, "bnlint/axis2"], [target], keepdims=1)
        return helper.make_node(op, [source], [target], axes=[2], keepdims=1)

    def _full(self) -> onnx.ModelProto:
        """The model with its weights, read from the file again (self.model keeps only the structure)."""
        try:
            return onnx.load(self.model_path)
        except Exception as exc:  # the file changed under us, or memory ran out
            raise InputError(self.model_path, f"onnx.load failed: {exc}") from None

    def _full_stats_model(self) -> onnx.ModelProto:
        return self._stats_model(self._full())

    def _io_model(self) -> onnx.ModelProto:
        """The model with every BN input and output added to its outputs (few-sample captures)."""
        model = self._full()
        existing = [o.name for o in model.graph.output]
        extra = [name for _, node in self.bn_nodes for name in (node.input[0], node.output[0])]
        for name in dict.fromkeys(extra):
            if name not in existing:
                model.graph.output.append(helper.make_tensor_value_info(name, self.types.get(name, TensorProto.FLOAT), None))
        return model

    def _session(self, build: Callable[[], onnx.ModelProto], level: str = "basic") -> Any:
        """A session over the graph `build` returns; the graph copy is dropped once serialised.

        Memory: a second in-memory copy of every weight, alive while onnxruntime builds its own,
        raised the peak by the model's size (100 MB for ResNet-50).
        """
        if self.engine_name == "reference":
            from onnx.reference import ReferenceEvaluator

            return ReferenceEvaluator(build())
        import onnxruntime as ort

        options = ort.SessionOptions()
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
        options.graph_optimization_level = levels[level]
        options.log_severity_level = 3
        # Memory patterns pre-plan one block per batch shape; with the statistics' extra tensors that
        # cost 0.4 GB more at the peak on ResNet-50 and no speed (bench/bench_onnx_memory.py).
        options.enable_mem_pattern = False
        providers = ["CPUExecutionProvider"]
        if self.device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        serialised = build().SerializeToString()
        try:
            return ort.InferenceSession(serialised, options, providers=providers)
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
        if not self.bn_nodes:
            return
        if self._stats is None:  # dropped by capture() to make room for the io session
            self._stats = self._session(self._full_stats_model, self.level)
        for _, arrays in batches:
            (flat,) = self._run(self._stats, [STATS_OUTPUT], arrays)
            flat = np.asarray(flat, dtype=np.float64)
            position = 0
            for layer in self.layers:  # per layer: (N, C, L), N*C means, N*C sums of squared deviations
                rows, channels, size = (int(v) for v in flat[position:position + 3])
                count = rows * channels
                mean = flat[position + 3:position + 3 + count].reshape(rows, channels)
                m2 = flat[position + 3 + count:position + 3 + 2 * count].reshape(rows, channels)
                position += 3 + 2 * count
                add(layer.name, m2 / max(size, 1), mean, max(size, 1))
            end_batch()

    def capture(self, arrays: list[np.ndarray]) -> Capture:
        outputs = [o.name for o in self.model.graph.output]
        if not hasattr(self, "_io_session"):
            self._stats = None  # one full session at a time: collect() rebuilds it if called again
            self._io_session = self._session(self._io_model)
        pairs = [(node.input[0], node.output[0]) for _, node in self.bn_nodes]
        names = list(dict.fromkeys([*outputs, *(n for pair in pairs for n in pair)]))
        values = dict(zip(names, self._run(self._io_session, names, arrays)))
        layers = {spec.name: [(np.asarray(values[x], np.float32), np.asarray(values[y], np.float32))] for spec, (x, y) in zip(self.layers, pairs)}
        return Capture(outputs=[np.asarray(values[n], np.float32) for n in outputs], layers=layers)


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with large initializers' data dropped (dims and types kept), for shape inference.

    Inference reads initializer values only for shape arithmetic (small int64 tensors); running it
    on the full model serialises and parses every weight twice more (a 550 MB peak for ResNet-50).
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    for part in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, part).extend(getattr(model.graph, part))
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.INT64 or tensor.ByteSize() <= 4096:
            graph.initializer.append(tensor)
        else:
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    return skeleton


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                nodes.extend(_all_nodes(sub))
    return nodes
