"""BN1xx: health of the stored statistics and affine parameters of each BatchNorm layer."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from bnlint.context import RuleContext
from bnlint.conventions import conventions
from bnlint.findings import Severity, reestimate
from bnlint.model import BN_TENSORS, BNLayer
from bnlint.rules._util import channel_text, channels, eps_of, num, tname
from bnlint.rules._util import median as median_of
from bnlint.rules.registry import Hit, rule

FP16_MAX = 65504.0
HALF_DTYPES = ("float16", "bfloat16")
# A channel whose running variance is at most this fraction of eps (or a float32 subnormal, or 0)
# saw a constant input (a dead ReLU upstream): eps alone sets its gain, so it is dead, not an outlier.
DEAD_VAR_EPS_FRACTION = 1e-2
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # below it a float32 is subnormal


def dead_by_variance(layer: BNLayer) -> np.ndarray | None:
    """Channels whose running_var is ~0 next to eps (or subnormal / exactly 0): a constant input.

    With eps = 0 only exactly 0 and subnormal variances count; BN103 judges those (0/0 at inference).
    """
    var = layer.array("running_var")
    if var is None or layer.stats_updated is False:  # never-updated statistics measure nothing (BN104)
        return None
    limit = max(eps_of(layer) * DEAD_VAR_EPS_FRACTION, FLOAT32_TINY)
    return np.isfinite(var) & (var >= 0) & (var < limit)


def half_precision_reason(layer: BNLayer, ctx: RuleContext) -> str | None:
    """Why this layer runs in half precision (stored so, or deploy-precision), or None: float32."""
    stored = sorted({d for t in BN_TENSORS if (d := layer.dtype(t)) in HALF_DTYPES})
    if stored:
        return f"its tensors are stored in {'/'.join(stored)}"
    if ctx.config.deploys_in_half():
        return f"deploy-precision is {ctx.config.deploy_precision}"
    return None


def _deployment_note(reason: str | None) -> str:
    if reason is not None:
        return f" ({reason})"
    return " (the file is float32 and deploy-precision is float32: only a half-precision deployment is affected; " \
        "--deploy-precision float16 makes this a warning)"


@rule(
    code="BN101",
    name="nonfinite-stats",
    severity=Severity.ERROR,
    summary="A BatchNorm tensor holds NaN or Inf.",
    fix=reestimate("Find the overflow (often fp16/AMP) that produced it, then re-estimate the statistics on training "
                   "data: ", data="TRAIN_SAMPLE"),
)
def nonfinite_stats(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Checks `weight`, `bias`, `running_mean` and `running_var` of every BatchNorm layer for NaN
    and infinite values.

    ## Why is this bad?
    In eval mode BatchNorm computes `(x - running_mean) / sqrt(running_var + eps) * weight + bias`
    for every sample: one NaN channel turns that channel of every output into NaN, and the NaN
    spreads through every later layer. Running statistics typically become NaN when a train-mode
    forward pass overflowed under mixed precision: the update `(1 - momentum) * old + momentum * batch`
    keeps the NaN forever.

    ## Example
    `running_var[3] = nan` after an AMP step that overflowed.

    ## Use instead
    Fix the overflow (keep BatchNorm in float32, check the loss scaler), then recompute the
    running statistics over training data: `bnlint fix MODEL --data TRAIN_SAMPLE -o FIXED`, or
    in PyTorch `torch.optim.swa_utils.update_bn(loader, model)` (Keras 3: see BN601).

    ## References
    - pytorch/pytorch#90342 and #96798 (NaN running statistics under AMP).
    - timgaripov/swa#8.
    """
    counts = {}
    parts = []
    for tensor in BN_TENSORS:
        values = layer.array(tensor)
        if values is None:
            continue
        nan, inf = np.isnan(values), np.isinf(values)
        if nan.any() or inf.any():
            counts[tensor] = {"nan": int(nan.sum()), "inf": int(inf.sum()), "channels": channels(nan | inf, limit=16)}
            parts.append(f"{tname(layer, tensor)} has {int(nan.sum())} NaN and {int(inf.sum())} Inf (channels {channel_text(nan | inf)})")
    if counts:
        yield Hit(message="; ".join(parts), layer=layer.name, values={"tensors": counts})


