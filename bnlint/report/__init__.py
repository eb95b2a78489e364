"""Output formats. Reporters format what they are given: no thresholds, no filtering.

Each format module renders a report to a string from only the inputs it uses; `write_report`
is the one place that dispatches and writes. Format modules are imported on use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TextIO

from bnlint.errors import UsageError
from bnlint.findings import Report
from bnlint.rules.registry import RuleSpec


@dataclass(frozen=True)
class Output:
    """Everything a format may use; color and quiet only affect text."""

    report: Report
    rules: Mapping[str, RuleSpec]
    tool_version: str
    color: bool = False
    quiet: bool = False
    show_fixes: bool = False  # text: each finding's fix under it (else once per code at the end)
    group: bool | None = None  # text: one line per (file, code) for per-layer findings; None: for information only
    statistics: bool = False  # text: counts per code instead of findings


def dump_json(document: Any) -> str:
    # allow_nan=False: json_safe already replaced NaN/Inf, and this guarantees strict JSON.
    # ensure_ascii keeps the bytes ASCII whatever the stream's encoding (layer names may be any text).
    # json_text: a lone surrogate (an undecodable file-name byte) would be an invalid \udcXX escape.
    from bnlint.report._common import json_text

    return json.dumps(json_text(document), indent=2, allow_nan=False, ensure_ascii=True) + "\n"


def _text(out: Output) -> str:
    from bnlint.report import text

    return text.render(out.report, out.rules, color=out.color, quiet=out.quiet, show_fixes=out.show_fixes,
                       group=out.group, statistics=out.statistics)


def _json(out: Output) -> str:
    from bnlint.report import json_report

    return dump_json(json_report.to_dict(out.report, out.rules, out.tool_version))


def _sarif(out: Output) -> str:
    from bnlint.report import sarif

    return dump_json(sarif.to_dict(out.report, out.rules, out.tool_version))


def _github(out: Output) -> str:
    from bnlint.report import github

    return github.render(out.report, out.rules)


def _junit(out: Output) -> str:
    from bnlint.report import junit

    return junit.render(out.report, out.rules, out.tool_version)


REPORTERS: dict[str, Callable[[Output], str]] = {"text": _text, "json": _json, "sarif": _sarif, "github": _github, "junit": _junit}

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
    **text_options: bool,
) -> None:
    """Write `report` to `stream` in format `fmt` (one of FORMATS).

    `rules` describes the codes: pass the rules that ran (JUnit lists each as a testcase, SARIF
    describes each).
    """
    try:
        reporter = REPORTERS[fmt]
    except KeyError:
        raise UsageError(f"unknown output format {fmt!r} (expected one of {', '.join(FORMATS)})") from None
    from bnlint.report._common import no_surrogates

    # no_surrogates: a file name that is not UTF-8 is escaped, never an encoding error mid-report.
    stream.write(no_surrogates(reporter(Output(report, rules, tool_version, color=color, quiet=quiet, **text_options))))
