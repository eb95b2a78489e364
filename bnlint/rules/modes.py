"""BN4xx (PyTorch side): train/eval mode of the saved modules; BN404-406 live in graph.py."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from bnlint.context import RuleContext
from bnlint.findings import Severity
from bnlint.model import BNLayer, ModelInfo, ModuleRecord
from bnlint.rules._util import eps_of, listed, num
from bnlint.rules.registry import Hit, rule


def _saved_modes(model: ModelInfo) -> tuple[list[BNLayer], list[BNLayer]]:
    """(train-mode, eval-mode) layers among those with a saved, switchable mode flag.

    Modes baked into an exported graph (`training_reasons`) are BN404's, not a saved flag.
    """
    known = [layer for layer in model.layers if layer.is_known("training") and not layer.training_reasons]
    return [layer for layer in known if layer.training], [layer for layer in known if not layer.training]


def _names(layers: list[BNLayer], limit: int = 3) -> str:
    return listed([layer.name for layer in layers], limit)


@rule(
    code="BN401",
    reads=("module-modes",),
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
    train, evaluation = _saved_modes(model)
    if train and not evaluation:
        state = "are in" if model.format == "torch-live" else "were saved in"
        yield Hit(
            message=f"all {len(train)} BatchNorm layers {state} train mode ({_names(train)}): without "
            "model.eval() they normalise with batch statistics and overwrite their running statistics",
            values={"train_layers": [layer.name for layer in train]},
        )


@rule(
    code="BN402",
    reads=("module-modes",),
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
    train, evaluation = _saved_modes(model)
    if train and evaluation:
        yield Hit(
            message=f"{len(train)} BatchNorm layers are in train mode ({_names(train)}) and {len(evaluation)} in eval mode "
            f"({_names(evaluation)}): a freeze undone by model.train()?",
            values={"train_layers": [layer.name for layer in train], "eval_layers": [layer.name for layer in evaluation]},
        )


@rule(
    code="BN403",
    reads=("requires-grad",),
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
    fix="Keep frozen BN layers in eval mode during fine-tuning; restore their statistics from the reference, or "
    "re-estimate them on training data (`bnlint fix MODEL --data TRAIN_SAMPLE -o FIXED`, or "
    "torch.optim.swa_utils.update_bn(loader, model)).",
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
        pairs = [(layer.array(t), before.array(t)) for t in ("weight", "bias", "running_mean", "running_var")]
        arrays = [(a, b) for a, b in pairs if a is not None and b is not None and a.shape == b.shape]
        if len(arrays) < 4:
            continue
        (weight, weight_ref), (bias, bias_ref), (mean, mean_ref), (var, var_ref) = arrays
        frozen = np.array_equal(weight, weight_ref, equal_nan=True) and np.array_equal(bias, bias_ref, equal_nan=True)
        if not frozen or (np.array_equal(mean, mean_ref, equal_nan=True) and np.array_equal(var, var_ref, equal_nan=True)):
            continue
        eps = eps_of(layer)
        with np.errstate(all="ignore"):
            shift = np.abs(mean - mean_ref) / np.sqrt(np.maximum(var_ref, 0) + eps)
            ratio = np.abs(np.log((var + eps) / (var_ref + eps)))
        yield Hit(
            message=f"weight/bias identical to the reference but running stats moved (max mean shift "
            f"{num(float(np.nanmax(shift)))} reference std, max |log var ratio| {num(float(np.nanmax(ratio)))})",
            layer=layer.name,
            values={"max_mean_shift": float(np.nanmax(shift)), "max_abs_log_var_ratio": float(np.nanmax(ratio))},
        )


def _preceding_weighted(model: ModelInfo, layer: BNLayer) -> ModuleRecord | None:
    """The nearest module before the layer, in order, that holds weights and is not a BatchNorm."""
    bn_names = {bn.name for bn in model.layers}
    record = model.modules.get(layer.name)
    if record is None:
        return None
    earlier = [m for m in model.modules.values() if m.order < record.order and m.has_weights and m.name not in bn_names]
    return max(earlier, key=lambda m: m.order) if earlier else None


def _keras_major(model: ModelInfo) -> int | None:
    """The major version of the Keras that wrote the file ("Keras 2.15.0" -> 2), None if unsaid."""
    version = model.format_version or ""
    head = version[len("Keras "):].split(".", 1)[0] if version.startswith("Keras ") else ""
    return int(head) if head.isdigit() else None


def _frozen_in_same_base(model: ModelInfo, layer: BNLayer) -> ModuleRecord | None:
    """A frozen weighted layer inside the same top-level sub-model as a nested BN: the shape of a
    backbone partly unfrozen for fine-tuning (None for a BN at the top level)."""
    record = model.modules.get(layer.name)
    if record is None or not record.parent:
        return None
    base = f"{layer.name.split('/', 1)[0]}/"
    frozen = [m for m in model.modules.values()
              if m.name.startswith(base) and m.has_weights and m.effective_trainable is False]
    return min(frozen, key=lambda m: m.order) if frozen else None


_MOVES = "it runs in training mode, normalises with each batch's statistics and moves its moving mean/variance to the fine-tuning data"


def _consequence(layer: BNLayer, major: int | None) -> str:
    """What fit() does to the layer, given the `training` argument its call records and the Keras that wrote the file."""
    if layer.call_training is True:
        return f"in fit() {_MOVES} (its call records training=True)"
    if layer.call_training is not False:
        return f"in fit() {_MOVES}"
    if major is not None and major < 3:
        return ("tf.keras 2, which wrote this file, honours the training=False its call records and keeps it in "
                f"inference mode in fit(); Keras 3 does not: loaded into Keras 3 and fit, {_MOVES}")
    return (f"in fit() {_MOVES}; the training=False its call records does not protect them: Keras 3's Functional "
            "model passes fit()'s training=True over the recorded value (functional.py operation_fn), on every backend")


@rule(
    code="BN408",
    reads=("trainable",),
    name="trainable-bn-in-frozen-model",
    severity=Severity.ERROR,
    summary="A Keras BatchNormalization stays trainable while the layers around it are frozen: fit() moves its statistics.",
    fix="Set trainable=False on the BatchNormalization layers too (for layer in base_model.layers: if "
    "isinstance(layer, keras.layers.BatchNormalization): layer.trainable = False), or freeze the whole backbone "
    "with base_model.trainable = False; a BatchNormalization with trainable=False runs in inference mode in fit(), "
    "on every backend. In Keras 3 a Functional model's base_model(x, training=False) does not protect the "
    "statistics: fit() passes training=True over the recorded value (tf.keras 2 honoured it).",
)
def trainable_bn_in_frozen_model(layer: BNLayer, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Finds BatchNormalization layers that are trainable (their own flag and every enclosing
    model's) while the weighted layer before them is frozen (`trainable: false`) — the shape of
    a backbone frozen layer by layer with its BatchNorm layers left out. As a warning, also a
    trainable BatchNormalization inside a sub-model (a backbone) of which other weighted layers
    are frozen: a backbone partly unfrozen for fine-tuning, its BatchNorm layers included. A
    BatchNorm layer with `trainable: false`, the correct Keras freeze, is never reported.

    The message says what the config records about the `training` argument of the call (the
    backbone's `base_model(x, training=...)`, from the Functional config's inbound nodes) and
    what that means for the Keras that wrote the file.

    ## Why is this bad?
    In Keras (TF 2 and Keras 3), a BatchNormalization layer with `trainable=True` runs in
    training mode inside `fit()`: it normalises every batch with that batch's statistics and
    moves its moving mean and variance towards the fine-tuning data. The frozen layers around it
    were trained against the old statistics, so the "frozen" backbone changes anyway, most of
    all on a small or differently distributed fine-tuning set. Setting `trainable=False` on a
    BatchNormalization layer makes it run in inference mode (it reads its moving statistics and
    updates nothing; BatchNormalization.call updates them only `if training and
    self.trainable`), on every backend.

    Calling the backbone with `training=False` is not enough in Keras 3, on any backend.
    Observed with Keras 3.15.1 on the torch and the TensorFlow backends
    (tests/test_keras_training_semantics.py runs fit()): `x = base_model(inputs,
    training=False)` in a Functional model, with the backbone trainable (never frozen, or frozen
    and then unfrozen as the transfer-learning guide does), still moved the moving statistics.
    A Functional model runs each recorded call with the `training` value the model itself is
    called with whenever that is not None, over the value recorded when the graph was built
    (keras/src/models/functional.py, `operation_fn`), and `fit()` calls the model with
    `training=True`. The recorded `training=False` only applies when the model is called
    with no `training` value, which `fit()`, `evaluate()` and `predict()` never do. Two
    things differ: tf.keras 2 honours the recorded value (its Functional model calls each layer
    with the recorded arguments, and an explicit argument wins), so an `.h5` written by tf.keras
    2 with `training=False` keeps the layer in inference mode there, and not once loaded into
    Keras 3; and a subclassed model whose `call()` itself passes `self.base(x, training=False)`
    keeps it in inference mode (an explicit argument wins, `Layer._resolve_and_populate_arg`),
    but that call is code, not a config bnlint can read.

    ## Example
    ```python
    for layer in base_model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False   # BN left trainable: its statistics drift in fit()
    ```

    ## Use instead
    ```python
    base_model.trainable = False      # freezes every sublayer, BatchNormalization included
    ```
    or, to fine-tune the other layers while the statistics stay:
    ```python
    for layer in base_model.layers:   # nested models: walk them too (layer.layers)
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False   # inference mode in fit(): moving statistics read, never updated
    ```
    Set it again after every `base_model.trainable = True`, which switches every sublayer,
    BatchNormalization included, back on.

    ## References
    - Keras guide: "Transfer learning & fine-tuning" (BatchNormalization and `trainable=False`).
    - keras/src/models/functional.py `operation_fn`; keras/src/layers/normalization/batch_normalization.py `call`.
    - keras-team/keras#4762 and #9965 (BatchNorm statistics updated in "frozen" models before Keras 2.1.3).
    """
    if layer.effective_trainable is not True:
        return
    model = ctx.model
    major = _keras_major(model)
    # tf.keras 2 keeps the layer in inference mode in fit() when its call records training=False.
    severity = Severity.WARNING if layer.call_training is False and major is not None and major < 3 else None
    values = {"call_training": layer.call_training}
    before = _preceding_weighted(model, layer)
    if before is not None and before.effective_trainable is False:
        yield Hit(
            message=f"trainable while the layer before it, {before.name!r}, is frozen: {_consequence(layer, major)}",
            layer=layer.name, values={"frozen_neighbour": before.name, **values}, severity=severity,
        )
        return
    frozen = _frozen_in_same_base(model, layer)
    if frozen is not None:
        base = layer.name.split("/", 1)[0]
        yield Hit(
            message=f"trainable inside {base!r}, part of which is frozen ({frozen.name!r}), the shape of a partly "
            f"unfrozen backbone being fine-tuned: {_consequence(layer, major)}",
            layer=layer.name, values={"frozen_in_base": frozen.name, **values}, severity=Severity.WARNING,
        )


