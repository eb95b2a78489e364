"""TensorFlow SavedModel directories (or their saved_model.pb) read as data, without TensorFlow.

What is read: every FusedBatchNorm/V2/V3 node of the MetaGraph's graph and of its function
library, with the op's attributes (defaults applied: the writer strips attributes equal to the op's
default, and FusedBatchNormV3's default is_training is TRUE), traced back to the variables it
reads: ReadVariableOp <- a function argument, which is either captured (the last arguments of a
saved concrete function are its `bound_inputs`, object-graph node ids) or passed by a caller's
(Stateful)PartitionedCall; at graph level ReadVariableOp <- VarHandleOp (shared_name) or a TF1
VariableV2. The values come lazily from `variables/variables.index` + data (tf_bundle), by the
checkpoint key the checkpoint's object graph gives the same node id, or by variable name (TF1).

Training mode: Keras 2 SavedModels keep training=True traces of every layer next to the serving
ones, so a node counts only if it is reachable from a signature's outputs (through call ops and
function-valued attributes). is_training=true there is a serving graph normalising with batch
statistics. Keras 2 layer settings (momentum, epsilon, axis, trainable) come from
keras_metadata.pb (SavedMetadata: nodes 1 {node_id 2, node_path 3, identifier 4, metadata 5 (JSON)}),
whose node ids are the object graph's; they also give layers their Keras names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bnlint.errors import InputError
from bnlint.fileio import open_regular
from bnlint.formats import Sniff
from bnlint.loaders.keras_config import effective_trainable
from bnlint.loaders.keras_file import OP_KINDS as KERAS_OP_KINDS
from bnlint.loaders.tf_bundle import Bundle, BundleTensor, read_bundle
from bnlint.loaders.tf_graphdef import BN_OPS, MAX_PB_BYTES, PASS_OPS, ROLES, Scope, find_unfused, linear_op_counts, op_attr, producer_of
from bnlint.loaders.tf_proto import ConstTensor, FuncRef, MetaGraph, Msg, Node, read_object, read_saved_model
from bnlint.model import BNLayer, GraphNode, ModelInfo, ModuleRecord, Producer, TensorRef
from bnlint.protowire import WireError

KERAS_ROLES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
# What tf.nn.moments ends in: unfused arithmetic over these normalises with the batch's statistics.
MOMENT_OPS = frozenset({"Mean", "Squeeze", "SquaredDifference"})
CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
# Ops with function-valued attributes (calls, control flow): the only ones whose attributes are read
# to find which functions a signature reaches.
FUNCTION_OPS = CALL_OPS | {"If", "StatelessIf", "While", "StatelessWhile", "Case", "StatelessCase", "For", "RemoteCall",
                           "SymbolicGradient", "_If", "_While", "BatchFunction", "MapDefun", "TPUPartitionedCall"}
MAX_TRACE = 64  # call levels followed back to a variable
# keras_metadata.pb exists from tf.keras 2.5 on: what keras_config.effective_trainable needs to know
KERAS2_VERSION = (2, 5)

Var = tuple[str, Any]  # ("object", node id) | ("name", variable name) | ("const", Node)


@dataclass
class Site:
    """One BatchNorm in the graph or a function: a fused node or the unfused arithmetic."""

    scope: str  # function name, "" for the graph
    name: str  # the node's name, or the unfused arithmetic's name scope
    op: str
    serving: bool  # reachable from a signature's outputs
    variables: tuple[Var | None, ...]  # weight, bias, running_mean, running_var
    eps: float
    is_training: bool
    factor: float | None = None  # exponential_avg_factor, when the node trains
    channels_last: bool = True
    computed: bool = False  # unfused arithmetic over batch moments (training-mode Keras 3)
    producer: Producer | None = None  # the op feeding a fused node in its own function (BN506)
    producer_bias: Var | None = None  # the variable its BiasAdd adds, when it has one


class _Tracer:
    """Follows a tensor back through pass-through ops and call boundaries to a variable."""

    def __init__(self, meta: MetaGraph) -> None:
        self.meta = meta
        self.functions = {f.name: f for f in meta.graph.functions}
        self.scopes: dict[str, dict[str, Node]] = {"": {n.name: n for n in meta.graph.nodes}}
        self.scopes.update({f.name: {n.name: n for n in f.nodes} for f in meta.graph.functions})
        self.callers: dict[str, list[tuple[str, Node]]] = {}
        self.calls: dict[str, set[str]] = {}
        for scope, nodes in self.scopes.items():
            for node in nodes.values():
                for callee in self.callees(node):
                    self.calls.setdefault(scope, set()).add(callee)
                    if node.op in CALL_OPS or node.op == callee:  # arguments passed in order
                        self.callers.setdefault(callee, []).append((scope, node))
        self.memo: dict[tuple[str, str], Var | None] = {}
        self._scopes: dict[str, Scope] = {}

    def scope(self, name: str) -> Scope:
        """The graph's or a function's nodes with their consumers, built once."""
        if name not in self._scopes:
            self._scopes[name] = Scope(list(self.scopes[name].values()))
        return self._scopes[name]

    def callees(self, node: Node) -> list[str]:
        if node.op in self.functions:
            return [node.op]
        if node.op not in FUNCTION_OPS:
            return []
        names = []
        for key, value in node.attrs.items():
            listed = value.msg(1) if value.has(1) else None
            if value.has(10) or (listed is not None and listed.has(9)):  # a func, or a list of funcs
                found = node.attr(key)
                for ref in found if isinstance(found, list) else [found]:
                    if isinstance(ref, FuncRef) and ref.name in self.functions:
                        names.append(ref.name)
        return names

    def reachable(self, roots: list[str]) -> tuple[set[str], set[str]]:
        """Functions called, directly or not, by the graph nodes `roots` and the nodes they read; those nodes."""
        seen: set[str] = set()
        graph = self.scopes[""]
        stack = [name for name in roots if name in graph]
        visited_nodes: set[str] = set()
        while stack:  # graph level: the output nodes and everything they read
            name = stack.pop()
            if name in visited_nodes or name not in graph:
                continue
            visited_nodes.add(name)
            node = graph[name]
            stack.extend(i.lstrip("^").split(":")[0] for i in node.inputs)
            pending = self.callees(node)
            while pending:
                function = pending.pop()
                if function not in seen:
                    seen.add(function)
                    pending.extend(self.calls.get(function, ()))
        return seen, visited_nodes

    def resolve(self, scope: str, tensor: str, depth: int = 0) -> Var | None:
        key = (scope, tensor)
        if key not in self.memo:
            self.memo[key] = None  # breaks cycles
            self.memo[key] = self._resolve(scope, tensor, depth) if depth < MAX_TRACE else None
        return self.memo[key]

    def _resolve(self, scope: str, tensor: str, depth: int) -> Var | None:
        name = tensor.lstrip("^").split(":")[0]
        function = self.functions.get(scope)
        if function is not None and ":" not in tensor and name in function.inputs:
            index = function.inputs.index(name)
            bound = self.meta.bound_inputs.get(scope, [])
            captured = index - (len(function.inputs) - len(bound))
            if bound and captured >= 0:
                return ("object", bound[captured])
            for caller_scope, call in self.callers.get(scope, ()):
                args = [i for i in call.inputs if not i.startswith("^")]
                if index < len(args):
                    found = self.resolve(caller_scope, args[index], depth + 1)
                    if found is not None:
                        return found
            return None
        node = self.scopes.get(scope, {}).get(name)
        if node is None:
            return None
        if node.op in PASS_OPS and node.inputs:
            return self.resolve(scope, node.inputs[0], depth + 1)
        if node.op == "VarHandleOp":
            return ("name", node.attr("shared_name") or node.name)
        if node.op in ("VariableV2", "Variable"):
            return ("name", node.name)
        if node.op == "Const":
            return ("const", node)
        return None


def bn_sites(meta: MetaGraph, signature_outputs: list[str], tracer: _Tracer | None = None) -> list[Site]:
    """Every BatchNorm of the graph and its functions, with the variables it reads."""
    tracer = tracer or _Tracer(meta)
    functions, graph_nodes = tracer.reachable([t.lstrip("^").split(":")[0] for t in signature_outputs])
    sites = []
    for scope, nodes in tracer.scopes.items():
        for node in nodes.values():
            if node.op not in BN_OPS:
                continue
            operands = list(node.inputs[1:5])
            variables = tuple(tracer.resolve(scope, operands[k]) if k < len(operands) else None for k in range(4))
            training = op_attr(node, "is_training") is True
            factor = float(op_attr(node, "exponential_avg_factor")) if training and "exponential_avg_factor" in node.attrs else None
            producer = producer_of(tracer.scope(scope), node)
            bias_add = tracer.scope(scope).source(node.inputs[0]) if producer is not None and producer.has_bias else None
            bias = tracer.resolve(scope, bias_add.inputs[1]) if bias_add is not None and len(bias_add.inputs) > 1 else None
            sites.append(Site(scope, node.name, node.op, scope in functions or node.name in graph_nodes, variables,
                              float(op_attr(node, "epsilon")), training, factor,
                              op_attr(node, "data_format") in ("NHWC", "NDHWC"), producer=producer, producer_bias=bias))
        for match in find_unfused(tracer.scope(scope)):
            variables = tuple(tracer.resolve(scope, match.operands[r]) if r in match.operands else None for r in ROLES)
            mean = tracer.scope(scope).source(match.operands["running_mean"])
            computed = variables[2] is None and mean is not None and mean.op in MOMENT_OPS
            sites.append(Site(scope, match.name, "batch_normalization (unfused)", scope in functions, variables, match.eps,
                              computed, computed=computed))
    return sites


def _signature_outputs(buf: bytes) -> list[str]:
    """Tensor names of every SignatureDef output (MetaGraphDef signature_def 5: outputs 2, TensorInfo name 1)."""
    names = []
    for meta in Msg(buf).msgs(2):
        for signature in meta.map(5).values():
            names += [info.text(1) for info in signature.map(2).values()]
    return names


def _keras_metadata(folder: Path, path: str) -> dict[int, dict[str, Any]]:
    """node id -> {"path", "identifier", "config": metadata JSON} from keras_metadata.pb (absent: {})."""
    file = folder / "keras_metadata.pb"
    if not file.is_file():
        return {}
    try:
        out = {}
        for node in Msg(file.read_bytes()).msgs(1):
            raw = node.text(5)
            try:
                config = json.loads(raw) if raw else {}
            except ValueError:
                config = {}
            out[node.num(2)] = {"path": node.text(3), "identifier": node.text(4),
                                "config": config if isinstance(config, dict) else {}}
        return out
    except (OSError, WireError, RecursionError) as exc:
        raise InputError(path, f"keras_metadata.pb is not readable ({exc})") from None


def _checkpoint_keys(bundle: Bundle) -> dict[int, str]:
    """Object-graph node id -> checkpoint key of its VARIABLE_VALUE (TrackableObjectGraph nodes 1)."""
    if "_CHECKPOINTABLE_OBJECT_GRAPH" not in bundle.entries:
        return {}
    try:
        graph = Msg(bundle.string("_CHECKPOINTABLE_OBJECT_GRAPH"))
        keys = {}
        for index, entry in enumerate(graph.fields.get(1, ())):
            if b"VARIABLE_VALUE" not in graph.buf[entry.start:entry.end]:  # most objects are not variables
                continue
            attribute = read_object(graph.sub(entry)).attributes.get("VARIABLE_VALUE")
            if attribute is not None:
                keys[index] = attribute[1]
        return keys
    except (WireError, RecursionError) as exc:
        raise InputError(bundle.prefix, f"the checkpoint's object graph is not readable ({exc})") from None


def _layer_paths(meta: MetaGraph, keras: dict[int, dict[str, Any]]) -> dict[int, tuple[str, str, int | None]]:
    """variable node id -> (layer name, variable's own name, owning layer node id)."""
    by_path = {entry["path"]: entry for entry in keras.values()}
    out: dict[int, tuple[str, str, int | None]] = {}
    for owner, obj in enumerate(meta.objects):
        for child in obj.children:
            if 0 <= child.node_id < len(meta.objects) and meta.objects[child.node_id].kind == "variable" \
                    and child.local_name in KERAS_ROLES and owner in keras:
                parts = keras[owner]["path"].split(".")
                names = [str(by_path.get(".".join(parts[:k + 1]), {}).get("config", {}).get("name", parts[k]))
                         for k in range(1, len(parts))]
                out[child.node_id] = ("/".join(names), child.local_name, owner)
    for index, obj in enumerate(meta.objects):
        if obj.kind == "variable" and index not in out:
            layer, _, own = obj.variable_name.rpartition("/")
            out[index] = (layer, own.split(":")[0], None)
    return out


def _open(path: Path) -> tuple[Path, bytes]:
    file = path / "saved_model.pb" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        other = "saved_model.pbtxt (text format, not read)" if (path / "saved_model.pbtxt").is_file() else "no saved_model.pb"
        raise InputError(str(path), f"not a SavedModel directory: {other}")
    try:
        if file.stat().st_size > MAX_PB_BYTES:
            raise InputError(str(file), f"larger than protobuf's {MAX_PB_BYTES}-byte limit")
        with open_regular(file) as handle:  # a FIFO named saved_model.pb is refused, never waited on
            return file.parent, handle.read(MAX_PB_BYTES + 1)
    except OSError as exc:
        raise InputError(str(file), f"cannot read: {exc.strerror or exc}") from None


def load_tf_savedmodel(path: Path, companion: Path | None = None) -> ModelInfo:
    """A SavedModel directory or its saved_model.pb as ModelInfo; InputError (one line) if unreadable."""
    folder, buf = _open(Path(path))
    where = str(path)
    try:
        metas = read_saved_model(buf)
        outputs = _signature_outputs(buf)
        if not metas:
            raise WireError("no MetaGraphDef")
        meta = next((m for m in metas if "serve" in m.tags), metas[0])
        tracer = _Tracer(meta)
        sites = bn_sites(meta, outputs, tracer)
    except (WireError, RecursionError) as exc:
        raise InputError(where, f"not a valid SavedModel ({exc})") from None
    keras = _keras_metadata(folder, where)
    info = ModelInfo(path=where, format="tf-savedmodel", framework="tensorflow", exported=True,
                     format_version=f"TensorFlow {meta.tf_version}" if meta.tf_version else None)
    info.metadata.update(tags=meta.tags, signatures=meta.signatures, meta_graphs=len(metas), keras_metadata=bool(keras))
    bundle: Bundle | None = None
    keys: dict[int, str] = {}
    if (folder / "variables" / "variables.index").is_file():
        bundle = read_bundle(folder / "variables" / "variables.index")
        keys = _checkpoint_keys(bundle)
    elif any(v is not None and v[0] != "const" for s in sites for v in s.variables):
        info.notes.append("no variables/variables.index: the BatchNorm statistics were not read")
    names = _layer_paths(meta, keras)
    _add_modules(info, keras)
    try:
        for group in sorted(_group(sites), key=_model_order):
            info.layers.append(_layer(group, len(info.layers), meta, names, keras, bundle, keys, where))
    except (WireError, RecursionError) as exc:
        raise InputError(where, f"not a valid SavedModel ({exc})") from None
    info.nodes_factory = lambda: _nodes(tracer, outputs, bundle, keys, where)
    if not sites:
        info.notes.append("no BatchNorm in the graph or its functions (neither FusedBatchNorm nodes nor the unfused pattern)")
        info.linear_ops = linear_op_counts(node.op for nodes in tracer.scopes.values() for node in nodes.values())
        info.folded_bn = sum(info.linear_ops) > 0
    return info


def _nodes(tracer: _Tracer, outputs: list[str], bundle: Bundle | None, keys: dict[int, str], where: str) -> list[GraphNode]:
    """The graph's nodes and those of the functions a signature reaches (all, without signatures):
    the other functions are training traces of the same layers."""
    from bnlint.loaders.tf_nodes import build_nodes

    meta = tracer.meta
    reached, _ = tracer.reachable([t.lstrip("^").split(":")[0] for t in outputs])
    names = [f.name for f in meta.graph.functions if f.name in reached or not outputs]
    scopes = [("", tracer.scope(""))] + [(name, tracer.scope(name)) for name in names]

    def weight_of(scope: str, tensor: str) -> tuple[Hashable, TensorRef] | None:
        var = tracer.resolve(scope.removesuffix("/"), tensor)
        ref = _tensor(var, meta, bundle, keys, where)
        if var is None or ref is None:
            return None
        return (var[0], id(var[1]) if var[0] == "const" else var[1]), ref

    try:
        return build_nodes([(f"{name}/" if name else "", scope) for name, scope in scopes], weight_of)
    except (WireError, RecursionError) as exc:
        raise InputError(where, f"not a valid SavedModel ({exc})") from None


def _add_modules(info: ModelInfo, keras: dict[int, dict[str, Any]]) -> None:
    by_path = {entry["path"]: entry for entry in keras.values()}
    for order, entry in enumerate(sorted(keras.values(), key=lambda e: e["path"])):
        parts = entry["path"].split(".")
        if len(parts) < 2:
            continue
        names = [str(by_path.get(".".join(parts[:k + 1]), {}).get("config", {}).get("name", parts[k])) for k in range(1, len(parts))]
        config = entry["config"]
        own = config.get("trainable") if isinstance(config.get("trainable"), bool) else None
        enclosing = [by_path.get(".".join(parts[:k + 1]), {}).get("config", {}).get("trainable") for k in range(0, len(parts) - 1)]
        is_bn = config.get("class_name") == "BatchNormalization"
        class_name = str(config.get("class_name", entry["identifier"]))
        info.modules["/".join(names)] = ModuleRecord(
            name="/".join(names), class_name=class_name, trainable=own,
            effective_trainable=effective_trainable(own, enclosing, is_bn, KERAS2_VERSION), parent="/".join(names[:-1]),
            has_weights=class_name in KERAS_OP_KINDS or is_bn, order=order)  # BN408 looks for the weighted layer before a BN


def _tensor(var: Var | None, meta: MetaGraph, bundle: Bundle | None, keys: dict[int, str], where: str) -> TensorRef | None:
    if var is None:
        return None
    kind, value = var
    if kind == "const":
        found = value.attr("value")
        return replace(found, path=where) if isinstance(found, ConstTensor) else None
    if bundle is None:
        return None
    key = keys.get(value) if kind == "object" else value
    if key is None and kind == "object" and 0 <= value < len(meta.objects):
        key = meta.objects[value].variable_name  # a TF1-style bundle keyed by variable name
    if key is None or key not in bundle.entries:
        return None
    return BundleTensor(bundle, bundle.entries[key])


def _group(sites: list[Site]) -> list[list[Site]]:
    """Sites that read any variable in common are one layer (a training trace over batch moments
    shares only gamma/beta with the inference trace); a site reading no variable stands alone."""
    groups: list[list[Site]] = []
    owner: dict[object, int] = {}
    for site in sites:
        ids = [v[1] for v in site.variables if v is not None and v[0] != "const"]
        found = sorted({owner[i] for i in ids if i in owner})
        if not found:
            groups.append([site])
            index = len(groups) - 1
        else:
            index = found[0]
            groups[index].append(site)
            for other in found[1:]:  # this site joins two groups: merge them
                groups[index] += groups[other]
                groups[other] = []
                owner.update({k: index for k, v in owner.items() if v == other})
        owner.update({i: index for i in ids})
    return [g for g in groups if g]


def _model_order(group: list[Site]) -> int:
    """Object-graph ids follow the order layers were created in; other layers keep file order (last)."""
    ids = [v[1] for site in group for v in site.variables if v is not None and v[0] == "object"]
    return min(ids) if ids else 1 << 62


def _layer(group: list[Site], order: int, meta: MetaGraph, names: dict[int, tuple[str, str, int | None]],
           keras: dict[int, dict[str, Any]], bundle: Bundle | None, keys: dict[int, str], where: str) -> BNLayer:
    serving = [s for s in group if s.serving]
    site = next((s for s in serving if not s.computed), None) or next((s for s in group if not s.computed), group[0])
    ident = next((v for v in (site.variables[2], site.variables[3], site.variables[0], site.variables[1])
                  if v is not None and v[0] != "const"), None)
    owner: int | None = None
    if ident is not None and ident[0] == "object" and ident[1] in names:
        name, _, owner = names[ident[1]]
    elif ident is not None and ident[0] == "name":
        name = ident[1].rpartition("/")[0] or ident[1]
    else:
        name = site.name.removesuffix("/" + site.op)
    bn = BNLayer(name=name or site.name, kind=site.op, framework="tensorflow", order=order)
    bn.aliases = tuple(sorted({s.name for s in group if "/" in s.name} - {bn.name}))[:4]
    for role, var in zip(ROLES, site.variables):
        ref = _tensor(var, meta, bundle, keys, where)
        if ref is not None:
            bn.tensors[role] = ref
        elif var is not None and var[0] != "const" and bundle is not None:
            bn.unchecked.append(f"{role}: variable {var[1]} not found in variables/variables.index")
    if any(s.computed for s in serving):
        bn.stats_source = "computed"
        bn.stats_ops = ("Mean", "SquaredDifference")
    anchor = bn.tensors.get("running_var") or bn.tensors.get("running_mean") or bn.tensors.get("weight")
    bn.channels = anchor.shape[0] if anchor is not None and len(anchor.shape) == 1 else None
    bn.eps = site.eps
    bn.known.add("eps")
    if serving:
        training_sites = [s for s in serving if s.is_training]
        bn.training = bool(training_sites)
        bn.known.add("training")
        bn.training_reasons = [(f"unfused BatchNorm arithmetic '{s.name}' normalises with the batch's moments"
                                if s.computed else f"{s.op} node '{s.name}' has is_training=true")
                               + (f" in function {s.scope}" if s.scope else "") + " in a serving signature's graph"
                               for s in training_sites[:3]]
    factors = [s.factor for s in group if s.factor is not None]
    if factors:
        bn.raw_momentum = bn.momentum = factors[0]
        bn.known.add("momentum")
    bn.axis = -1 if site.channels_last else 1
    fed = next((s for s in serving if s.producer is not None), None)
    if fed is not None and fed.producer is not None:
        bias = _tensor(fed.producer_bias, meta, bundle, keys, where) if fed.producer_bias is not None else None
        bn.producer = dataclasses.replace(fed.producer, bias=bias)
    bn.channel_axis = True
    entry = keras.get(owner) if owner is not None else None
    if entry is not None:
        _apply_keras(bn, entry, keras)
    return bn


def _apply_keras(bn: BNLayer, entry: dict[str, Any], keras: dict[int, dict[str, Any]]) -> None:
    """Settings a Keras 2 layer recorded in keras_metadata.pb (momentum in Keras's own convention)."""
    config = entry["config"]
    layer = config.get("config") if isinstance(config.get("config"), dict) else {}
    bn.kind = str(config.get("class_name") or bn.kind)
    momentum = layer.get("momentum")
    if isinstance(momentum, (int, float)) and not isinstance(momentum, bool):
        bn.raw_momentum = bn.momentum = 1.0 - float(momentum)  # exponential_avg_factor = 1 - Keras momentum
        bn.known.add("momentum")
    axis = layer.get("axis")
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    if isinstance(axis, int) and not isinstance(axis, bool):
        bn.axis = axis
    own = config.get("trainable") if isinstance(config.get("trainable"), bool) else None
    by_path = {e["path"]: e for e in keras.values()}
    parts = entry["path"].split(".")
    enclosing = [by_path.get(".".join(parts[:k + 1]), {}).get("config", {}).get("trainable") for k in range(len(parts) - 1)]
    bn.trainable, bn.effective_trainable = own, effective_trainable(own, enclosing, True, KERAS2_VERSION)
    options = {key: layer[key] for key in ("renorm", "synchronized") if layer.get(key)}
    if isinstance(layer.get("virtual_batch_size"), int):
        options["virtual_batch_size"] = layer["virtual_batch_size"]
    bn.training_options = options


def is_savedmodel_dir(path: str | os.PathLike[str]) -> bool:
    return Path(path, "saved_model.pb").is_file()


def sniff(file: Sniff) -> bool:
    """A `saved_model.pb` (or a SavedModel by its bytes), for bnlint.formats."""
    from bnlint.loaders.tf_proto import sniff_pb

    return sniff_pb(file.head, file.path) == "savedmodel"
