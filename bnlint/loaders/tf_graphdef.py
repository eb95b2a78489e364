"""Frozen TensorFlow GraphDef `.pb` files read as data, without TensorFlow.

A frozen graph (convert_variables_to_constants_v2, freeze_graph) holds every variable as a Const
node, so a FusedBatchNorm/V2/V3 node's scale, offset, mean and variance are Const tensors behind
Identity nodes. Attributes equal to the op's default are often stripped (is_training defaults to
TRUE). When BatchNorm was written unfused (tf.nn.batch_normalization, Keras's fused=False), only
its arithmetic is left: Rsqrt(variance + eps) [* gamma], then x * that + (beta - mean * that). That
pattern is recognised by structure and reported as an inferred layer with a note.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bnlint.errors import InputError
from bnlint.formats import Sniff
from bnlint.loaders.tf_proto import ConstTensor, Graph, Msg, Node, read_graph
from bnlint.model import BNLayer, GraphNode, ModelInfo, OpKind, Producer, TensorRef
from bnlint.norms import BATCHNORM_NAMES
from bnlint.protowire import WireError

BN_OPS = BATCHNORM_NAMES["tensorflow"]  # bnlint.norms: the one answer to "is this a BatchNorm"
# The ops' defaults (tensorflow/core/ops/nn_ops.cc): an attribute equal to its default is stripped.
OP_DEFAULTS: dict[str, Any] = {"epsilon": 1e-4, "exponential_avg_factor": 1.0, "data_format": "NHWC", "is_training": True}
ROLES = ("weight", "bias", "running_mean", "running_var")  # FusedBatchNorm inputs 1..4: scale, offset, mean, variance
# Ops that hand a value on unchanged, as far as which variable it is goes (a Cast: mixed precision).
PASS_OPS = frozenset({"Identity", "ReadVariableOp", "Snapshot", "StopGradient", "IdentityN", "Enter", "Cast"})
MAX_PB_BYTES = (1 << 31) - 1  # protobuf's own limit for one message
OP_KINDS: dict[str, OpKind] = {"Conv2D": "conv", "Conv3D": "conv", "DepthwiseConv2dNative": "conv", "Conv2DBackpropInput": "conv_transpose",
                               "Conv3DBackpropInputV2": "conv_transpose", "MatMul": "dense", "BatchMatMul": "matmul",
                               "BatchMatMulV2": "matmul", "BatchMatMulV3": "matmul"}
MAX_HOPS = 64


def linear_op_counts(ops: Iterable[str]) -> tuple[int, int]:
    """(convolutions, dense products) among these op names: what BN501 reports."""
    kinds = [OP_KINDS[op] for op in ops if op in OP_KINDS]
    return kinds.count("conv") + kinds.count("conv_transpose"), len(kinds) - kinds.count("conv") - kinds.count("conv_transpose")


def op_attr(node: Node, name: str) -> Any:
    """A BatchNorm attribute, its op default when absent; WireError when it has another type."""
    value = node.attr(name)
    if value is None:
        return OP_DEFAULTS[name]
    if type(value) is not type(OP_DEFAULTS[name]):
        raise WireError(f"attribute {name} of node '{node.name}' is a {type(value).__name__}, "
                        f"not a {type(OP_DEFAULTS[name]).__name__}")
    return value


class Scope:
    """The nodes of the graph or of one library function, by name, with their consumers."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.consumers: dict[str, list[Node]] = {}
        for node in nodes:
            for tensor in node.inputs:
                if not tensor.startswith("^"):
                    self.consumers.setdefault(_name(tensor), []).append(node)

    def source(self, tensor: str) -> Node | None:
        """The node behind pass-through ops (Identity chains)."""
        node = self.nodes.get(_name(tensor))
        hops = 0
        while node is not None and node.op in PASS_OPS and node.inputs and hops < MAX_HOPS:
            node = self.nodes.get(_name(node.inputs[0]))
            hops += 1
        return node

    def const(self, tensor: str, origin: str) -> ConstTensor | None:
        node = self.source(tensor)
        if node is None or node.op != "Const" or "value" not in node.attrs:
            return None
        value = node.attr("value")
        return replace(value, path=origin) if isinstance(value, ConstTensor) else None


def _name(tensor: str) -> str:
    """A node name from an input string: graph form 'node:1', function form 'node:output:0', '^node'."""
    return tensor.lstrip("^").split(":")[0]


