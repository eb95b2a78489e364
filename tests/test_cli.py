"""CLI behaviour through click's CliRunner: flags, formats, exit codes, config, baseline."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlint.cli import main

ROOT = Path(__file__).resolve().parent.parent
HEALTHY = "fixtures/convnet_state_dict.pt"
FAULTY = "fixtures/fault_nan_stats.pt"  # BN101 (error)
INFO_ONLY = "fixtures/fault_dead_channels.pt"  # BN108 (info)


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_healthy_file_exits_0_with_a_summary() -> None:
    result = run(HEALTHY)
    assert result.exit_code == 0, result.output
    assert "0 errors" in result.output


def test_faulty_file_exits_1_and_names_layer_and_code() -> None:
    result = run(FAULTY)
    assert result.exit_code == 1
    assert "BN101" in result.output and "running_var" in result.output


@pytest.mark.parametrize(
    "args, code",
    [
        ((INFO_ONLY,), 0),
        ((INFO_ONLY, "--fail-on", "info"), 1),
        ((FAULTY, "--fail-on", "never"), 0),
        ((FAULTY, "--ignore", "BN1"), 0),
        ((FAULTY, "--select", "BN2,BN3"), 0),
        ((FAULTY, "--select", "BN101"), 1),
    ],
)
def test_fail_on_select_and_ignore(args: tuple[str, ...], code: int) -> None:
    assert run(*args).exit_code == code


def test_missing_file_is_one_line_exit_2() -> None:
    result = run("does/not/exist.pt")
    assert result.exit_code == 2
    assert "does/not/exist.pt" in result.output and "no such file" in result.output
    assert "Traceback" not in result.output


def test_no_paths_is_a_clean_no_op() -> None:
    """What a hook or a script passing an empty file list gets: exit 0, nothing on stdout, and a
    note on stderr saying there was nothing to lint (silent unless -q)."""
    result = run("check")
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr == "bnlint: nothing to lint (no paths given)\n"
    quiet = run("check", "-q")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_bare_command_prints_help() -> None:
    result = run()
    assert result.exit_code == 0 and "bnlint model.pt" in result.output


@pytest.mark.parametrize("fmt", ["json", "sarif", "github", "junit", "text"])
def test_every_format_writes_to_output_file(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"report.{fmt}"
    result = run(FAULTY, "--format", fmt, "--output", str(out))
    assert result.exit_code == 1 and result.stdout == ""
    text = out.read_text()
    assert "BN101" in text
    if fmt in ("json", "sarif"):
        json.loads(text)
    if fmt == "junit":
        ET.fromstring(text)
    if fmt == "github":
        assert text.startswith("::error file=fixtures/fault_nan_stats.pt")


def test_color_always_uses_ansi_and_never_does_not() -> None:
    assert "\x1b[" in run(FAULTY, "--color", "always").output
    assert "\x1b[" not in run(FAULTY, "--color", "never").output


def test_rules_table_and_rule_page() -> None:
    table = run("rules")
    assert table.exit_code == 0 and "BN403" in table.output and "frozen-bn-in-train-mode" in table.output
    page = run("rule", "bn403")
    assert page.exit_code == 0 and "## Why is this bad?" in page.output
    assert run("rule", "BN999").exit_code == 2


def test_config_file_is_read_and_flags_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(ROOT / FAULTY, tmp_path / "m.pt")
    (tmp_path / "pyproject.toml").write_text('[tool.bnlint]\nignore = ["BN101"]\n')
    monkeypatch.chdir(tmp_path)
    assert run("m.pt").exit_code == 0
    assert run("m.pt", "--ignore", "BN2").exit_code == 1
    (tmp_path / "pyproject.toml").write_text('[tool.bnlint]\nbogus = 1\n')
    result = run("m.pt")
    assert result.exit_code == 2 and "unknown [tool.bnlint] key" in result.output


def test_per_layer_ignore_by_glob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(ROOT / FAULTY, tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path)
    layers = {f["layer"] for f in json.loads(run("m.pt", "--format", "json").stdout)["files"][0]["findings"]}
    globs = "\n".join(f'"{layer}" = ["BN1"]' for layer in layers)
    (tmp_path / "bnlint.toml").write_text(f"[per-layer-ignores]\n{globs}\n")
    assert run("m.pt").exit_code == 0


def test_baseline_round_trip_reports_only_new_findings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(ROOT / FAULTY, tmp_path / "model.pt")
    monkeypatch.chdir(tmp_path)
    assert run("model.pt", "--baseline", "base.json", "--write-baseline").exit_code == 0
    assert run("model.pt", "--baseline", "base.json").exit_code == 0
    # A new fault appears in the same file: only it is reported.
    shutil.copy(ROOT / "fixtures/fault_half_buffers.pt", tmp_path / "model.pt")
    payload = json.loads(run("model.pt", "--baseline", "base.json", "--format", "json").stdout)
    assert {f["code"] for f in payload["files"][0]["findings"]} == {"BN201"}
    assert run("model.pt", "--baseline", "missing.json").exit_code == 2


def test_bad_flag_values_exit_2() -> None:
    assert run(HEALTHY, "--format", "xml").exit_code == 2
    assert run(HEALTHY, "--input", "novalue", "--data", "x.npz").exit_code == 2


def test_sarif_and_json_of_real_fixtures_validate_against_their_schemas(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    files = ["fixtures/fault_nan_stats.pt", "fixtures/fault_training_mode.onnx", "fixtures/bad_truncated.pt", "fixtures/convnet.onnx"]
    sarif = json.loads(run(*files, "--format", "sarif").stdout)
    schema = json.loads((ROOT / "tests/data/sarif-schema-2.1.0.json").read_text())
    jsonschema.Draft7Validator(schema).validate(sarif)
    results = sarif["runs"][0]["results"]
    assert {r["ruleId"] for r in results} >= {"BN101", "BN404", "BN505"}
    assert all(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].startswith("fixtures/") for r in results)
    report = json.loads(run(*files, "--format", "json").stdout)
    jsonschema.validate(report, json.loads((ROOT / "bnlint/schemas/bnlint-report.schema.json").read_text()))
    assert report["version"] == 1 and report["summary"]["unreadable"] == 1


# ---------------------------------------------------------------- first-contact polish (issue 9)

@pytest.mark.parametrize("args", [["--select", "BN1O1"], ["--ignore", "BNX"], ["--select", "BN101,BN9"]])
def test_unknown_rule_codes_are_a_usage_error(args: list[str]) -> None:
    result = run(HEALTHY, *args)
    assert result.exit_code == 2 and "unknown rule code or prefix" in result.stderr and "Traceback" not in result.output


def test_unknown_code_in_config_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "bnlint.toml"
    config.write_text('ignore = ["BN1O1"]\n')
    result = run(FAULTY, "--config", str(config))
    assert result.exit_code == 2 and "BN1O1" in result.stderr


def test_exit_zero_statistics_and_output_format_alias() -> None:
    assert run(FAULTY, "--exit-zero").exit_code == 0
    assert run("fixtures/bad_truncated.pt", "--exit-zero").exit_code == 2  # unreadable inputs still fail
    stats = run("fixtures/fault_keras_momentum_module.pt", "--statistics")
    assert stats.stdout.splitlines()[:2] == ["3  BN304  [warning]  unusual-momentum", "1  BN305  [info]     eps-nondefault"]
    alias = run(FAULTY, "--output-format", "json")
    assert json.loads(alias.stdout)["files"][0]["findings"][0]["code"] == "BN101"


def test_fixes_are_shown_once_or_per_finding() -> None:
    default = run("fixtures/fault_never_updated.pt").stdout
    assert default.count("(bnlint rule BN104)") == 1 and "fixes:" in default
    shown = run("fixtures/fault_never_updated.pt", "--show-fixes").stdout
    assert shown.count("    fix: ") == 3 and "fixes:" not in shown
    grouped = run("fixtures/fault_never_updated.pt", "--group").stdout
    assert "BN104 [error] 3 layers (bn1, bn2, bn3)" in grouped


def test_no_color_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in run(FAULTY, "--color", "auto").stdout
    assert "\x1b[" in run(FAULTY, "--color", "always").stdout  # explicit wins


def test_help_shows_lint_options_and_the_default_command() -> None:
    out = run("--help").output
    assert "bnlint PATH... is bnlint check PATH..." in out and "--select" in out and "--data" in out


def test_internal_error_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnlint.api

    def boom(*_: object, **__: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(bnlint.api, "_analyse", boom)
    result = run(HEALTHY)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "internal error while linting: ZeroDivisionError: a bug" in result.output


def test_jobs_give_the_same_report_in_the_same_order() -> None:
    one = run("fixtures", "--format", "json", "-j", "1").stdout
    two = run("fixtures", "--format", "json", "-j", "2").stdout
    assert json.loads(one) == json.loads(two)


@pytest.mark.parametrize("args, code", [
    (["fixtures/convnet_state_dict.pt"], 0),
    (["fixtures/fault_nan_stats.pt"], 1),
    (["fixtures/does_not_exist.pt"], 2),
])
def test_the_command_exits_fast_with_complete_output_and_honest_codes(tmp_path: Path, args: list[str], code: int) -> None:
    """`python -m bnlint` (like the `bnlint` script) skips interpreter teardown with os._exit:
    the exit code must survive, and stdout and an --output file must be complete."""
    import subprocess
    import sys

    written = tmp_path / "report.json"
    piped = subprocess.run([sys.executable, "-m", "bnlint", "--format", "json", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    to_file = subprocess.run([sys.executable, "-m", "bnlint", "--format", "json", "--output", str(written), *args],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert piped.returncode == to_file.returncode == code, piped.stderr
    for text in (piped.stdout, written.read_text()):
        (file,) = json.loads(text)["files"]
        assert (file["error"] is not None) == (code == 2)
        assert bool(file["findings"]) == (code == 1)


def test_group_flags_through_the_cli(tmp_path: Path) -> None:
    """A healthy ONNX file whose 5 BatchNorm nodes each follow a Conv: one BN505 line by default,
    five with --no-group."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i in range(5):
        inits += [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), f"w{i}")]
        inits += [numpy_helper.from_array(v, f"{k}{i}") for k, v in (("s", np.ones(4, np.float32)), ("b", np.zeros(4, np.float32)),
                                                                     ("m", rng.normal(0, 0.1, 4).astype(np.float32)),
                                                                     ("v", rng.uniform(0.5, 2, 4).astype(np.float32)))]
        nodes += [helper.make_node("Conv", [current, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                  helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"y{i}"], name=f"bn{i}")]
        current = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 2, 2])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / "five.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)
    default = run(str(path), "-q")
    assert default.exit_code == 0 and default.stdout.count("BN505") == 1 and "5 layers (bn0" in default.stdout
    assert run(str(path), "-q", "--no-group").stdout.count("BN505 [info]") == 5