@rule(
    code="BN409",
    reads=("deploy-pair",),
    name="mode-disagreement",
    severity=Severity.WARNING,
    summary="Two files of one model disagree about whether a BatchNorm uses its stored statistics.",
    fix="Nothing to do when you deploy with the prototxt and it says use_global_stats: true (or leaves it unset); "
    "re-save the caffemodel from the deploy net if a converter reads the caffemodel's own definition.",
    scope="model",
)
def mode_disagreement(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports, once per model, the BatchNorm layers described by two files (a Caffe deploy
    `.prototxt` and the `.caffemodel` with its weights) that disagree about `use_global_stats`,
    with the list of layers.

    ## Why is this bad?
    Caffe takes a layer's parameters from the prototxt the net is built from
    (`Net(prototxt)`); `CopyTrainedLayersFrom(caffemodel)` copies only the blobs. So when the
    model is deployed with the prototxt, the prototxt governs:
    - the prototxt uses the stored statistics (`use_global_stats: true`, or unset: the
      TEST-phase default) and the caffemodel stores the TRAIN net's `false`: harmless at run
      time (info). Only a tool that reads the caffemodel's own definition (some converters)
      would normalise with batch statistics.
    - the prototxt says `use_global_stats: false` while the caffemodel stores true: the
      deployed net normalises with batch statistics (warning; BN404 reports each layer).

    One finding per direction: the disagreement is one fact about the pair of files, not one
    per layer.

    ## Example
    `deploy.prototxt` has no `use_global_stats` (TEST default: true); `model.caffemodel` stores
    `batch_norm_param { use_global_stats: false }` in all 53 BatchNorm layers: one info finding.

    ## Use instead
    Deploy with the prototxt that says `use_global_stats: true` (or leaves it unset), and
    re-save the caffemodel from the deploy net if tools read its definition.

    ## References
    - BVLC/caffe#5829; Caffe `batch_norm_layer.cpp` (`use_global_stats` defaults by phase);
      `Net::CopyTrainedLayersFrom` (copies blobs only).
    """
    found = [layer for layer in model.layers if layer.mode_disagreement]
    governed = [layer for layer in found if not layer.training]  # the prototxt uses the stored statistics
    batch = [layer for layer in found if layer.training]  # the prototxt normalises with batch statistics
    if governed:
        yield Hit(
            message=f"the caffemodel stores the training net's use_global_stats: false for {len(governed)} BatchNorm "
            f"layer(s) ({_names(governed)}), but Caffe takes layer parameters from the prototxt it is deployed with, "
            "and that uses the stored statistics: harmless when deployed with this prototxt; only a tool that reads "
            "the caffemodel's own definition (a converter) would normalise with batch statistics",
            severity=Severity.INFO,
            values={"layers": [layer.name for layer in governed], "governs": "prototxt", "batch_statistics_at_run_time": False,
                    "detail": governed[0].mode_disagreement},
        )
    if batch:
        yield Hit(
            message=f"the prototxt says use_global_stats: false for {len(batch)} BatchNorm layer(s) ({_names(batch)}) "
            "while the caffemodel stores true: Caffe takes layer parameters from the prototxt, so the deployed net "
            "normalises with batch statistics",
            values={"layers": [layer.name for layer in batch], "governs": "prototxt", "batch_statistics_at_run_time": True,
                    "detail": batch[0].mode_disagreement},
        )
