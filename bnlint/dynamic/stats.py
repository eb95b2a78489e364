"""Streaming per-channel statistics of each BatchNorm layer's input, independent of the batch split.

What BatchNorm normalises with, per channel c, is the mean and variance of its input over the
batch and every spatial position. We want the same two numbers over the whole target sample,
without ever holding more than one batch of activations.

How (and why this way):

1. Inside the forward pass, each layer's input x of shape (N, C, *spatial) is reduced per
   *sample* to a float32 mean m[n, c] and population variance v[n, c] over its L spatial
   values (`torch.var_mean(x.reshape(N, C, -1), dim=2, unbiased=False)`): one cheap pass over
   memory the convolution just wrote, on the device that holds it. A per-sample reduction does
   not depend on which other samples share the batch, so nothing below does either.
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
from typing import Any, Protocol

import numpy as np

GROUPS = 8  # jackknife groups: enough degrees of freedom for a standard error, few enough for tiny samples

Array = Any  # numpy.ndarray or torch.Tensor


class Ops(Protocol):
    """The few array operations the accumulators need that numpy and torch spell differently."""

    def f64(self, x: Array) -> Array: ...

    def zeros(self, *shape: int) -> Array: ...

    def onehot(self, ids: np.ndarray, rows: int) -> Array:
        """A (rows, len(ids)) float64 0/1 matrix with 1 at [ids[i], i]."""
        ...

    def log(self, x: Array) -> Array: ...

    def cat(self, first: Array, rest: Array) -> Array:
        """Rows of `first` then rows of `rest`."""
        ...

    def numpy(self, x: Array) -> np.ndarray: ...


class NumpyOps:
    def f64(self, x: Array) -> Array:
        return np.asarray(x, dtype=np.float64)

    def zeros(self, *shape: int) -> Array:
        return np.zeros(shape, dtype=np.float64)

    def onehot(self, ids: np.ndarray, rows: int) -> Array:
        out = np.zeros((rows, ids.size), dtype=np.float64)
        out[ids, np.arange(ids.size)] = 1.0
        return out

    def log(self, x: Array) -> Array:
        return np.log(x)

    def cat(self, first: Array, rest: Array) -> Array:
        return np.concatenate([first, rest])

    def numpy(self, x: Array) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)


class TorchOps:
    """Accumulate on the tensors' own device; only `numpy()` at the very end copies to the host."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device
        self._onehots: dict[tuple[bytes, int], Any] = {}

    def f64(self, x: Array) -> Array:
        return x.detach().to(self.torch.float64)

    def zeros(self, *shape: int) -> Array:
        return self.torch.zeros(shape, dtype=self.torch.float64, device=self.device)

    def onehot(self, ids: np.ndarray, rows: int) -> Array:
        key = (ids.tobytes(), rows)  # the same few patterns recur every batch: build each once
        if key not in self._onehots:
            if len(self._onehots) > 256:
                self._onehots.clear()
            self._onehots[key] = self.torch.from_numpy(NumpyOps().onehot(ids, rows)).to(self.device)
        return self._onehots[key]

    def log(self, x: Array) -> Array:
        return self.torch.log(x)

    def cat(self, first: Array, rest: Array) -> Array:
        return self.torch.cat([first, rest])

    def numpy(self, x: Array) -> np.ndarray:
        return x.detach().cpu().numpy().astype(np.float64)


def _nonzero(count: Array) -> Array:
    """count, with zeros replaced by 1 so that empty rows divide to 0 instead of NaN."""
    return count + (count == 0)


def pool_samples(ops: Ops, onehot: Array, mean: Array, var: Array, values_per_sample: int) -> tuple[Array, Array, Array]:
    """Pool per-sample moments into rows (groups or pseudo-batches) given by a (R, N) one-hot.

    Returns per row: element count n (R, 1), mean (R, C), M2 (R, C) = sum of squared deviations
    from the row mean. Exact: M2 = L * sum(v_i) + L * sum((m_i - row_mean)^2).
    """
    samples = onehot.sum(1, keepdims=True)  # (R, 1)
    row_mean = (onehot @ mean) / _nonzero(samples)
    spread = mean - onehot.T @ row_mean  # each sample's deviation from its own row's mean
    m2 = values_per_sample * (onehot @ var + onehot @ (spread * spread))
    return samples * values_per_sample, row_mean, m2


class Moments:
    """Streaming count / mean / M2 for R rows x C channels, merged with Chan's parallel update."""

    def __init__(self, ops: Ops, rows: int, channels: int) -> None:
        self.count = ops.zeros(rows, 1)
        self.mean = ops.zeros(rows, channels)
        self.m2 = ops.zeros(rows, channels)

    def merge(self, count: Array, mean: Array, m2: Array) -> None:
        total = self.count + count
        delta = mean - self.mean
        weight = count / _nonzero(total)
        self.mean = self.mean + delta * weight
        self.m2 = self.m2 + m2 + delta * delta * self.count * weight
        self.count = total


def unit_moments(ops: Ops, values: Array) -> tuple[Array, Array, Array]:
    """Moments of J values per channel, each value one unit of weight: (1, 1), (1, C), (1, C)."""
    count = values.shape[0]
    mean = values.sum(0, keepdims=True) / count
    centred = values - mean
    return ops.zeros(1, 1) + count, mean, (centred * centred).sum(0, keepdims=True)


