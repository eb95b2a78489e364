"""Dynamic analysis (--data): run the model on the user's sample and measure each BatchNorm layer.

Importing this package does not import torch or onnxruntime; `measure` loads whichever the model
needs. Measuring and judging are separate: `measure` returns `bnlint.measurements.Measurements`
and the engine runs the BN6xx rules over them with the static rules (bnlint.api does both).

    from bnlint.dynamic import DynamicOptions, measure
    measured = measure(model_info, DynamicOptions(data="sample.npz"), config)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnlint.dynamic.options import DynamicOptions, parse_arch_kwargs, parse_inputs
from bnlint.settings import DYNAMIC_DEFAULTS

if TYPE_CHECKING:  # only annotations: importing these at run time would import numpy-heavy modules early
    from bnlint.config import Config
    from bnlint.findings import Finding
    from bnlint.measurements import Measurements
    from bnlint.model import ModelInfo

__all__ = ["DYNAMIC_DEFAULTS", "DynamicOptions", "DynamicResult", "measure", "parse_arch_kwargs", "parse_inputs", "run_dynamic"]


def measure(model: ModelInfo, options: DynamicOptions, config: Config, module: Any = None, runner: Any = None) -> Measurements:
    """Run `model` over `options.data` and measure every BatchNorm layer (see analysis.measure).

    `module`: the live nn.Module `model` describes (Python API); it runs on its own device.
    `runner`: one analysis.open_runner already opened for `model` (bnlint fix reuses it).
    """
    from bnlint.dynamic.analysis import measure as run

    return run(model, options, config, module, runner)


@dataclass
class DynamicResult:
    """The dynamic part of a lint, on its own: BN6xx findings plus what was measured."""

    findings: list[Finding] = field(default_factory=list)
    layer_stats: list[dict[str, Any]] = field(default_factory=list)
    engine: str = ""
    samples: int = 0
    notes: list[str] = field(default_factory=list)
    batch_dependence: dict[str, Any] | None = None


def run_dynamic(model: ModelInfo, options: DynamicOptions, config: Config, module: Any = None) -> DynamicResult:
    """`measure`, then only the dynamic rules (tests and benchmarks; bnlint.api runs every rule at once)."""
    from bnlint.context import RuleContext
    from bnlint.engine import run_rules
    from bnlint.rules import all_rules

    measured = measure(model, options, config, module)
    dynamic = {code for code, spec in all_rules().items() if spec.scope == "dynamic"}
    findings = [f for f in run_rules(RuleContext(model, config, measurements=measured)) if f.code in dynamic]
    return DynamicResult(findings, measured.layer_stats, measured.engine, measured.samples, measured.notes,
                         None if measured.dependence is None else measured.dependence.record())
