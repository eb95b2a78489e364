"""What running the model on data measured: the facts the dynamic (BN6xx) rules judge.

Measuring and judging are separate steps: `bnlint.dynamic.analysis.measure` fills these (layer
names are the static loader's, so per-layer ignores and baselines match static and dynamic
findings alike), and the engine runs every rule once over the static model plus these.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Jackknife groups of the streaming statistics (bnlint.dynamic.stats): also the fewest samples a
# layer needs before its drift can be judged (one per group).
GROUPS = 8


@dataclass
class LayerDrift:
    """Every number the dynamic rules and the JSON output need about one layer."""

    name: str
    order: int  # execution (graph) order: drift onset is the first drifting layer in this order
    channels: int
    eps: float
    samples: int
    values_per_sample: int
    mean_t: np.ndarray
    var_t: np.ndarray
    has_running_stats: bool
    per_channel: dict[str, np.ndarray] = field(default_factory=dict)  # smd, lvr, kl, w2, se_smd, se_lvr
    summary: dict[str, float | None] = field(default_factory=dict)
    batch_size: int | None = None
    batch_noise: dict[str, Any] = field(default_factory=dict)
    calls_per_forward: int = 1

    @property
    def values_per_batch(self) -> int | None:
        """Values per channel BatchNorm would see in one training batch of `batch_size` samples."""
        return None if self.batch_size is None else self.batch_size * self.values_per_sample




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
