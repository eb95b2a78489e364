"""The GitHub Action: action.yml's structure, and its script (bnlint/_action.py) on real git
repositories built in tmp_path: which files it lints, odd file names, exit codes, the SARIF."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import bnlint.loaders
from bnlint import _action

ROOT = Path(__file__).resolve().parent.parent
HEALTHY = ROOT / "fixtures/convnet_state_dict.pt"
FAULTY = ROOT / "fixtures/fault_nan_stats.pt"  # BN101 (error)
EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".onnx", ".pth.tar", ".jit", ".keras", ".h5", ".hdf5",
              ".caffemodel", ".prototxt")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false", *args],
                          cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A repository whose first commit holds a healthy model, a model to delete and a README."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    shutil.copy(HEALTHY, root / "old.pt")
    shutil.copy(HEALTHY, root / "gone.pt")
    (root / "README.md").write_text("models\n", encoding="utf-8")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "base")
    return root


def base_of(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD")


def env_for(base: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"BNLINT_BASE": base, "GITHUB_OUTPUT": str(tmp_path / "github_output"), **extra}


def outputs(tmp_path: Path) -> dict[str, str]:
    """GITHUB_OUTPUT's `key<<DELIM / value / DELIM` entries."""
    lines = (tmp_path / "github_output").read_text(encoding="utf-8").splitlines()
    found: dict[str, str] = {}
    i = 0
    while i < len(lines):
        key, _, delimiter = lines[i].partition("<<")
        end = lines.index(delimiter, i + 1)
        found[key] = "\n".join(lines[i + 1:end])
        i = end + 1
    return found


def sarif_uris(path: Path) -> dict[str, set[str]]:
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["version"] == "2.1.0"
    by_file: dict[str, set[str]] = {}
    for result in document["runs"][0]["results"]:
        uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        by_file.setdefault(uri, set()).add(result["ruleId"])
    return by_file


