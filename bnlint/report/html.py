"""One self-contained HTML file to look at: summary, findings with their fixes, drift plots.

The file needs nothing else: CSS is inline, plots are PNG `data:` URIs, there is no script and
no external reference (a Content-Security-Policy meta tag forbids any, so even a rendering bug
could not make the page load or run something). Everything a model file controls (paths, layer
names, messages) is HTML-escaped, with control and bidi characters shown as escapes, and the
document is pure ASCII (other characters are character references).

Sections: summary (files, formats, counts by severity, the engine and sample size of the data
run), findings (each with its rule's summary and fix), drift per file (overview plot, a table in
execution order, per-layer plots) and, for a fix, before/after (`FixComparison`). Plots need
matplotlib (`bnlint[plot]`); without it the tables remain and a note says how to get plots.
Like every reporter this only reshapes: the statistics come from `FileResult.layer_stats`.
"""

from __future__ import annotations

import base64
import functools
import html
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

from bnlint.errors import UsageError
from bnlint.findings import DYNAMIC_NOT_RUN, FileResult, Finding, Report, Severity
from bnlint.report import plots
from bnlint.report._common import TOOL_NAME, fix_text, rule_name, severity_counts
from bnlint.rules.registry import RuleSpec

_ENGINE_NOTE = re.compile(r"^dynamic analysis ran on (?P<engine>.*?)(?: over (?P<samples>\d+) samples?)?$", re.DOTALL)

# (key, header, kind) of the per-layer table; kinds: int, num, pct.
_LAYER_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("channels", "channels", "int"),
    ("samples", "samples", "int"),
    ("mean_abs_smd", "mean |SMD|", "num"),
    ("max_abs_smd", "max |SMD|", "num"),
    ("mean_abs_lvr", "mean |LVR|", "num"),
    ("mean_kl", "mean KL", "num"),
    ("max_kl", "max KL", "num"),
    ("noise_kl", "noise KL", "num"),
    ("significance", "KL / noise", "num"),
    ("fraction_over_threshold", "channels over", "pct"),
)


@dataclass(frozen=True)
class LayerComparison:
    """One layer's record (`layer_stats` entry) against the old and against the new stored statistics."""

    layer: str
    before: Mapping[str, Any]
    after: Mapping[str, Any]


@dataclass(frozen=True)
class FixComparison:
    """Input of the before/after section: the same data against a model's old and new statistics."""

    path: str
    layers: tuple[LayerComparison, ...]
    first_drift_before: str | None = None
    first_drift_after: str | None = None
    output: str | None = None

    @classmethod
    def from_layer_stats(cls, path: str, before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], *,
                         first_drift_before: str | None = None, first_drift_after: str | None = None,
                         output: str | None = None) -> FixComparison:
        """Pair two `layer_stats` lists by layer name, in the before run's execution order.

        A layer found on one side only is kept with an empty record on the other (shown as "-").
        Pass the BN602 layers as the first drifts (`plots.first_drift_layer(findings)`).
        """
        after_by_name = {str(s.get("layer")): s for s in after}
        names = [str(s.get("layer")) for s in plots.in_execution_order(before)]
        names += [str(s.get("layer")) for s in plots.in_execution_order(after) if str(s.get("layer")) not in names]
        before_by_name = {str(s.get("layer")): s for s in before}
        layers = tuple(LayerComparison(n, before_by_name.get(n, {}), after_by_name.get(n, {})) for n in names)
        return cls(path, layers, first_drift_before, first_drift_after, output)


def write_html(report: Report, rules: Mapping[str, RuleSpec], stream_or_path: TextIO | str | os.PathLike[str], *,
               comparison: FixComparison | None = None, tool_version: str, plot: bool = True) -> None:
    """Write the HTML report to a text stream or a file path (UTF-8; the text is ASCII anyway).

    An unwritable path raises UsageError (one line: "cannot write PATH: reason").
    """
    from bnlint.report._common import no_surrogates

    document = no_surrogates(render(report, rules, comparison=comparison, tool_version=tool_version, plot=plot))
    if isinstance(stream_or_path, (str, os.PathLike)):
        from bnlint.report._common import write_atomically

        try:
            write_atomically(stream_or_path, document.encode("utf-8", "backslashreplace"))
        except OSError as exc:
            raise UsageError(f"cannot write {os.fspath(stream_or_path)}: {exc.strerror}") from None
    else:
        stream_or_path.write(document)


