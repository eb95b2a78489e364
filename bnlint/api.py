"""Lint files: load each safely, run the static rules (and the dynamic ones given data).

This is the one orchestration path: the CLI and the Python API both call `lint_paths`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from bnlint.config import Config
from bnlint.errors import BnlintError, InputError, NotAModel
from bnlint.findings import FileError, FileResult, Report
from bnlint.loaders import is_model_file, load_model


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[str]]:
    """Files as given, folders searched recursively for model files (sorted, deterministic).

    Returns the files and notes about folders with no model file in them.
    """
    files: list[Path] = []
    notes: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_model_file(p))
            if not found:
                notes.append(f"{path}: no model files found")
            files.extend(found)
        else:
            files.append(path)
    unique = list(dict.fromkeys(files))
    return unique, notes


def _display(path: Path) -> str:
    """Paths relative to the working directory when under it (stable output for CI and SARIF)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def lint_file(path: Path, config: Config, *, reference: Any = None, dynamic: Any = None,
              skip_unrecognised: bool = False, notes: list[str] | None = None) -> FileResult | None:
    """Lint one file; any unreadable input becomes FileResult.error, never an exception.

    With skip_unrecognised, a file in no model format (a Git LFS pointer, say) gives a note in
    `notes` and None instead of an error.
    """
    shown = _display(path)
    result = FileResult(path=shown)
    try:
        model = load_model(path)
        model.path = shown
        _analyse(result, model, config, reference=reference, dynamic=dynamic)
    except BnlintError as exc:  # unreadable file, a tensor that cannot be decoded, unusable --data
        if skip_unrecognised and isinstance(exc, NotAModel):
            if notes is not None:
                notes.append(f"{shown}: skipped: {exc.problem}")
            return None
        result.error = FileError(path=shown, message=_problem(exc, path))
    return result


def _analyse(result: FileResult, model: Any, config: Config, *, reference: Any = None, dynamic: Any = None, module: Any = None) -> None:
    """Static rules, then (given data) the dynamic analysis, into `result`: the one path for files and live modules."""
    from bnlint.engine import RuleContext, run_rules

    result.format = model.format
    result.layer_count = len(model.layers)
    result.notes.extend(model.notes)
    result.findings.extend(run_rules(RuleContext(model=model, config=config, reference=reference)))
    if dynamic is not None:
        from bnlint.dynamic import run_dynamic

        outcome = run_dynamic(model, dynamic, config, module)
        result.findings.extend(outcome.findings)
        result.layer_stats.extend(outcome.layer_stats)
        result.notes.append(f"dynamic analysis ran on {outcome.engine} over {outcome.samples} samples")
        result.notes.extend(outcome.notes)
    result.findings.sort(key=lambda f: f.sort_key())


def _problem(exc: BnlintError, path: Path) -> str:
    """The message for a FileError of `path`: the problem alone when it is about that file,
    prefixed with the other file's name otherwise (a --data sample, a reference checkpoint)."""
    if isinstance(exc, InputError) and Path(exc.path) == path:
        return exc.problem
    return str(exc)


def lint_paths(
    paths: Sequence[str | os.PathLike[str]],
    config: Config | None = None,
    *,
    reference: str | os.PathLike[str] | None = None,
    dynamic: Any = None,
    skip_unrecognised: bool = False,
) -> Report:
    """Lint every file; with skip_unrecognised, files in no model format become notes, not errors."""
    config = config or Config()
    files, notes = expand_paths(paths)
    reference_model = load_model(Path(reference)) if reference else None
    report = Report(notes=notes)
    for file in files:
        result = lint_file(file, config, reference=reference_model, dynamic=dynamic,
                           skip_unrecognised=skip_unrecognised, notes=report.notes)
        if result is not None:
            report.files.append(result)
    return report


def lint(
    path_or_module: Any,
    data: str | os.PathLike[str] | None = None,
    config: Config | None = None,
    **options: Any,
) -> Report:
    """The Python API: lint a model file, a folder, a list of paths, or a live ``torch.nn.Module``.

    Returns the same Report (and findings) as the CLI. ``data`` enables the dynamic checks;
    ``options`` are DynamicOptions fields (batch_size, arch, device, ...) and ``reference``.
    Unreadable files are in ``report.errors``; nothing is raised for them.
    """
    config = config or Config()
    reference = options.pop("reference", None)
    dynamic = None
    if data is not None:
        from bnlint.dynamic import DynamicOptions

        dynamic = DynamicOptions(data=os.fspath(data), **options)
    elif options:
        raise TypeError(f"options {sorted(options)} need data=")
    if hasattr(path_or_module, "named_modules"):
        return Report(files=[lint_module(path_or_module, config, dynamic=dynamic)])
    paths = [path_or_module] if isinstance(path_or_module, (str, os.PathLike)) else list(path_or_module)
    return lint_paths(paths, config, reference=reference, dynamic=dynamic)


def lint_module(module: Any, config: Config, *, dynamic: Any = None, name: str = "<module>") -> FileResult:
    """Lint a live nn.Module the caller holds (no file; with data, the model runs where it is)."""
    from bnlint.loaders.live_module import module_to_model

    result = FileResult(path=name)
    _analyse(result, module_to_model(module, name), config, dynamic=dynamic, module=module)
    return result
