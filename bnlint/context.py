"""What a rule is given: the model, the configuration, and optional extra facts.

It sits below the rules (rules import it; the engine builds it), so no import cycle needs hiding.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnlint.config import Config
from bnlint.measurements import Measurements
from bnlint.model import ModelInfo


@dataclass(frozen=True)
class RuleContext:
    model: ModelInfo
    config: Config
    reference: ModelInfo | None = None  # --reference: the checkpoint fine-tuning started from (BN407)
    measurements: Measurements | None = None  # --data: what running the model measured (BN6xx)
