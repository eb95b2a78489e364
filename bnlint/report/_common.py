"""Helpers shared by the reporters: value serialisation, rule text, paths and counts.

Nothing here decides what to report: these only reshape what the engine produced.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Mapping
from urllib.parse import quote

from bnlint.findings import FileResult, Finding, Report, Severity, fix_for
from bnlint.rules.registry import RuleSpec

TOOL_NAME = "bnlint"
# SARIF wants a page about the tool; the package index page is the one address known to exist.
INFORMATION_URI = "https://pypi.org/project/bnlint/"

# Keys of a FileResult.layer_stats entry (bnlint.measurements.LayerStats.record(), the JSON
# schema) that reporters read; they read these names and nothing else ("channel" holds the
# per-channel lists). A missing key shows as "-". tests/test_measure_contract.py checks the record has them.
LAYER_STAT_KEYS = ("layer", "order", "channels", "samples", "mean_abs_smd", "max_abs_smd", "mean_abs_lvr", "mean_kl", "max_kl",
                   "noise_kl", "significance", "fraction_over_threshold", "channel")
CHANNEL_KEYS = ("smd", "lvr", "se_smd", "se_lvr")  # the per-channel lists plots draw

# Control characters, and the invisible bidi / direction marks that can reorder what a reader sees
# (Trojan Source, CVE-2021-42574): a model file controls its layer names.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# Lone surrogates: a file name whose bytes are not UTF-8 reaches Python as \udc80-\udcff
# (surrogateescape); no UTF-8 stream can write them, and JSON readers reject them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_safe(value: Any) -> Any:
    """A JSON-serialisable copy of a rule's `values`, valid under `json.dumps(allow_nan=False)`.

    NaN and infinities become the strings "nan", "inf" and "-inf" (JSON has no literal for them,
    and null would hide which one it was). Mapping keys are sorted so output is deterministic.
    numpy scalars and arrays are unwrapped through `.tolist()`; anything else unknown becomes str().
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Severity):  # before int: Severity is an IntEnum
        return value.label
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((json_safe(v) for v in value), key=repr)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalar or array, without importing numpy
        return json_safe(value.tolist())
    return str(value)


def first_paragraph(doc: str) -> str:
    """The first prose paragraph of a rule doc: the text under "## What it does", joined to one line."""
    for block in re.split(r"\n\s*\n", doc.strip()):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if lines:
            return " ".join(lines)
    return ""


