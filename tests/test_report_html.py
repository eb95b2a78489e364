"""The HTML report and the drift plots: escaping, completeness, self-containment, determinism,
life without matplotlib, and a real headless browser (Debian's chromium through Playwright).

Reports are built by hand (hostile layer names, an unreadable file, a code missing from the
rule table), except for the browser test, which renders a real dynamic lint of a fixture.
"""

from __future__ import annotations

import html
import io
import math
import re
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from bnlint.errors import UsageError
from bnlint.findings import FileError, FileResult, Finding, Report, Severity
from bnlint.report import plots
from bnlint.report.html import FixComparison, render, write_html
from bnlint.rules import all_rules

ROOT = Path(__file__).resolve().parent.parent
VERSION = "9.9.9"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = '" onmouseover="alert(1)'
ESCAPE = "red\x1b[31mlayer"
BIDI = "evil\u202egnp.exe\u2066x\u2069"
MATH = "odd$name\\frac{"
HOSTILE = (SCRIPT, ATTRIBUTE, ESCAPE, BIDI, MATH)
# Tags the report may contain; anything else (script, iframe, link, object...) is a defect.
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "footer", "section", "h1", "h2", "h3", "p", "div",
                "span", "b", "code", "ul", "li", "table", "thead", "tbody", "tr", "th", "td", "figure", "figcaption", "img", "br"}


def _record(name: str, order: int, channels: int, shift: float) -> dict[str, Any]:
    """A layer_stats entry with the keys of bnlint.dynamic.metrics.layer_record."""
    smd: list[float | None] = [shift * math.sin(i + order) for i in range(channels)]
    lvr: list[float | None] = [0.5 * shift * math.cos(i) for i in range(channels)]
    smd[1] = None  # a non-finite channel
    return {
        "layer": name, "order": order, "channels": channels, "samples": 64, "mean_abs_smd": abs(shift) / 2,
        "max_abs_smd": abs(shift), "mean_kl": shift * shift / 4, "max_kl": shift * shift, "noise_kl": 0.002,
        "fraction_over_threshold": 0.5, "significance": 12.5,
        "channel": {"mean": [0.0] * channels, "var": [1.0] * channels, "var_unbiased": [1.0] * channels, "smd": smd, "lvr": lvr,
                    "kl": [0.1] * channels, "w2": [0.1] * channels, "se_smd": [0.02] * channels, "se_lvr": [0.03] * channels},
    }


def _hostile_report() -> Report:
    stats = [_record(name, order, 6 + 2 * order, 0.2 + 0.3 * order) for order, name in enumerate(HOSTILE)]
    stats.reverse()  # the reporter must put them back in execution order
    findings = [Finding("BN601", Severity.WARNING, "m.pt", name, f"drift in {name}", {"mean_kl": 0.3}) for name in HOSTILE[1:]]
    findings += [
        Finding("BN602", Severity.INFO, "m.pt", ATTRIBUTE, "drift begins here"),
        Finding("BN103", Severity.ERROR, "m.pt", SCRIPT, f"variance <{ESCAPE}> & {BIDI}"),
        Finding("BN305", Severity.INFO, "m.pt", None, "every layer uses eps 1e-3"),
        Finding("BN999", Severity.WARNING, "m.pt", "bn", "a code that is not in the rule table"),
    ]
    notes = ["dynamic analysis ran on torch 2.0 (cpu) over 64 samples", f"loader note {SCRIPT}"]
    return Report(files=[
        FileResult(path="m.pt", format="torch-state-dict", layer_count=5, findings=findings, layer_stats=stats, notes=notes),
        FileResult(path=f"broken{SCRIPT}.onnx", error=FileError(f"broken{SCRIPT}.onnx", "truncated protobuf")),
    ], notes=["run note"])


@pytest.fixture(scope="module")
def hostile() -> Report:
    return _hostile_report()


@pytest.fixture(scope="module")
def hostile_html(hostile: Report) -> str:
    return render(hostile, all_rules(), tool_version=VERSION)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        self.texts.append(data)


def _parse(document: str) -> _Tags:
    parser = _Tags()
    parser.feed(document)
    parser.close()
    return parser


