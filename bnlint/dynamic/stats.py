"""Streaming per-channel statistics of each BatchNorm layer's input, independent of the batch split.

What BatchNorm normalises with, per channel c, is the mean and variance of its input over the
batch and every spatial position. We want the same two numbers over the whole target sample,
without ever holding more than one batch of activations.

How (and why this way):

1. Inside the forward pass, each layer's input x of shape (N, C, *spatial) is reduced per
   *sample* to a float32 mean m[n, c] and population variance v[n, c] over its L spatial
   values (hooks.per_sample_moments: one cheap pass over memory the convolution just wrote, on
   the device that holds it). A per-sample reduction does not depend on which other samples
   share the batch, so nothing below does either.
2. Everything after that works on those small (N, C) arrays in float64: per-sample moments are
   pooled exactly (the pooled sum of squared deviations is `L * sum(v) + L * sum((m - mean)^2)`)
   and merged into running totals with Chan, Golub & LeVeque's parallel update
       n = n_a + n_b,  delta = mean_b - mean_a,
       mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n,
   which is exact in exact arithmetic and stable in floating point (no E[x^2] - E[x]^2
   cancellation). Weights are element counts, so uneven batches merge correctly.
3. Sample i goes to group i mod K (K interleaved groups). The groups merge to the totals, and
   leaving one group out at a time gives jackknife standard errors that account for whatever
   correlation there is between the values of one sample (spatial correlation is large in real
   activations; treating all N*L values as independent would understate the noise many times).
4. Optionally, consecutive samples form pseudo-batches of the *training* batch size B; the spread
   of their batch statistics around the population statistics is the train/test inconsistency
   that small batches cause (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm").

All arithmetic goes through a tiny `Ops` adapter so the same code accumulates numpy arrays (ONNX
runs) or torch tensors left on their device (no per-layer host syncs on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlint.dynamic.ops import Array, NumpyOps, Ops, TorchOps
from bnlint.measurements import GROUPS  # jackknife groups: enough degrees of freedom, few enough for tiny samples

__all__ = ["Accumulator", "Collector", "HostMoments", "LayerMoments", "NumpyOps", "Ops", "TorchOps", "pool_samples"]



def _nonzero(count: Array) -> Array:
    """count, with zeros replaced by 1 so that empty rows divide to 0 instead of NaN."""
    return count + (count == 0)


def pool_samples(ops: Ops, ids: np.ndarray, rows: int, mean: Array, var: Array, values_per_sample: Array) -> tuple[Array, Array, Array]:
    """Pool per-sample moments into rows (groups or pseudo-batches): sample i goes to row ids[i].

    `values_per_sample` (L) is (1, C). Returns per row and channel: element count n, mean, and
    M2 = sum of squared deviations from the row mean, each (R, C). Exact:
    M2 = L * sum(v_i) + L * sum((m_i - row_mean)^2).
    """
    samples = ops.counts(ids, rows)
    index = ops.index(ids)
    row_mean = ops.segment_sum(index, rows, mean) / _nonzero(samples)
    spread = mean - row_mean[index]  # each sample's deviation from its own row's mean
    m2 = values_per_sample * (ops.segment_sum(index, rows, var) + ops.segment_sum(index, rows, spread * spread))
    return samples * values_per_sample, row_mean, m2


class Moments:
    """Streaming count / mean / M2 for R rows x C channels, merged with Chan's parallel update."""

    def __init__(self, ops: Ops, rows: int, channels: int) -> None:
        self.count = ops.zeros(rows, channels)  # per channel too: channels of different layers have different L
        self.mean = ops.zeros(rows, channels)
        self.m2 = ops.zeros(rows, channels)

    def merge(self, count: Array, mean: Array, m2: Array) -> None:
        total = self.count + count
        delta = mean - self.mean
        weight = count / _nonzero(total)
        self.mean = self.mean + delta * weight
        self.m2 = self.m2 + m2 + delta * delta * self.count * weight
        self.count = total

    def host(self, ops: Ops) -> "HostMoments":
        return HostMoments(ops.numpy(self.count), ops.numpy(self.mean), ops.numpy(self.m2))