def printable(text: str) -> str:
    """Escape control characters (newlines, ESC, NUL) and bidi overrides, so a layer name read from
    a file can neither break the one-line-per-finding layout, send terminal escape sequences, nor
    reorder the text a reviewer reads."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if "\udc80" <= char <= "\udcff":  # an undecodable byte of a file name: shown as that byte
        return f"\\x{ord(char) - 0xDC00:02x}"
    return char.encode("unicode_escape", "backslashreplace").decode("ascii")


def no_surrogates(text: str) -> str:
    """`text` with its lone surrogates (undecodable file-name bytes) escaped as in `printable`,
    everything else untouched: the last step before any report is encoded."""
    return _SURROGATE.sub(_escape, text) if _SURROGATE.search(text) else text


def json_text(value: Any) -> Any:
    """A JSON document with every string (and key) passed through `no_surrogates`."""
    if isinstance(value, str):
        return no_surrogates(value)
    if isinstance(value, dict):
        return {no_surrogates(str(k)): json_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_text(v) for v in value]
    return value


def artifact_uri(path: str) -> str:
    """A URI reference for a model path: relative with forward slashes where possible.

    Absolute paths under the working directory are made relative (code-scanning services resolve
    them against the checkout); others become file:// URIs. Unsafe characters are percent-encoded.
    """
    windows = "\\" in path or PureWindowsPath(path).drive != ""
    posix = PureWindowsPath(path).as_posix() if windows else path
    if os.path.isabs(path):
        try:
            rel = os.path.relpath(path)
        except ValueError:  # different drive on Windows
            rel = None
        if rel is not None and not rel.startswith(".."):
            return quote(PureWindowsPath(rel).as_posix() if windows else rel, safe="/", errors="surrogateescape")
        prefix = "file:///" if windows else "file://"
        return prefix + quote(posix, safe="/:", errors="surrogateescape")
    # surrogateescape: an undecodable file-name byte is percent-encoded as that byte, which names the real file.
    return quote(str(PurePosixPath(posix)), safe="/", errors="surrogateescape")


# What a clean result cannot vouch for, by ModelInfo.format: facts the format does not record.
# One table, so every reporter says the same; formats absent here record what the rules read.
NOT_SHOWN: dict[str, str] = {
    "torch-state-dict": "training modes are not recorded in a state dict: --reference or --data can show drift",
    "torch-checkpoint": "training modes are not recorded in a checkpoint's state dict: --reference or --data can show drift",
    "lightning": "training modes are not recorded in a Lightning checkpoint's state dict: --reference or --data can show drift",
    "safetensors": "training modes, momentum and eps are not recorded in safetensors: --reference or --data can show drift",
    "keras-weights": "layer settings (momentum, epsilon, trainable) are not recorded in a weights-only file: --data can show drift",
}


def not_shown(result: FileResult) -> str | None:
    """What a clean lint of `result` cannot show (its format does not record it), or None; none
    once --data measured the file (the drift the blind spot hides was then looked at)."""
    if result.error is not None or result.layer_stats or not result.layer_count:
        return None
    return NOT_SHOWN.get(result.format or "")


# Framework (ModelInfo.framework) from a FileResult's format, for results made before the field existed.
_FRAMEWORK_OF_FORMAT = {"onnx": "onnx", "caffe": "caffe", "keras": "keras", "keras-h5": "keras", "keras-weights": "keras"}


def framework_of(result: FileResult) -> str | None:
    if result.framework is not None:
        return result.framework
    if result.format is None:
        return None
    return _FRAMEWORK_OF_FORMAT.get(result.format, "torch")


def fix_text(spec: RuleSpec, frameworks: Iterable[str | None] = ()) -> str:
    """The rule's fix for these frameworks: the framework's own text when the rule has one and
    every finding is from that framework, else the rule's text for all frameworks."""
    distinct = {f for f in frameworks if f is not None}
    return fix_for(spec.fix, distinct.pop() if len(distinct) == 1 else None)


def doc_text(spec: RuleSpec, frameworks: Iterable[str | None] = ()) -> str:
    """The rule's documentation for these frameworks: when `fix_text` picks a framework's own fix,
    that text is the "## Use instead" section (the general one names every framework's way)."""
    fix = fix_text(spec, frameworks)
    doc = spec.doc
    if fix == str(spec.fix):
        return doc
    start = doc.find(USE_INSTEAD)
    if start < 0:
        return doc
    body = start + len(USE_INSTEAD)
    end = doc.find("\n## ", body)
    return f"{doc[:body]}\n\n{fix}\n{doc[end:] if end >= 0 else ''}"


USE_INSTEAD = "## Use instead"


def severity_counts(findings: Iterable[Finding]) -> dict[Severity, int]:
    counts = {sev: 0 for sev in Severity}
    for finding in findings:
        counts[finding.severity] += 1
    return counts


def rule_name(rules: Mapping[str, RuleSpec], code: str) -> str | None:
    spec = rules.get(code)
    return spec.name if spec is not None else None


def finding_codes(report: Report, rules: Mapping[str, RuleSpec]) -> list[str]:
    """Every rule code in `rules` in their order, then codes seen only in findings (first seen first)."""
    codes = list(rules)
    for finding in report.findings:
        if finding.code not in rules and finding.code not in codes:
            codes.append(finding.code)
    return codes


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` through a temporary file beside it, then one rename: a reader (or a
    crash, or a full disk) never sees a half-written report, and an error leaves the old file as it was.

    The new file gets the old one's permission bits, else the umask's default for a new file
    (not the temporary file's 0600). Raises OSError.
    """
    import stat
    import tempfile

    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    handle, temp = tempfile.mkstemp(prefix=".bnlint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
