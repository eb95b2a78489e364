"""The format registry: one record per file format, and the only place that knows the formats.

A record says how to recognise a file (or a folder) of that format from its content, how to
read it, which conventions row (framework) it belongs to, how to run it on data and how to fix
it, what to install when that needs an optional engine, and which facts its loader records (the
rule matrix is computed from those: `bnlint rules --format markdown`). `bnlint.loaders.detect`,
the folder search, the dynamic runner choice and `bnlint fix` iterate these records; nothing
else branches on a format. A new format is one loader module plus one `register_format` call.

Functions are named as "module:function" and imported only when used, so the registry costs
nothing at import time (fsspec's `known_implementations` works the same way).
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from bnlint.conventions import CONVENTIONS

# Facts a loader may record, which rules declare they read (RuleSpec.reads). A rule applies to a
# framework when every fact it reads is recorded by one of that framework's formats.
FACTS = {
    "pickles": "pickled objects whose globals loading would call (BN001, BN003)",
    "torchscript-code": "TorchScript code that would run (BN004)",
    "counter": "how many batches updated the statistics (num_batches_tracked)",
    "checkpoint-keys": "the checkpoint's key layout (averaged-model buffers, wrapper prefixes)",
    "track-running-stats": "whether the layer keeps running statistics at all",
    "cumulative-momentum": "momentum=None (a cumulative average)",
    "module-modes": "each module's saved train/eval flag",
    "requires-grad": "which parameters were frozen",
    "traced-calls": "batch_norm calls baked into a traced graph",
    "keras-config": "Keras layer options (axis, renorm, virtual batch size, synchronized)",
    "trainable": "Keras trainable flags, the layer's own and the enclosing models'",
    "graph-modes": "BatchNorm nodes in training form in an inference graph",
    "graph-statistics": "statistics computed inside the graph",
    "graph": "the op graph around each BatchNorm (producers, folding)",
    "graph-inputs": "the graph's runtime inputs with their shapes (a batch fixed at export)",
    "folded-graph": "linear ops into which BatchNorm may have been folded",
    "producers": "the op feeding each BatchNorm (its bias)",
    "deploy-pair": "a deploy definition paired with a trained weights file",
    "run": "running the model on --data (the dynamic rules)",
}


@dataclass(frozen=True)
class FormatRecord:
    """One file format: recognise, read, run, fix."""

    kind: str  # the registry key, e.g. "torch-zip"
    framework: str  # its row of bnlint.conventions
    description: str  # for messages ("ONNX model")
    loader: str  # "module:function"(path, companion) -> ModelInfo
    # (priority, "module:function"(Sniff) -> bool): detect tries every record's sniffers by priority.
    sniffers: tuple[tuple[int, str], ...] = ()
    folder: str | None = None  # "module:function"(Path) -> bool: a folder that is one model of this format
    extensions: tuple[str, ...] = ()  # what the folder search looks for
    companions: tuple[str, ...] = ()  # globs of files that belong to another file or folder of this format
    extractor: str | None = None  # "module:function"(path) -> Extracted: torch tensors for --arch
    runner: str | None = None  # "module:function"(model, options, settings) -> Runner
    cannot_run: str | None = None  # why the format cannot run on --data, when runner is None
    fixer: str | None = None  # "module:function"(info, options, outcome, target) -> None
    extra: str | None = None  # the optional dependency its runner and fixer need, for messages
    # The module (and its name in messages) its fixer cannot start without: checked in the parent,
    # in one line, before an isolated child is started.
    engine: tuple[str, str] | None = None
    records: frozenset[str] = field(default_factory=frozenset)  # FACTS its loader records

    def function(self, spec: str) -> Callable[..., Any]:
        return function_at(spec)


def folder_format(path: str | Path) -> FormatRecord | None:
    """The record of the folder format `path` is one model of (a SavedModel directory), else None."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    return next((r for r in FORMATS.values() if r.folder is not None and r.function(r.folder)(folder)), None)


def plugin_modules() -> list[str]:
    """Modules outside bnlint that registered formats: an isolated child imports them too, so a
    format registered from a plugin is known wherever bnlint reads or runs a model."""
    modules = {record.loader.partition(":")[0] for record in FORMATS.values()}
    return sorted(m for m in modules if m != "bnlint" and not m.startswith("bnlint."))


