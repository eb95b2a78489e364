"""Typed errors. Every user-facing failure is one of these, never an assert or a bare exception."""

from __future__ import annotations


class BnlintError(Exception):
    """Base class: the message is one line, shown to the user as-is."""


class InputError(BnlintError):
    """An input file cannot be read (missing, wrong format, truncated, corrupt). Exit code 2."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class NotAModel(InputError):
    """The file is in no format bnlint reads (not a model, or a Git LFS pointer); --skip-unrecognised makes it a note."""


class ModelPlaceholder(NotAModel):
    """A stand-in for a model that is elsewhere (a Git LFS pointer): unlike a data file a folder
    search happens to find, it is an error there too, since the model it names was not checked."""


class DataError(InputError):
    """The --data sample cannot be used with this model (shape, dtype, NaN, missing key)."""


class UsageError(BnlintError):
    """Bad command-line usage or configuration. Exit code 2."""


class TrustRequired(InputError):
    """The requested job would run code from the input file and --trust was not given."""


class UnsafeInputError(InputError):
    """An input that could not be read, whose pickle(s) named code that loading them would run.

    The pickle scan runs before (and independently of) building any object, so what it saw is
    kept however the rest of the load ends: `unsafe_globals` are execution primitives (rule
    BN001, error) and `unknown_callables` are other callables outside the allowlist that
    loading would call (rule BN003, warning). Both are qualified names, never imported. The
    file result carries the error line *and* these findings.
    """

    def __init__(self, path: str, problem: str, unsafe_globals: list[str], unknown_callables: list[str] | None = None) -> None:
        super().__init__(path, problem)
        self.unsafe_globals = list(unsafe_globals)
        self.unknown_callables = list(unknown_callables or [])


class OutputError(BnlintError):
    """An output cannot be written (read-only folder, full disk, permission): one line, exit code 2.
    Whatever was there before is left as it was."""
