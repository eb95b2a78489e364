"""Rule modules, one family each. Importing them registers their rules."""

from __future__ import annotations

import importlib

from bnlint.rules.registry import FAMILIES, Hit, RuleSpec, registered, rule

_MODULES = ("meta", "stats", "storage", "configuration", "modes", "graph", "dynamic")


def all_rules() -> dict[str, RuleSpec]:
    """Every rule, by code, sorted. Rule modules are imported on first use (none imports torch)."""
    for module in _MODULES:
        importlib.import_module(f"bnlint.rules.{module}")
    return dict(sorted(registered().items()))


__all__ = ["FAMILIES", "Hit", "RuleSpec", "all_rules", "rule"]