def function_at(spec: str) -> Callable[..., Any]:
    """The function a "module:function" spec names, imported now."""
    module, _, name = spec.partition(":")
    found: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return found


# Files that look like a model but are not one, each with a one-line reason (raised as NotAModel
# by the function), tried among the sniffers by priority: (priority, "module:function"(Sniff) -> bool).
NOT_MODELS: list[tuple[int, str]] = [(65, "bnlint.loaders.sniff:lfs_pointer"), (83, "bnlint.loaders.sniff:onnx_tensor")]

# Extensions model files share with plain data (an ONNX TensorProto .pb, a CoreML weight.bin, an
# HDF5 dataset): a file a folder search finds by one of these and that holds no model is noted and
# skipped. Under a model-only extension (.pt, .onnx, ...) an unrecognised file stays an error: it may
# be a model in a form the sniffers miss, and a skipped one would pass unchecked.
DATA_EXTENSIONS = (".bin", ".pb", ".h5", ".hdf5")

_FORMATS: dict[str, FormatRecord] = {}
FORMATS: Mapping[str, FormatRecord] = types.MappingProxyType(_FORMATS)


def register_format(record: FormatRecord) -> FormatRecord:
    """Add a format (a loader module's one line of registration); checked against the conventions
    table and the fact vocabulary so a typo fails at import, not in a user's run."""
    if record.framework not in CONVENTIONS:
        raise ValueError(f"format {record.kind}: framework {record.framework!r} has no conventions row")
    unknown = set(record.records) - set(FACTS)
    if unknown:
        raise ValueError(f"format {record.kind}: unknown facts {sorted(unknown)}")
    _FORMATS[record.kind] = record
    return record


def frameworks() -> tuple[str, ...]:
    """Every framework, listed once: the conventions table's rows."""
    return tuple(CONVENTIONS)


def facts_of(framework: str) -> frozenset[str]:
    """What the formats of one framework record, together."""
    return frozenset().union(*(r.records for r in FORMATS.values() if r.framework == framework))


def is_model_folder(path: Path) -> bool:
    """A folder that is one model of some format (a SavedModel directory): linted, not searched."""
    return folder_format(path) is not None


def is_companion(path: Path) -> bool:
    """A file that belongs to another model file or folder (a checkpoint's data shard): never linted alone."""
    import fnmatch

    name = path.name.lower()
    return any(fnmatch.fnmatchcase(name, pattern) for record in FORMATS.values() for pattern in record.companions)


def model_extensions() -> tuple[str, ...]:
    return tuple(dict.fromkeys(ext for record in FORMATS.values() for ext in record.extensions))


@dataclass
class Sniff:
    """What a sniffer sees of a file: its path, suffix and first bytes (more on request)."""

    path: Path
    head: bytes

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower()

    def window(self, size: int = 1 << 16) -> bytes:
        if len(self.head) < 512 or size <= len(self.head):
            return self.head
        from bnlint.fileio import open_regular

        with open_regular(self.path) as handle:
            return handle.read(size)


def _torch_records() -> frozenset[str]:
    return frozenset({"pickles", "torchscript-code", "counter", "checkpoint-keys", "track-running-stats", "cumulative-momentum",
                      "module-modes", "requires-grad", "traced-calls", "run"})


TORCH_RUNNER = "bnlint.dynamic.openers:open_torch_runner"
TORCH_FIXER = "bnlint.fix.run:fix_torch"

register_format(FormatRecord(
    "torch-zip", "torch", "PyTorch zip checkpoint or TorchScript archive", "bnlint.loaders.torch_zip:load_torch_zip",
    sniffers=((20, "bnlint.loaders.sniff:torch_zip"),), extensions=(".pt", ".pth", ".ckpt", ".bin", ".pth.tar", ".jit"),
    extractor="bnlint.loaders.torch_zip:extract_torch_zip", runner=TORCH_RUNNER, fixer=TORCH_FIXER, extra="torch",
    records=_torch_records()))
register_format(FormatRecord(
    "torch-pickle", "torch", "legacy PyTorch pickle", "bnlint.loaders.torch_legacy:load_torch_legacy",
    sniffers=((30, "bnlint.loaders.sniff:torch_tar"), (60, "bnlint.loaders.sniff:pickle_protocol2"),
              (80, "bnlint.loaders.sniff:pickle_text")),
    extensions=(".pt", ".pth", ".ckpt", ".bin", ".pth.tar"), extractor="bnlint.loaders.torch_legacy:extract_torch_legacy",
    runner=TORCH_RUNNER, fixer=TORCH_FIXER, extra="torch", records=_torch_records()))
