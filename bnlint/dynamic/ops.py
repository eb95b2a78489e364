"""The few array operations the streaming statistics need, for numpy (ONNX runs) and torch.

Torch tensors stay on their device: only `numpy()`, called once at the end, copies to the host,
so CUDA runs never sync per layer.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

Array = Any  # numpy.ndarray or torch.Tensor


class Ops(Protocol):
    """The few array operations the accumulators need that numpy and torch spell differently."""

    def f64(self, x: Array) -> Array: ...

    def zeros(self, *shape: int) -> Array: ...

    def array(self, values: np.ndarray) -> Array:
        """A float64 host array in the library's own form (on the device for torch)."""
        ...

    def counts(self, ids: np.ndarray, rows: int) -> Array:
        """(rows, 1) float64: how many ids fall in each row."""
        ...

    def index(self, ids: np.ndarray) -> Array:
        """Row ids (int64) in the library's own form, for `segment_sum` and gathering `rows[ids]`."""
        ...

    def segment_sum(self, ids: Array, rows: int, values: Array) -> Array:
        """(rows, C): out[r] = sum of values[i] with ids[i] == r."""
        ...

    def log(self, x: Array) -> Array: ...

    def cat(self, first: Array, rest: Array) -> Array:
        """Rows of `first` then rows of `rest`."""
        ...

    def hcat(self, parts: list[Array]) -> Array:
        """Arrays side by side along axis 1 (float64)."""
        ...

    def numpy(self, x: Array) -> np.ndarray: ...


class NumpyOps:
    def f64(self, x: Array) -> Array:
        return np.asarray(x, dtype=np.float64)

    def zeros(self, *shape: int) -> Array:
        return np.zeros(shape, dtype=np.float64)

    def array(self, values: np.ndarray) -> Array:
        return np.asarray(values, dtype=np.float64)

    def counts(self, ids: np.ndarray, rows: int) -> Array:
        return np.bincount(ids, minlength=rows).reshape(rows, 1).astype(np.float64)

    def index(self, ids: np.ndarray) -> Array:
        return ids

    def segment_sum(self, ids: Array, rows: int, values: Array) -> Array:
        out = np.zeros((rows, *values.shape[1:]), dtype=np.float64)
        np.add.at(out, ids, values)
        return out

    def log(self, x: Array) -> Array:
        return np.log(x)

    def cat(self, first: Array, rest: Array) -> Array:
        return np.concatenate([first, rest])

    def hcat(self, parts: list[Array]) -> Array:
        return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts], axis=1)

    def numpy(self, x: Array) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)


class TorchOps:
    """Accumulate on the tensors' own device; only `numpy()` at the very end copies to the host."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device
        self._ids: dict[Any, Any] = {}

    def f64(self, x: Array) -> Array:
        return x.detach().to(self.torch.float64)

    def zeros(self, *shape: int) -> Array:
        return self.torch.zeros(shape, dtype=self.torch.float64, device=self.device)

    def array(self, values: np.ndarray) -> Array:
        return self.torch.from_numpy(np.asarray(values, dtype=np.float64)).to(self.device)

    def counts(self, ids: np.ndarray, rows: int) -> Array:
        key = (b"counts", rows, ids.tobytes())  # cached: a host-to-device copy per batch would sync on CUDA
        if key not in self._ids:
            self._ids[key] = self.array(NumpyOps().counts(ids, rows))
        return self._ids[key]

    def index(self, ids: np.ndarray) -> Array:
        key = ids.tobytes()  # the same few patterns recur every batch: copy each to the device once
        if key not in self._ids:
            if len(self._ids) > 256:
                self._ids.clear()
            self._ids[key] = self.torch.from_numpy(ids).to(self.device)
        return self._ids[key]

    def segment_sum(self, ids: Array, rows: int, values: Array) -> Array:
        # index_add_ rather than a one-hot matmul: tiny BLAS calls cost ~15 ms each with MKL threads on some hosts
        return self.zeros(rows, *values.shape[1:]).index_add_(0, ids, values)

    def log(self, x: Array) -> Array:
        return self.torch.log(x)

    def cat(self, first: Array, rest: Array) -> Array:
        return self.torch.cat([first, rest])

    def hcat(self, parts: list[Array]) -> Array:
        return self.torch.cat([p.detach().to(self.torch.float64) for p in parts], dim=1)

    def numpy(self, x: Array) -> np.ndarray:
        return x.detach().cpu().numpy().astype(np.float64)
