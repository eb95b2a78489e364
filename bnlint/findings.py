"""What a rule reports: a small immutable Finding, and the Report that collects them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping


class Severity(enum.IntEnum):
    """Ordered so that `a >= b` means "a is at least as bad as b"."""

    INFO = 1
    WARNING = 2
    ERROR = 3

    @classmethod
    def parse(cls, text: str) -> "Severity":
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown severity {text!r} (expected error, warning or info)") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Finding:
    """One problem in one model file, located by layer name (models have no line numbers).

    `values` holds the measured numbers behind the message, so machine-readable output
    (JSON, SARIF) carries them without parsing text.
    """

    code: str
    severity: Severity
    path: str
    layer: str | None
    message: str
    values: Mapping[str, Any] = field(default_factory=dict)
    # (byte offset, length) in the model file of the tensor the finding is about, when the loader
    # knows it (SARIF regions); None: the whole file.
    region: tuple[int, int] | None = None

    def sort_key(self) -> tuple[str, int, str, str]:
        return (self.path, -int(self.severity), self.code, self.layer or "")


@dataclass(frozen=True)
class FileError:
    """A file that could not be linted at all (exit code 2): one line, never a traceback."""

    path: str
    message: str


@dataclass
class FileResult:
    """Everything bnlint learned about one input file."""

    path: str
    format: str | None = None
    size: int | None = None  # the file's size in bytes (SARIF's whole-file region)
    layer_count: int = 0
    findings: list[Finding] = field(default_factory=list)
    error: FileError | None = None
    # Per-layer dynamic statistics (JSON output carries them); empty for static-only runs.
    layer_stats: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    files: list[FileResult] = field(default_factory=list)
    # Run-level notes for stderr (e.g. a folder with no model file); not findings.
    notes: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.files for f in r.findings]

    @property
    def errors(self) -> list[FileError]:
        return [r.error for r in self.files if r.error is not None]

    def worst(self) -> Severity | None:
        found = [f.severity for f in self.findings]
        return max(found) if found else None
