"""Run the rules over a loaded model (and what running it measured) and turn hits into findings.

The engine owns selection (select/ignore/per-layer ignores) so rules never look at config flags
other than their thresholds. Every rule runs once per model: layer rules once per BN layer, model
rules once, dynamic rules once when there are measurements.
"""

from __future__ import annotations

from typing import Iterable

from bnlint.context import RuleContext
from bnlint.findings import Finding
from bnlint.rules import RuleSpec, all_rules
from bnlint.rules.registry import Hit


def _layer_names(ctx: RuleContext, layer: str) -> tuple[str, ...]:
    """A layer's name and aliases (a per-layer ignore may name either)."""
    found = ctx.model.layer(layer)
    return found.names() if found is not None else (layer,)


# The tensor a layer finding points at in the file, first known first.
_REGION_TENSORS = ("running_var", "running_mean", "weight", "bias")


def _region(ctx: RuleContext, layer: str | None) -> tuple[int, int] | None:
    """Where the layer's statistics lie in the file, when the loader knows (torch, safetensors, Caffe)."""
    found = ctx.model.layer(layer) if layer is not None else None
    if found is None:
        return None
    for role in _REGION_TENSORS:
        ref = found.tensors.get(role)
        where = getattr(ref, "byte_range", None) if ref is not None else None
        if where is not None:
            return (int(where[0]), int(where[1]))
    return None


def _findings(spec: RuleSpec, hits: Iterable[Hit], ctx: RuleContext) -> list[Finding]:
    found = []
    for hit in hits:
        if hit.layer is not None and any(ctx.config.layer_ignored(name, spec.code) for name in _layer_names(ctx, hit.layer)):
            continue
        found.append(
            Finding(
                code=spec.code,
                severity=hit.severity or spec.severity,
                path=ctx.model.path,
                layer=hit.layer,
                message=hit.message,
                values=dict(hit.values),
                region=_region(ctx, hit.layer),
            )
        )
    return found


def run_rules(ctx: RuleContext) -> list[Finding]:
    """Every enabled rule; dynamic rules only when the context has measurements. Sorted findings."""
    findings: list[Finding] = []
    for spec in all_rules().values():
        if not ctx.config.code_enabled(spec.code):
            continue
        if spec.scope == "layer":
            for layer in ctx.model.layers:
                findings.extend(_findings(spec, spec.check(layer, ctx), ctx))
        elif spec.scope == "model":
            findings.extend(_findings(spec, spec.check(ctx.model, ctx), ctx))
        elif ctx.measurements is not None:
            findings.extend(_findings(spec, spec.check(ctx.measurements, ctx), ctx))
    findings.sort(key=lambda f: f.sort_key())
    return findings
