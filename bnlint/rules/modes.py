"""BN4xx (PyTorch side): train/eval mode of the saved modules; BN404-406 live in graph.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

from bnlint.findings import Severity
from bnlint.model import BNLayer, ModelInfo
from bnlint.rules._util import num
from bnlint.rules.registry import Hit, rule

if TYPE_CHECKING:  # the engine imports the rules: a runtime import would be circular
    from bnlint.engine import RuleContext


def _torch_modes(model: ModelInfo) -> tuple[list[BNLayer], list[BNLayer]]:
    known = [layer for layer in model.layers if layer.framework == "torch" and layer.is_known("training")]
    return [layer for layer in known if layer.training], [layer for layer in known if not layer.training]


def _names(layers: list[BNLayer], limit: int = 3) -> str:
    shown = ", ".join(layer.name for layer in layers[:limit])
    return shown + (f", ... (+{len(layers) - limit})" if len(layers) > limit else "")


@rule(
    code="BN401",
    name="saved-in-train-mode",
    severity=Severity.WARNING,
    summary="The module was saved with its BatchNorm layers in train mode.",
    fix="Call model.eval() before saving or exporting, and after loading for inference.",
    scope="model",
)
def saved_in_train_mode(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports pickled and scripted models whose BatchNorm layers all carry `training=True`
    (the flag is saved with the module).

    ## Why is this bad?
    Whoever loads the model and forgets `model.eval()` runs BatchNorm in train mode: it
    normalises with each batch's statistics (outputs depend on the batch, a single sample
    gives garbage) and overwrites the running statistics with the inference data's on every
    call, even under `torch.no_grad()`.

    ## Example
    `torch.save(model, "model.pt")` right after the training loop.

    ## Use instead
    `model.eval()` before `torch.save`, `torch.jit.script` or export.

    ## References
    - PyTorch docs, "Saving and loading models" (call `model.eval()` before inference).
    """
    train, evaluation = _torch_modes(model)
    if train and not evaluation:
        state = "are in" if model.format == "torch-live" else "were saved in"
        yield Hit(
            message=f"all {len(train)} BatchNorm layers {state} train mode ({_names(train)}): without "
            "model.eval() they normalise with batch statistics and overwrite their running statistics",
            values={"train_layers": [layer.name for layer in train]},
        )


