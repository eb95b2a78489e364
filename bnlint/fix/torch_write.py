"""Write recalibrated BatchNorm statistics into a copy of a model file, changing only their bytes.

    from bnlint.fix.torch_write import write_torch_fix
    report = write_torch_fix("model.pt", "fixed.pt", result.new_stats())

Supported: torch.save zip files (state_dict, training checkpoint, Lightning checkpoint, pickled
module), TorchScript archives, legacy (pre-1.6) torch files and safetensors. Nothing is
unpickled for real and torch is not imported: bnlint's safe reader (`bnlint.loaders.extract`)
says where every tensor's bytes are (`LazyTensor.storage.source` is the storage's byte range,
`offset`/`stride` the view), so the new running_mean, running_var and num_batches_tracked values
are cast to each tensor's stored dtype and byte order and written over exactly those elements.
Every other byte of the file (pickles, weights, other members, zip headers) is copied unchanged,
with one exception: a zip member's CRC-32 covers its bytes, so the CRC of each patched member is
recomputed and written where the archive keeps it (the data descriptor torch writes after the
member, or the local header, and the central directory). Sizes never change, so no offset moves.

The copy is written to a temporary file in the output's folder, verified (the patched tensors
are read back with the safe reader and the patched members' CRCs checked with `zipfile`), and
moved into place with `os.replace`; the input is only ever read, unless `in_place=True` asks for
it to be replaced the same way. Values that do not fit the stored dtype (a variance above 65504
in float16) are refused, never clipped.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bnlint.errors import InputError
from bnlint.fix.recalibrate import BNStatistics, RecalibrationError
from bnlint.loaders import FORMATS, detect, extract
from bnlint.loaders.lazy_tensor import DTYPES, LazyTensor

PATCHABLE = ("torch-zip", "torch-pickle", "safetensors")
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class PatchReport:
    """What was written: tensors, the byte ranges of their new values, and the zip CRC fields updated."""

    output: str
    tensors: list[str] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) file offsets of patched values
    crc_fields: list[int] = field(default_factory=list)  # file offsets of the 4-byte CRC-32 fields rewritten
    members: list[str] = field(default_factory=list)  # zip members whose CRC changed
    notes: list[str] = field(default_factory=list)


def _encode(values: np.ndarray, dtype: str, big_endian: bool, key: str) -> list[bytes]:
    """One little- or big-endian element per value, in the stored dtype; refuses values it cannot hold."""
    order = ">" if big_endian else "<"
    if dtype == "bfloat16":
        bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        stored = rounded.astype(order + "u2")
        back = (rounded.astype(np.uint32) << 16).view(np.float32)
    elif dtype in ("float16", "float32", "float64", "int64", "int32"):
        with np.errstate(over="ignore"):  # overflow is caught below
            stored = np.asarray(values).astype(order + DTYPES[dtype][0])
        back = stored.astype(np.float64)
    else:
        raise RecalibrationError(f"{key}: cannot write values of dtype {dtype}")
    if not np.all(np.isfinite(back)) and np.all(np.isfinite(values)):
        raise RecalibrationError(f"{key}: a new value does not fit the stored {dtype} (max {float(np.max(np.abs(values))):.6g}); "
                                 "store the statistics in float32 first")
    return [stored[i : i + 1].tobytes() for i in range(stored.size)]


def _positions(tensor: LazyTensor) -> list[int]:
    """File offset of each element of a 0-d or 1-d view."""
    source = tensor.storage.source
    if source is None or source.member is not None:
        raise RecalibrationError("the tensor's bytes are not stored plainly in the file (compressed member)")
    size = DTYPES[tensor.dtype][1] if tensor.dtype in DTYPES else 0
    if len(tensor.size) > 1 or size == 0:
        raise RecalibrationError(f"unexpected BatchNorm buffer shape {tensor.size}")
    count, step = (tensor.size[0], tensor.stride[0]) if tensor.size else (1, 1)
    return [source.offset + (tensor.offset + i * step) * size for i in range(count)]


def _extent(tensor: Any) -> tuple[int, int] | None:
    if not isinstance(tensor, LazyTensor) or tensor.storage.source is None or tensor.storage.source.member is not None:
        return None
    size = DTYPES.get(tensor.dtype, ("", 1))[1]
    span = 1 + sum((d - 1) * s for d, s in zip(tensor.size, tensor.stride)) if tensor.numel else 0
    start = tensor.storage.source.offset + tensor.offset * size
    return start, start + span * size


def plan_patches(path: str, new_stats: Mapping[str, BNStatistics | Sequence[Any]]) -> tuple[dict[int, bytes], PatchReport]:
    """File offset -> new bytes for every statistic, located with the safe reader (nothing is written)."""
    tensors = extract(path).tensors
    patches: dict[int, bytes] = {}
    report = PatchReport(output="")
    for layer, raw in new_stats.items():
        stats = BNStatistics.coerce(raw)
        for buffer, values in zip(BUFFERS, (stats.mean, stats.var, stats.num_batches_tracked)):
            key = f"{layer}.{buffer}"
            tensor = tensors.get(key)
            if values is None:
                continue
            if tensor is None:
                if buffer == "num_batches_tracked":
                    report.notes.append(f"{key}: not in the file (older checkpoint); left out")
                    continue
                raise RecalibrationError(f"{path}: no tensor {key} in the file (layer names must be bnlint's, e.g. from `bnlint {path}`)")
            if not isinstance(tensor, LazyTensor):
                raise RecalibrationError(f"{path}: {key} is not stored as tensor bytes in the file")
            array = np.asarray(values, dtype=np.int64 if buffer == "num_batches_tracked" else np.float64).reshape(-1)
            if array.size != tensor.numel:
                raise RecalibrationError(f"{path}: {key} holds {tensor.numel} values, the new statistics {array.size}")
            try:
                for position, data in zip(_positions(tensor), _encode(array, tensor.dtype, tensor.storage.big_endian, key)):
                    patches[position] = data
            except RecalibrationError as exc:
                raise RecalibrationError(f"{path}: {key}: {exc}") from None
            report.tensors.append(key)
    ranges: list[tuple[int, int]] = []
    for start, end in sorted((start, start + len(data)) for start, data in patches.items()):
        if ranges and ranges[-1][1] == start:  # adjacent elements: one range
            start = ranges.pop()[0]
        ranges.append((start, end))
    for key, tensor in tensors.items():
        extent = _extent(tensor)
        if key in report.tensors or extent is None:
            continue
        if any(start < extent[1] and extent[0] < end for start, end in ranges):
            raise RecalibrationError(f"{path}: the bytes of {key} overlap a BatchNorm statistic (shared storage); refusing to patch")
    report.ranges = ranges
    return patches, report


def _central_directory(handle: Any, size: int) -> list[tuple[str, int]]:
    """(member name, file offset of its central-directory entry) for every member (zip64 aware)."""
    tail_size = min(size, 65_557)
    handle.seek(size - tail_size)
    tail = handle.read(tail_size)
    end = tail.rfind(b"PK\x05\x06")
    if end < 0:
        raise RecalibrationError("zip end-of-central-directory record not found")
    entries, cd_offset = struct.unpack("<H4xI", tail[end + 10 : end + 20])  # total entries, (size), directory offset
    if cd_offset == 0xFFFFFFFF or entries == 0xFFFF:
        locator = tail.rfind(b"PK\x06\x07", 0, end)
        handle.seek(struct.unpack("<Q", tail[locator + 8 : locator + 16])[0])
        record = handle.read(56)
        entries, cd_offset = struct.unpack("<Q", record[32:40])[0], struct.unpack("<Q", record[48:56])[0]
    found, position = [], cd_offset
    for _ in range(entries):
        handle.seek(position)
        header = handle.read(46)
        if header[:4] != b"PK\x01\x02":
            raise RecalibrationError("corrupt zip central directory")
        name_len, extra_len, comment_len = struct.unpack("<HHH", header[28:34])
        found.append((handle.read(name_len).decode("utf-8", "replace"), position))
        position += 46 + name_len + extra_len + comment_len
    return found


def _update_crcs(path: str, patched: list[tuple[int, int]], report: PatchReport) -> None:
    """Recompute the CRC-32 of every zip member holding a patched byte, wherever the archive stores it."""
    size = os.path.getsize(path)
    with zipfile.ZipFile(path) as archive, open(path, "r+b") as handle:
        entries = dict(_central_directory(handle, size))
        for info in archive.infolist():
            handle.seek(info.header_offset)
            local = handle.read(30)
            start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
            if not any(a < start + info.compress_size and start < b for a, b in patched):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise RecalibrationError(f"zip member {info.filename} is compressed; cannot patch it in place")
            handle.seek(start)
            crc = struct.pack("<I", zlib.crc32(handle.read(info.compress_size)) & 0xFFFFFFFF)
            fields = [entries[info.filename] + 16]
            if info.flag_bits & 0x08:  # data descriptor after the data, with or without its signature
                handle.seek(start + info.compress_size)
                fields.append(start + info.compress_size + (4 if handle.read(4) == b"PK\x07\x08" else 0))
            else:
                fields.append(info.header_offset + 14)
            for offset in fields:
                handle.seek(offset)
                handle.write(crc)
            report.crc_fields += fields
            report.members.append(info.filename)


def vet_pickles(path: str, kind: str) -> None:
    """The writer's own wall against laundering: every pickle that the copy would carry must scan
    clean (no execution primitive, no callable outside the allowlist, readable to its end).

    The copy keeps every byte but the patched statistics, so a payload in any pickle of the input
    would come out in a file that bnlint itself wrote. Raises InputError (one line, exit code 2).
    """
    from bnlint.loaders.pickle_scan_state import PickleFindings

    findings = PickleFindings()
    problems: list[str] = []
    if kind == "torch-zip":
        from bnlint.loaders.torch_zip import TorchArchive

        archive = TorchArchive(Path(path))
        try:
            problems = archive.scan_pickles()  # every *.pkl member, whatever its folder
            findings = archive.findings
        finally:
            archive.close()
    elif kind == "torch-pickle":
        from bnlint.loaders.torch_legacy import is_torch_tar, scan_legacy_pickles

        if is_torch_tar(Path(path)):
            raise InputError(path, "bnlint fix does not write pre-0.4 tar checkpoints")
        problems = scan_legacy_pickles(path, findings)
    if findings:
        names = ", ".join((findings.unsafe + findings.unknown)[:3])
        raise InputError(path, f"refusing to copy pickles that name code loading would run ({names}) into a fixed file")
    if problems:
        raise InputError(path, f"refusing to copy a pickle bnlint cannot read to its end ({problems[0][:200]})")


def _runs(patches: Mapping[int, bytes]) -> list[tuple[int, bytes]]:
    """The patches as (offset, bytes) runs, adjacent elements joined: one seek per buffer, not per element."""
    runs: list[tuple[int, list[bytes]]] = []
    end = -1
    for offset, data in sorted(patches.items()):
        if offset == end:
            runs[-1][1].append(data)
        else:
            runs.append((offset, [data]))
        end = offset + len(data)
    return [(offset, b"".join(parts)) for offset, parts in runs]


def _verify(path: str, runs: Sequence[tuple[int, bytes]], report: PatchReport, kind: str) -> None:
    with open(path, "rb") as handle:
        for offset, data in runs:
            handle.seek(offset)
            if handle.read(len(data)) != data:
                raise RecalibrationError(f"{path}: patched bytes did not read back")
    if kind == "torch-zip":
        with zipfile.ZipFile(path) as archive:
            for member in report.members:
                archive.read(member)  # raises BadZipFile on a CRC mismatch
    extract(path)  # the safe reader still reads the whole file
    vet_pickles(path, kind)  # and the patches left every pickle as clean as it was


def write_torch_fix(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str] | None,
                    new_stats: Mapping[str, BNStatistics | Sequence[Any]], *, in_place: bool = False) -> PatchReport:
    """Copy `input_path` to `output_path` with the BN statistics in `new_stats` patched in.

    new_stats: layer name (bnlint's static name for this file, e.g. `model.bn1` in a Lightning
    checkpoint) -> BNStatistics or (mean, unbiased var[, num_batches_tracked]). With
    `in_place=True` the input itself is replaced (atomically) and `output_path` may be None.
    Raises RecalibrationError (one line), or InputError when a pickle of the input does not scan
    clean (`vet_pickles`: nothing unvetted is ever copied); on any error no output is left behind.
    """
    source = str(input_path)
    target = source if in_place and output_path is None else str(output_path) if output_path is not None else ""
    if not target:
        raise RecalibrationError("an output path is required (or in_place=True)")
    same = os.path.exists(target) and os.path.samefile(source, target)
    if same and not in_place:
        raise RecalibrationError(f"{target}: the output is the input; pass in_place=True to overwrite it")
    kind = detect(Path(source)).kind
    if kind not in PATCHABLE:
        raise RecalibrationError(f"{source}: cannot patch a {FORMATS[kind].description} (torch zip, TorchScript, legacy torch or safetensors only)")
    vet_pickles(source, kind)
    patches, report = plan_patches(source, new_stats)
    report.output = target
    folder = os.path.dirname(os.path.abspath(target))
    runs = _runs(patches)
    fd, temp = tempfile.mkstemp(prefix=".bnlint-fix-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            for offset, data in runs:
                out.seek(offset)
                out.write(data)
            out.flush()
        if kind == "torch-zip":
            _update_crcs(temp, report.ranges, report)
        _verify(temp, runs, report, kind)
        shutil.copymode(source, temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return report
