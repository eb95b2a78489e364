"""Pre-1.6 torch.save files (not zip) and plain pickles, read without torch and without running pickle code.

Layout: five pickles in a row - magic number, protocol version (1001), sys_info, the object
(tensors are persistent ids ('storage', type, key, location, numel, view)), the list of storage
keys - then for each key, in that order, an int64 little-endian element count and the raw
little-endian bytes. torch.load unpickles all five, so all five are scanned before anything is
built; storages are located and read only if a rule asks. The file is memory-mapped: only the
pickles are copied.

The even older tar format (pre-0.4: members `sys_info`, `pickle`, `storages`, `tensors`, each one or
more pickles, the last two interleaved with raw data) is read as data with `tarfile`: every pickle
is scanned for BN001/BN003, but its tensors are not read (a note says so).
"""

from __future__ import annotations

import mmap
import os
import struct
import tarfile
from pathlib import Path
from typing import Any

from bnlint.errors import InputError
from bnlint.loaders.lazy_tensor import ByteSource, StorageRef, element_size
from bnlint.loaders.pickle_scan import scan_pickle
from bnlint.loaders.pickle_scan_state import Buffer, PickleFindings, PickleScan
from bnlint.loaders.pickle_stubs import BadPickle, StorageType
from bnlint.loaders.safe_pickle import PICKLE_ERRORS, safe_load, storage_from_pid
from bnlint.loaders.state_dict import to_model_info
from bnlint.loaders.torch_objects import Extracted, extract_from_object
from bnlint.model import ModelInfo

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
RESAVE = "load it with a trusted torch and re-save it with `torch.save(obj, path)` (current torch writes zip files)"
TAR_MEMBERS = ("sys_info", "pickle", "storages", "tensors")
MAX_TAR_MEMBERS = 100_000
TAR_NOTE = "legacy tar checkpoint: BN statistics not read (its pickles were scanned for unsafe globals)"


class _LegacyReader:
    def __init__(self, path: str, data: Buffer) -> None:
        self.path = path
        self.data = data
        self.storages: dict[str, StorageRef] = {}
        self.views: list[tuple[StorageRef, StorageRef, int]] = []  # (view, root, element offset)

    def load(self, scan: PickleScan, persistent: bool = False) -> Any:
        obj, _ = safe_load(self.data, self.persistent_load if persistent else None, scan)
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
        view_key, offset, size = str(view[0])[:256], view[1], view[2]
        if not isinstance(offset, int) or not isinstance(size, int) or not 0 <= offset <= 1 << 48 or not 0 <= size <= 1 << 48:
            raise BadPickle("malformed storage view in a legacy torch pickle")
        if view_key not in self.storages:
            self.storages[view_key] = StorageRef(view_key, root.dtype, size, root.location)
            self.views.append((self.storages[view_key], root, offset))
        return self.storages[view_key]

    def locate_storages(self, keys: Any, position: int) -> None:
        """Record where each storage's bytes lie (after the pickles), without reading them."""
        if not isinstance(keys, list):
            raise BadPickle("storage key list missing")
        size = len(self.data)
        for key in keys:
            storage = self.storages.get(str(key)) if isinstance(key, (str, int, bytes)) else None
            if storage is None:
                raise BadPickle(f"storage key {str(key)[:40]!r} is not used by the pickle")
            header = bytes(self.data[position:position + 8])
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


def _scan_all(data: Buffer, start: int, count: int, findings: PickleFindings) -> tuple[list[PickleScan], PickleScan | None]:
    """Scan up to `count` pickles back to back: the valid ones, and the scan that failed (if any)."""
    scans: list[PickleScan] = []
    position = start
    while len(scans) < count and position < len(data):
        scan = scan_pickle(data, position)
        findings.add(scan)
        if scan.error is not None:
            return scans, scan
        scans.append(scan)
        position = scan.end
    return scans, None


_TAR_ERRORS = (tarfile.TarError, OSError, ValueError, EOFError, UnicodeError, OverflowError)


def tar_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every member, as torch's `tar.extract(name)` sees them (it looks names up among all of them)."""
    members: list[tarfile.TarInfo] = []
    while True:
        member = tar.next()
        if member is None:
            return members
        members.append(member)
        if len(members) > MAX_TAR_MEMBERS:
            raise InputError(str(tar.name), f"tar archive with more than {MAX_TAR_MEMBERS} members")


