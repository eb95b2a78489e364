"""BN404-BN406 (batch statistics baked into an exported graph) and BN5xx (graph structure).

These rules read the neutral facts every graph loader fills (ONNX, Keras, Caffe): a layer's
`training_reasons`, `stats_source` and `producer`, and the model's `nodes` and `inputs`. No rule
here knows an op name of any framework: ops are judged by `GraphNode.kind`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np

from bnlint.context import RuleContext
from bnlint.findings import FixText, Severity
from bnlint.model import FOLDABLE_KINDS, BNLayer, GraphNode, ModelInfo, TensorRef
from bnlint.rules._util import channel_text, channels, num
from bnlint.rules.registry import Hit, rule

CONV_KINDS = ("conv", "conv_transpose")  # BN506 is about convolutions (as planned), not Linear/Gemm
WEIGHT_KINDS = ("conv", "conv_transpose", "dense", "matmul")
MIN_CHANNELS = 4  # fewer output channels give no meaningful reference scale for BN503
# BN503's reference scale: the channel norm below which 90% of a node's channels lie. A folded
# collapsed variance lifts a few channels far above nearly all the others; trained networks spread
# their live channels over decades and, pruned or sparsely trained, hold many dead ones, which a
# median would measure instead (PaddleOCR's shipped detection models: half the channels of a layer
# at norms 1e-9..1e-5, so the median sat there and 189 healthy channels looked 100x too large).
# Channels this far below it are dead (pruned, gamma ~ 0) and left out before it is taken again:
# in a layer of 24 with 22 dead, the two live channels are the layer, not its outliers.
REFERENCE_QUANTILE = 0.9
DEAD_BELOW_REFERENCE = 1e3


def _is_float(ref: TensorRef) -> bool:
    return ref.dtype.startswith(("float", "bfloat"))


@rule(
    code="BN404",
    reads=("graph-modes",),
    name="graph-training-mode",
    severity=Severity.ERROR,
    summary="A BatchNorm in an exported graph normalises with batch statistics at inference (ONNX training mode, "
    "Caffe use_global_stats: false).",
    fix="ONNX: export with model.eval() and training=torch.onnx.TrainingMode.EVAL, or `bnlint fix` rewrites the node to "
    "its inference form. Caffe: set use_global_stats: true (or drop the line) in the deploy prototxt.",
)
def graph_training_mode(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Finds BatchNorm layers whose exported form computes batch statistics whatever the runtime
    is asked to do:
    - ONNX `BatchNormalization` nodes in training form: `training_mode=1` (opset 14 and later),
      more than one output (opsets 7 to 13: the running and saved mean/variance outputs exist
      only in training mode), or `is_test=0` (opsets 1 and 6, where 0 is also the default when
      the attribute is absent);
    - Caffe `BatchNorm` layers with `use_global_stats: false` in the net that will be deployed
      (a deploy prototxt, or a `.caffemodel` read without one).

    ## Why is this bad?
    Such a layer normalises each batch with that batch's own mean and variance and ignores the
    stored statistics. At inference that makes a sample's result depend on the other samples in
    its batch, and a batch of one sample with no spatial extent collapses every channel to the
    bias. onnxruntime and Caffe run these layers without complaint and return batch-dependent
    outputs.

    ## Example
    `torch.onnx.export(model, x, "m.onnx", dynamo=False, training=torch.onnx.TrainingMode.TRAINING)`
    writes `BatchNormalization(..., training_mode=1)` with three outputs (opset 14+) or five
    outputs (opset 9 to 13). In Caffe, a deploy prototxt copied from the train prototxt keeps
    `batch_norm_param { use_global_stats: false }`.

    ## Use instead
    Call `model.eval()` and export with the default `training=torch.onnx.TrainingMode.EVAL`;
    the node then has one output and uses the stored running statistics. In Caffe, delete the
    `use_global_stats: false` line from the deploy prototxt (the TEST phase defaults to true).

    ## References
    - ONNX operator spec: BatchNormalization (versions 1, 6, 7, 9, 14, 15).
    - microsoft/onnxscript#1791 and #1338; microsoft/onnxruntime#29790.
    - BVLC/caffe#5829 (`use_global_stats` at test time); Caffe `batch_norm_layer.cpp`.
    """
    if not layer.training or not layer.training_reasons:
        return  # a switchable train/eval flag (a pickled module) is BN401/BN402's
    version = f"; {ctx.model.format_version}" if ctx.model.format_version else ""
    yield Hit(
        message=f"{layer.kind} normalises with batch statistics at inference ({'; '.join(layer.training_reasons)}{version}): "
        "outputs depend on the rest of the batch and the stored statistics are not used",
        layer=layer.name,
        values={"reasons": list(layer.training_reasons), "format_version": ctx.model.format_version},
    )


