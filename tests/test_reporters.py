"""Reporters: exact text/github snapshots, schema validation of JSON and SARIF, JUnit counts.

The Report is built by hand (no loaders, no rules run): four files, one unreadable, NaN and Inf
values, and a layer name carrying every character the formats must escape.
"""

from __future__ import annotations

import io
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bnlint.errors import UsageError
from bnlint.findings import FileError, FileResult, Finding, Report, Severity
from bnlint.report import FORMATS, REPORTERS, write_report
from bnlint.report._common import artifact_uri, first_paragraph, json_safe, printable
from bnlint.report.github import escape_data, escape_property
from bnlint.report.json_report import load_schema
from bnlint.report.text import drift_table
from bnlint.rules.registry import RuleSpec

DATA = Path(__file__).parent / "data"
VERSION = "9.9.9"
# A layer name with a newline, a terminal escape, XML/workflow-command metacharacters and a quote.
ODD = 'stage:1,"bn"<&>%\n\x1b[31mX'


def _doc(what: str) -> str:
    return (
        f"## What it does\n{what}\nSecond line of the paragraph.\n\n## Why is this bad?\nBecause.\n\n"
        "## Example\n...\n\n## Use instead\n...\n\n## References\n- none"
    )


def _spec(code: str, name: str, severity: Severity, scope: Any = "layer") -> RuleSpec:
    return RuleSpec(
        code=code,
        name=name,
        severity=severity,
        summary=f"summary of {name}",
        fix=f"fix {name}",
        scope=scope,
        check=lambda *_: iter(()),
        doc=_doc(f"Checks {name}."),
    )


RULES: dict[str, RuleSpec] = {
    s.code: s
    for s in (
        _spec("BN101", "nonfinite-stats", Severity.ERROR),
        _spec("BN106", "variance-outlier", Severity.WARNING),
        _spec("BN202", "zero-eps", Severity.ERROR),
        _spec("BN305", "eps-nondefault", Severity.INFO, "model"),
        _spec("BN601", "distribution-drift", Severity.WARNING, "dynamic"),
    )
}


def make_report() -> Report:
    resnet = "models/res net.pt"
    target = "data/target.onnx"
    return Report(
        files=[
            FileResult(
                path=resnet,
                format="torch-zip",
                layer_count=3,
                findings=[
                    Finding("BN101", Severity.ERROR, resnet, "layer1.0.bn1", "running_var has 2 NaN",
                            {"nan": 2, "min": math.nan, "max": math.inf, "lo": -math.inf}),
                    Finding("BN106", Severity.WARNING, resnet, ODD, "channel 3 var 1e+09 vs median 1",
                            {"ratio": 1e9, "channels": (3,)}),
                    Finding("BN305", Severity.INFO, resnet, None, "eps 0.001 differs from torch's 1e-05",
                            {"eps": 1e-3}),
                ],
                notes=["stubbed omegaconf.DictConfig"],
            ),
            FileResult(path="models/broken.onnx", error=FileError("models/broken.onnx", "truncated protobuf")),
            FileResult(
                path=target,
                format="onnx",
                layer_count=3,
                findings=[
                    Finding("BN601", Severity.WARNING, target, "bn2", "mean |SMD| 0.8 over 64 channels",
                            {"mean_abs_smd": 0.8}),
                    Finding("BN601", Severity.WARNING, target, "bn3", "mean |SMD| 1.2 over 64 channels",
                            {"mean_abs_smd": 1.2}),
                ],
                layer_stats=[
                    {"layer": "bn1", "channels": 32, "mean_abs_smd": 0.01, "max_abs_smd": 0.05,
                     "max_kl": 0.001, "fraction_over_threshold": 0.0},
                    {"layer": "bn2", "channels": 64, "mean_abs_smd": 0.8, "max_abs_smd": 2.5,
                     "max_kl": 3.25, "fraction_over_threshold": 0.5},
                    {"layer": "bn3", "channels": 64, "mean_abs_smd": math.nan, "max_abs_smd": math.nan,
                     "max_kl": math.inf, "fraction_over_threshold": 1.0},
                ],
            ),
            FileResult(path="clean.safetensors", format="safetensors", layer_count=5),
        ]
    )


