"""Graph facts and small surgery shared by the ONNX fixes: who produces and reads each tensor,
stored values seen through Identity/Cast, BatchNormalization's operator versions and training
form, writing a stored tensor in place, and pruning what a rewrite left without readers.

BatchNormalization changed in operator versions 1, 6, 7, 9, 14 and 15 (ONNX operator spec); the
version a model uses is the highest of those not above its ai.onnx opset.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from bnlint.fix.recalibrate import RecalibrationError
from bnlint.loaders.onnx_file import BN_OP_VERSIONS, _constant_value, _subgraphs, _topological_order, _used_names
from bnlint.norms import is_batchnorm_op


def bn_version(opset: int) -> int:
    """The BatchNormalization operator version a model's ai.onnx opset selects (1, 6, 7, 9, 14 or 15)."""
    return max((v for v in BN_OP_VERSIONS if v <= opset), default=BN_OP_VERSIONS[0])


def model_opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)


def set_attribute(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set (or add) an attribute, keeping the others and their order."""
    new = onnx.helper.make_attribute(name, value)
    for existing in node.attribute:
        if existing.name == name:
            existing.CopyFrom(new)
            return
    node.attribute.append(new)


def training_reasons(node: onnx.NodeProto, version: int) -> list[str]:
    """Why a BatchNormalization node is in training form, by operator version (ONNX spec):
    v1/v6 `is_test` (default 0: training), v7/v9 more than one output (Y plus running and saved
    mean/var), v14/v15 `training_mode=1` (then Y, running_mean, running_var)."""
    reasons = []
    if version >= 14 and int(attribute(node, "training_mode", 0)) == 1:
        reasons.append("training_mode=1")
    if version <= 6 and int(attribute(node, "is_test", 0)) == 0:
        reasons.append("is_test=0" if attribute(node, "is_test") is not None else "is_test absent (default 0: training)")
    extra = [out for out in node.output[1:] if out]
    if extra:
        reasons.append(f"{len(extra)} training output(s)")
    return reasons


def is_bn(node: onnx.NodeProto) -> bool:
    return is_batchnorm_op(node.op_type, node.domain)


def node_reads(node: onnx.NodeProto) -> Iterator[str]:
    """Every tensor name a node reads: its inputs and what its subgraphs read from outer scopes."""
    yield from (name for name in node.input if name)
    for _, sub in _subgraphs(node):
        yield from _used_names(sub)


class GraphFacts:
    """Producers, consumers, initializers and Constant values of one top-level graph (a snapshot:
    rebuild it after changing the graph)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for index, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = index
            for name in node_reads(node):
                self.consumers[name].append(index)
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {v.name for v in graph.output}
        self.inputs = [v.name for v in graph.input if v.name not in self.initializers]

    def constant(self, name: str) -> onnx.NodeProto | None:
        index = self.producer.get(name)
        node = self.graph.node[index] if index is not None else None
        return node if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None

    def value(self, name: str) -> np.ndarray | None:
        """The stored tensor `name` is (initializer or Constant), seen through Identity/Cast; else None."""
        cast: int | None = None
        for _ in range(64):
            if name in self.initializers:
                array = numpy_helper.to_array(self.initializers[name])
                break
            constant = self.constant(name)
            if constant is not None:
                ref = _constant_value(constant, Path("<model>"))
                if ref is None:
                    return None
                array = ref.numpy()
                break
            index = self.producer.get(name)
            if index is None or self.graph.node[index].op_type not in ("Identity", "Cast"):
                return None
            node = self.graph.node[index]
            if node.op_type == "Cast" and cast is None:
                cast = int(attribute(node, "to"))
            name = node.input[0]
        else:
            return None
        if cast is not None:
            array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(cast))
        return array

    def owned(self, name: str, node_index: int) -> bool:
        """Whether `name` is an initializer or Constant output read only by that node, once."""
        holder = name in self.initializers or self.constant(name) is not None
        return holder and self.consumers.get(name) == [node_index] and name not in self.outputs \
            and name not in {v.name for v in self.graph.input}

    def unread(self, index: int) -> bool:
        """Whether no node and no graph output reads any output of node `index`."""
        return all(not self.consumers.get(o) and o not in self.outputs for o in self.graph.node[index].output if o)

    def depends_on_data(self, name: str) -> bool:
        """Whether a tensor's value depends on a runtime graph input."""
        stack, seen, inputs = [name], set(), set(self.inputs)
        while stack:
            current = stack.pop()
            if current in seen or not current or current in self.initializers:
                continue
            seen.add(current)
            if current in inputs:
                return True
            index = self.producer.get(current)
            if index is not None:
                stack.extend(node_reads(self.graph.node[index]))
        return False

    def topological(self) -> list[int]:
        order = _topological_order(self.graph)
        if order is None:
            raise RecalibrationError("the ONNX graph has a cycle; bnlint cannot order its layers to fix them")
        return order

    def unique(self, base: str) -> str:
        taken = set(self.producer) | set(self.initializers) | {v.name for v in self.graph.input} | self.outputs
        name, number = base, 1
        while name in taken:
            number += 1
            name = f"{base}_{number}"
        return name


