"""BN0xx: file safety and coverage."""

from __future__ import annotations

from typing import Iterator

from bnlint.context import RuleContext
from bnlint.findings import Severity
from bnlint.model import ModelInfo
from bnlint.rules.registry import Hit, rule

# The rules that judge a pickle's globals: the only ones that apply to a file whose pickle was
# scanned but could not be loaded (bnlint.errors.UnsafeInputError).
PICKLE_SAFETY_CODES = ("BN001", "BN003")


def _names(values: object) -> list[str]:
    return sorted({str(v) for v in values}) if isinstance(values, (list, tuple, set, frozenset)) else []


@rule(
    code="BN001",
    reads=("pickles",),
    name="unsafe-pickle-global",
    severity=Severity.ERROR,
    summary="The checkpoint's pickle names or calls a code-execution primitive (never executed by bnlint).",
    fix="Never load this file with pickle or torch.load without weights_only=True; re-save the weights from a trusted source.",
    scope="model",
)
def unsafe_pickle_global(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reports execution primitives in a checkpoint's pickles: globals that run code, start
    processes, touch files or the network, import modules or call what they are given
    (`os.system`, `builtins.eval`, `subprocess.Popen`, `pydoc.pipepager`, `functools.partial`,
    `operator.attrgetter`, `torch.fx`'s `_exec_with_source`, ...), whether the pickle calls them or
    only names them; calls of computed objects (`getattr(...)(...)`, `pydoc.locate(...)(...)`,
    shown as `name(...)(...)`); and BUILD/SETITEM/APPEND on a global, which modify a live object
    (shown as `name [changed by BUILD]`). Every pickle of the file is scanned (all five of a legacy
    file, `data.pkl`, `constants.pkl` and every other `*.pkl` of a zip, each member of a tar
    checkpoint), and the finding is reported even when the file then fails to load. bnlint's
    reader never imports or calls any of them.

    ## Why is this bad?
    `torch.load` without `weights_only=True` (the default before PyTorch 2.6) and `pickle.load`
    import and call whatever the file names. A checkpoint that names `os.system` runs a shell
    command on the machine of whoever loads it.

    ## Example
    A file whose pickle stream contains `GLOBAL 'posix system'` followed by `REDUCE`.

    ## Use instead
    Load checkpoints with `torch.load(path, weights_only=True)`, prefer safetensors for weights,
    and re-export the model from a trusted source.

    ## References
    - PyTorch docs, `torch.load`: "weights_only" and the security warning.
    - Python docs, `pickle`: "Restricting Globals".
    """
    names = _names(model.unsafe_globals)
    if names:
        yield Hit(
            message=f"pickle names {len(names)} code-execution primitive(s): {', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''} (not executed; torch.load without weights_only=True would run them)",
            values={"globals": names},
        )


@rule(
    code="BN003",
    reads=("pickles",),
    name="unknown-pickle-callable",
    severity=Severity.WARNING,
    summary="Loading the checkpoint's pickle would call code outside the tensor and container allowlist.",
    fix="Save a state_dict (or safetensors) instead of pickled objects, or --ignore BN003 for classes you trust.",
    scope="model",
)
def unknown_pickle_callable(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Lists the globals that loading the checkpoint with `pickle` would call, other than tensor
    rebuilders (`torch._utils._rebuild_tensor_v2`, storages, `torch.Size`, ...), containers
    (`collections.OrderedDict`, sets, ...), data-only configuration classes (`argparse.Namespace`,
    `pathlib` paths, omegaconf containers and nodes, numpy arrays and dtypes, `datetime`, ...) and
    torch's own `nn` layer classes. Typical hits are user-defined model classes (`__main__.Net`,
    `mypkg.models.ResNet`), third-party classes pickled into hyper-parameters, and enum members.
    Globals only referenced (never called) are not listed, except dotted names (an attribute walk
    such as `torch.nn.modules.module` + `sys.modules...`), which are never a plain class. Allowed
    names are exact (module, qualname) pairs: `bnlint.loaders.pickle_policy.ALLOWED_CALLABLES` and
    the generated `bnlint.loaders.pickle_allowlist.GENERATED_CLASSES`.

    ## Why is this bad?
    Calling a class runs its `__new__`, and restoring its state runs its `__setstate__`: code
    that is not in the file but that the file chooses, with arguments the file chooses.
    `torch.load(weights_only=True)` refuses such files, so users who open them turn the safety
    check off. It is a warning, not an error (BN001): the names are not known execution
    primitives, but bnlint cannot vouch for them.

    ## Example
    `torch.save(model, "model.pt")` for a model of class `mypkg.models.Net` calls
    `mypkg.models.Net` on load.

    ## Use instead
    `torch.save(model.state_dict(), path)` (or safetensors) and rebuild the model in code;
    `torch.serialization.add_safe_globals([...])` for classes you trust; `--ignore BN003` if
    pickled modules of your own classes are intended.

    ## References
    - PyTorch docs, `torch.load` and `torch.serialization.add_safe_globals`.
    - Python docs, `pickle`: "Restricting Globals".
    """
    names = _names(model.unknown_callables)
    if names:
        yield Hit(
            message=f"loading the pickle would call {len(names)} callable(s) outside the allowlist: {', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''} (not executed; their code runs on torch.load without weights_only=True)",
            values={"callables": names},
        )


@rule(
    code="BN004",
    reads=("torchscript-code",),
    name="unsafe-torchscript-code",
    severity=Severity.ERROR,
    summary="The TorchScript archive's code does more than tensor computation (files, printing, hidden or foreign operators).",
    fix="Re-export the model without file, print or custom-operator calls in forward; run it only with --trust if you trust it.",
    scope="model",
)
def unsafe_torchscript_code(model: ModelInfo, ctx: RuleContext) -> Iterator[Hit]:
    """## What it does
    Reads the `code/` text of a TorchScript archive (never compiling or running it) and reports
    everything it cannot positively recognise as tensor computation: operators that touch files
    or the console (`torch.save`, `torch.from_file`, `print`, `ops.prim.Print`), operators of other
    namespaces (`ops.myext.launch`: code from a C++ extension), spellings that hide what is called
    (`getattr(torch, "save")`, `x = torch` then `x.save(...)`, `getattr` with a computed name),
    imports, unknown builtins, and class hooks that `torch.jit.load` runs (`__setstate__`). Each
    is named with its file and line. The check is conservative: an unusual but harmless spelling
    is reported too.

    ## Why is this bad?
    TorchScript is a program. `torch.jit.load` runs a class's `__setstate__`, and running the
    model runs its methods: an archive can read `/etc/hostname` or write files wherever the user
    can. bnlint runs TorchScript for `--data` and `bnlint fix` only when the compiled graph holds
    nothing but pure tensor computation, or when `--trust` is given.

    ## Example
    A scripted module whose forward calls `torch.save(x, "/tmp/x.pt")`, or whose code text was
    edited to call `getattr(torch, "save")(x, "/home/user/.bashrc")`.

    ## Use instead
    Keep forward to tensor computation and export again with `torch.jit.script` or
    `torch.jit.trace`; pass `--trust` only for files from a source you trust.

    ## References
    - PyTorch docs, "TorchScript": `torch.jit.load` and "TorchScript Language Reference".
    - PyTorch docs, `torch.from_file` and `torch.save`.
    """
    names = _names(model.unsafe_code)
    if names:
        yield Hit(
            message=f"TorchScript code runs {len(names)} operation(s) that are not pure tensor computation: "
            f"{'; '.join(names[:3])}{' ...' if len(names) > 3 else ''} (running it needs --trust)",
            values={"operations": names},
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