def render(report: Report, rules: Mapping[str, RuleSpec], *, comparison: FixComparison | None = None,
           tool_version: str, plot: bool = True) -> str:
    """The HTML document; `plot=False` (or no matplotlib) leaves the plots out."""
    draw = plot and plots.available()
    wants_plots = comparison is not None or any(r.layer_stats for r in report.files)
    body: list[str] = [f"<header><h1>{TOOL_NAME} report</h1><p class=\"muted\">{_e(_subtitle(report, comparison))}</p></header>"]
    if wants_plots and not draw and plot:
        body.append("<p class=\"note\" id=\"no-plots\">Plots need matplotlib, which is not installed: "
                    f"<code>{_e(plots.INSTALL_HINT)}</code>. The tables carry the same numbers.</p>")
    body += _summary(report)
    figures: list[_Figure] = []
    if comparison is not None:  # what a fix changed comes first
        body += _comparison(comparison, draw, figures)
    body += _findings(report, rules)
    for result in report.files:
        if result.layer_stats:
            body += _drift(result, draw, figures)
    body.append(f"<footer>Generated by {TOOL_NAME} {_e(tool_version)}. Self-contained: no scripts, no network.</footer>")
    page = _HEAD + "\n".join(body) + "\n</body>\n</html>\n"
    for figure, png in zip(figures, plots.render_all([f.render for f in figures])):
        page = page.replace(figure.placeholder, _img(png, figure.alt), 1)
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def _e(value: Any) -> str:
    """Escaped for HTML text and quoted attributes, with hidden characters made visible."""
    return html.escape(plots.visible(str(value)), quote=True)


def _subtitle(report: Report, comparison: FixComparison | None) -> str:
    files = report.files
    what = files[0].path if len(files) == 1 else f"{len(files)} files"
    return f"{what}, fixed" if comparison is not None else what


def _cell(value: Any, kind: str) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else _e(value)
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if kind == "int":
        return str(int(value)) if float(value).is_integer() else f"{value:.3g}"
    if kind == "pct":
        return f"{value:.0%}"
    return f"{value:.3g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _img(png: bytes, alt: str) -> str:
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk always comes first
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}" alt="{_e(alt)}">'


@dataclass(frozen=True)
class _Figure:
    """A figure to draw once the page is laid out: all of a page's figures are drawn together
    (plots.render_all, in two processes where there are cores) and put in their placeholders."""

    render: Callable[[], bytes]  # picklable (a functools.partial of a plots function)
    alt: str
    placeholder: str


def _figure(figures: list[_Figure], draw: bool, render_png: Callable[[], bytes], alt: str, caption: str, cls: str = "") -> str:
    image = ""
    if draw:
        image = f"\x00figure {len(figures)}\x00"  # no escaped text can hold a NUL
        figures.append(_Figure(render_png, alt, image))
    klass = f' class="{cls}"' if cls else ""
    return f"<figure{klass}>{image}<figcaption>{caption}</figcaption></figure>"


def _engine(result: FileResult) -> str:
    for note in result.notes:
        match = _ENGINE_NOTE.match(note)
        if match:
            return match.group("engine")
    return ""


def _samples(result: FileResult) -> int | None:
    counts = [s["samples"] for s in result.layer_stats if isinstance(s.get("samples"), int)]
    return max(counts) if counts else None


