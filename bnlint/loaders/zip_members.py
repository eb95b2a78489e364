"""What every zip reader here shares: which members bnlint will inflate, and what reading one can raise.

torch.save, Keras and numpy write members stored or deflated, nothing else. A member that is
encrypted, or compressed with another method (bzip2 and lzma inflate without an output bound in
zipfile, so they are bomb-prone too), is refused by name before a byte of it is read, and every
error a read can raise (a bad CRC surfaces only at the end of a member) is in `ZIP_ERRORS`, so
each caller turns it into its own one-line error (InputError for models, DataError for --data).
"""

from __future__ import annotations

import lzma
import struct
import zipfile
import zlib

# What opening an archive or reading a member raises on corrupt bytes: zipfile's own errors, zlib's,
# a seek to a negative offset (OSError), a name that is not UTF-8 (ValueError), a method or flag
# zipfile does not implement (NotImplementedError), an encrypted member (RuntimeError).
ZIP_ERRORS: tuple[type[Exception], ...] = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, EOFError, OSError,
                                           ValueError, NotImplementedError, RuntimeError, KeyError, struct.error, OverflowError)
READABLE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma", 93: "zstandard", 98: "ppmd", 99: "AES encryption"}


def member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a member cannot be read safely (encrypted, or not stored/deflated); None when it can."""
    if info.flag_bits & 0x41:  # bit 0: encrypted; bit 6: strong encryption
        return f"zip member {info.filename} is encrypted"
    if info.compress_type not in READABLE_METHODS:
        method = _METHOD_NAMES.get(info.compress_type, "unknown")
        return (f"zip member {info.filename} uses compression method {info.compress_type} ({method}); "
                "bnlint reads only stored or deflated members")
    return None


def ratio_problem(info: zipfile.ZipInfo, ratio: int, floor: int) -> str | None:
    """A compressed member declaring more than `ratio` times its compressed size (above `floor` bytes): a bomb."""
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > floor and info.file_size > ratio * max(info.compress_size, 1):
        return (f"zip member {info.filename} inflates {info.file_size} bytes from {info.compress_size} "
                f"(over {ratio}:1): refused as a decompression bomb")
    return None


def describe(exc: BaseException) -> str:
    """A zip read error in a few words (the exception's first line, or its type)."""
    text = (str(exc).strip().splitlines() or [""])[0][:160]
    return text or type(exc).__name__
