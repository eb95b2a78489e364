"""Dynamic analysis (--data): run the model on the user's sample and measure each BatchNorm layer.

Importing this package does not import torch or onnxruntime; `run_dynamic` loads whichever the
model needs. Entry point for the CLI:

    from bnlint.dynamic import DynamicOptions, run_dynamic
    result = run_dynamic(model_info, DynamicOptions(data="sample.npz"), config)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bnlint.dynamic.options import DYNAMIC_DEFAULTS, DynamicOptions, DynamicResult, parse_arch_kwargs, parse_inputs

if TYPE_CHECKING:
    from bnlint.config import Config
    from bnlint.model import ModelInfo

__all__ = ["DYNAMIC_DEFAULTS", "DynamicOptions", "DynamicResult", "parse_arch_kwargs", "parse_inputs", "run_dynamic"]


def run_dynamic(model: "ModelInfo", options: DynamicOptions, config: "Config", module: Any = None) -> DynamicResult:
    """Run `model` over `options.data` and return BN6xx findings plus per-layer statistics.

    `module`: the live nn.Module `model` describes (Python API); it runs on its own device.
    """
    from bnlint.dynamic.analysis import run_dynamic as run

    return run(model, options, config, module)


