"""The GitHub Action's logic (action.yml runs `python -m bnlint._action`): lint the model files a
pull request or push changed, write SARIF for code scanning, annotate the run, exit like bnlint.

Inputs come from the environment (action.yml maps its inputs there, never into the script text):

    BNLINT_PATHS       files or folders to lint instead of the changed files, one per line
    BNLINT_ARGS        extra `bnlint check` arguments, shell-quoted (e.g. `--ignore BN505 --config ci.toml`)
    BNLINT_FAIL_ON     error | warning | info | never (default warning)
    BNLINT_SARIF_FILE  where the SARIF goes (default bnlint.sarif)
    BNLINT_BASE        commit to diff against (default: the pull request's base, or the push's `before`)

Exit codes are bnlint's: 0 clean, 1 findings at or above fail-on, 2 bad usage or an unreadable
file. Changed files come from `git diff -z` (names are bytes between NULs: spaces, quotes and
newlines stay in the name) and reach bnlint after `--`, so `-o.pt` is a file, not an option.
The model extensions are bnlint's own list (bnlint.loaders.MODEL_EXTENSIONS), read at run time.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

# Settings files: a change there can change the findings of every model, so everything is linted.
SETTINGS_FILES = ("pyproject.toml", "bnlint.toml")
FAIL_ON = ("error", "warning", "info", "never")
_NO_COMMIT = "0" * 40  # a push that created the branch has no `before`


class ActionError(Exception):
    """Bad input to the action: one line, exit 2."""


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=300, check=False)


def _has_commit(sha: str, cwd: Path) -> bool:
    return _git("cat-file", "-e", f"{sha}^{{commit}}", cwd=cwd).returncode == 0


def base_commit(env: Mapping[str, str]) -> str | None:
    """The commit the changes are measured from: BNLINT_BASE, the pull request's base, or the push's
    `before`. None when there is none (a new branch, a scheduled or manual run): lint everything."""
    if env.get("BNLINT_BASE", "").strip():
        return env["BNLINT_BASE"].strip()
    event_path = env.get("GITHUB_EVENT_PATH")
    if not event_path:
        return None
    try:
        event = json.loads(Path(event_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = env.get("GITHUB_EVENT_NAME", "")
    sha: object = None
    if name.startswith("pull_request") or name == "merge_group":
        sha = (event.get("pull_request") or {}).get("base", {}).get("sha") or (event.get("merge_group") or {}).get("base_sha")
    elif name == "push":
        sha = event.get("before")
    return sha if isinstance(sha, str) and sha and sha != _NO_COMMIT else None


def changed_files(base: str, cwd: Path) -> list[str]:
    """Files added, copied, modified or renamed since `base` (deleted ones cannot be linted). The base
    is fetched first when the checkout is shallow (actions/checkout fetches one commit by default)."""
    if not _has_commit(base, cwd):
        _git("fetch", "--no-tags", "--quiet", "--depth=1", "origin", base, cwd=cwd)
    if not _has_commit(base, cwd):
        raise ActionError(f"cannot find the base commit {base} (fetch more history, e.g. actions/checkout with fetch-depth: 0)")
    done = _git("diff", "--name-only", "-z", "--no-renames", "--diff-filter=d", base, "HEAD", "--", cwd=cwd)
    if done.returncode != 0:
        raise ActionError(f"git diff {base} HEAD failed: {done.stderr.decode(errors='replace').strip()[:200]}")
    return [os.fsdecode(name) for name in done.stdout.split(b"\0") if name]


def model_files(names: Sequence[str]) -> list[str]:
    """The names bnlint reads as models (its own extension list, case-insensitive), in order."""
    from bnlint.loaders import is_model_file

    return [name for name in names if is_model_file(name)]


def select_targets(env: Mapping[str, str], cwd: Path) -> tuple[list[str], str]:
    """What to lint, and why (for the log)."""
    explicit = [line.strip() for line in env.get("BNLINT_PATHS", "").splitlines() if line.strip()]
    if explicit:
        return explicit, "the paths input"
    base = base_commit(env)
    if base is None:
        return ["."], "every model file (no base commit to compare with)"
    changed = changed_files(base, cwd)
    if any(Path(name).name in SETTINGS_FILES for name in changed):
        return ["."], "every model file (a settings file changed)"
    return model_files(changed), f"the model files changed since {base[:12]}"


def empty_sarif(path: Path) -> None:
    """bnlint's SARIF for no files: code scanning then records a clean analysis."""
    from bnlint import __version__
    from bnlint.findings import Report
    from bnlint.report import dump_json
    from bnlint.report.sarif import to_dict
    from bnlint.rules import all_rules

    path.write_text(dump_json(to_dict(Report(), all_rules(), __version__)), encoding="utf-8")


def _output(env: Mapping[str, str], **values: str) -> None:
    target = env.get("GITHUB_OUTPUT")
    if not target:
        return
    with open(target, "a", encoding="utf-8") as handle:
        for key, value in values.items():  # the multi-line form: a path may hold any character but NUL
            handle.write(f"{key}<<BNLINT_{os.getpid()}\n{value}\nBNLINT_{os.getpid()}\n")


def run(env: Mapping[str, str], cwd: Path) -> int:
    """Lint, write the SARIF, return bnlint's exit code."""
    fail_on = env.get("BNLINT_FAIL_ON", "").strip().lower() or "warning"
    if fail_on not in FAIL_ON:
        raise ActionError(f"fail-on: expected one of {', '.join(FAIL_ON)}, got {fail_on!r}")
    sarif = Path(env.get("BNLINT_SARIF_FILE", "").strip() or "bnlint.sarif")
    if not sarif.is_absolute():
        sarif = cwd / sarif
    try:
        extra = shlex.split(env.get("BNLINT_ARGS", ""))
    except ValueError as exc:
        raise ActionError(f"args: {exc}") from None
    targets, why = select_targets(env, cwd)
    sarif.unlink(missing_ok=True)  # a SARIF left by an earlier step must not pass for this run's
    _output(env, **{"sarif-file": str(sarif), "files": str(len(targets))})
    if not targets:
        print(f"bnlint: nothing to lint ({why}: none)", flush=True)
        empty_sarif(sarif)
        _output(env, **{"sarif-written": "true"})
        return 0
    print(f"bnlint: linting {why}: {len(targets)} path(s)", flush=True)
    command = [sys.executable, "-m", "bnlint", "check", "--skip-unrecognised", "--fail-on", fail_on, *extra]
    # Annotations on the run and the pull request; this run's exit code is the action's.
    annotated = subprocess.run([*command, "--format", "github", "--", *targets], cwd=cwd, check=False)
    # The same findings as SARIF for code scanning: never fails on findings (the first run decided).
    written = subprocess.run([*command, "--exit-zero", "--quiet", "--format", "sarif", "--output", str(sarif), "--", *targets],
                             cwd=cwd, check=False, stdout=subprocess.DEVNULL)
    _output(env, **{"sarif-written": "true" if sarif.is_file() else "false"})
    if not sarif.is_file():
        print(f"bnlint: no SARIF written (exit code {written.returncode})", file=sys.stderr, flush=True)
        return annotated.returncode or 2
    return annotated.returncode


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv:
        print("usage: python -m bnlint._action (settings come from BNLINT_* environment variables; see its docstring)",
              file=sys.stderr)
        return 2
    try:
        return run(os.environ, Path.cwd())
    except ActionError as exc:
        print(f"bnlint: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
