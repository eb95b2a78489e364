"""torch.save zip archives (.pt/.pth/.ckpt/.bin) and TorchScript archives, read without torch.

Layout: `<root>/data.pkl` (the object pickle; tensors are persistent ids naming storages),
`<root>/data/<key>` (raw storage bytes, stored uncompressed), `<root>/byteorder` ("little"/"big").
TorchScript adds `<root>/code/**.py` (the module classes as text: read, never run) and
`<root>/constants.pkl`. Storages are located here but read only when a rule asks for a tensor.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

from bnlint.errors import InputError
from bnlint.loaders.lazy_tensor import ByteSource, StorageRef, element_size
from bnlint.loaders.safe_pickle import BadPickle, safe_load, storage_from_pid
from bnlint.loaders.state_dict import to_model_info
from bnlint.loaders.torch_objects import Extracted, extract_from_object
from bnlint.loaders.torchscript import extract_torchscript
from bnlint.model import ModelInfo

# Errors a malformed pickle can raise inside the C unpickler or our builders.
PICKLE_ERRORS = (pickle.UnpicklingError, BadPickle, EOFError, ValueError, TypeError, AttributeError,
                 KeyError, IndexError, RecursionError, MemoryError, struct.error, UnicodeDecodeError, OverflowError)


class TorchArchive:
    """An open torch zip archive: its root folder, byte order and storage locations."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        try:
            self.size = os.path.getsize(path)
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise InputError(self.path, f"truncated or corrupt zip archive ({exc})") from None
        pickles = sorted((n for n in self.zip.namelist() if n == "data.pkl" or n.endswith("/data.pkl")),
                         key=lambda n: n.count("/"))
        if not pickles or pickles[0].count("/") > 1:
            self.zip.close()
            raise InputError(self.path, "zip archive without data.pkl: not a PyTorch checkpoint or TorchScript file")
        self.root = pickles[0][: -len("data.pkl")]
        self.names = set(self.zip.namelist())
        order = self.read_member("byteorder").strip() if self.has("byteorder") else b"little"
        if order not in (b"little", b"big"):
            self.zip.close()
            raise InputError(self.path, f"unknown byteorder record {order[:20]!r}")
        self.big_endian = order == b"big"
        self.storages: dict[str, StorageRef] = {}
        self._fd: int | None = None

    def has(self, name: str) -> bool:
        return self.root + name in self.names

    def read_member(self, name: str) -> bytes:
        try:
            return self.zip.read(self.root + name)
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError, zipfile.LargeZipFile) as exc:
            raise InputError(self.path, f"cannot read {name} from the archive ({exc})") from None

    def code_members(self) -> list[str]:
        prefix = self.root + "code/"
        return [n for n in self.zip.namelist() if n.startswith(prefix) and n.endswith(".py")]

    def _source(self, member: str) -> ByteSource:
        """Where a stored member's bytes begin in the file (local header parsed by hand)."""
        info = self.zip.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return ByteSource(self.path, 0, info.file_size, member=member)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        header = os.pread(self._fd, 30, info.header_offset)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise InputError(self.path, f"corrupt zip entry {member}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > self.size:
            raise InputError(self.path, f"file is truncated: {member} ends past the end of the file")
        return ByteSource(self.path, start, info.file_size)

    def storage(self, key: str, dtype: str, numel: int, folder: str = "data/") -> StorageRef:
        """The StorageRef for `data/<key>` (one per key: tensors sharing a storage share it)."""
        if key in self.storages:
            return self.storages[key]
        member = self.root + folder + key
        if member not in self.names:
            raise BadPickle(f"storage {folder}{key} is missing from the archive")
        source = self._source(member)
        if source.length < numel * element_size(dtype):
            raise BadPickle(f"storage {folder}{key} holds {source.length} bytes, expected {numel * element_size(dtype)}")
        ref = StorageRef(key, dtype, numel, source=source, big_endian=self.big_endian)
        self.storages[key] = ref
        return ref

    def load_pickle(self, name: str) -> tuple[Any, list[str]]:
        data = self.read_member(name)
        try:
            return safe_load(data, lambda pid: storage_from_pid(pid, self.storage))
        except InputError:
            raise
        except PICKLE_ERRORS as exc:
            raise InputError(self.path, f"{name} is not a readable torch pickle ({type(exc).__name__}: {exc})") from None

    def close(self) -> None:
        self.zip.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def extract_torch_zip(path: Path) -> Extracted:
    """Read a torch zip or TorchScript archive into tensors + module tree (nothing executed)."""
    archive = TorchArchive(path)
    try:
        top, unsafe = archive.load_pickle("data.pkl")
        if archive.has("constants.pkl") or archive.code_members():
            sources = {name[len(archive.root):]: archive.zip.read(name).decode("utf-8", "replace")
                       for name in archive.code_members()}
            return extract_torchscript(str(path), top, unsafe, sources)
        extracted = extract_from_object(str(path), top, unsafe)
        if archive.big_endian:
            extracted.metadata["byteorder"] = "big"
        return extracted
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(str(path), f"truncated or corrupt zip archive ({exc})") from None
    finally:
        archive.close()


def load_torch_zip(path: Path, companion: Path | None = None) -> ModelInfo:
    """ModelInfo for a torch.save zip file or a TorchScript archive."""
    return to_model_info(extract_torch_zip(path))
