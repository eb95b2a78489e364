"""Human output: one line per finding, grouped by file, then a drift table, fixes and a summary.

    path:layer: CODE [severity] message      (path: CODE [severity] message when no layer)
    path: error: message                     (a file that could not be read)
    path: note: text                         (loader notes; not with quiet)
    fixes: CODE name: fix (bnlint rule CODE) (each code's fix once; under each finding with show_fixes)

With group, per-layer findings of one code in one file share a line; with statistics, a count per
code replaces the findings.

Findings are printed in the order the engine produced them. Control characters in paths, layer
names and messages are escaped (a model file controls its layer names; it must not control the
terminal). quiet=True keeps finding and file-error lines only.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from bnlint.findings import FileResult, Finding, Report, Severity
from bnlint.report._common import printable, severity_counts
from bnlint.rules.registry import RuleSpec

# How many layers the drift table shows; the JSON output carries all of them.
TOP_LAYERS = 10

_RESET = "\x1b[0m"
_BOLD = "\x1b[1m"
_COLORS = {Severity.ERROR: "\x1b[1;31m", Severity.WARNING: "\x1b[33m", Severity.INFO: "\x1b[36m"}

# (key, header, formatter) for the drift table; keys are documented in the JSON schema.
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("channels", "channels", "int"),
    ("mean_abs_smd", "mean|SMD|", "num"),
    ("max_abs_smd", "max|SMD|", "num"),
    ("max_kl", "max KL", "num"),
    ("fraction_over_threshold", "over thr", "pct"),
)


def _paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color else text


def layer_label(layer: str) -> str:
    """A layer name as shown after the path: a bare integer (an nn.Sequential index) is bracketed,
    so that `model.pt:[1]:` cannot be read as line 1 by editors and CI log parsers."""
    shown = printable(layer)
    return f"[{shown}]" if shown.isdigit() else shown


def format_finding(finding: Finding, *, color: bool = False) -> str:
    path = _paint(printable(finding.path), _BOLD, color)
    where = f"{path}:{layer_label(finding.layer)}:" if finding.layer is not None else f"{path}:"
    tag = _paint(f"{finding.code} [{finding.severity.label}]", _COLORS[finding.severity], color)
    return f"{where} {tag} {printable(finding.message)}"


def _grouped(findings: Sequence[Finding]) -> list[tuple[Finding, list[str]]]:
    """(first finding, layers) per code of one file, in first-seen order; model-level findings alone."""
    groups: dict[str, tuple[Finding, list[str]]] = {}
    out: list[tuple[Finding, list[str]]] = []
    for finding in findings:
        if finding.layer is None:
            out.append((finding, []))
            continue
        if finding.code not in groups:
            groups[finding.code] = (finding, [])
            out.append(groups[finding.code])
        groups[finding.code][1].append(finding.layer)
    return out


def format_group(first: Finding, layers: list[str], *, color: bool = False) -> str:
    if len(layers) <= 1:
        return format_finding(first, color=color)
    path = _paint(printable(first.path), _BOLD, color)
    tag = _paint(f"{first.code} [{first.severity.label}]", _COLORS[first.severity], color)
    shown = ", ".join(layer_label(name) for name in layers[:5]) + (f", ... (+{len(layers) - 5})" if len(layers) > 5 else "")
    return f"{path}: {tag} {len(layers)} layers ({shown}); first: {printable(first.message)}"


def fix_line(code: str, rules: Mapping[str, RuleSpec], indent: str = "  ") -> str | None:
    spec = rules.get(code)
    if spec is None:
        return None
    return f"{indent}{code} {spec.name}: {printable(spec.fix)} (bnlint rule {code})"


def fix_under(code: str, rules: Mapping[str, RuleSpec]) -> str | None:
    spec = rules.get(code)
    return None if spec is None else f"    fix: {printable(spec.fix)} (bnlint rule {code})"


def statistics_lines(findings: Iterable[Finding], rules: Mapping[str, RuleSpec]) -> list[str]:
    """ruff-style counts: one line per code, most frequent first."""
    counts: dict[str, int] = {}
    severity: dict[str, Severity] = {}
    for finding in findings:
        counts[finding.code] = counts.get(finding.code, 0) + 1
        severity[finding.code] = max(severity.get(finding.code, finding.severity), finding.severity)
    if not counts:
        return []
    width = len(str(max(counts.values())))
    ordered = sorted(counts, key=lambda code: (-counts[code], code))
    return [f"{counts[c]:>{width}}  {c}  {'[' + severity[c].label + ']':<9}  {rules[c].name if c in rules else ''}".rstrip()
            for c in ordered]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary_line(report: Report) -> str:
    counts = severity_counts(report.findings)
    unreadable = len(report.errors)
    line = (
        f"{_plural(counts[Severity.ERROR], 'error')}, {_plural(counts[Severity.WARNING], 'warning')}, "
        f"{_plural(counts[Severity.INFO], 'info')} in {_plural(len(report.files), 'file')}"
    )
    return line + (f" ({unreadable} unreadable)" if unreadable else "")


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return printable(str(value))
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if kind == "int":
        return str(int(value)) if float(value).is_integer() else f"{value:.3g}"
    if kind == "pct":
        return f"{value:.1%}"
    return f"{value:.3g}"


def _drift_rank(stats: Mapping[str, Any]) -> float:
    """Sort key: largest max|SMD| first; NaN counts as the worst (a broken layer), missing as none."""
    value = stats.get("max_abs_smd")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.inf
    return -math.inf if math.isnan(value) else -float(value)


def drift_table(result: FileResult, limit: int = TOP_LAYERS) -> list[str]:
    """The most drifted layers (by max|SMD|) as an aligned table; [] when there are no stats."""
    if not result.layer_stats:
        return []
    # A stable sort keeps layer order among ties, so the first drifting layer stays first.
    shown = sorted(result.layer_stats, key=_drift_rank)[:limit]
    header = ["layer", *(title for _, title, _ in _COLUMNS)]
    rows = [[_cell(s.get("layer"), "str"), *(_cell(s.get(k), kind) for k, _, kind in _COLUMNS)] for s in shown]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return "  " + "  ".join([first, *rest]).rstrip()

    total = len(result.layer_stats)
    title = f"{printable(result.path)}: drift by layer, top {len(shown)} of {total} by max|SMD|"
    return [title, line(header), *(line(r) for r in rows)]


def render(report: Report, rules: Mapping[str, RuleSpec] | None = None, *, color: bool = False, quiet: bool = False,
           show_fixes: bool = False, group: bool = False, statistics: bool = False) -> str:
    """The human-readable report: findings, notes, drift tables, fixes and a summary line."""
    rules = rules or {}
    lines: list[str] = []
    if statistics:
        lines.extend(statistics_lines(report.findings, rules))
    for result in report.files:
        if result.error is not None:
            label = _paint("error", _COLORS[Severity.ERROR], color)
            lines.append(f"{_paint(printable(result.path), _BOLD, color)}: {label}: {printable(result.error.message)}")
        if not statistics:
            entries = _grouped(result.findings) if group else [(f, [f.layer] if f.layer else []) for f in result.findings]
            for first, layers in entries:
                lines.append(format_group(first, layers, color=color))
                fix = fix_under(first.code, rules) if show_fixes else None
                if fix is not None:
                    lines.append(fix)
        if not quiet and not statistics:
            lines.extend(f"{printable(result.path)}: note: {printable(n)}" for n in result.notes)
            table = drift_table(result)
            if table:  # a table stands apart from the finding lines around it
                if lines and lines[-1]:
                    lines.append("")
                lines.extend([*table, ""])
    if not quiet:
        codes = list(dict.fromkeys(f.code for f in report.findings))
        fixes = [line for code in codes if (line := fix_line(code, rules)) is not None] if not (show_fixes or statistics) else []
        if fixes:
            while lines and not lines[-1]:
                lines.pop()
            lines.extend(["", "fixes:", *fixes])
        while lines and not lines[-1]:
            lines.pop()
        lines.extend(["", summary_line(report)] if lines else [summary_line(report)])
    return "".join(text + "\n" for text in lines)
