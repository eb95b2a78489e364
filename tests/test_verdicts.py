"""Verdicts users can act on (issue 13): a check that could not run is said once with its fix and
the rest is kept; a clean summary says what was checked and what the format cannot show; one
fact, one finding; advice right for the framework; the data warning before what it explains.

Through the CLI on real files where a file shows it, through the reporters on a hand-built
Report for the formats' shapes.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.findings import FileResult, Finding, FixText, Report, Severity, fix_for
from bnlint.report import write_report
from bnlint.report.text import grouped_notes
from bnlint.rules import all_rules

ROOT = Path(__file__).resolve().parents[1]
DATA = "fixtures/data/convnet_shifted.npz"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["check", *args], catch_exceptions=False)
    return result.exit_code, result.stdout


# ------------------------------------------------ a check that could not run

def test_state_dict_with_data_but_no_arch_keeps_static_findings_and_says_dynamic_not_run_once() -> None:
    code, out = run("fixtures/fault_nan_stats.pt", "--data", DATA, "--fail-on", "never")
    lines = out.splitlines()
    not_run = [ln for ln in lines if "dynamic analysis not run" in ln and not ln[0].isdigit()]
    assert len(not_run) == 1, out
    assert not_run[0].startswith("fixtures/fault_nan_stats.pt: dynamic analysis not run: holds weights only")
    assert not_run[0].count("fault_nan_stats.pt") == 1 and "--arch" in not_run[0]  # the path once, the fix given
    assert "error:" not in out and "unreadable" not in out
    assert any(": BN101 [error]" in ln for ln in lines)  # the static findings stand
    assert "(1 with dynamic analysis not run)" in lines[-1] or "(1 with dynamic analysis not run)" in out
    assert code == 2  # a check that did not run is an input problem, whatever --fail-on says


def test_pickled_module_without_trust_in_json_is_not_unreadable() -> None:
    code, out = run("fixtures/convnet_module.pt", "--data", DATA, "--format", "json")
    payload = json.loads(out)
    (file,) = payload["files"]
    assert file["error"] is None and "--trust" in file["dynamic_error"]
    assert payload["summary"]["unreadable"] == 0 and payload["summary"]["dynamic_not_run"] == 1
    from bnlint.report.json_report import load_schema

    jsonschema.validate(payload, load_schema())
    assert code == 2


def _not_run_report() -> Report:
    path = "models/sd.pt"
    return Report(files=[FileResult(path=path, format="torch-state-dict", layer_count=2, framework="torch",
                                    dynamic_error="holds weights only (torch-state-dict); give the network with --arch M:F",
                                    findings=[Finding("BN101", Severity.ERROR, path, "bn1", "running_var has 1 NaN")])])


def _render(fmt: str, report: Report) -> str:
    out = io.StringIO()
    write_report(report, all_rules(), fmt, out, tool_version="9.9.9")
    return out.getvalue()


def test_every_format_reports_the_check_that_did_not_run() -> None:
    report = _not_run_report()
    assert report.unreadable == [] and len(report.errors) == 1 and report.not_run == report.files
    sarif = json.loads(_render("sarif", report))
    jsonschema.Draft4Validator(json.loads((ROOT / "tests/data/sarif-schema-2.1.0.json").read_text())).validate(sarif)
    (invocation,) = sarif["runs"][0]["invocations"]
    assert invocation["executionSuccessful"] is False
    (notice,) = [n for n in invocation["toolExecutionNotifications"] if n["level"] == "error"]
    assert "dynamic analysis not run" in notice["message"]["text"] and "--arch" in notice["message"]["text"]
    assert [r["ruleId"] for r in sarif["runs"][0]["results"]] == ["BN101"]
    github = _render("github", report).splitlines()
    assert github[0].startswith("::error file=models/sd.pt,title=bnlint%3A dynamic analysis not run::holds weights only")
    assert any(line.startswith("::error file=models/sd.pt,title=BN101") for line in github)
    junit = _render("junit", report)
    assert '<testcase classname="models/sd.pt" name="dynamic analysis">' in junit and 'type="DynamicNotRun"' in junit
    assert 'name="BN101 nonfinite-stats"' in junit  # the static rules' testcases are still there
    assert re.search(r'<testsuite name="models/sd.pt" [^>]*errors="1"', junit)
    from bnlint.report.html import render as html

    page = html(report, all_rules(), tool_version="9.9.9")
    assert "1 file (1 with dynamic analysis not run)" in page and "dynamic analysis not run: holds weights only" in page
    assert '<tr class="unreadable">' not in page


# ------------------------------------------------ the all-clear summary

def test_clean_state_dict_summary_says_what_was_checked_and_what_it_cannot_show() -> None:
    code, out = run("fixtures/convnet_state_dict.pt")
    assert code == 0
    assert out.splitlines()[-1] == ("0 errors, 0 warnings, 0 infos in 1 file: 3 BatchNorm layers checked; training modes "
                                    "are not recorded in a state dict: --reference or --data can show drift")
    _, quiet = run("fixtures/convnet_state_dict.pt", "-q")
    assert quiet == ""
    _, text = run("fixtures/convnet_state_dict.pt", "--format", "json")
    assert json.loads(text)["files"][0]["not_shown"].startswith("training modes are not recorded in a state dict")
    _, module = run("fixtures/convnet_scripted.pt")  # TorchScript records modes: nothing to add
    assert module.splitlines()[-1] == "0 errors, 0 warnings, 0 infos in 1 file: 3 BatchNorm layers checked"


# ------------------------------------------------ one fact, one finding

def test_caffe_mode_disagreement_is_one_info_finding_with_the_layers() -> None:
    code, out = run("fixtures/caffe/caffe_train_shipped.caffemodel", "fixtures/caffe/caffe_train_shipped.prototxt",
                    "--format", "json")
    findings = [f for f in json.loads(out)["files"][0]["findings"] if f["code"] == "BN409"]
    assert len(findings) == 1, findings
    (bn409,) = findings
    assert bn409["severity"] == "info" and bn409["layer"] is None  # the prototxt governs at run time
    assert bn409["values"]["layers"] == ["bn1", "bn2", "bn3"] and bn409["values"]["governs"] == "prototxt"
    assert "prototxt" in bn409["message"] and "harmless" in bn409["message"]
    assert code == 0  # only infos: BN505 and this one


def test_identical_per_layer_notes_are_one_line() -> None:
    notes = [f"stage{i}/bn: class BatchNormalization inferred from its auto-generated layer name" for i in range(121)]
    notes += ["no metadata.json: Keras version unknown"] * 2 + ["weights-only file"]
    assert grouped_notes(notes) == [
        "class BatchNormalization inferred from its auto-generated layer name "
        "(121 layers: stage0/bn, stage1/bn, stage2/bn, stage3/bn, stage4/bn, ... (+116))",
        "no metadata.json: Keras version unknown (2 times)",
        "weights-only file",
    ]
    report = Report(files=[FileResult(path="m.h5", format="keras-weights", layer_count=121, notes=notes)])
    text = _render("text", report)
    assert text.count(": note: ") == 3


def test_fixes_block_is_one_compact_line_per_code_in_code_order() -> None:
    rules = all_rules()
    codes = ["BN505", "BN104", "BN409", "BN101", "BN201", "BN108", "BN304", "BN506", "BN105", "BN303"]
    findings = [Finding(code, rules[code].severity, "m.pt", f"bn{i}", "x") for i, code in enumerate(codes)]
    text = _render("text", Report(files=[FileResult(path="m.pt", format="torch-state-dict", layer_count=10,
                                                    framework="torch", findings=findings)]))
    block = text.split("\nfixes:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in block] == sorted(codes)
    for line in block:  # first sentence only when there are many codes; `bnlint rule CODE` has the rest
        fix = line.split(": ", 1)[1].rsplit(" (bnlint rule", 1)[0]
        assert ". " not in fix, line


# ------------------------------------------------ advice right for the framework

def test_reestimation_advice_names_bnlint_fix_first_and_the_framework_way_second() -> None:
    rules = all_rules()
    for code in ("BN101", "BN102", "BN104", "BN105", "BN203", "BN601", "BN602"):
        fix = rules[code].fix
        assert isinstance(fix, FixText), code
        for framework in ("torch", "keras", "onnx"):
            text = fix_for(fix, framework)
            assert "bnlint fix MODEL --data" in text, (code, framework)
        torch_text, keras_text = fix_for(fix, "torch"), fix_for(fix, "keras")
        assert torch_text.index("bnlint fix") < torch_text.index("torch.optim.swa_utils.update_bn"), code
        assert "update_bn" not in keras_text and "training=True" in keras_text and "momentum" in keras_text, code
        assert "update_bn" not in fix_for(fix, "caffe"), code
    code, out = run("fixtures/keras/keras_never_updated.keras")
    (line,) = [ln for ln in out.splitlines() if ln.startswith("  BN104 ")]
    assert "bnlint fix MODEL --data" in line and "Keras 3" in line and "swa_utils" not in line
    result = CliRunner().invoke(main, ["rule", "BN601"], catch_exceptions=False)
    assert result.stdout.index("bnlint fix MODEL") < result.stdout.index("update_bn")


# ------------------------------------------------ the data warning first

def test_uint8_data_warning_comes_before_the_findings_it_explains_and_survives_quiet(tmp_path: Path) -> None:
    sample = np.load(ROOT / DATA)["input"]
    raw = tmp_path / "raw.npz"
    np.savez(raw, input=np.clip(sample * 40 + 128, 0, 255).astype(np.uint8))
    code, out = run("fixtures/convnet_scripted.pt", "--data", str(raw), "-q")
    lines = out.splitlines()
    assert lines[0].startswith("fixtures/convnet_scripted.pt: check the data: array 'input' holds uint8 integers"), out
    assert any(": BN601 [warning]" in ln for ln in lines[1:]) and code == 1
