"""The framework-neutral model every rule sees: BatchNorm layers plus (where the format has one) a graph.

Loaders build these; rules only read them. Tensors are lazy (`TensorRef`): a loader describes
where the bytes are, and only the tensors a rule asks for are ever read from disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

if TYPE_CHECKING:  # networkx is imported only by the loaders that build a graph
    import networkx as nx

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")

# Model formats a loader can report (ModelInfo.format).
FORMATS = (
    "torch-state-dict",  # a bare mapping of tensor names to tensors
    "torch-checkpoint",  # a training checkpoint dict holding a state_dict (+ optimizer, epoch, ...)
    "lightning",  # a PyTorch Lightning checkpoint
    "torch-module",  # a pickled nn.Module (read without running it)
    "torchscript",
    "safetensors",
    "onnx",
    "torch-live",  # a live nn.Module handed to the Python API (no file)
)


class TensorRef(Protocol):
    """A tensor that has not necessarily been read yet."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> str:
        """Stored dtype as a numpy-style name: float32, float16, bfloat16, float64, int64, ..."""
        ...

    def numpy(self) -> np.ndarray:
        """The values, read now. bfloat16 comes back as float32 (exactly representable)."""
        ...


@dataclass(frozen=True)
class ArrayTensor:
    """A TensorRef over values already in memory."""

    array: np.ndarray
    stored_dtype: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> str:
        return self.stored_dtype or str(self.array.dtype)

    def numpy(self) -> np.ndarray:
        return self.array


@dataclass
class BNLayer:
    """One BatchNorm layer, whatever the file format.

    Attributes a format cannot tell are None *and* absent from `known`; `momentum` may be
    legitimately None in PyTorch (cumulative average), so rules check `is_known("momentum")`.
    `momentum` is always in PyTorch's convention: the weight of the *new* batch
    (ONNX/Keras momentum m is stored as 1 - m, the raw value in `extra["raw_momentum"]`).
    """

    name: str
    kind: str  # BatchNorm1d/2d/3d, SyncBatchNorm, FrozenBatchNorm2d, BatchNormalization (ONNX), "BatchNorm" if inferred
    framework: str  # "torch" or "onnx"
    certainty: str = "known"  # "known": class or op seen in the file; "inferred": from key names/shapes only
    order: int = 0  # position in definition / graph order
    channels: int | None = None
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    eps: float | None = None
    momentum: float | None = None
    affine: bool | None = None
    track_running_stats: bool | None = None
    training: bool | None = None
    num_batches_tracked: int | None = None
    requires_grad: dict[str, bool] = field(default_factory=dict)
    known: set[str] = field(default_factory=set)
    extra: dict[str, Any] = field(default_factory=dict)
    _cache: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False, compare=False)

    def is_known(self, attribute: str) -> bool:
        return attribute in self.known

    def array(self, tensor: str) -> np.ndarray | None:
        """The named BN tensor as a flat float64 array (read once, cached), or None if absent."""
        if tensor not in self._cache:
            ref = self.tensors.get(tensor)
            self._cache[tensor] = None if ref is None else np.asarray(ref.numpy(), dtype=np.float64).reshape(-1)
        return self._cache[tensor]

    def dtype(self, tensor: str) -> str | None:
        ref = self.tensors.get(tensor)
        return None if ref is None else ref.dtype


@dataclass
class ModuleRecord:
    """A module of a pickled or scripted model (not only BN): what rules about modes need."""

    name: str
    class_name: str  # qualified, e.g. torch.nn.modules.batchnorm.BatchNorm2d
    training: bool | None = None


@dataclass
class ModelInfo:
    """Everything a loader could learn safely from one model file."""

    path: str
    format: str
    layers: list[BNLayer] = field(default_factory=list)
    modules: dict[str, ModuleRecord] = field(default_factory=dict)
    # Builds the networkx graph on first use of `.graph`: importing networkx costs ~0.1 s,
    # which a pre-commit run of rules that never walk the graph should not pay.
    graph_factory: "Callable[[], nx.DiGraph] | None" = field(default=None, repr=False)
    # Format-specific facts rules may use. Documented keys:
    #   producer, opset (ONNX); hyper_parameters (Lightning); key_prefix ("module." etc.);
    #   averaged_buffers (names of n_averaged buffers: SWA/EMA); traced_training_bn (TorchScript
    #   batch_norm calls with training=True baked in); folded_bn (ONNX: BN folded into Conv);
    #   other_norms (InstanceNorm/GroupNorm/LayerNorm names seen and deliberately skipped).
    metadata: dict[str, Any] = field(default_factory=dict)
    # Qualified names of pickle globals the safe reader refused to import (never executed).
    unsafe_globals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    _graph: "nx.DiGraph | None" = field(default=None, repr=False, compare=False)

    @property
    def graph(self) -> "nx.DiGraph | None":
        """The network as a networkx DiGraph (ONNX: one node per ONNX node, edges producer -> consumer)."""
        if self._graph is None and self.graph_factory is not None:
            self._graph = self.graph_factory()
        return self._graph

    def layer(self, name: str) -> BNLayer | None:
        return next((layer for layer in self.layers if layer.name == name), None)
