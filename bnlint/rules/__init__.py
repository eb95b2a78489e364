"""Rule modules, one family each. Importing them registers their rules."""

from __future__ import annotations

import difflib
import importlib
import re

from bnlint.rules.registry import FAMILIES, Hit, RuleSpec, registered, rule

_MODULES = ("meta", "stats", "storage", "configuration", "modes", "graph", "dynamic")


def all_rules() -> dict[str, RuleSpec]:
    """Every rule, by code, sorted. Rule modules are imported on first use (none imports torch)."""
    for module in _MODULES:
        importlib.import_module(f"bnlint.rules.{module}")
    return dict(sorted(registered().items()))


_CODE_PREFIX = re.compile(r"^BN\d{0,3}$", re.IGNORECASE)


def _name_key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def is_code_prefix(token: str) -> bool:
    """`BN`, `BN4`, `bn403`: spelled like a rule code or prefix (whether or not a rule has it)."""
    return bool(_CODE_PREFIX.match(token.strip()))


def code_for(token: str) -> str | None:
    """The code or prefix that a rule code, prefix or rule NAME stands for (case-insensitive, `_` for `-`):
    `frozen-bn-in-train-mode` -> BN403, `bn4` -> BN4. None for a name no rule has. The one place names map to codes."""
    token = token.strip()
    if is_code_prefix(token):
        return token.upper()
    key = _name_key(token)
    return next((spec.code for spec in all_rules().values() if spec.name == key), None)


def did_you_mean(token: str) -> str:
    """` (did you mean 'BN403'?)` for a misspelt rule code or name, else ''."""
    specs = all_rules().values()
    if is_code_prefix(token) or (token.strip()[:2].upper() == "BN" and not any(c in token for c in "-_")):
        code = token.strip().upper()
        digits = "BN" + code[2:].replace("O", "0").replace("I", "1").replace("L", "1")  # BN1O1: a letter O for a zero
        matches = [digits] if digits != code and any(s.code.startswith(digits) for s in specs) else []
        matches = matches or difflib.get_close_matches(code, [s.code for s in specs], n=1, cutoff=0.6)
    else:
        names = [s.name for s in specs]
        matches = difflib.get_close_matches(_name_key(token), names, n=1, cutoff=0.6)
        matches = matches or [n for n in names if n.startswith(_name_key(token))][:1]  # `frozen-bn` -> frozen-bn-in-train-mode
    return f" (did you mean {matches[0]!r}?)" if matches else ""


__all__ = ["FAMILIES", "Hit", "RuleSpec", "all_rules", "code_for", "did_you_mean", "is_code_prefix", "rule"]
