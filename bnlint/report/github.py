"""GitHub Actions workflow commands: one annotation per finding, one per unreadable file, one
per file whose dynamic analysis could not run (an error: the check the user asked for did not happen).

    ::error file=PATH,title=BN101 nonfinite-stats::layer: message
    ::warning ...   ::notice ...          (severity warning / info)

No `line=`: a model file has no lines and inventing one would point reviewers at nothing.
Escaping follows the runner's rules (actions/toolkit command.ts): in the message `%`, `\\r`
and `\\n` become %25, %0D, %0A; property values additionally escape `:` (%3A) and `,` (%2C).
"""

from __future__ import annotations

from typing import Mapping

from bnlint.findings import DYNAMIC_NOT_RUN, Finding, Report, Severity
from bnlint.report._common import printable, rule_name
from bnlint.rules.registry import RuleSpec

COMMANDS: dict[Severity, str] = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def escape_data(text: str) -> str:
    """%, CR and LF as the runner's syntax requires; then every other control or bidi character
    (ESC, U+202E, ...) shown escaped, so annotations are data and never terminal commands."""
    escaped = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return printable(escaped)


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _command(kind: str, path: str, title: str, message: str) -> str:
    return f"::{kind} file={escape_property(path)},title={escape_property(title)}::{escape_data(message)}"


def format_finding(finding: Finding, rules: Mapping[str, RuleSpec]) -> str:
    name = rule_name(rules, finding.code)
    title = f"{finding.code} {name}" if name else finding.code
    message = f"{finding.layer}: {finding.message}" if finding.layer is not None else finding.message
    return _command(COMMANDS[finding.severity], finding.path, title, message)


def render(report: Report, rules: Mapping[str, RuleSpec]) -> str:
    """Workflow commands, one line per finding or unreadable file (the runner renders them)."""
    lines = []
    for result in report.files:
        if result.error is not None:
            lines.append(_command("error", result.path, "bnlint: unreadable file", result.error.message))
        elif result.dynamic_error is not None:
            lines.append(_command("error", result.path, f"bnlint: {DYNAMIC_NOT_RUN}", result.dynamic_error))
        lines.extend(format_finding(finding, rules) for finding in result.findings)
    return "".join(line + "\n" for line in lines)