def scan_legacy_pickles(path: str, findings: PickleFindings) -> list[str]:
    """Scan the pickles torch.load reads from a legacy (non-tar) file into `findings`; the problems."""
    with open(path, "rb") as raw:
        if os.fstat(raw.fileno()).st_size == 0:
            return ["empty file"]
        with mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _, failed = _scan_all(data, 0, 5, findings)
    return [failed.error] if failed is not None and failed.error is not None else []


def is_torch_tar(path: Path) -> bool:
    """Whether torch.load would open the file as a pre-0.4 tar checkpoint and unpickle from it.

    torch.load tries `tarfile.open(mode="r:")` on any file that is not a zip, then extracts the
    members named `storages`, `tensors` and `pickle` wherever they are (other members, any order,
    v7/ustar/gnu/pax headers): any readable tar holding one of those names counts (one with too
    many members to list counts too, and is then refused).
    """
    try:
        with tarfile.open(path, "r:") as tar:
            return any(member.name in TAR_MEMBERS for member in tar_members(tar))
    except InputError:
        return True
    except _TAR_ERRORS:
        return False


def extract_torch_legacy(path: Path) -> Extracted:
    """Read a legacy torch file (or report a plain pickle's findings); nothing is executed."""
    name = str(path)
    if is_torch_tar(path):
        return _extract_tar(path)
    try:
        with open(path, "rb") as raw:
            if os.fstat(raw.fileno()).st_size == 0:
                raise InputError(name, "empty file")
            with mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _extract(name, data)
    except OSError as exc:
        raise InputError(name, f"cannot read: {exc.strerror or exc}") from None


def _extract(name: str, data: Buffer) -> Extracted:
    findings = PickleFindings()
    # torch.load runs all five pickles of a legacy file; a plain pickle may be followed by others.
    scans, failed = _scan_all(data, 0, 5, findings)
    try:
        if not scans:
            problem = failed.error if failed is not None else "no pickle"
            raise InputError(name, f"not a readable legacy torch file or pickle ({problem}); {RESAVE}")
        reader = _LegacyReader(name, data)
        first = reader.load(scans[0])
        if not (isinstance(first, int) and first == MAGIC_NUMBER):
            return _plain_pickle(name, findings)
        if len(scans) < 5:
            problem = failed.error if failed is not None else "it ends after the first pickles"
            raise InputError(name, f"not a readable legacy torch file ({problem}); {RESAVE}")
        protocol = reader.load(scans[1])
        if protocol != PROTOCOL_VERSION:
            raise InputError(name, f"unsupported legacy torch protocol {str(protocol)[:20]}; {RESAVE}")
        reader.load(scans[2])  # sys_info: byte order and type sizes; storages are always little-endian
        top = reader.load(scans[3], persistent=True)
        reader.locate_storages(reader.load(scans[4]), scans[4].end)
    except InputError as exc:
        raise findings.wrap(exc) from None
    except PICKLE_ERRORS as exc:
        raise findings.error(name, f"not a readable legacy torch file ({type(exc).__name__}: {str(exc)[:200]}); {RESAVE}") from None
    extracted = extract_from_object(name, top, findings.unsafe, findings.unknown)
    extracted.metadata["legacy_format"] = True
    extracted.notes.append("legacy (pre-1.6, non-zip) torch file")
    return extracted


def _plain_pickle(name: str, findings: PickleFindings) -> Extracted:
    """A pickle that is not a torch file: only worth reporting if it would have run code."""
    if not findings:
        raise InputError(name, "a plain Python pickle, not a PyTorch checkpoint (no torch magic number)")
    extracted = Extracted(name, "torch-checkpoint")
    extracted.set_pickle_findings(findings.unsafe, findings.unknown)
    extracted.notes.append("a plain Python pickle, not a PyTorch checkpoint: only its globals were inspected")
    return extracted


# ---------------------------------------------------------------------------------------------
# The pre-0.4 tar format: scanned, not loaded


