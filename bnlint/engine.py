"""Run the rules over a loaded model and turn their hits into findings.

The engine owns selection (select/ignore/per-layer ignores) so rules never look at config flags
other than their thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from bnlint.config import Config
from bnlint.findings import Finding
from bnlint.model import ModelInfo
from bnlint.rules import RuleSpec, all_rules
from bnlint.rules.registry import Hit


@dataclass(frozen=True)
class RuleContext:
    model: ModelInfo
    config: Config
    # Optional extras: a reference model (--reference) for BN407, dynamic analysis results.
    reference: ModelInfo | None = None


def _findings(spec: RuleSpec, hits: Iterable[Hit], ctx: RuleContext) -> list[Finding]:
    found = []
    for hit in hits:
        if ctx.config.layer_ignored(hit.layer, spec.code):
            continue
        found.append(
            Finding(
                code=spec.code,
                severity=hit.severity or spec.severity,
                path=ctx.model.path,
                layer=hit.layer,
                message=hit.message,
                values=dict(hit.values),
            )
        )
    return found


def run_rules(ctx: RuleContext, scopes: tuple[str, ...] = ("layer", "model"), subject: Any = None) -> list[Finding]:
    """Every enabled rule of the given scopes; layer rules once per BN layer, in layer order."""
    findings: list[Finding] = []
    for spec in all_rules().values():
        if spec.scope not in scopes or not ctx.config.code_enabled(spec.code):
            continue
        if spec.scope == "layer":
            for layer in ctx.model.layers:
                findings.extend(_findings(spec, spec.check(layer, ctx), ctx))
        elif spec.scope == "model":
            findings.extend(_findings(spec, spec.check(ctx.model, ctx), ctx))
        else:
            findings.extend(_findings(spec, spec.check(subject, ctx), ctx))
    return findings