def producer_of(scope: Scope, bn: Node) -> Producer | None:
    """The op feeding a BatchNorm node (through Identity chains; a conv under its BiasAdd), or None."""
    node = scope.source(bn.inputs[0]) if bn.inputs else None
    if node is None:
        return None
    has_bias = False
    if node.op in ("BiasAdd", "Add", "AddV2") and node.inputs:
        inner = scope.source(node.inputs[0])
        if inner is not None and inner.op in OP_KINDS:
            node, has_bias = inner, True
    exclusive = len(scope.consumers.get(node.name, ())) == 1
    return Producer(node.name, node.op, OP_KINDS.get(node.op, "other"), has_bias=has_bias, exclusive=exclusive)


def fused_layers(scope: Scope, where: str, prefix: str, order: int, notes: list[str]) -> list[BNLayer]:
    layers: list[BNLayer] = []
    for node in scope.nodes.values():
        if node.op not in BN_OPS:
            continue
        name = node.name.removesuffix("/" + node.op)
        bn = BNLayer(name=f"{prefix}{name}", kind=node.op, framework="tensorflow", order=order + len(layers))
        if name != node.name:
            bn.aliases = (f"{prefix}{node.name}",)
        for role, tensor in zip(ROLES, node.inputs[1:5]):
            ref = scope.const(tensor, where)
            if ref is not None:
                bn.tensors[role] = ref
            else:
                source = scope.source(tensor)
                bn.unchecked.append(f"{role}: read from {source.op if source is not None else 'a missing node'} "
                                    f"'{_name(tensor)}', not a constant in the file")
        if not bn.tensors and bn.unchecked:
            bn.stats_source = "input"
        anchor = bn.tensors.get("running_var") or bn.tensors.get("running_mean")
        bn.channels = anchor.shape[0] if anchor is not None and len(anchor.shape) == 1 else None
        bn.eps = float(op_attr(node, "epsilon"))
        training = op_attr(node, "is_training") is True
        bn.training = training
        bn.known.update({"eps", "training"})
        if training:
            bn.training_reasons = [f"{node.op} node '{node.name}' has is_training=true (the default when the attribute "
                                   "is absent): it normalises with batch statistics at inference"]
        if training and "exponential_avg_factor" in node.attrs:  # meaningless in inference
            bn.raw_momentum = bn.momentum = float(op_attr(node, "exponential_avg_factor"))
            bn.known.add("momentum")
        bn.axis = -1 if op_attr(node, "data_format") in ("NHWC", "NDHWC") else 1
        bn.channel_axis = True
        bn.producer = producer_of(scope, node)
        layers.append(bn)
    return layers


def _scalar(ref: ConstTensor | None) -> float | None:
    if ref is None or int(np.prod(ref.shape)) != 1:
        return None
    return float(np.asarray(ref.numpy(), dtype=np.float64).reshape(-1)[0])


def _other(node: Node, known: Node) -> str | None:
    rest = [t for t in node.inputs if not t.startswith("^") and _name(t) != known.name]
    return rest[0] if len(rest) == 1 else None


@dataclass(frozen=True)
class Unfused:
    """tf.nn.batch_normalization's arithmetic found in a graph: its name scope, eps, and the input
    tensors that play BatchNorm's roles (weight, bias, running_mean, running_var; weight may be absent)."""

    name: str
    eps: float
    operands: dict[str, str]
    inputs: tuple[str, ...] = ()  # the tensors normalised (x in x * s)


def find_unfused(scope: Scope) -> list[Unfused]:
    """Rsqrt(variance + eps) [* gamma] = s, then x * s and beta - mean * s: recognised by structure
    (the same ops whether the operands are constants, variables, or batch moments)."""
    found = []
    for rsqrt in [n for n in scope.nodes.values() if n.op == "Rsqrt" and n.inputs]:
        add = scope.source(rsqrt.inputs[0])
        if add is None or add.op not in ("Add", "AddV2") or len(add.inputs) < 2:
            continue
        scalars = [_scalar(scope.const(t, "")) for t in add.inputs[:2]]
        if (scalars[0] is None) == (scalars[1] is None):
            continue
        eps_at = 0 if scalars[0] is not None else 1
        operands = {"running_var": add.inputs[1 - eps_at]}
        factor = rsqrt
        for consumer in scope.consumers.get(rsqrt.name, ()):
            other = _other(consumer, rsqrt) if consumer.op == "Mul" else None
            if other is not None:
                factor, operands["weight"] = consumer, other
                break
        inputs = []
        for consumer in scope.consumers.get(factor.name, ()):
            other = _other(consumer, factor) if consumer.op == "Mul" else None
            subs = [sub for sub in scope.consumers.get(consumer.name, ()) if other is not None and sub.op == "Sub"
                    and len(sub.inputs) >= 2 and _name(sub.inputs[1]) == consumer.name]
            for sub in subs:
                operands["running_mean"], operands["bias"] = str(other), sub.inputs[0]
            if other is not None and not subs:
                inputs.append(other)
        if "running_mean" in operands:
            found.append(Unfused(rsqrt.name.rpartition("/")[0] or rsqrt.name, float(scalars[eps_at] or 0.0), operands,
                                 tuple(inputs)))
    return found


