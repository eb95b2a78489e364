"""Hostile names and files through the real CLI: nothing overwritten, nothing hangs, nothing is
silently ignored, every bad setting is one line naming the file and key (exit 2).

Files are made here, in tmp_path: names that look like options, named pipes, a folder nested
1,100 deep, /dev/zero as a side file, non-UTF-8 names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.config import DEFAULT_THRESHOLDS
from bnlint.settings import DYNAMIC_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
HEALTHY = ROOT / "fixtures" / "convnet_state_dict.pt"
FAULTY = ROOT / "fixtures" / "fault_nan_stats.pt"  # BN101 (error)
BNLINT = [sys.executable, "-m", "bnlint"]
POSIX = pytest.mark.skipif(os.name != "posix", reason="named pipes and byte file names are POSIX")


def run(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False, env=env)


def bnlint(cwd: Path, *args: str | bytes, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*BNLINT, *args], cwd=cwd, capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})


# -- 1. file names are not options -----------------------------------------------------------------


def _hook_args() -> list[str]:
    """The hook's command line as pre-commit builds it: shlex(entry), then args (files come after)."""
    import shlex

    import yaml

    hook = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())[0]
    return [*shlex.split(hook["entry"])[1:], *hook.get("args", [])]


@pytest.mark.parametrize("name", ["-omodel.pt", "-o.onnx", "--help.pt"])
def test_option_like_file_names_are_linted_as_files_by_the_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(HEALTHY, tmp_path / "model.pt")
    shutil.copy(FAULTY, tmp_path / name)
    before = (tmp_path / "model.pt").read_bytes()
    result = run(*_hook_args(), name, "model.pt")
    assert result.exit_code == 1, result.output  # the hostile file was linted: BN101
    assert "BN101" in result.stdout and name in result.stdout
    assert (tmp_path / "model.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "model.pt"])


@pytest.mark.parametrize("flag", ["--output", "--report", "--plot"])
@pytest.mark.parametrize("target", ["model.pt", "other.onnx", "weights.data"])
def test_reports_are_never_written_over_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, target: str) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(HEALTHY, tmp_path / "model.pt")
    shutil.copy(HEALTHY, tmp_path / "input.pt")
    result = run("input.pt", flag, target)
    assert result.exit_code == 2 and "refusing to write" in result.stderr, result.output
    assert (tmp_path / "model.pt").read_bytes() == HEALTHY.read_bytes()
    assert not (tmp_path / "other.onnx").exists() and not (tmp_path / "weights.data").exists()


def test_output_over_the_input_or_a_model_file_of_any_name_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(HEALTHY, tmp_path / "model.txt")  # a model under a report-like name
    shutil.copy(HEALTHY, tmp_path / "input.pt")
    for args in (["model.txt", "-o", "model.txt"], ["input.pt", "-o", "model.txt"]):
        result = run(*args)
        assert result.exit_code == 2 and "refusing to write" in result.stderr, result.output
    assert (tmp_path / "model.txt").read_bytes() == HEALTHY.read_bytes()


def test_report_is_written_through_a_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.txt").write_text("old report\n")
    os.chmod(tmp_path / "report.txt", 0o640)
    renames: list[tuple[str, str]] = []
    real = os.replace

    def replace(src: str, dst: str) -> None:
        renames.append((os.path.basename(src), os.path.basename(dst)))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    result = run(str(HEALTHY), "-o", "report.txt", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "report.txt").read_text())["summary"]["files"] == 1
    assert renames and renames[-1][1] == "report.txt" and renames[-1][0] != "report.txt"
    assert (tmp_path / "report.txt").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]


# -- 2. never open what is not a regular file; walk iteratively; bound side files ------------------


@POSIX
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_named_pipe_on_the_command_line_is_an_error_not_a_hang(tmp_path: Path, jobs: str) -> None:
    os.mkfifo(tmp_path / "pipe.pt")
    shutil.copy(HEALTHY, tmp_path / "model.pt")
    done = bnlint(tmp_path, "-j", jobs, "pipe.pt", "model.pt", timeout=60)
    assert done.returncode == 2, done.stderr
    out = done.stdout.decode()
    assert "pipe.pt: error: not a regular file (a named pipe)" in out and "in 2 files" in out


