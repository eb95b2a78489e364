"""ONNX loader: every BatchNormalization node (opsets 1 to 15) as a BNLayer, plus the node graph.

The file is memory-mapped and its structure read by `onnx_wire` (bnlint's own protobuf reader:
importing onnx alone would cost more than the whole lint); tensors stay byte ranges of the
mapping, or of their external data file, until a rule calls `.numpy()`. External data is
resolved here rather than by onnx, so that a location escaping the model's folder (absolute
path, `..`, a symlink out) is refused before anything is read.

A BN parameter is read as onnxruntime would compute it: Identity/Cast chains stay lazy views;
sparse initializers and constant expressions are densified/folded by `onnx_const`; whatever
cannot be resolved, or that the runtime would refuse (non-float, mis-shaped), is recorded in
`BNLayer.unchecked` (rule BN110) instead of being skipped silently. Every graph walk is linear:
dicts built once per scope, memoised iterative walks, bounded per-layer look-backs.

The graph helpers (`_torch_scope`, `_constant_value`, `_subgraphs`, `_used_names`,
`_topological_order`) read only attribute names that onnx's protobuf classes share with
onnx_wire's, so bnlint.fix calls them on real `onnx` protos too.
"""

from __future__ import annotations

import ast
from collections import ChainMap, Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bnlint.conventions import CONVENTIONS
from bnlint.errors import InputError
from bnlint.loaders.onnx_const import MAX_TOTAL, Folder, SparseTensor, Unresolved
from bnlint.loaders.onnx_tensors import CastTensor, _dtype_name, _tensor_ref
from bnlint.loaders.onnx_wire import EXTERNAL, GRAPH, GRAPHS, SPARSE_TENSOR, TENSOR, WireGraph, WireModel, WireNode, read_model
from bnlint.model import ArrayTensor, BNLayer, GraphInput, GraphNode, ModelInfo, OpKind, Producer, StatsSource, TensorRef
from bnlint.norms import is_batchnorm_op, is_stochastic

ONNX = CONVENTIONS["onnx"]  # the spec's defaults for absent attributes
ONNX_DEFAULT_MOMENTUM = float(ONNX.default_momentum or 0.9)
BN_OP_VERSIONS = (1, 6, 7, 9, 14, 15)  # opsets in which BatchNormalization changed
# What each ONNX op is to the neutral graph rules (bnlint.model.OpKind); everything else is "other".
OP_KINDS: dict[str, OpKind] = {
    "Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "dense", "MatMul": "matmul",
    "BatchNormalization": "batchnorm", "InstanceNormalization": "other_norm", "LayerNormalization": "other_norm",
    "GroupNormalization": "other_norm", "LpNormalization": "other_norm", "MeanVarianceNormalization": "other_norm",
    "RMSNormalization": "other_norm", "SimplifiedLayerNormalization": "other_norm",
}
# A BN's mean/var source, most telling first: one batch-dependent input makes the pair batch-dependent.
_STATS_PRIORITY = ("computed", "input", "unknown", "missing", "constant", "initializer")
_MAX_CHAIN = 64  # Identity/Cast hops followed lazily; longer chains are folded (a malformed graph may loop)
_MAX_OWN_USES_WALK = 64  # nodes visited to find a BN's own batch-statistics nodes (exporters emit about ten)
_FLOAT_TYPES = ("float16", "float32", "float64", "bfloat16")  # what BatchNormalization takes (T, T1, T2)
_NUMERIC_PREFIXES = ("float", "bfloat", "int", "uint", "bool")


