"""Caffe loader: a `.caffemodel` (weights, and the net it was trained as), a `.prototxt` (the net
definition), or both together, as the framework-neutral ModelInfo.

Caffe semantics (BVLC `batch_norm_layer.cpp`, `caffe.proto`):
- A `BatchNorm` layer stores running SUMS: blobs[0] mean sum, blobs[1] variance sum (with the
  m/(m-1) correction applied), blobs[2] a one-element scale factor; the statistics are
  blob / factor, and a factor of 0 is "never updated" (Caffe then uses 0 for mean and variance).
- gamma and beta live in the following `Scale` layer (`bias_term: true`), paired by blob name.
- `use_global_stats` defaults to true in the TEST phase and false in TRAIN; a deployed net runs
  in TEST, so an explicit `use_global_stats: false` there normalises with batch statistics.
- With both files, the prototxt is the net that will be deployed (structure, parameters, mode)
  and the caffemodel supplies the blobs, matched by layer name as Caffe's CopyTrainedLayersFrom
  does; a caffemodel that stores another `use_global_stats` is reported (BN409).
- Repeated layer names (`net.cpp`, `Net::CopyTrainedLayersFrom`): each stored layer goes to the
  FIRST net layer of its name, a later stored layer of that name overwriting it; a later net
  layer of the same name receives nothing and keeps the zero blobs BatchNormLayer::LayerSetUp
  gives it (scale factor 0: never updated, BN104). A caffemodel linted alone is read as Caffe
  would run it with its own definition, the same way.
Caffe reuses blob names for in-place layers (`conv1 -> BatchNorm -> Scale -> ReLU`, all "conv1"),
so the node list renames every output (`conv1@2`, ...) to keep producers and consumers exact.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bnlint.conventions import conventions
from bnlint.errors import InputError
from bnlint.loaders.caffe_proto import CaffeBlob, CaffeLayer, CaffeNet, read_caffemodel, read_prototxt
from bnlint.model import BNLayer, GraphInput, GraphNode, ModelInfo, OpKind, Producer
from bnlint.norms import classify

# What each Caffe layer type is to the neutral graph rules; everything else is "other".
OP_KINDS: dict[str, OpKind] = {
    "Convolution": "conv", "Deconvolution": "conv_transpose", "InnerProduct": "dense", "BatchNorm": "batchnorm",
    "BN": "batchnorm", "LRN": "other_norm", "MVN": "other_norm", "Normalize": "other_norm",
}


@dataclass(frozen=True)
class ScaledBlob:
    """A BatchNorm statistic read lazily as blob / scale factor (0 when the factor is 0)."""

    blob: CaffeBlob
    factor: CaffeBlob

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.blob.size,)

    @property
    def dtype(self) -> str:
        return self.blob.dtype

    @property
    def byte_range(self) -> tuple[int, int] | None:
        return self.blob.byte_range

    def numpy(self) -> np.ndarray:
        factor = float(self.factor.numpy().reshape(-1)[0]) if self.factor.size == 1 else float("nan")
        values = self.blob.numpy().reshape(-1).astype(np.float64)
        if factor == 0.0:
            return np.zeros_like(values)
        with np.errstate(all="ignore"):
            return values / factor


@dataclass(frozen=True)
class FlatBlob:
    """A Scale layer's gamma or beta as a 1-D tensor (Caffe stores them with shape (C,))."""

    blob: CaffeBlob

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.blob.size,)

    @property
    def dtype(self) -> str:
        return self.blob.dtype

    @property
    def byte_range(self) -> tuple[int, int] | None:
        return self.blob.byte_range

    def numpy(self) -> np.ndarray:
        return self.blob.numpy().reshape(-1)


def _deployed(net: CaffeNet) -> tuple[list[CaffeLayer], list[str]]:
    """The layers a TEST-phase net instantiates (include/exclude rules), and notes on the rest."""
    kept: list[CaffeLayer] = []
    dropped: list[CaffeLayer] = []
    for layer in net.layers:
        included = not layer.include or any(rule.phase in (None, "TEST") for rule in layer.include)
        excluded = any(rule.phase == "TEST" for rule in layer.exclude)
        (kept if included and not excluded else dropped).append(layer)
    notes = [f"{len(dropped)} layer(s) limited to the TRAIN phase were left out (the deployed net runs in TEST)"] if dropped else []
    return kept, notes


def _use_global_stats(layer: CaffeLayer) -> bool:
    """What a TEST-phase net uses: the explicit setting, else true (Caffe's TEST default)."""
    param = layer.batch_norm_param
    return True if param is None or param.use_global_stats is None else bool(param.use_global_stats)


