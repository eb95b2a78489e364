"""The one dispatcher: which format a file is in, and which loader reads it.

A format is picked by the file's content (extension only as a tie-breaker, and for the two formats
that have no signature: Caffe's binary `.caffemodel` and text `.prototxt`), through the records of
`bnlint.formats` and their sniffers (`bnlint.loaders.sniff` for the built-in ones). Every loader
returns the framework-neutral ModelInfo; torch-weight formats can also hand out their raw tensors
(`extract`), which `--arch` loads into the user's network.

No loader executes code from the file: pickles go through a restricted unpickler that never
imports or calls anything it does not know, TorchScript code is read as text, Keras configs and
HDF5 files are read as data, and protobuf is decoded as data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from bnlint.errors import InputError, NotAModel
from bnlint.formats import FORMATS, NOT_MODELS, FormatRecord, Sniff, function_at, model_extensions
from bnlint.model import ModelInfo

if TYPE_CHECKING:
    from bnlint.loaders.torch_objects import Extracted

# Extensions searched for when a folder is given on the command line (not .ts: TypeScript), from
# the format records. A plain HDF5 data file found this way is skipped with a note, not an error.
MODEL_EXTENSIONS = model_extensions()
CAFFE_EXTENSIONS = FORMATS["caffe"].extensions


def is_model_file(path: str | os.PathLike[str]) -> bool:
    name = os.fspath(path).lower()
    return name.endswith(MODEL_EXTENSIONS) or name.endswith(model_extensions())  # the latter: formats registered since


def _head(path: Path, size: int = 512) -> bytes:
    from bnlint.fileio import NotRegularFile, open_regular

    try:
        with open_regular(path) as handle:
            return handle.read(size)
    except FileNotFoundError:
        raise InputError(str(path), "no such file") from None
    except IsADirectoryError:
        raise InputError(str(path), "is a directory") from None
    except NotRegularFile as exc:
        raise InputError(str(path), str(exc)) from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read: {exc.strerror or exc}") from None


def _sniffers() -> list[tuple[int, str, FormatRecord | None]]:
    found: list[tuple[int, str, FormatRecord | None]] = [(p, spec, r) for r in FORMATS.values() for p, spec in r.sniffers]
    found += [(priority, spec, None) for priority, spec in NOT_MODELS]
    return sorted(found, key=lambda item: (item[0], item[1]))


def detect(path: Path) -> FormatRecord:
    """The format record for a file (or a folder that is one model), from its content; raises
    InputError / NotAModel otherwise. Every record's sniffers are tried in priority order."""
    if path.is_dir():
        for candidate in FORMATS.values():
            if candidate.folder is not None and candidate.function(candidate.folder)(path):
                return candidate
        raise InputError(str(path), "is a directory")
    head = _head(path)
    if not head:
        raise InputError(str(path), "empty file")
    file = Sniff(path, head)
    for _, spec, found in _sniffers():
        if function_at(spec)(file) and found is not None:  # a NOT_MODELS guard raises instead
            return found
    names = ", ".join(dict.fromkeys(r.description for r in FORMATS.values()))
    raise NotAModel(str(path), f"not a recognised model file (expected one of: {names})")


def load_model(path: str | os.PathLike[str], companion: str | os.PathLike[str] | None = None) -> ModelInfo:
    """Read one model file safely (with its companion: a Caffe prototxt for a caffemodel).

    Raises InputError (one line) for anything unreadable.
    """
    file = Path(path)
    record = detect(file)
    model: ModelInfo = record.function(record.loader)(file, Path(companion) if companion is not None else None)
    model.file_format = record.kind
    return model


def extract(path: str | os.PathLike[str]) -> "Extracted":
    """Tensors (lazy) and module tree of a torch or safetensors file, for loading into --arch."""
    file = Path(path)
    record = detect(file)
    if record.extractor is None:
        raise InputError(str(file), f"a {record.description} has no PyTorch state_dict to load")
    extracted: Extracted = record.function(record.extractor)(file)
    return extracted
