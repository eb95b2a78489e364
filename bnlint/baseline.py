"""Baselines: record today's findings once, then report only new ones.

Findings are matched by (file, layer, code) — never by message text, whose numbers change.
Matching is by count, so a second finding of the same code on the same layer is still new.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from bnlint.errors import BnlintError
from bnlint.findings import Finding, Report

BASELINE_VERSION = 1


def _key(finding: Finding) -> tuple[str, str, str]:
    return (finding.path, finding.layer or "", finding.code)


def write_baseline_file(report: Report, path: str | os.PathLike[str]) -> int:
    entries = [{"path": p, "layer": layer, "code": c} for p, layer, c in sorted(map(_key, report.findings))]
    payload = {"version": BASELINE_VERSION, "findings": entries}
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
    except OSError as exc:
        raise BnlintError(f"cannot write baseline {path}: {exc.strerror}") from None
    return len(entries)


def read_baseline(path: str | os.PathLike[str]) -> Counter[tuple[str, str, str]]:
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except FileNotFoundError:
        raise BnlintError(f"baseline {path} does not exist (create it with --write-baseline)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BnlintError(f"cannot read baseline {path}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("version") != BASELINE_VERSION or not isinstance(payload.get("findings"), list):
        raise BnlintError(f"{path} is not a bnlint baseline (version {BASELINE_VERSION})")
    try:
        return Counter((str(e["path"]), str(e.get("layer") or ""), str(e["code"])) for e in payload["findings"])
    except (KeyError, TypeError):
        raise BnlintError(f"{path}: malformed baseline entry") from None


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
