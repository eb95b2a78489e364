"""Pick a loader by the file's content (extension only as a tie-breaker) and return a ModelInfo.

No loader executes code from the file: pickles go through a restricted unpickler that never
imports or calls anything it does not know, and TorchScript code is read as text.
"""

from __future__ import annotations

import os
from pathlib import Path

from bnlint.errors import InputError, NotAModel
from bnlint.model import ModelInfo

# Extensions searched for when a folder is given on the command line.
MODEL_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".onnx", ".pth.tar", ".jit")  # not .ts: TypeScript


def is_model_file(path: str | os.PathLike[str]) -> bool:
    name = os.fspath(path).lower()
    return name.endswith(MODEL_EXTENSIONS)


def sniff(path: Path) -> str:
    """'zip', 'safetensors', 'pickle' or 'onnx', from the first bytes; raises InputError otherwise."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except FileNotFoundError:
        raise InputError(str(path), "no such file") from None
    except IsADirectoryError:
        raise InputError(str(path), "is a directory") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read: {exc.strerror or exc}") from None
    if not head:
        raise InputError(str(path), "empty file")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head == b"version https://":  # before the .onnx check: an LFS pointer keeps the model's name
        raise NotAModel(str(path), "a Git LFS pointer, not the model (run `git lfs pull`)")
    if path.suffix.lower() == ".onnx" or head[:1] in (b"\x08", b"\x12", b"\x1a", b"\x22", b"\x3a", b"\x42"):
        return "onnx"
    raise NotAModel(str(path), "not a recognised model file (expected a PyTorch checkpoint, TorchScript, safetensors or ONNX)")


def load_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Read one model file safely. Raises InputError (one line) for anything unreadable."""
    file = Path(path)
    kind = sniff(file)
    if kind == "zip":
        from bnlint.loaders.torch_zip import load_torch_zip

        return load_torch_zip(file)
    if kind == "safetensors":
        from bnlint.loaders.safetensors_file import load_safetensors

        return load_safetensors(file)
    if kind == "pickle":
        from bnlint.loaders.torch_legacy import load_torch_legacy

        return load_torch_legacy(file)
    from bnlint.loaders.onnx_file import load_onnx

    return load_onnx(file)
