"""First contact (issue 13): what a new user tries first works, through the real CLI.

Install commands that exist, docs that match behaviour, `check` and `fix` sharing their common
options, `bnlint.testing` after `import bnlint`, one key style in the config, "did you mean" for
typos, `-V`, and rule names wherever codes are accepted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from bnlint.cli import main

ROOT = Path(__file__).resolve().parent.parent
FROZEN = "fixtures/fault_frozen_train_module.pt"  # BN401 + BN403, pickled module: static lint only
FEW = "fixtures/fault_few_updates.pt"  # BN105 x3 (num_batches_tracked 3)
HEALTHY = "fixtures/convnet_state_dict.pt"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def codes(output: str) -> set[str]:
    return set(re.findall(r"\bBN\d{3}\b", output.split("\nfixes:")[0]))


# --- 1. install commands and docs that exist --------------------------------------------------


def test_docs_give_no_install_command_for_a_package_that_is_not_published() -> None:
    """`pip install bnlint` / `bnlint==0.1.0` name nothing on the package index: each install line
    installs from a clone or a git URL pinned to a commit."""
    texts = {p: (ROOT / p).read_text(encoding="utf-8") for p in ("README.md", "examples/github-workflow.yml")}
    for path, text in texts.items():
        # `pip install [-flags] bnlint`, `"bnlint[torch]"`, `bnlint==0.1.0`: a name only the index could resolve
        assert not re.search(r"pip install\s+(-\S+\s+)*[\"']?bnlint(\[[^\]]*\])?(==[\d.]+)?(?!\s*@)[\"']?(?=[\s`)]|$)", text), path
        assert "bnlint==" not in text, path
    assert 'bnlint @ git+https://github.com/OWNER/bnlint@' in texts["README.md"]
    assert "pip install -e '.[torch" in texts["README.md"] or 'pip install -e ".[torch' in texts["README.md"]


def test_workflow_example_paths_cover_every_model_extension_and_no_phantom_dependency() -> None:
    from bnlint.loaders import MODEL_EXTENSIONS

    workflow = yaml.safe_load((ROOT / "examples/github-workflow.yml").read_text(encoding="utf-8"))
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    paths = on["pull_request"]["paths"]
    for ext in MODEL_EXTENSIONS:
        assert f"**/*{ext}" in paths, ext
    text = (ROOT / "examples/github-workflow.yml").read_text(encoding="utf-8")
    assert "networkx" not in text
    hook = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))[0]
    for framework in ("PyTorch", "ONNX", "Keras", "Caffe"):
        assert framework in hook["description"]


# --- 2. help matches behaviour; check and fix share their options -------------------------------


def test_help_says_what_trust_covers() -> None:
    for args in (["--help"], ["check", "--help"], ["fix", "--help"]):
        text = " ".join(run(*args).output.split())
        assert "TorchScript" in text and "Lambda" in text and "pickled nn.Module" in text, args


SHARED = ("--quiet", "-q", "--format", "--output-format", "--config", "--device", "--batch-size", "--arch", "--arch-kwargs",
          "--trust", "--input", "--timeout", "--debug", "--data", "--onnx-engine", "--report", "--output", "-o", "--help", "-h")


def _option_names(command: click.Command) -> set[str]:
    with click.Context(command, info_name=command.name) as ctx:
        params = command.get_params(ctx)
    return {name for p in params if isinstance(p, click.Option) for name in (*p.opts, *p.secondary_opts)}


def test_check_and_fix_accept_the_same_common_options() -> None:
    """--color is left out on purpose: fix's output is plain text, JSON or SARIF, never coloured."""
    assert isinstance(main, click.Group)
    check, fix = main.commands["check"], main.commands["fix"]
    for name in SHARED:
        assert name in _option_names(check), f"check lacks {name}"
        assert name in _option_names(fix), f"fix lacks {name}"
    device = {c.name: next(p for p in c.params if p.name == "device") for c in (check, fix)}
    assert device["check"].default is None and device["fix"].default is None  # the config's, else auto
    assert set(device["fix"].type.choices) == set(device["check"].type.choices) == {"cpu", "cuda", "auto"}  # type: ignore[attr-defined]


