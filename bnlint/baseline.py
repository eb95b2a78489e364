"""Baselines: record today's findings once, then report only new ones.

Findings are matched by (file, layer, code) — never by message text, whose numbers change.
Matching is by count, so a second finding of the same code on the same layer is still new.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from typing import Any

from bnlint.errors import BnlintError
from bnlint.fileio import nonblocking
from bnlint.findings import Finding, Report

BASELINE_VERSION = 1
# A baseline holds ~100 bytes per finding: 64 MiB is over half a million findings, and a bound on
# what `--baseline /dev/zero` (or a huge file) can make bnlint read.
MAX_BASELINE_BYTES = 64 << 20


def _key(finding: Finding) -> tuple[str, str, str]:
    return (finding.path, finding.layer or "", finding.code)


def write_baseline_file(report: Report, path: str | os.PathLike[str]) -> int:
    entries = [{"path": p, "layer": layer, "code": c} for p, layer, c in sorted(map(_key, report.findings))]
    payload = {"version": BASELINE_VERSION, "findings": entries}
    from bnlint.report._common import write_atomically

    try:  # through a temporary file: an interrupted write never leaves half a baseline
        write_atomically(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8", "backslashreplace"))
    except OSError as exc:
        raise BnlintError(f"cannot write baseline {path}: {exc.strerror}") from None
    return len(entries)


def read_baseline(path: str | os.PathLike[str]) -> Counter[tuple[str, str, str]]:
    """The (file, layer, code) counts of a baseline; anything else is one BnlintError line naming the file."""
    name = os.fspath(path)
    try:
        with open(path, "rb", opener=nonblocking) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise BnlintError(f"cannot read baseline {name}: not a regular file")
            raw = handle.read(MAX_BASELINE_BYTES + 1)
    except FileNotFoundError:
        raise BnlintError(f"baseline {name} does not exist (create it with --write-baseline)") from None
    except OSError as exc:
        raise BnlintError(f"cannot read baseline {name}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BASELINE_BYTES:
        raise BnlintError(f"cannot read baseline {name}: larger than {MAX_BASELINE_BYTES} bytes")
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting is a RecursionError
        raise BnlintError(f"cannot read baseline {name}: not JSON: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("version") != BASELINE_VERSION or not isinstance(payload.get("findings"), list):
        raise BnlintError(f"{name} is not a bnlint baseline (version {BASELINE_VERSION})")
    counts: Counter[tuple[str, str, str]] = Counter()
    for index, entry in enumerate(payload["findings"]):
        counts[_entry(entry, f"{name}: findings[{index}]")] += 1
    return counts


def _entry(entry: Any, where: str) -> tuple[str, str, str]:
    """One baseline entry: path and code strings, layer a string or null."""
    if not isinstance(entry, dict):
        raise BnlintError(f"{where}: expected an object with path, layer and code, got {type(entry).__name__}")
    for key, optional in (("path", False), ("code", False), ("layer", True)):
        value = entry.get(key)
        if not (isinstance(value, str) or (optional and value is None)):
            wanted = "a string or null" if optional else "a string"
            raise BnlintError(f"{where}: {key}: expected {wanted}, got {type(value).__name__}")
    return (entry["path"], entry.get("layer") or "", entry["code"])




def apply_baseline(report: Report, path: str | os.PathLike[str]) -> int:
    """Drop findings present in the baseline; returns how many were dropped."""
    remaining = read_baseline(path)
    dropped = 0
    for result in report.files:
        kept = []
        for finding in result.findings:
            key = _key(finding)
            if remaining[key] > 0:
                remaining[key] -= 1
                dropped += 1
            else:
                kept.append(finding)
        result.findings = kept
    return dropped