@dataclass
class LayerMoments:
    """What one layer's accumulator hands to the metrics, all float64 numpy on the host."""

    samples: int  # how many samples reached the layer (a module called twice counts them twice)
    values_per_sample: int  # L: spatial positions per channel per sample
    group_count: np.ndarray  # (K,) element counts per jackknife group
    group_mean: np.ndarray  # (K, C)
    group_m2: np.ndarray  # (K, C)
    sample_mean_var: np.ndarray  # (C,) variance across samples of the per-sample means
    batch_size: int | None = None  # pseudo-batch size B, when asked
    batches: int = 0  # complete pseudo-batches of B samples seen
    batch_mean_moments: np.ndarray | None = None  # (3, C): count, mean, M2 of the batch means
    batch_logvar_moments: np.ndarray | None = None  # (3, C): same for ln(batch var + eps)

    @property
    def count(self) -> float:
        return float(self.group_count.sum())

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """Population mean and (biased) variance per channel over every value seen."""
        mean, m2 = merge_rows(self.group_count, self.group_mean, self.group_m2)
        return mean, m2 / max(self.count, 1.0)


def merge_rows(count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge K rows of (count, mean, M2) into one (mean, M2), in float64."""
    total = count.sum()
    if total == 0:
        return np.zeros(mean.shape[1]), np.zeros(mean.shape[1])
    grand = (count[:, None] * mean).sum(0) / total
    deviation = mean - grand
    return grand, m2.sum(0) + (count[:, None] * deviation * deviation).sum(0)


class LayerAccumulator:
    """All streaming statistics of one BatchNorm layer's input; fed once per forward call."""

    def __init__(self, ops: Ops, channels: int, eps: float, batch_size: int | None = None, groups: int = GROUPS) -> None:
        self.ops = ops
        self.channels = channels
        self.eps = eps
        self.groups = groups
        self.samples = 0
        self.values_per_sample: int | None = None
        self.group_moments = Moments(ops, groups, channels)
        self.sample_means = Moments(ops, 1, channels)  # per-sample means as units: between-sample spread
        self.batch_size = batch_size
        self.batch_means = Moments(ops, 1, channels)
        self.batch_logvars = Moments(ops, 1, channels)
        self.batches = 0
        self._carry: tuple[int, Array, Array, Array] | None = None  # partial pseudo-batch: samples, n, mean, M2

    def add(self, var: Array, mean: Array, values_per_sample: int) -> None:
        """Add one forward call: per-sample population variance and mean, each (N, C), any float dtype."""
        if self.values_per_sample is None:
            self.values_per_sample = values_per_sample
        ops, n = self.ops, int(mean.shape[0])
        mean64, var64 = ops.f64(mean), ops.f64(var)
        start = self.samples
        ids = (np.arange(start, start + n) % self.groups).astype(np.int64)
        self.group_moments.merge(*pool_samples(ops, ops.onehot(ids, self.groups), mean64, var64, values_per_sample))
        self.sample_means.merge(*unit_moments(ops, mean64))
        if self.batch_size:
            self._pseudo_batches(start, mean64, var64, values_per_sample)
        self.samples += n

    def _pseudo_batches(self, start: int, mean: Array, var: Array, values_per_sample: int) -> None:
        """Cut the sample stream into consecutive batches of B and record each full batch's statistics."""
        size = int(self.batch_size or 0)
        ops, n = self.ops, int(mean.shape[0])
        first = start // size
        local = ((np.arange(start, start + n) // size) - first).astype(np.int64)
        rows = int(local[-1]) + 1
        count, row_mean, m2 = pool_samples(ops, ops.onehot(local, rows), mean, var, values_per_sample)
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
            self.batch_logvars.merge(*unit_moments(ops, ops.log(batch_var + self.eps)))
            self.batches += complete

    def result(self) -> LayerMoments:
        ops = self.ops
        between = self.sample_means
        sample_count = ops.numpy(between.count)[0, 0]
        batch_mean = batch_logvar = None
        if self.batch_size:
            batch_mean = np.concatenate([np.broadcast_to(ops.numpy(self.batch_means.count), (1, self.channels)),
                                         ops.numpy(self.batch_means.mean), ops.numpy(self.batch_means.m2)])
            batch_logvar = np.concatenate([np.broadcast_to(ops.numpy(self.batch_logvars.count), (1, self.channels)),
                                           ops.numpy(self.batch_logvars.mean), ops.numpy(self.batch_logvars.m2)])
        return LayerMoments(
            samples=self.samples,
            values_per_sample=int(self.values_per_sample or 0),
            group_count=ops.numpy(self.group_moments.count)[:, 0],
            group_mean=ops.numpy(self.group_moments.mean),
            group_m2=ops.numpy(self.group_moments.m2),
            sample_mean_var=ops.numpy(between.m2)[0] / max(sample_count - 1.0, 1.0),
            batch_size=self.batch_size,
            batches=self.batches,
            batch_mean_moments=batch_mean,
            batch_logvar_moments=batch_logvar,
        )


def per_sample_moments_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample, per-channel population variance and mean of an (N, C, ...) array (float64)."""
    flat = np.asarray(x).reshape(x.shape[0], x.shape[1], -1).astype(np.float64, copy=False)
    mean = flat.mean(axis=2)
    centred = flat - mean[:, :, None]
    return (centred * centred).mean(axis=2), mean