def test_hostile_layer_names_are_escaped(hostile_html: str) -> None:
    assert hostile_html.isascii()
    for raw in (SCRIPT, ATTRIBUTE, "\x1b", "\u202e", "\u2066"):
        assert raw not in hostile_html
    parsed = _parse(hostile_html)
    assert {tag for tag, _ in parsed.tags} <= ALLOWED_TAGS
    assert not [name for _, attrs in parsed.tags for name, _ in attrs if name.startswith("on")]
    text = "".join(parsed.texts)  # what a reader sees: the names, with hidden characters spelled out
    assert SCRIPT in text and ATTRIBUTE in text and MATH in text
    assert "red\\x1b[31mlayer" in text and "evil\\u202egnp.exe\\u2066x\\u2069" in text


def test_every_finding_is_a_row_with_its_rule_text(hostile: Report, hostile_html: str) -> None:
    rules = all_rules()
    assert hostile_html.count('<tr class="finding ') == len(hostile.findings)
    table = hostile_html[hostile_html.index('<table id="findings"'):]
    table = table[: table.index("</table>")]
    for code in {f.code for f in hostile.findings if f.code in rules}:
        assert html.escape(plots.visible(rules[code].fix)) in table
        assert f"<b>{code}</b>" in table
    assert "not in the rule table" in table  # BN999


def test_summary_counts_formats_engine_and_notes(hostile_html: str) -> None:
    summary = hostile_html[hostile_html.index('<section id="summary">'):hostile_html.index("</section>")]
    for expected in ("2 files (1 unreadable)", "1 error", "5 warnings", "2 infos", "torch-state-dict",
                     "64 samples on torch 2.0 (cpu)", "truncated protobuf", "run note", "loader note &lt;script&gt;"):
        assert expected in summary


def test_self_contained(hostile_html: str) -> None:
    assert "http://" not in hostile_html and "https://" not in hostile_html
    assert "<script" not in hostile_html.lower() and "@import" not in hostile_html and "url(" not in hostile_html
    references = [(name, value or "") for tag, attrs in _parse(hostile_html).tags for name, value in attrs
                  if name in ("src", "href", "srcset", "action", "poster", "data", "formaction", "xlink:href")]
    assert references and all(name == "src" and value.startswith("data:image/png;base64,") for name, value in references)


def test_layers_in_execution_order_and_first_drift_marked(hostile_html: str) -> None:
    drift = hostile_html[hostile_html.index('<section class="drift">'):]
    table = drift[drift.index('<table class="layers">'):drift.index("</table>")]
    positions = [table.index(html.escape(plots.visible(n))) for n in HOSTILE]
    assert positions == sorted(positions)
    assert table.count("drift begins") == 1 and '<tr class="onset">' in table


def test_without_matplotlib(monkeypatch: pytest.MonkeyPatch, hostile: Report, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    document = render(hostile, all_rules(), tool_version=VERSION)
    assert "<img" not in document and 'id="no-plots"' in document and "pip install &#x27;bnlint[plot]&#x27;" in document
    assert document.count('<tr class="finding ') == len(hostile.findings)
    assert not plots.available()
    with pytest.raises(plots.PlotUnavailable):
        plots.require()
    with pytest.raises(plots.PlotUnavailable) as info:
        plots.write_drift_png(hostile, tmp_path / "drift.png")
    assert isinstance(info.value, UsageError) and "\n" not in str(info.value) and "bnlint[plot]" in str(info.value)
    assert not (tmp_path / "drift.png").exists()


def test_importing_the_reporters_does_not_import_matplotlib() -> None:
    code = "import sys, bnlint.report.html, bnlint.report.plots; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_unwritable_path_is_one_line_error(hostile: Report, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot write"):
        write_html(hostile, all_rules(), tmp_path / "missing" / "r.html", tool_version=VERSION, plot=False)


def test_static_report_has_no_plot_sections() -> None:
    report = Report(files=[FileResult(path="a.pt", format="torch-state-dict", layer_count=2,
                                      findings=[Finding("BN104", Severity.ERROR, "a.pt", "bn1", "never updated")])])
    document = render(report, all_rules(), tool_version=VERSION)
    assert "<img" not in document and "no-plots" not in document and "Drift:" not in document
    assert "static checks only" in document
    assert "No findings." in render(Report(files=[FileResult(path="a.pt")]), all_rules(), tool_version=VERSION)


