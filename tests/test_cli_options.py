"""`check` and `fix` share their common options (declared once: same help line, same validation),
build one typed options object each, and `fix -o` takes a folder only for a folder-format model."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.cli_options import CheckOptions, CommonOptions, FixCommandOptions

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "fixtures" / "convnet.onnx")
SAVEDMODEL = str(ROOT / "fixtures" / "tf_formats" / "savedmodel_healthy")
DATA = str(ROOT / "fixtures" / "data" / "convnet_tiny.npz")

# Every option both commands take with one meaning (--data, --output, --format and --report differ:
# a sample vs the target data, a report vs the fixed model, output formats each command has).
SHARED = ("-q, --quiet", "--config", "--input", "--batch-size", "--arch", "--arch-kwargs", "--trust", "--device", "--timeout",
          "--onnx-engine", "--debug")


def run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _help_entries(command: str) -> dict[str, str]:
    """`bnlint COMMAND --help`'s option entries: the option names (before the metavar) -> the help text."""
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    entries: dict[str, str] = {}
    current = None
    for line in result.output.split("Options:\n", 1)[1].splitlines():
        if line.startswith("  -"):  # a new entry: "  -q, --quiet   help..." or "  --batch-size INTEGER RANGE  help..."
            head, _, text = line.strip().partition("  ")
            names = ", ".join(part.split(" ")[0] for part in head.split(", "))
            current = names
            entries[current] = text.strip()
        elif current is not None and line.strip():
            entries[current] += " " + line.strip()
    return entries


def test_every_shared_option_has_the_same_help_line_in_check_and_fix() -> None:
    check, fix = _help_entries("check"), _help_entries("fix")
    for name in SHARED:
        assert name in check and name in fix, name
        assert check[name] == fix[name], (name, check[name], fix[name])
        assert check[name], name


# One invalid value per shared option that has one; both commands must give the same error line.
INVALID = [
    ("--batch-size", "0"),
    ("--timeout", "-1"),
    ("--timeout", "nan"),
    ("--device", "gpu"),
    ("--onnx-engine", "tensorrt"),
    ("--config", "no-such-settings.toml"),
    ("--input", "novalue"),
    ("--input", "=key"),
    ("--arch-kwargs", "[1, 2]"),
    ("--arch-kwargs", "{not json"),
]


def _error_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip()][-1]


@pytest.mark.parametrize("option, value", INVALID)
def test_an_invalid_shared_value_is_the_same_error_from_check_and_fix(option: str, value: str) -> None:
    """Without --data too: `bnlint m.onnx --input novalue` was accepted by check and refused by fix."""
    checked = run("check", MODEL, option, value)
    fixed = run("fix", MODEL, "--dry-run", option, value)
    assert checked.exit_code == fixed.exit_code == 2, (checked.output, fixed.output)
    assert _error_line(checked.output) == _error_line(fixed.output), (checked.output, fixed.output)
    assert option in _error_line(checked.output) or "--" in _error_line(checked.output)
    assert "Traceback" not in checked.output + fixed.output