def _constant_value(node: WireNode, path: Path) -> TensorRef | None:
    """The tensor a Constant node produces (value, sparse_value, value_float(s), value_int(s)); None for strings."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == TENSOR:
            return _tensor_ref(attr.t, path)
        if attr.name == "sparse_value" and attr.type == SPARSE_TENSOR and attr.sparse_tensor is not None:
            return SparseTensor(attr.sparse_tensor, path)
        if attr.name == "value_float":
            return ArrayTensor(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return ArrayTensor(np.array(list(attr.floats), dtype=np.float32))
        if attr.name == "value_int":
            return ArrayTensor(np.array(attr.i, dtype=np.int64))
        if attr.name == "value_ints":
            return ArrayTensor(np.array(list(attr.ints), dtype=np.int64))
    return None


def _attributes(node: WireNode) -> dict[str, Any]:
    """A node's attributes by name, as Python values (None for one whose type is missing or unknown)."""
    return {attr.name: attr.value() for attr in node.attribute}


def _scalar(attrs: dict[str, Any], key: str, default: float, kind: type, node: str, path: Path) -> Any:
    """An INT or FLOAT attribute's value (`default` when absent); InputError when it holds something else."""
    value = attrs.get(key, default)
    number_types: tuple[type, ...] = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_types):
        shown = type(value).__name__ if value is not None else "of no known type"
        raise InputError(str(path), f"{node}: attribute {key!r} is {shown}, not {'an int' if kind is int else 'a float'}")
    return kind(value)


def _f32(value: Any) -> float:
    """A float32 attribute as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _torch_scope(node: WireNode) -> tuple[str | None, str | None]:
    """(module path, module class) from the dynamo exporter's node metadata, e.g. ("layer1.0.bn1", "...BatchNorm2d")."""
    props = {p.key: p.value for p in node.metadata_props if p.key.startswith("pkg.torch.onnx.")}
    found: list[str | None] = []
    for key in ("pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy"):
        try:  # a list literal of strings; literal_eval never runs code
            scopes = ast.literal_eval(props[key]) if len(props.get(key, "")) < 10_000 else None
        except (KeyError, ValueError, SyntaxError):
            scopes = None
        ok = isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str) and bool(scopes[-2])
        found.append(scopes[-2] if ok and scopes is not None else None)  # the last entry is the aten op itself
    return found[0], found[1]


def _module_path(node: WireNode) -> str | None:
    """The PyTorch module a node came from: the dynamo exporter's name_scopes metadata, else the
    legacy exporter's scoped node name, `/layer1/layer1.0/bn1/BatchNormalization` -> `layer1.0.bn1`.

    Each scope component is either a child of the previous one (`bn1` under `layer1.0`) or a
    refinement of it (`layer1.0` extends `layer1`): refinements replace, children append.
    """
    scoped, _ = _torch_scope(node)
    if scoped:
        return scoped
    parts = node.name.split("/")
    if len(parts) < 3 or parts[0] != "" or not parts[-1].startswith("BatchNormalization"):
        return None
    path: list[str] = []
    for part in parts[1:-1]:
        if not part:
            return None
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path) or None


def _subgraphs(node: WireNode) -> Iterator[tuple[str, WireGraph]]:
    for attr in node.attribute:
        if attr.type == GRAPH:
            yield attr.name, attr.g
        elif attr.type == GRAPHS:
            for i, graph in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", graph


def _used_names(graph: WireGraph) -> Iterator[str]:
    """Every tensor name read by a graph's nodes, including nested subgraphs (outer-scope reads)."""
    for node in graph.node:
        yield from node.input
        for _, sub in _subgraphs(node):
            yield from _used_names(sub)


@dataclass
class _Scope:
    """Names visible in one (sub)graph; ChainMaps so that a body sees its outer graphs' names."""

    tensors: ChainMap[str, tuple[str, TensorRef | None]]  # name -> ("initializer"|"sparse"|"constant", ref)
    producers: ChainMap[str, WireNode]
    inputs: ChainMap[str, bool]  # runtime-fed names: graph inputs that are not initializers
    folder: Folder
    consumers: Counter[str] = field(default_factory=Counter)
    outputs: set[str] = field(default_factory=set)
    data_dependent: dict[str, bool] = field(default_factory=dict)  # memo for depends_on_input, every name visited


