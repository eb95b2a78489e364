"""JUnit XML for CI test dashboards.

Mapping (stable):
- <testsuites name="bnlint"> holds one <testsuite> per input file (name = the path).
- Each suite has one <testcase> per rule code (classname = the path, name = "CODE rule-name"):
  the codes of the rule table passed in, in its order (pass the rules that ran), then any other
  code found. So a clean file shows every rule as a passing test.
- A testcase fails (one <failure>, type = the worst severity) when it has a finding of severity
  warning or error; the failure text lists every finding of that code, one per line, as
  "layer: [severity] message". Info findings never fail: their lines go to the testcase's
  <system-out>.
- An unreadable file is a suite with a single testcase "load" carrying an <error> (its rules
  never ran, so they are not listed as passing).
- A file whose dynamic analysis (--data) could not run has a testcase "dynamic analysis" carrying
  an <error>, then its rules' testcases as usual (the static rules ran).
- Loader notes go to the suite's <system-out>. Suite properties record bnlint.version, format and layers.
Counts (tests, failures, errors, skipped="0") are set on every suite and on <testsuites>.
Characters that XML 1.0 cannot carry (control characters from layer names) are escaped as \\xNN.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Mapping

from bnlint.findings import FileResult, Finding, Report, Severity
from bnlint.report._common import TOOL_NAME, finding_codes, rule_name
from bnlint.rules.registry import RuleSpec

# Findings at or above this severity turn a testcase into a failure.
FAILURE_LEVEL = Severity.WARNING

# XML 1.0 allows tab, LF and CR among the C0 controls; the rest make the document ill-formed.
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _INVALID_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _line(finding: Finding) -> str:
    where = f"{finding.layer}: " if finding.layer is not None else ""
    return _xml_text(f"{where}[{finding.severity.label}] {finding.message}")


def _testcase(suite: ET.Element, path: str, code: str, found: list[Finding], rules: Mapping[str, RuleSpec]) -> bool:
    """Add one rule's testcase; True when it failed."""
    name = rule_name(rules, code)
    case = ET.SubElement(suite, "testcase", {"classname": _xml_text(path), "name": f"{code} {name}" if name else code})
    failing = [f for f in found if f.severity >= FAILURE_LEVEL]
    passing = [f for f in found if f.severity < FAILURE_LEVEL]
    if failing:
        worst = max(f.severity for f in failing)
        summary = _line(failing[0]) if len(failing) == 1 else f"{len(failing)} findings of {code}"
        failure = ET.SubElement(case, "failure", {"type": worst.label, "message": summary})
        failure.text = "\n".join(_line(f) for f in failing)
    if passing:
        ET.SubElement(case, "system-out").text = "\n".join(_line(f) for f in passing)
    return bool(failing)


def _suite(
    parent: ET.Element, result: FileResult, codes: list[str], rules: Mapping[str, RuleSpec], tool_version: str
) -> tuple[int, int, int]:
    """Add one file's testsuite; returns (tests, failures, errors)."""
    path = _xml_text(result.path)
    suite = ET.SubElement(parent, "testsuite", {"name": path})
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", {"name": "bnlint.version", "value": _xml_text(tool_version)})
    ET.SubElement(props, "property", {"name": "format", "value": _xml_text(result.format or "")})
    ET.SubElement(props, "property", {"name": "layers", "value": str(result.layer_count)})
    tests = failures = errors = 0
    if result.error is not None:
        case = ET.SubElement(suite, "testcase", {"classname": path, "name": "load"})
        message = _xml_text(result.error.message)
        ET.SubElement(case, "error", {"type": "InputError", "message": message}).text = message
        tests, errors = 1, 1
    else:
        if result.dynamic_error is not None:  # the rules below ran on the file; running it on --data did not
            case = ET.SubElement(suite, "testcase", {"classname": path, "name": "dynamic analysis"})
            message = _xml_text(result.dynamic_error)
            ET.SubElement(case, "error", {"type": "DynamicNotRun", "message": message}).text = message
            tests, errors = 1, 1
        by_code: dict[str, list[Finding]] = {}
        for finding in result.findings:
            by_code.setdefault(finding.code, []).append(finding)
        for code in codes:
            tests += 1
            failures += _testcase(suite, result.path, code, by_code.get(code, []), rules)
    if result.notes:
        ET.SubElement(suite, "system-out").text = "\n".join(_xml_text(n) for n in result.notes)
    suite.attrib.update({"tests": str(tests), "failures": str(failures), "errors": str(errors), "skipped": "0"})
    return tests, failures, errors


def to_element(report: Report, rules: Mapping[str, RuleSpec], tool_version: str = "") -> ET.Element:
    codes = finding_codes(report, rules)
    root = ET.Element("testsuites", {"name": TOOL_NAME})
    totals = [0, 0, 0]
    for result in report.files:
        for i, n in enumerate(_suite(root, result, codes, rules, tool_version)):
            totals[i] += n
    root.attrib.update(
        {"tests": str(totals[0]), "failures": str(totals[1]), "errors": str(totals[2]), "skipped": "0"}
    )
    return root


def render(report: Report, rules: Mapping[str, RuleSpec], tool_version: str) -> str:
    """The JUnit XML document (ElementTree escapes &, <, > and quotes)."""
    root = to_element(report, rules, tool_version)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