@dataclass
class HostMoments:
    """count / mean / M2 arrays (rows, C) in float64 numpy: sliceable by channel and mergeable."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    def columns(self, lo: int, hi: int) -> "HostMoments":
        return HostMoments(self.count[:, lo:hi], self.mean[:, lo:hi], self.m2[:, lo:hi])

    def merged(self, other: "HostMoments") -> "HostMoments":
        total = self.count + other.count
        delta = other.mean - self.mean
        weight = other.count / _nonzero(total)
        return HostMoments(total, self.mean + delta * weight, self.m2 + other.m2 + delta * delta * self.count * weight)


def unit_moments(ops: Ops, values: Array) -> tuple[Array, Array, Array]:
    """Moments of J values per channel, each value one unit of weight: (1, C) each."""
    count = values.shape[0]
    mean = values.sum(0, keepdims=True) / count
    centred = values - mean
    return ops.zeros(1, values.shape[1]) + count, mean, (centred * centred).sum(0, keepdims=True)


@dataclass
class LayerMoments:
    """What the accumulator hands to the metrics for one layer, all float64 numpy on the host."""

    samples: int  # how many samples reached the layer (a module called twice counts them twice)
    values_per_sample: int  # L: spatial positions per channel per sample
    groups: HostMoments  # (K, C): jackknife groups, element-weighted
    sample_means: HostMoments  # (1, C): per-sample means, each sample one unit
    batch_size: int | None = None  # pseudo-batch size B, when asked
    batches: int = 0  # complete pseudo-batches of B samples seen
    batch_means: HostMoments | None = None  # (1, C): pseudo-batch means as units
    batch_logvars: HostMoments | None = None  # (1, C): ln(pseudo-batch var + eps) as units

    @property
    def count(self) -> float:
        return float(self.groups.count[:, 0].sum()) if self.groups.count.size else 0.0

    @property
    def group_count(self) -> np.ndarray:
        return self.groups.count[:, 0] if self.groups.count.size else np.zeros(self.groups.count.shape[0])

    @property
    def sample_mean_var(self) -> np.ndarray:
        """(C,) variance across samples of the per-sample means (unbiased)."""
        return self.sample_means.m2[0] / np.maximum(self.sample_means.count[0] - 1.0, 1.0)

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """Population mean and (biased) variance per channel over every value seen."""
        mean, m2 = merge_rows(self.group_count, self.groups.mean, self.groups.m2)
        return mean, m2 / max(self.count, 1.0)

    def merged(self, other: "LayerMoments") -> "LayerMoments":
        """Both calls' statistics (a layer measured in two call layouts, or called twice per forward)."""
        pairs = [(a.merged(b) if a is not None and b is not None else a or b)
                 for a, b in ((self.batch_means, other.batch_means), (self.batch_logvars, other.batch_logvars))]
        return LayerMoments(self.samples + other.samples, self.values_per_sample, self.groups.merged(other.groups),
                            self.sample_means.merged(other.sample_means), self.batch_size, self.batches + other.batches, *pairs)


