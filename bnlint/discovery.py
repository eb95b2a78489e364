"""Which files a run lints: paths as given, folders searched for model files.

A folder is searched like a linter searches a repository: files git ignores are skipped (git
itself answers, when the folder is in a work tree), virtual environments and tool caches are
skipped always, `--exclude` / `extend-exclude` globs drop more, a file reached through several
symlinks is linted once, and a dangling symlink is reported as an unreadable input exactly as it
would be when named on the command line.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

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


def _walk(folder: Path, patterns: Sequence[str]) -> Iterator[Path]:
    """Model files under folder, skipping environments, caches and excluded paths; sorted."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not _is_venv(here / d)
                         and not excluded(here / d, patterns))
        for name in sorted(files):
            path = here / name
            if is_model_file(path) and not excluded(path, patterns):
                yield path


def search(folder: Path, patterns: Sequence[str] = (), respect_gitignore: bool = True) -> list[Path]:
    """Model files in a folder, in a stable order."""
    found = list(_walk(folder, patterns))
    allowed = _git_files(folder) if respect_gitignore else None
    if allowed is not None:
        found = [path for path in found if path.absolute() in allowed or path.is_symlink() and not path.exists()]
    return found


def discover(paths: Iterable[str | os.PathLike[str]], exclude: Sequence[str] = (),
             respect_gitignore: bool = True) -> tuple[list[Path], list[str]]:
    """Files to lint (folders searched, each real file once) and notes about empty folders."""
    files: list[Path] = []
    notes: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(search(path, exclude, respect_gitignore))
            if not found:
                notes.append(f"{path}: no model files found")
            files.extend(found)
        elif not excluded(path, exclude):
            files.append(path)
    unique: dict[str, Path] = {}
    for path in files:
        try:
            key = str(path.resolve(strict=True))  # symlinks to one file are one file
        except (OSError, RuntimeError):
            key = str(path.absolute())  # dangling or looping: linted (and reported) as given
        unique.setdefault(key, path)
    return list(unique.values()), notes
