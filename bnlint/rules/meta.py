"""BN0xx: file safety and coverage."""

from __future__ import annotations

from typing import Iterator

from bnlint.context import RuleContext
from bnlint.findings import Severity
from bnlint.model import ModelInfo
from bnlint.rules.registry import Hit, rule


@rule(
    code="BN001",
    name="unsafe-pickle-global",
    severity=Severity.ERROR,
    summary="The checkpoint's pickle references code outside the tensor allowlist (never executed).",
    fix="Never load this file with pickle or torch.load without weights_only=True; re-save the weights from a trusted source.",
    scope="model",
)
def unsafe_pickle_global(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports pickle globals that are code-execution primitives (`os.system`, `builtins.eval`,
    `subprocess.Popen`, ...) referenced by a checkpoint. bnlint's reader never imports or calls
    them: it replaces every unknown global with an inert stub.

    ## Why is this bad?
    `torch.load` without `weights_only=True` (the default before PyTorch 2.6) and `pickle.load`
    call whatever the file names. A checkpoint that names `os.system` runs a shell command on
    the machine of whoever loads it.

    ## Example
    A file whose pickle stream contains `GLOBAL 'posix system'` followed by `REDUCE`.

    ## Use instead
    Load checkpoints with `torch.load(path, weights_only=True)`, prefer safetensors for weights,
    and re-export the model from a trusted source.

    ## References
    - PyTorch docs, `torch.load`: "weights_only" and the security warning.
    - Python docs, `pickle`: "Restricting Globals".
    """
    if model.unsafe_globals:
        names = sorted(set(model.unsafe_globals))
        yield Hit(
            message=f"pickle references {len(names)} unsafe callable(s): {', '.join(names[:5])} "
            "(not executed; torch.load without weights_only=True would run them)",
            values={"globals": names},
        )


@rule(
    code="BN002",
    name="no-batchnorm",
    severity=Severity.INFO,
    summary="No BatchNorm layer was found in the file.",
    fix="Nothing to fix if the model has no BatchNorm; for ONNX, export with do_constant_folding=False to lint BN statistics.",
    scope="model",
)
def no_batchnorm(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Says when a model file holds no BatchNorm layer at all, and names the other normalisation
    layers (InstanceNorm, GroupNorm, LayerNorm) it saw and deliberately skipped.

    ## Why is this bad?
    It is not bad in itself, but a linter that silently reports nothing on a file it could not
    analyse gives false confidence. InstanceNorm with `track_running_stats=True` stores the
    same buffers as BatchNorm but normalises per sample: its statistics obey different rules.

    ## Example
    A transformer state dict with only LayerNorm weights.

    ## Use instead
    Nothing to change. If the model did have BatchNorm before export, see BN501 (folded BN).

    ## References
    - PyTorch docs: `torch.nn.InstanceNorm2d` ("track_running_stats").
    """
    if model.layers or model.folded_bn:
        return
    others = model.other_norms
    detail = f"; skipped other norms: {', '.join(others[:5])}" if others else ""
    yield Hit(message=f"no BatchNorm layer found{detail}", values={"other_norms": list(others)})
