"""What every runner (torch module, TorchScript, ONNX) offers the analysis, framework-neutral."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from bnlint.dynamic.stats import Ops

Batches = Iterator[tuple[int, list[np.ndarray]]]


@dataclass
class LayerSpec:
    """A BatchNorm layer as the runner sees it, with the stored statistics to compare against."""

    name: str
    eps: float = 1e-5
    running_mean: np.ndarray | None = None
    running_var: np.ndarray | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    uses_batch_stats: bool | None = None  # known to normalise with batch statistics at inference
    after_stochastic: bool | None = None  # a dropout / stochastic-depth module runs before it (if known)


@dataclass
class Capture:
    """Model outputs and each BN layer's (input, output) pairs of one small run, as numpy."""

    outputs: list[np.ndarray]
    layers: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)


class Runner(Protocol):
    engine: str
    input_names: list[str]
    input_shapes: list[tuple[int | None, ...] | None]  # per-sample shape the model expects, if known
    fixed_batch: int | None  # a batch size the model is exported with, if fixed
    layers: list[LayerSpec]
    notes: list[str]

    @property
    def ops(self) -> Ops:
        """Array operations for the moments the runner hands to `collect`'s callback."""
        ...

    def collect(self, batches: Batches, add: Callable[[str, Any, Any, int], None], end_batch: Callable[[], None]) -> None:
        """Run every batch; for each BN call, `add(name, var, mean, values_per_sample)` per-sample moments."""
        ...

    def capture(self, arrays: list[np.ndarray]) -> Capture: ...


class Progress:
    """A one-line progress bar on stderr, shown only for passes longer than about a second on a TTY."""

    def __init__(self, total: int, label: str, quiet: bool = False, delay: float = 1.0) -> None:
        self.total = max(total, 1)
        self.label = label
        self.enabled = not quiet and sys.stderr.isatty()
        self.start = time.monotonic()
        self.delay = delay
        self.shown = False

    def update(self, done: int) -> None:
        if not self.enabled or time.monotonic() - self.start < self.delay:
            return
        width = 30
        filled = int(width * min(done, self.total) / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} samples")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * (len(self.label) + 60) + "\r")
            sys.stderr.flush()


def flatten_outputs(value: Any) -> list[Any]:
    """Tensors/arrays of a (possibly nested) model output, in a stable order."""
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in flatten_outputs(item)]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in flatten_outputs(value[key])]
    if hasattr(value, "shape"):
        return [value]
    return []