class _Reader:
    def __init__(self, path: Path, opset: int | None) -> None:
        self.path = path
        self.opset = opset
        self.found: list[tuple[tuple[int, int], BNLayer]] = []  # (sort key, layer)
        self.names: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.other_norms: list[str] = []
        self.top_tensors: dict[str, TensorRef] = {}
        self.details: dict[str, dict[str, Any]] = {}  # per layer, informational (ModelInfo.metadata)
        self.fold_budget = [MAX_TOTAL]  # elements all constant folding of the file may allocate
        self.notes: list[str] = []

    def scope(self, graph: WireGraph, parent: _Scope | None) -> _Scope:
        # onnxruntime registers dense initializers, then sparse ones, then Constant nodes, and a name
        # defined twice keeps "the latest encountered" (its warning): the same order here.
        tensors: dict[str, tuple[str, TensorRef | None]] = {}
        defined: Counter[str] = Counter()
        for init in graph.initializer:
            tensors[init.name] = ("initializer", _tensor_ref(init, self.path))
            defined[init.name] += 1
        for sparse in graph.sparse_initializer:
            name = sparse.values.name if sparse.values is not None else ""
            tensors[name] = ("sparse", SparseTensor(sparse, self.path))
            defined[name] += 1
        producers: dict[str, WireNode] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    producers[out] = node
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                tensors[node.output[0]] = ("constant", _constant_value(node, self.path))
                defined[node.output[0]] += 1
        twice = sorted(name for name, count in defined.items() if count > 1)
        if twice:
            shown = ", ".join(repr(name) for name in twice[:5]) + (f" and {len(twice) - 5} more" if len(twice) > 5 else "")
            self.notes.append(f"tensor(s) {shown} defined more than once (initializer, sparse initializer or Constant): "
                              "read as onnxruntime does, the last definition wins")
        inputs = {value.name: True for value in graph.input if value.name not in tensors}
        if parent is None:
            chained = (ChainMap(tensors), ChainMap(producers), ChainMap(inputs))
        else:
            chained = (parent.tensors.new_child(tensors), parent.producers.new_child(producers), parent.inputs.new_child(inputs))
        scope = _Scope(*chained, folder=Folder(chained[0], chained[1], self.fold_budget, self.path))
        scope.consumers.update(name for node in graph.node for name in node.input if name)
        scope.outputs = {value.name for value in graph.output}
        return scope

    def walk(self, graph: WireGraph, parent: _Scope | None, prefix: str, rank: dict[int, int] | None, outer: int) -> None:
        scope = self.scope(graph, parent)
        if parent is None:
            self.top_tensors = {name: ref for name, (kind, ref) in scope.tensors.maps[0].items() if ref is not None and kind != "sparse"}
        for index, node in enumerate(graph.node):
            self.ops[node.op_type] += 1
            key = (rank[index] if rank is not None else outer, index if rank is None else 0)
            if OP_KINDS.get(node.op_type) == "other_norm":
                self.other_norms.append(prefix + (node.name or f"{node.op_type}_{index}"))
            if is_batchnorm_op(node.op_type, node.domain):
                self.found.append((key, self.layer(node, index, scope, prefix, top=rank is not None)))
            for attr_name, sub in _subgraphs(node):
                self.walk(sub, scope, f"{prefix}{node.name or f'{node.op_type}_{index}'}/{attr_name}/", None, key[0])

    def resolve(self, name: str, scope: _Scope) -> tuple[str, TensorRef | None, str | None, str | None]:
        """(source, tensor, producing op, why unchecked) of a BN parameter.

        Identity and one Cast are looked through lazily (the tensor stays a view of the file);
        anything else that does not depend on a graph input is folded as the runtime would
        compute it (sparse initializers, Reshape/Concat/Mul/... of stored tensors), and what
        cannot be folded comes back with a one-line reason.
        """
        start, cast, op, kind = name, None, None, "constant"
        for _ in range(_MAX_CHAIN):
            if not name:
                return "missing", None, None, None
            if name in scope.tensors:
                kind, ref = scope.tensors[name]
                if kind == "sparse":
                    kind = "initializer" if name == start else "constant"
                    break
                if ref is None:
                    return kind, None, None, f"{name!r} comes from a Constant node whose value bnlint cannot read"
                return kind, (CastTensor(ref, cast) if cast is not None else ref), None, None
            node = scope.producers.get(name)
            if node is None:
                return ("input" if name in scope.inputs else "unknown"), None, None, None
            if node.op_type in ("Identity", "Cast") and node.input:
                if node.op_type == "Cast":
                    if cast is not None:
                        break  # a second Cast: fold, so that values round as each Cast rounds them
                    cast = next((a.i for a in node.attribute if a.name == "to"), None)
                name = node.input[0]
                continue
            op = node.op_type
            break
        # Produced by other nodes: batch statistics if the graph's input feeds them, else a
        # constant expression of stored tensors (e.g. Reshape of an initializer), folded.
        if self.depends_on_input(start, scope):
            return "computed", None, op, None
        try:
            value = scope.folder.value(start)
        except Unresolved as exc:
            return kind, None, op, str(exc)
        return kind, ArrayTensor(value), op, None

    def depends_on_input(self, name: str, scope: _Scope) -> bool:
        """Whether a tensor's value depends on a runtime graph input (iterative post-order DFS).

        Every name visited is memoised, so all the BN layers of a graph cost one walk in total.
        """
        memo = scope.data_dependent
        stack, active = [name], set()
        while stack:
            current = stack[-1]
            if current in memo:
                stack.pop()
                continue
            node = None
            if not current or current in scope.tensors:
                memo[current] = False
            elif current in scope.inputs or (node := scope.producers.get(current)) is None:
                memo[current] = True  # an input, or an undefined name: fed from outside (e.g. a loop-carried value)
            else:
                pending = [source for source in node.input if source not in memo and source not in active]
                if pending and current not in active:
                    active.add(current)
                    stack.extend(pending)
                    continue
                memo[current] = any(memo.get(source, False) for source in node.input)  # a cycle reads as constant
            active.discard(current)
            stack.pop()
        return memo[name]

    def feeding_nodes(self, names: list[str], scope: _Scope, stop: str) -> list[WireNode]:
        """Nodes that compute `names` (e.g. a BN's batch mean/var), not looking past tensor `stop`.

        At most _MAX_OWN_USES_WALK nodes: an exporter's batch-statistics subgraph is a handful of
        nodes, and an unbounded walk per BN would be quadratic in a long chain.
        """
        stack, seen = list(names), set()
        nodes: dict[int, WireNode] = {}
        while stack and len(nodes) < _MAX_OWN_USES_WALK:
            name = stack.pop()
            if not name or name == stop or name in seen or name in scope.tensors:
                continue
            seen.add(name)
            node = scope.producers.get(name)
            if node is not None and id(node) not in nodes:
                nodes[id(node)] = node
                stack.extend(node.input)
        return list(nodes.values())

    def layer(self, node: WireNode, index: int, scope: _Scope, prefix: str, top: bool) -> BNLayer:
        attrs = _attributes(node)
        label = f"BatchNormalization node {prefix + (node.name or str(index))!r}"

        def scalar(key: str, default: float, kind: type) -> Any:
            return _scalar(attrs, key, default, kind, label, self.path)

        version = max(v for v in BN_OP_VERSIONS if v <= (self.opset or BN_OP_VERSIONS[-1]))
        inputs = list(node.input) + [""] * max(0, 5 - len(node.input))
        outputs = [out for out in node.output if out]
        training_mode = scalar("training_mode", 0, int) if version >= 14 else None
        is_test = scalar("is_test", 0, int) if version <= 6 else None  # spec default 0 = training
        reasons = []
        if training_mode == 1:
            reasons.append("training_mode=1")
        if is_test == 0:
            reasons.append("is_test=0" if "is_test" in attrs else "is_test absent (its default 0 means training)")
        if version <= 13 and len(outputs) > 1:
            reasons.append(f"{len(outputs)} outputs (running/saved statistics are training outputs)")
        tensors: dict[str, TensorRef] = {}
        sources: dict[str, str] = {}
        source_ops: dict[str, str] = {}
        unchecked: list[str] = []
        for key, name in zip(("weight", "bias", "running_mean", "running_var"), inputs[1:5]):
            source, ref, op, why = self.resolve(name, scope)
            sources[key] = source
            if ref is not None:
                tensors[key] = ref
            if op is not None:
                source_ops[key] = op
            if why is not None:
                unchecked.append(f"{key} ({name!r}): {why}")
        spatial = scalar("spatial", 1, int) if version <= 7 else None
        unchecked += _check_parameters(tensors, per_channel=spatial != 0)
        stats = [sources["running_mean"], sources["running_var"]]
        stats_source = next(s for s in _STATS_PRIORITY if s in stats)
        node_name = prefix + (node.name or f"BatchNormalization_{index}")
        module = _module_path(node) if not prefix else None
        # A PyTorch export names the layer by its module path (as the state dict and TorchScript
        # do), the node name kept as an alias; other graphs keep node names.
        name = module if module and not self.names[module] else node_name
        self.names[name] += 1
        if self.names[name] > 1:  # duplicate names (a module called twice, repeated node names): keep them unique
            name = f"{name}#{self.names[name]}"
        aliases = (node_name,) if name != node_name else ()
        shape = next((ref.shape for key in ("weight", "running_mean", "bias", "running_var") if (ref := tensors.get(key))), None)
        # Uses of X by the nodes computing this BN's own batch mean/var do not stop folding or
        # make a bias useful: count only the other consumers.
        own_uses = 0
        if stats_source == "computed" and scope.consumers[inputs[0]] > 1:
            own_uses = sum(list(n.input).count(inputs[0]) for n in self.feeding_nodes(inputs[3:5], scope, inputs[0]))
        raw_momentum = _f32(scalar("momentum", ONNX_DEFAULT_MOMENTUM, float))
        torch_module, torch_class = _torch_scope(node)
        layer = BNLayer(
            name=name,
            kind="BatchNormalization",
            framework="onnx",
            channels=int(shape[0]) if shape else None,
            tensors=tensors,
            eps=_f32(scalar("epsilon", ONNX.default_eps, float)),
            momentum=float(Decimal(1) - Decimal(str(raw_momentum))),  # ONNX (Keras) convention -> PyTorch's
            raw_momentum=raw_momentum,
            training=bool(reasons),
            training_reasons=reasons,
            stats_source=_neutral_source(stats_source),
            stats_ops=tuple(sorted(set(source_ops[k] for k in ("running_mean", "running_var") if k in source_ops))),
            producer=self.producer(inputs[0], scope, own_uses),
            node_index=index if top else None,
            aliases=aliases,
            known={"eps", "momentum", "training"},
            unchecked=unchecked,
        )
        self.details[name] = {
            "torch_module": torch_module, "torch_class": torch_class, "op_version": version, "node_inputs": list(node.input),
            "node_outputs": list(node.output), "training_mode": training_mode, "is_test": is_test,
            "spatial": spatial, "param_sources": sources,
            "stats_storage": stats_source, "subgraph": prefix.rstrip("/") or None,
        }
        return layer

    def producer(self, name: str, scope: _Scope, own_uses: int) -> Producer | None:
        """The node computing a BN's input X, as the neutral Producer the graph rules read."""
        node = scope.producers.get(name)
        if node is None:
            return None
        kind = OP_KINDS.get(node.op_type, "other")
        bias: TensorRef | None = None
        has_bias = None
        if kind in ("conv", "conv_transpose", "dense"):
            bias_name = node.input[2] if len(node.input) > 2 else ""
            has_bias = bool(bias_name)
            found = scope.tensors.get(bias_name) if bias_name else None
            bias = found[1] if found is not None else None
        exclusive = scope.consumers[name] - own_uses == 1 and name not in scope.outputs
        return Producer(name=node.name or node.op_type, op=node.op_type, kind=kind, has_bias=has_bias, bias=bias,
                        exclusive=exclusive)


