"""Which rules a run selects: rule names resolved to codes and every code checked against the rules.

This sits above both `bnlint.config` (which reads settings and knows no rule) and `bnlint.rules`
(whose checks read the config): the CLI and the Python API resolve a Config here before linting,
so a misspelt code (BN1O1) or name is a UsageError with the closest match, never a linter that
silently checks nothing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from bnlint.config import Config
from bnlint.errors import UsageError
from bnlint.rules import all_rules, code_for, did_you_mean


def rule_codes(tokens: Iterable[str], where: str) -> tuple[str, ...]:
    """Rule codes, prefixes or rule names (`frozen-bn-in-train-mode`) as codes; an unknown name is a
    UsageError naming `where` and the closest rule."""
    codes: list[str] = []
    for raw in tokens:
        token = raw.strip()
        if not token:
            continue
        if token[:2].upper() == "BN" and not any(c in token for c in "-_"):  # spelled as a code: checked by resolve
            codes.append(token.upper())
            continue
        code = code_for(token)
        if code is None:
            raise UsageError(f"{where}: unknown rule name {token!r}{did_you_mean(token)} (see `bnlint rules`)")
        codes.append(code)
    return tuple(codes)


def resolve(config: Config) -> Config:
    """The config with names resolved to codes; every code or prefix must name a rule."""
    where = f"{config.source}: " if config.source else ""
    resolved = replace(
        config,
        select=rule_codes(config.select, f"{where}select"),
        ignore=rule_codes(config.ignore, f"{where}ignore"),
        per_layer_ignores={glob: rule_codes(codes, f"{where}per-layer-ignores: {glob}") for glob, codes in config.per_layer_ignores.items()},
    )
    codes = list(all_rules())
    for kind, prefixes in (("select", resolved.select), ("ignore", resolved.ignore),
                           *(("per-layer-ignores", p) for p in resolved.per_layer_ignores.values())):
        for prefix in prefixes:
            if not any(code.startswith(prefix) for code in codes):
                raise UsageError(f"{where}{kind}: unknown rule code or prefix {prefix!r}{did_you_mean(prefix)} (see `bnlint rules`)")
    return resolved