def merge_rows(count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge K rows of (count, mean, M2) into one (mean, M2), in float64; count is (K,)."""
    total = count.sum()
    if total == 0:
        return np.zeros(mean.shape[1]), np.zeros(mean.shape[1])
    grand = (count[:, None] * mean).sum(0) / total
    deviation = mean - grand
    return grand, m2.sum(0) + (count[:, None] * deviation * deviation).sum(0)


class Accumulator:
    """All streaming statistics of C channels (one layer, or several layers side by side).

    `values_per_sample` and `eps` are per channel, so the channels of every BN layer of a network
    can be accumulated as one wide array: one set of small float64 operations per batch instead
    of one per layer.
    """

    def __init__(self, ops: Ops, values_per_sample: np.ndarray, eps: np.ndarray, batch_size: int | None = None, groups: int = GROUPS) -> None:
        self.ops = ops
        self.channels = int(values_per_sample.size)
        self.values_per_sample = np.asarray(values_per_sample, dtype=np.int64)
        self._size = ops.array(self.values_per_sample.reshape(1, -1).astype(np.float64))
        self._eps = ops.array(np.asarray(eps, dtype=np.float64).reshape(1, -1))
        self.groups = groups
        self.samples = 0
        self.group_moments = Moments(ops, groups, self.channels)
        self.sample_means = Moments(ops, 1, self.channels)  # per-sample means as units: between-sample spread
        self.batch_size = batch_size
        self.batch_means = Moments(ops, 1, self.channels)
        self.batch_logvars = Moments(ops, 1, self.channels)
        self.batches = 0
        self._carry: tuple[int, Array, Array, Array] | None = None  # partial pseudo-batch: samples, n, mean, M2
        self._host: tuple[int, list[HostMoments]] | None = None

    def add(self, var: Array, mean: Array) -> None:
        """Add one forward call: per-sample population variance and mean, each (N, C), any float dtype."""
        ops, n = self.ops, int(mean.shape[0])
        mean64, var64 = ops.f64(mean), ops.f64(var)
        start = self.samples
        ids = (np.arange(start, start + n) % self.groups).astype(np.int64)
        self.group_moments.merge(*pool_samples(ops, ids, self.groups, mean64, var64, self._size))
        self.sample_means.merge(*unit_moments(ops, mean64))
        if self.batch_size:
            self._pseudo_batches(start, mean64, var64)
        self.samples += n

    def _pseudo_batches(self, start: int, mean: Array, var: Array) -> None:
        """Cut the sample stream into consecutive batches of B and record each full batch's statistics."""
        size = int(self.batch_size or 0)
        ops, n = self.ops, int(mean.shape[0])
        first = start // size
        local = ((np.arange(start, start + n) // size) - first).astype(np.int64)
        rows = int(local[-1]) + 1
        count, row_mean, m2 = pool_samples(ops, local, rows, mean, var, self._size)
        filled = np.bincount(local, minlength=rows)
        if self._carry is not None:  # the carry holds the first samples of row 0's batch
            carried, c_count, c_mean, c_m2 = self._carry
            row = Moments(ops, 1, self.channels)
            row.merge(c_count, c_mean, c_m2)
            row.merge(count[:1], row_mean[:1], m2[:1])
            filled[0] += carried
            count, row_mean, m2 = (ops.cat(new, old[1:]) for new, old in ((row.count, count), (row.mean, row_mean), (row.m2, m2)))
            self._carry = None
        complete = int((filled == size).sum())  # every row but possibly the last is full
        if complete < rows:
            self._carry = (int(filled[-1]), count[-1:], row_mean[-1:], m2[-1:])
        if complete:
            batch_var = m2[:complete] / count[:complete]  # biased: what BN normalises with in training
            self.batch_means.merge(*unit_moments(ops, row_mean[:complete]))
            self.batch_logvars.merge(*unit_moments(ops, ops.log(batch_var + self._eps)))
            self.batches += complete

    def result(self, lo: int = 0, hi: int | None = None) -> LayerMoments:
        """The statistics of channels lo:hi (one layer), copied to the host."""
        hi = self.channels if hi is None else hi
        if self._host is None or self._host[0] != self.samples:  # one device-to-host copy for all layers
            moments = (self.group_moments, self.sample_means, self.batch_means, self.batch_logvars)
            self._host = (self.samples, [m.host(self.ops) for m in moments])
        groups, sample_means, batch_means, batch_logvars = self._host[1]
        return LayerMoments(
            samples=self.samples,
            values_per_sample=int(self.values_per_sample[lo]) if hi > lo else 0,
            groups=groups.columns(lo, hi),
            sample_means=sample_means.columns(lo, hi),
            batch_size=self.batch_size,
            batches=self.batches,
            batch_means=batch_means.columns(lo, hi) if self.batch_size else None,
            batch_logvars=batch_logvars.columns(lo, hi) if self.batch_size else None,
        )


class Collector:
    """Gathers each batch's per-layer moments and feeds them, side by side, to one Accumulator.

    Runners call `add` once per BN call during a forward pass and `end_batch` after it. Batches
    with the same call layout (which layers ran, in which order, with which C and L: nearly always
    one layout) share an accumulator; `layers()` slices and merges them back per layer, in the
    order the layers first ran.
    """

    def __init__(self, ops: Ops, eps: dict[str, float], batch_size: int | None = None) -> None:
        self.ops = ops
        self.eps = eps
        self.batch_size = batch_size
        self.calls: dict[str, int] = {}  # most calls of a layer in one forward pass
        self._pending: list[tuple[str, Array, Array, int]] = []
        self._layouts: dict[tuple[tuple[str, int, int], ...], Accumulator] = {}

    def add(self, name: str, var: Array, mean: Array, values_per_sample: int) -> None:
        self._pending.append((name, var, mean, int(values_per_sample)))

    def end_batch(self) -> None:
        if not self._pending:
            return
        layout = tuple((name, int(mean.shape[1]), size) for name, _, mean, size in self._pending)
        accumulator = self._layouts.get(layout)
        if accumulator is None:
            sizes = np.concatenate([np.full(c, size) for _, c, size in layout])
            eps = np.concatenate([np.full(c, self.eps.get(name, 1e-5)) for name, c, _ in layout])
            accumulator = self._layouts[layout] = Accumulator(self.ops, sizes, eps, self.batch_size)
        if len(self._pending) == 1:
            var, mean = self._pending[0][1], self._pending[0][2]
        else:
            var = self.ops.hcat([p[1] for p in self._pending])
            mean = self.ops.hcat([p[2] for p in self._pending])
        accumulator.add(var, mean)
        for name in {p[0] for p in self._pending}:
            self.calls[name] = max(self.calls.get(name, 0), sum(1 for p in self._pending if p[0] == name))
        self._pending = []

    def layers(self) -> dict[str, LayerMoments]:
        found: dict[str, LayerMoments] = {}
        for layout, accumulator in self._layouts.items():
            lo = 0
            for name, channels, _ in layout:
                moments = accumulator.result(lo, lo + channels)
                lo += channels
                found[name] = found[name].merged(moments) if name in found else moments
        return found


def per_sample_moments_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample, per-channel population variance and mean of an (N, C, ...) array (float64)."""
    flat = np.asarray(x).reshape(x.shape[0], x.shape[1], -1).astype(np.float64, copy=False)
    mean = flat.mean(axis=2)
    centred = flat - mean[:, :, None]
    return (centred * centred).mean(axis=2), mean
