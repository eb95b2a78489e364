"""TensorFlow graphs (a frozen GraphDef, a SavedModel's graph and functions) as `GraphNode`s for the
graph rules (BN501-BN503), built lazily through `ModelInfo.nodes_factory`.

Mapping (rules decide on `kind`; `op` is an ONNX-like name, for messages only):

    TF op                                   op                   kind             weight (input) / layout
    Conv2D, Conv3D                          Conv                 conv             1: HWIO -> OIHW (O, I, kh, kw)
    DepthwiseConv2dNative                   Conv                 conv             1: (kh, kw, C, M) -> (C*M, 1, kh, kw)
    Conv2DBackpropInput, Conv3DBackpropInputV2  ConvTranspose    conv_transpose   1: (kh, kw, O, I) -> (I, O, kh, kw)
    MatMul with a stored operand 1          Gemm                 dense            1: rows are output units iff transpose_b
    MatMul without one                      MatMul               matmul           -
    BatchMatMul, V2, V3                     MatMul               matmul           1: rows are output units iff adj_y
    FusedBatchNorm, V2, V3                  BatchNormalization   batchnorm        -
    anything else                           its TF name (Relu, AddV2, ...)        other

A BiasAdd (or Add/AddV2) that is the only consumer of a conv/dense node and adds a stored 1-D
tensor is folded into that node as its bias, as ONNX's Conv/Gemm carry theirs; its output becomes
the node's (the bias is looked up through Reshape/Squeeze/ExpandDims, as Keras 3 reads it).
`followed_by_bn` is set on conv/dense/matmul nodes only (what BN502/BN503 ask). "Stored" is a
Const (frozen graphs) or a variable read from the SavedModel's bundle: `weight_of` resolves an
operand, and values are read only when a rule calls `.numpy()`.

Tensor names: one per node, `scope/node` (all output ports of a node are one name: rules only follow
reachability). `followed_by_bn` looks through pass-through ops (Identity, Cast, ...), at most
MAX_FOLLOW nodes per conv/dense; the input of an unfused BatchNorm (tf.nn.batch_normalization,
Keras 3: x * rsqrt(var + eps) * gamma, recognised as tf_graphdef.find_unfused does) counts too.
Nodes come in file order, scope by scope (the graph, then each function), not re-sorted. A variable
read by several nodes (a SavedModel keeps a function per trace) gives its weight to the first only,
so a rule reports each stored tensor once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from bnlint.loaders.tf_graphdef import BN_OPS, OP_KINDS, PASS_OPS, Scope, find_unfused
from bnlint.loaders.tf_proto import Node
from bnlint.model import GraphNode, OpKind, TensorRef

# (scope, operand tensor name) -> (identity of the stored tensor, the tensor), or None when computed.
WeightOf = Callable[[str, str], "tuple[Hashable, TensorRef] | None"]

OP_NAMES = {"Conv2D": "Conv", "Conv3D": "Conv", "DepthwiseConv2dNative": "Conv", "Conv2DBackpropInput": "ConvTranspose",
            "Conv3DBackpropInputV2": "ConvTranspose", "BatchMatMul": "MatMul", "BatchMatMulV2": "MatMul",
            "BatchMatMulV3": "MatMul", "AddV2": "Add", "Relu6": "Clip"}
MATMUL_OPS = frozenset({"BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"})
BIAS_OPS = frozenset({"BiasAdd", "Add", "AddV2"})
SHAPE_OPS = frozenset({"Reshape", "Squeeze", "ExpandDims"})  # same values, another shape
MAX_RESHAPES = 4
MAX_FOLLOW = 256  # nodes visited looking through pass-through ops for a BatchNorm consumer


@dataclass(frozen=True)
class KernelTensor:
    """A TF kernel seen in ONNX's layout (output channels first), transposed when read."""

    base: TensorRef
    layout: str  # "conv" (HWIO, or HWOI for a transposed conv) or "depthwise" (kh, kw, C, M)

    def _fits(self) -> bool:
        return len(self.base.shape) >= (4 if self.layout == "depthwise" else 3)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.base.shape
        if not self._fits():
            return shape
        if self.layout == "depthwise":
            return (shape[-2] * shape[-1], 1, *shape[:-2])
        return (shape[-1], shape[-2], *shape[:-2])

    @property
    def dtype(self) -> str:
        return self.base.dtype

    def numpy(self) -> np.ndarray:
        array = self.base.numpy()
        if not self._fits() or array.ndim != len(self.base.shape):
            return array
        spatial = tuple(range(array.ndim - 2))
        if self.layout == "depthwise":
            merged = array.reshape(*array.shape[:-2], -1)
            return np.transpose(merged, (merged.ndim - 1, *spatial))[:, None]
        return np.transpose(array, (array.ndim - 1, array.ndim - 2, *spatial))