@POSIX
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_named_pipe_in_a_folder_is_skipped_with_a_note(tmp_path: Path, jobs: str) -> None:
    os.mkfifo(tmp_path / "pipe.pt")
    shutil.copy(HEALTHY, tmp_path / "a.pt")
    shutil.copy(HEALTHY, tmp_path / "b.pt")
    done = bnlint(tmp_path, "-j", jobs, ".", timeout=60)
    assert done.returncode == 0, done.stderr
    assert b"pipe.pt: skipped: a named pipe" in done.stderr and b"in 2 files" in done.stdout


@POSIX
@pytest.mark.parametrize("flag", ["--baseline", "--config", "--reference", "--data"])
def test_side_file_that_is_a_pipe_or_a_device_is_one_line(tmp_path: Path, flag: str) -> None:
    os.mkfifo(tmp_path / "side.fifo")
    for side in ("side.fifo", "/dev/zero"):
        done = bnlint(tmp_path, str(HEALTHY), flag, side, timeout=60)
        err = done.stderr.decode()
        assert done.returncode == 2 and "not a regular file" in err and "Traceback" not in err, err


def test_huge_baseline_is_refused_without_reading_it_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bnlint import baseline

    monkeypatch.setattr(baseline, "MAX_BASELINE_BYTES", 1000)
    (tmp_path / "base.json").write_text(json.dumps({"version": 1, "findings": [{"path": "x" * 50, "layer": None, "code": "BN101"}] * 40}))
    result = run(str(HEALTHY), "--baseline", str(tmp_path / "base.json"))
    assert result.exit_code == 2 and "larger than 1000 bytes" in result.stderr


