"""What a rule reports: a small immutable Finding, and the Report that collects them."""

from __future__ import annotations

import enum
import re
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


class FixText(str):
    """A rule's fix text with framework-specific variants: `@rule(fix=FixText(general, keras=...))`.

    It is the general text wherever a plain string is expected (`bnlint rule`, SARIF help);
    reporters pick the variant for the framework a finding came from with `fix_for`.
    """

    variants: Mapping[str, str]

    def __new__(cls, general: str, **variants: str) -> "FixText":
        text = super().__new__(cls, general)
        text.variants = dict(variants)
        return text


def fix_for(fix: str, framework: str | None) -> str:
    """`fix`'s text for `framework` ("torch", "keras", "onnx", "caffe"), its general text otherwise."""
    if isinstance(fix, FixText) and framework is not None:
        return fix.variants.get(framework, str(fix))
    return str(fix)


# How to re-estimate BatchNorm statistics, per framework: `bnlint fix` first where it can write the
# format (it measures, writes a copy and checks it), then the framework's own way. Every
# re-estimation advice is built from these (`reestimate`).
BNLINT_FIX = "`bnlint fix MODEL --data {data} -o FIXED` re-estimates them over the data and checks the result"
REESTIMATE_BY_FRAMEWORK: dict[str, tuple[str, str]] = {  # framework -> (its name, its own way)
    "torch": ("PyTorch", "torch.optim.swa_utils.update_bn(loader, model) (a cumulative average over the loader)"),
    "keras": ("Keras 3", "run model(batch, training=True) over the data with every BatchNormalization trainable and its "
              "momentum set to k/(k+1) before batch k (k = 0, 1, ...: a cumulative average), then save"),
    "tensorflow": ("TensorFlow", "in the code that built the model, run model(batch, training=True) over the data with every "
                   "BatchNormalization trainable and its momentum set to k/(k+1) before batch k, then export again"),
    "onnx": ("the training framework", "re-estimate, then export the ONNX file again"),
    "caffe": ("Caffe", "bnlint fix does not write caffemodels: forward the TRAIN net over many batches of the data in "
              "Caffe (or re-estimate in the framework you trained with and convert again), then save"),
}


def reestimate(lead: str = "", tail: str = "", data: str = "TARGET") -> FixText:
    """Re-estimation advice: `lead`, then `bnlint fix` (on `data`: what to name the sample), then the
    framework's own way, then `tail`; the general text (no framework known) names every framework's way."""
    command = BNLINT_FIX.format(data=data)
    variants = {name: f"{lead}{command}; or in {label}: {how}{tail}" for name, (label, how) in REESTIMATE_BY_FRAMEWORK.items()}
    variants["caffe"] = f"{lead}{REESTIMATE_BY_FRAMEWORK['caffe'][1]}{tail}"
    general = "; ".join(f"{label}: {how}" for name, (label, how) in REESTIMATE_BY_FRAMEWORK.items() if name in ("torch", "keras"))
    return FixText(f"{lead}{command}; or in the training framework ({general}; ONNX: re-estimate in the source "
                   f"framework and export again; Caffe: forward the TRAIN net over the data, then save){tail}", **variants)


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

    def sort_key(self) -> tuple[str, int, str, tuple[tuple[int, int | str], ...]]:
        return (self.path, -int(self.severity), self.code, natural_key(self.layer or ""))


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Layer names in reading order: numbers by value, so BN2 comes before BN10 (and layer1.2 before layer1.10)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)


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
    # The file was read and its static rules ran, but running it on --data could not (weights
    # only without --arch, a pickled module without --trust, a crash, a deadline): one line that
    # says why and what to give. Exit code 2 like `error`, but the file is not unreadable.
    dynamic_error: str | None = None
    framework: str | None = None  # ModelInfo.framework: picks framework-specific fix text
    # Per-layer dynamic statistics (JSON output carries them); empty for static-only runs.
    layer_stats: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[FileError]:
        if self.error is not None:
            return [self.error]
        if self.dynamic_error is not None:
            return [FileError(self.path, f"{DYNAMIC_NOT_RUN}: {self.dynamic_error}")]
        return []


DYNAMIC_NOT_RUN = "dynamic analysis not run"
# The start of a note that warns about the --data sample itself (uint8 raw pixels): reporters put
# it before the findings it explains and keep it under --quiet.
DATA_WARNING = "check the data:"


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
        """Every problem that makes the run incomplete (exit code 2): unreadable files, and
        dynamic analyses that could not run (as "dynamic analysis not run: ...")."""
        return [e for r in self.files for e in r.problems()]

    @property
    def unreadable(self) -> list[FileError]:
        """Files that could not be read at all."""
        return [r.error for r in self.files if r.error is not None]

    @property
    def not_run(self) -> list[FileResult]:
        """Files read and statically checked whose dynamic analysis could not run."""
        return [r for r in self.files if r.error is None and r.dynamic_error is not None]

    def worst(self) -> Severity | None:
        found = [f.severity for f in self.findings]
        return max(found) if found else None
