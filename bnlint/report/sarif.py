"""SARIF 2.1.0 (OASIS, errata01): one run, every rule described, one result per finding.

Models have no lines, so no result carries a region: the artifact is the model file and the
layer is a logical location (kind "member"). Files that could not be read are reported as
toolExecutionNotifications of the single invocation, which is then not executionSuccessful; so
are files read and checked statically whose dynamic analysis (--data) could not run.
Loader notes become notifications of level "note".
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

from bnlint.findings import DYNAMIC_NOT_RUN, FileResult, Finding, Report, Severity
from bnlint.report._common import (
    INFORMATION_URI,
    TOOL_NAME,
    artifact_uri,
    doc_text,
    finding_codes,
    first_paragraph,
    fix_text,
    framework_of,
    json_safe,
)
from bnlint.rules.registry import RuleSpec

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"

LEVELS: dict[Severity, str] = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}


def _descriptor(spec: RuleSpec, frameworks: Iterable[str | None] = ()) -> dict[str, Any]:
    """The rule's entry; its help is the fix for the frameworks of its findings, as the text output shows."""
    doc = doc_text(spec, frameworks) or spec.summary
    descriptor: dict[str, Any] = {
        "id": spec.code,
        "name": spec.name,
        "shortDescription": {"text": spec.summary},
        "fullDescription": {"text": first_paragraph(doc) or spec.summary},
        "help": {"text": doc, "markdown": doc},
        "defaultConfiguration": {"level": LEVELS[spec.severity]},
    }
    if spec.family:
        descriptor["properties"] = {"tags": [spec.family]}
    return descriptor


def _fingerprint(finding: Finding, uri: str) -> str:
    """Stable identity across runs (code, file, layer): code-scanning services otherwise hash
    source lines, which a binary model file does not have."""
    key = "\0".join((finding.code, uri, finding.layer or ""))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def _region(finding: Finding, size: int | None) -> dict[str, int] | None:
    """The byte range of the finding's tensor, else the whole file (SARIF 3.30 byte-offset form)."""
    if finding.region is not None:
        return {"byteOffset": finding.region[0], "byteLength": finding.region[1]}
    return {"byteOffset": 0, "byteLength": size} if size is not None else None


def _result(finding: Finding, index: Mapping[str, int], size: int | None = None, fix: str | None = None) -> dict[str, Any]:
    uri = artifact_uri(finding.path)
    physical: dict[str, Any] = {"artifactLocation": {"uri": uri}}
    region = _region(finding, size)
    if region is not None:
        physical["region"] = region
    location: dict[str, Any] = {"physicalLocation": physical}
    if finding.layer is not None:
        location["logicalLocations"] = [{"name": finding.layer, "kind": "member"}]
    result: dict[str, Any] = {"ruleId": finding.code}
    if finding.code in index:
        result["ruleIndex"] = index[finding.code]
    result.update(
        {
            "level": LEVELS[finding.severity],
            "message": {"text": finding.message},
            "locations": [location],
            "partialFingerprints": {"bnlintFinding/v1": _fingerprint(finding, uri)},
            "properties": {"values": json_safe(dict(finding.values))},
        }
    )
    if fix is not None:  # the fix for this finding's framework (a rule's help can only hold one text)
        result["properties"]["fix"] = fix
    return result


def _fix(finding: Finding, rules: Mapping[str, RuleSpec], result: FileResult) -> str | None:
    spec = rules.get(finding.code)
    return None if spec is None else fix_text(spec, [framework_of(result)])


def _notification(path: str, level: str, text: str) -> dict[str, Any]:
    return {
        "level": level,
        "message": {"text": text},
        "locations": [{"physicalLocation": {"artifactLocation": {"uri": artifact_uri(path)}}}],
    }


def to_dict(report: Report, rules: Mapping[str, RuleSpec], tool_version: str) -> dict[str, Any]:
    # Only codes in the rule table get a descriptor (and so a ruleIndex); a stray code still
    # appears as a result with its ruleId, which SARIF allows.
    codes = [c for c in finding_codes(report, rules) if c in rules]
    index = {code: i for i, code in enumerate(codes)}
    notifications = []
    for result in report.files:
        if result.error is not None:
            notifications.append(_notification(result.path, "error", f"{result.path}: {result.error.message}"))
        elif result.dynamic_error is not None:
            notifications.append(_notification(result.path, "error", f"{result.path}: {DYNAMIC_NOT_RUN}: {result.dynamic_error}"))
        notifications.extend(_notification(result.path, "note", f"{result.path}: {n}") for n in result.notes)
    frameworks: dict[str, set[str | None]] = {}
    for result in report.files:
        for finding in result.findings:
            frameworks.setdefault(finding.code, set()).add(framework_of(result))
    invocation: dict[str, Any] = {"executionSuccessful": not report.errors}
    if notifications:
        invocation["toolExecutionNotifications"] = notifications
    driver = {
        "name": TOOL_NAME,
        "version": tool_version,
        "informationUri": INFORMATION_URI,
        # a rule without findings is described for the frameworks of every file checked
        "rules": [_descriptor(rules[c], frameworks.get(c) or {framework_of(r) for r in report.files}) for c in codes],
    }
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {"driver": driver},
                "invocations": [invocation],
                "results": [_result(f, index, result.size, _fix(f, rules, result)) for result in report.files for f in result.findings],
            }
        ],
    }