class _Records:
    """A tar member holding pickles interleaved with raw records, read front to back."""

    def __init__(self, data: Buffer, start: int, end: int, findings: PickleFindings) -> None:
        self.data, self.position, self.end, self.findings = data, start, end, findings

    def pickle(self) -> Any:
        scan = scan_pickle(self.data, self.position, self.end)
        self.findings.add(scan)
        if scan.error is not None:
            raise BadPickle(scan.error)
        self.position = scan.end
        obj, _ = safe_load(self.data, None, scan)
        return obj

    def scan(self) -> None:
        """Scan one pickle without building it (the object pickle: its tensors are not read)."""
        scan = scan_pickle(self.data, self.position, self.end)
        self.findings.add(scan)
        if scan.error is not None:
            raise BadPickle(scan.error)
        self.position = scan.end

    def skip(self, count: int) -> bytes:
        if count < 0 or self.position + count > self.end:
            raise BadPickle("record runs past the end of its tar member")
        chunk = bytes(self.data[self.position:self.position + count])
        self.position += count
        return chunk

    def count(self) -> int:
        value = self.pickle()
        if not isinstance(value, int) or not 0 <= value <= self.end - self.position:
            raise BadPickle("record count is not a sane int")
        return value


def _scan_storages(records: _Records) -> None:
    for _ in range(records.count()):
        entry = records.pickle()
        storage_type = entry[2] if isinstance(entry, tuple) and len(entry) == 3 else None
        if not isinstance(storage_type, StorageType):
            raise BadPickle("storage record without a storage type")
        (numel,) = struct.unpack("<q", records.skip(8))
        records.skip(numel * element_size(storage_type.dtype))
    records.pickle()  # storage views


def _scan_tensors(records: _Records) -> None:
    for _ in range(records.count()):
        records.pickle()  # (key, storage id, original tensor type)
        (ndim,) = struct.unpack("<i", records.skip(4))
        if not 0 <= ndim <= 64:
            raise BadPickle("tensor record with an invalid number of dimensions")
        records.skip(4 + 16 * ndim + 8)


def _member_data(member: tarfile.TarInfo, members: list[tarfile.TarInfo]) -> tarfile.TarInfo | str:
    """The member whose bytes torch reads for `member` (a hard link reads its target), or why none."""
    if member.islnk():  # tarfile extracts a hard link by copying the earlier member it names
        index = members.index(member)
        target = os.path.normpath(member.linkname)
        for earlier in reversed(members[:index]):
            if os.path.normpath(earlier.name) == target:
                return _member_data(earlier, members[:index]) if earlier.islnk() else earlier
        return f"tar member {member.name} is a link to a missing member"
    if not member.isfile() or member.issparse():
        return f"tar member {member.name} is not a plain file"
    return member


def _extract_tar(path: Path) -> Extracted:
    name = str(path)
    findings = PickleFindings()
    problems: list[str] = []
    try:
        with open(path, "rb") as raw, mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as data, \
                tarfile.open(fileobj=raw, mode="r:") as tar:
            members = tar_members(tar)
            # Every copy of a torch member is scanned: torch reads the last, another reader the first.
            for member in members:
                if member.name not in TAR_MEMBERS:
                    continue
                source = _member_data(member, members)
                if isinstance(source, str):
                    problems.append(source)
                    continue
                start, end = source.offset_data, source.offset_data + source.size
                if end > len(data):
                    problems.append(f"file is truncated: tar member {member.name} ends past the end of the file")
                    end = len(data)  # its pickles are scanned as far as they go
                records = _Records(data, start, end, findings)
                try:
                    if member.name == "storages":
                        _scan_storages(records)
                    elif member.name == "tensors":
                        _scan_tensors(records)
                    else:
                        records.scan()
                except (*PICKLE_ERRORS, InputError) as exc:
                    problems.append(f"tar member {member.name} is not readable ({str(exc)[:200]})")
    except InputError as exc:
        raise findings.wrap(exc) from None
    except _TAR_ERRORS as exc:
        raise findings.error(name, f"unreadable legacy tar checkpoint ({exc})") from None
    if problems:
        raise findings.error(name, problems[0])
    extracted = Extracted(name, "torch-checkpoint")
    extracted.set_pickle_findings(findings.unsafe, findings.unknown)
    extracted.metadata["legacy_format"] = True
    extracted.notes.append(TAR_NOTE)
    return extracted


def load_torch_legacy(path: Path, companion: Path | None = None) -> ModelInfo:
    return to_model_info(extract_torch_legacy(path))
