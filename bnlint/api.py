"""Lint files: load each safely, measure it on data when asked, run every rule once, apply a baseline.

This is the one orchestration path: the CLI (which only parses flags and prints) and the Python
API both call `lint_paths`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Sequence

from bnlint.budget import static_budget
from bnlint.config import Config
from bnlint.errors import BnlintError, InputError, ModelPlaceholder, NotAModel, UnsafeInputError
from bnlint.findings import FileError, FileResult, Finding, Report
from bnlint.loaders import CAFFE_EXTENSIONS, load_model
from bnlint.model import ModelInfo

if TYPE_CHECKING:
    from bnlint.measurements import Measurements


# lint_file's skip_unrecognised for what a folder search found: plain data files become notes
# (`_data_file`); anything else that is no model stays an error.
DATA_FILES: Literal["data"] = "data"


@dataclass(frozen=True)
class ModelInput:
    """One model to lint: a file, and the file that completes it (a caffemodel's deploy prototxt)."""

    path: Path
    companion: Path | None = None
    # Found by a folder search (by its extension), not named: a file there in no model format (ONNX
    # test data, a CoreML weight.bin, an HDF5 dataset) is skipped with a note, not an error.
    searched: bool = False


def _caffe_pairs(files: list[Path]) -> list[ModelInput]:
    """Pair each .caffemodel with its .prototxt: same stem, else a unique stem that extends the
    other (`net.caffemodel` + `net_deploy.prototxt`), else the only prototxt beside the only
    caffemodel (or the only two Caffe files given). A paired prototxt is linted with its model.
    """
    models = [f for f in files if f.suffix.lower() == ".caffemodel"]
    texts = [f for f in files if f.suffix.lower() == ".prototxt"]
    paired: dict[Path, Path] = {}
    for model in models:
        here = [t for t in texts if t.parent == model.parent and t not in paired.values()]
        same = [t for t in here if t.stem == model.stem]
        if not same:
            same = [t for t in here if t.stem.startswith(model.stem) or model.stem.startswith(t.stem)]
        if len(same) == 1:
            paired[model] = same[0]
        else:
            alone = [m for m in models if m.parent == model.parent]
            beside = [t for t in texts if t.parent == model.parent]
            if len(alone) == 1 and len(beside) == 1 and beside[0] not in paired.values():
                paired[model] = beside[0]
    if len(models) == 1 and len(texts) == 1 and not paired:
        paired[models[0]] = texts[0]  # `bnlint deploy.prototxt weights/model.caffemodel`
    used = set(paired.values())
    return [ModelInput(f, paired.get(f)) for f in files if f not in used]


def expand_paths(paths: Iterable[str | os.PathLike[str]], exclude: Sequence[str] = ()) -> tuple[list[ModelInput], list[str]]:
    """Files as given, folders searched for model files (bnlint.discovery), Caffe pairs joined.

    Returns the models and notes about folders with no model file in them.
    """
    from bnlint.discovery import discover

    searched: set[Path] = set()
    files, notes = discover(paths, exclude, searched=searched)
    inputs = _caffe_pairs(files) if any(f.suffix.lower() in CAFFE_EXTENSIONS for f in files) else [ModelInput(f) for f in files]
    return [dataclasses.replace(item, searched=item.path in searched) for item in inputs], notes


def _display(path: Path) -> str:
    """Paths relative to the working directory when under it (stable output for CI and SARIF)."""
    try:  # absolute, not resolved: a symlink is shown under its own name
        return Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(Path.cwd()))).as_posix()
    except ValueError:
        return path.as_posix()


