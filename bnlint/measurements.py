"""What running the model on data measured: the facts the dynamic (BN6xx) rules judge.

Measuring and judging are separate steps: `bnlint.dynamic.analysis.measure` fills these (layer
names are the static loader's, so per-layer ignores and baselines match static and dynamic
findings alike), and the engine runs every rule once over the static model plus these.
Torch-free. Every class here crosses the sandbox as data (bnlint.sandbox.codec checks each field
against its annotation), so fields use only the types the codec knows: numbers, str, bool,
None, numpy arrays, lists and these dataclasses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from bnlint.settings import DynamicThresholds

# Jackknife groups of the streaming statistics (bnlint.dynamic.stats): also the fewest samples a
# layer needs before its drift can be judged (one per group).
GROUPS = 8


@dataclass(frozen=True)
class ChannelMetrics:
    """Per-channel drift of one layer's data from its stored statistics (bnlint.dynamic.metrics)."""

    smd: np.ndarray  # (mean_t - running_mean) / sqrt(running_var + eps)
    lvr: np.ndarray  # ln((var_t + eps) / (running_var + eps))
    kl: np.ndarray  # Gaussian KL(target || stored)
    w2: np.ndarray  # 2-Wasserstein distance in units of the stored scale
    se_smd: np.ndarray  # jackknife standard errors of smd and lvr (NaN with one group)
    se_lvr: np.ndarray

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) in the JSON output's order."""
        for name in ("smd", "lvr", "kl", "w2", "se_smd", "se_lvr"):
            yield name, getattr(self, name)


@dataclass(frozen=True)
class DriftSummary:
    """One layer's drift in a few numbers. None: not computed (no stored statistics, no finite
    channel, one jackknife group); `record()` leaves out what today's JSON leaves out."""

    groups: int  # non-empty jackknife groups
    effective_n: float | None = None  # median per-channel effective sample size
    # With stored statistics (else all None):
    nonfinite_channels: int | None = None
    mean_kl: float | None = None
    max_kl: float | None = None
    noise_kl: float | None = None  # the KL the sample's own noise shows with no drift
    kl_se: float | None = None  # jackknife standard error of mean_kl
    # Over the finite channels (None when there is none):
    mean_abs_smd: float | None = None
    max_abs_smd: float | None = None
    mean_abs_lvr: float | None = None
    max_abs_lvr: float | None = None
    mean_w2: float | None = None
    max_channel: int | None = None  # the channel of max_kl
    weighted: bool = False  # a gamma per channel was known: gamma_weighted_kl was computed (None: all gammas 0)
    gamma_weighted_kl: float | None = None

    @property
    def compared(self) -> bool:
        """Whether the layer's data was compared with stored statistics at all."""
        return self.nonfinite_channels is not None

    def record(self) -> dict[str, float | None]:
        """The summary as the JSON output has always written it (counts as floats, absent keys absent)."""
        out: dict[str, float | None] = {"groups": float(self.groups), "effective_n": self.effective_n}
        if not self.compared:
            return out
        if self.mean_abs_smd is None:
            out.update(mean_kl=None, max_kl=None, nonfinite_channels=_float(self.nonfinite_channels))
        else:
            out.update(mean_abs_smd=self.mean_abs_smd, max_abs_smd=self.max_abs_smd, mean_abs_lvr=self.mean_abs_lvr,
                       max_abs_lvr=self.max_abs_lvr, mean_kl=self.mean_kl, max_kl=self.max_kl, mean_w2=self.mean_w2,
                       max_channel=_float(self.max_channel), nonfinite_channels=_float(self.nonfinite_channels))
            if self.weighted:
                out["gamma_weighted_kl"] = self.gamma_weighted_kl
        out.update(noise_kl=self.noise_kl, kl_se=self.kl_se)
        return out


