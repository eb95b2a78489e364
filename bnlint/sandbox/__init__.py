"""Isolation: every execution of a model file happens in a child process (see isolate.py).

    measured = measure_isolated(model_info, "m.pt", None, DynamicOptions(data="d.npz"), config)

The parent never imports torch, onnxruntime or Keras for this: the child measures, streams its
progress, and sends back `Measurements` as data; the parent judges them with the rules.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from bnlint.errors import UsageError
from bnlint.sandbox.isolate import ModelRunError, Outcome, Walls, arch_is_module, arch_target, default_timeout, run_job, set_quiet

if TYPE_CHECKING:
    from bnlint.config import Config
    from bnlint.dynamic.options import DynamicOptions
    from bnlint.measurements import Measurements
    from bnlint.model import ModelInfo

__all__ = ["ModelRunError", "Outcome", "Walls", "config_record", "default_timeout", "measure_isolated", "preload_for", "run_job"]


def config_record(config: Config) -> dict[str, Any]:
    """The Config as JSON for the child (it rebuilds the same frozen Config)."""
    return {"select": list(config.select), "ignore": list(config.ignore), "fail_on": config.fail_on,
            "per_layer_ignores": {k: list(v) for k, v in config.per_layer_ignores.items()},
            "thresholds": dict(config.thresholds), "dynamic": dict(config.dynamic), "exclude": list(config.exclude),
            "source": config.source}


def arch_file(arch: str | None) -> str | None:
    """The folder of an --arch given as path/file.py:factory (its imports are its neighbours)."""
    if not arch or arch_is_module(arch):
        return None
    from pathlib import Path

    return str(Path(arch_target(arch)).resolve().parent)


PRELOAD = {"torch": ["torch"], "onnxruntime": ["onnxruntime", "onnx"], "keras": ["torch"]}  # engines a fork server imports once


def preload_for(file_format: str | None) -> list[str]:
    """What the fork server should import before forking a run of this format (its record's engine)."""
    from bnlint.formats import FORMATS

    record = FORMATS.get(file_format or "")
    return list(PRELOAD.get(record.extra or "", [])) if record is not None else []


def measure_isolated(model: ModelInfo, path: str, companion: str | None, options: DynamicOptions, config: Config) -> Measurements:
    """`bnlint.dynamic.measure` for a model file, run in the isolated child."""
    from bnlint.budget import paused
    from bnlint.dynamic.options import dynamic_settings
    from bnlint.measurements import Measurements

    settings = dynamic_settings(config)  # bad settings are usage errors here, before any child starts
    from bnlint.formats import FORMATS

    record = FORMATS.get(model.file_format or "")
    if record is not None and record.runner is None:  # said here: no child is started for nothing
        raise UsageError(record.cannot_run or f"running a {record.description} on --data is not supported")
    from bnlint.dynamic.data import Dataset

    # The data's headers (shapes, dtypes, sizes, zip structure) are read as data here too: a broken
    # sample is one line at once, without starting a child and its framework (the child reads it again).
    Dataset(options.data, max_samples=settings.max_samples)
    timeout = options.timeout or settings.timeout or default_timeout([path, options.data])
    set_quiet(options.quiet)
    job = {"kind": "measure", "model": path, "companion": companion, "options": dataclasses.asdict(options),
           "config": config_record(config)}
    from pathlib import Path

    folders = [str(Path(p).resolve().parent) for p in (path, companion) if p]  # external data lives beside the model
    with paused():  # the child has its own deadline
        outcome = run_job(job, reads=[*folders, options.data, arch_file(options.arch) or ""], trust=options.trust,
                          device=options.device or settings.device, timeout=float(timeout), describe=model.path,
                          preload=preload_for(model.file_format))
    try:
        measured = outcome.result
        if not isinstance(measured, Measurements):
            raise ModelRunError(model.path, "the isolated run sent back something other than measurements")
        measured.notes.extend(outcome.notes)
        return measured
    finally:
        import shutil

        shutil.rmtree(outcome.folder, ignore_errors=True)


def warm_up(paths: list[str], options: DynamicOptions) -> None:
    """Start the fork server for a --data run and have it import the engines these files need while
    the parent reads and lints them statically (two cores: the imports overlap the static work)."""
    from pathlib import Path

    from bnlint.errors import BnlintError
    from bnlint.loaders import detect
    from bnlint.sandbox import forkserver
    from bnlint.sandbox.isolate import _server_environment, _sys_path

    preload: list[str] = []
    for path in paths[:8]:
        try:
            record = detect(Path(path))
        except (BnlintError, OSError):
            continue
        preload += [module for module in preload_for(record.kind) if module not in preload]
    if preload:
        forkserver.warm(_sys_path(arch_is_module(options.arch)), _server_environment(), preload)
