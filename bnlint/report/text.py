"""Human output: one line per finding, grouped by file, then a drift table, fixes and a summary.

    path:layer: CODE [severity] message      (path: CODE [severity] message when no layer)
    path: error: message                     (a file that could not be read)
    path: dynamic analysis not run: why; what to give   (read and checked statically; --data could not run it)
    path: check the data: text               (a warning about --data, before the findings it explains)
    path: note: text                         (loader notes, identical ones once with their layers; not with quiet)
    fixes: CODE name: fix (bnlint rule CODE) (each code's fix once, for the findings' framework; under
                                              each finding with show_fixes; first sentence when many codes)

With group, per-layer findings of one code in one file share a line; with statistics, a count per
code replaces the findings.

Findings are printed in the order the engine produced them. Control characters in paths, layer
names and messages are escaped (a model file controls its layer names; it must not control the
terminal). quiet=True keeps finding, file-error, not-run and data-warning lines only. A clean
file's summary says how many BatchNorm layers were checked and what its format cannot show.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

from bnlint.findings import DATA_WARNING, DYNAMIC_NOT_RUN, FileResult, Finding, Report, Severity
from bnlint.report._common import fix_text, framework_of, not_shown, printable, severity_counts
from bnlint.rules.registry import RuleSpec

# How many layers the drift table shows; the JSON output carries all of them.
TOP_LAYERS = 10
# More distinct codes than this: each fix is cut to its first sentence (`bnlint rule CODE` has it all).
FULL_FIXES = 8

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


# Without --group/--no-group, an information finding repeated on more layers of one file than
# this shares one line (a healthy ONNX export has a BN505 on each of its 94 layers); warnings and
# errors stay one line per layer, where each is something to act on. JSON and SARIF list them all.
INFO_GROUP_MIN = 4


def _entries(findings: Sequence[Finding], group: bool | None) -> list[tuple[Finding, list[str]]]:
    """What the report prints for one file's findings: (first finding, its layers) entries."""
    if group:
        return _grouped(findings)
    if group is None:
        counts = Counter(f.code for f in findings if f.layer is not None and f.severity == Severity.INFO)
        return _grouped(findings, {code for code, count in counts.items() if count >= INFO_GROUP_MIN})
    return [(f, [f.layer] if f.layer else []) for f in findings]


def _grouped(findings: Sequence[Finding], codes: set[str] | None = None) -> list[tuple[Finding, list[str]]]:
    """(first finding, layers) per code of one file (only `codes`, if given), in first-seen order;
    model-level findings alone."""
    groups: dict[str, tuple[Finding, list[str]]] = {}
    out: list[tuple[Finding, list[str]]] = []
    for finding in findings:
        if finding.layer is None or (codes is not None and finding.code not in codes):
            out.append((finding, [finding.layer] if finding.layer else []))
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


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def fix_line(code: str, rules: Mapping[str, RuleSpec], indent: str = "  ", frameworks: Iterable[str | None] = (),
             short: bool = False) -> str | None:
    spec = rules.get(code)
    if spec is None:
        return None
    text = fix_text(spec, frameworks)
    return f"{indent}{code} {spec.name}: {printable(_first_sentence(text) if short else text)} (bnlint rule {code})"


def fix_under(code: str, rules: Mapping[str, RuleSpec], framework: str | None = None) -> str | None:
    spec = rules.get(code)
    return None if spec is None else f"    fix: {printable(fix_text(spec, [framework]))} (bnlint rule {code})"


def grouped_run_notes(notes: Sequence[str], limit: int = 3) -> list[str]:
    """The run's notes for stderr: files skipped for one reason (a folder of ONNX test data gives
    hundreds) become one line with a count and the first few paths once there are more than `limit`."""
    skipped: dict[str, list[str]] = {}
    for note in notes:
        path, sep, reason = note.partition(": skipped: ")
        if sep:
            skipped.setdefault(reason, []).append(path)
    lines: list[str] = []
    summarised: set[str] = set()
    for note in notes:
        _, sep, reason = note.partition(": skipped: ")
        paths = skipped.get(reason, []) if sep else []
        if len(paths) <= limit:
            lines.append(note)
        elif reason not in summarised:  # the one line, where the first of them was
            summarised.add(reason)
            lines.append(f"skipped {len(paths)} files: {reason} ({', '.join(paths[:limit])}, ... (+{len(paths) - limit}))")
    return lines


