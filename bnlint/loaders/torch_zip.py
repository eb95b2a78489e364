"""torch.save zip archives (.pt/.pth/.ckpt/.bin) and TorchScript archives, read without torch.

Layout: `<root>/data.pkl` (the object pickle; tensors are persistent ids naming storages),
`<root>/data/<key>` (raw storage bytes, stored uncompressed), `<root>/byteorder` ("little"/"big").
TorchScript adds `<root>/code/**.py` (the module classes as text: read, never run) and
`<root>/constants.pkl`. Storages are located here but read only when a rule asks for a tensor.

Every `*.pkl` member is scanned (torch.jit.load unpickles data.pkl and constants.pkl, other tools
more), not only the one we build objects from. Nothing is read before its size is checked: member
count, declared sizes per kind, compression ratio, and a total of decompressed bytes per archive.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from bnlint.errors import InputError
from bnlint.loaders.lazy_tensor import ByteSource, StorageRef, element_size
from bnlint.loaders.pickle_scan import scan_pickle
from bnlint.loaders.pickle_scan_state import PickleFindings, PickleScan
from bnlint.loaders.pickle_stubs import BadPickle
from bnlint.loaders.safe_pickle import PICKLE_ERRORS, safe_load, storage_from_pid
from bnlint.loaders.state_dict import to_model_info
from bnlint.loaders.torch_objects import Extracted, extract_from_object
from bnlint.loaders.torchscript import extract_torchscript
from bnlint.loaders.zip_members import ZIP_ERRORS, describe, member_problem
from bnlint.model import ModelInfo

__all__ = ["PICKLE_ERRORS", "TorchArchive", "extract_torch_zip", "load_torch_zip"]

MAX_MEMBERS = 200_000
MAX_PICKLE_BYTES = 256 << 20  # one *.pkl member, uncompressed
MAX_CODE_BYTES = 32 << 20  # all of code/, uncompressed
MAX_RECORD_BYTES = 64  # byteorder and other one-word records
# Compressed members: declared size at most this many times the compressed size. Pickles and code
# compress ~3-10x; deflate cannot exceed ~1032x, which zero-filled storages approach.
MAX_TEXT_RATIO = 100
MAX_DATA_RATIO = 1100


class TorchArchive:
    """An open torch zip archive: its root folder, byte order, storage locations and pickle findings."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        try:
            self.size = os.path.getsize(path)
            self.zip = zipfile.ZipFile(path)
        except ZIP_ERRORS as exc:
            raise InputError(self.path, f"truncated or corrupt zip archive ({describe(exc)})") from None
        self.findings = PickleFindings()
        self.scans: dict[str, tuple[bytes, PickleScan]] = {}
        self.storages: dict[str, StorageRef] = {}
        self._fd: int | None = None
        # Decompressed bytes this archive may still cost: stored members cost what they occupy.
        self._budget = 2 * self.size + (64 << 20)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        infos = self.zip.infolist()
        if len(infos) > MAX_MEMBERS:
            raise InputError(self.path, f"zip archive with {len(infos)} members (more than {MAX_MEMBERS})")
        names = [info.filename for info in infos]
        self.names = set(names)
        # Readers disagree on which copy of a duplicated member counts: such archives are refused
        # (after every copy has been scanned), rather than linting one while torch loads the other.
        self.duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
        # Structural problems are kept for `check()`: every pickle is scanned before the refusal.
        self.problem: str | None = None
        self.big_endian = False
        pickles = sorted((n for n in self.names if n == "data.pkl" or n.endswith("/data.pkl")), key=lambda n: n.count("/"))
        if not pickles or pickles[0].count("/") > 1:
            self.root = ""
            self.problem = "zip archive without data.pkl: not a PyTorch checkpoint or TorchScript file"
            return
        self.root = pickles[0][: -len("data.pkl")]
        try:
            order = self.read_member("byteorder", MAX_RECORD_BYTES).strip() if self.has("byteorder") else b"little"
        except InputError as exc:
            self.problem = exc.problem
            return
        if order not in (b"little", b"big"):
            self.problem = f"unknown byteorder record {order[:20]!r}"
        self.big_endian = order == b"big"

    def check(self) -> None:
        if self.problem is not None:
            raise InputError(self.path, self.problem)

    def has(self, name: str) -> bool:
        return self.root + name in self.names

    def _check(self, info: zipfile.ZipInfo, cap: int, ratio: int) -> None:
        """Refuse a member before reading it if its declared size is too large for its kind,
        too large for its compressed size, or beyond what this archive may still cost."""
        name = info.filename
        problem = member_problem(info)
        if problem:
            raise InputError(self.path, problem)
        if info.file_size > cap:
            raise InputError(self.path, f"{name} declares {info.file_size} bytes (bnlint reads at most {cap})")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(info.compress_size * ratio, 1 << 16):
            raise InputError(self.path, f"{name} expands {info.file_size} bytes from {info.compress_size} "
                             f"(over {ratio}:1): a zip bomb?")

    def _spend(self, info: zipfile.ZipInfo) -> None:
        self._budget -= info.file_size
        if self._budget < 0:
            raise InputError(self.path, "the archive's members add up to far more data than the file holds (a zip bomb?)")

    def read_info(self, info: zipfile.ZipInfo, cap: int = MAX_PICKLE_BYTES, ratio: int = MAX_TEXT_RATIO) -> bytes:
        self._check(info, cap, ratio)
        self._spend(info)
        try:
            with self.zip.open(info) as handle:
                data = handle.read(info.file_size + 1)
        except ZIP_ERRORS as exc:
            raise InputError(self.path, f"cannot read {info.filename} from the archive ({describe(exc)})") from None
        if len(data) != info.file_size:
            raise InputError(self.path, f"{info.filename} is not the size its header declares")
        return data

    def read_member(self, name: str, cap: int = MAX_PICKLE_BYTES) -> bytes:
        try:
            info = self.zip.getinfo(self.root + name)
        except KeyError:
            raise InputError(self.path, f"cannot read {name} from the archive (missing)") from None
        return self.read_info(info, cap)

    def scan_pickles(self) -> list[str]:
        """Scan every *.pkl member (findings accumulate in `self.findings`); the problems found."""
        problems = []
        for info in self.zip.infolist():
            if not info.filename.lower().endswith(".pkl") or info.is_dir():
                continue
            data = self.read_info(info)
            scan = scan_pickle(data)
            self.findings.add(scan)
            self.scans[info.filename] = (data, scan)
            if scan.error is not None:
                problems.append(f"{info.filename} is not a readable pickle ({scan.error})")
        return problems

    def code_members(self) -> list[str]:
        prefix = self.root + "code/"
        return [n for n in sorted(self.names) if n.startswith(prefix) and n.endswith(".py")]

    def read_code(self) -> dict[str, str]:
        """The TorchScript code/ text (capped in total: it is parsed, never run)."""
        sources: dict[str, str] = {}
        total = 0
        for name in self.code_members():
            info = self.zip.getinfo(name)
            total += info.file_size
            if total > MAX_CODE_BYTES:
                raise InputError(self.path, f"TorchScript code/ holds more than {MAX_CODE_BYTES} bytes")
            sources[name[len(self.root):]] = self.read_info(info, MAX_CODE_BYTES).decode("utf-8", "replace")
        return sources

    def _source(self, member: str) -> ByteSource:
        """Where a stored member's bytes begin in the file (local header parsed by hand)."""
        info = self.zip.getinfo(member)
        problem = member_problem(info)
        if problem:
            raise InputError(self.path, problem)
        if info.compress_type != zipfile.ZIP_STORED:
            self._check(info, 1 << 62, MAX_DATA_RATIO)
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

    def load_pickle(self, name: str) -> tuple[Any, PickleScan]:
        self.check()
        member = self.root + name
        if member not in self.scans:
            data = self.read_member(name)
            scan = scan_pickle(data)
            self.findings.add(scan)
            self.scans[member] = (data, scan)
        data, scan = self.scans[member]
        try:
            obj, scan = safe_load(data, lambda pid: storage_from_pid(pid, self.storage), scan)
        except InputError:
            raise
        except PICKLE_ERRORS as exc:
            raise InputError(self.path, f"{name} is not a readable torch pickle ({type(exc).__name__}: {exc})") from None
        self.findings.add(scan)  # the load may judge globals the scan did not see
        return obj, scan

    def close(self) -> None:
        self.zip.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def extract_torch_zip(path: Path) -> Extracted:
    """Read a torch zip or TorchScript archive into tensors + module tree (nothing executed).

    Raises InputError; an UnsafeInputError when a scanned pickle named code that loading would run.
    """
    archive = TorchArchive(path)
    try:
        problems = archive.scan_pickles()
        if archive.duplicates:
            problems.insert(0, f"zip archive with duplicate members ({', '.join(archive.duplicates[:3])}): ambiguous")
        if problems:
            raise InputError(str(path), problems[0])
        top, _ = archive.load_pickle("data.pkl")
        findings = archive.findings
        if archive.has("constants.pkl") or archive.code_members():
            extracted = extract_torchscript(str(path), top, findings.unsafe, archive.read_code())
            extracted.set_pickle_findings(findings.unsafe, findings.unknown)
            return extracted
        extracted = extract_from_object(str(path), top, findings.unsafe, findings.unknown)
        if archive.big_endian:
            extracted.metadata["byteorder"] = "big"
        return extracted
    except InputError as exc:
        raise archive.findings.wrap(exc) from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise archive.findings.error(str(path), f"truncated or corrupt zip archive ({exc})") from None
    finally:
        archive.close()


def load_torch_zip(path: Path, companion: Path | None = None) -> ModelInfo:
    """ModelInfo for a torch.save zip file or a TorchScript archive."""
    return to_model_info(extract_torch_zip(path))