@pytest.mark.parametrize("command, options", [("check", CheckOptions), ("fix", FixCommandOptions)])
def test_each_command_has_one_typed_frozen_options_object_with_a_field_per_parameter(command: str, options: type[CommonOptions]) -> None:
    assert isinstance(main, click.Group)
    params = {p.name for p in main.commands[command].params}
    assert params == {f.name for f in dataclasses.fields(options)}
    built = options.from_click(**{f.name: getattr(options(), f.name) for f in dataclasses.fields(options)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.trust = True  # type: ignore[misc]
    with pytest.raises(TypeError):  # a click parameter without a field is never silently dropped
        options.from_click(unknown_flag=True)


def test_check_options_reach_the_lint_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnlint.cli as cli

    seen: list[CheckOptions] = []

    def capture(opts: CheckOptions) -> None:
        seen.append(opts)

    monkeypatch.setattr(cli, "run_check", capture)
    run("check", MODEL, "-q", "--select", "BN1", "--batch-size", "4", "--input", "x=y", "--jobs", "3", "--device", "cpu")
    (opts,) = seen
    assert opts.paths == (MODEL,) and opts.quiet and opts.select == ("BN1",) and opts.batch_size == 4 and opts.jobs == 3
    assert opts.input_map() == {"x": "y"} and opts.device == "cpu" and opts.data is None


def test_fix_options_are_built_in_one_place_flags_over_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnlint.fix.run as fix_run

    seen: list[fix_run.FixOptions] = []

    def capture(options: fix_run.FixOptions, config: object) -> None:
        seen.append(options)
        raise fix_run.UsageError("stop here")

    monkeypatch.setattr(fix_run, "run_fix", capture)
    config = tmp_path / "bnlint.toml"
    config.write_text("[tool.bnlint.dynamic]\nbatch-size = 7\nonnx-engine = \"reference\"\n")
    result = run("fix", MODEL, "--dry-run", "--config", str(config), "--input", "a=b", "--arch-kwargs", '{"n": 2}', "--timeout", "3")
    assert result.exit_code == 2 and "stop here" in result.output
    (options,) = seen
    assert options.batch_size == 7 and options.onnx_engine == "reference"
    assert dict(options.inputs) == {"a": "b"} and dict(options.arch_kwargs) == {"n": 2} and options.timeout == 3.0
    run("fix", MODEL, "--dry-run", "--config", str(config), "--batch-size", "5", "--onnx-engine", "auto")
    assert seen[-1].batch_size == 5 and seen[-1].onnx_engine == "auto"


# -- fix -o: a file for a file model, a folder for a folder-format model ------------------------------


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnlint: error: "), output
    assert "Usage:" not in output
    return lines[0]


def test_fix_refuses_a_folder_output_for_a_file_model_in_one_line(tmp_path: Path) -> None:
    result = run("fix", MODEL, "-o", str(tmp_path), "--data", DATA)
    assert result.exit_code == 2
    assert "is a folder" in _one_error_line(result.output)


def test_fix_refuses_a_file_output_for_a_folder_model_in_one_line(tmp_path: Path) -> None:
    existing = tmp_path / "fixed.pb"
    existing.write_bytes(b"")
    result = run("fix", SAVEDMODEL, "-o", str(existing), "--data", DATA)
    assert result.exit_code == 2
    assert "is not a folder" in _one_error_line(result.output)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed here")
@pytest.mark.parametrize("exists", [True, False])
def test_fix_takes_a_folder_output_for_a_savedmodel_and_says_tensorflow_is_needed(tmp_path: Path, exists: bool) -> None:
    """Not click's "File ... is a directory": the path is right, what is missing is TensorFlow."""
    out = tmp_path / "fixed"
    if exists:
        out.mkdir()
    result = run("fix", SAVEDMODEL, "-o", str(out), "--data", DATA)
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert "needs TensorFlow" in line and "savedmodel_healthy" in line
    assert not out.exists() or not any(out.iterdir())  # nothing written


# -- run_fix under torchrun: the loaded model is measured, not linted again from its path -------------


def test_in_process_measurement_reuses_the_loaded_model_and_matches_the_linter(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    import bnlint.api
    import bnlint.loaders
    from bnlint.config import Config
    from bnlint.fix.run import FixOptions, _dynamic_options, _measure_here

    path = str(ROOT / "fixtures" / "convnet_state_dict.pt")
    options = FixOptions(model=path, data=DATA, arch=str(ROOT / "fixtures" / "models.py") + ":convnet", batch_size=8)
    expected = bnlint.api.lint_paths([path], Config(), dynamic=_dynamic_options(options))
    info = bnlint.loaders.load_model(path)

    def no_full_lint(*_: object, **__: object) -> None:
        raise AssertionError("lint_paths called")

    monkeypatch.setattr(bnlint.api, "lint_paths", no_full_lint)
    report = _measure_here(info, path, options, Config())
    assert report is not None
    (got,), (want,) = report.files, expected.files
    assert [s["layer"] for s in got.layer_stats] == [s["layer"] for s in want.layer_stats]
    for a, b in zip(got.layer_stats, want.layer_stats):
        assert a["mean_abs_smd"] == pytest.approx(b["mean_abs_smd"], rel=1e-9, abs=1e-12)
    assert sorted((f.code, f.layer) for f in got.findings) == sorted((f.code, f.layer) for f in want.findings)
    assert _measure_here(info, path, dataclasses.replace(options, data=None), Config()) is None