def grouped_notes(notes: Iterable[str]) -> list[str]:
    """Notes in first-seen order, each text once: identical notes get a count, and notes that
    differ only in a leading `layer: ` get one line listing the layers."""
    order: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for note in notes:
        head, sep, rest = note.partition(": ")
        if sep and head and " " not in head and rest:  # "stage1/bn: no weights group ..." -> per-layer
            order.setdefault(rest, []).append(head)
        else:
            order.setdefault(note, [])
            counts[note] = counts.get(note, 0) + 1
    out = []
    for text, layers in order.items():
        if len(layers) == 1 and text not in counts:
            out.append(f"{layers[0]}: {text}")
        elif layers:
            shown = ", ".join(layers[:5]) + (f", ... (+{len(layers) - 5})" if len(layers) > 5 else "")
            out.append(f"{text} ({len(layers)} layers: {shown})")
        if counts.get(text, 0) == 1:
            out.append(text)
        elif counts.get(text, 0) > 1:
            out.append(f"{text} ({counts[text]} times)")
    return out


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
    line = (
        f"{_plural(counts[Severity.ERROR], 'error')}, {_plural(counts[Severity.WARNING], 'warning')}, "
        f"{_plural(counts[Severity.INFO], 'info')} in {_plural(len(report.files), 'file')}"
    )
    problems = [f"{len(report.unreadable)} unreadable"] if report.unreadable else []
    if report.not_run:
        problems.append(f"{len(report.not_run)} with {DYNAMIC_NOT_RUN}")
    return line + (f" ({', '.join(problems)})" if problems else "")


def clean_lines(report: Report) -> list[str]:
    """For files without warnings or errors: the BatchNorm layers checked, and per blind spot of
    their formats (what the file cannot show) one line. So "0 warnings" never reads as more than it is."""
    clean = [r for r in report.files if r.error is None and r.layer_count and all(f.severity < Severity.WARNING for f in r.findings)]
    if not clean:
        return []
    layers = sum(r.layer_count for r in clean)
    blind: dict[str, list[FileResult]] = {}
    for result in clean:
        text = not_shown(result)
        if text is not None:
            blind.setdefault(text, []).append(result)
    checked = f"{_plural(layers, 'BatchNorm layer')} checked" + (f" in {_plural(len(clean), 'file')} without warnings"
                                                                  if len(clean) != len(report.files) else "")
    if len(blind) == 1 and len(report.files) == 1:
        return [f"{checked}; {next(iter(blind))}"]
    return [checked, *(f"  {printable(text)} ({', '.join(printable(r.path) for r in files[:3])}"
                       f"{f', ... (+{len(files) - 3})' if len(files) > 3 else ''})" for text, files in blind.items())]


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
           show_fixes: bool = False, group: bool | None = None, statistics: bool = False) -> str:
    """The human-readable report: findings, notes, drift tables, fixes and a summary line."""
    rules = rules or {}
    lines: list[str] = []
    if statistics:
        lines.extend(statistics_lines(report.findings, rules))
    for result in report.files:
        shown = _paint(printable(result.path), _BOLD, color)
        if result.error is not None:
            label = _paint("error", _COLORS[Severity.ERROR], color)
            lines.append(f"{shown}: {label}: {printable(result.error.message)}")
        elif result.dynamic_error is not None:
            label = _paint(DYNAMIC_NOT_RUN, _COLORS[Severity.ERROR], color)
            lines.append(f"{shown}: {label}: {printable(result.dynamic_error)}")
        # A warning about the data explains the findings after it, so it comes first, even with quiet.
        lines.extend(f"{shown}: {printable(n)}" for n in result.notes if n.startswith(DATA_WARNING))
        if not statistics:
            entries = _entries(result.findings, group)
            for first, layers in entries:
                lines.append(format_group(first, layers, color=color))
                fix = fix_under(first.code, rules, framework_of(result)) if show_fixes else None
                if fix is not None:
                    lines.append(fix)
        if not quiet and not statistics:
            notes = grouped_notes(n for n in result.notes if not n.startswith(DATA_WARNING))
            lines.extend(f"{printable(result.path)}: note: {printable(n)}" for n in notes)
            table = drift_table(result)
            if table:  # a table stands apart from the finding lines around it
                if lines and lines[-1]:
                    lines.append("")
                lines.extend([*table, ""])
    if not quiet:
        frameworks: dict[str, set[str | None]] = {}
        for result in report.files:
            for finding in result.findings:
                frameworks.setdefault(finding.code, set()).add(framework_of(result))
        codes = sorted(frameworks)  # one line per distinct code, in code order (families together)
        short = len(codes) > FULL_FIXES
        fixes = [line for code in codes if (line := fix_line(code, rules, frameworks=frameworks[code], short=short)) is not None
                 ] if not (show_fixes or statistics) else []
        if fixes:
            while lines and not lines[-1]:
                lines.pop()
            lines.extend(["", "fixes:", *fixes])
        while lines and not lines[-1]:
            lines.pop()
        summary = [summary_line(report), *clean_lines(report)]
        if len(summary) == 2 and not summary[1].startswith("  "):  # one clean file: one line
            summary = [f"{summary[0]}: {summary[1]}"]
        lines.extend(["", *summary] if lines else summary)
    return "".join(text + "\n" for text in lines)
