"""A pytest helper for users' own test suites: fail a test when a model has BatchNorm problems.

    from bnlint.testing import assert_bn_healthy

    def test_exported_model_is_healthy():
        assert_bn_healthy("artifacts/model.onnx")

    def test_model_after_finetuning(model):          # a live nn.Module works too
        assert_bn_healthy(model, fail_on="error")

Plain ``assert``-style: raises AssertionError (so pytest shows it as a test failure, not an
error), and hides its own frame from pytest's traceback.
"""

from __future__ import annotations

import os
from typing import Any

from bnlint.config import Config, load_config
from bnlint.findings import Report, Severity
from bnlint.selection import resolve


def assert_bn_healthy(
    model_or_path: Any,
    data: str | os.PathLike[str] | None = None,
    *,
    fail_on: str | None = None,
    config: Config | str | os.PathLike[str] | None = None,
    **options: Any,
) -> Report:
    """Lint ``model_or_path`` (file, folder, list of paths, or live ``nn.Module``) and assert it is clean.

    ``fail_on``: "error", "warning", "info" or "never" (only unreadable files fail); None uses
    the configuration's ``fail-on`` (default "warning"). ``config``: a Config, a TOML file, or
    None for the nearest ``pyproject.toml``/``bnlint.toml`` from the working directory — the
    same settings (select, ignore, per-layer ignores, thresholds) the CLI would use.
    ``data`` and ``options`` (batch_size, arch, reference, ...) are passed to ``bnlint.lint``.
    Returns the Report when the assertion holds, for further checks.
    """
    __tracebackhide__ = True  # pytest: show the caller's line, not this helper's internals
    from bnlint.api import lint

    if not isinstance(config, Config):
        config = load_config(config)
    if fail_on is not None:
        fail_on = fail_on.lower()
        if fail_on not in ("error", "warning", "info", "never"):
            raise ValueError(f"fail_on must be 'error', 'warning', 'info' or 'never', got {fail_on!r}")
        config = config.with_overrides(fail_on=fail_on)
    config = resolve(config)  # a misspelt code in select/ignore would silently pass every model, as in the CLI
    report = lint(model_or_path, data=data, config=config, **options)
    level = config.fail_level()
    failing = [f for f in report.findings if level is not None and f.severity >= level]
    problems = [f"{e.path}: cannot lint: {e.message}" for e in report.errors]
    problems += [f"{f.path}: {f.layer or '<model>'}: {f.code} [{f.severity.label}] {f.message}" for f in failing]
    if problems:
        threshold = f"at or above {Severity(level).label}" if level is not None else "unreadable input"
        raise AssertionError(f"bnlint: {len(problems)} problem(s) {threshold}:\n  " + "\n  ".join(problems))
    return report
