"""BN3xx: how each BatchNorm layer is configured (running-stat tracking, momentum, eps)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterator

import numpy as np

from bnlint.context import RuleContext
from bnlint.conventions import conventions
from bnlint.findings import Severity
from bnlint.model import BNLayer, ModelInfo
from bnlint.rules._util import num
from bnlint.rules.registry import Hit, rule


def _finite(value: float) -> bool:
    """NaN compares False with everything, so `eps <= 0` alone would pass a NaN eps as healthy."""
    return math.isfinite(value)


def _has_buffers(layer: BNLayer) -> bool:
    return "running_mean" in layer.tensors or "running_var" in layer.tensors


@rule(
    code="BN301",
    reads=("track-running-stats",),
    name="no-running-stats",
    severity=Severity.WARNING,
    summary="track_running_stats=False: eval mode normalises every batch with its own statistics.",
    fix="Construct the layer with track_running_stats=True and estimate statistics, or use GroupNorm/LayerNorm if batch-independence was never intended.",
)
def no_running_stats(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports BatchNorm layers built with `track_running_stats=False` (no running buffers).

    ## Why is this bad?
    Without running statistics PyTorch's BatchNorm uses the current batch's mean and variance
    in eval mode too. A prediction then depends on which other samples share its batch, a batch
    of one sample is normalised to ~0, and results change with the serving batch size.

    ## Example
    `nn.BatchNorm2d(64, track_running_stats=False)`.

    ## Use instead
    `nn.BatchNorm2d(64)` (the default tracks statistics); if per-batch normalisation is really
    wanted, `nn.GroupNorm` or `nn.LayerNorm` make it batch-independent.

    ## References
    - PyTorch docs, `torch.nn.BatchNorm2d` ("track_running_stats").
    - pytorch/pytorch#37823.
    """
    if layer.is_known("track_running_stats") and layer.track_running_stats is False and not _has_buffers(layer):
        yield Hit(
            message="track_running_stats=False: no running statistics, so eval mode normalises with each batch's "
            "own mean and variance (outputs depend on the batch)",
            layer=layer.name,
        )


