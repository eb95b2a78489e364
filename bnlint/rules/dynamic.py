"""BN6xx: what running the model on the user's data (--data) shows about each BatchNorm layer.

The subject of these rules is `bnlint.measurements.Measurements`; the thresholds are the
[tool.bnlint.dynamic] settings (defaults in bnlint.settings.DYNAMIC_DEFAULTS). Nothing here
imports torch.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from bnlint.context import RuleContext
from bnlint.findings import Severity, reestimate
from bnlint.measurements import GROUPS, LayerDrift, Measurements
from bnlint.rules._util import num
from bnlint.rules.registry import Hit, rule

# Over many batches, never from one small batch: `bnlint fix` first, then the framework's own way.
REESTIMATE = reestimate("If the data is the deployment domain (never from one small batch): ",
                        ". If it should be in-domain, check its preprocessing first.")


def _judgeable(layer: LayerDrift) -> bool:
    """Enough independent samples to estimate the noise at all: one per jackknife group.

    Values within one sample are correlated (neighbouring positions of a feature map), so the
    independent units are samples, not values; with fewer than GROUPS samples the jackknife
    standard error has too few degrees of freedom to be trusted, in any architecture.
    """
    return layer.summary.groups >= GROUPS and nonfinite_channels(layer) < layer.channels


def nonfinite_channels(layer: LayerDrift) -> int:
    """Channels whose input, measured on the data, has an Inf or NaN mean or variance (BN608)."""
    if layer.mean_t.size == 0 or layer.var_t.size == 0:
        return 0
    return int(np.count_nonzero(~(np.isfinite(layer.mean_t) & np.isfinite(layer.var_t))))


def _drifting(analysis: Measurements) -> list[LayerDrift]:
    """Layers that drift from the data (BN601): over the noise floor and not a variance shift (BN607)."""
    shifted = {layer.name for layer in _variance_shifted(analysis)}
    return [layer for layer in _over_noise(analysis) if layer.name not in shifted]


# A first-layer mean shift this many standard deviations wide is a preprocessing mismatch, not a domain.
UNNORMALISED_SMD = 10.0

# Variance shift (BN607): the data's variance is below the stored one in nearly every channel of a
# layer, by more than its mean moves, from some layer on, with every earlier layer clean.
SHIFT_CHANNELS = 0.9  # share of channels with log variance ratio < 0
SHIFT_DOMINANCE = 2.0  # mean |LVR| at least this many times mean |SMD|


def _one_sided(layer: LayerDrift) -> bool:
    if layer.per_channel is None:
        return False
    lvr, smd = layer.per_channel.lvr, layer.per_channel.smd
    finite = np.isfinite(lvr) & np.isfinite(smd)
    if not finite.any():
        return False
    low = float(np.mean(lvr[finite] < 0))
    return low >= SHIFT_CHANNELS and float(np.mean(np.abs(lvr[finite]))) >= SHIFT_DOMINANCE * float(np.mean(np.abs(smd[finite])))


def _variance_shifted(analysis: Measurements) -> list[LayerDrift]:
    """Over-noise layers explained by variance shift: the first over-noise layer is not the first
    BN layer (earlier layers are clean, so the input is not to blame), and from there on every
    over-noise layer's variance ratio is one-sided (eval variance below the stored one)."""
    over = _over_noise(analysis)
    judged = [layer for layer in analysis.layers if layer.has_running_stats and _judgeable(layer)]
    if not over or not judged or min(x.order for x in over) <= min(x.order for x in judged):
        return []
    return over if all(_one_sided(layer) for layer in over) else []


def _over_noise(analysis: Measurements) -> list[LayerDrift]:
    """Layers whose drift is large (drift_kl) and stands above the sample's noise floor (drift_significance)."""
    settings = analysis.settings
    found = []
    for layer in analysis.layers:
        s = layer.summary
        if not layer.has_running_stats or layer.name in analysis.batch_stats_layers or not _judgeable(layer):
            continue
        kl, noise, se = s.mean_kl, s.noise_kl, s.kl_se
        if kl is None or noise is None or se is None:
            continue
        # large, far above what noise alone gives, and more than drift_z standard errors above it: channels of
        # one layer are correlated, so the floor's expectation alone is not enough for small samples
        if kl >= settings.drift_kl and kl >= settings.drift_significance * noise and kl - noise >= settings.drift_z * se:
            found.append(layer)
    return found