def test_write_html_to_stream_and_path_agree(hostile: Report, tmp_path: Path) -> None:
    stream = io.StringIO()
    write_html(hostile, all_rules(), stream, tool_version=VERSION, plot=False)
    write_html(hostile, all_rules(), tmp_path / "r.html", tool_version=VERSION, plot=False)
    assert stream.getvalue() == (tmp_path / "r.html").read_text(encoding="utf-8")


def test_fix_comparison_pairs_layers_in_order() -> None:
    before = [_record("b", 1, 4, 1.0), _record("a", 0, 4, 0.8)]
    after = [_record("a", 0, 4, 0.05), _record("c", 2, 4, 0.0)]
    comparison = FixComparison.from_layer_stats("m.pt", before, after, first_drift_before="a", output="fixed.pt")
    assert [c.layer for c in comparison.layers] == ["a", "b", "c"]
    assert comparison.layers[1].after == {} and comparison.layers[2].before == {}
    document = render(Report(files=[FileResult(path="m.pt")]), all_rules(), comparison=comparison, tool_version=VERSION, plot=False)
    table = document[document.index('<table class="layers" id="fix-table">'):]
    table = table[: table.index("</table>")]
    assert table.split("<tbody>")[1].count("<tr>") == 3 and "drift began" in table and "0.4" in table and "0.025" in table
    assert "after none" in document and "fixed.pt" in document


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_png_is_valid_and_sized(hostile: Report, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    image = pytest.importorskip("PIL.Image")  # Pillow comes with matplotlib
    path = tmp_path / "drift.png"
    plots.write_drift_png(hostile, path)
    data = path.read_bytes()
    assert _png_size(data) == (1000, 500)
    assert b"Software" not in data and b"tIME" not in data  # nothing that changes between runs
    with image.open(path) as png:
        png.load()
        assert png.size == (1000, 500)
    two = Report(files=[*hostile.files, FileResult(path="b.pt", layer_stats=[_record("x", 0, 3, 0.1)])])
    plots.write_drift_png(two, path)
    assert _png_size(path.read_bytes()) == (1000, 1000)
    with pytest.raises(UsageError, match="--data"):
        plots.write_drift_png(Report(files=[FileResult(path="a.pt")]), path)


def test_deterministic(hostile: Report, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    comparison = FixComparison.from_layer_stats("m.pt", hostile.files[0].layer_stats, [_record(n, i, 6 + 2 * i, 0.01) for i, n in enumerate(HOSTILE)])
    first = render(hostile, all_rules(), comparison=comparison, tool_version=VERSION)
    second = render(hostile, all_rules(), comparison=comparison, tool_version=VERSION)
    # overview + one figure per drifting layer, overview + one before/after figure per layer (at most
    # MAX_LAYER_FIGURES each: a deep network's report stays small and quick)
    from bnlint.report.html import MAX_LAYER_FIGURES

    drifting = len(plots.drifting_layers(hostile.files[0].findings))
    assert first == second and first.count("<img ") == 1 + min(drifting, MAX_LAYER_FIGURES) + 1 + min(len(HOSTILE), MAX_LAYER_FIGURES)
    plots.write_drift_png(hostile, tmp_path / "a.png")
    plots.write_drift_png(hostile, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_wide_layer_and_helpers() -> None:
    pytest.importorskip("matplotlib")
    assert _png_size(plots.layer_png(_record("wide", 0, 1024, 0.5))) == (640, 360)
    assert _png_size(plots.comparison_layer_png(_record("w", 0, 8, 0.5), {})) == (1000, 440)
    assert plots.short_label("a" * 50, 9) == "aaaa\u2026aaaa"
    assert plots.visible("a\x00b\u200fc") == "a\\x00b\\u200fc"
    assert math.isnan(plots.number(None)) and math.isnan(plots.number(True)) and plots.number(2) == 2.0


# -- a real browser -------------------------------------------------------------------------------------------

def _browser_or_skip() -> Any:
    pytest.importorskip("matplotlib", reason="the browser test checks the plots: pip install matplotlib")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no `playwright install`: Debian's chromium is used)",
                                   exc_type=ImportError)
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install -y chromium")
    return sync_api


@pytest.fixture(scope="module")
def browser() -> Any:
    sync_api = _browser_or_skip()
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def _open(browser: Any, path: Path) -> tuple[Any, list[str], list[str]]:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(path.as_uri(), wait_until="load")
    return page, problems, dialogs


def _check_page(page: Any, findings: int, images: int) -> None:
    table = page.locator("#findings")
    assert table.is_visible()
    assert page.locator("#findings tbody tr.finding").count() == findings
    sizes = page.evaluate("[...document.images].map(img => [img.complete, img.naturalWidth, img.naturalHeight])")
    assert len(sizes) == images and all(done and w > 0 and h > 0 for done, w, h in sizes)
    # The layout fits a 1280 px window: nothing forces a horizontal scrollbar.
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280


def test_browser_renders_real_report(browser: Any, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import bnlint
    from bnlint.report.plots import first_drift_layer

    model, arch = str(ROOT / "fixtures/convnet_state_dict.pt"), str(ROOT / "fixtures/models.py") + ":convnet"
    before = bnlint.lint(model, data=str(ROOT / "fixtures/data/convnet_shifted.npz"), arch=arch)
    after = bnlint.lint(model, data=str(ROOT / "fixtures/data/convnet_indomain.npz"), arch=arch)
    stats = before.files[0].layer_stats
    assert stats and before.findings
    comparison = FixComparison.from_layer_stats(model, stats, after.files[0].layer_stats,
                                                first_drift_before=first_drift_layer(before.findings),
                                                first_drift_after=first_drift_layer(after.findings))
    path = tmp_path / "report.html"
    write_html(before, all_rules(), path, comparison=comparison, tool_version=VERSION)
    page, problems, dialogs = _open(browser, path)
    try:
        from bnlint.report.html import MAX_LAYER_FIGURES
        from bnlint.report.plots import drifting_layers

        figures = min(len(drifting_layers(before.findings)), MAX_LAYER_FIGURES) + min(len(stats), MAX_LAYER_FIGURES)
        _check_page(page, len(before.findings), images=2 + figures)  # two overviews, then per-layer figures
        assert page.locator("#fix-table tbody tr").count() == len(stats)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    finally:
        page.close()
    assert not problems and not dialogs
    assert _png_size((tmp_path / "report.png").read_bytes())[0] == 1280


def test_browser_hostile_names_stay_text(browser: Any, hostile: Report, tmp_path: Path) -> None:
    path = tmp_path / "hostile.html"
    write_html(hostile, all_rules(), path, tool_version=VERSION)
    page, problems, dialogs = _open(browser, path)
    try:
        page.hover("#findings tbody tr.finding td.layer")  # would fire an injected onmouseover
        from bnlint.report.html import MAX_LAYER_FIGURES

        drifting = len(plots.drifting_layers(hostile.files[0].findings))  # figures for drifting layers only
        _check_page(page, len(hostile.findings), images=1 + min(drifting, MAX_LAYER_FIGURES))
        layers = page.locator("#findings td.layer code").all_inner_texts()
        assert SCRIPT in layers and ATTRIBUTE in layers and "evil\\u202egnp.exe\\u2066x\\u2069" in layers
        assert page.evaluate("document.querySelectorAll('script, [onmouseover]').length") == 0
        page.screenshot(path=str(tmp_path / "hostile.png"), full_page=True)
    finally:
        page.close()
    assert not problems and not dialogs
    assert re.match(rb"\x89PNG", (tmp_path / "hostile.png").read_bytes())


def test_a_deep_network_gets_a_bounded_number_of_figures() -> None:
    """Figures are drawn for the most drifted layers only; the table keeps every layer (a report of
    a 50-layer network was megabytes of PNGs and seconds of rendering)."""
    pytest.importorskip("matplotlib")
    from bnlint.report.html import MAX_LAYER_FIGURES

    names = [f"layer{i}.bn" for i in range(40)]
    before = [_record(n, i, 8, 0.05 * (i % 7 + 1)) for i, n in enumerate(names)]
    after = [_record(n, i, 8, 0.001) for i, n in enumerate(names)]
    comparison = FixComparison.from_layer_stats("deep.pt", before, after)
    document = render(Report(files=[FileResult(path="deep.pt", layer_stats=after)]), all_rules(), comparison=comparison,
                      tool_version=VERSION)
    assert document.count("<img ") <= 2 + MAX_LAYER_FIGURES
    assert all(f"<code>{name}</code>" in document for name in names)  # every layer still in the tables