def _float(value: int | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class BatchNoise:
    """How far one training batch's statistics stray from the population's, per channel (BN604)."""

    batch_size: int  # the training batch size B
    values_per_batch: int  # B x values per sample: what BatchNorm normalises over in training
    pseudo_batches: int  # complete batches of B consecutive samples seen
    method: str  # "pseudo-batches" (measured spread) or "analytic-mean" (too few pseudo-batches)
    rms_smd: np.ndarray  # per channel: RMS (batch mean - population mean) / population scale
    rms_lvr: np.ndarray | None  # per channel: RMS log batch-variance error; None with "analytic-mean"
    mean_rms_smd: float
    mean_rms_lvr: float | None

    def record(self) -> dict[str, Any]:
        """Key -> value in the JSON output's order (arrays as they are; the caller lists them)."""
        return {"batch_size": self.batch_size, "values_per_batch": self.values_per_batch, "pseudo_batches": self.pseudo_batches,
                "method": self.method, "rms_smd": self.rms_smd, "rms_lvr": self.rms_lvr,
                "mean_rms_smd": self.mean_rms_smd, "mean_rms_lvr": self.mean_rms_lvr}


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
    per_channel: ChannelMetrics | None = None  # None without usable stored statistics
    summary: DriftSummary = field(default_factory=lambda: DriftSummary(groups=0))
    batch_size: int | None = None
    batch_noise: BatchNoise | None = None  # with a training batch size
    calls_per_forward: int = 1

    @property
    def values_per_batch(self) -> int | None:
        """Values per channel BatchNorm would see in one training batch of `batch_size` samples."""
        return None if self.batch_size is None else self.batch_size * self.values_per_sample


@dataclass(frozen=True)
class LayerStats:
    """One layer's statistics as reported (`--format json` layer_stats, HTML, plots): built by
    bnlint.dynamic.metrics.layer_stats from a LayerDrift and the thresholds, so nothing downstream computes."""

    layer: str
    order: int
    channels: int
    samples: int
    values_per_sample: int
    values_per_channel: int
    has_running_stats: bool
    calls_per_forward: int
    summary: DriftSummary
    fraction_over_threshold: float | None  # of finite channels with KL over drift-kl (None: not compared)
    significance: float | None  # mean_kl / noise_kl
    mean: list[float | None]  # per channel, non-finite as None
    var: list[float | None]  # population (biased) variance
    var_unbiased: list[float | None]  # with Bessel's correction
    metrics: dict[str, list[float | None]] | None  # ChannelMetrics as lists, in its order
    batch_noise: dict[str, Any] | None  # BatchNoise.record() with lists for arrays

    def record(self) -> dict[str, Any]:
        """Exactly the JSON object `--format json` writes for the layer (schema: bnlint/schemas)."""
        summary = self.summary.record()
        out: dict[str, Any] = {
            "layer": self.layer, "order": self.order, "channels": self.channels, "samples": self.samples,
            "values_per_sample": self.values_per_sample, "values_per_channel": self.values_per_channel,
            "effective_n": summary.pop("effective_n"), "has_running_stats": self.has_running_stats,
            "calls_per_forward": self.calls_per_forward,
        }
        out.update({k: _finite(v) for k, v in summary.items()})
        if self.metrics is not None:
            out["fraction_over_threshold"] = self.fraction_over_threshold
            out["significance"] = self.significance
        out["channel"] = {"mean": list(self.mean), "var": list(self.var), "var_unbiased": list(self.var_unbiased), **(self.metrics or {})}
        if self.batch_noise is not None:
            out["batch_noise"] = dict(self.batch_noise)
        return out


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


@dataclass(frozen=True)
class DependentLayer:
    """A BatchNorm layer whose output depends on its batch mates (BN606)."""

    layer: str
    max_abs_diff: float | None  # None: blamed from the stored form, not from a measured change
    relative_diff: float | None
    evidence: str  # why it is blamed, one clause

    def record(self) -> dict[str, Any]:
        return {"layer": self.layer, "max_abs_diff": self.max_abs_diff, "relative_diff": self.relative_diff, "evidence": self.evidence}


@dataclass
class BatchDependence:
    """Outputs of samples run one at a time versus together (eval mode must not care)."""

    samples: int
    max_abs_diff: float
    relative_diff: float
    layers: list[DependentLayer] = field(default_factory=list)  # BN layers whose output changes while their input does not
    skipped: str | None = None  # why the comparison could not vary the batch
    method: str = "alone"  # "alone": each sample alone vs all together; "mates": one sample with two sets of batch mates
    # The outputs differed, but not through BatchNorm: every BN layer's output was its input
    # normalised with its stored statistics, and the same batch run again gave the same outputs
    # (no randomness). What is left is arithmetic that differs with the batch size (kernels that
    # split the work by batch) in an ill-conditioned output, or a batch-dependent op that is not BN.
    not_batchnorm: bool = False

    def record(self) -> dict[str, Any]:
        return {"samples": self.samples, "max_abs_diff": self.max_abs_diff, "relative_diff": self.relative_diff,
                "layers": [layer.record() for layer in self.layers], "skipped": self.skipped, "method": self.method,
                "not_batchnorm": self.not_batchnorm}


@dataclass
class Measurements:
    """Per-layer statistics of one run over the data, plus how the run went."""

    layers: list[LayerDrift]  # in execution order, named like ModelInfo.layers
    samples: int
    settings: DynamicThresholds  # the [tool.bnlint.dynamic] thresholds in force
    engine: str  # e.g. "torch 2.13.0 (cpu, TorchScript)"
    train_batch_size: int | None
    train_batch_source: str | None
    dependence: BatchDependence | None
    batch_stats_layers: list[str]  # layers known to normalise with batch statistics at inference
    after_stochastic: list[str] = field(default_factory=list)  # layers with dropout / stochastic depth before them
    # The JSON object of each layer (LayerStats.record(): FileResult.layer_stats, `--format json`),
    # made once by `measure`; the typed form is `stats`.
    layer_stats: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def stats(self) -> list[LayerStats]:
        """Each layer's reported statistics, typed: a function of `layers` and `settings` alone."""
        from bnlint.dynamic.metrics import layer_stats  # metrics imports this module

        return [layer_stats(layer, self.settings) for layer in self.layers]

    def records(self) -> list[dict[str, Any]]:
        """`stats` as JSON objects: what `layer_stats` holds."""
        return [stats.record() for stats in self.stats]