@rule(
    code="BN405",
    reads=("traced-calls",),
    name="traced-in-train-mode",
    severity=Severity.ERROR,
    summary="A TorchScript graph calls batch_norm with training=True baked in.",
    fix="Call model.eval() first, then re-run torch.jit.trace (or script) and save again.",
    scope="model",
)
def traced_in_train_mode(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports TorchScript `batch_norm` calls whose `training` argument is the constant `True`,
    as `torch.jit.trace` records them when the model was traced in train mode.

    ## Why is this bad?
    Tracing records the values it saw, not the `self.training` flag: a model traced in train
    mode keeps `torch.batch_norm(x, weight, bias, running_mean, running_var, True, 0.1, 1e-05, ...)`
    and the `num_batches_tracked` update in its graph. Calling `.eval()` on the loaded module
    changes nothing, so every inference call normalises with the batch's statistics and keeps
    overwriting the running statistics with inference data.

    ## Example
    ```python
    model.train()
    traced = torch.jit.trace(model, example)
    traced.save("model.pt")  # code contains batch_norm(..., True, 0.1, 1e-05, True)
    ```

    ## Use instead
    ```python
    model.eval()
    traced = torch.jit.trace(model, example)
    ```

    ## References
    - pytorch/pytorch#29177 and #71929 (traced BatchNorm keeps training behaviour).
    - PyTorch docs: `torch.jit.trace` (ops that behave differently in training and eval mode keep
      the mode they were traced in, whatever mode the ScriptModule is later put in).
    """
    for call in model.traced_training:
        shown = f" ({call.code.strip()[:160]})" if call.code.strip() else ""
        yield Hit(
            message=f"TorchScript calls batch_norm with training=True baked in{shown}: .eval() cannot switch it off, "
            "every call uses batch statistics and updates the running statistics",
            layer=call.layer,
            values={"code": call.code, "location": call.location},
        )


@rule(
    code="BN406",
    reads=("graph-statistics",),
    name="batch-statistics-in-graph",
    severity=Severity.ERROR,
    summary="A BatchNorm node's mean/var are computed from the input batch, not read from stored statistics.",
    fix=FixText("Train with track_running_stats=True (or re-estimate running statistics) and export in eval mode; "
                "if per-batch normalisation is intended, use InstanceNorm/GroupNorm instead.",
                tensorflow="Export again from the model called in inference mode (model(x, training=False); Keras 3's "
                "model.export writes that serving function); bnlint fix cannot rewrite a SavedModel's graph, only its "
                "statistics. If per-batch normalisation is intended, use GroupNormalization instead."),
)
def batch_statistics_in_graph(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Finds ONNX `BatchNormalization` nodes whose mean and variance inputs are produced by other
    nodes from the graph's input (ReduceMean, Sub, Mul, ...) instead of initializers or
    `Constant` nodes.

    ## Why is this bad?
    Those inputs are the statistics of the current batch, so the node normalises every batch
    with its own statistics even when `training_mode=0`: results depend on batch composition
    and a single sample is normalised against itself. Both PyTorch exporters produce this
    graph for `BatchNorm(track_running_stats=False)`, which has no running statistics and uses
    batch statistics in eval mode too.

    ## Example
    `nn.BatchNorm2d(64, track_running_stats=False)` exported with `torch.onnx.export`:
    `ReduceMean -> ... -> BatchNormalization(input_mean=<computed>, input_var=<computed>)`.

    ## Use instead
    Construct the layer with `track_running_stats=True`, estimate the running statistics on
    training data (`bnlint fix model.pt --data TRAIN_SAMPLE`, exact and layer by layer; in
    PyTorch also `torch.optim.swa_utils.update_bn`), call `model.eval()`, then export. An ONNX
    file exported this way can be repaired directly: `bnlint fix model.onnx --data SAMPLE`
    rewrites the node to inference form with statistics estimated on the sample.

    In TensorFlow, the same graph (Mean and SquaredDifference of the input feeding the
    normalisation) is what a Keras 3 model saved while called with `training=True` serves:
    export again from the model called with `training=False`.

    ## References
    - PyTorch docs: `torch.nn.BatchNorm2d` ("track_running_stats").
    - ONNX operator spec: BatchNormalization (`input_mean`, `input_var`).
    - Keras docs: `BatchNormalization` (`training` call argument).
    """
    if layer.stats_source != "computed":
        return
    by = f" by {', '.join(layer.stats_ops)}" if layer.stats_ops else ""
    # What produces this graph differs: PyTorch's exporters for a layer without running statistics,
    # a Keras 3 model traced while called with training=True for TensorFlow.
    origin = ("a model traced while called with training=True; its moving statistics are never read"
              if ctx.model.framework == "tensorflow" else "the export of a track_running_stats=False layer")
    yield Hit(
        message=f"mean/var are computed in the graph{by} from the input batch: every batch is normalised "
        f"with its own statistics ({origin})",
        layer=layer.name,
        values={"stats_ops": list(layer.stats_ops)},
    )


@rule(
    code="BN501",
    reads=("folded-graph",),
    name="bn-folded",
    severity=Severity.INFO,
    summary="The graph has convolution/dense nodes but no BatchNorm: BN was probably folded at export.",
    fix="Nothing is wrong with deploying this file. To lint BN statistics, lint the unfolded export "
    "(torch.onnx.export(..., dynamo=False, do_constant_folding=False), or the checkpoint); deploy the folded one.",
    scope="model",
)
def bn_folded(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Notes ONNX graphs that contain convolutions or matrix products but no BatchNormalization
    node and no other normalisation: the usual result of folding BN into the preceding layer.

    ## Why is this bad?
    It is not wrong: folding `W' = W * gamma / sqrt(var + eps)`, `b' = (b - mean) * gamma /
    sqrt(var + eps) + beta` is exact in eval mode and faster. But the statistics are gone, so
    bnlint cannot check them; a bad variance survives only as extreme or non-finite folded
    weights (BN502, BN503). A network that never had BatchNorm also matches: read this as
    "nothing to lint", not as a defect.

    ## Example
    A default `torch.onnx.export(model.eval(), x, "m.onnx")`: the dynamo exporter (default
    optimize=True) folds every BN; the legacy exporter (`dynamo=False`) folds BN after Conv.

    ## Use instead
    Lint the PyTorch checkpoint, or export an unfolded copy for linting:
    `torch.onnx.export(model.eval(), x, "lint.onnx", dynamo=False, do_constant_folding=False)`.

    ## References
    - PyTorch docs: `torch.onnx.export` (`do_constant_folding`, `optimize`).
    - ONNX Runtime docs: graph optimizations (Conv/BatchNormalization fusion).
    """
    if not model.folded_bn:
        return
    conv, dense = model.linear_ops
    yield Hit(
        message=f"no BatchNorm but {conv} convolution and {dense} dense (Gemm/MatMul) nodes: if the network had "
        "BatchNorm, it was folded into their weights at export, so its statistics cannot be checked",
        values={"conv": conv, "dense": dense},
    )


def _weight_nodes(model: ModelInfo, kinds: tuple[str, ...]) -> Iterator[GraphNode]:
    """Nodes of these kinds that no BatchNorm follows: where a folded BN would have gone.

    Where a BN node follows, its own statistics are linted directly (BN1xx) and the raw weights
    are rescaled by it, so reading every convolution's weights would cost time for nothing.
    """
    for node in model.nodes:
        if node.kind in kinds and not node.followed_by_bn:
            yield node


@rule(
    code="BN502",
    reads=("graph",),
    name="folded-weights-nonfinite",
    severity=Severity.ERROR,
    summary="Conv/Gemm weights or biases hold NaN or Inf.",
    fix="Re-export from a checkpoint whose BN statistics are finite and positive (see BN101-BN103); fold in float32.",
    scope="model",
)
def folded_weights_nonfinite(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Checks the stored weights and biases of every Conv, ConvTranspose, Gemm and MatMul node
    of an ONNX graph that no BatchNormalization node follows (where a folded BN ends up) for
    NaN and infinite values.

    ## Why is this bad?
    A non-finite weight makes every output it touches NaN. When BN was folded at export, this
    is where a broken BatchNorm ends up: a NaN running statistic, a negative `running_var`
    below `-eps`, or `var + eps == 0` turn `gamma / sqrt(var + eps)` into NaN or Inf, and
    folding in half precision overflows above 65504.

    ## Example
    A Conv weight whose output channel 7 is all NaN because the folded BN had `running_var[7] = nan`.

    ## Use instead
    Fix the statistics in the source model (`bnlint fix MODEL --data TRAIN_SAMPLE` re-estimates
    them exactly, layer by layer; or the framework's own way, see BN601), keep BN in float32
    while folding, and export again.

    ## References
    - pytorch/pytorch#90342 (NaN running statistics); Xilinx/brevitas#388 (overflow when folding BN).
    """
    for node in _weight_nodes(model, WEIGHT_KINDS):
        bad: dict[str, dict[str, int]] = {}
        for role, ref in (("weight", node.weight), ("bias", node.bias)):
            if ref is None or not _is_float(ref):
                continue
            values = ref.numpy()
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
            if nan or inf:
                bad[role] = {"nan": nan, "inf": inf, "size": int(values.size)}
        if bad:
            parts = [f"{role} has {c['nan']} NaN and {c['inf']} Inf of {c['size']} values" for role, c in bad.items()]
            yield Hit(message=f"{node.op}: {'; '.join(parts)}", layer=node.name, values={"tensors": bad})


def _channel_norms(weight: np.ndarray, node: GraphNode) -> np.ndarray | None:
    """L2 norm per output channel: conv weight (M, C/g, k...) by rows; dense/matmul by output unit."""
    if node.kind == "conv" and weight.ndim >= 2:
        rows = weight.reshape(weight.shape[0], -1)
    elif node.kind in ("dense", "matmul") and weight.ndim == 2:
        rows = weight if node.weight_rows_out else weight.T
    else:
        return None
    # float32 norms are ample for a 100x outlier test, and skip a float64 copy of the whole weight.
    rows = rows if rows.dtype in (np.float32, np.float64) else rows.astype(np.float32)
    return np.asarray(np.linalg.norm(rows, axis=1), dtype=np.float64)


@rule(
    code="BN503",
    reads=("graph",),
    name="folded-scale-outlier",
    severity=Severity.WARNING,
    summary="A Conv/Gemm output channel's weight norm is far above nearly all its layer's channels (a folded tiny variance?).",
    fix="Check the source checkpoint's BN running_var for near-zero channels (BN103, BN109) and re-estimate them before export.",
    scope="model",
)
def folded_scale_outlier(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    For each Conv, Gemm and MatMul node of a graph that is not itself followed by a
    BatchNormalization node, computes the L2 norm of every output channel's weights and reports
    channels whose norm exceeds `folded_scale_outlier_ratio` (default 100) times the node's
    reference norm: the norm 90% of its channels stay below. Not the median: trained networks
    spread their live channels over decades, and pruned or sparsely trained ones hold many dead
    channels (`gamma ~ 0`, norms near 0), which would pull a median far below every live channel.
    Channels more than 1000 times below that norm are dead and left out before it is taken again
    (a layer whose live channels are few has no outliers among them); channels far below the
    reference are never reported: after folding they are usually dead channels, which are harmless.

    ## Why is this bad?
    Folding multiplies output channel `c` by `gamma[c] / sqrt(running_var[c] + eps)`. A
    collapsed or tiny running variance therefore shows up as one channel hundreds of times
    larger than its neighbours: it amplifies noise, overflows float16 (65504) and ruins
    per-tensor int8 quantisation, whose scale is set by the largest channel.

    ## Example
    `running_var[12] = 1e-9` with `eps = 1e-5` and unit gamma folds into a channel about 300
    times larger than channels with variance near 1.

    ## Use instead
    Lint the unfolded model (BN103, BN109 name the channel), re-estimate the running statistics,
    and quantise per channel if large scales are genuine.

    ## References
    - Xilinx/brevitas#388 (folded BN scales overflow); pytorch/vision#2599 (near-zero running_var).
    """
    ratio_limit = ctx.config.threshold("folded_scale_outlier_ratio")
    for node in _weight_nodes(model, ("conv", "dense", "matmul")):
        ref = node.weight
        if ref is None or not _is_float(ref):
            continue
        norms = _channel_norms(ref.numpy(), node)
        if norms is None or norms.size < MIN_CHANNELS or not np.isfinite(norms).all():
            continue  # non-finite weights are BN502's
        top = float(np.quantile(norms, REFERENCE_QUANTILE, method="lower"))
        live = norms[norms > top / DEAD_BELOW_REFERENCE]
        if top <= 0 or live.size < MIN_CHANNELS:
            continue
        reference = float(np.quantile(live, REFERENCE_QUANTILE, method="lower"))
        ratio = norms / reference
        outliers = ratio > ratio_limit
        if outliers.any():
            worst = int(np.argmax(ratio))
            yield Hit(
                message=f"{node.op}: {int(outliers.sum())} of {norms.size} output channels have a weight norm over "
                f"{num(ratio_limit)}x the norm 90% of its channels stay below, {num(reference)} (channel {worst}: "
                f"{num(float(ratio[worst]))}x; channels {channel_text(outliers)})",
                layer=node.name,
                values={"reference_norm": reference, "max_ratio": float(ratio[worst]), "channels": channels(outliers, 16),
                        "threshold": ratio_limit},
            )


@rule(
    code="BN504",
    reads=("graph", "graph-inputs"),
    name="fixed-batch-one-training",
    severity=Severity.ERROR,
    summary="A graph input with batch dimension fixed to 1 feeds a BatchNorm that uses batch statistics.",
    fix="Export in eval mode (running statistics), or make the batch dimension dynamic and feed real batches.",
    scope="model",
)
def fixed_batch_one_training(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Finds ONNX graph inputs whose first (batch) dimension is the constant 1 and that reach a
    BatchNormalization node in training mode (BN404) or fed computed batch statistics (BN406).

    ## Why is this bad?
    Batch statistics from one sample are that sample's own statistics: with spatial extent each
    channel is normalised per image (instance norm, not the trained behaviour); without it (a BN
    after Gemm) the variance is exactly 0, every output equals the bias, and PyTorch refuses the
    same input in training ("Expected more than 1 value per channel"). A fixed batch of 1 means
    the graph can never see a real batch.

    ## Example
    A model exported with `training=torch.onnx.TrainingMode.TRAINING` and a `(1, 3, 224, 224)`
    example input, without `dynamic_axes`.

    ## Use instead
    Export with `model.eval()` so the node uses its running statistics, or declare the batch
    dimension dynamic (`dynamic_axes={"input": {0: "batch"}}`) if training-mode BN is intended.

    ## References
    - fastai/fastai#1352 ("Expected more than 1 value per channel when training").
    - ONNX operator spec: BatchNormalization.
    """
    batch_one = [entry.name for entry in model.inputs if entry.batch == 1]
    risky = {layer.node_index: layer for layer in model.layers
             if layer.node_index is not None and (layer.training_reasons or layer.stats_source == "computed")}
    if not batch_one or not risky:
        return
    fed_by: dict[int, list[str]] = {}
    for index, bits in _reached(model.nodes, batch_one).items():
        if index in risky:
            fed_by[index] = [name for bit, name in enumerate(batch_one) if bits >> bit & 1]
    for index, names in sorted(fed_by.items(), key=lambda item: risky[item[0]].order):
        layer = risky[index]
        yield Hit(
            message=f"input {', '.join(repr(n) for n in names)} has batch dimension fixed to 1 and reaches this "
            f"{layer.kind}, which uses batch statistics: every sample is normalised with its own statistics",
            layer=layer.name,
            values={"inputs": names},
        )


def _reached(nodes: list[GraphNode], starts: list[str]) -> dict[int, int]:
    """Node index -> bit mask of the `starts` tensors that reach it.

    One forward propagation for all starts (a mask per tensor name, bit i for starts[i]); a name
    is queued again only when its mask gains bits, so a graph in topological order costs one
    pass however many inputs it has, instead of one walk per input.
    """
    consumers: dict[str, list[GraphNode]] = {}
    for node in nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    masks = {name: 1 << bit for bit, name in enumerate(starts)}
    reached: dict[int, int] = {}
    queue = deque(starts)
    while queue:
        name = queue.popleft()
        bits = masks[name]
        for node in consumers.get(name, ()):
            before = reached.get(node.index, 0)
            if before | bits == before:
                continue
            reached[node.index] = before | bits
            for out in node.outputs:
                held = masks.get(out, 0)
                if out and held | bits != held:
                    masks[out] = held | bits
                    queue.append(out)
    return reached


@rule(
    code="BN505",
    reads=("graph",),
    name="unfused-bn",
    severity=Severity.INFO,
    summary="An inference BatchNormalization directly after Conv/Gemm could be folded into it.",
    fix=FixText("Keep this unfolded file for linting; deploy a folded copy (`bnlint fix model.onnx --fold -o deploy.onnx`, "
                "checked numerically) or let the runtime fuse it.",
                tensorflow="Nothing to do for TensorFlow itself: its graph optimizer fuses Conv2D with an inference "
                "FusedBatchNorm when the model is loaded, and the TFLite converter folds it; keep this file for linting."),
)
def unfused_bn(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Notes BatchNormalization nodes in inference form (stored statistics, not training mode)
    whose input comes straight from a Conv, ConvTranspose or Gemm node that feeds nothing else.

    ## Why is this bad?
    It is not a defect. In eval mode BN is a per-channel affine map, so the pair equals one
    Conv/Gemm with `W' = W * gamma / sqrt(var + eps)` and `b' = (b - mean) * gamma /
    sqrt(var + eps) + beta`: one op fewer, less memory traffic. ONNX Runtime fuses Conv+BN
    when it loads the model; other runtimes and hand-written kernels may not.

    ## Example
    `Conv -> BatchNormalization -> Relu` from `torch.onnx.export(..., do_constant_folding=False)`,
    or `Gemm -> BatchNormalization` (the legacy exporter does not fold BN after Linear).

    ## Use instead
    Keep this file for linting; deploy a folded export (default constant folding) or rely on
    the runtime's fusion. Folding is exact only in eval mode.

    ## References
    - ONNX Runtime docs: graph optimizations (Conv BatchNormalization fusion).
    - PyTorch docs: `torch.nn.utils.fusion.fuse_conv_bn_eval`.
    """
    producer = layer.producer
    if not ctx.model.exported or producer is None or producer.kind not in FOLDABLE_KINDS or layer.training or not producer.exclusive:
        return
    if layer.stats_source != "stored":
        return
    yield Hit(
        message=f"follows {producer.op} {producer.name!r} in an inference graph and could be folded into it",
        layer=layer.name,
        values={"producer_op": producer.op, "producer": producer.name},
    )


@rule(
    code="BN506",
    reads=("producers",),
    name="conv-bias-before-bn",
    severity=Severity.INFO,
    summary="A Conv with a bias feeds a BatchNormalization directly: the bias is redundant.",
    fix="Build the convolution without a bias (nn.Conv2d(..., bias=False), Conv2D(use_bias=False), bias_term: false); "
    "BN's beta provides the offset.",
)
def conv_bias_before_bn(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Notes a Conv or ConvTranspose node with a non-zero stored bias whose only consumer is a
    BatchNormalization node (uses by the BN's own batch-statistics nodes do not count).

    ## Why is this bad?
    BN subtracts the per-channel mean of its input. In training the bias is removed exactly
    (the batch mean includes it), so it gets zero gradient and is a wasted parameter; in eval
    mode it only offsets `running_mean`. The original BN paper drops it for this reason.

    ## Example
    ```python
    nn.Sequential(nn.Conv2d(64, 128, 3, bias=True), nn.BatchNorm2d(128))
    ```

    ## Use instead
    ```python
    nn.Sequential(nn.Conv2d(64, 128, 3, bias=False), nn.BatchNorm2d(128))
    ```

    ## References
    - Ioffe & Szegedy 2015, "Batch Normalization", section 3.2 (the bias "can be ignored").
    - PyTorch docs: `torch.nn.Conv2d` (`bias`).
    """
    producer = layer.producer
    if producer is None or producer.kind not in CONV_KINDS or not producer.has_bias or not producer.exclusive:
        return
    ref = producer.bias
    if ref is None or not _is_float(ref):
        return  # a computed bias (e.g. the dynamo exporter's expanded zeros) cannot be judged
    bias = np.asarray(ref.numpy(), dtype=np.float64)
    largest = float(np.max(np.abs(bias))) if bias.size else 0.0
    if largest == 0.0:
        return  # an all-zero bias is an exporter artefact, not a trained parameter
    yield Hit(
        message=f"{producer.op} {producer.name!r} adds a bias (max |b| = {num(largest)}) right before this {layer.kind}, "
        "which subtracts the channel mean: the bias is redundant",
        layer=layer.name,
        values={"producer_op": producer.op, "producer": producer.name, "max_abs_bias": largest},
    )