def _summary(report: Report) -> list[str]:
    counts = severity_counts(report.findings)
    formats: dict[str, int] = {}
    for result in report.files:
        if result.format:
            formats[result.format] = formats.get(result.format, 0) + 1
    problems = [f"{len(report.unreadable)} unreadable"] if report.unreadable else []
    if report.not_run:
        problems.append(f"{len(report.not_run)} with {DYNAMIC_NOT_RUN}")
    cards = [
        ("files", _plural(len(report.files), "file") + (f" ({', '.join(problems)})" if problems else "")),
        ("error", _plural(counts[Severity.ERROR], "error")),
        ("warning", _plural(counts[Severity.WARNING], "warning")),
        ("info", _plural(counts[Severity.INFO], "info")),
    ]
    out = ["<section id=\"summary\"><h2>Summary</h2><div class=\"cards\">"]
    out += [f'<div class="card {cls if not text.startswith("0 ") else "zero"}">{_e(text)}</div>' for cls, text in cards]
    out.append("</div>")
    if formats:
        listed = ", ".join(f"{name} ({n})" if n > 1 else name for name, n in formats.items())
        out.append(f"<p>Formats: {_e(listed)}</p>")
    out.append('<table class="files"><thead><tr><th>file</th><th>format</th><th class="n">BN layers</th>'
               '<th class="n">errors</th><th class="n">warnings</th><th class="n">info</th><th>data run</th></tr></thead><tbody>')
    for result in report.files:
        out.append(_file_row(result))
    out.append("</tbody></table>")
    notes = [(r.path, n) for r in report.files for n in r.notes if not _ENGINE_NOTE.match(n)]
    if notes or report.notes:
        out.append("<h3>Notes</h3><ul class=\"notes\">")
        out += [f"<li>{_e(n)}</li>" for n in report.notes]
        out += [f"<li><code>{_e(path)}</code>: {_e(n)}</li>" for path, n in notes]
        out.append("</ul>")
    out.append("</section>")
    return out


def _file_row(result: FileResult) -> str:
    path = f"<td><code>{_e(result.path)}</code></td>"
    if result.error is not None:
        return f'<tr class="unreadable">{path}<td colspan="6"><span class="badge error">unreadable</span> {_e(result.error.message)}</td></tr>'
    counts = severity_counts(result.findings)
    samples, engine = _samples(result), _engine(result)
    if result.dynamic_error is not None:
        run = f"{DYNAMIC_NOT_RUN}: {result.dynamic_error}"
    elif samples is not None or engine:
        run = " on ".join(x for x in (f"{samples} samples" if samples is not None else "", engine) if x)
    else:
        run = "static checks only"
    numbers = "".join(f'<td class="n">{counts[s]}</td>' for s in (Severity.ERROR, Severity.WARNING, Severity.INFO))
    return f"<tr>{path}<td>{_e(result.format or '-')}</td><td class=\"n\">{result.layer_count}</td>{numbers}<td>{_e(run)}</td></tr>"


def _findings(report: Report, rules: Mapping[str, RuleSpec]) -> list[str]:
    out = ["<section id=\"findings-section\"><h2>Findings</h2>"]
    findings = report.findings
    if not findings:
        out.append("<p>No findings.</p></section>")
        return out
    head = "<th>severity</th><th>code</th><th>layer</th><th>message</th><th>rule and fix</th>"
    out.append(f'<table id="findings"><thead><tr>{head}</tr></thead><tbody>')
    for result in report.files:
        if result.findings and len(report.files) > 1:  # one heading row per file
            out.append(f'<tr class="file-row"><th colspan="5"><code>{_e(result.path)}</code></th></tr>')
        # result.framework is what the loader found (set on every analysed file); a hand-made
        # FileResult without it gets the text for every framework
        out += [_finding_row(f, rules, result.framework) for f in result.findings]
    out.append("</tbody></table></section>")
    return out


def _finding_row(finding: Finding, rules: Mapping[str, RuleSpec], framework: str | None = None) -> str:
    sev = finding.severity.label
    name = rule_name(rules, finding.code)
    code = f"<b>{_e(finding.code)}</b>" + (f'<br><span class="muted">{_e(name)}</span>' if name else "")
    spec = rules.get(finding.code)
    rule = (f'<p>{_e(spec.summary)}</p><p class="fix"><b>Fix:</b> {_e(fix_text(spec, [framework]))}</p>' if spec is not None
            else '<p class="muted">not in the rule table</p>')
    layer = f"<code>{_e(finding.layer)}</code>" if finding.layer is not None else '<span class="muted">(model)</span>'
    return (f'<tr class="finding sev-{sev}"><td><span class="badge {sev}">{sev}</span></td><td class="code">{code}</td>'
            f'<td class="layer">{layer}</td><td>{_e(finding.message)}</td><td class="rule">{rule}</td></tr>')


