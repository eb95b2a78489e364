"""Exact BatchNorm recalibration: what is computed, and the framework-neutral bookkeeping around it.

What "exact" means here. A BatchNorm layer in eval mode normalises channel c of its input x with
the stored `running_mean[c]` and `running_var[c]`. Recalibrating a model on target data (AdaBN,
Li et al. 2016, "Revisiting Batch Normalization for Practical Domain Adaptation"; precise BN,
fvcore's `precise_bn.py` and Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm") means setting
them to the population statistics of what the layer sees at inference:

    mean_k = (1/n) sum x,    var_k = 1/(n-1) sum (x - mean_k)^2,    n = samples x spatial positions,

over every value of channel c of layer k's input, *with the model in eval mode and layers
1..k-1 already holding their new statistics*. That is the fixed point inference sees: layer k's
input depends on the statistics upstream layers normalise with, so they are settled first, in
execution order. The variance is stored unbiased (Bessel's n/(n-1)), as PyTorch's running_var
and `torch.optim.swa_utils.update_bn` store it.

`update_bn` is the usual approximation: it runs the model in *train* mode, so every layer (and
every layer upstream of it) normalises with per-batch statistics while being measured, and it
averages per-batch variances (which miss the spread of the batch means). Both errors shrink with
the batch size; neither is zero, and the first compounds with depth.

How the statistics are accumulated (shared with the linter's drift analysis,
`bnlint.dynamic.stats`): each forward call's input is reduced per (sample, channel) to a mean and
a population variance (`bnlint.dynamic.hooks.per_sample_moments`), which are pooled exactly into
float64 count / mean / M2 (sum of squared deviations) and merged across calls with Chan, Golub &
LeVeque's parallel update (1979): n = n_a + n_b, delta = mean_b - mean_a,
mean = mean_a + delta n_b / n, M2 = M2_a + M2_b + delta^2 n_a n_b / n. The merge is exact in exact
arithmetic and free of E[x^2] - E[x]^2 cancellation, so uneven batch splits and several processes
give the same result to rounding: each process sends its per-layer (n, mean, M2) and every
process merges the parts in rank order (`pack_moments` / `merge_parts`).

Nothing is invented: a layer whose input yields non-finite statistics, or a single value per
channel (no unbiased variance), is an error, not a guess. This module never imports torch.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from bnlint.dynamic.metrics import analyse_layer, drift
from bnlint.dynamic.stats import GROUPS, HostMoments, LayerMoments
from bnlint.errors import BnlintError


class RecalibrationError(BnlintError):
    """The model cannot be recalibrated as asked (one line, shown as-is)."""


@dataclass(frozen=True)
class BNStatistics:
    """New statistics for one layer, as they are written: float64 values, cast on writing.

    `var` is the unbiased variance (PyTorch's running_var). `num_batches_tracked` None leaves the
    counter alone. `count` is the number of values per channel the statistics came from.
    """

    mean: np.ndarray
    var: np.ndarray
    num_batches_tracked: int | None = None
    count: int = 0

    @classmethod
    def coerce(cls, value: "BNStatistics | Sequence[Any]") -> "BNStatistics":
        """A BNStatistics, or a (mean, var_unbiased[, num_batches_tracked]) tuple."""
        if isinstance(value, BNStatistics):
            return value
        if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
            raise RecalibrationError(f"new statistics must be BNStatistics or (mean, var[, num_batches_tracked]), got {type(value).__name__}")
        mean = np.asarray(value[0], dtype=np.float64).reshape(-1)
        var = np.asarray(value[1], dtype=np.float64).reshape(-1)
        counter = None if len(value) < 3 or value[2] is None else int(value[2])
        return cls(mean, var, counter)


@dataclass
class LayerRecalibration:
    """One recalibrated layer: its new statistics, its old ones, and the drift between them.

    `before` is the drift of the target data from the *old* statistics (bnlint's BN601 metrics,
    `bnlint.dynamic.metrics.analyse_layer`: mean/max KL, |SMD|, |LVR|, the jackknife noise floor
    `noise_kl`), measured on the input the layer sees once its upstream layers are fixed. `after`
    is the same against the new statistics: ~0 by construction (only Bessel's n/(n-1) remains).
    """

    name: str  # the layer's name as bnlint's static loader names it for the file
    module: str  # where it is in the running network (module path / TorchScript attribute path)
    order: int  # execution order
    eps: float
    samples: int
    count: int  # values per channel: samples x spatial positions (n of Bessel's correction)
    calls: int  # forward calls that reached the layer: the new num_batches_tracked
    mean: np.ndarray
    var: np.ndarray  # unbiased
    old_mean: np.ndarray | None = None
    old_var: np.ndarray | None = None
    old_num_batches_tracked: int | None = None
    has_counter: bool = True
    before: dict[str, float | None] = field(default_factory=dict)
    after: dict[str, float | None] = field(default_factory=dict)
    # The merged moments the new statistics came from: the input of this layer in the fixed
    # network, over all the data. `bnlint fix` judges the output from them instead of a second pass.
    moments: LayerMoments | None = field(default=None, repr=False, compare=False)

    @property
    def channels(self) -> int:
        return int(self.mean.size)

    def statistics(self) -> BNStatistics:
        return BNStatistics(self.mean, self.var, self.calls if self.has_counter else None, self.count)

    def record(self) -> dict[str, Any]:
        """JSON-able summary (no per-channel arrays)."""
        return {"layer": self.name, "module": self.module, "order": self.order, "channels": self.channels,
                "samples": self.samples, "values_per_channel": self.count, "num_batches_tracked": self.calls if self.has_counter else None,
                "old_num_batches_tracked": self.old_num_batches_tracked, "before": self.before, "after": self.after}


@dataclass
class RecalibrationResult:
    """What `recalibrate_module` did: per-layer results in execution order, and how it ran.

    `method`: "layer-major" (one forward pass, fx), "truncated" (truncated passes over an
    nn.Module, resumed from cached settled activations), "torchscript" (truncated TorchScript
    graphs, layers with settled upstream grouped into one pass). `passes` counts passes over the
    data (truncated passes included), `skipped` maps layers left alone to the reason.
    """

    layers: list[LayerRecalibration]
    method: str
    passes: int
    samples: int
    batches: int
    world_size: int = 1
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    memory_estimate: int | None = None  # bytes the layer-major pass was estimated to hold

    def new_stats(self) -> dict[str, BNStatistics]:
        """Layer name (the static loader's) -> statistics: the input of `write_torch_fix`."""
        return {layer.name: layer.statistics() for layer in self.layers}

    def records(self) -> list[dict[str, Any]]:
        return [layer.record() for layer in self.layers]


def select(names: Iterable[str], patterns: str | Sequence[str] | None, aliases: Mapping[str, str] | None = None) -> list[str]:
    """Names matching any glob (fnmatch, case-sensitive) by their own name or their alias; all when None."""
    if patterns is None:
        return list(names)
    globs = [p.strip() for p in ([patterns] if isinstance(patterns, str) else patterns) for p in p.split(",") if p.strip()]
    alias = aliases or {}
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) or fnmatch.fnmatchcase(alias.get(n, n), g) for g in globs)]