def _check_parameters(tensors: dict[str, TensorRef], per_channel: bool) -> list[str]:
    """Why parameters the runtime would refuse cannot be read as statistics (not a float type, or
    not the (C,) shape they share); a non-numeric one is dropped, as no rule can read it."""
    why = []
    first = next((key for key in ("weight", "running_mean", "bias", "running_var") if key in tensors), None)
    expected = tensors[first].shape if first is not None else None
    for key in ("weight", "bias", "running_mean", "running_var"):
        ref = tensors.get(key)
        if ref is None:
            continue
        if not ref.dtype.startswith(_NUMERIC_PREFIXES):
            del tensors[key]
            why.append(f"{key} is of type {ref.dtype}, not numbers (onnxruntime refuses the model)")
            continue
        if not ref.dtype.startswith(_FLOAT_TYPES):
            why.append(f"{key} is of type {ref.dtype}, not a float type (onnxruntime refuses the model)")
        if per_channel and (len(ref.shape) != 1 or ref.shape != expected):
            why.append(f"{key} has shape {list(ref.shape)}, not the [C] shared by every parameter "
                       f"({first}: {list(expected or ())}; onnxruntime refuses the model)")
    return why


def _neutral_source(source: str) -> StatsSource:
    """initializer/constant are both stored statistics; the rest keep their names."""
    neutral: dict[str, StatsSource] = {"initializer": "stored", "constant": "stored", "computed": "computed",
                                        "input": "input", "missing": "missing"}
    return neutral.get(source, "unknown")