def _drift(result: FileResult, draw: bool, figures: list[_Figure]) -> list[str]:
    stats = plots.in_execution_order(result.layer_stats)
    first = plots.first_drift_layer(result.findings)
    drifting = plots.drifting_layers(result.findings)
    onset = (f"Drift begins at <code>{_e(first)}</code> (BN602); later layers inherit it." if first is not None
             else "No drifting layer was found.")
    out = [f'<section class="drift"><h2>Drift: <code>{_e(result.path)}</code></h2><p>{onset}</p>']
    if draw:
        overview = functools.partial(plots.overview_png, stats, first_drift=first, drifting=drifting)
        out.append(_figure(figures, draw, overview, "mean |SMD| and mean KL per layer",
                           "Mean |SMD| and mean KL per layer in execution order; dark bars drift (BN601); "
                           "dashes mark the sample's noise floor.", "wide"))
    out.append(_layer_table(stats, first, drifting))
    shown = _most_drifted([s for s in stats if s.get("layer") in drifting], lambda s: s.get("mean_kl"))
    out.append("<h3>Per layer</h3><p class=\"muted\">SMD: the data's channel mean minus the stored running mean, in stored "
               "standard deviations. LVR: ln(data variance / stored variance). Whiskers: one standard error. "
               f"{_figures_note(len(shown), len(drifting))}</p>")
    if draw and shown:
        out.append('<div class="grid">')
        out += [_figure(figures, True, functools.partial(plots.layer_png, s), f"per-channel SMD and LVR of {s.get('layer', '?')}",
                        f"<code>{_e(s.get('layer', '?'))}</code>: mean |SMD| {_cell(s.get('mean_abs_smd'), 'num')}, "
                        f"mean KL {_cell(s.get('mean_kl'), 'num')}") for s in shown]
        out.append("</div>")
    out.append("</section>")
    return out


# Per-layer figures are drawn for at most this many layers, the most drifted first: every figure is a
# PNG rendered and embedded, and a figure per layer of a deep network made reports megabytes large
# and seconds slower. The table lists every layer.
MAX_LAYER_FIGURES = 6


def _most_drifted(items: list[Any], kl: Callable[[Any], Any]) -> list[Any]:
    """The items with the largest mean KL (finite first), at most MAX_LAYER_FIGURES, in their order."""
    def key(item: Any) -> float:
        value = kl(item)
        return float(value) if isinstance(value, (int, float)) and value == value else -1.0

    chosen = set(map(id, sorted(items, key=key, reverse=True)[:MAX_LAYER_FIGURES]))
    return [item for item in items if id(item) in chosen]


def _figures_note(shown: int, drifting: int) -> str:
    if drifting == 0:
        return "No layer drifts, so no per-layer figures; every layer is in the table."
    if shown < drifting:
        return f"Figures for the {shown} most drifted of {drifting} drifting layers; every layer is in the table."
    return "Figures for the drifting layers; every layer is in the table."