def unfused_layers(scope: Scope, where: str, order: int) -> list[BNLayer]:
    """The unfused pattern with constant operands (a frozen graph) as inferred layers."""
    layers: list[BNLayer] = []
    for match in find_unfused(scope):
        refs = {role: scope.const(tensor, where) for role, tensor in match.operands.items()}
        if refs.get("running_mean") is None or refs.get("running_var") is None:
            continue
        bn = BNLayer(name=match.name, kind="batch_normalization (unfused)", framework="tensorflow", certainty="inferred",
                     order=order + len(layers), eps=match.eps, training=False)
        bn.known.update({"eps", "training"})
        bn.tensors = {role: ref for role in ROLES if (ref := refs.get(role)) is not None}
        var = bn.tensors["running_var"]
        bn.channels = var.shape[0] if len(var.shape) == 1 else None
        layers.append(bn)
    return layers


def graph_model(graph: Graph, where: str, info: ModelInfo) -> None:
    """Fill `info` with the graph's BatchNorm layers (fused first, then unfused patterns) and its
    node list for graph rules (built on first use: bnlint.loaders.tf_nodes)."""
    scopes = [("", Scope(graph.nodes))] + [(f"{f.name}/", Scope(f.nodes)) for f in graph.functions]
    info.nodes_factory = lambda: _nodes(scopes, where)
    for prefix, scope in scopes:
        info.layers += fused_layers(scope, where, prefix, len(info.layers), info.notes)
    fused = bool(info.layers)
    for _, scope in scopes:
        info.layers += unfused_layers(scope, where, len(info.layers))
    if info.layers and not fused:
        info.notes.append("no FusedBatchNorm node: BatchNorm survives only as unfused arithmetic (Rsqrt, Mul, Sub, "
                          "Add), recognised by pattern; layer names are the ops' name scopes")
    if not info.layers:
        info.linear_ops = linear_op_counts(n.op for _, s in scopes for n in s.nodes.values())
        info.folded_bn = sum(info.linear_ops) > 0
        info.notes.append("no BatchNorm in the graph (neither FusedBatchNorm nodes nor the unfused pattern)")


def _nodes(scopes: list[tuple[str, Scope]], where: str) -> list[GraphNode]:
    from bnlint.loaders.tf_nodes import build_nodes

    by_prefix = dict(scopes)

    def weight_of(prefix: str, tensor: str) -> tuple[Hashable, TensorRef] | None:
        scope = by_prefix[prefix]
        ref = scope.const(tensor, where)
        source = scope.source(tensor)
        return None if ref is None or source is None else ((prefix, source.name), ref)

    try:
        return build_nodes(scopes, weight_of)
    except (WireError, RecursionError) as exc:
        raise InputError(where, f"not a valid TensorFlow GraphDef ({exc})") from None


def load_tf_graphdef(path: Path, companion: Path | None = None) -> ModelInfo:
    """A (frozen) GraphDef .pb as ModelInfo; InputError (one line) if unreadable."""
    where = str(path)
    try:
        if Path(path).stat().st_size > MAX_PB_BYTES:
            raise InputError(where, f"larger than protobuf's {MAX_PB_BYTES}-byte limit")
        buf = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(where, f"cannot read: {exc.strerror or exc}") from None
    info = ModelInfo(path=where, format="tf-graphdef", framework="tensorflow", exported=True)
    try:
        graph = read_graph(Msg(buf))
        if not graph.nodes and not graph.functions:
            raise WireError("no nodes")
        graph_model(graph, where, info)
        for layer in info.layers:  # decode every header now, so a malformed tensor is found at load time
            for ref in layer.tensors.values():
                _ = ref.shape, ref.dtype
    except (WireError, RecursionError) as exc:
        raise InputError(where, f"not a valid TensorFlow GraphDef ({exc})") from None
    if graph.producer is not None:
        info.format_version = f"GraphDef producer {graph.producer}"
    return info


def sniff(file: Sniff) -> bool:
    """A frozen GraphDef by its bytes, for bnlint.formats."""
    from bnlint.loaders.tf_proto import sniff_pb

    return sniff_pb(file.head, file.path) == "graphdef"
