"""Zip safety for `.keras` archives: every member is checked (encryption, declared size,
compression ratio) before a byte of it is read, and the weights member is opened in place.

Keras writes every member of a `.keras` archive uncompressed (ZIP_STORED; checked on files
written by Keras 3.15), so `model.weights.h5` is read where it lies, through a window on the
archive file, instead of being copied. A member someone re-compressed is inflated to an
anonymous temporary file first: never more than its declared size, and only if that size is
plausible for the bytes stored (a deflate stream cannot expand more than ~1032x).

The windowed read skips the member's CRC-32: checking it would mean reading every weight up
front, which laziness is there to avoid. Corruption then surfaces as an HDF5 error (InputError).
"""

from __future__ import annotations

import io
import shutil
import struct
import tempfile
import zipfile
from typing import Any

import numpy as np

from bnlint.errors import InputError
from bnlint.loaders import keras_h5 as kh
from bnlint.loaders.zip_members import ZIP_ERRORS, describe, member_problem

CONFIG_LIMIT = 64 << 20  # config.json; ResNet-50's is ~0.1 MiB
METADATA_LIMIT = 1 << 20
WEIGHTS_LIMIT = 1 << 40  # a declared weights member larger than 1 TiB is not a model
MAX_MEMBERS = 100_000
# A deflated member cannot expand more than ~1032x; a larger declared ratio is a forged header.
MAX_RATIO = 1100
_RATIO_FLOOR = 1 << 20


def check_member(path: str, info: zipfile.ZipInfo, limit: int) -> None:
    problem = member_problem(info)
    if problem:
        raise InputError(path, problem)
    if info.file_size > limit:
        raise InputError(path, f"zip member {info.filename} declares {info.file_size} bytes (limit {limit})")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise InputError(path, f"zip member {info.filename} is stored but its sizes disagree")
    elif info.file_size > _RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise InputError(path, f"zip member {info.filename} claims {info.file_size} bytes from {info.compress_size} "
                               "compressed (a zip bomb): refused")


def member_bytes(path: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    check_member(path, info, limit)
    try:
        with archive.open(info) as member:
            data = member.read(limit + 1)
    except ZIP_ERRORS as exc:
        raise InputError(path, f"cannot read zip member {info.filename}: {describe(exc)}") from None
    if len(data) > limit:
        raise InputError(path, f"zip member {info.filename} is larger than {limit} bytes")
    return data


def _member_offset(path: str, handle: Any, info: zipfile.ZipInfo) -> int:
    """Where a member's data starts: after its local header (30 bytes + name + extra field)."""
    handle.seek(info.header_offset)
    header = handle.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise InputError(path, f"zip member {info.filename} has no local header")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    offset = info.header_offset + 30 + name_length + extra_length
    handle.seek(0, io.SEEK_END)
    if offset + info.compress_size > handle.tell():
        raise InputError(path, f"zip member {info.filename} runs past the end of the file (truncated)")
    return offset


def open_member_h5(path: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, notes: list[str]) -> kh.H5Owner:
    """model.weights.h5 in place when stored (Keras's own writer stores it); else inflated to a
    temporary file, never more than its declared, ratio-checked size."""
    check_member(path, info, WEIGHTS_LIMIT)
    if info.compress_type == zipfile.ZIP_STORED:
        handle = open(path, "rb")  # noqa: SIM115 - lives as long as the H5Owner that closes it
        try:
            window = kh.ZipWindow(handle, _member_offset(path, handle, info), info.file_size)
        except BaseException:
            handle.close()
            raise
        return kh.open_h5(path, window, (window,))
    notes.append("model.weights.h5 is compressed in the zip (Keras stores it uncompressed): inflated to a temporary file")
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the H5Owner that closes it
    try:
        with archive.open(info) as member:
            shutil.copyfileobj(member, spool, 1 << 20)
            if spool.tell() != info.file_size:
                raise InputError(path, "model.weights.h5 inflates to a size other than declared")
        spool.seek(0)
    except InputError:
        spool.close()
        raise
    except ZIP_ERRORS as exc:
        spool.close()
        raise InputError(path, f"cannot inflate model.weights.h5: {describe(exc)}") from None
    return kh.open_h5(path, spool, (spool,))


def npz_note(path: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, notes: list[str]) -> None:
    """Keras 3 writes model.weights.npz as np.savez of {group path: {index: array}}: each entry is
    a pickled dict (an object array). np.load(allow_pickle=False) cannot read those (Keras 3.15's
    own loader fails the same way), and unpickling is not an option for untrusted files."""
    check_member(path, info, WEIGHTS_LIMIT)
    try:
        with archive.open(info) as member_file, np.load(member_file, allow_pickle=False) as npz:
            keys = list(npz.keys())
            pickled = 0
            for key in keys:
                with npz.zip.open(f"{key}.npy") as member:  # read the .npy header only, never the data
                    major, _ = np.lib.format.read_magic(member)
                    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    _, _, dtype = reader(member)
                    pickled += bool(dtype.hasobject)
    except ZIP_ERRORS as exc:
        raise InputError(path, f"model.weights.npz is not a readable npz ({describe(exc)})") from None
    notes.append(f"model.weights.npz: {pickled} of {len(keys)} entries are pickled objects (Keras 3 saves each layer's "
                 "variables as a dict); not unpickled, so layers are listed without weights")
