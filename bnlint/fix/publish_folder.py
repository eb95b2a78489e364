"""Publishing a fixed model that is a folder (any folder format, e.g. a TensorFlow SavedModel):
`bnlint.fix.publish` moves single files and hands a staged folder to this.

    publish_folder(stage / "fixed", Path("out/fixed"), source=Path("model_dir"), in_place=False)

1. The staged folder is copied beside the target under a temporary name, every file flushed
   (the staging folder may be on another file system).
2. No target yet: one `rename` puts it in place (atomic). A target folder exists (--in-place, or
   an earlier output): where the kernel has `renameat2(RENAME_EXCHANGE)` the two folders are
   swapped in one atomic step; elsewhere the old folder is first renamed aside and the new one
   renamed in (a crash between the two leaves the old model under `.NAME.old-*`, never a mix).
3. The old folder is removed.

Any failure before step 2 removes the temporary copy and raises OutputError (one line); the
target is as it was. A target that exists and is not a folder is refused.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
from pathlib import Path

from bnlint.errors import OutputError
from bnlint.fix.publish import fsync_folder

RENAME_EXCHANGE = 2  # linux/fs.h


def publish_folder(staged: Path, target: Path, *, source: Path, in_place: bool) -> list[Path]:
    """Move the staged folder to `target`; returns [target]. Raises OutputError, target untouched."""
    staged, target = Path(staged), Path(target)
    dest = Path(os.path.realpath(target)) if in_place else target
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"cannot write {target}: folder {folder} does not exist")
    if os.path.lexists(dest) and not dest.is_dir():
        raise OutputError(f"cannot write {target}: it exists and is not a folder (the model is a folder)")
    temp = folder / f".{dest.name}.{secrets.token_hex(4)}.tmp"
    try:
        shutil.copytree(staged, temp, copy_function=_copy_synced)
        fsync_folder(temp)
        fsync_folder(folder)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    old = folder / f".{dest.name}.old-{secrets.token_hex(4)}"
    try:
        if not os.path.lexists(dest):
            os.rename(temp, dest)
            fsync_folder(folder)
            return [target]
        if _exchange(temp, dest):
            old = temp  # after the swap the temporary name holds the old model
        else:
            os.rename(dest, old)
            os.rename(temp, dest)
    except OSError as exc:
        if not os.path.lexists(dest) and os.path.lexists(old):
            os.rename(old, dest)  # the second rename failed: the old model goes back
        shutil.rmtree(temp, ignore_errors=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    fsync_folder(folder)
    shutil.rmtree(old, ignore_errors=True)
    return [target]


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the kernel or libc cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return bool(renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0)


def _copy_synced(src: str, dst: str) -> str:
    shutil.copy2(src, dst)
    with open(dst, "rb+") as handle:
        os.fsync(handle.fileno())
    return dst