def write_tensor(graph: onnx.GraphProto, name: str, values: np.ndarray) -> None:
    """Overwrite the initializer or Constant node holding `name`, keeping its dtype and name."""
    for init in graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(np.asarray(values).astype(numpy_helper.to_array(init).dtype), name))
            return
    for node in graph.node:
        if node.op_type == "Constant" and list(node.output) == [name]:
            ref = _constant_value(node, Path("<model>"))
            dtype = np.dtype(ref.dtype) if ref is not None and ref.dtype in ("float16", "float32", "float64") else np.dtype(np.float32)
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(np.asarray(values).astype(dtype), name)))
            return
    raise RecalibrationError(f"internal: no stored tensor {name!r} to write")


def _remove(items: Any, names: set[str]) -> None:
    """Delete the entries of a repeated field whose `.name` is in `names`, by index: rebuilding the
    field would copy every remaining tensor (100 MB for a ResNet-50) each time."""
    for index in reversed([i for i, item in enumerate(items) if item.name in names]):
        del items[index]


def prune_dead(graph: onnx.GraphProto, candidates: set[str]) -> int:
    """Remove the nodes and initializers behind `candidates` that nothing reads any more (no node,
    no graph output), walking backwards; nodes that were dead before are left alone. Returns the
    number of nodes removed."""
    removed = 0
    while candidates:
        facts = GraphFacts(graph)
        unread = {n for n in candidates if not facts.consumers.get(n) and n not in facts.outputs}
        dead_nodes = sorted({facts.producer[n] for n in unread if n in facts.producer and facts.unread(facts.producer[n])}, reverse=True)
        dead_inits = {n for n in unread if n in facts.initializers}
        following: set[str] = set()
        gone = set(dead_inits)
        for index in dead_nodes:
            following.update(node_reads(graph.node[index]))
            gone.update(o for o in graph.node[index].output if o)
            del graph.node[index]
            removed += 1
        _remove(graph.initializer, dead_inits)
        _remove(graph.input, dead_inits)  # old exporters list initializers as inputs too
        _remove(graph.value_info, gone)
        candidates = following - gone
    return removed


def own_statistics(graph: onnx.GraphProto, targets: list[str], layer_name: Callable[[int, onnx.NodeProto], str],
                   module_name: Callable[[int, onnx.NodeProto], str]) -> None:
    """Make the mean/var inputs of the BNs whose outputs are `targets` initializers (or Constants)
    that only they read, so that writing them changes nothing else: a tensor shared with other
    nodes, or reached through Identity/Cast, is replaced by a new initializer named after the
    layer's module ("bn1.running_var"), or keeping the tensor's name when only an Identity/Cast
    made it (the legacy exporter's deduplication of equal tensors); one computed from the batch by
    a zero placeholder shaped and typed like the scale (a valid T / T2 in every operator version),
    overwritten before anything reads it. Nodes left without readers are pruned."""
    dropped: set[str] = set()
    for y in targets:
        facts = GraphFacts(graph)
        index = next(i for i, n in enumerate(graph.node) if is_bn(n) and n.output[0] == y)
        node = graph.node[index]
        for slot, suffix in ((3, "running_mean"), (4, "running_var")):
            name = node.input[slot]
            if facts.owned(name, index):
                continue
            value = facts.value(name)
            if value is None:
                scale = facts.value(node.input[1])
                if scale is None:
                    raise RecalibrationError(f"layer {layer_name(index, node)}: its scale is not stored, so its channel count is unknown")
                value = np.zeros(scale.shape, dtype=scale.dtype)
            maker = facts.producer.get(name)
            if maker is not None and graph.node[maker].op_type in ("Identity", "Cast") and facts.consumers.get(name) == [index] \
                    and name not in facts.outputs:
                unused = facts.unique(f"{name}/unused")  # the chain's end moves aside and is pruned; the name stays
                graph.node[maker].output[list(graph.node[maker].output).index(name)] = unused
                new, old = name, unused
            else:
                new, old = facts.unique(f"{module_name(index, node)}.{suffix}"), name
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), new))
            node.input[slot] = new
            dropped.add(old)
    prune_dead(graph, dropped)
