"""bnlint: a BatchNorm linter for PyTorch and ONNX models.

Importing bnlint is cheap: torch, onnx, h5py and keras are imported only by the code that needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from bnlint.findings import Report


def lint(path_or_module: Any, data: Any = None, config: Any = None, **options: Any) -> "Report":
    """Lint a model file, folder, or live nn.Module; see bnlint.api.lint."""
    from bnlint.api import lint as _lint

    return _lint(path_or_module, data=data, config=config, **options)


_GUARD_NAMES = ("BatchNormGuard", "BnlintGuardError", "BnlintWarning", "guard")


def __getattr__(name: str) -> Any:
    """The training-loop guard, imported on first use (the CLI never needs it)."""
    if name in _GUARD_NAMES:
        from bnlint import training_guard

        return getattr(training_guard, name)
    raise AttributeError(f"module 'bnlint' has no attribute {name!r}")


__all__ = ["BatchNormGuard", "BnlintGuardError", "BnlintWarning", "guard", "lint", "__version__"]