@pytest.mark.parametrize("payload", [
    {"version": 1, "findings": [{"path": 1, "code": "BN101"}]},
    {"version": 1, "findings": [{"path": "a.pt", "code": ["BN101"]}]},
    {"version": 1, "findings": [{"path": "a.pt", "code": "BN101", "layer": {"x": 1}}]},
    {"version": 1, "findings": ["a.pt"]},
    "[" * 100_000,
])
def test_hostile_baseline_is_one_line_naming_the_file(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "base.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    result = run(str(HEALTHY), "--baseline", str(path))
    assert result.exit_code == 2, result.output
    assert str(path) in result.stderr and "internal error" not in result.stderr


def test_folder_nested_1100_deep(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:  # made through dir_fd: the whole path is longer than some tools like
        for _ in range(1100):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("m.pt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as handle:
            handle.write(FAULTY.read_bytes())
    finally:
        os.close(fd)
    try:
        result = run(str(tmp_path))
    finally:
        _remove_deep(tmp_path / "d")  # pytest's own recursive clean-up of old tmp folders would fail on it
    assert "internal error" not in result.stderr and "RecursionError" not in result.output
    assert result.exit_code == 1 and "BN101" in result.stdout


def _remove_deep(top: Path) -> None:
    """Remove a chain of folders too deep for shutil.rmtree: down by chdir, then up, one level at a time."""
    start = os.getcwd()
    os.chdir(top)
    depth = 0
    try:
        while True:
            folders = [e for e in os.listdir(".") if os.path.isdir(e) and not os.path.islink(e)]
            for entry in set(os.listdir(".")) - set(folders):
                os.unlink(entry)
            if folders:
                os.chdir(folders[0])
                depth += 1
            elif depth == 0:
                break
            else:
                name = os.path.basename(os.getcwd())
                os.chdir("..")
                depth -= 1
                os.rmdir(name)
    finally:
        os.chdir(start)
    os.rmdir(top)


# -- 3. settings never silently lost or broken ------------------------------------------------------


def test_config_of_any_name_is_honoured(tmp_path: Path) -> None:
    (tmp_path / "strict-ci.toml").write_text('ignore = ["BN101"]\n')
    (tmp_path / "proj.toml").write_text('[tool.bnlint]\nignore = ["BN101"]\n')
    assert run(str(FAULTY)).exit_code == 1
    for name in ("strict-ci.toml", "proj.toml"):
        result = run(str(FAULTY), "--config", str(tmp_path / name))
        assert result.exit_code == 0 and "BN101" not in result.stdout, (name, result.output)


SETTINGS = [("thresholds", key) for key in DEFAULT_THRESHOLDS] + [("dynamic", key) for key in DYNAMIC_DEFAULTS]
BAD_VALUES = {"nan": "nan", "inf": "inf", "-inf": "-inf", "string": '"0.1"', "list": "[1, 2]", "bool": "true", "table": "{ a = 1 }"}


@pytest.mark.parametrize("table,key", SETTINGS)
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_every_threshold_and_dynamic_key_rejects_bad_values(tmp_path: Path, table: str, key: str, bad: str) -> None:
    from bnlint.config import load_config
    from bnlint.errors import UsageError

    if table == "dynamic" and key in ("device", "onnx_engine") and bad == "string":
        pytest.skip("a string is the right type here; a wrong choice is tested below")
    path = tmp_path / "settings.toml"
    toml_key = key.replace("_", "-") if table == "dynamic" else key
    path.write_text(f"[{table}]\n{toml_key} = {BAD_VALUES[bad]}\n")
    with pytest.raises(UsageError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and (key in message or toml_key in message) and "expected" in message, message


@pytest.mark.parametrize("text,words", [
    ('[dynamic]\ndrift-kl = nan\n', ["drift-kl", "expected"]),
    ('[thresholds]\nmax_scale = inf\n', ["thresholds.max_scale", "expected a finite number"]),
    ('[dynamic]\ndevice = "tpu"\n', ["device", "expected one of"]),
    ('[dynamic]\ntimeout = 0\n', ["timeout", "positive"]),
    ('fail-on = 3\n', ["fail-on", "expected"]),
    ('thresholds = 3\n', ["thresholds", "expected a table"]),
    ('dynamic = "x"\n', ["dynamic", "expected a table"]),
    ('select = 3\n', ["select", "expected a list"]),
    ('[per-layer-ignores]\n"a.*" = 3\n', ["per-layer-ignores", "expected a list"]),
])
def test_bad_settings_through_the_cli_name_file_and_key(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "ci.toml"
    path.write_text(text)
    result = run(str(HEALTHY), "--config", str(path))
    assert result.exit_code == 2, result.output
    assert str(path) in result.stderr and all(w in result.stderr for w in words), result.stderr
    assert "internal error" not in result.stderr


def test_timeout_setting_is_accepted(tmp_path: Path) -> None:
    from bnlint.config import load_config
    from bnlint.dynamic.options import dynamic_settings

    path = tmp_path / "ci.toml"
    path.write_text("[dynamic]\ntimeout = 90\n")
    assert dynamic_settings(load_config(path)).timeout == 90.0
    assert DYNAMIC_DEFAULTS["timeout"] is None


@POSIX
@pytest.mark.parametrize("fmt", ["text", "json", "sarif", "github", "junit"])
def test_non_utf8_file_name_in_every_format(tmp_path: Path, fmt: str) -> None:
    shutil.copy(FAULTY, os.path.join(os.fsencode(tmp_path), b"\xff.pt"))
    done = bnlint(tmp_path, "--format", fmt, b"\xff.pt", env={"PYTHONIOENCODING": "utf-8"})
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 1, err
    assert "Traceback" not in err
    text = done.stdout.decode("utf-8")  # strict: the output is valid UTF-8
    assert "\\xff.pt" in text or "%FF.pt" in text
    if fmt in ("json", "sarif"):
        document = json.loads(text)
        assert "\\udc" not in text  # no lone surrogate escapes: strict JSON readers reject them
        if fmt == "sarif":
            jsonschema = pytest.importorskip("jsonschema")
            schema = json.loads((ROOT / "tests/data/sarif-schema-2.1.0.json").read_text())
            jsonschema.Draft7Validator(schema).validate(document)
    if fmt == "junit":
        ET.fromstring(text)


def test_term_dumb_gets_no_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnlint import cli

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert cli._color("auto", True) is True
    monkeypatch.setenv("TERM", "dumb")
    assert cli._color("auto", True) is False
    assert cli._color("always", True) is True  # asked for explicitly


def test_term_dumb_through_the_cli_has_no_ansi(monkeypatch: pytest.MonkeyPatch) -> None:
    # CliRunner's stdout claims a terminal, so --color auto decides on TERM alone.
    monkeypatch.setattr("click.testing._NamedTextIOWrapper.isatty", lambda self: True, raising=False)
    result = run(str(FAULTY), env={"TERM": "dumb", "NO_COLOR": ""})
    assert result.exit_code == 1 and "\x1b[" not in result.output
    colored = run(str(FAULTY), env={"TERM": "xterm", "NO_COLOR": ""})
    assert "\x1b[" in colored.output


# -- 4. --timeout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
@pytest.mark.parametrize("command", [[], ["fix"]])
def test_timeout_must_be_positive_and_finite(command: list[str], value: str) -> None:
    result = run(*command, str(HEALTHY), "--timeout", value)
    assert result.exit_code == 2 and "--timeout" in result.output


def test_timeout_reaches_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnlint import cli

    seen: dict[str, object] = {}
    real = cli._dynamic_options

    def spy(*args: object, **kwargs: object) -> object:
        options = real(*args, **kwargs)  # type: ignore[arg-type]
        seen["check"] = options.timeout
        raise SystemExit(0)

    monkeypatch.setattr(cli, "_dynamic_options", spy)
    run(str(HEALTHY), "--data", str(ROOT / "fixtures/data/convnet_indomain.npz"), "--timeout", "12.5")
    assert seen["check"] == 12.5

    import bnlint.fix.run as fix_run

    def capture(options: object, config: object) -> object:
        seen["fix"] = options.timeout  # type: ignore[attr-defined]
        raise SystemExit(0)

    monkeypatch.setattr(fix_run, "run_fix", capture)
    run("fix", str(HEALTHY), "--dry-run", "--timeout", "7")
    assert seen["fix"] == 7.0


def test_timeout_help_text() -> None:
    for command in (["check", "--help"], ["fix", "--help"]):
        assert "wall-clock limit for running the model in its isolated" in " ".join(run(*command).output.split())


# -- 5. fix: write errors are one line, exit 2 ------------------------------------------------------


def test_fix_write_error_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnlint.fix.run as fix_run
    from bnlint.errors import OutputError

    def full_disk(options: object, config: object) -> object:
        raise OSError(28, "No space left on device", str(tmp_path / "fixed.onnx"))

    monkeypatch.setattr(fix_run, "run_fix", full_disk)
    result = run("fix", str(ROOT / "fixtures/fault_training_mode.onnx"), "-o", str(tmp_path / "fixed.onnx"))
    assert result.exit_code == 2 and "No space left on device" in result.stderr and "Traceback" not in result.output

    def refused(options: object, config: object) -> object:
        raise OutputError("cannot write fixed.onnx: Read-only file system")

    monkeypatch.setattr(fix_run, "run_fix", refused)
    result = run("fix", str(ROOT / "fixtures/fault_training_mode.onnx"), "-o", str(tmp_path / "fixed.onnx"))
    assert result.exit_code == 2 and "Read-only file system" in result.stderr


def test_fix_in_place_through_the_cli_keeps_mode(tmp_path: Path) -> None:
    """`bnlint fix --in-place` on a real fixture: the file keeps its mode and still lints."""
    model = tmp_path / "m.onnx"
    shutil.copy(ROOT / "fixtures/fault_training_mode.onnx", model)
    os.chmod(model, 0o640)
    result = run("fix", str(model), "--in-place")
    assert result.exit_code in (0, 1), result.output
    assert model.stat().st_mode & 0o777 == 0o640
    assert run(str(model)).exit_code in (0, 1)
