"""What running the model on data measured: the facts the dynamic (BN6xx) rules judge.

Measuring and judging are separate steps: `bnlint.dynamic.analysis.measure` fills these (layer
names are the static loader's, so per-layer ignores and baselines match static and dynamic
findings alike), and the engine runs every rule once over the static model plus these.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnlint.dynamic.metrics import LayerDrift


@dataclass
class BatchDependence:
    """Outputs of samples run one at a time versus together (eval mode must not care)."""

    samples: int
    max_abs_diff: float
    relative_diff: float
    layers: list[dict[str, Any]] = field(default_factory=list)  # BN layers whose output changes while their input does not
    skipped: str | None = None  # why the comparison could not vary the batch
    method: str = "alone"  # "alone": each sample alone vs all together; "mates": one sample with two sets of batch mates

    def record(self) -> dict[str, Any]:
        return {"samples": self.samples, "max_abs_diff": self.max_abs_diff, "relative_diff": self.relative_diff,
                "layers": self.layers, "skipped": self.skipped, "method": self.method}


@dataclass
class Measurements:
    """Per-layer statistics of one run over the data, plus how the run went."""

    layers: list[LayerDrift]  # in execution order, named like ModelInfo.layers
    samples: int
    settings: dict[str, Any]  # the [tool.bnlint.dynamic] thresholds in force
    engine: str  # e.g. "torch 2.13.0 (cpu, TorchScript)"
    train_batch_size: int | None
    train_batch_source: str | None
    dependence: BatchDependence | None
    batch_stats_layers: list[str]  # layers known to normalise with batch statistics at inference
    after_stochastic: list[str] = field(default_factory=list)  # layers with dropout / stochastic depth before them
    layer_stats: list[dict[str, Any]] = field(default_factory=list)  # JSON-able, one per measured layer
    notes: list[str] = field(default_factory=list)