def _parse(path: Path) -> tuple[WireModel, WireGraph]:
    model = read_model(path)  # InputError for an unreadable file or malformed protobuf
    if model.ir_version <= 0 or model.graph is None:
        raise InputError(str(path), "not a valid ONNX file (no ir_version or no graph)")
    return model, model.graph


def _topological_order(graph: WireGraph) -> list[int] | None:
    """Node indices in topological order (file order where free; Kahn's algorithm), None on a cycle.

    The ONNX spec requires sorted nodes, but files in the wild break it. Pure Python on purpose:
    importing networkx for this would cost more than the whole lint of a typical file.
    """
    import heapq

    produced = {out: index for index, node in enumerate(graph.node) for out in node.output if out}
    children: list[list[int]] = [[] for _ in graph.node]
    waiting = [0] * len(graph.node)
    for index, node in enumerate(graph.node):
        names = set(node.input)
        for _, sub in _subgraphs(node):
            names.update(_used_names(sub))
        for source in {produced[n] for n in names if n in produced and produced[n] != index}:
            children[source].append(index)
            waiting[index] += 1
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for child in children[index]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, child)
    return order if len(order) == len(graph.node) else None


def graph_nodes(graph: WireGraph, tensors: dict[str, TensorRef]) -> list[GraphNode]:
    """The top-level nodes as neutral GraphNodes, in file order, with their stored weight and bias."""
    bn_inputs = {node.input[0] for node in graph.node if is_batchnorm_op(node.op_type, node.domain) and node.input}
    nodes = []
    for index, node in enumerate(graph.node):
        kind = OP_KINDS.get(node.op_type, "other")
        weight = bias = None
        rows_out = True
        if kind in ("conv", "conv_transpose", "dense", "matmul"):
            weight = tensors.get(node.input[1]) if len(node.input) > 1 else None
            bias = tensors.get(node.input[2]) if len(node.input) > 2 and kind != "matmul" else None
            if kind == "dense":  # Gemm: B is (K, N) unless transB=1
                rows_out = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            elif kind == "matmul":  # MatMul's B is (K, N): columns are output units
                rows_out = False
        nodes.append(GraphNode(
            index=index, name=node.name or f"{node.op_type}_{index}", op=node.op_type, kind=kind,
            inputs=tuple(node.input), outputs=tuple(node.output), weight=weight, bias=bias, weight_rows_out=rows_out,
            followed_by_bn=bool(bn_inputs.intersection(node.output)),
        ))
    return nodes