@rule(
    code="BN402",
    name="mixed-modes",
    severity=Severity.WARNING,
    summary="Some BatchNorm layers are in train mode and others in eval mode.",
    fix="Override train() to keep frozen BN in eval (mmdetection's norm_eval) or use FrozenBatchNorm2d.",
    scope="model",
)
def mixed_modes(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports models saved with a mix of train-mode and eval-mode BatchNorm layers.

    ## Why is this bad?
    A mix is almost always a partial freeze: the backbone's BN was put in eval mode, and then a
    later `model.train()` (every epoch start does one) put some or all of them back in train
    mode, or the freeze was applied to only part of the network. Layers in train mode keep
    overwriting their running statistics with the fine-tuning data.

    ## Example
    `backbone.eval()` once before the loop, `model.train()` at the start of each epoch.

    ## Use instead
    Re-apply the freeze after every `model.train()`, e.g. override `train()`:
    `super().train(mode); self.backbone.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)`.

    ## References
    - open-mmlab/mmdetection PR #560 (`norm_eval`).
    """
    train, evaluation = _torch_modes(model)
    if train and evaluation:
        yield Hit(
            message=f"{len(train)} BatchNorm layers are in train mode ({_names(train)}) and {len(evaluation)} in eval mode "
            f"({_names(evaluation)}): a freeze undone by model.train()?",
            values={"train_layers": [layer.name for layer in train], "eval_layers": [layer.name for layer in evaluation]},
        )


@rule(
    code="BN403",
    name="frozen-bn-in-train-mode",
    severity=Severity.ERROR,
    summary="BatchNorm parameters are frozen (requires_grad=False) but the layer is in train mode.",
    fix="Call bn.eval() after every model.train() (override train()), or replace the layer with FrozenBatchNorm2d.",
)
def frozen_bn_in_train_mode(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Finds BatchNorm layers whose `weight` and `bias` have `requires_grad=False` while the
    module is in train mode — the classic fine-tuning trap.

    ## Why is this bad?
    `requires_grad=False` freezes only gamma and beta. The running statistics are buffers, not
    parameters: in train mode every forward pass normalises with the fine-tuning batch's
    statistics and overwrites `running_mean`/`running_var`, even under `torch.no_grad()`. The
    "frozen" backbone drifts to the fine-tuning data and breaks when it is small or
    differently distributed. (Putting BN in eval mode is what stops the updates; eval mode only
    reads the running statistics.)

    ## Example
    ```python
    for p in backbone.parameters():
        p.requires_grad = False
    model.train()   # BN layers of the backbone are in train mode again
    ```

    ## Use instead
    Put the frozen BN layers in eval mode after every `model.train()`, or use
    `torchvision.ops.FrozenBatchNorm2d`.

    ## References
    - pytorch/pytorch#86590; pytorch/vision#2079.
    """
    if not (layer.is_known("training") and layer.training):
        return
    grads = [layer.requires_grad[name] for name in ("weight", "bias") if name in layer.requires_grad]
    if grads and not any(grads):
        yield Hit(
            message="weight/bias have requires_grad=False but the layer is in train mode: every forward pass still "
            f"overwrites running_mean/var with the current batch's statistics (num_batches_tracked {layer.num_batches_tracked})",
            layer=layer.name,
            values={"num_batches_tracked": layer.num_batches_tracked},
        )


def _strip(name: str) -> str:
    for prefix in ("module.", "model.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


@rule(
    code="BN407",
    name="stats-moved-while-frozen",
    severity=Severity.ERROR,
    summary="Compared with --reference: weight and bias unchanged but the running statistics moved.",
    fix="Keep frozen BN layers in eval mode during fine-tuning; restore their statistics from the reference.",
    scope="model",
)
def stats_moved_while_frozen(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    With `--reference BASE` (the checkpoint fine-tuning started from), finds BatchNorm layers
    whose `weight` and `bias` are bit-for-bit unchanged while `running_mean`/`running_var`
    changed: parameters frozen, layer left in train mode.

    ## Why is this bad?
    It is the trace BN403 leaves in a state dict: the statistics drifted to the fine-tuning
    data while the affine parameters that were trained with the old statistics stayed. The
    mismatch is largest when the fine-tuning set is small or from another domain.

    ## Example
    `bnlint finetuned.pt --reference pretrained.pt`.

    ## Use instead
    Put frozen BN in eval mode (or FrozenBatchNorm2d) and restore the reference statistics.

    ## References
    - pytorch/pytorch#86590; open-mmlab/mmdetection PR #560.
    """
    reference = ctx.reference
    if reference is None:
        return
    base = {_strip(layer.name): layer for layer in reference.layers}
    for layer in model.layers:
        before = base.get(_strip(layer.name))
        if before is None:
            continue
        arrays = {t: (layer.array(t), before.array(t)) for t in ("weight", "bias", "running_mean", "running_var")}
        if any(a is None or b is None or a.shape != b.shape for a, b in arrays.values()):
            continue
        frozen = all(np.array_equal(*arrays[t], equal_nan=True) for t in ("weight", "bias"))
        mean, mean_ref = arrays["running_mean"]
        var, var_ref = arrays["running_var"]
        if not frozen or (np.array_equal(mean, mean_ref, equal_nan=True) and np.array_equal(var, var_ref, equal_nan=True)):
            continue
        with np.errstate(all="ignore"):
            shift = np.abs(mean - mean_ref) / np.sqrt(np.maximum(var_ref, 0) + 1e-5)
            ratio = np.abs(np.log((var + 1e-5) / (var_ref + 1e-5)))
        yield Hit(
            message=f"weight/bias identical to the reference but running stats moved (max mean shift "
            f"{num(float(np.nanmax(shift)))} reference std, max |log var ratio| {num(float(np.nanmax(ratio)))})",
            layer=layer.name,
            values={"max_mean_shift": float(np.nanmax(shift)), "max_abs_log_var_ratio": float(np.nanmax(ratio))},
        )