def lint_file(path: Path, config: Config, *, reference: ModelInfo | None = None, dynamic: Any = None,
              skip_unrecognised: bool | Literal["data"] = False, notes: list[str] | None = None, companion: Path | None = None,
              measured: Measurements | None = None, model: ModelInfo | None = None) -> FileResult | None:
    """Lint one file; any unreadable input becomes FileResult.error, never an exception.

    `model`: this file already loaded (`bnlint fix` judges its input without reading it again).

    With skip_unrecognised, a file in no model format (a Git LFS pointer, a plain HDF5 data
    file) gives a note in `notes` and None instead of an error; with DATA_FILES (what a folder
    search found), only a file that is plain data (`_data_file`).
    """
    shown = _display(path)
    result = FileResult(path=shown)
    try:
        result.size = os.path.getsize(path)
    except OSError:
        result.size = None
    try:
        with static_budget(shown):
            model = model if model is not None else load_model(path, companion)
            model.path = shown
            try:
                _analyse(result, model, config, reference=reference, dynamic=dynamic, source=(path, companion), measured=measured)
            except DynamicNotRun as failed:  # the static findings stand; only the dynamic part did not run
                result.dynamic_error = _own_problem(failed.cause, path, shown)
    except BnlintError as exc:  # unreadable file, a tensor that cannot be decoded, unusable --data
        if isinstance(exc, NotAModel) and (skip_unrecognised is True or skip_unrecognised == DATA_FILES and _data_file(path, exc)):
            if notes is not None:
                notes.append(f"{shown}: skipped: {exc.problem}")
            return None
        result.error = FileError(path=shown, message=_problem(exc, path))
        if isinstance(exc, UnsafeInputError):  # the pickle scan's findings survive the failed load
            result.findings.extend(_pickle_findings(exc, shown, config))
    except (Exception, RecursionError) as exc:  # noqa: BLE001 - a bug or an input no check foresaw: still one line
        if os.environ.get("BNLINT_DEBUG"):
            raise
        text = (str(exc).strip().splitlines() or [""])[0][:200]
        result.error = FileError(path=shown, message=f"internal error while linting: {type(exc).__name__}: {text} "
                                 "(please report it; BNLINT_DEBUG=1 or --debug shows the traceback)")
    return result