def _name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _data_inputs(node: Node) -> list[str]:
    return [t for t in node.inputs if not t.startswith("^")]


class _Builder:
    def __init__(self, weight_of: WeightOf) -> None:
        self.weight_of = weight_of
        self.seen: set[Hashable] = set()  # stored tensors already given to a node
        self.nodes: list[GraphNode] = []

    def stored(self, prefix: str, scope: Scope, tensor: str) -> TensorRef | None:
        found = self.weight_of(prefix, tensor)
        for _ in range(MAX_RESHAPES):  # Keras 3 reads a conv bias through Reshape + Squeeze
            node = scope.nodes.get(_name(tensor)) if found is None else None
            if node is None or node.op not in SHAPE_OPS or not node.inputs:
                break
            tensor = node.inputs[0]
            found = self.weight_of(prefix, tensor)
        if found is None or found[0] in self.seen:
            return None
        self.seen.add(found[0])
        return found[1]

    def bias_add(self, scope: Scope, node: Node) -> Node | None:
        """The BiasAdd/Add consuming `node` alone, when it adds a stored 1-D tensor."""
        consumers = scope.consumers.get(node.name, ())
        if len(consumers) != 1 or consumers[0].op not in BIAS_OPS:
            return None
        add = consumers[0]
        operands = _data_inputs(add)
        if len(operands) != 2 or _name(operands[0]) != node.name:
            return None
        return add

    def followed_by_bn(self, scope: Scope, name: str, unfused: set[str]) -> bool:
        stack, visited = [name], 0
        while stack and visited < MAX_FOLLOW:
            visited += 1
            current = stack.pop()
            if current in unfused:
                return True
            for consumer in scope.consumers.get(current, ()):
                if consumer.op in BN_OPS and _name(_data_inputs(consumer)[0]) == current:  # x, not a statistic
                    return True
                if consumer.op in PASS_OPS:
                    stack.append(consumer.name)
        return False

    def add_scope(self, prefix: str, scope: Scope) -> None:
        folded: set[str] = set()
        unfused = {_name(x) for match in find_unfused(scope) for x in match.inputs}  # x of x * rsqrt(var + eps)
        weighted = [n for n in scope.nodes.values() if n.op in OP_KINDS]
        plans: dict[str, tuple[TensorRef | None, TensorRef | None, Node | None]] = {}
        for node in weighted:  # first: which BiasAdds fold into their conv/dense
            operands = _data_inputs(node)
            raw = self.stored(prefix, scope, operands[1]) if len(operands) > 1 else None
            weight: TensorRef | None = raw
            if raw is not None and node.op != "MatMul" and node.op not in MATMUL_OPS:
                weight = KernelTensor(raw, "depthwise" if node.op == "DepthwiseConv2dNative" else "conv")
            add = self.bias_add(scope, node)
            bias = self.stored(prefix, scope, _data_inputs(add)[1]) if add is not None else None
            if bias is not None and len(bias.shape) != 1:
                bias = None
            if bias is None:
                add = None
            else:
                assert add is not None
                folded.add(add.name)
            plans[node.name] = (weight, bias, add)
        for node in scope.nodes.values():
            if node.name in folded:
                continue
            kind: OpKind = "other"
            op = OP_NAMES.get(node.op, node.op)
            weight = bias = None
            last = node
            rows_out = True
            if node.op in BN_OPS:
                kind, op = "batchnorm", "BatchNormalization"
            elif node.name in plans:
                weight, bias, add = plans[node.name]
                kind = OP_KINDS[node.op]
                last = add if add is not None else node
                if node.op == "MatMul":
                    kind, op = ("dense", "Gemm") if weight is not None else ("matmul", "MatMul")
                    rows_out = node.attr("transpose_b") is True
                elif node.op in MATMUL_OPS:
                    rows_out = node.attr("adj_y") is True
            self.nodes.append(GraphNode(
                index=len(self.nodes), name=node.name.removesuffix("/" + node.op), op=op, kind=kind,
                inputs=tuple(prefix + _name(t) for t in _data_inputs(node)), outputs=(prefix + last.name,),
                weight=weight, bias=bias, weight_rows_out=rows_out,
                followed_by_bn=node.name in plans and self.followed_by_bn(scope, last.name, unfused)))


def build_nodes(scopes: Sequence[tuple[str, Scope]], weight_of: WeightOf) -> list[GraphNode]:
    """Every node of these scopes (prefix, Scope) as a GraphNode; see the module docstring."""
    builder = _Builder(weight_of)
    for prefix, scope in scopes:
        builder.add_scope(prefix, scope)
    return builder.nodes

