"""The real pre-commit, with the hook defined in .pre-commit-hooks.yaml, in throwaway git repos.

pre-commit pip-installs bnlint (from a snapshot of this checkout) into its own virtualenv; that
needs PyPI and takes ~10-15 s per environment. `try-repo` always builds a fresh environment in
a temporary store, so it is used for the two cases the issue names; everything else shares one
environment under a session-scoped PRE_COMMIT_HOME.

The snapshot: `pre-commit try-repo <checkout>` needs a HEAD commit and carries only *tracked*
uncommitted changes (it runs `git add -u` into a shadow clone), so untracked new files would be
silently missing. The tests therefore commit a copy of the working tree (tracked and untracked,
minus ignored files) into a temporary repo and point pre-commit at that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
HEALTHY = ["convnet_state_dict.pt", "convnet.onnx", "convnet.safetensors", "convnet_scripted.pt", "mlp_state_dict.pt"]
FAULTY = "fault_nan_stats.pt"  # BN101 (error)
NOT_A_MODEL = "bad_not_a_model.pt"  # a .pt name, not a model inside

try:
    import pre_commit  # noqa: F401

    PRE_COMMIT: list[str] | None = [sys.executable, "-m", "pre_commit"]
except ImportError:
    PRE_COMMIT = [shutil.which("pre-commit")] if shutil.which("pre-commit") else None  # type: ignore[list-item]

pytestmark = [
    pytest.mark.skipif(PRE_COMMIT is None, reason="pre-commit is not installed (pip install -r requirements-dev.txt)"),
    pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed"),
]

GIT_IDENTITY = ["-c", "user.name=bnlint-test", "-c", "user.email=bnlint-test@example.invalid", "-c", "commit.gpgsign=false"]


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *GIT_IDENTITY, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="session")
def hook_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A one-commit snapshot of this checkout's working tree: (path, commit sha)."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    if listing.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: cannot snapshot it for pre-commit")
    snapshot = tmp_path_factory.mktemp("bnlint-hook-repo")
    for name in filter(None, listing.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, snapshot / name)
    git(snapshot, "init", "-q")
    git(snapshot, "add", "-A")
    git(snapshot, "commit", "-q", "-m", "snapshot for pre-commit tests")
    return snapshot, git(snapshot, "rev-parse", "HEAD").strip()


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("pre-commit-home")
    return {**os.environ, "PRE_COMMIT_HOME": str(home), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PRE_COMMIT_COLOR": "never"}


def user_repo(tmp_path: Path, *fixtures: str, extra: dict[str, str] | None = None) -> Path:
    """A git repo with the given fixtures (and extra text files) staged, as before a commit."""
    repo = tmp_path / "user-repo"
    repo.mkdir()
    git(repo, "init", "-q")
    for name in fixtures:
        shutil.copy2(FIXTURES / name, repo / name)
    for name, text in (extra or {}).items():
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    return repo


def run_pre_commit(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    assert PRE_COMMIT is not None
    return subprocess.run([*PRE_COMMIT, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)


# -- try-repo, as the issue asks: a faulty fixture fails, a healthy one passes ----------------------


def test_try_repo_fails_on_a_faulty_fixture(tmp_path: Path, hook_repo: tuple[Path, str], env: dict[str, str]) -> None:
    repo = user_repo(tmp_path, FAULTY)
    proc = run_pre_commit(repo, env, "try-repo", str(hook_repo[0]), "bnlint", "--files", FAULTY)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Failed" in proc.stdout and "BN101" in proc.stdout and f"{FAULTY}:" in proc.stdout


def test_try_repo_passes_on_healthy_fixtures(tmp_path: Path, hook_repo: tuple[Path, str], env: dict[str, str]) -> None:
    repo = user_repo(tmp_path, *HEALTHY)
    proc = run_pre_commit(repo, env, "try-repo", str(hook_repo[0]), "bnlint", "--files", *HEALTHY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"bnlint \(BatchNorm linter\)\.+Passed", proc.stdout), proc.stdout


# -- one shared environment: a project's .pre-commit-config.yaml and real `git commit`s ---------------


@pytest.fixture(scope="session")
def config_text(hook_repo: tuple[Path, str], env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The config a user would write; its environment is installed once for the session."""
    path, sha = hook_repo
    text = f"repos:\n  - repo: {json.dumps(str(path))}\n    rev: {sha}\n    hooks:\n      - id: bnlint\n"
    warm = tmp_path_factory.mktemp("warm")
    git(warm, "init", "-q")
    (warm / ".pre-commit-config.yaml").write_text(text)
    proc = run_pre_commit(warm, env, "install-hooks")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return text