def _layer_table(stats: Iterable[Mapping[str, Any]], first: str | None, drifting: frozenset[str]) -> str:
    head = "".join(f'<th class="n">{_e(title)}</th>' for _, title, _ in _LAYER_COLUMNS)
    rows = []
    for s in stats:
        name = s.get("layer", "?")
        tags = ('<span class="badge onset">drift begins</span>' if name == first else "") + (
            '<span class="badge warning">drift</span>' if name in drifting else "")
        cells = "".join(f'<td class="n">{_cell(s.get(k), kind)}</td>' for k, _, kind in _LAYER_COLUMNS)
        klass = ' class="onset"' if name == first else ""
        rows.append(f'<tr{klass}><td class="n">{_cell(s.get("order"), "int")}</td><td class="layer"><code>{_e(name)}</code> {tags}</td>{cells}</tr>')
    return (f'<table class="layers"><thead><tr><th class="n">#</th><th>layer</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _comparison(comparison: FixComparison, draw: bool, figures: list[_Figure]) -> list[str]:
    def first(name: str | None) -> str:
        return f"<code>{_e(name)}</code>" if name is not None else "none"

    written = f" (written to <code>{_e(comparison.output)}</code>)" if comparison.output else ""
    out = [f'<section id="fix"><h2>Fix: before / after, <code>{_e(comparison.path)}</code>{written}</h2>',
           "<p>The same data against the old stored statistics (before) and the new ones (after). "
           f"First drifting layer: before {first(comparison.first_drift_before)}, after {first(comparison.first_drift_after)}.</p>"]
    pairs = [(c.before, c.after) for c in comparison.layers]
    names = [c.layer for c in comparison.layers]
    if draw:
        overview = functools.partial(plots.comparison_overview_png, pairs, names, first_before=comparison.first_drift_before,
                                     first_after=comparison.first_drift_after)
        out.append(_figure(figures, True, overview, "mean |SMD| and mean KL per layer, before and after", "Grey: before; blue: after.", "wide"))
    rows = []
    for c in comparison.layers:
        marks = " ".join(f'<span class="badge onset">{label}</span>' for label, name in
                         (("drift began", comparison.first_drift_before), ("drift begins", comparison.first_drift_after)) if name == c.layer)
        values = "".join(f'<td class="n">{_cell(side.get(key), "num")}</td>'
                         for key in ("mean_abs_smd", "mean_kl") for side in (c.before, c.after))
        rows.append(f'<tr><td class="layer"><code>{_e(c.layer)}</code> {marks}</td>{values}</tr>')
    out.append('<table class="layers" id="fix-table"><thead><tr><th>layer</th><th class="n">mean |SMD| before</th>'
               '<th class="n">mean |SMD| after</th><th class="n">mean KL before</th><th class="n">mean KL after</th></tr></thead>'
               f"<tbody>{''.join(rows)}</tbody></table>")
    shown = _most_drifted(list(comparison.layers), lambda c: c.before.get("mean_kl"))
    if draw and shown:
        out.append(f'<p class="muted">Per-layer figures for the {len(shown)} layer(s) that drifted most before the fix; '
                   "every layer is in the table.</p>")
        out.append('<div class="grid wide-cells">')
        out += [_figure(figures, True, functools.partial(plots.comparison_layer_png, c.before, c.after), f"SMD and LVR of {c.layer}, before and after",
                        f"<code>{_e(c.layer)}</code>: before (left) and after (right), same scales") for c in shown]
        out.append("</div>")
    out.append("</section>")
    return out


_CSS = """
:root { color-scheme: light; --fg: #1d232a; --muted: #5d6873; --line: #d9dee3; --bg2: #f5f7f9;
  --error: #b42318; --warning: #9a5b00; --info: #175cd3; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1280px; padding: 16px 24px 40px; color: var(--fg); background: #fff;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
h1 { font-size: 24px; margin: 8px 0 0; } h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
code { font: 12.5px/1.3 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; overflow-wrap: anywhere; }
.muted { color: var(--muted); } p { margin: 6px 0; }
.note { background: #fff8e5; border: 1px solid #f0d9a0; padding: 8px 12px; border-radius: 6px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0; }
.card { padding: 8px 14px; border-radius: 8px; background: var(--bg2); border-left: 4px solid var(--muted); font-weight: 600; }
.card.zero { border-color: var(--line); color: var(--muted); font-weight: 500; }
.card.error { border-color: var(--error); } .card.warning { border-color: var(--warning); } .card.info { border-color: var(--info); }
table { border-collapse: collapse; width: 100%; margin: 8px 0; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg2); font-weight: 600; } tbody tr:nth-child(even) { background: #fafbfc; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.layer { min-width: 150px; max-width: 260px; } td.code { white-space: nowrap; } tr.file-row th { background: #e9edf1; } td.rule { width: 34%; } td.rule p { margin: 0 0 4px; } .fix { color: #24452b; }
tr.onset { background: #fdecea !important; }
.badge { display: inline-block; padding: 0 6px; border-radius: 9px; font-size: 11.5px; font-weight: 600; color: #fff; white-space: nowrap; }
.badge.error { background: var(--error); } .badge.warning { background: var(--warning); } .badge.info { background: var(--info); }
.badge.onset { background: #c62828; }
figure { margin: 8px 0; } figure img { max-width: 100%; height: auto; display: block; border: 1px solid var(--line); border-radius: 4px; }
figcaption { font-size: 12.5px; color: var(--muted); margin-top: 3px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px 18px; }
.grid.wide-cells { grid-template-columns: 1fr; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 8px; }
"""

_HEAD = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{TOOL_NAME} report</title>
<style>{_CSS}</style>
</head>
<body>
"""