@rule(
    code="BN601",
    reads=("run",),
    name="distribution-drift",
    severity=Severity.WARNING,
    summary="The layer's input on the given data differs from its stored running statistics.",
    fix=REESTIMATE,
    scope="dynamic",
)
def distribution_drift(analysis: Measurements, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Runs the model in eval mode over the `--data` sample and measures, per channel of every
    BatchNorm layer, the mean and variance of the layer's input over samples and spatial
    positions. It compares them with the stored `running_mean` / `running_var`
    (v = variance + eps):

    - SMD = (mean - running_mean) / sqrt(v_stored): the mean of the normalised activation;
    - LVR = ln(v_data / v_stored): the log of its variance;
    - KL = 0.5 * (e^LVR - LVR - 1 + SMD^2): the Gaussian KL divergence.

    A layer is reported when its mean KL over channels is at least `drift-kl` (default 0.05),
    at least `drift-significance` (default 4) times the KL the sample shows from noise alone, and
    above that noise floor by `drift-z` (default 3) jackknife standard errors (both from K=8
    interleaved groups of whole samples), so a small sample does not raise false alarms.
    Layers that normalise with batch statistics anyway (BN606) are left to that rule.

    ## Why is this bad?
    In eval mode BatchNorm only *reads* its running statistics: every input is normalised with
    the training data's mean and variance. When the data the model now sees has other statistics
    (another camera, lighting, corruption, preprocessing), the normalised activations are shifted
    and rescaled in every channel, and the error compounds through the network. Re-estimating
    BatchNorm statistics on the target domain recovers much of the loss: ResNet-50 on ImageNet-C
    goes from 76.7 to 62.2 mCE (Schneider et al. 2020); WRN-28-10 on CIFAR-10-C (severity 5)
    from 43.5% to 20.4% error.

    ## Example
    A classifier trained on normalised images, fed images scaled to [0, 255] instead of
    standardised: the first BatchNorm sees inputs with a mean shift of dozens of standard
    deviations (SMD >> 1), and every later layer inherits the drift.

    ## Use instead
    First rule out a preprocessing mismatch (the most common cause of drift in the first layer).
    If the data really is the deployment domain, re-estimate the statistics on it over many
    batches (AdaBN): `bnlint fix MODEL --data TARGET -o FIXED` does it for PyTorch, ONNX and
    Keras files and checks the result. In the training framework: PyTorch
    `torch.optim.swa_utils.update_bn(loader, model)` (it resets the statistics and uses a
    cumulative average); Keras 3: call `model(batch, training=True)` over the data with every
    BatchNormalization trainable and its `momentum` set to k/(k+1) before batch k (k = 0, 1,
    ...), a cumulative average (Keras updates moving = moving * momentum + batch * (1 - momentum));
    ONNX: re-estimate in the source framework and export again. Do not normalise with the statistics of a single
    small test batch: with tiny or non-i.i.d. batches that degrades accuracy further.

    ## References
    - Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation" (AdaBN).
    - Schneider et al. 2020, "Improving robustness against common corruptions by covariate shift adaptation".
    - Wang et al. 2021, "Tent: Fully Test-Time Adaptation by Entropy Minimization".
    - Zhao et al. 2023 (DELTA) and Lim et al. 2023 (TTN), ICLR: test-time BN with small or non-i.i.d. batches.
    """
    for layer in _drifting(analysis):
        s, kl = layer.summary, layer.per_channel.kl if layer.per_channel is not None else np.empty(0)
        over = sum(1 for v in kl if v > analysis.settings.drift_kl)
        worst, mean_kl, noise_kl = s.max_channel, s.mean_kl, s.noise_kl
        ratio = num(mean_kl / noise_kl) if mean_kl is not None and noise_kl else "inf"
        yield Hit(
            message=f"input statistics on the data differ from the stored running statistics: mean KL {num(s.mean_kl)} "
            f"(mean |SMD| {num(s.mean_abs_smd)}, mean |log var ratio| {num(s.mean_abs_lvr)}; "
            f"{over} of {layer.channels} channels over {num(analysis.settings.drift_kl)}; worst channel {worst}, KL {num(s.max_kl)}), "
            f"{ratio}x the noise floor of {layer.samples} samples; "
            "eval mode normalises with the stored statistics, so this layer's output is shifted and rescaled",
            layer=layer.name,
            values={"mean_kl": s.mean_kl, "max_kl": s.max_kl, "mean_abs_smd": s.mean_abs_smd, "max_abs_smd": s.max_abs_smd,
                    "mean_abs_lvr": s.mean_abs_lvr, "max_abs_lvr": s.max_abs_lvr, "noise_kl": s.noise_kl,
                    "channels_over": over, "channels": layer.channels, "samples": layer.samples, "worst_channel": worst},
        )


@rule(
    code="BN602",
    reads=("run",),
    name="drift-onset",
    severity=Severity.INFO,
    summary="The first BatchNorm layer, in execution order, where the data drifts from the stored statistics.",
    fix=reestimate("Look at the data's preprocessing and the layers before this one (later layers inherit the drift); "
                   "if the domain really differs: "),
    scope="dynamic",
)
def drift_onset(analysis: Measurements, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Among the layers reported by BN601, names the first one in execution (graph) order.

    ## Why is this bad?
    Drift propagates: once one layer normalises with the wrong statistics, every layer after it
    sees shifted inputs too, so a list of drifting layers mostly repeats one cause. The first
    drifting layer says where that cause is: at the first BatchNorm it is nearly always the
    input itself (a different normalisation, channel order, value range or domain); deeper
    down, it points at the features that changed (textures, scale) or at the layers just before
    it (e.g. weights changed after the statistics were estimated).

    ## Example
    With data scaled by 2 and offset by 1, drift begins at `bn1`, the first BatchNorm.

    ## Use instead
    Start at this layer: compare the data pipeline with training's (mean/std normalisation,
    RGB vs BGR, NCHW vs NHWC, value range). If the input is right and the domain really differs,
    re-estimate the statistics on target-domain data over many batches (AdaBN): `bnlint fix
    MODEL --data TARGET -o FIXED`, or the framework's own way (BN601).

    ## References
    - Li et al. 2016 (AdaBN); Schneider et al. 2020 (covariate shift adaptation).
    """
    drifting = _drifting(analysis)
    if not drifting:
        return
    first = min(drifting, key=lambda layer: layer.order)
    shift = first.summary.mean_abs_smd or 0.0
    hint = ""
    if first.order == min(layer.order for layer in analysis.layers) and shift >= UNNORMALISED_SMD:
        hint = (f"; a shift of {num(shift)} standard deviations at the first BatchNorm usually means the data is not "
                "normalised as in training (raw 0-255 pixels? missing mean/std normalisation?)")
    yield Hit(
        message=f"drift begins here: the first of {len(drifting)} drifting BatchNorm layer(s) in execution order "
        f"(mean KL {num(first.summary.mean_kl)}); later layers inherit it, so look at the data and the layers before this one{hint}",
        layer=first.name,
        values={"drifting_layers": [layer.name for layer in drifting], "order": first.order, "unnormalised_hint": bool(hint)},
    )


@rule(
    code="BN607",
    reads=("run",),
    name="variance-shift",
    severity=Severity.WARNING,
    summary="From some layer on, the stored variances exceed what eval mode produces in nearly every channel: "
    "statistics estimated in train mode with dropout or stochastic depth active, not data drift.",
    fix="Re-estimate the statistics in eval mode on training-distribution data: `bnlint fix MODEL --data SAMPLE -o FIXED` "
    "(exact, layer by layer). torch.optim.swa_utils.update_bn cannot fix this: it estimates in train mode.",
    scope="dynamic",
)
def variance_shift(analysis: Measurements, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Tells variance shift apart from data drift. It reports when the layers over the noise floor
    (as BN601 measures it) start after the first BatchNorm (the early layers match the stored
    statistics, so the input is fine), and in every one of them the data's variance is below the
    stored variance in at least 90% of the channels while the means barely move (mean |log
    variance ratio| at least twice mean |SMD|). It names the dropout / stochastic-depth modules
    before those layers where the file shows them. Layers it explains are not reported as drift.

    ## Why is this bad?
    Dropout and stochastic depth are random in train mode and off in eval mode. Running
    statistics estimated in train mode (the usual EMA during training, or `update_bn`) include
    the extra variance those modules inject; eval mode never produces it, so every later
    BatchNorm over-normalises: its output variance is e^LVR < 1 of what the next layers were
    trained on (Li et al. 2019, "Understanding the Disharmony between Dropout and Batch
    Normalization by Variance Shift"). Measured on a torchvision EfficientNet-B0 with stochastic
    depth: early layers match to 0.001, later layers see e^-0.8 to e^-1.1 of the stored variance
    in every channel. The data is not the problem, so "look at the data" is the wrong advice, and
    `update_bn` re-estimates in train mode with the same modules active: the mismatch remains.

    ## Example
    An EfficientNet whose BatchNorm statistics were re-estimated with `update_bn` on its own
    training data, checked with `bnlint model.pt --arch ... --data train_sample.npz`.

    ## Use instead
    Re-estimate in eval mode, layer by layer: `bnlint fix model.pt --arch ... --data sample.npz
    -o fixed.pt` sets each BatchNorm's statistics to what eval mode feeds it, after the layers
    before it are fixed. Or move dropout after the last BatchNorm (Li et al.'s advice).

    ## References
    - Li, Chen, Hu & Yang 2019, "Understanding the Disharmony between Dropout and Batch Normalization by Variance Shift".
    - Huang et al. 2016, "Deep Networks with Stochastic Depth".
    - Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm" (precise BN in eval mode).
    """
    shifted = _variance_shifted(analysis)
    if not shifted:
        return
    first = min(shifted, key=lambda layer: layer.order)
    lvr = [float(np.nanmean(layer.per_channel.lvr)) for layer in shifted if layer.per_channel is not None]
    marked = [name for name in analysis.after_stochastic if name in {layer.name for layer in shifted}]
    if marked:
        cause = "dropout / stochastic depth runs before these layers in this model"
    else:
        cause = "no dropout module is visible in this file, but the pattern is that of one upstream (or of a nonlinearity change)"
    yield Hit(
        message=f"from here on ({len(shifted)} layer(s)) eval mode feeds each BatchNorm only e^{num(max(lvr))} to e^{num(min(lvr))} "
        f"of its stored variance in nearly every channel, while earlier layers match: a variance shift, not data drift "
        f"({cause}); the statistics were estimated in train mode. update_bn cannot fix it (it runs in train mode); "
        "`bnlint fix` re-estimates them in eval mode",
        layer=first.name,
        values={"layers": [layer.name for layer in shifted], "mean_lvr": lvr, "after_stochastic": marked},
    )


@rule(
    code="BN603",
    reads=("run",),
    name="sample-too-small",
    severity=Severity.INFO,
    summary="The data sample is too small to judge drift in some layers against its own noise.",
    fix="Run with more samples (the message estimates how many).",
    scope="dynamic",
)
def sample_too_small(analysis: Measurements, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Estimates each layer's noise floor: the KL divergence the sample would show between its
    statistics and the stored ones if there were no drift at all, from the jackknife standard
    errors of the per-channel mean and log variance. Where even drift at the `drift-kl`
    threshold could not be told from that noise (threshold < `drift-significance` x floor), or
    where fewer than 8 samples reached the layer, it says so instead of guessing, and no drift is
    judged there. The floor counts independent samples, not values: the values of one sample
    are spatially correlated, and the jackknife needs one sample in each of its 8 groups before
    its standard error means anything, whatever the architecture (a ResNet's 7x7 features and an
    EfficientNet's alike). Silence about a layer therefore always means "judged, and no drift".

    ## Why is this bad?
    Statistics of a few samples scatter: with 8 samples of 7x7 features the 95th percentile of
    |SMD| is about 0.1 with no shift at all, and real activations are spatially correlated, so
    the scatter is larger still. A drift report from such a sample would be noise, and silence
    would wrongly suggest the statistics fit.

    ## Example
    Four images through a ResNet: the deepest layers see 4 x 7 x 7 highly correlated values per
    channel, and their noise floor exceeds the drift threshold.

    ## Use instead
    Give more samples (hundreds are typical); the noise floor falls like 1/n.

    ## References
    - Efron & Stein 1981 (jackknife variance); Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm".
    """
    settings = analysis.settings
    limit = settings.drift_kl / max(settings.drift_significance, 1e-12)
    drifting = {layer.name for layer in _drifting(analysis)}
    unjudged = []
    for layer in analysis.layers:
        if not layer.has_running_stats or layer.name in drifting or layer.name in analysis.batch_stats_layers:
            continue
        if layer.channels and nonfinite_channels(layer) == layer.channels:
            continue  # nothing finite to judge: BN608 says why
        noise = layer.summary.noise_kl
        if noise is None or noise > limit or not _judgeable(layer):
            unjudged.append((math.inf if noise is None or not _judgeable(layer) else noise, layer))
    if not unjudged:
        return
    noise, worst = max(unjudged, key=lambda pair: pair[0])
    if math.isinf(noise):
        need = f"at least {GROUPS} samples"
        text = f"{worst.samples} sample(s) reached it, too few to estimate the noise (one per jackknife group)"
    else:
        need = f"about {int(math.ceil(analysis.samples * noise / limit))} samples"
        text = f"noise floor KL {num(noise)} > {num(limit)} (drift-kl / drift-significance)"
    yield Hit(
        message=f"the sample of {analysis.samples} is too small to judge drift in {len(unjudged)} of {len(analysis.layers)} "
        f"layer(s); worst here: {text}; {need} would do",
        layer=worst.name,
        values={"samples": analysis.samples, "layers": [layer.name for _, layer in unjudged],
                "noise_kl": None if math.isinf(noise) else noise, "limit": limit},
    )


@rule(
    code="BN604",
    reads=("run",),
    name="small-batch-noise",
    severity=Severity.WARNING,
    summary="At the training batch size, one batch's statistics stray far from the population's.",
    fix="Train with more values per channel per batch (larger batches, SyncBatchNorm across devices), or freeze BN "
    "(eval mode / FrozenBatchNorm2d) or use GroupNorm; then re-estimate running statistics over many batches "
    "(`bnlint fix MODEL --data TRAIN_SAMPLE -o FIXED`).",
    scope="dynamic",
)
def small_batch_noise(analysis: Measurements, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Given the training batch size B (`--train-batch-size`, or `hyper_parameters.batch_size` of a
    Lightning checkpoint), cuts the data into consecutive batches of B samples and measures how
    far each batch's per-channel mean and variance (what BatchNorm normalises with in training)
    stray from the statistics of the whole sample (what eval mode uses): the RMS over batches of
    (batch mean - mean) / sqrt(var + eps) and of ln((batch var + eps) / (var + eps)), averaged over
    channels. It warns when either exceeds `batch-noise-smd` (default 0.25) or `batch-noise-lvr`
    (default 0.35): for independent values that is about 16 values per channel per batch.

    ## Why is this bad?
    With few values per channel per batch (small B, small feature maps, 1-d BatchNorm), training
    normalises each batch with noisy statistics while inference normalises with the population's:
    the network is trained on one function and deployed as another (the train/test
    inconsistency of Wu & Johnson 2021). Per-device batches under DataParallel/DDP without
    SyncBatchNorm are what count, not the global batch.

    ## Example
    Detection fine-tuning with 2 images per GPU: the stride-32 layers see 2 x 7 x 7 correlated
    values per channel, and a batch's mean is off by a large fraction of a standard deviation.

    ## Use instead
    Increase the values per channel per batch (larger batches, SyncBatchNorm), or stop BatchNorm
    from using batch statistics (freeze it in eval mode, FrozenBatchNorm2d) or replace it with
    GroupNorm. Afterwards estimate the running statistics over many batches, never from one
    small batch: `bnlint fix MODEL --data TRAIN_SAMPLE -o FIXED`, or precise BN /
    `torch.optim.swa_utils.update_bn` in PyTorch (Keras 3: see BN601).

    ## References
    - Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm" (precise BN, train/test inconsistency).
    - Wu & He 2018, "Group Normalization".
    """
    settings = analysis.settings
    if not analysis.train_batch_size:
        return
    for layer in analysis.layers:
        noise = layer.batch_noise
        if noise is None or layer.values_per_batch is None or layer.values_per_batch <= 1:
            continue
        smd, lvr = noise.mean_rms_smd, noise.mean_rms_lvr
        if smd >= settings.batch_noise_smd or (lvr is not None and lvr >= settings.batch_noise_lvr):
            lvr_text = "" if lvr is None else f" and RMS log-variance error {num(lvr)}"
            yield Hit(
                message=f"at training batch size {analysis.train_batch_size} (from {analysis.train_batch_source}) this layer sees "
                f"{layer.values_per_batch} values per channel per batch; a batch's statistics stray from the population's by RMS "
                f"normalised-mean error {num(smd)}{lvr_text} (over {noise.pseudo_batches} batches of the data): "
                "training normalises differently from eval",
                layer=layer.name,
                values={"batch_size": analysis.train_batch_size, "values_per_batch": layer.values_per_batch,
                        "mean_rms_smd": smd, "mean_rms_lvr": lvr, "method": noise.method},
            )


@rule(
    code="BN605",
    reads=("run",),
    name="single-value-batch",
    severity=Severity.ERROR,
    summary="At the training batch size, the layer holds a single value per channel.",
    fix="Use at least 2 samples per (per-device) batch and drop_last=True, or freeze this BatchNorm (eval mode).",
    scope="dynamic",
)
def single_value_batch(analysis: Measurements, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Finds layers whose input has one value per channel per sample (BatchNorm1d on (N, C), or a
    1x1 feature map) when the training batch size is 1.

    ## Why is this bad?
    The batch variance of one value is undefined: PyTorch refuses to train it ("Expected more
    than 1 value per channel when training"). The same crash hits a larger batch size when the
    last batch of an epoch happens to hold one sample (dataset size mod B == 1) unless the
    loader drops it.

    ## Example
    `BatchNorm1d` after a Linear layer, trained with batch size 1 or with a final batch of 1.

    ## Use instead
    Batch size >= 2 per device with `DataLoader(..., drop_last=True)`, or keep this BatchNorm
    in eval mode while training (frozen statistics), or use LayerNorm/GroupNorm.

    ## References
    - fastai/fastai#1352; PyTorch `_verify_batch_size` in torch/nn/functional.py.
    """
    if analysis.train_batch_size is None:
        return
    for layer in analysis.layers:
        if layer.values_per_batch == 1:
            yield Hit(
                message=f"at training batch size {analysis.train_batch_size} (from {analysis.train_batch_source}) this layer holds one value "
                "per channel per batch: PyTorch refuses to train it (\"Expected more than 1 value per channel when training\")",
                layer=layer.name,
                values={"batch_size": analysis.train_batch_size, "values_per_sample": layer.values_per_sample},
            )


@rule(
    code="BN606",
    reads=("run",),
    name="batch-dependence",
    severity=Severity.ERROR,
    summary="Outputs depend on which samples share the batch: the model normalises with batch statistics at inference.",
    fix="Put BatchNorm in eval mode before saving/exporting (model.eval(); re-trace or export again), keep "
    "track_running_stats=True, and export ONNX with training_mode=0.",
    scope="dynamic",
)
def batch_dependence(analysis: Measurements, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Runs the first few samples (`dependence-samples`, default 4) of the data one at a time and
    then together as one batch, and compares the model's outputs and every BatchNorm layer's
    input and output. In inference form, BatchNorm is a fixed per-channel affine map, so the two
    must agree to float rounding; a difference above `batch-dependence-rtol` (default 1e-3,
    relative to the largest output) is reported at each layer whose output changes while its
    input does not (or at model level if no layer explains it). A graph whose batch size is fixed
    at B > 1 cannot run a sample alone: the first sample then runs twice, with samples 1..B-1 and
    with samples B..2B-2, so only its batch mates change (2B - 1 samples are needed). With a batch
    fixed at 1, every layer's output is checked against its input normalised with the stored
    statistics instead. When the outputs differ but every BatchNorm layer's output is its input
    normalised with its stored statistics and the same batch run again gives the same outputs,
    BatchNorm is not the cause: the finding is information (an ill-conditioned output, such as a
    sigmoid of large negative logits, turns the arithmetic differences of kernels that split the
    work by batch size into a relative difference above the tolerance).

    ## Why is this bad?
    A model that normalises with the statistics of the batch at inference gives a sample
    different predictions depending on its batch mates, wrong ones for batch size 1 or
    non-i.i.d. batches, and it may update its running statistics on test data. Causes: a module
    traced or scripted in train mode (`training=True` baked into TorchScript), BatchNorm with
    `track_running_stats=False`, an ONNX node with `training_mode=1`, or `model.eval()` forgotten.

    ## Example
    `torch.jit.trace(model, x)` called before `model.eval()`: `model.eval()` after loading the
    trace changes nothing, and every call normalises with batch statistics.

    ## Use instead
    Call `model.eval()` before tracing, scripting, saving or exporting; build BatchNorm with
    `track_running_stats=True`; export ONNX in eval mode (training_mode=0).

    ## References
    - pytorch/pytorch#29177 and #71929 (traced in train mode); keras-team/keras#12400.
    - onnx/onnxscript#1791; microsoft/onnxruntime#29790 (training-mode BatchNormalization).
    """
    dependence = analysis.dependence
    tolerance = analysis.settings.batch_dependence_rtol
    if dependence is None or (dependence.relative_diff <= tolerance and not dependence.layers):
        return
    if dependence.skipped:  # batch fixed at 1 (or too few samples): only the per-layer eval-form test ran
        head = f"with the model's fixed batch ({dependence.skipped})"
    elif dependence.method == "mates":
        head = (f"one sample run with two different sets of batch mates (the batch size is fixed) gives outputs that differ "
                f"by up to {num(dependence.max_abs_diff)} (relative {num(dependence.relative_diff)}, tolerance {num(tolerance)})")
    else:
        head = (f"{dependence.samples} samples run one at a time and as one batch give outputs that differ by up to "
                f"{num(dependence.max_abs_diff)} (relative {num(dependence.relative_diff)}, tolerance {num(tolerance)})")
    values = {"max_abs_diff": dependence.max_abs_diff, "relative_diff": dependence.relative_diff, "samples": dependence.samples}
    if not dependence.layers and dependence.not_batchnorm:
        yield Hit(message=head + ", but not through BatchNorm: every BatchNorm layer normalised with its stored "
                  "statistics and the same batch gave the same outputs twice: the difference comes from arithmetic that "
                  "varies with the batch size (in an ill-conditioned output) or from an op that is not BatchNorm",
                  layer=None, values={**values, "not_batchnorm": True}, severity=Severity.INFO)
        return
    if not dependence.layers:
        yield Hit(message=head + ": the model's output depends on the batch (batch statistics, or randomness such as "
                  "dropout left in train mode)", layer=None, values=values)
        return
    for entry in dependence.layers:
        size = "" if entry.max_abs_diff is None else f" (by up to {num(entry.max_abs_diff)})"
        yield Hit(
            message=f"{head}; this layer normalises with batch statistics at inference ({entry.evidence}{size})",
            layer=entry.layer,
            values={**values, "layer_max_abs_diff": entry.max_abs_diff, "layer_relative_diff": entry.relative_diff,
                    "evidence": entry.evidence},
        )


@rule(
    code="BN608",
    reads=("run",),
    name="nonfinite-activations",
    severity=Severity.WARNING,
    summary="On the given data, the input of a BatchNorm layer holds Inf or NaN: activations overflow (or a NaN "
    "arises) upstream, and drift cannot be judged there.",
    fix="Check the data's range and preprocessing (normalise it as in training); if the data is right, find the layer "
    "before this one that overflows (float16 models overflow above 65504).",
    scope="dynamic",
)
def nonfinite_activations(analysis: Measurements, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Checks the per-channel mean and variance of every BatchNorm input measured on the data. The
    data itself has already been checked for NaN and Inf, so a non-finite statistic means the
    model produced it: a value overflowed to Inf (or Inf - Inf made a NaN) somewhere before this
    layer. Reports the first such layer in execution order, with how many layers and channels are
    affected. Those channels are left out of the drift measures (BN601), and a layer with no
    finite channel is not reported as "too small to judge" (BN603).

    ## Why is this bad?
    A model that overflows on the data produces Inf/NaN outputs, and every BatchNorm after the
    overflow normalises garbage. Drift cannot be measured there, and silence would read as
    "the statistics fit".

    ## Example
    Images saved as raw float values in the 1e30s (a unit conversion gone wrong) through a conv
    net: the first convolution's output overflows float32 and every BatchNorm input is Inf/NaN.

    ## Use instead
    Feed the data preprocessed exactly as in training; for a float16 model, keep activations in
    range (or run it in float32) and check the layers just before the one reported.

    ## References
    - IEEE 754 overflow; PyTorch AMP documentation (float16 range).
    """
    affected = [(layer, nonfinite_channels(layer)) for layer in analysis.layers]
    affected = [(layer, count) for layer, count in affected if count]
    if not affected:
        return
    first, count = min(affected, key=lambda pair: pair[0].order)
    what = "NaN" if np.isnan(first.mean_t).any() or np.isnan(first.var_t).any() else "Inf"
    yield Hit(
        message=f"on this data the input of this layer holds {what} in {count} of {first.channels} channel(s): "
        f"activations overflow (or a NaN arises) before it; {len(affected)} of {len(analysis.layers)} BatchNorm layer(s) "
        "are affected and their non-finite channels are not judged for drift",
        layer=first.name,
        values={"layers": [layer.name for layer, _ in affected], "channels": {layer.name: n for layer, n in affected}},
    )