def configured_repo(tmp_path: Path, config_text: str, *fixtures: str, extra: dict[str, str] | None = None) -> Path:
    repo = user_repo(tmp_path, *fixtures, extra={".pre-commit-config.yaml": config_text, **(extra or {})})
    return repo


def test_no_model_file_staged_skips_the_hook(tmp_path: Path, config_text: str, env: dict[str, str]) -> None:
    repo = configured_repo(tmp_path, config_text, extra={"README.md": "# no models here\n", "train.py": "print(1)\n"})
    proc = run_pre_commit(repo, env, "run", "--verbose")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(no files to check)Skipped" in proc.stdout
    assert "bnlint:" not in proc.stdout + proc.stderr  # the hook was not even started


def test_unrecognised_file_is_skipped_with_a_note(tmp_path: Path, config_text: str, env: dict[str, str]) -> None:
    repo = configured_repo(tmp_path, config_text, NOT_A_MODEL, extra={"lfs.onnx": "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"})
    proc = run_pre_commit(repo, env, "run", "--verbose")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{NOT_A_MODEL}: skipped" in proc.stdout and "lfs.onnx: skipped" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_git_commit_is_blocked_by_a_faulty_model_and_allowed_for_a_healthy_one(tmp_path: Path, config_text: str, env: dict[str, str]) -> None:
    repo = configured_repo(tmp_path, config_text, *HEALTHY)
    assert run_pre_commit(repo, env, "install").returncode == 0
    commit = ["git", *GIT_IDENTITY, "commit", "-q", "-m", "models"]
    ok = subprocess.run(commit, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    shutil.copy2(FIXTURES / FAULTY, repo / FAULTY)
    git(repo, "add", FAULTY)
    blocked = subprocess.run(commit, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert blocked.returncode != 0 and "BN101" in blocked.stdout + blocked.stderr
    assert FAULTY not in git(repo, "ls-tree", "-r", "--name-only", "HEAD")


def test_hook_on_healthy_fixtures_is_fast_when_warm(tmp_path: Path, config_text: str, env: dict[str, str]) -> None:
    repo = configured_repo(tmp_path, config_text, *HEALTHY)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        proc = run_pre_commit(repo, env, "run", "--verbose")
        timings.append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    hook = [float(s) for s in re.findall(r"duration: ([\d.]+)s", proc.stdout)]
    print(f"pre-commit run on {len(HEALTHY)} healthy fixtures (warm): {min(timings):.2f} s wall; hook {hook} s")  # -rA shows it
    # Generous bound: the hook itself is well under a second on these files; this catches torch
    # (or another heavy import) creeping onto the static path, not machine noise.
    assert min(timings) < 20, timings


# -- file names that look like options (no environment needed: pre-commit's own command builder) -----


def test_hook_command_keeps_option_like_file_names_as_files(tmp_path: Path) -> None:
    """pre-commit runs `entry args... files...` (lang_base.hook_cmd, then xargs appends the files):
    the hook's default `args: [--]` makes `-omodel.pt` a file, never `-o model.pt`."""
    import yaml
    from pre_commit.lang_base import hook_cmd

    hook = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())[0]
    assert hook.get("args", [])[-1:] == ["--"]
    shutil.copy2(FIXTURES / "convnet_state_dict.pt", tmp_path / "model.pt")
    shutil.copy2(FIXTURES / FAULTY, tmp_path / "-omodel.pt")
    shutil.copy2(FIXTURES / FAULTY, tmp_path / "-o.onnx")
    command = [*hook_cmd(hook["entry"], hook["args"]), "-omodel.pt", "-o.onnx", "model.pt"]
    assert command[0] == "bnlint"
    bnlint = Path(sys.executable).parent / "bnlint"
    proc = subprocess.run([str(bnlint), *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # both hostile files linted: BN101
    assert "-omodel.pt:" in proc.stdout and "BN101" in proc.stdout
    assert (tmp_path / "model.pt").read_bytes() == (FIXTURES / "convnet_state_dict.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["-o.onnx", "-omodel.pt", "model.pt"]