@rule(
    code="BN302",
    reads=("track-running-stats",),
    name="tracking-toggled",
    severity=Severity.WARNING,
    summary="track_running_stats disagrees with the buffers present (the flag was changed after construction).",
    fix="Set track_running_stats when constructing the layer, or replace the layer with FrozenBatchNorm2d.",
)
def tracking_toggled(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Finds layers whose `track_running_stats` flag was flipped after construction: the flag is
    False but running buffers exist, or it is True but there are none.

    ## Why is this bad?
    PyTorch decides from the *buffers*, not the flag, what eval mode does. With the flag set to
    False after construction the buffers stay: eval mode silently normalises with those stale
    statistics, while train mode stops updating them. With the flag True and no buffers, eval
    mode normalises with batch statistics.

    ## Example
    `bn.track_running_stats = False` on a trained `BatchNorm2d` to "freeze" it.

    ## Use instead
    Freeze with `bn.eval()` (and `requires_grad_(False)` on its parameters), or swap in
    `torchvision.ops.FrozenBatchNorm2d`.

    ## References
    - pytorch/pytorch#37823 and PR #38084.
    """
    if not layer.is_known("track_running_stats"):
        return
    if layer.track_running_stats is False and _has_buffers(layer):
        yield Hit(
            message="track_running_stats is False but running buffers are present: eval mode still normalises "
            "with these (now frozen, possibly stale) statistics",
            layer=layer.name,
            values={"track_running_stats": False, "buffers": True},
        )
    elif layer.track_running_stats is True and not _has_buffers(layer):
        yield Hit(
            message="track_running_stats is True but there are no running buffers: eval mode normalises with batch statistics",
            layer=layer.name,
            values={"track_running_stats": True, "buffers": False},
        )


@rule(
    code="BN303",
    reads=("cumulative-momentum",),
    name="cumulative-momentum",
    severity=Severity.INFO,
    summary="momentum=None: running statistics are a cumulative average over all batches seen.",
    fix="Fine if deliberate (precise BN); for continued training set momentum (0.1 is PyTorch's default).",
)
def cumulative_momentum(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Notes layers with `momentum=None`, PyTorch's cumulative moving average.

    ## Why is this bad?
    With `momentum=None` each train-mode batch is weighted `1/num_batches_tracked`: early
    batches (from a model that has since changed) count as much as recent ones, and the stored
    statistics lag the trained weights. If `num_batches_tracked` is 0 (reset, or an old
    checkpoint), the very next train-mode batch replaces the statistics entirely.

    ## Example
    `nn.BatchNorm2d(64, momentum=None)` left in place after `update_bn`.

    ## Use instead
    Restore `momentum=0.1` after estimating statistics with a cumulative average.

    ## References
    - PyTorch docs, `torch.nn.BatchNorm2d` ("momentum").
    """
    if layer.is_known("momentum") and layer.momentum is None:  # only PyTorch has a cumulative mode
        extra = ""
        if layer.num_batches_tracked == 0:
            extra = " and num_batches_tracked is 0: the next train-mode batch replaces the statistics entirely"
        yield Hit(
            message=f"momentum=None (cumulative average over all batches){extra}",
            layer=layer.name,
            values={"num_batches_tracked": layer.num_batches_tracked},
        )


@rule(
    code="BN304",
    name="unusual-momentum",
    severity=Severity.WARNING,
    summary="momentum looks like the other framework's convention (PyTorch 0.1 and Keras 0.9 mean the same), or is NaN/Inf.",
    fix="PyTorch momentum = 1 - Keras/ONNX/Caffe momentum: Keras 0.99 is PyTorch 0.01, PyTorch 0.1 is Keras 0.9.",
)
def unusual_momentum(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports a momentum that puts at least `unusual_momentum` (default 0.5) of the weight on each
    *new* batch, in whichever convention the layer's framework uses, and (as info) a momentum
    that never updates the statistics at all.

    ## Why is this bad?
    The two conventions are opposites. PyTorch updates
    `running = (1 - momentum) * running + momentum * batch` (default 0.1); Keras, ONNX and Caffe
    (`moving_average_fraction`) update `moving = momentum * moving + (1 - momentum) * batch`
    (defaults 0.99, 0.9, 0.999). Copying Keras' 0.99 into PyTorch, or PyTorch's 0.1 into Keras,
    makes the statistics follow the last batch almost entirely, so they are as noisy as a single
    batch. A momentum that freezes the statistics in training is common in converted models and
    harmless until someone fine-tunes. A NaN or infinite momentum (an error) turns the statistics
    into NaN at the first training step. An ONNX node in inference form never reads its momentum,
    so there the finding is information about the source model.

    ## Example
    `nn.BatchNorm2d(64, momentum=0.99)` (seen in a shipped torchvision model, pytorch/vision#8250),
    or `keras.layers.BatchNormalization(momentum=0.1)`.

    ## Use instead
    `nn.BatchNorm2d(64, momentum=0.01)` for Keras' 0.99; `BatchNormalization(momentum=0.9)` for
    PyTorch's 0.1.

    ## References
    - pytorch/vision#8250 (MaxViT shipped momentum 0.99).
    - Lightning-AI/pytorch-lightning#14866.
    - Keras docs: `BatchNormalization` (`momentum`: "Momentum for the moving average").
    """
    if not layer.is_known("momentum") or layer.momentum is None:
        return
    momentum = float(layer.momentum)
    own = conventions(layer.framework)
    if not _finite(momentum) or (layer.raw_momentum is not None and not _finite(float(layer.raw_momentum))):
        raw_text = num(layer.raw_momentum if layer.raw_momentum is not None else momentum)
        yield Hit(
            message=f"{own.display} {own.momentum_name} is {raw_text}: the first training step makes every stored "
            "statistic NaN",
            layer=layer.name,
            values={"momentum": momentum, "raw_momentum": layer.raw_momentum, "framework": layer.framework},
            severity=Severity.ERROR,
        )
        return
    raw = layer.raw_momentum if layer.raw_momentum is not None else own.own_momentum(momentum)
    shown = own.describe_momentum(raw)
    if momentum >= ctx.config.threshold("unusual_momentum"):
        other = "Keras/ONNX" if own.momentum_weights == "new" else "PyTorch"  # the opposite convention
        stats = "running" if layer.framework == "torch" else "stored"
        # An ONNX node in inference form never reads its momentum (the spec uses it only with
        # training_mode=1): the value records how the source was configured, nothing runs on it.
        unused = layer.framework == "onnx" and not layer.training
        yield Hit(
            message=f"{shown}: the {stats} statistics follow the last batch ({other} convention pasted in? "
            f"{own.display}'s default is {num(own.default_momentum or 0.1)}; {other} {num(raw)} is {own.display} {num(1 - raw)})"
            + ("; this node runs in inference form, where momentum has no effect: it matters only in the source "
               "model, if it is trained again" if unused else ""),
            layer=layer.name,
            values={"momentum": momentum, "raw_momentum": raw, "framework": layer.framework, "used": not unused},
            severity=Severity.INFO if unused else None,
        )
    elif momentum == 0:
        yield Hit(
            message=f"{shown}: running statistics never change in train mode",
            layer=layer.name,
            values={"momentum": momentum, "raw_momentum": raw, "framework": layer.framework},
            severity=Severity.INFO,
        )


def _known_eps(model: ModelInfo) -> list[tuple[BNLayer, float]]:
    return [(layer, float(layer.eps)) for layer in model.layers
            if layer.is_known("eps") and layer.eps is not None and _finite(float(layer.eps)) and layer.eps > 0]


def _scale_change(layer: BNLayer, eps: float, other: float) -> float | None:
    """Largest relative change of a channel's gain, sqrt((var + eps) / (var + other)) - 1."""
    var = layer.array("running_var")
    if var is None:
        return None
    var = var[np.isfinite(var) & (var >= 0)]
    if var.size == 0:
        return None
    return float(np.max(np.abs(np.sqrt((var + eps) / (var + other)) - 1)))


@rule(
    code="BN305",
    name="eps-nondefault",
    severity=Severity.INFO,
    summary="Every BatchNorm layer uses an eps other than its framework's default (PyTorch/ONNX/Caffe 1e-5, Keras 1e-3).",
    fix="Fine if the model was trained with it; when converting weights between frameworks, copy eps with them.",
    scope="model",
)
def eps_nondefault(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Notes models whose BatchNorm layers all share an eps other than their framework's default
    (1e-5 in PyTorch, ONNX and Caffe; 1e-3 in Keras), and measures how much each channel's gain
    would change with that default.

    ## Why is this bad?
    It is not wrong in itself — Keras' default is 1e-3 and some torchvision models use 1e-3 on
    purpose — but it is the fingerprint of a converted model, where the eps must travel with the
    weights: for a channel with variance 1e-3, eps 1e-3 vs 1e-5 changes the gain by 29%.

    ## Example
    Every layer `BatchNorm2d(..., eps=0.001)`.

    ## Use instead
    Keep it if the model was trained with it; if converting, make sure the target uses it too.

    ## References
    - gzuidhof/nn-transfer PR #3; pytorch/vision PR #2933.
    """
    known = _known_eps(model)
    values = {eps for _, eps in known}
    frameworks = {layer.framework for layer, _ in known}
    if len(values) != 1 or len(frameworks) != 1:
        return
    eps = next(iter(values))
    own = conventions(next(iter(frameworks)))
    if np.isclose(eps, own.default_eps, rtol=1e-6, atol=0):
        return
    changes = [c for layer, _ in known if (c := _scale_change(layer, eps, own.default_eps)) is not None]
    worst = max(changes) if changes else None
    detail = f"; with eps {num(own.default_eps)} instead, channel gains would change by up to {worst:.1%}" if worst is not None else ""
    yield Hit(message=f"all {len(known)} BN layers use eps {num(eps)} ({own.display}'s default is {num(own.default_eps)}){detail}",
              values={"eps": eps, "default_eps": own.default_eps, "max_gain_change": worst})


MATERIAL_GAIN_CHANGE = 0.01  # BN306: below this the eps mix is a fact, not a defect


@rule(
    code="BN306",
    name="eps-mixed",
    severity=Severity.WARNING,
    summary="eps differs between BatchNorm layers of one model.",
    fix="Use the eps the model was trained with on every layer; a mix usually means a partial conversion.",
    scope="model",
)
def eps_mixed(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports models whose BatchNorm layers use different eps values, naming the minority layers
    and the gain change each would see with the majority value. A change under 1% (variances
    far above both eps values) is reported as info: the outputs barely move.

    ## Why is this bad?
    Architectures use one eps throughout. A mix is the signature of a conversion that copied
    eps for some layers and not others (Keras 1e-3 vs PyTorch 1e-5): the affected channels are
    scaled differently from how the model was trained.

    ## Example
    `features.0.1` with eps 1e-3 while every other layer has 1e-5.

    ## Use instead
    Set the training-time eps on every layer.

    ## References
    - gzuidhof/nn-transfer PR #3; pytorch/vision PR #2933.
    """
    known = _known_eps(model)
    counts = Counter(eps for _, eps in known)
    if len(counts) < 2:
        return
    majority = counts.most_common(1)[0][0]
    for layer, eps in known:
        if eps != majority:
            change = _scale_change(layer, eps, majority)
            detail = f" (channel gains differ by up to {change:.1%})" if change is not None else ""
            # Where the variances dwarf both eps values the mix changes no output that matters: a
            # fact (info), not a defect; a warning needs a gain change of at least 1%.
            harmless = change is not None and change < MATERIAL_GAIN_CHANGE
            yield Hit(
                message=f"eps {num(eps)} differs from the {num(majority)} of {counts[majority]} other BN layers{detail}"
                + ("; harmless here: the variances dwarf both values" if harmless else ""),
                layer=layer.name,
                values={"eps": eps, "majority_eps": majority, "max_gain_change": change},
                severity=Severity.INFO if harmless else None,
            )


@rule(
    code="BN307",
    reads=("keras-config",),
    name="training-options",
    severity=Severity.INFO,
    summary="Batch renormalisation, virtual batches or cross-device synchronisation change how training normalises.",
    fix="Nothing to fix at inference; when fine-tuning or judging small batches (BN604), use the batch size these options imply.",
)
def training_options(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Notes BatchNorm layers configured with options that change how *training* normalises:
    `renorm` (batch renormalisation, tf.keras 2), `virtual_batch_size` (statistics over
    sub-batches, tf.keras 2) and `synchronized` (statistics over all devices, Keras 3 /
    SyncBatchNormalization).

    ## Why is this bad?
    It is not wrong, but it changes what the stored statistics mean and what fine-tuning will
    do. In inference mode all three normalise with the moving statistics exactly like plain
    BatchNorm. In training, renorm corrects the batch statistics towards the moving ones (with
    clipped r and d), a virtual batch size makes each normalisation see only that many samples
    (the small-batch noise of BN604 applies at that size, not at the real batch size), and
    synchronisation pools statistics across devices (the per-device batch is then not the one
    that counts). A converter that drops these options trains a different model.

    ## Example
    `tf.keras.layers.BatchNormalization(virtual_batch_size=4)` in a model trained with batches
    of 64: every normalisation in training saw 4 samples.

    ## Use instead
    Keep the options when converting or fine-tuning; pass `--train-batch-size` equal to the
    virtual batch size when checking small-batch noise.

    ## References
    - Ioffe 2017, "Batch Renormalization".
    - TensorFlow docs: `tf.keras.layers.BatchNormalization` (`renorm`, `virtual_batch_size`).
    - Keras docs: `BatchNormalization` (`synchronized`).
    """
    if not layer.training_options:
        return
    shown = ", ".join(f"{key}={value!r}" for key, value in sorted(layer.training_options.items()))
    effects = []
    if layer.training_options.get("renorm"):
        effects.append("training corrects batch statistics towards the moving ones (batch renormalisation)")
    if layer.training_options.get("virtual_batch_size"):
        effects.append(f"training normalises over virtual batches of {layer.training_options['virtual_batch_size']} samples")
    if layer.training_options.get("synchronized"):
        effects.append("training pools batch statistics across devices")
    detail = "; ".join(effects) or "changes how training computes batch statistics"
    yield Hit(
        message=f"{shown}: {detail}; inference uses the moving statistics as usual",
        layer=layer.name,
        values={"options": dict(layer.training_options)},
    )


@rule(
    code="BN308",
    reads=("keras-config",),
    name="non-channel-axis",
    severity=Severity.INFO,
    summary="BatchNorm normalises along an axis that is not the data's channel axis.",
    fix="Normalise the channel axis: axis=-1 for channels-last data, axis=1 for channels-first.",
)
def non_channel_axis(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Notes BatchNorm layers whose `axis` is not the channel axis of the data they normalise, as
    far as the file shows it (Keras: the layer's `axis` against the model's `data_format` and the
    shape of the layer's input).

    ## Why is this bad?
    BatchNorm keeps one mean and variance per index of `axis` and pools everything else. On the
    channel axis that is one statistic per feature map, as intended. On another axis (a spatial
    one, say) it keeps one statistic per row of the image and pools the channels together, which
    is rarely what was meant; it has been seen in shipped models with `axis=[1]` on
    channels-last data, usually after a conversion from channels-first code.

    ## Example
    `BatchNormalization(axis=1)` after a `Conv2D` on `(batch, height, width, channels)` input.

    ## Use instead
    `BatchNormalization()` (axis=-1) for channels-last data; `axis=1` only for channels-first.

    ## References
    - Keras docs: `BatchNormalization` (`axis`: "the axis that should be normalized (typically
      the features axis)").
    """
    if layer.channel_axis is not False:
        return
    yield Hit(
        message=f"normalises axis {layer.axis}, which is not the channel axis of its input: one statistic per "
        "position along that axis, channels pooled together",
        layer=layer.name,
        values={"axis": layer.axis},
    )
