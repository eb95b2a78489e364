"""BN2xx: how the BatchNorm state is stored (dtypes, eps, averaged and DataParallel checkpoints)."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from bnlint.context import RuleContext
from bnlint.findings import Severity, reestimate
from bnlint.model import BN_TENSORS, BNLayer, ModelInfo
from bnlint.rules._util import listed, num
from bnlint.rules.registry import Hit, rule

HALF_DTYPES = ("float16", "bfloat16")


@rule(
    code="BN201",
    name="half-precision-buffers",
    severity=Severity.WARNING,
    summary="BatchNorm tensors are stored in float16/bfloat16.",
    fix="Keep BatchNorm in float32: cast the rest of the model, or use autocast instead of model.half().",
    scope="model",
)
def half_precision_buffers(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports, once per file, the BatchNorm layers whose `running_mean`, `running_var`, `weight` or
    `bias` are stored in float16 or bfloat16. It is a warning when the storage already damaged a
    value (a float16 tensor holding Inf: a variance above 65504 overflowed), and information when
    every value is finite: inference with these values is unaffected, and the risk is training on
    from the file in half precision.

    ## Why is this bad?
    float16 cannot hold variances above 65504 (they become Inf) nor below ~6e-8 (they flush to
    zero, and with a small eps the channel's gain explodes); bfloat16 keeps the range but only
    ~3 significant digits, so the running averages lose the small updates momentum makes.
    Mixed-precision frameworks keep BatchNorm in float32 for these reasons. Many healthy
    checkpoints are shipped in float16 to halve their size and cast back to float32 when loaded:
    the values themselves are judged by the statistics rules (BN101, BN103, BN107).

    ## Example
    A state dict saved after `model.half()`: `bn1.running_var.dtype == torch.float16`.

    ## Use instead
    Use `torch.autocast` for mixed precision (BatchNorm stays float32) or convert the rest of
    the model while keeping BatchNorm modules in float32.

    ## References
    - PyTorch AMP docs (ops that autocast to float32 include batch_norm).
    - Keras mixed precision guide (BatchNormalization computes in float32).
    """
    half: dict[str, dict[str, str]] = {}
    damaged: list[str] = []
    for layer in model.layers:
        dtypes = {t: d for t in BN_TENSORS if (d := layer.dtype(t)) in HALF_DTYPES}
        if not dtypes:
            continue
        half[layer.name] = dtypes
        for tensor in dtypes:
            values = layer.array(tensor)
            if values is not None and np.isinf(values).any():
                damaged.append(layer.name)
                break
    if not half:
        return
    names = list(half)

    kinds = sorted({d for dtypes in half.values() for d in dtypes.values()})
    tensors = sorted({t for dtypes in half.values() for t in dtypes})
    if damaged:
        verdict = f"{len(damaged)} of them hold Inf, a value float16 could not store ({listed(damaged)})"
    else:
        verdict = ("every value is finite, so inference with them is unaffected; training on from this file in half "
                   "precision would lose the small updates momentum makes")
    yield Hit(
        message=f"{len(names)} BatchNorm layer(s) store {', '.join(tensors)} in {' and '.join(kinds)} ({listed(names)}): {verdict}",
        values={"layers": names, "dtypes": half, "damaged": damaged},
        severity=None if damaged else Severity.INFO,
    )