@rule(
    code="BN102",
    name="negative-running-var",
    severity=Severity.ERROR,
    summary="running_var holds negative values.",
    fix=reestimate("A variance can never be negative: re-estimate the statistics on training data: ", data="TRAIN_SAMPLE"),
)
def negative_running_var(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Finds channels whose stored running variance is below zero.

    ## Why is this bad?
    A variance is never negative. `sqrt(running_var + eps)` of a negative number below `-eps`
    is NaN, so the channel outputs NaN in eval mode; just above `-eps` it divides by a tiny
    number. Negative variances come from corrupted files, bad weight conversion or averaging
    bugs, never from BatchNorm itself.

    ## Example
    `running_var[0] = -0.5`.

    ## Use instead
    Re-estimate the statistics over training data: `bnlint fix MODEL --data TRAIN_SAMPLE -o FIXED`,
    or in PyTorch `torch.optim.swa_utils.update_bn` (Keras 3: see BN601).

    ## References
    - pytorch/vision#2599 (invalid variances in converted checkpoints).
    """
    var = layer.array("running_var")
    if var is None:
        return
    negative = var < 0
    if negative.any():
        yield Hit(
            message=f"{tname(layer, 'running_var')} is negative in {int(negative.sum())} of {var.size} channels "
            f"(channels {channel_text(negative)}; min {num(float(var[negative].min()))})",
            layer=layer.name,
            values={"count": int(negative.sum()), "min": float(var[negative].min()), "channels": channels(negative, 16)},
        )


@rule(
    code="BN103",
    name="near-zero-variance",
    severity=Severity.ERROR,
    summary="running_var + eps is so close to zero that the channel blows up at inference.",
    fix="Use eps >= 1e-5 and keep BatchNorm buffers in float32; re-estimate the statistics.",
)
def near_zero_variance(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Finds channels where `running_var + eps` (the denominator of eval-mode BatchNorm) is below
    the `min_var_plus_eps` threshold (default 1e-8, i.e. a gain above 1e4 per unit of gamma).

    ## Why is this bad?
    In eval mode each channel is multiplied by `weight / sqrt(running_var + eps)`. With `eps=0`
    and a variance that is zero (a dead ReLU upstream), denormal, or underflowed in fp16, that
    factor is huge or infinite: any input that differs from `running_mean` becomes Inf or NaN.
    A dead channel (variance ~1e-36, subnormal or 0: a constant input) with a normal eps is not
    reported: `var + eps` is then about eps and the gain is bounded by `1/sqrt(eps)`.

    ## Example
    `BatchNorm2d(64, eps=0)` with `running_var[7] = 0.0`.

    ## Use instead
    Keep `eps` at PyTorch's default 1e-5 (or the value the model was trained with), store
    BatchNorm buffers in float32, and re-estimate statistics after any conversion.

    ## References
    - pytorch/vision#2599 and PR #1947 (eps and zero variances in detection models).
    """
    var = layer.array("running_var")
    if var is None:
        return
    eps = eps_of(layer)
    denominator = var + eps
    tiny = np.isfinite(denominator) & (var >= 0) & (denominator < ctx.config.threshold("min_var_plus_eps"))
    if tiny.any():
        smallest = float(denominator[tiny].min())
        yield Hit(
            message=f"{tname(layer, 'running_var')} + eps is below {num(ctx.config.threshold('min_var_plus_eps'))} in "
            f"{int(tiny.sum())} channels (channels {channel_text(tiny)}; min {num(smallest)} with eps {num(eps)})",
            layer=layer.name,
            values={"count": int(tiny.sum()), "min_var_plus_eps": smallest, "eps": eps, "channels": channels(tiny, 16)},
        )


def _is_default_stats(layer: BNLayer) -> bool:
    mean, var = layer.array("running_mean"), layer.array("running_var")
    return mean is not None and var is not None and bool(np.all(mean == 0) and np.all(var == 1))


@rule(
    code="BN104",
    name="stats-never-updated",
    severity=Severity.ERROR,
    summary="Running statistics are still at their initial values (mean 0, var 1).",
    fix=reestimate("Re-estimate the statistics on training data: ", data="TRAIN_SAMPLE"),
)
def stats_never_updated(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Finds layers whose `running_mean` is exactly all zeros and `running_var` exactly all ones:
    the values `reset_running_stats()` sets, which no real data produces. It looks at the values,
    not at `num_batches_tracked` (converted and old checkpoints carry genuine statistics with a
    counter of 0).

    ## Why is this bad?
    In eval mode BatchNorm normalises with these stored values. If the weights were trained
    with batch statistics but the running statistics were never updated (training code that
    never ran BN in train mode, weights copied without buffers, a fresh `AveragedModel`), every
    inference normalises with mean 0 / var 1 instead of the real activation statistics and the
    outputs are wrong, although training accuracy looked fine.

    ## Example
    A layer with trained `weight`/`bias` but `running_mean == 0`, `running_var == 1`,
    `num_batches_tracked == 0`.

    ## Use instead
    Estimate the statistics on training data: `bnlint fix MODEL --data TRAIN_SAMPLE -o FIXED`,
    or in PyTorch `torch.optim.swa_utils.update_bn(train_loader, model)` (or fvcore's precise
    BN), then save again (Keras 3: see BN601). A layer whose weights are also at initial values
    is simply untrained (reported as a warning).

    ## References
    - cleinc/bts#90; PyTorch forums, "running_mean and running_var are all zeros / ones".
    - `torch.optim.swa_utils.update_bn` documentation.
    """
    if layer.is_known("track_running_stats") and layer.track_running_stats is False:
        return
    mean, var = tname(layer, "running_mean"), tname(layer, "running_var")
    counter = "" if layer.num_batches_tracked is None and layer.framework != "torch" else \
        f"; num_batches_tracked {'absent' if layer.num_batches_tracked is None else layer.num_batches_tracked}"
    if layer.stats_updated is False:  # the format itself records it (Caffe: scale factor 0)
        yield Hit(
            message=f"the statistics were never updated ({layer.stats_note or 'the file records no update'}): "
            f"inference normalises with mean 0 and variance 0 + eps instead of the data's statistics",
            layer=layer.name,
            values={"num_batches_tracked": layer.num_batches_tracked, "weights_trained": None},
        )
        return
    if not _is_default_stats(layer):
        return
    weight, bias = layer.array("weight"), layer.array("bias")
    trained = (weight is not None and not np.all(weight == 1)) or (bias is not None and not np.all(bias == 0))
    if trained:
        yield Hit(
            message=f"{mean} is all 0 and {var} all 1 (never updated{counter}) "
            f"while {tname(layer, 'weight')}/{tname(layer, 'bias')} are trained: inference normalises with the wrong statistics",
            layer=layer.name,
            values={"num_batches_tracked": layer.num_batches_tracked, "weights_trained": True},
        )
    else:
        yield Hit(
            message=f"layer is entirely at its initial values ({mean}/{var} 0/1, {tname(layer, 'weight')} 1, "
            f"{tname(layer, 'bias')} 0{counter}): the model looks untrained",
            layer=layer.name,
            values={"num_batches_tracked": layer.num_batches_tracked, "weights_trained": False},
            severity=Severity.WARNING,
        )


@rule(
    code="BN105",
    reads=("counter",),
    name="few-stat-updates",
    severity=Severity.INFO,
    summary="The running statistics were updated by very few batches.",
    fix=reestimate("Re-estimate the statistics over many batches (~200) of training data: ", data="TRAIN_SAMPLE"),
)
def few_stat_updates(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports layers whose `num_batches_tracked` is positive but below the `few_updates` threshold
    (default 20), and says how much of the initial values (mean 0, var 1) would still be mixed
    into the stored statistics if they were running averages. The finding is information, with
    both readings, whatever the container: the count alone cannot tell running averages from a
    cumulative average (`update_bn` and precise BN leave the number of batches they averaged,
    and `update_bn` restores the module's momentum afterwards, so a pickled module or TorchScript
    file with momentum 0.1 says no more than a state dict).

    It is not reported when the statistics cannot be `n` momentum updates from the initial
    values: after `n` updates with momentum `m`, `running_var` is a convex combination of the
    initial 1 (weight `(1 - m)**n`) and non-negative batch variances, so it is at least
    `(1 - m)**n` in every channel. A channel below that (say 0.2 after 8 updates, where
    `0.9**8 = 0.43`) shows that the statistics came from elsewhere: a re-estimation, or training
    that started from pretrained statistics with a reset counter.

    ## Why is this bad?
    With PyTorch's default `momentum=0.1` each train-mode batch moves the running statistics
    10% of the way to the batch's statistics, so after k batches the initial values still weigh
    `0.9**k` (35% after 10, 12% after 20). The stored statistics are then a mix of arbitrary
    initial values and the noise of a few batches.

    ## Example
    A checkpoint saved after 3 training steps: `num_batches_tracked == 3` and every
    `running_var` at least `0.9**3 = 0.73`.

    ## Use instead
    Train longer, or estimate the population statistics directly:
    `bnlint fix MODEL --data TRAIN_SAMPLE -o FIXED`, or in PyTorch
    `torch.optim.swa_utils.update_bn` (cumulative average over a whole loader; Keras 3: see BN601).

    ## References
    - Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm" (precise BN).
    """
    count = layer.num_batches_tracked
    if count is None or count <= 0 or count >= ctx.config.threshold("few_updates") or _is_default_stats(layer):
        return
    own = conventions(layer.framework)
    default = own.torch_momentum(own.default_momentum) if own.default_momentum is not None else 0.1
    momentum = layer.momentum if layer.is_known("momentum") else default
    if momentum is None:  # cumulative average: the initial values are gone after the first batch
        yield Hit(
            message=f"running statistics are the cumulative average of only {count} batches (num_batches_tracked {count}, "
            "momentum None)",
            layer=layer.name, values={"num_batches_tracked": count, "initial_weight": 0.0},
        )
        return
    leftover = (1.0 - float(momentum)) ** count
    var = layer.array("running_var")
    if var is not None and _below_ema_floor(var, leftover):
        return  # not n momentum updates from the initial values: a re-estimation, or a reset counter
    yield Hit(
        message=f"num_batches_tracked is only {count}: if these are running averages with momentum {num(float(momentum))} "
        f"from the initial values, those (mean 0, var 1) still make up {leftover:.0%} of them; if they were re-estimated as a "
        f"cumulative average (update_bn, precise BN), they average {count} batches",
        layer=layer.name, values={"num_batches_tracked": count, "initial_weight": leftover},
    )


def _below_ema_floor(var: np.ndarray, floor: float) -> bool:
    """Whether some channel's variance is below what n EMA updates from var=1 can leave (float32 slack)."""
    finite = var[np.isfinite(var)]
    return bool(finite.size and finite.min() < floor * (1.0 - 1e-4))


@rule(
    code="BN106",
    name="variance-outlier",
    severity=Severity.WARNING,
    summary="A channel's running_var is orders of magnitude away from the rest of its layer.",
    fix="Check the data and the conversion that produced these statistics; re-estimate them on training data.",
)
def variance_outlier(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Compares each channel's running variance with the median over the layer's live channels
    and reports live channels more than `variance_outlier_ratio` (default 1e4) times above or
    below it. Dead channels are left to BN108 and kept out of the median: `|weight| <= dead_gamma`,
    or a variance that is ~0 next to eps (at most 1% of eps, a float32 subnormal, or exactly 0).
    Such a channel saw a constant input (a dead ReLU upstream); eps alone sets its gain, so it is
    harmless, and a layer where most channels are dead must not make its live channels look odd.
    For the same reason a variance far below the median counts only when it is above eps: below
    eps, eps and not the variance sets the channel's gain, which is then no larger than any
    channel's of a layer with that eps.

    ## Why is this bad?
    Channels of one layer see activations of similar scale; a variance 10,000 times the median
    usually means a corrupted buffer, a single exploding batch caught by the running average,
    or a unit mismatch in a conversion. At inference such a channel is squashed to ~0 (or, far
    below the median, amplified).

    ## Example
    `running_var = [0.9, 1.1, 1.0, 2.3e6]`.

    ## Use instead
    Re-estimate the statistics on clean training data; inspect the data pipeline for outliers.

    ## References
    - Xilinx/brevitas#388 (extreme BN statistics break quantisation).
    """
    var = layer.array("running_var")
    dead = dead_by_variance(layer)
    if var is None or dead is None or var.size < 4:
        return
    weight = layer.array("weight")
    live = np.isfinite(var) & (var > 0) & ~dead  # the reference scale comes from live channels only
    if weight is not None and weight.size == var.size:
        live &= np.abs(weight) > ctx.config.threshold("dead_gamma")
    if live.sum() < 4:
        return
    median = median_of(var[live])
    ratio = ctx.config.threshold("variance_outlier_ratio")
    # Below eps a channel's gain is set by eps (|gamma|/sqrt(var + eps) <= |gamma|/sqrt(eps)), so a
    # tiny variance there is a quiet channel, not an amplified one (a PaddleOCR layout model ships
    # 1.7e-7 next to eps 1e-5 in a layer whose median is 0.013).
    low = (var < median / ratio) & (var > eps_of(layer))
    outlier = live & ((var > median * ratio) | low)
    if outlier.any():
        worst = int(np.flatnonzero(outlier)[np.argmax(np.abs(np.log(var[outlier] / median)))])
        yield Hit(
            message=f"{tname(layer, 'running_var')} of {int(outlier.sum())} channels is more than {num(ratio)}x away from the layer "
            f"median {num(median)} (channels {channel_text(outlier)}; worst channel {worst}: {num(float(var[worst]))})",
            layer=layer.name,
            values={"median": median, "count": int(outlier.sum()), "channels": channels(outlier, 16), "worst": float(var[worst])},
        )


@rule(
    code="BN107",
    name="variance-overflows-fp16",
    severity=Severity.WARNING,
    summary="running_var exceeds 65504 and becomes Inf when the model is cast to half precision.",
    fix="Keep BatchNorm in float32 (model.half() excluding BN, or autocast), or fold BN in float32 before casting.",
)
def variance_overflows_fp16(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Finds running variances larger than 65504, the largest finite float16 value. It is a
    warning when the layer runs in half precision: its tensors are stored in float16/bfloat16, or
    `deploy-precision` (`--deploy-precision`) is float16 or bfloat16; in a float32 model deployed
    in float32 the value is fine and the finding is information.

    ## Why is this bad?
    `model.half()` casts BatchNorm buffers too: those variances become `+inf`, the channel's
    gain `1/sqrt(inf)` becomes 0 and the channel is silently zeroed at inference. Converted
    models legitimately carry variances up to ~5e5, so the file is fine in float32 — the cast is
    what breaks it.

    ## Example
    `running_var[12] = 3.1e5` in a layer of a model deployed with `.half()`.

    ## Use instead
    Keep BatchNorm in float32 under mixed precision, or fold BN into the preceding convolution
    in float32 before casting.

    ## References
    - Keras casts BatchNorm inputs to float32 for this reason (mixed precision guide).
    """
    var = layer.array("running_var")
    if var is None:
        return
    big = np.isfinite(var) & (var > FP16_MAX)
    if big.any():
        half = half_precision_reason(layer, ctx)
        yield Hit(
            message=f"{tname(layer, 'running_var')} exceeds the float16 maximum 65504 in {int(big.sum())} channels "
            f"(channels {channel_text(big)}; max {num(float(var[big].max()))}): a half-precision cast makes them Inf"
            + _deployment_note(half),
            layer=layer.name,
            values={"count": int(big.sum()), "max": float(var[big].max()), "channels": channels(big, 16), "half_precision": half is not None},
            severity=None if half is not None else Severity.INFO,
        )


@rule(
    code="BN108",
    name="dead-channels",
    severity=Severity.INFO,
    summary="Channels whose BatchNorm weight (gamma) is ~0, or whose running variance is ~0 next to eps, output a constant.",
    fix="Prune the channels, or check whether weight decay / L1 sparsity drove them to zero on purpose.",
)
def dead_channels(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Counts channels with `|weight| <= dead_gamma` (default 1e-6), and channels whose running
    variance is ~0 next to eps (at most 1% of eps, a float32 subnormal, or exactly 0; with
    `eps = 0` that is BN103's error instead).

    ## Why is this bad?
    A zero-gamma channel outputs `bias` whatever its input: it carries no information. That is
    often deliberate (network slimming prunes by `|gamma|`), but a large share of dead channels
    can also mean a dead ReLU upstream or a broken initialisation. A channel whose variance is ~0
    saw a constant input (typically a dead ReLU upstream): real networks have many, and they are
    harmless because eps keeps `1/sqrt(var + eps)` finite. Drift metrics weight channels by
    `|gamma|` for the same reason.

    ## Example
    `weight[[3, 9, 17]] == 0.0`.

    ## Use instead
    Prune the channels (and the matching filters of the preceding convolution) or investigate
    why they died.

    ## References
    - Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming".
    - Eric-mingjie/rethinking-network-pruning#50.
    """
    weight = layer.array("weight")
    zero_gamma = None if weight is None else np.isfinite(weight) & (np.abs(weight) <= ctx.config.threshold("dead_gamma"))
    constant = dead_by_variance(layer)
    if constant is not None and weight is not None and constant.size != weight.size:
        constant = None  # mismatched shapes are BN2xx's; count by gamma only
    if constant is not None and eps_of(layer) <= 0:
        constant = None  # with eps = 0 a zero variance is BN103's error, not a harmless dead channel
    parts = []
    if zero_gamma is not None and zero_gamma.any():
        parts.append(f"{int(zero_gamma.sum())} of {zero_gamma.size} channels have |{tname(layer, 'weight')}| <= "
                     f"{num(ctx.config.threshold('dead_gamma'))} (channels {channel_text(zero_gamma)})")
    if constant is not None and constant.any():
        parts.append(f"{int(constant.sum())} of {constant.size} channels have {tname(layer, 'running_var')} ~0 next to eps "
                     f"(a constant input, e.g. a dead ReLU upstream; channels {channel_text(constant)})")
    if parts:
        dead = (zero_gamma if zero_gamma is not None else False) | (constant if constant is not None else False)
        yield Hit(
            message=f"{'; '.join(parts)}: they output a constant",
            layer=layer.name,
            values={"count": int(np.sum(dead)), "channels": channels(np.asarray(dead), 64),
                    "zero_gamma": 0 if zero_gamma is None else int(zero_gamma.sum()),
                    "constant_input": 0 if constant is None else int(constant.sum())},
        )


@rule(
    code="BN109",
    name="scale-overflow",
    severity=Severity.WARNING,
    summary="The effective gain |weight|/sqrt(running_var + eps) is so large that folding or fp16 overflows.",
    fix="Fold BN in float32, use per-channel quantisation, and check the tiny variances behind the gain.",
)
def scale_overflow(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Computes each channel's effective gain `|weight| / sqrt(running_var + eps)` and reports
    channels above `max_scale` (default 1e4). Like BN107 it is a warning when the layer runs in
    half precision (tensors stored in float16/bfloat16, or `deploy-precision` float16/bfloat16),
    and information for a float32 model deployed in float32, where the gain is representable.
    Near-zero `var + eps` itself is BN103's error whatever the precision.

    ## Why is this bad?
    Folding BatchNorm into the preceding convolution multiplies that convolution's filter by the
    gain. A gain of 1e4 on a filter weight of 10 already exceeds float16's 65504, and per-tensor
    int8 quantisation loses every other channel to that one channel's range.

    ## Example
    `weight[5] = 50`, `running_var[5] = 1e-9`, `eps = 1e-12`: gain 1.6e6.

    ## Use instead
    Fold in float32, quantise per channel, and find out why the variance is so small (BN103).

    ## References
    - Xilinx/brevitas#388.
    """
    var = layer.array("running_var")
    if var is None:
        return
    weight = layer.array("weight")
    gamma = np.ones_like(var) if weight is None or weight.size != var.size else np.abs(weight)
    denominator = var + eps_of(layer)
    usable = np.isfinite(denominator) & (denominator > 0) & np.isfinite(gamma)
    gain = np.zeros_like(var)
    gain[usable] = gamma[usable] / np.sqrt(denominator[usable])
    big = gain > ctx.config.threshold("max_scale")
    if big.any():
        half = half_precision_reason(layer, ctx)
        yield Hit(
            message=f"effective gain |{tname(layer, 'weight')}|/sqrt({tname(layer, 'running_var')} + eps) exceeds {num(ctx.config.threshold('max_scale'))} in "
            f"{int(big.sum())} channels (channels {channel_text(big)}; max {num(float(gain.max()))}): folded into the preceding "
            f"weights it overflows float16" + _deployment_note(half),
            layer=layer.name,
            values={"count": int(big.sum()), "max_gain": float(gain.max()), "channels": channels(big, 16), "half_precision": half is not None},
            severity=None if half is not None else Severity.INFO,
        )
