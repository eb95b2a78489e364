"""Output formats. Reporters format what they are given: no thresholds, no filtering.

Every format is a function with the `Reporter` signature below; `write_report` dispatches by name.
"""

from __future__ import annotations

from typing import Mapping, Protocol, TextIO

from bnlint.errors import UsageError
from bnlint.findings import Report
from bnlint.report import github, json_report, junit, sarif, text
from bnlint.rules.registry import RuleSpec


class Reporter(Protocol):
    def __call__(
        self,
        report: Report,
        rules: Mapping[str, RuleSpec],
        stream: TextIO,
        *,
        color: bool = False,
        quiet: bool = False,
        tool_version: str = "",
    ) -> None: ...


REPORTERS: dict[str, Reporter] = {
    "text": text.write,
    "json": json_report.write,
    "sarif": sarif.write,
    "github": github.write,
    "junit": junit.write,
}

FORMATS: tuple[str, ...] = tuple(REPORTERS)


def write_report(
    report: Report,
    rules: Mapping[str, RuleSpec],
    fmt: str,
    stream: TextIO,
    *,
    color: bool = False,
    quiet: bool = False,
    tool_version: str,
) -> None:
    """Write `report` to `stream` in format `fmt` (one of FORMATS).

    `rules` describes the codes: pass the rules that ran (JUnit lists each as a testcase, SARIF
    describes each). color and quiet only affect the text format.
    """
    try:
        reporter = REPORTERS[fmt]
    except KeyError:
        raise UsageError(f"unknown output format {fmt!r} (expected one of {', '.join(FORMATS)})") from None
    reporter(report, rules, stream, color=color, quiet=quiet, tool_version=tool_version)


__all__ = ["FORMATS", "REPORTERS", "Reporter", "write_report"]