def render(fmt: str, report: Report | None = None, **kwargs: Any) -> str:
    out = io.StringIO()
    write_report(make_report() if report is None else report, RULES, fmt, out, tool_version=VERSION, **kwargs)
    return out.getvalue()


# ---------------------------------------------------------------- text

TEXT = """\
models/res net.pt:layer1.0.bn1: BN101 [error] running_var has 2 NaN
models/res net.pt:stage:1,"bn"<&>%\\n\\x1b[31mX: BN106 [warning] channel 3 var 1e+09 vs median 1
models/res net.pt: BN305 [info] eps 0.001 differs from torch's 1e-05
models/res net.pt: note: stubbed omegaconf.DictConfig
models/broken.onnx: error: truncated protobuf
data/target.onnx:bn2: BN601 [warning] mean |SMD| 0.8 over 64 channels
data/target.onnx:bn3: BN601 [warning] mean |SMD| 1.2 over 64 channels

data/target.onnx: drift by layer, top 3 of 3 by max|SMD|
  layer  channels  mean|SMD|  max|SMD|  max KL  over thr
  bn3          64        nan       nan     inf    100.0%
  bn2          64        0.8       2.5    3.25     50.0%
  bn1          32       0.01      0.05   0.001      0.0%

fixes:
  BN101 nonfinite-stats: fix nonfinite-stats (bnlint rule BN101)
  BN106 variance-outlier: fix variance-outlier (bnlint rule BN106)
  BN305 eps-nondefault: fix eps-nondefault (bnlint rule BN305)
  BN601 distribution-drift: fix distribution-drift (bnlint rule BN601)

1 error, 3 warnings, 1 info in 4 files (1 unreadable)
5 BatchNorm layers checked in 1 file without warnings
  training modes, momentum and eps are not recorded in safetensors: --reference or --data can show drift (clean.safetensors)
"""


def test_text_exact() -> None:
    assert render("text") == TEXT


def test_text_quiet_keeps_only_problem_lines() -> None:
    expected = [ln for ln in TEXT.splitlines()[:7] if ": note: " not in ln]
    assert render("text", quiet=True).splitlines() == expected


def test_text_color_wraps_severity_and_escapes_file_controls() -> None:
    out = render("text", color=True)
    first = out.splitlines()[0]
    assert first == "\x1b[1mmodels/res net.pt\x1b[0m:layer1.0.bn1: \x1b[1;31mBN101 [error]\x1b[0m running_var has 2 NaN"
    assert "\x1b[33mBN106 [warning]\x1b[0m" in out
    assert "\\x1b[31mX" in out  # the layer's own escape sequence is shown, never sent


def test_text_show_fixes_group_and_statistics() -> None:
    fixed = render("text", show_fixes=True).splitlines()
    assert fixed[1] == "    fix: fix nonfinite-stats (bnlint rule BN101)" and "fixes:" not in fixed
    grouped = render("text", group=True)
    assert "data/target.onnx: BN601 [warning] 2 layers (bn2, bn3); first: mean |SMD| 0.8 over 64 channels" in grouped
    assert "data/target.onnx:bn2:" not in grouped
    stats = render("text", statistics=True).splitlines()
    assert stats[:4] == ["2  BN601  [warning]  distribution-drift", "1  BN101  [error]    nonfinite-stats",
                         "1  BN106  [warning]  variance-outlier", "1  BN305  [info]     eps-nondefault"]
    assert "BN101 [error] running_var" not in "\n".join(stats) and "drift by layer" not in "\n".join(stats)