def test_changed_model_files_only_with_odd_names(repo: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Added, modified and renamed model files are linted; deleted ones, other files and old
    unchanged models are not. Names with spaces and leading dashes stay file names."""
    base = base_of(repo)
    shutil.copy(FAULTY, repo / "my model.pt")
    shutil.copy(FAULTY, repo / "-o.pt")  # without `--`: `-o .pt` would write the report over `.pt`
    shutil.copy(HEALTHY, repo / "--help.pth")
    shutil.copy(HEALTHY, repo / "UPPER.PT")
    (repo / "gone.pt").unlink()
    (repo / "README.md").write_text("changed\n", encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "change")
    targets, why = _action.select_targets({"BNLINT_BASE": base}, repo)
    assert sorted(targets) == sorted(["my model.pt", "-o.pt", "--help.pth", "UPPER.PT"]), targets
    assert "changed since" in why

    code = _action.run(env_for(base, tmp_path), repo)
    assert code == 1  # BN101 is an error, at or above the default fail-on warning
    found = sarif_uris(repo / "bnlint.sarif")
    assert found.get("my%20model.pt") == {"BN101"} or found.get("my model.pt") == {"BN101"}, found
    assert found.get("-o.pt") == {"BN101"}, found
    assert not any("old.pt" in uri for uri in found)
    assert not (repo / ".pt").exists()
    annotations = capfd.readouterr().out
    assert "::error file=-o.pt" in annotations and "Usage:" not in annotations
    assert outputs(tmp_path)["sarif-written"] == "true"
    assert outputs(tmp_path)["sarif-file"] == str(repo / "bnlint.sarif")


def test_fail_on_and_args_are_passed_to_bnlint(repo: Path, tmp_path: Path) -> None:
    base = base_of(repo)
    shutil.copy(FAULTY, repo / "bad.pt")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "bad")
    assert _action.run(env_for(base, tmp_path, BNLINT_ARGS="--ignore 'BN101'"), repo) == 0
    (repo / "out").mkdir()
    assert _action.run(env_for(base, tmp_path, BNLINT_FAIL_ON="never", BNLINT_SARIF_FILE="out/r.sarif"), repo) == 0
    assert sarif_uris(repo / "out/r.sarif") == {"bad.pt": {"BN101"}}


def test_unreadable_changed_file_exits_2_and_still_writes_sarif(repo: Path, tmp_path: Path) -> None:
    base = base_of(repo)
    (repo / "broken.onnx").write_bytes(b"\x08\x07" + b"\xff" * 40)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "broken")
    assert _action.run(env_for(base, tmp_path), repo) == 2
    assert (repo / "bnlint.sarif").is_file()


def test_no_changed_model_is_a_clean_run_with_an_empty_sarif(repo: Path, tmp_path: Path) -> None:
    base = base_of(repo)
    (repo / "README.md").write_text("docs only\n", encoding="utf-8")
    git(repo, "commit", "-q", "-am", "docs")
    assert _action.run(env_for(base, tmp_path), repo) == 0
    document = json.loads((repo / "bnlint.sarif").read_text(encoding="utf-8"))
    assert document["runs"][0]["results"] == [] and document["runs"][0]["tool"]["driver"]["name"] == "bnlint"
    assert outputs(tmp_path)["files"] == "0"


def test_settings_change_or_no_base_lints_everything(repo: Path) -> None:
    base = base_of(repo)
    (repo / "bnlint.toml").write_text('ignore = ["BN505"]\n', encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "settings")
    assert _action.select_targets({"BNLINT_BASE": base}, repo)[0] == ["."]
    push = repo.parent / "push.json"
    push.write_text(json.dumps({"before": "0" * 40}), encoding="utf-8")
    assert _action.select_targets({"GITHUB_EVENT_NAME": "push", "GITHUB_EVENT_PATH": str(push)}, repo)[0] == ["."]
    assert _action.select_targets({"BNLINT_PATHS": "models dir/a.pt\n\n -x.pt \n"}, repo)[0] == ["models dir/a.pt", "-x.pt"]


def test_base_comes_from_the_event(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"base": {"sha": "a" * 40}}, "before": "b" * 40}), encoding="utf-8")
    where = {"GITHUB_EVENT_PATH": str(event)}
    assert _action.base_commit({**where, "GITHUB_EVENT_NAME": "pull_request"}) == "a" * 40
    assert _action.base_commit({**where, "GITHUB_EVENT_NAME": "push"}) == "b" * 40
    assert _action.base_commit({**where, "GITHUB_EVENT_NAME": "workflow_dispatch"}) is None
    assert _action.base_commit({**where, "GITHUB_EVENT_NAME": "push", "BNLINT_BASE": "c" * 40}) == "c" * 40


def test_missing_base_commit_and_bad_inputs_exit_2(repo: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(repo)
    monkeypatch.setenv("BNLINT_BASE", "f" * 40)  # no such commit, and no origin to fetch it from
    assert _action.main([]) == 2
    assert "cannot find the base commit" in capsys.readouterr().err
    monkeypatch.setenv("BNLINT_BASE", base_of(repo))
    monkeypatch.setenv("BNLINT_FAIL_ON", "sometimes")
    assert _action.main([]) == 2
    monkeypatch.setenv("BNLINT_FAIL_ON", "error")
    monkeypatch.setenv("BNLINT_ARGS", "--ignore 'BN1")  # unbalanced quote
    assert _action.main([]) == 2
    assert "args:" in capsys.readouterr().err


def test_every_extension_bnlint_reads_is_selected_from_its_own_list(monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"m{ext}" for ext in EXTENSIONS] + [f"M{ext.upper()}" for ext in EXTENSIONS]
    assert _action.model_files([*names, "a.ts", "notes.txt", "data.npz"]) == names
    # The list is bnlint's, read when the action runs: an extension added there is linted here.
    monkeypatch.setattr(bnlint.loaders, "MODEL_EXTENSIONS", (*bnlint.loaders.MODEL_EXTENSIONS, ".newfmt"))
    assert _action.model_files(["x.newfmt", "a.ts"]) == ["x.newfmt"]


def test_action_yml_is_a_composite_action_that_runs_the_script() -> None:
    action = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    assert action["name"] == "bnlint" and action["description"]
    assert set(action["inputs"]) >= {"paths", "args", "fail-on", "sarif-file", "upload-sarif"}
    for spec in action["inputs"].values():
        assert spec["description"] and "default" in spec
    assert action["inputs"]["upload-sarif"]["default"] == "true"
    assert action["runs"]["using"] == "composite"
    steps = action["runs"]["steps"]
    for step in steps:
        assert ("run" in step) != ("uses" in step), step
        if "run" in step:
            assert step["shell"] == "bash"
            assert "${{" not in step["run"], "inputs reach the shell through env, not spliced into its text"
    uses = [step["uses"] for step in steps if "uses" in step]
    assert any(u.startswith("github/codeql-action/upload-sarif@") for u in uses)
    assert any(u.startswith("actions/setup-python@") for u in uses)
    install = next(step for step in steps if "pip install" in step.get("run", ""))
    assert install["env"]["BNLINT_SOURCE"] == "${{ github.action_path }}"
    lint = next(step for step in steps if "bnlint._action" in step.get("run", ""))
    assert set(lint["env"]) == {"BNLINT_PATHS", "BNLINT_ARGS", "BNLINT_FAIL_ON", "BNLINT_SARIF_FILE"}
    for name in lint["env"]:
        assert name in (_action.__doc__ or "")
    assert lint["id"] == "lint" and action["outputs"]["exit-code"]["value"] == "${{ steps.lint.outputs.exit-code }}"
    upload = next(step for step in steps if step.get("uses", "").startswith("github/codeql-action/upload-sarif@"))
    assert "inputs.upload-sarif == 'true'" in upload["if"] and "sarif-written" in upload["if"]
    assert upload["with"]["sarif_file"] == "${{ steps.lint.outputs.sarif-file }}"
    assert steps[-1]["if"] == "always()" and "exit" in steps[-1]["run"]