def empty_moments(channels: int, groups: int = GROUPS) -> LayerMoments:
    """What a process that saw no data contributes: zero counts (Chan's merge ignores them)."""
    zero = np.zeros((groups, channels))
    return LayerMoments(0, 0, HostMoments(zero, zero.copy(), zero.copy()),
                        HostMoments(np.zeros((1, channels)), np.zeros((1, channels)), np.zeros((1, channels))))


def pack_moments(moments: LayerMoments, calls: int) -> np.ndarray:
    """One float64 vector per layer and process, for an all-gather: header then (K, C) and (1, C) arrays."""
    g, s = moments.groups, moments.sample_means
    header = np.array([moments.samples, moments.values_per_sample, calls, g.count.shape[0], g.count.shape[1]], dtype=np.float64)
    return np.concatenate([header] + [a.reshape(-1) for a in (g.count, g.mean, g.m2, s.count, s.mean, s.m2)])


def unpack_moments(vector: np.ndarray) -> tuple[LayerMoments, int]:
    samples, size, calls, rows, channels = (int(v) for v in vector[:5])
    parts, at = [], 5
    for shape in [(rows, channels)] * 3 + [(1, channels)] * 3:
        parts.append(vector[at:at + shape[0] * shape[1]].reshape(shape))
        at += shape[0] * shape[1]
    return LayerMoments(samples, size, HostMoments(*parts[:3]), HostMoments(*parts[3:])), calls


def merge_parts(parts: Sequence[tuple[LayerMoments, int]]) -> tuple[LayerMoments, int]:
    """Merge per-process moments in the order given (rank order: every process gets identical bits)."""
    merged, calls = parts[0]
    for moments, more in parts[1:]:
        merged = moments.merged(merged) if merged.samples == 0 else merged.merged(moments)  # keep a real spatial size
        calls += more
    return merged, calls


def _summary(metrics: dict[str, np.ndarray]) -> dict[str, float | None]:
    kl, smd = metrics["kl"], np.abs(metrics["smd"])
    finite = np.isfinite(kl)
    if not finite.any():
        return {"mean_kl": None, "max_kl": None, "max_abs_smd": None}
    return {"mean_kl": float(kl[finite].mean()), "max_kl": float(kl[finite].max()), "max_abs_smd": float(smd[finite].max())}


def finish_layer(name: str, module: str, order: int, moments: LayerMoments, calls: int, eps: float,
                 old: Mapping[str, np.ndarray | None], old_counter: int | None, has_counter: bool) -> LayerRecalibration:
    """New statistics from a layer's merged moments, checked, with the before/after drift summaries.

    `old` holds the layer's stored running_mean / running_var / weight (float64, or None).
    """
    count = moments.count
    if count < 2:
        raise RecalibrationError(f"layer {name}: the data gives {int(count)} value(s) per channel; an unbiased variance needs at least 2 "
                                 "(more samples, or larger inputs)")
    mean, biased = moments.totals()
    var = biased * (count / (count - 1.0))
    bad = ~(np.isfinite(mean) & np.isfinite(var))
    if bad.any():
        raise RecalibrationError(f"layer {name}: its input on this data has non-finite statistics in {int(bad.sum())} channel(s) "
                                 f"(first: {int(np.flatnonzero(bad)[0])}); nothing was written. Check the data and the layers before it")
    old_mean, old_var = old.get("running_mean"), old.get("running_var")
    before: dict[str, float | None] = {}
    if old_mean is not None and old_var is not None and old_mean.size == mean.size:
        with np.errstate(all="ignore"):  # NaN / negative old statistics give NaN drift, reported as such
            before = analyse_layer(name, order, moments, eps, old_mean, old_var, old.get("weight")).summary.record()
    return LayerRecalibration(
        name=name, module=module, order=order, eps=eps, samples=moments.samples, count=int(round(count)),
        calls=calls, mean=mean, var=var, old_mean=old_mean, old_var=old_var, old_num_batches_tracked=old_counter,
        has_counter=has_counter, before=before, after=_summary(drift(mean, biased, mean, var, eps)), moments=moments,
    )


def available_memory() -> int | None:
    """Bytes of physical memory available now (Linux/macOS sysconf), or None if unknown."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB"