def test_information_on_many_layers_shares_a_line_by_default() -> None:
    """A healthy ONNX export printed one BN505 info line for each of its 94 layers. Information
    repeated on 4 or more layers of a file is one line unless --no-group; warnings stay per layer."""
    info = [Finding("BN505", Severity.INFO, "m.onnx", f"bn{i}", f"follows Conv 'conv{i}'") for i in range(6)]
    warnings = [Finding("BN601", Severity.WARNING, "m.onnx", f"bn{i}", "drift") for i in range(5)]
    few = [Finding("BN108", Severity.INFO, "m.onnx", f"bn{i}", "dead") for i in range(3)]
    report = Report(files=[FileResult(path="m.onnx", format="onnx", layer_count=6, findings=[*warnings, *info, *few])])
    lines = render("text", report, quiet=True).splitlines()
    assert [ln for ln in lines if "BN505" in ln] == [
        "m.onnx: BN505 [info] 6 layers (bn0, bn1, bn2, bn3, bn4, ... (+1)); first: follows Conv 'conv0'"]
    assert sum("BN601 [warning] drift" in ln for ln in lines) == 5 and sum("BN108" in ln for ln in lines) == 3
    ungrouped = render("text", report, quiet=True, group=False).splitlines()
    assert sum("BN505" in ln for ln in ungrouped) == 6
    assert sum("BN601" in ln for ln in render("text", report, quiet=True, group=True).splitlines()) == 1


def test_integer_layer_names_do_not_look_like_line_numbers() -> None:
    report = Report(files=[FileResult(path="m.pt", findings=[Finding("BN101", Severity.ERROR, "m.pt", "1", "NaN")])])
    assert render("text", report, quiet=True) == "m.pt:[1]: BN101 [error] NaN\n"


def test_text_empty_report() -> None:
    assert render("text", Report()) == "0 errors, 0 warnings, 0 infos in 0 files\n"
    assert render("text", Report(), quiet=True) == ""


def test_drift_table_limit_and_missing_keys() -> None:
    stats: list[dict[str, Any]] = [{"layer": f"bn{i}", "max_abs_smd": float(i)} for i in range(15)]
    stats.append({"layer": "odd"})  # no numbers at all: ranked last, cells shown as "-"
    table = drift_table(FileResult(path="m.onnx", layer_stats=stats), limit=12)
    assert table[0] == "m.onnx: drift by layer, top 12 of 16 by max|SMD|"
    assert [row.split()[0] for row in table[2:5]] == ["bn14", "bn13", "bn12"]
    assert drift_table(FileResult(path="m.onnx", layer_stats=[{"layer": "odd"}]))[2].split() == ["odd"] + ["-"] * 5


# ---------------------------------------------------------------- json