@rule(
    code="BN202",
    name="zero-eps",
    severity=Severity.ERROR,
    summary="eps is 0, negative, NaN or infinite: zero variances divide by zero, or every output is NaN/constant.",
    fix="Set eps to the value the model was trained with, PyTorch's default 1e-5 if unsure.",
)
def zero_eps(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports BatchNorm layers constructed with `eps <= 0`, or with an eps that is NaN or infinite
    (a comparison with NaN is always false, so `eps <= 0` alone would pass it).

    ## Why is this bad?
    eps keeps `1/sqrt(running_var + eps)` finite. Variances of exactly zero are common (a
    channel after a dead ReLU, padding-only inputs), and with `eps=0` they give Inf or NaN
    outputs in eval mode, and in train mode on a constant batch. A NaN eps makes every output
    NaN; an infinite one divides every channel by infinity (the output is just the bias).

    ## Example
    `nn.BatchNorm2d(64, eps=0.0)`.

    ## Use instead
    `nn.BatchNorm2d(64)` (eps=1e-5), or the eps the original framework used (Keras: 1e-3).

    ## References
    - pytorch/vision#2599 and PR #1947.
    """
    if not layer.is_known("eps") or layer.eps is None:
        return
    eps = float(layer.eps)
    if math.isnan(eps) or eps == -math.inf:
        yield Hit(message=f"eps is {num(eps)}: every output is NaN", layer=layer.name, values={"eps": eps})
    elif eps == math.inf:
        yield Hit(message="eps is inf: every channel is divided by infinity (the output is just the bias)",
                  layer=layer.name, values={"eps": eps})
    elif eps <= 0:
        yield Hit(message=f"eps is {layer.eps!r}: channels with zero variance divide by zero", layer=layer.name, values={"eps": layer.eps})


@rule(
    code="BN203",
    reads=("checkpoint-keys",),
    name="averaged-checkpoint",
    severity=Severity.WARNING,
    summary="An SWA/EMA averaged checkpoint: its BatchNorm statistics are not averaged and must be re-estimated.",
    fix=reestimate("Before saving or evaluating the averaged model, re-estimate its statistics on training data: ",
                   data="TRAIN_SAMPLE"),
    scope="model",
)
def averaged_checkpoint(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Detects checkpoints of `torch.optim.swa_utils.AveragedModel` (an `n_averaged` buffer), used
    for SWA and EMA weights.

    ## Why is this bad?
    `AveragedModel` averages parameters, not BatchNorm buffers (unless `use_buffers=True`): the
    averaged weights come with running statistics that belong to no model — a copy from when
    averaging started, or from the last model. The statistics must be recomputed for the
    averaged weights, which is what `update_bn` does. bnlint cannot tell from the file whether
    that happened; `--data` with training-distribution data measures it (BN601).

    ## Example
    A state dict with keys `n_averaged`, `module.conv1.weight`, `module.bn1.running_mean`, ...

    ## Use instead
    `torch.optim.swa_utils.update_bn(train_loader, swa_model)` after the last averaging step.

    ## References
    - PyTorch docs, "Stochastic Weight Averaging" (`update_bn`).
    - mosaicml/composer#624.
    """
    buffers = model.averaged_buffers
    if buffers and model.layers:
        yield Hit(
            message=f"averaged (SWA/EMA) checkpoint ({', '.join(buffers[:3])}): BatchNorm running statistics are not "
            f"averaged with the weights; make sure update_bn re-estimated them for {len(model.layers)} BN layers",
            values={"averaged_buffers": list(buffers)},
        )


@rule(
    code="BN204",
    reads=("checkpoint-keys",),
    name="dataparallel-prefix",
    severity=Severity.INFO,
    summary="Keys carry a `module.` prefix (DataParallel/DDP) and BatchNorm is not SyncBatchNorm.",
    fix="Consider SyncBatchNorm (or precise BN after training) when the per-device batch was small.",
    scope="model",
)
def dataparallel_prefix(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Notes state dicts saved from `nn.DataParallel` / `DistributedDataParallel` (every key starts
    with `module.`) whose BatchNorm layers are plain BatchNorm, not SyncBatchNorm.

    ## Why is this bad?
    Under data parallelism each device normalises with the statistics of its own slice of the
    batch. With small per-device batches those statistics are noisy, training and inference
    statistics disagree, and accuracy drops. The prefix also makes `load_state_dict` fail on an
    unwrapped model.

    ## Example
    `module.layer1.0.bn1.running_mean` in a model trained with 8 GPUs x 2 images.

    ## Use instead
    `nn.SyncBatchNorm.convert_sync_batchnorm(model)` for small per-device batches; strip the
    prefix with `torch.nn.modules.utils.consume_prefix_in_state_dict_if_present`.

    ## References
    - pytorch/pytorch#49794.
    """
    prefix = model.key_prefix
    if model.averaged_buffers:
        return  # AveragedModel wraps its model as `module`: that prefix says nothing about DataParallel
    plain = [layer.name for layer in model.layers if layer.kind != "SyncBatchNorm"]
    if prefix.startswith("module.") and plain:
        yield Hit(
            message=f"keys carry the DataParallel/DDP prefix {prefix!r} and {len(plain)} BN layers are plain BatchNorm "
            "(each device normalised with its own slice of the batch)",
            values={"prefix": prefix, "plain_bn_layers": len(plain)},
        )


@rule(
    code="BN110",
    name="unchecked-statistics",
    severity=Severity.WARNING,
    summary="A BatchNorm statistic exists but could not be read the way the framework reads it, so it was not checked.",
    fix="Re-save the model with the framework's own saver; if the file was edited by hand or a converter, check it.",
)
def unchecked_statistics(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports BatchNorm layers whose loader could not resolve a statistic the way the framework
    itself does: a stored value that is not a numeric vector of the layer's channels (an HDF5
    string, variable-length, compound, complex, reference, scalar, 2-D or empty dataset), a
    name listed twice, a count of variables the framework refuses, or a value behind something
    the loader cannot follow. The loader records each reason in `BNLayer.unchecked`.

    ## Why is this bad?
    Every other statistics rule judges the values the framework will use. A value bnlint could
    not read is a value nobody checked: the framework may refuse the file, or load something
    else than what a reader of the file expects (NaN, negative variances). Reporting the layer
    as clean would be a lie, so it is a warning of its own.

    ## Example
    A legacy Keras `.h5` whose `weight_names` attribute points `moving_variance` at a string
    dataset, or lists `moving_mean` twice.

    ## Use instead
    Save the model with the framework's own API (`model.save`, `torch.save(model.state_dict())`,
    `onnx.save`), which writes every statistic as a numeric array of the layer's shape.

    ## References
    - Keras `legacy_h5_format.load_weights_from_hdf5_group` (weights assigned by position).
    - Keras `saving_lib` (`H5IOStore.get`: variables loaded by group path).
    """
    if layer.unchecked:
        shown = listed(layer.unchecked, 5, "; ")
        yield Hit(message=f"statistics not checked: {shown}", layer=layer.name, values={"reasons": list(layer.unchecked)})
