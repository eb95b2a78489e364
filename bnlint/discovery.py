"""Which files a run lints: paths as given, folders searched for model files.

A folder is searched like a linter searches a repository: files git ignores are skipped (git
itself answers, when the folder is in a work tree), virtual environments and tool caches are
skipped always, `--exclude` / `extend-exclude` globs drop more, a file reached through several
symlinks is linted once, and a dangling symlink is reported as an unreadable input exactly as it
would be when named on the command line. Only regular files are linted: a named pipe, socket or
device found in a folder is skipped with a note (opening a pipe would wait forever for a writer),
and `non_regular` tells the CLI which paths it was given are such files. The walk keeps its own
stack, so a folder nested thousands deep cannot exhaust Python's recursion limit.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from bnlint.fileio import file_kind
from bnlint.formats import is_companion, is_model_folder
from bnlint.loaders import is_model_file

# Folders never searched: environments and caches hold other people's model files.
SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", "node_modules", "site-packages", "dist-packages",
                          ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints"})


def _is_venv(folder: Path) -> bool:
    return (folder / "pyvenv.cfg").is_file() or (folder / "conda-meta").is_dir()


def excluded(path: Path, patterns: Sequence[str]) -> bool:
    """Whether a path matches an exclude glob (against the whole path or any trailing part of it)."""
    text = path.as_posix()
    parts = path.parts
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if fnmatch.fnmatchcase(text, pattern) or fnmatch.fnmatchcase(path.name, pattern):
            return True
        if any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern) for i in range(len(parts))):
            return True
    return False


def _git_files(folder: Path) -> set[Path] | None:
    """Files git does not ignore under `folder` (tracked or not), or None outside a work tree."""
    import subprocess

    try:
        done = subprocess.run(["git", "-C", str(folder), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return {(folder / name).absolute() for name in done.stdout.decode("utf-8", "surrogateescape").split("\0") if name}


def non_regular(path: Path) -> str | None:
    """What `path` is when it exists and is neither a regular file nor a folder ("a named pipe"...), else None.

    Follows symlinks (a link to a pipe is a pipe); a missing or dangling path is None: the loader
    reports it as unreadable, as before.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return file_kind(mode)


def _walk(folder: Path, patterns: Sequence[str], notes: list[str]) -> Iterator[Path]:
    """Model files under folder, skipping environments, caches, excluded paths and non-regular
    files (a note each); sorted, depth first, without recursion."""
    stack = [folder]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:
            continue  # unreadable folder: skipped, as os.walk does
        dirs: list[Path] = []
        for entry in entries:
            path = here / entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                if entry.name not in SKIPPED_DIRS and not _is_venv(path) and not excluded(path, patterns):
                    if is_model_folder(path):  # one model (a SavedModel directory): linted whole, not searched
                        yield path
                    else:
                        dirs.append(path)
            elif is_model_file(path) and not is_companion(path) and not excluded(path, patterns):
                kind = non_regular(path)
                if kind is not None:
                    notes.append(f"{path}: skipped: {kind}, not a model file")
                elif not (entry.is_symlink() and path.is_dir()):  # a link to a folder is not followed
                    yield path
        stack.extend(reversed(dirs))  # popped in sorted order


def search(folder: Path, patterns: Sequence[str] = (), respect_gitignore: bool = True,
           notes: list[str] | None = None) -> list[Path]:
    """Model files in a folder, in a stable order; `notes` gets one line per non-regular file skipped."""
    skipped: list[str] = []
    found = list(_walk(folder, patterns, skipped))
    if notes is not None:
        notes.extend(skipped)
    allowed = _git_files(folder) if respect_gitignore else None
    if allowed is not None:
        folders = {parent for file in allowed for parent in file.parents}  # a model folder counts when git keeps a file in it
        found = [path for path in found if path.absolute() in allowed or path.is_symlink() and not path.exists()
                 or path.is_dir() and path.absolute() in folders]
    return found


def discover(paths: Iterable[str | os.PathLike[str]], exclude: Sequence[str] = (),
             respect_gitignore: bool = True, searched: set[Path] | None = None) -> tuple[list[Path], list[str]]:
    """Files to lint (folders searched, each real file once) and notes about empty folders and
    skipped non-regular files. `searched` collects the files a folder search found (picked by
    their extension, not named by the user)."""
    files: list[Path] = []
    notes: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not is_model_folder(path):
            found = sorted(search(path, exclude, respect_gitignore, notes))
            if not found:
                notes.append(f"{path}: no model files found")
            files.extend(found)
            if searched is not None:
                searched.update(found)
        elif not excluded(path, exclude):
            files.append(path)
    unique: dict[str, Path] = {}
    for path in files:
        try:
            key = str(path.resolve(strict=True))  # symlinks to one file are one file
        except (OSError, RuntimeError, RecursionError):
            key = str(path.absolute())  # dangling or looping: linted (and reported) as given
        unique.setdefault(key, path)
    return list(unique.values()), notes