def _strict_loads(text: str) -> Any:
    def reject(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def test_json_validates_against_shipped_schema() -> None:
    schema = json.loads((Path(__file__).parents[1] / "bnlint/schemas/bnlint-report.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert load_schema() == schema  # the copy the package ships is the one in the tree
    doc = _strict_loads(render("json"))
    jsonschema.Draft202012Validator(schema).validate(doc)
    assert list(doc) == ["version", "tool", "files", "summary"]
    assert doc["tool"] == {"name": "bnlint", "version": VERSION}
    assert doc["summary"] == {"error": 1, "warning": 3, "info": 1, "files": 4, "unreadable": 1, "dynamic_not_run": 0}


def test_json_content() -> None:
    files = _strict_loads(render("json"))["files"]
    assert [f["path"] for f in files] == [r.path for r in make_report().files]
    first = files[0]["findings"][0]
    assert first.pop("fix") == "fix nonfinite-stats"  # the rule table's fix, as the text output shows it
    assert first == {
        "code": "BN101", "name": "nonfinite-stats", "severity": "error", "layer": "layer1.0.bn1",
        "message": "running_var has 2 NaN", "values": {"lo": "-inf", "max": "inf", "min": "nan", "nan": 2},
    }
    assert list(first["values"]) == sorted(first["values"])
    assert files[0]["findings"][1]["layer"] == ODD and files[0]["findings"][1]["values"]["channels"] == [3]
    assert files[0]["findings"][2]["layer"] is None
    assert files[1]["error"] == "truncated protobuf" and files[1]["findings"] == [] and files[1]["format"] is None
    assert files[2]["layer_stats"][2]["max_kl"] == "inf"
    assert files[0]["notes"] == ["stubbed omegaconf.DictConfig"]


def test_json_schema_rejects_bare_nan_and_bad_severity() -> None:
    validator = jsonschema.Draft202012Validator(load_schema())
    doc = _strict_loads(render("json"))
    doc["files"][2]["layer_stats"][0]["max_kl"] = "NaN"
    assert not validator.is_valid(doc)
    doc = _strict_loads(render("json"))
    doc["files"][0]["findings"][0]["severity"] = "fatal"
    assert not validator.is_valid(doc)


def test_json_safe_unwraps_numpy_and_enums() -> None:
    np = pytest.importorskip("numpy")
    got = json_safe({"b": np.float32("nan"), "a": np.arange(3), "s": Severity.WARNING, "t": {2, 1}, "o": object})
    assert list(got) == ["a", "b", "o", "s", "t"]
    assert got["a"] == [0, 1, 2] and got["b"] == "nan" and got["s"] == "warning" and got["t"] == [1, 2]
    assert isinstance(got["o"], str)


# ---------------------------------------------------------------- sarif

def test_sarif_validates_against_official_schema() -> None:
    schema = json.loads((DATA / "sarif-schema-2.1.0.json").read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft-04/")
    log = _strict_loads(render("sarif"))
    jsonschema.Draft4Validator(schema).validate(log)
    assert log["version"] == "2.1.0" and len(log["runs"]) == 1


def test_sarif_content() -> None:
    run = _strict_loads(render("sarif"))["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "bnlint" and driver["version"] == VERSION and driver["informationUri"]
    assert [r["id"] for r in driver["rules"]] == list(RULES)
    bn305 = driver["rules"][3]
    assert bn305["fullDescription"]["text"] == "Checks eps-nondefault. Second line of the paragraph."
    assert bn305["shortDescription"]["text"] == "summary of eps-nondefault"
    assert bn305["help"]["markdown"] == RULES["BN305"].doc
    assert bn305["defaultConfiguration"]["level"] == "note"
    results = run["results"]
    assert [(r["ruleId"], r["level"]) for r in results] == [
        ("BN101", "error"), ("BN106", "warning"), ("BN305", "note"), ("BN601", "warning"), ("BN601", "warning")
    ]
    for r in results:
        assert driver["rules"][r["ruleIndex"]]["id"] == r["ruleId"]
    loc = results[1]["locations"][0]
    assert loc["physicalLocation"] == {"artifactLocation": {"uri": "models/res%20net.pt"}}
    assert loc["logicalLocations"] == [{"name": ODD, "kind": "member"}]
    assert "logicalLocations" not in results[2]["locations"][0]
    assert results[0]["properties"]["values"]["min"] == "nan"
    assert "region" not in json.dumps(run)  # no invented line numbers
    assert len({r["partialFingerprints"]["bnlintFinding/v1"] for r in results}) == len(results)
    (invocation,) = run["invocations"]
    assert invocation["executionSuccessful"] is False
    levels = [(n["level"], n["locations"][0]["physicalLocation"]["artifactLocation"]["uri"])
              for n in invocation["toolExecutionNotifications"]]
    assert levels == [("note", "models/res%20net.pt"), ("error", "models/broken.onnx")]


def test_sarif_clean_run_is_successful() -> None:
    run = _strict_loads(render("sarif", Report(files=[FileResult(path="a.pt")])))["runs"][0]
    assert run["invocations"] == [{"executionSuccessful": True}] and run["results"] == []


def test_artifact_uri_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert artifact_uri("./m/a b#1.onnx") == "m/a%20b%231.onnx"
    assert artifact_uri("m\\sub\\a.pt") == "m/sub/a.pt"
    assert artifact_uri(str(tmp_path / "x" / "a.pt")) == "x/a.pt"
    assert artifact_uri("/elsewhere/a.pt").startswith("file:///elsewhere/a.pt") or tmp_path.anchor != "/"


# ---------------------------------------------------------------- github

GITHUB = """\
::error file=models/res net.pt,title=BN101 nonfinite-stats::layer1.0.bn1: running_var has 2 NaN
::warning file=models/res net.pt,title=BN106 variance-outlier::stage:1,"bn"<&>%25%0A\\x1b[31mX: channel 3 var 1e+09 vs median 1
::notice file=models/res net.pt,title=BN305 eps-nondefault::eps 0.001 differs from torch's 1e-05
::error file=models/broken.onnx,title=bnlint%3A unreadable file::truncated protobuf
::warning file=data/target.onnx,title=BN601 distribution-drift::bn2: mean |SMD| 0.8 over 64 channels
::warning file=data/target.onnx,title=BN601 distribution-drift::bn3: mean |SMD| 1.2 over 64 channels
"""


def test_github_exact() -> None:
    assert render("github") == GITHUB


def test_github_escapes_terminal_and_bidi_controls() -> None:
    assert escape_data("a\x1b[31m\u202eb%\n") == "a\\x1b[31m\\u202eb%25%0A"
    assert escape_property("x:\u2066y") == "x%3A\\u2066y"


def test_github_escaping() -> None:
    assert escape_data("a%b\r\nc:d,e") == "a%25b%0D%0Ac:d,e"
    assert escape_property("a%b\r\nc:d,e") == "a%25b%0D%0Ac%3Ad%2Ce"
    out = render("github", Report(files=[FileResult(path="we,ird:p%.pt", error=FileError("x", "bad\nfile"))]))
    assert out == "::error file=we%2Cird%3Ap%25.pt,title=bnlint%3A unreadable file::bad%0Afile\n"


# ---------------------------------------------------------------- junit

def test_junit_structure_and_counts() -> None:
    root = ET.fromstring(render("junit"))  # parses: escaping and control characters handled
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [f.path for f in make_report().files]
    counts = [(s.get("tests"), s.get("failures"), s.get("errors")) for s in suites]
    assert counts == [("5", "2", "0"), ("1", "0", "1"), ("5", "1", "0"), ("5", "0", "0")]
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("16", "3", "1")
    for suite in suites:  # declared counts agree with the elements
        assert int(suite.get("tests", "")) == len(suite.findall("testcase"))
        assert int(suite.get("failures", "")) == len(suite.findall("testcase/failure"))
        assert int(suite.get("errors", "")) == len(suite.findall("testcase/error"))
    cases = {c.get("name"): c for c in suites[0].findall("testcase")}
    assert list(cases) == ["BN101 nonfinite-stats", "BN106 variance-outlier", "BN202 zero-eps",
                           "BN305 eps-nondefault", "BN601 distribution-drift"]
    failure = cases["BN106 variance-outlier"].find("failure")
    assert failure is not None and failure.get("type") == "warning"
    assert failure.text == 'stage:1,"bn"<&>%\n\\x1b[31mX: [warning] channel 3 var 1e+09 vs median 1'
    info = cases["BN305 eps-nondefault"]
    assert info.find("failure") is None and info.findtext("system-out") == "[info] eps 0.001 differs from torch's 1e-05"
    drift = next(c for c in suites[2].findall("testcase") if c.get("name", "").startswith("BN601"))
    assert drift.find("failure").get("message") == "2 findings of BN601"  # type: ignore[union-attr]
    error = suites[1].find("testcase/error")
    assert error is not None and error.get("message") == "truncated protobuf"
    props = {p.get("name"): p.get("value") for p in suites[2].iter("property")}
    assert props == {"bnlint.version": VERSION, "format": "onnx", "layers": "3"}
    assert suites[0].findtext("system-out") == "stubbed omegaconf.DictConfig"


# ---------------------------------------------------------------- dispatch and helpers

def test_every_format_writes_and_unknown_format_is_a_usage_error() -> None:
    assert FORMATS == ("text", "json", "sarif", "github", "junit") and set(REPORTERS) == set(FORMATS)
    for fmt in FORMATS:
        assert render(fmt).endswith("\n")
    with pytest.raises(UsageError, match="unknown output format 'xml'"):
        render("xml")


def test_reporters_do_not_mutate_the_report() -> None:
    report = make_report()
    before = repr(report)
    for fmt in FORMATS:
        render(fmt, report)
    assert repr(report) == before


def test_first_paragraph_and_printable() -> None:
    assert first_paragraph("## What it does\nA\nB\n\n## Why\nC") == "A B"
    assert first_paragraph("") == ""
    assert printable("a\nb\x1b\x00") == "a\\nb\\x1b\\x00"


def test_sarif_describes_every_registered_rule() -> None:
    from bnlint.rules import all_rules

    rules = all_rules()
    out = io.StringIO()
    write_report(make_report(), rules, "sarif", out, tool_version=VERSION)
    log = _strict_loads(out.getvalue())
    jsonschema.Draft4Validator(json.loads((DATA / "sarif-schema-2.1.0.json").read_text())).validate(log)
    described = log["runs"][0]["tool"]["driver"]["rules"]
    assert [d["id"] for d in described] == list(rules)
    assert all(d["fullDescription"]["text"] and not d["fullDescription"]["text"].startswith("#") for d in described)


# ---------------------------------------------------------------- SARIF regions (real files)

def test_sarif_regions_point_at_the_tensor_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finding about a layer points at its running_var's bytes; model-level findings at the whole file."""
    import numpy as np

    from bnlint.api import lint_paths
    from bnlint.report.sarif import to_dict
    from bnlint.rules import all_rules

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    report = lint_paths(["fixtures/fault_nan_stats.pt", "fixtures/caffe/caffe_never_updated.caffemodel", "fixtures/convnet_folded.onnx"])
    document = to_dict(report, all_rules(), VERSION)
    results = document["runs"][0]["results"]
    nan = next(r for r in results if r["ruleId"] == "BN101" and r["locations"][0]["logicalLocations"][0]["name"] == "bn2")
    region = nan["locations"][0]["physicalLocation"]["region"]
    raw = (root / "fixtures/fault_nan_stats.pt").read_bytes()[region["byteOffset"]:region["byteOffset"] + region["byteLength"]]
    torch = pytest.importorskip("torch")
    expected = torch.load(root / "fixtures/fault_nan_stats.pt", weights_only=True)["bn2.running_var"].numpy()
    assert np.array_equal(np.frombuffer(raw, "<f4"), expected, equal_nan=True)
    folded = next(r for r in results if r["ruleId"] == "BN501")
    size = (root / "fixtures/convnet_folded.onnx").stat().st_size
    assert folded["locations"][0]["physicalLocation"]["region"] == {"byteOffset": 0, "byteLength": size}
    assert all("region" in r["locations"][0]["physicalLocation"] for r in results)


def test_sarif_passes_microsoft_sarif_multitool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """0 errors and 0 warnings from `sarif-multitool validate` (installed by .ci/run with npm)."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parent.parent
    tool = root / ".ci" / "node" / "node_modules" / ".bin" / "sarif-multitool"
    found = str(tool) if tool.exists() else shutil.which("sarif-multitool")
    if found is None:
        pytest.skip("sarif-multitool not installed (npm install --prefix .ci/node @microsoft/sarif-multitool)")
    monkeypatch.chdir(root)
    out = tmp_path / "out.sarif"
    from click.testing import CliRunner

    from bnlint.cli import main

    CliRunner().invoke(main, ["fixtures/fault_nan_stats.pt", "fixtures/caffe/caffe_never_updated.caffemodel",
                              "fixtures/convnet_folded.onnx", "fixtures/bad_truncated.pt", "--format", "sarif", "-o", str(out)])
    run = subprocess.run([found, "validate", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]
    assert ": error " not in run.stdout and ": warning " not in run.stdout, run.stdout[-2000:]


def test_printable_and_no_surrogates_escape_undecodable_file_name_bytes() -> None:
    from bnlint.report._common import artifact_uri, json_text, no_surrogates, printable

    name = b"\xff\xfe.pt".decode("utf-8", "surrogateescape")
    assert printable(name) == "\\xff\\xfe.pt" and no_surrogates(name) == "\\xff\\xfe.pt"
    assert no_surrogates("plain\n") == "plain\n"  # only surrogates: JSON escapes the rest itself
    assert json_text({name: [name, 1]}) == {"\\xff\\xfe.pt": ["\\xff\\xfe.pt", 1]}
    assert artifact_uri(name) == "%FF%FE.pt"  # the real bytes of the name, percent-encoded
