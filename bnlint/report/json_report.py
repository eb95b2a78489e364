"""Machine-readable JSON, version 1; its schema is bnlint/schemas/bnlint-report.schema.json.

Shape (keys always present, in this order):

    {"version": 1,
     "tool": {"name": "bnlint", "version": "0.1.0"},
     "files": [{"path": str, "format": str | null, "layers": int, "error": str | null,
                "findings": [{"code", "name", "severity", "layer", "message", "values", "fix"}],
                "layer_stats": [{...}], "notes": [str],
                "dynamic_error": str | null, "not_shown": str | null}],
     "summary": {"error": n, "warning": n, "info": n, "files": n, "unreadable": n, "dynamic_not_run": n}}

- `severity` is "error" | "warning" | "info"; `name` is null for a code absent from the rule table.
- `values` and each `layer_stats` entry are free-form objects with sorted keys. Non-finite numbers
  are the strings "nan", "inf" and "-inf" (so the output is strict JSON that every parser reads).
- `layer_stats` entries (dynamic analysis) use the keys layer, channels, mean_abs_smd,
  max_abs_smd, max_kl, fraction_over_threshold, plus any extra the analysis records.
- `summary.files` counts every input, readable or not; `unreadable` those with an error.
- `dynamic_error`: the file was read and checked statically, but --data could not run it (why,
  and what to give); exit code 2 like `error`. `summary.dynamic_not_run` counts those files.
- `not_shown`: what the file's format does not record, so a clean result cannot vouch for it.
Bumping `version` is required for any change that removes or retypes a key; adding keys is not.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Mapping

from bnlint.findings import FileResult, Finding, Report, Severity
from bnlint.report._common import TOOL_NAME, fix_text, framework_of, json_safe, not_shown, rule_name, severity_counts
from bnlint.rules.registry import RuleSpec

JSON_VERSION = 1
SCHEMA_FILE = "bnlint-report.schema.json"


def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of this output, shipped as package data."""
    text = resources.files("bnlint").joinpath("schemas").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _finding(finding: Finding, rules: Mapping[str, RuleSpec], framework: str | None) -> dict[str, Any]:
    spec = rules.get(finding.code)
    return {
        "code": finding.code,
        "name": rule_name(rules, finding.code),
        "severity": finding.severity.label,
        "layer": finding.layer,
        "message": finding.message,
        "values": json_safe(dict(finding.values)),
        "fix": fix_text(spec, [framework]) if spec is not None else None,
    }


def _file(result: FileResult, rules: Mapping[str, RuleSpec]) -> dict[str, Any]:
    return {
        "path": result.path,
        "format": result.format,
        "layers": result.layer_count,
        "error": result.error.message if result.error is not None else None,
        "findings": [_finding(f, rules, framework_of(result)) for f in result.findings],
        "layer_stats": [json_safe(dict(s)) for s in result.layer_stats],
        "notes": list(result.notes),
        "dynamic_error": result.dynamic_error if result.error is None else None,
        "not_shown": not_shown(result),
    }


def to_dict(report: Report, rules: Mapping[str, RuleSpec], tool_version: str) -> dict[str, Any]:
    """The report as plain JSON data (what `bnlint.report.write_report` serialises), for callers that embed it."""
    counts = severity_counts(report.findings)
    return {
        "version": JSON_VERSION,
        "tool": {"name": TOOL_NAME, "version": tool_version},
        "files": [_file(r, rules) for r in report.files],
        "summary": {
            "error": counts[Severity.ERROR],
            "warning": counts[Severity.WARNING],
            "info": counts[Severity.INFO],
            "files": len(report.files),
            "unreadable": len(report.unreadable),
            "dynamic_not_run": len(report.not_run),
        },
    }