class _Graph:
    """Layers as neutral GraphNodes with renamed (single-assignment) tensors."""

    def __init__(self, layers: list[CaffeLayer]) -> None:
        version: Counter[str] = Counter()
        self.layers = layers
        self.inputs: list[tuple[str, ...]] = []
        self.outputs: list[tuple[str, ...]] = []
        for layer in layers:
            self.inputs.append(tuple(_name(b, version[b]) for b in layer.bottom))
            outs = []
            for top in layer.top:
                version[top] += 1
                outs.append(_name(top, version[top]))
            self.outputs.append(tuple(outs))
        self.producer = {out: index for index, outs in enumerate(self.outputs) for out in outs}
        self.consumers: dict[str, list[int]] = {}
        for index, names in enumerate(self.inputs):
            for name in names:
                self.consumers.setdefault(name, []).append(index)
        self.outputs_of_net = {out for outs in self.outputs for out in outs if out not in self.consumers}

    def kind(self, index: int) -> OpKind:
        return OP_KINDS.get(self.layers[index].type, "other")

    def consumer_kinds(self, index: int) -> set[OpKind]:
        return {self.kind(j) for out in self.outputs[index] for j in self.consumers.get(out, [])}

    def nodes(self) -> list[GraphNode]:
        nodes = []
        for index, layer in enumerate(self.layers):
            kind = self.kind(index)
            weight, bias = _weights(layer) if kind in ("conv", "conv_transpose", "dense") else (None, None)
            nodes.append(GraphNode(index=index, name=layer.name or f"{layer.type}_{index}", op=layer.type, kind=kind,
                                   inputs=self.inputs[index], outputs=self.outputs[index], weight=weight, bias=bias,
                                   followed_by_bn="batchnorm" in self.consumer_kinds(index)))
        return nodes

    def producer_of(self, index: int) -> Producer | None:
        """The layer computing a BatchNorm layer's input, as the neutral Producer."""
        if not self.inputs[index]:
            return None
        source = self.inputs[index][0]
        found = self.producer.get(source)
        if found is None:
            return None
        layer, kind = self.layers[found], self.kind(found)
        weight, bias = _weights(layer) if kind in ("conv", "conv_transpose", "dense") else (None, None)
        param = layer.convolution_param or layer.inner_product_param
        has_bias = (True if param is None else param.bias_term) if kind in ("conv", "conv_transpose", "dense") else None
        exclusive = len(self.consumers.get(source, [])) == 1 and source not in self.outputs_of_net
        del weight
        return Producer(name=layer.name, op=layer.type, kind=kind, has_bias=has_bias,
                        bias=FlatBlob(bias) if bias is not None else None, exclusive=exclusive)

    def scale_after(self, index: int) -> CaffeLayer | None:
        """The Scale layer that consumes this BatchNorm's output (Caffe's gamma/beta), if any."""
        for out in self.outputs[index]:
            for j in self.consumers.get(out, []):
                if self.layers[j].type == "Scale":
                    return self.layers[j]
        return None


def _name(blob: str, version: int) -> str:
    return blob if version <= 1 else f"{blob}@{version}"


def _weights(layer: CaffeLayer) -> tuple[CaffeBlob | None, CaffeBlob | None]:
    param = layer.convolution_param or layer.inner_product_param
    bias_term = True if param is None else param.bias_term
    weight = layer.blobs[0] if layer.blobs else None
    bias = layer.blobs[1] if bias_term and len(layer.blobs) > 1 else None
    return weight, bias


def _bn_layer(index: int, layer: CaffeLayer, graph: _Graph, order: int, where: str) -> BNLayer:
    param = layer.batch_norm_param
    eps = param.eps if param is not None else conventions("caffe").default_eps
    raw = param.moving_average_fraction if param is not None else float(conventions("caffe").default_momentum or 0.999)
    use_global = _use_global_stats(layer)
    bn = BNLayer(name=layer.name or f"BatchNorm_{index}", kind=layer.type, framework="caffe", order=order,
                 eps=float(eps), momentum=float(1.0 - raw), raw_momentum=float(raw), training=not use_global,
                 known={"eps", "momentum", "training"}, node_index=index, producer=graph.producer_of(index))
    if not use_global:
        bn.training_reasons = [f"use_global_stats: false in {where}"]  # stored statistics, unused
    blobs = layer.blobs
    if len(blobs) >= 3 and blobs[2].size == 1:
        bn.tensors["running_mean"] = ScaledBlob(blobs[0], blobs[2])
        bn.tensors["running_var"] = ScaledBlob(blobs[1], blobs[2])
        bn.channels = blobs[0].size
        if float(blobs[2].numpy().reshape(-1)[0]) == 0.0:
            bn.stats_updated = False
            bn.stats_note = "its scale-factor blob is 0"
    scale = graph.scale_after(index)
    if scale is not None and scale.blobs:
        bn.tensors["weight"] = FlatBlob(scale.blobs[0])
        if len(scale.blobs) > 1 and (scale.scale_param is None or scale.scale_param.bias_term):
            bn.tensors["bias"] = FlatBlob(scale.blobs[1])
        bn.affine = True
        bn.known.add("affine")
    return bn