def load_onnx(path: Path, companion: Path | None = None) -> ModelInfo:
    """Read an ONNX file safely. Raises InputError (one line) for anything unreadable."""
    path = Path(path)
    model, graph = _parse(path)
    opsets = {(entry.domain or "ai.onnx"): int(entry.version) for entry in model.opset_import}
    opset = opsets.get("ai.onnx")
    if opset is not None and opset < 1:
        raise InputError(str(path), f"opset_import declares version {opset} of the default domain (versions start at 1)")
    notes = []
    order = _topological_order(graph)
    if order is None:
        order = list(range(len(graph.node)))
        notes.append("the ONNX graph has a cycle; layers are listed in file order")
    reader = _Reader(path, opset)
    ranks = {node: rank for rank, node in enumerate(order)}
    reader.walk(graph, None, "", ranks, 0)
    notes += reader.notes
    layers = [layer for _, layer in sorted(reader.found, key=lambda item: item[0])]
    # Eval-mode exports usually drop Dropout nodes, so their absence says nothing (None).
    dropout = [ranks[i] for i, node in enumerate(graph.node) if is_stochastic(node.op_type)]
    first_dropout = min(dropout) if dropout else None  # once, not per layer
    for rank, layer in enumerate(layers):
        layer.order = rank
        if first_dropout is not None and layer.node_index is not None:
            layer.after_stochastic = first_dropout < ranks[layer.node_index]
    function_bns = sum(is_batchnorm_op(node.op_type, node.domain) for function in model.functions for node in function.node)
    if function_bns:
        notes.append(f"{function_bns} BatchNormalization node(s) inside ONNX local functions were not linted")
    initializers = {init.name for init in graph.initializer}
    inputs = []
    for value in graph.input:
        if value.name in initializers:
            continue  # old exporters list initializers as inputs too (keep_initializers_as_inputs)
        dims, elem = value.shape, value.elem_type
        inputs.append(GraphInput(value.name, tuple(dims) if dims is not None else None, _dtype_name(elem) if elem else None))
    linear = reader.ops["Conv"] + reader.ops["ConvTranspose"] + reader.ops["Gemm"]
    producer = f"{model.producer_name} {model.producer_version}".strip()
    metadata: dict[str, Any] = {
        "producer": producer or None,
        "opset": opset,
        "opsets": opsets,
        "ir_version": int(model.ir_version),
        "external_data": any(init.data_location == EXTERNAL for init in graph.initializer),
        "layers": reader.details,
    }
    tensors = reader.top_tensors
    return ModelInfo(
        path=str(path), format="onnx", framework="onnx", layers=layers, inputs=inputs, metadata=metadata, notes=notes, exported=True,
        nodes_factory=lambda: graph_nodes(graph, tensors),
        folded_bn=not layers and linear > 0 and not reader.other_norms,
        linear_ops=(reader.ops["Conv"] + reader.ops["ConvTranspose"], reader.ops["Gemm"]),
        other_norms=reader.other_norms,
        format_version=f"opset {opset}" if opset is not None else None,
    )
