"""Turn a model file into something torch can run, without running code from the file unasked.

- TorchScript: `torch.jit.load` (the archive's own code; it holds no pickled Python callables).
- Weights (state_dict, checkpoint, Lightning, safetensors, or a pickled module's tensors) plus
  `--arch`: the user's factory builds the network, the weights are read with bnlint's safe
  reader (`bnlint.loaders.weights.state_dict_arrays`) and loaded with strict key matching.
- A pickled nn.Module as a whole only with `--trust` (unpickling runs code named in the file).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from bnlint.errors import InputError, TrustRequired, UsageError
from bnlint.model import ModelInfo

WEIGHT_FORMATS = ("torch-state-dict", "torch-checkpoint", "lightning", "safetensors")


def import_target(target: str, flag: str = "--arch") -> Any:
    """Import `package.module` or `path/to/file.py` (the user's own code, run by their choice).

    The working directory is on the import path, as with `python -m`, so `mypkg.models` in the
    current folder is found. Any failure of the user's code is one UsageError line.
    """
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"{flag}: no such file {target}")
        name = f"bnlint_arch_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"{flag}: cannot import {target}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            module_spec.loader.exec_module(module)
        except BaseException as exc:  # noqa: BLE001 - the user's own code: report its failure in one line
            sys.modules.pop(name, None)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise UsageError(f"{flag}: importing {target} failed: {type(exc).__name__}: {exc}") from None
        return module
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise UsageError(f"{flag}: cannot import {target}: {exc} (run bnlint from the folder that holds the package, "
                         "or give path/to/file.py)") from None
    except BaseException as exc:  # noqa: BLE001 - the user's module raised while importing
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UsageError(f"{flag}: importing {target} failed: {type(exc).__name__}: {exc}") from None


def build_arch(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """`package.module:factory` or `path/to/file.py:factory`, called with kwargs; must return an nn.Module."""
    target, sep, attribute = spec.rpartition(":")
    if not sep or not target or not attribute:
        raise UsageError(f"--arch expects 'package.module:factory' or 'path/to/file.py:factory', got {spec!r}")
    module = import_target(target)
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UsageError(f"--arch: {target} has no callable {attribute!r}")
    try:
        built = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's factory
        raise UsageError(f"--arch: {spec}(**{dict(kwargs)}) raised {type(exc).__name__}: {exc}") from None
    if not isinstance(built, nn.Module):
        raise UsageError(f"--arch: {spec} returned {type(built).__name__}, not a torch.nn.Module")
    return built


def _common_prefix(keys: list[str]) -> str:
    heads = {k.split(".", 1)[0] for k in keys}
    return f"{heads.pop()}." if len(heads) == 1 and all("." in k for k in keys) else ""


# Keys wrappers add next to the wrapped model's own (torch.optim.swa_utils.AveragedModel's counter).
WRAPPER_EXTRAS = ("n_averaged",)


def match_keys(file_keys: list[str], model_keys: list[str]) -> tuple[dict[str, str], str | None]:
    """Map file keys to model keys, stripping or adding wrapper prefixes (`module.`, `model.`) if that fits better."""
    wanted = set(model_keys)
    own = [k for k in file_keys if k not in WRAPPER_EXTRAS]
    candidates: list[tuple[dict[str, str], str | None]] = [({k: k for k in own}, None)]
    keys, stripped = list(own), ""
    while keys and (prefix := _common_prefix(keys)) and len(stripped) < 200:
        stripped += prefix
        keys = [k[len(prefix):] for k in keys]
        candidates.append(({f: f[len(stripped):] for f in own}, f"stripped the key prefix '{stripped}'"))
    added = _common_prefix(model_keys)
    if added:
        candidates.append(({k: added + k for k in own}, f"added the key prefix '{added}'"))
    mapping, note = max(candidates, key=lambda c: len(wanted & set(c[0].values())))
    extras = [k for k in file_keys if k in WRAPPER_EXTRAS]
    if extras:
        note = "; ".join(filter(None, [note, f"ignored {', '.join(extras)} (an averaged-model wrapper's counter)"]))
    return mapping, note


def _listing(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... (+{len(keys) - limit})" if len(keys) > limit else shown


def load_weights(module: nn.Module, path: str, arch: str) -> tuple[list[str], dict[str, str]]:
    """Load the file's tensors into the module with strict matching. InputError on mismatch.

    Returns notes, and the file key each module key was loaded from (so that measured layers can
    be named as the file names them).
    """
    from bnlint.loaders.weights import state_dict_arrays

    arrays = state_dict_arrays(path)
    target = module.state_dict()
    mapping, note = match_keys(list(arrays), list(target))
    renamed = {mapping[k]: v for k, v in arrays.items() if k in mapping}
    missing = [k for k in target if k not in renamed]
    unexpected = [k for k in renamed if k not in target]
    notes = [f"weights: {note}"] if note else []
    counters = [k for k in missing if k.endswith("num_batches_tracked")]
    if counters and len(counters) == len(missing):
        notes.append("weights: the file has no num_batches_tracked counters (older checkpoint); kept the model's")
        missing = []
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_listing(unexpected)})")
        raise InputError(path, f"weights do not fit --arch {arch}: " + "; ".join(parts))
    wrong = [f"{k} {tuple(renamed[k].shape)} vs {tuple(target[k].shape)}" for k in target if k in renamed and tuple(renamed[k].shape) != tuple(target[k].shape)]
    if wrong:
        raise InputError(path, f"weights do not fit --arch {arch}: shape mismatch in {len(wrong)} tensor(s) (file vs model: {_listing(wrong, 3)})")
    state = {k: torch.from_numpy(np.array(v)) for k, v in renamed.items() if k in target}
    for key in counters:
        state.pop(key, None)
    module.load_state_dict(state, strict=not counters)
    return notes, {model_key: file_key for file_key, model_key in mapping.items()}


def open_torch(model: ModelInfo, arch: str | None, arch_kwargs: Mapping[str, Any], trust: bool, device: torch.device, data_path: str) -> Any:
    """A ModuleRunner or ScriptRunner for the file; never runs code from the file without --trust."""
    from bnlint.dynamic.torch_runner import ModuleRunner, ScriptRunner

    if model.format == "torchscript" and not arch:
        from bnlint.dynamic.torchscript_ir import require_safe

        if not trust:  # the text first: torch.jit.load itself runs __setstate__, so it must be hook-free
            from bnlint.loaders.torchscript_safety import torchscript_sources, unsafe_operations

            unsafe = unsafe_operations(torchscript_sources(model.path))
            if unsafe:
                listed = "; ".join(unsafe[:3]) + (f"; ... (+{len(unsafe) - 3})" if len(unsafe) > 3 else "")
                raise TrustRequired(model.path, f"TorchScript code uses {listed}: not recognised as pure tensor computation "
                                    "(running it could read or write files or print); pass --trust if you trust it")
        try:
            with warnings.catch_warnings():  # deprecated in favour of torch.export, which cannot read these files
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = torch.jit.load(model.path, map_location=device)
        except RuntimeError as exc:
            raise InputError(model.path, f"torch.jit.load failed: {str(exc).splitlines()[0]}") from None
        require_safe(scripted, model.path, trust)  # the compiled graph, whatever the text's spelling
        return ScriptRunner(scripted, device, data_path)
    if arch:
        module = build_arch(arch, arch_kwargs)
        notes, sources = load_weights(module, model.path, arch)
        runner = ModuleRunner(module, device, data_path, f"--arch {arch}")
        runner.notes.extend(notes)
        # module 'bn1' holds file keys 'model.bn1.*': the layer is 'model.bn1' to the static loader
        runner.file_names = {name: key.rsplit(".", 1)[0] for name in runner.bn
                             if (key := sources.get(f"{name}.running_var") or sources.get(f"{name}.weight"))}
        return runner
    if model.format == "torch-module":
        if not trust:
            raise TrustRequired(model.path, "is a pickled nn.Module: running it means unpickling code named in the file; "
                                "pass --trust if you trust it, or --arch package.module:factory to load only its weights")
        try:
            loaded = torch.load(model.path, map_location=device, weights_only=False)  # trusted: only with --trust, the user's explicit choice
        except ImportError as exc:  # the user's environment, not the file: name the import that failed
            name = getattr(exc, "name", None) or str(exc).strip().splitlines()[0][:200]
            raise InputError(model.path, f"unpickling the module (--trust) needs to import {name!s}, which failed here: "
                             f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else name}; "
                             "install the package the model was saved with (a matching torchvision build?), or use "
                             "--arch package.module:factory to load only its weights") from None
        except (AttributeError, ModuleNotFoundError) as exc:
            raise InputError(model.path, f"unpickling the module (--trust) failed: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:200]} (a class the file names is missing from the code "
                             "installed here)") from None
        if not isinstance(loaded, nn.Module):
            raise InputError(model.path, f"unpickled a {type(loaded).__name__}, not an nn.Module")
        return ModuleRunner(loaded, device, data_path, "trusted pickle")
    if model.format in WEIGHT_FORMATS:
        raise UsageError(f"{model.path}: holds weights only ({model.format}); give the network with --arch package.module:factory "
                         "(or path/to/file.py:factory) to run it on --data")
    raise UsageError(f"{model.path}: cannot run a {model.format} model with torch")
