"""BN3xx: how each BatchNorm layer is configured (running-stat tracking, momentum, eps)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterator

import numpy as np

from bnlint.findings import Severity
from bnlint.model import BNLayer, ModelInfo
from bnlint.rules._util import TORCH_DEFAULT_EPS, num
from bnlint.rules.registry import Hit, rule

if TYPE_CHECKING:  # the engine imports the rules: a runtime import would be circular
    from bnlint.engine import RuleContext


def _has_buffers(layer: BNLayer) -> bool:
    return "running_mean" in layer.tensors or "running_var" in layer.tensors


@rule(
    code="BN301",
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
    if layer.is_known("momentum") and layer.momentum is None and layer.framework == "torch":
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
    summary="momentum looks like the other framework's convention (PyTorch 0.99 vs Keras 0.99 are opposites).",
    fix="PyTorch momentum = 1 - Keras/ONNX momentum: 0.99 in Keras is 0.01 in PyTorch.",
)
def unusual_momentum(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports a momentum whose weight on the *new* batch is at least `unusual_momentum` (default
    0.5), and (as info) a momentum of 0.

    ## Why is this bad?
    PyTorch updates `running = (1 - momentum) * running + momentum * batch` (default 0.1);
    Keras and ONNX update `moving = momentum * moving + (1 - momentum) * batch` (default 0.99 /
    0.9). Copying 0.99 from Keras into PyTorch makes the running statistics follow the last
    batch almost entirely, so they are as noisy as a single batch. Momentum 0 freezes the
    statistics in train mode — common in converted models, harmless until someone fine-tunes.

    ## Example
    `nn.BatchNorm2d(64, momentum=0.99)` (seen in a shipped torchvision model, pytorch/vision#8250).

    ## Use instead
    `nn.BatchNorm2d(64, momentum=0.01)` for Keras' 0.99.

    ## References
    - pytorch/vision#8250 (MaxViT shipped momentum 0.99).
    - Lightning-AI/pytorch-lightning#14866.
    """
    if not layer.is_known("momentum") or layer.momentum is None:
        return
    momentum = float(layer.momentum)
    raw = layer.extra.get("raw_momentum")
    shown = f"momentum {num(momentum)}" if raw is None else f"ONNX momentum {num(float(raw))} (PyTorch {num(momentum)})"
    if momentum >= ctx.config.threshold("unusual_momentum"):
        yield Hit(
            message=f"{shown} weights each new batch by {momentum:.0%}: the running statistics follow the last batch "
            f"(Keras/ONNX convention pasted into PyTorch? PyTorch equivalent of Keras {num(momentum)} is {num(1 - momentum)})",
            layer=layer.name,
            values={"momentum": momentum, "raw_momentum": raw},
        )
    elif momentum == 0:
        yield Hit(
            message=f"{shown}: running statistics never change in train mode",
            layer=layer.name,
            values={"momentum": momentum, "raw_momentum": raw},
            severity=Severity.INFO,
        )


def _known_eps(model: ModelInfo) -> list[tuple[BNLayer, float]]:
    return [(layer, float(layer.eps)) for layer in model.layers if layer.is_known("eps") and layer.eps is not None and layer.eps > 0]


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
    summary="Every BatchNorm layer uses an eps other than the framework default 1e-5.",
    fix="Fine if the model was trained with it (Keras uses 1e-3); when converting weights, copy eps with them.",
    scope="model",
)
def eps_nondefault(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Notes models whose BatchNorm layers all share an eps other than 1e-5 (PyTorch's and ONNX's
    default), and measures how much each channel's gain would change with the default.

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
    if len(values) == 1 and not np.isclose(next(iter(values)), TORCH_DEFAULT_EPS, rtol=1e-6, atol=0):
        eps = next(iter(values))
        changes = [c for layer, _ in known if (c := _scale_change(layer, eps, TORCH_DEFAULT_EPS)) is not None]
        worst = max(changes) if changes else None
        detail = f"; with eps 1e-05 instead, channel gains would change by up to {worst:.1%}" if worst is not None else ""
        yield Hit(message=f"all {len(known)} BN layers use eps {num(eps)} (default 1e-05){detail}", values={"eps": eps, "max_gain_change": worst})


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
    and the gain change each would see with the majority value.

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
            yield Hit(
                message=f"eps {num(eps)} differs from the {num(majority)} of {counts[majority]} other BN layers{detail}",
                layer=layer.name,
                values={"eps": eps, "majority_eps": majority, "max_gain_change": change},
            )
