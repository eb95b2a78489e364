"""Opening input files without surprises: never wait on a named pipe, never read a device.

Every reader of a file the user or an attacker names (a model's first bytes, --data arrays, the
config, a baseline) opens it here: without waiting for a writer (O_NONBLOCK, cleared again once
the file is known to be regular), and refuses anything that is not a regular file before
reading a byte.
"""

from __future__ import annotations

import os
import stat
from typing import IO


class NotRegularFile(OSError):
    """A FIFO, socket, device or directory where a file was expected."""


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages ("a named pipe", "a device", ...)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def nonblocking(name: str, flags: int) -> int:
    """An `opener` for open(): never blocks on a FIFO; the caller's fstat check refuses it."""
    return os.open(name, flags | getattr(os, "O_NONBLOCK", 0))


def open_regular(path: str | os.PathLike[str]) -> IO[bytes]:
    """`open(path, "rb")` for regular files only; raises NotRegularFile (or the OSError of open)."""
    handle = open(path, "rb", opener=nonblocking)  # noqa: SIM115 - returned to the caller's `with`
    try:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{file_kind(mode)}, not a regular file: not read")
        if hasattr(os, "set_blocking"):
            os.set_blocking(handle.fileno(), True)
    except BaseException:
        handle.close()
        raise
    return handle