def _merged(definition: CaffeNet, weights: CaffeNet | None) -> tuple[list[CaffeLayer], list[str], set[int]]:
    """The deployed layers, each with its blobs from the caffemodel, as Caffe's
    `Net::CopyTrainedLayersFrom` assigns them: every stored layer is copied into the FIRST deployed
    layer of its name (a later stored layer of the same name overwrites it), so a later deployed
    layer of a repeated name gets nothing and keeps its initialisation. Also returns those."""
    layers, notes = _deployed(definition)
    if weights is None:
        return layers, notes, set()
    stored = {layer.name: layer for layer in weights.layers}  # the last of a name is the one copied last
    first: dict[str, int] = {}
    for index, layer in enumerate(layers):
        first.setdefault(layer.name, index)
    merged: list[CaffeLayer] = []
    unfilled: set[int] = set()
    for index, layer in enumerate(layers):
        if first[layer.name] != index:
            unfilled.add(index)
            merged.append(replace(layer, blobs=[]))
        elif layer.name in stored and (weights is not definition or stored[layer.name] is not layer):
            merged.append(replace(layer, blobs=stored[layer.name].blobs))
        else:
            merged.append(layer)
    unmatched = [layer.name for layer in layers if OP_KINDS.get(layer.type) == "batchnorm" and layer.name not in stored]
    if unmatched and weights is not definition:
        notes.append(f"{len(unmatched)} BatchNorm layer(s) of the prototxt have no blobs in the caffemodel: "
                     f"{', '.join(unmatched[:5])}")
    return merged, notes, unfilled


def _disagreement(layer: CaffeLayer, weights: CaffeNet | None, definition_file: str, weights_file: str) -> str | None:
    """How the caffemodel's stored use_global_stats contradicts the deploy prototxt, if it does."""
    if weights is None:
        return None
    stored = next((w for w in weights.layers if w.name == layer.name), None)
    if stored is None or stored.batch_norm_param is None or stored.batch_norm_param.use_global_stats is None:
        return None
    own, deployed = bool(stored.batch_norm_param.use_global_stats), _use_global_stats(layer)
    if own == deployed:
        return None
    explicit = layer.batch_norm_param is not None and layer.batch_norm_param.use_global_stats is not None
    said = f"use_global_stats: {str(deployed).lower()}" + ("" if explicit else " (the TEST-phase default)")
    return (f"{definition_file} says {said} but {weights_file} stores use_global_stats: {str(own).lower()}: a tool that "
            f"reads the caffemodel's own definition normalises with {'batch' if not own else 'stored'} statistics")


def load_caffe(path: Path, companion: Path | None = None) -> ModelInfo:
    """Read a .caffemodel and/or .prototxt (either order) as data. InputError for anything unreadable."""
    files = [Path(path)] + ([Path(companion)] if companion is not None else [])
    model_file = next((f for f in files if f.suffix.lower() == ".caffemodel"), None)
    text_file = next((f for f in files if f.suffix.lower() != ".caffemodel"), None)
    weights = read_caffemodel(model_file) if model_file is not None else None
    definition = read_prototxt(text_file) if text_file is not None else weights
    if definition is None:
        raise InputError(str(path), "not a Caffe model")
    layers, notes, unfilled = _merged(definition, weights)
    graph = _Graph(layers)
    where = (text_file or model_file or Path(path)).name
    info = ModelInfo(path=str(path), format="caffe", framework="caffe", exported=True,
                     format_version="caffemodel + prototxt" if weights is not None and text_file is not None
                     else ("prototxt" if weights is None else "caffemodel"))
    info.nodes_factory = graph.nodes
    details: dict[str, dict[str, object]] = {}
    for index, layer in enumerate(layers):
        kind = classify(layer.type, "caffe")
        if kind == "other-norm":
            info.other_norms.append(f"{layer.type} '{layer.name}'")
        if kind != "bn":
            continue
        if layer.type == "BN":  # the SegNet/PSPNet forks: fused BN + scale with their own blob layout
            notes.append(f"layer '{layer.name}' is a fork's 'BN' layer (fused BatchNorm + Scale): recognised, not read")
            continue
        bn = _bn_layer(index, layer, graph, len(info.layers), where)
        if index in unfilled:  # BatchNormLayer::LayerSetUp zero-fills its blobs: factor 0, never updated
            bn.stats_updated = False
            bn.stats_note = (f"a layer named '{layer.name}' comes earlier in the net, and Caffe copies the stored "
                             "blobs into the first layer of a name only: this one keeps its zero initialisation, "
                             "scale factor 0")
        if model_file is not None and text_file is not None:
            bn.mode_disagreement = _disagreement(layer, weights, text_file.name, model_file.name)
        info.layers.append(bn)
        details[bn.name] = {"blobs": [list(b.shape) for b in layer.blobs],
                            "use_global_stats": None if layer.batch_norm_param is None else layer.batch_norm_param.use_global_stats}
    if weights is None:
        notes.append("prototxt only: structure and settings were linted; the statistics are in the .caffemodel "
                     "(lint both: bnlint deploy.prototxt model.caffemodel)")
    if any(layer.v1 for layer in definition.layers):
        notes.append("an old V1 net (`layers` entries): read as well as its types allow; V1 had no BatchNorm layer")
    shapes = definition.input_shapes
    info.inputs = [GraphInput(name, tuple(shapes[i]) if i < len(shapes) else None, "float32")
                   for i, name in enumerate(definition.inputs)]
    info.notes = notes
    info.metadata.update(net=definition.name, files=[f.name for f in files], layers=details)
    return info