class DynamicNotRun(Exception):
    """Measuring on --data failed after the static rules ran (`_analyse`); `cause` says why."""

    def __init__(self, cause: BnlintError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _pickle_findings(exc: UnsafeInputError, shown: str, config: Config) -> list[Finding]:
    """BN001/BN003 for a file whose pickles were scanned but that could not be loaded."""
    from bnlint.context import RuleContext
    from bnlint.engine import run_rules
    from bnlint.rules.meta import PICKLE_SAFETY_CODES

    model = ModelInfo(path=shown, format="torch-checkpoint", unsafe_globals=list(exc.unsafe_globals),
                      unknown_callables=list(exc.unknown_callables))
    return [f for f in run_rules(RuleContext(model=model, config=config)) if f.code in PICKLE_SAFETY_CODES]


def _analyse(result: FileResult, model: ModelInfo, config: Config, *, reference: ModelInfo | None = None,
             dynamic: Any = None, module: Any = None, source: tuple[Path, Path | None] | None = None,
             measured: Measurements | None = None) -> None:
    """Measure (given data), then every rule once over static + measured facts, into `result`:
    the one path for files and live modules.

    A model file runs only in the isolated child (bnlint.sandbox); a live module from the Python
    API is the caller's own object and runs where it is. When measuring fails (the model cannot
    be run, its deadline passed, it crashed), the static findings are still reported and the
    failure is raised as DynamicNotRun: the file was read, so its line says the dynamic part did
    not run, not that the file is unreadable. `measured`: measurements already made (fix).
    """
    from bnlint.context import RuleContext
    from bnlint.engine import run_rules

    result.format = model.format
    result.framework = model.framework
    result.layer_count = len(model.layers)
    result.notes.extend(model.notes)
    measurements = measured
    failure: BnlintError | None = None
    if dynamic is not None and measurements is None:
        try:
            if module is not None or source is None:
                from bnlint.dynamic import measure

                measurements = measure(model, dynamic, config, module)
            else:
                from bnlint.sandbox import measure_isolated

                measurements = measure_isolated(model, str(source[0]), None if source[1] is None else str(source[1]), dynamic, config)
        except BnlintError as exc:
            failure = exc
    if measurements is not None:
        result.layer_stats.extend(measurements.layer_stats)
        result.notes.append(f"dynamic analysis ran on {measurements.engine} over {measurements.samples} samples")
        result.notes.extend(measurements.notes)
    result.findings.extend(run_rules(RuleContext(model=model, config=config, reference=reference, measurements=measurements)))
    if failure is not None:
        raise DynamicNotRun(failure)


def _problem(exc: BnlintError, path: Path) -> str:
    """The message for a FileError of `path`: the problem alone when it is about that file,
    prefixed with the other file's name otherwise (a --data sample, a reference checkpoint)."""
    if isinstance(exc, InputError) and Path(exc.path) == path:
        return exc.problem
    return str(exc)


def _own_problem(exc: BnlintError, path: Path, shown: str) -> str:
    """`_problem`, also without the file's own name when the error (rebuilt from the isolated
    child) names it as text: the line already starts with it."""
    text = _problem(exc, path)
    for name in (str(path), shown):
        if text.startswith(f"{name}: "):
            return text[len(name) + 2:]
    return text


def _data_file(path: Path, exc: NotAModel) -> bool:
    """A file a folder search may skip: no model in it, under an extension data shares with models
    (formats.DATA_EXTENSIONS), and not a Git LFS pointer standing in for a model."""
    from bnlint.formats import DATA_EXTENSIONS

    return not isinstance(exc, ModelPlaceholder) and path.name.lower().endswith(DATA_EXTENSIONS)


def lint_paths(
    paths: Sequence[str | os.PathLike[str]],
    config: Config | None = None,
    *,
    reference: str | os.PathLike[str] | None = None,
    dynamic: Any = None,
    skip_unrecognised: bool = False,
    baseline: str | os.PathLike[str] | None = None,
    jobs: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Lint every file; files in no model format become notes, not errors, when a folder search
    found them, and all of them with skip_unrecognised.

    With `baseline`, findings recorded in that baseline file are dropped (see bnlint.baseline).
    `jobs` > 1 lints files in that many worker processes (results in input order; each worker
    holds one file at a time, so memory does not grow with the number of files). `progress` is
    called with (files done, total) after each file.
    """
    config = config or Config()
    inputs, notes = expand_paths(paths, config.exclude)
    reference_model = load_model(Path(reference)) if reference else None
    report = Report(notes=notes)
    tasks: list[tuple[Path, Path | None, bool | Literal["data"]]] = [
        (item.path, item.companion, True if skip_unrecognised else DATA_FILES if item.searched else False) for item in inputs]
    if dynamic is not None and tasks and jobs <= 1:
        from bnlint.sandbox import warm_up

        warm_up([str(path) for path, _, _ in tasks], dynamic)
    if jobs > 1 and len(tasks) > 1:
        results = _parallel(tasks, config, reference_model, dynamic, jobs, progress)
    else:
        results = []
        for done, (path, companion, skip) in enumerate(tasks, start=1):
            results.append(_one(path, companion, config, reference_model, dynamic, skip))
            if progress is not None:
                progress(done, len(tasks))
    for result, file_notes in results:
        report.notes.extend(file_notes)
        if result is not None:
            report.files.append(result)
    if baseline is not None:
        from bnlint.baseline import apply_baseline

        apply_baseline(report, baseline)
    return report


def _one(path: Path, companion: Path | None, config: Config, reference: ModelInfo | None, dynamic: Any,
         skip_unrecognised: bool | Literal["data"]) -> tuple[FileResult | None, list[str]]:
    notes: list[str] = []
    result = lint_file(path, config, reference=reference, dynamic=dynamic, skip_unrecognised=skip_unrecognised,
                       notes=notes, companion=companion)
    return result, notes


def _chunk(args: tuple[list[tuple[Path, Path | None, bool | Literal["data"]]], Config, ModelInfo | None, Any]
           ) -> list[tuple[FileResult | None, list[str]]]:
    tasks, config, reference, dynamic = args
    return [_one(path, companion, config, reference, dynamic, skip) for path, companion, skip in tasks]


def _parallel(tasks: list[tuple[Path, Path | None, bool | Literal["data"]]], config: Config, reference: ModelInfo | None, dynamic: Any,
              jobs: int, progress: Callable[[int, int], None] | None) -> list[tuple[FileResult | None, list[str]]]:
    """lint_file over worker processes, in chunks (a file often takes milliseconds: one message per
    file would cost more than the work), results in input order."""
    import concurrent.futures
    import multiprocessing
    import threading

    # torch and fork do not mix; nor does fork with other Python threads alive (a lock one of them
    # holds, the import lock say, would stay locked in every worker): spawn then.
    context = multiprocessing.get_context("spawn" if dynamic is not None or threading.active_count() > 1 else None)
    size = max(1, min(64, -(-len(tasks) // (jobs * 4))))
    chunks = [tasks[i:i + size] for i in range(0, len(tasks), size)]
    results: list[tuple[FileResult | None, list[str]]] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        for part in pool.map(_chunk, [(chunk, config, reference, dynamic) for chunk in chunks]):
            results.extend(part)
            if progress is not None:
                progress(len(results), len(tasks))
    return results


def lint(
    path_or_module: Any,
    data: Any = None,
    config: Config | None = None,
    **options: Any,
) -> Report:
    """The Python API: lint a model file, a folder, a list of paths, or a live ``torch.nn.Module``.

    Returns the same Report (and findings) as the CLI. ``data`` enables the dynamic checks: a path
    (.npz, .npy, a folder of shards), an array or torch tensor (samples first), a dict of arrays
    by model input name, or an iterable of batches of those;
    ``options`` are DynamicOptions fields (batch_size, arch, device, ...), ``reference`` and
    ``baseline`` (a baseline file, as with the CLI's --baseline).
    Unreadable files are in ``report.errors``; nothing is raised for them.
    """
    if data is not None and not isinstance(data, (str, os.PathLike)):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bnlint-data-") as folder:
            return lint(path_or_module, _materialise(data, Path(folder)), config, **options)
    config = config or Config()
    reference = options.pop("reference", None)
    baseline = options.pop("baseline", None)
    dynamic = None
    if data is not None:
        from bnlint.dynamic import DynamicOptions

        dynamic = DynamicOptions(data=os.fspath(data), **options)
    elif options:
        raise TypeError(f"options {sorted(options)} need data=")
    if hasattr(path_or_module, "named_modules"):
        report = Report(files=[lint_module(path_or_module, config, dynamic=dynamic)])
        if baseline is not None:
            from bnlint.baseline import apply_baseline

            apply_baseline(report, baseline)
        return report
    paths = [path_or_module] if isinstance(path_or_module, (str, os.PathLike)) else list(path_or_module)
    return lint_paths(paths, config, reference=reference, dynamic=dynamic, baseline=baseline)


def _materialise(data: Any, folder: Path) -> Path:
    """In-memory data for the API: an array (samples first), a dict of arrays (model input name ->
    array), or an iterable of batches of either, written as .npz shards the data reader streams
    (one shard per batch, so an iterable is never held in memory at once)."""
    import numpy as np

    def arrays(item: Any) -> dict[str, Any]:
        if isinstance(item, dict):
            return {str(k): np.asarray(v) for k, v in item.items()}
        if hasattr(item, "detach"):  # a torch tensor
            item = item.detach().cpu().numpy()
        return {"input": np.asarray(item)}

    if isinstance(data, dict) or hasattr(data, "shape"):
        np.savez(folder / "data.npz", **arrays(data))
        return folder / "data.npz"
    count = 0
    for count, batch in enumerate(data, start=1):
        np.savez(folder / f"batch-{count:09d}.npz", **arrays(batch))
    if not count:
        raise TypeError("data= is an empty iterable")
    return folder


def lint_module(module: Any, config: Config, *, dynamic: Any = None, name: str = "<module>") -> FileResult:
    """Lint a live nn.Module the caller holds (no file; with data, the model runs where it is)."""
    from bnlint.loaders.live_module import module_to_model

    result = FileResult(path=name)
    try:
        _analyse(result, module_to_model(module, name), config, dynamic=dynamic, module=module)
    except DynamicNotRun as failed:
        result.dynamic_error = str(failed.cause)
    return result
