"""How `bnlint fix` reports: the before/after table per layer (mean |SMD|, mean KL), the first
drifting layer before and after, what was done and written. Text, JSON and SARIF; reshapes only."""

from __future__ import annotations

import json
from typing import Any

from bnlint.report._common import json_safe, printable


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def render_text(outcome: Any) -> str:
    lines = [f"{printable(outcome.model)}: {action}" for action in outcome.actions]
    if outcome.layers:
        header = ["layer", "mean|SMD| before", "after", "mean KL before", "after"]
        rows = [[printable(r["layer"]), _num(r["mean_abs_smd_before"]), _num(r["mean_abs_smd_after"]),
                 _num(r["mean_kl_before"]), _num(r["mean_kl_after"])] for r in outcome.layers]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  " + "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]))
        lines.append(f"first drifting layer: {outcome.first_drift_before or 'none'} -> "
                     f"{outcome.first_drift_after or 'none'}" if outcome.after is not None else
                     f"first drifting layer: {outcome.first_drift_before or 'none'} (dry run: nothing written)")
    for layer, why in outcome.refused.items():
        lines.append(f"{printable(outcome.model)}:{printable(layer)}: left alone: {printable(why)}")
    lines.extend(f"{printable(outcome.model)}: note: {printable(note)}" for note in outcome.notes)
    lines.append(f"wrote {printable(outcome.output)}" if outcome.output else "dry run: nothing written")
    return "".join(line + "\n" for line in lines)


def render_json(outcome: Any, tool_version: str) -> str:
    from bnlint.report.json_report import JSON_VERSION

    document = {"version": JSON_VERSION, "tool": {"name": "bnlint", "version": tool_version}, "fix": json_safe(outcome.record())}
    from bnlint.report._common import json_text

    return json.dumps(json_text(document), indent=2, allow_nan=False, ensure_ascii=True) + "\n"


def render_sarif(outcome: Any, tool_version: str) -> str:
    """The linter's SARIF for the fixed model (or the input on a dry run), with the before/after
    table in the run's properties (`bnlint.fix`)."""
    from bnlint.report import dump_json
    from bnlint.report.sarif import to_dict
    from bnlint.rules import all_rules

    report = outcome.after if outcome.after is not None else outcome.before
    from bnlint.findings import Report

    document = to_dict(report or Report(), all_rules(), tool_version)
    document["runs"][0].setdefault("properties", {})["bnlint.fix"] = json_safe(outcome.record())
    return dump_json(document)


def render_fix(outcome: Any, fmt: str, *, tool_version: str) -> str:
    if fmt == "json":
        return render_json(outcome, tool_version)
    if fmt == "sarif":
        return render_sarif(outcome, tool_version)
    from bnlint.report._common import no_surrogates

    return no_surrogates(render_text(outcome))