register_format(FormatRecord(
    "safetensors", "torch", "safetensors file", "bnlint.loaders.safetensors_file:load_safetensors",
    sniffers=((50, "bnlint.loaders.sniff:safetensors"),), extensions=(".safetensors",),
    extractor="bnlint.loaders.safetensors_file:extract_safetensors", runner=TORCH_RUNNER, fixer=TORCH_FIXER, extra="torch",
    records=frozenset({"counter", "checkpoint-keys", "run"})))
register_format(FormatRecord(
    "onnx", "onnx", "ONNX model", "bnlint.loaders.onnx_file:load_onnx",
    sniffers=((70, "bnlint.loaders.sniff:onnx_by_suffix"), (95, "bnlint.loaders.sniff:onnx_by_content")),
    extensions=(".onnx",), runner="bnlint.dynamic.openers:open_onnx_runner", fixer="bnlint.fix.run:fix_onnx",
    extra="onnxruntime", records=frozenset({"graph-modes", "graph-statistics", "graph", "graph-inputs", "folded-graph", "producers", "run"})))
register_format(FormatRecord(
    "keras", "keras", "Keras model (.keras or HDF5)", "bnlint.loaders.keras_file:load_keras",
    sniffers=((10, "bnlint.loaders.sniff:keras_zip"), (40, "bnlint.loaders.sniff:hdf5")),
    extensions=(".keras", ".h5", ".hdf5"), runner="bnlint.dynamic.openers:open_keras_runner", fixer="bnlint.fix.run:fix_keras",
    extra="keras", records=frozenset({"keras-config", "trainable", "producers", "run"})))
register_format(FormatRecord(
    "caffe", "caffe", "Caffe model (.caffemodel / .prototxt)", "bnlint.loaders.caffe_file:load_caffe",
    sniffers=((90, "bnlint.loaders.sniff:caffe_by_suffix"),), extensions=(".caffemodel", ".prototxt"),
    cannot_run="running a Caffe model on --data is not supported (no Caffe runtime is bundled); convert it to ONNX to "
    "measure drift, or lint it statically",
    records=frozenset({"graph-modes", "deploy-pair", "graph", "graph-inputs", "producers"})))
TF_CANNOT_RUN = ("running a frozen TensorFlow GraphDef on --data is not supported (only SavedModels run); lint it "
                 "statically, or convert it to ONNX (tf2onnx) and run that")
register_format(FormatRecord(
    "tf-savedmodel", "tensorflow", "TensorFlow SavedModel", "bnlint.loaders.tf_savedmodel:load_tf_savedmodel",
    sniffers=((85, "bnlint.loaders.tf_savedmodel:sniff"),), folder="bnlint.loaders.tf_savedmodel:is_savedmodel_dir",
    extensions=(".pb",), companions=("keras_metadata.pb", "fingerprint.pb"), runner="bnlint.dynamic.tf_runner:open_tf_runner",
    fixer="bnlint.fix.tf_fix:fix_tf", extra="tensorflow", engine=("tensorflow", "TensorFlow"),
    records=frozenset({"graph-modes", "graph-statistics", "graph", "folded-graph", "producers", "trainable", "run"})))
register_format(FormatRecord(
    "tf-graphdef", "tensorflow", "TensorFlow frozen GraphDef", "bnlint.loaders.tf_graphdef:load_tf_graphdef",
    sniffers=((86, "bnlint.loaders.tf_graphdef:sniff"),), extensions=(".pb",), cannot_run=TF_CANNOT_RUN, extra="tensorflow",
    records=frozenset({"graph-modes", "graph", "folded-graph", "producers"})))
register_format(FormatRecord(
    "tf-checkpoint", "tensorflow", "TensorFlow checkpoint", "bnlint.loaders.tf_bundle:load_tf_checkpoint",
    sniffers=((84, "bnlint.loaders.tf_bundle:sniff"),), folder="bnlint.loaders.tf_bundle:is_checkpoint_dir",
    extensions=(".index",), companions=("*.data-?????-of-?????",), extra="tensorflow",
    cannot_run="a TensorFlow checkpoint has no graph to run: run (or fix) the SavedModel it belongs to"))