def test_fix_quiet_prints_what_was_written_without_the_table(tmp_path: Path) -> None:
    """`bnlint fix -q` was "No such option". An ONNX training-mode graph is rewritten without data."""
    import onnx

    model = tmp_path / "train.onnx"
    model.write_bytes((ROOT / "fixtures/fault_training_mode.onnx").read_bytes())
    loud = run("fix", str(model), "--dry-run")
    quiet = run("fix", str(model), "--dry-run", "-q")
    assert quiet.exit_code == loud.exit_code, (loud.output, quiet.output)
    assert "No such option" not in quiet.output
    assert len(quiet.output.splitlines()) <= len(loud.output.splitlines())
    assert "dry run: nothing written" in quiet.output
    assert "mean|SMD| before" not in quiet.output and "note:" not in quiet.output
    onnx.checker.check_model(str(model))  # untouched


def test_fix_device_default_follows_the_config_then_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device fix runs on: the flag, else [tool.bnlint.dynamic] device, else auto (as for check)."""
    import bnlint.fix.run as fix_run

    seen: list[str] = []

    def fake_run_fix(options: fix_run.FixOptions, config: object) -> None:
        seen.append(options.device)
        raise fix_run.UsageError("stop here")

    monkeypatch.setattr(fix_run, "run_fix", fake_run_fix)
    onnx_model = "fixtures/convnet.onnx"
    assert run("fix", onnx_model, "--dry-run").exit_code == 2
    assert seen[-1] == "auto"  # ONNX: onnxruntime resolves auto itself
    assert run("fix", HEALTHY, "--dry-run").exit_code == 2
    assert seen[-1] in ("cpu", "cuda")  # torch needs a concrete device: auto resolved
    settings = tmp_path / "bnlint.toml"
    settings.write_text('[dynamic]\ndevice = "cpu"\n', encoding="utf-8")
    assert run("fix", onnx_model, "--dry-run", "--config", str(settings)).exit_code == 2
    assert seen[-1] == "cpu"
    assert run("fix", onnx_model, "--dry-run", "--config", str(settings), "--device", "auto").exit_code == 2
    assert seen[-1] == "auto"


# --- 3. the Python API after a plain `import bnlint` -------------------------------------------


def test_import_bnlint_reaches_testing_lazily_and_lists_only_the_public_api() -> None:
    """The README's `bnlint.testing.assert_bn_healthy` after `import bnlint`, in a fresh interpreter:
    no torch imported by the import, dir() lists the public API only."""
    code = ("import sys, json\nimport bnlint\nbefore = sorted(m for m in ('torch', 'bnlint.testing', 'numpy') if m in sys.modules)\n"
            f"report = bnlint.testing.assert_bn_healthy({HEALTHY!r})\n"
            "print(json.dumps({'before': before, 'dir': dir(bnlint), 'all': sorted(bnlint.__all__), 'torch': 'torch' in sys.modules,"
            " 'findings': len(report.findings)}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["before"] == []
    assert result["torch"] is False
    assert result["dir"] == result["all"]
    assert "testing" in result["dir"] and "lint" in result["dir"] and "guard" in result["dir"]
    for private in ("Any", "TYPE_CHECKING", "annotations"):
        assert private not in result["dir"]


def test_readme_testing_example_is_the_one_that_works() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "bnlint.testing.assert_bn_healthy" in readme
    import bnlint

    assert callable(bnlint.testing.assert_bn_healthy)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bnlint.nope  # noqa: B018


# --- 4. one key style, did you mean, -V, rule names ----------------------------------------------


@pytest.mark.parametrize("key", ["few-updates", "few_updates"])
@pytest.mark.parametrize("top", ["fail-on", "fail_on"])
def test_dashes_and_underscores_are_one_key_everywhere(tmp_path: Path, key: str, top: str) -> None:
    settings = tmp_path / "bnlint.toml"
    settings.write_text(f'{top} = "info"\n[thresholds]\n{key} = 2\n[dynamic]\ndrift_kl = 0.1\nbatch-size = 8\n'
                        '[per_layer_ignores]\n"bn3" = ["few-stat-updates"]\n', encoding="utf-8")
    result = run(FEW, "--config", str(settings))
    # few-updates 2 < num_batches_tracked 3: BN105 gone; without the threshold it fires (fail-on info -> 1).
    assert result.exit_code == 0, result.output
    settings.write_text(f'{top} = "info"\n[per_layer_ignores]\n"bn3" = ["few-stat-updates"]\n', encoding="utf-8")
    result = run(FEW, "--config", str(settings))
    assert result.exit_code == 1 and "bn2: BN105" in result.output and "bn3: BN105" not in result.output


def test_a_key_given_in_both_spellings_is_an_error(tmp_path: Path) -> None:
    settings = tmp_path / "bnlint.toml"
    settings.write_text("[thresholds]\nfew-updates = 2\nfew_updates = 3\n", encoding="utf-8")
    result = run(FEW, "--config", str(settings))
    assert result.exit_code == 2 and "given twice" in result.output


@pytest.mark.parametrize(
    "text, hint",
    [
        ('fail-onn = "error"\n', "did you mean 'fail-on'"),
        ("[thresholds]\nfew-update = 2\n", "did you mean 'few-updates'"),
        ("[dynamic]\ndrift-k = 0.1\n", "did you mean 'drift-kl'"),
        ('ignore = ["BN4O3"]\n', "did you mean 'BN403'"),
        ('select = ["frozen-bn-in-train"]\n', "did you mean 'frozen-bn-in-train-mode'"),
        ('[per-layer-ignores]\n"a.*" = ["dead-channel"]\n', "did you mean 'dead-channels'"),
    ],
)
def test_config_typos_get_a_did_you_mean(tmp_path: Path, text: str, hint: str) -> None:
    settings = tmp_path / "bnlint.toml"
    settings.write_text(text, encoding="utf-8")
    result = run(HEALTHY, "--config", str(settings))
    assert result.exit_code == 2, result.output
    assert hint in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("args, hint", [
    (["--select", "BN4O3"], "did you mean 'BN403'"),
    (["--ignore", "frozen-bn-in-train"], "did you mean 'frozen-bn-in-train-mode'"),
])
def test_flag_typos_get_a_did_you_mean(args: list[str], hint: str) -> None:
    result = run(HEALTHY, *args)
    assert result.exit_code == 2 and hint in result.output, result.output


def test_rule_names_work_wherever_codes_do(tmp_path: Path) -> None:
    assert codes(run(FROZEN).output) == {"BN401", "BN403"}
    assert codes(run(FROZEN, "--select", "frozen-bn-in-train-mode").output) == {"BN403"}
    assert codes(run(FROZEN, "--select", "BN4", "--ignore", "frozen_bn_in_train_mode").output) == {"BN401"}
    settings = tmp_path / "bnlint.toml"
    settings.write_text('select = ["saved-in-train-mode", "BN403"]\n[per-layer-ignores]\n"*" = ["frozen-bn-in-train-mode"]\n',
                        encoding="utf-8")
    assert codes(run(FROZEN, "--config", str(settings)).output) == {"BN401"}
    by_code, by_name = run("rule", "BN403"), run("rule", "frozen-bn-in-train-mode")
    assert by_code.exit_code == by_name.exit_code == 0
    assert by_name.output == by_code.output and by_code.output.startswith("# BN403 frozen-bn-in-train-mode")
    unknown = run("rule", "BN4O3")
    assert unknown.exit_code == 2 and "did you mean 'BN403'" in unknown.output


def test_dash_capital_v_prints_the_version() -> None:
    from bnlint import __version__

    for flag in ("-V", "--version"):
        result = run(flag)
        assert result.exit_code == 0 and result.output.strip() == f"bnlint, version {__version__}"


def test_names_that_start_with_bn_are_names_not_codes() -> None:
    """`bn-folded` (BN501) and `unfused-bn` (BN505) are rule names, not the prefix `BN-FOLDED`."""
    onnx_model = "fixtures/convnet.onnx"  # BN505 x3
    assert codes(run(onnx_model, "--select", "unfused-bn").output) == {"BN505"}
    assert codes(run(onnx_model, "--ignore", "unfused-bn,bn-folded").output) == set()
    typo = run(onnx_model, "--select", "bn-folde")
    assert typo.exit_code == 2 and "did you mean 'bn-folded'" in typo.output


def test_assert_bn_healthy_refuses_a_misspelt_code_like_the_cli() -> None:
    from bnlint.config import Config
    from bnlint.errors import UsageError
    from bnlint.testing import assert_bn_healthy

    with pytest.raises(UsageError, match="did you mean 'BN101'"):
        assert_bn_healthy("fixtures/fault_nan_stats.pt", config=Config(ignore=("BN1O1",)))
    assert_bn_healthy("fixtures/fault_nan_stats.pt", config=Config(ignore=("BN101",)))


def test_fix_auto_device_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here, so the GPU branch is simulated: torch files get cuda (torch.device needs a real
    name), ONNX keeps auto for onnxruntime, which uses CUDA only when its build has it."""
    import glob
    import types

    from bnlint.cli import _fix_device

    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert _fix_device("auto", HEALTHY) == "cuda"
    assert _fix_device("auto", "fixtures/convnet.onnx") == "auto"
    assert _fix_device("cpu", HEALTHY) == "cpu"
    fake.cuda.is_available = lambda: False
    assert _fix_device("auto", HEALTHY) == "cpu"
    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    assert _fix_device("auto", HEALTHY) == "cpu"
