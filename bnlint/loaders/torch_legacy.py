"""Pre-1.6 torch.save files (not zip), read without torch and without running pickle code.

Layout: five pickles in a row - magic number, protocol version (1001), sys_info, the object
(tensors are persistent ids ('storage', type, key, location, numel, view)), the list of storage
keys - then for each key, in that order, an int64 little-endian element count and the raw
little-endian bytes. We note where each storage starts and read it only if a rule asks.
The even older tar format is refused with instructions to re-save.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Any

from bnlint.errors import InputError
from bnlint.loaders.lazy_tensor import ByteSource, StorageRef, element_size
from bnlint.loaders.safe_pickle import BadPickle, SafeUnpickler, storage_from_pid
from bnlint.loaders.state_dict import to_model_info
from bnlint.loaders.torch_objects import Extracted, extract_from_object
from bnlint.loaders.torch_zip import PICKLE_ERRORS
from bnlint.model import ModelInfo

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
RESAVE = "load it with a trusted torch and re-save it with `torch.save(obj, path)` (current torch writes zip files)"


class _LegacyReader:
    def __init__(self, path: Path, handle: io.BufferedReader) -> None:
        self.path = str(path)
        self.handle = handle
        self.storages: dict[str, StorageRef] = {}
        self.views: list[tuple[StorageRef, StorageRef, int]] = []  # (view, root, element offset)
        self.unsafe: list[str] = []

    def load(self, persistent: bool = False) -> Any:
        unpickler = SafeUnpickler(self.handle, self.persistent_load if persistent else None)
        obj = unpickler.load()
        self.unsafe.extend(name for name in unpickler.unsafe_globals if name not in self.unsafe)
        return obj

    def new_storage(self, key: str, dtype: str, numel: int) -> StorageRef:
        if key not in self.storages:
            self.storages[key] = StorageRef(key, dtype, numel)
        return self.storages[key]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module") and len(pid) >= 2:
            return pid[1]  # a module class recorded with its source: the (stub) class itself
        root = storage_from_pid(pid, self.new_storage)
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, (int, str)) for v in view)):
            raise BadPickle("malformed storage view in a legacy torch pickle")
        view_key, offset, size = str(view[0]), view[1], view[2]
        if not isinstance(offset, int) or not isinstance(size, int) or offset < 0 or size < 0:
            raise BadPickle("malformed storage view in a legacy torch pickle")
        if view_key not in self.storages:
            self.storages[view_key] = StorageRef(view_key, root.dtype, size, root.location)
            self.views.append((self.storages[view_key], root, offset))
        return self.storages[view_key]

    def locate_storages(self, keys: Any) -> None:
        """Record where each storage's bytes lie (after the pickles), without reading them."""
        if not isinstance(keys, list):
            raise BadPickle("storage key list missing")
        size = os.fstat(self.handle.fileno()).st_size
        position = self.handle.tell()
        for key in keys:
            storage = self.storages.get(str(key))
            if storage is None:
                raise BadPickle(f"storage key {key!r} is not used by the pickle")
            header = os.pread(self.handle.fileno(), 8, position)
            if len(header) != 8:
                raise InputError(self.path, "file is truncated: storage data missing")
            (numel,) = struct.unpack("<q", header)
            nbytes = numel * element_size(storage.dtype)
            if numel < 0 or position + 8 + nbytes > size:
                raise InputError(self.path, "file is truncated: storage data ends past the end of the file")
            storage.source = ByteSource(self.path, position + 8, nbytes)
            position += 8 + nbytes
        for view, root, offset in self.views:
            if root.source is not None:
                itemsize = element_size(root.dtype)
                start = root.source.offset + offset * itemsize
                view.source = ByteSource(self.path, start, min(view.numel * itemsize, max(0, root.source.length - offset * itemsize)))


def _is_tar(path: Path) -> bool:
    with open(path, "rb") as handle:
        block = handle.read(512)
    return len(block) == 512 and block[257:262] == b"ustar"


def extract_torch_legacy(path: Path) -> Extracted:
    """Read a legacy torch file (or report a plain pickle's unsafe globals); nothing is executed."""
    name = str(path)
    try:
        if _is_tar(path):
            raise InputError(name, f"a pre-0.4 tar-format torch file, which bnlint cannot read safely; {RESAVE}")
        with open(path, "rb") as raw:
            reader = _LegacyReader(path, io.BufferedReader(raw))
            first = reader.load()
            if not (isinstance(first, int) and first == MAGIC_NUMBER):
                return _plain_pickle(name, first, reader.unsafe)
            protocol = reader.load()
            if protocol != PROTOCOL_VERSION:
                raise InputError(name, f"unsupported legacy torch protocol {protocol!r}; {RESAVE}")
            reader.load()  # sys_info: byte order and type sizes; storages are always little-endian
            top = reader.load(persistent=True)
            reader.locate_storages(reader.load())
    except InputError:
        raise
    except OSError as exc:
        raise InputError(name, f"cannot read: {exc.strerror or exc}") from None
    except PICKLE_ERRORS as exc:
        raise InputError(name, f"not a readable legacy torch file ({type(exc).__name__}: {exc}); {RESAVE}") from None
    extracted = extract_from_object(name, top, reader.unsafe)
    extracted.metadata["legacy_format"] = True
    extracted.notes.append("legacy (pre-1.6, non-zip) torch file")
    return extracted


def _plain_pickle(name: str, obj: Any, unsafe: list[str]) -> Extracted:
    """A pickle that is not a torch file: only worth reporting if it would have run code."""
    if not unsafe:
        raise InputError(name, "a plain Python pickle, not a PyTorch checkpoint (no torch magic number)")
    extracted = Extracted(name, "torch-checkpoint", unsafe_globals=list(unsafe))
    extracted.notes.append("a plain Python pickle, not a PyTorch checkpoint: only its globals were inspected")
    return extracted


def load_torch_legacy(path: Path, companion: Path | None = None) -> ModelInfo:
    return to_model_info(extract_torch_legacy(path))

