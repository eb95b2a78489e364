"""The one dispatcher: which format a file is in, and which loader reads it.

A format is picked by the file's content (extension only as a tie-breaker, and for the two formats
that have no signature: Caffe's binary `.caffemodel` and text `.prototxt`). Every loader returns the
framework-neutral ModelInfo; torch-weight formats can also hand out their raw tensors (`extract`),
which `--arch` loads into the user's network.

No loader executes code from the file: pickles go through a restricted unpickler that never
imports or calls anything it does not know, TorchScript code is read as text, Keras configs and
HDF5 files are read as data, and protobuf is decoded as data.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bnlint.errors import InputError, NotAModel
from bnlint.model import ModelInfo

if TYPE_CHECKING:
    from bnlint.loaders.torch_objects import Extracted


@dataclass(frozen=True)
class FileFormat:
    """One row of the format table: a kind of file and the functions that read it."""

    kind: str
    description: str
    loader: str  # "module:function" taking (path, companion) and returning ModelInfo
    extractor: str | None = None  # "module:function" returning Extracted (torch tensors), for --arch

    def _function(self, spec: str) -> Callable[..., Any]:
        module, _, name = spec.partition(":")
        function: Callable[..., Any] = getattr(importlib.import_module(module), name)
        return function

    def load(self, path: Path, companion: Path | None = None) -> ModelInfo:
        model: ModelInfo = self._function(self.loader)(path, companion)
        return model

    def extract(self, path: Path) -> "Extracted":
        if self.extractor is None:
            raise InputError(str(path), f"a {self.description} has no PyTorch state_dict to load")
        extracted: Extracted = self._function(self.extractor)(path)
        return extracted


FORMATS: dict[str, FileFormat] = {
    "torch-zip": FileFormat("torch-zip", "PyTorch zip checkpoint or TorchScript archive",
                            "bnlint.loaders.torch_zip:load_torch_zip", "bnlint.loaders.torch_zip:extract_torch_zip"),
    "torch-pickle": FileFormat("torch-pickle", "legacy PyTorch pickle",
                               "bnlint.loaders.torch_legacy:load_torch_legacy", "bnlint.loaders.torch_legacy:extract_torch_legacy"),
    "safetensors": FileFormat("safetensors", "safetensors file",
                              "bnlint.loaders.safetensors_file:load_safetensors", "bnlint.loaders.safetensors_file:extract_safetensors"),
    "onnx": FileFormat("onnx", "ONNX model", "bnlint.loaders.onnx_file:load_onnx"),
    "keras": FileFormat("keras", "Keras model (.keras or HDF5)", "bnlint.loaders.keras_file:load_keras"),
    "caffe": FileFormat("caffe", "Caffe model (.caffemodel / .prototxt)", "bnlint.loaders.caffe_file:load_caffe"),
}

# Extensions searched for when a folder is given on the command line (not .ts: TypeScript). A
# plain HDF5 data file found this way is skipped with a note, not an error.
MODEL_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".onnx", ".pth.tar", ".jit",
                    ".keras", ".h5", ".hdf5", ".caffemodel", ".prototxt")
CAFFE_EXTENSIONS = (".caffemodel", ".prototxt")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# First member names of a Keras 3 archive (a torch zip's first member is `<root>/data.pkl` or `<root>/.data/...`).
KERAS_MEMBERS = (b"metadata.json", b"config.json", b"model.weights.h5", b"model.weights.npz")


def is_model_file(path: str | os.PathLike[str]) -> bool:
    name = os.fspath(path).lower()
    return name.endswith(MODEL_EXTENSIONS)


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


def _first_zip_member(head: bytes) -> bytes:
    """The name of the first member from a zip's first local file header (b'' if none)."""
    if not head.startswith(b"PK\x03\x04") or len(head) < 30:
        return b""
    length = int.from_bytes(head[26:28], "little")
    return head[30:30 + length]


def _tar_header(head: bytes) -> bool:
    """Whether the first 512 bytes are a tar header tarfile accepts (checksum checked; v7 headers too)."""
    import tarfile

    try:
        tarfile.TarInfo.frombuf(head[:512], tarfile.ENCODING, "surrogateescape")
    except (tarfile.HeaderError, ValueError, UnicodeError, OverflowError):
        return False
    return True


def detect(path: Path) -> FileFormat:
    """The format row for a file, from its first bytes; raises InputError / NotAModel otherwise."""
    head = _head(path)
    if not head:
        raise InputError(str(path), "empty file")
    suffix = path.suffix.lower()
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        keras = suffix == ".keras" or _first_zip_member(head) in KERAS_MEMBERS
        return FORMATS["keras" if keras else "torch-zip"]
    # torch.load tries every non-zip file as a pre-0.4 tar checkpoint first, and a tar header starts
    # with a member name, which may spell any other format's signature: tars are recognised first.
    if len(head) >= 512 and _tar_header(head):
        from bnlint.loaders.torch_legacy import is_torch_tar

        if is_torch_tar(path):
            return FORMATS["torch-pickle"]
    if head.startswith(HDF5_SIGNATURE):
        return FORMATS["keras"]
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{":
        return FORMATS["safetensors"]
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return FORMATS["torch-pickle"]
    if head.startswith(b"version https://"):  # before the suffix checks: an LFS pointer keeps the model's name
        raise NotAModel(str(path), "a Git LFS pointer, not the model (run `git lfs pull`)")
    if suffix == ".onnx" and head[:1] == b"\x08":  # ModelProto.ir_version first: no pickle opcode, no tar header
        return FORMATS["onnx"]
    # Whatever torch.load opens is a model file here, whatever its name: protocol 0/1 pickles (no
    # \x80 header: they start with an opcode such as `(`, `c`, `}` or `]`; the first 64 KiB must
    # parse as a pickle stream, which text does not) and pre-0.4 tar checkpoints.
    from bnlint.loaders.pickle_scan import looks_like_pickle

    window = 1 << 16
    start = _head(path, window) if len(head) == 512 else head
    if looks_like_pickle(start, window_full=len(start) == window):
        return FORMATS["torch-pickle"]
    if suffix in CAFFE_EXTENSIONS:  # no signature: a caffemodel's first byte can look like ONNX's
        return FORMATS["caffe"]
    if suffix == ".onnx" or head[:1] in (b"\x08", b"\x12", b"\x1a", b"\x22", b"\x3a", b"\x42"):
        return FORMATS["onnx"]
    raise NotAModel(str(path), "not a recognised model file (expected a PyTorch checkpoint, TorchScript, safetensors, "
                    "ONNX, Keras or Caffe model)")


def load_model(path: str | os.PathLike[str], companion: str | os.PathLike[str] | None = None) -> ModelInfo:
    """Read one model file safely (with its companion: a Caffe prototxt for a caffemodel).

    Raises InputError (one line) for anything unreadable.
    """
    file = Path(path)
    return detect(file).load(file, Path(companion) if companion is not None else None)


def extract(path: str | os.PathLike[str]) -> "Extracted":
    """Tensors (lazy) and module tree of a torch or safetensors file, for loading into --arch."""
    file = Path(path)
    return detect(file).extract(file)
