"""The one place rules are declared: `@rule(...)` on a check function is the only registration.

A rule's docstring is its documentation page, with ruff's headings (What it does / Why is this
bad? / Example / Use instead / References); `bnlint rule CODE` prints it and SARIF carries it.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping

from bnlint.findings import Severity

Scope = Literal["layer", "model", "dynamic"]

DOC_HEADINGS = ("## What it does", "## Why is this bad?", "## Example", "## Use instead", "## References")

# Families by hundreds; codes are stable once published.
FAMILIES: dict[str, str] = {
    "BN0": "meta: file safety, coverage",
    "BN1": "statistics health",
    "BN2": "storage",
    "BN3": "configuration",
    "BN4": "mode mismatches",
    "BN5": "graph structure",
    "BN6": "dynamic analysis (needs --data)",
}


@dataclass(frozen=True)
class Hit:
    """What a check yields; the engine adds code, path and default severity to make a Finding."""

    message: str
    layer: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)
    severity: Severity | None = None  # override the rule's default (e.g. error vs warning by magnitude)




@dataclass(frozen=True)
class RuleSpec:
    code: str
    name: str
    severity: Severity
    summary: str
    fix: str
    scope: Scope
    check: Callable[..., Iterable[Hit]]
    doc: str
    # The facts this rule reads beyond statistics and settings (bnlint.formats.FACTS): the rule
    # applies to the frameworks whose formats record them (README's rule table is computed).
    reads: tuple[str, ...] = ()

    @property
    def frameworks(self) -> tuple[str, ...]:
        """The frameworks whose loaders record every fact this rule reads."""
        from bnlint.formats import facts_of, frameworks

        return tuple(name for name in frameworks() if set(self.reads) <= facts_of(name))

    @property
    def family(self) -> str:
        return FAMILIES.get(self.code[:3], "")


_REGISTRY: dict[str, RuleSpec] = {}
_CODE = re.compile(r"^BN\d{3}$")


CheckFn = Callable[..., Iterable[Hit]]


def rule(*, code: str, name: str, severity: Severity, summary: str, fix: str, scope: Scope = "layer",
         reads: tuple[str, ...] = ()) -> Callable[[CheckFn], CheckFn]:
    """Register a check. Layer rules get (layer, ctx); model rules (model, ctx); dynamic rules (measurements, ctx)."""

    def register(check: CheckFn) -> CheckFn:
        if not _CODE.match(code):
            raise ValueError(f"bad rule code {code!r}")
        from bnlint.formats import FACTS

        if set(reads) - set(FACTS):
            raise ValueError(f"rule {code} reads unknown facts {sorted(set(reads) - set(FACTS))}")
        if code in _REGISTRY and _REGISTRY[code].check.__qualname__ != check.__qualname__:
            raise ValueError(f"duplicate rule code {code}")
        _REGISTRY[code] = RuleSpec(
            code=code,
            name=name,
            severity=severity,
            summary=summary,
            fix=fix,
            scope=scope,
            check=check,
            doc=inspect.cleandoc(check.__doc__ or ""),
            reads=reads,
        )
        return check

    return register


def registered() -> dict[str, RuleSpec]:
    return _REGISTRY
