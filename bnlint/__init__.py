"""bnlint: a BatchNorm linter for PyTorch, ONNX, Keras and Caffe model files.

Importing bnlint is cheap: torch, onnx, h5py and keras are imported only by the code that needs them.
The training-loop guard and `bnlint.testing` are imported on first use (module `__getattr__`).
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

if _typing.TYPE_CHECKING:
    from bnlint import testing
    from bnlint.findings import Report
    from bnlint.training_guard import BatchNormGuard, BnlintGuardError, BnlintWarning, guard


def lint(path_or_module: _typing.Any, data: _typing.Any = None, config: _typing.Any = None, **options: _typing.Any) -> "Report":
    """Lint a model file, folder, or live nn.Module; see bnlint.api.lint."""
    from bnlint.api import lint as _lint

    return _lint(path_or_module, data=data, config=config, **options)


_GUARD_NAMES = ("BatchNormGuard", "BnlintGuardError", "BnlintWarning", "guard")
# Submodules reachable as attributes after a plain `import bnlint` (bnlint.testing.assert_bn_healthy).
_LAZY_MODULES = ("testing",)

__all__ = ["BatchNormGuard", "BnlintGuardError", "BnlintWarning", "guard", "lint", "testing", "__version__"]


def __getattr__(name: str) -> _typing.Any:
    """The training-loop guard and `bnlint.testing`, imported on first use (the CLI never needs them)."""
    if name in _GUARD_NAMES:
        guard_module = _importlib.import_module("bnlint.training_guard")
        return getattr(guard_module, name)
    if name in _LAZY_MODULES:
        return _importlib.import_module(f"bnlint.{name}")
    raise AttributeError(f"module 'bnlint' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API only (not the typing helpers this module happens to import)."""
    return sorted(__all__)
