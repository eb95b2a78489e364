"""The framework-neutral model every rule sees: BatchNorm layers, modules, and a small node list.

Loaders build these; rules only read them, and read nothing else: no rule imports a framework or
looks at a format's own objects. Every fact a rule needs is a typed, documented field here; a
loader that cannot tell a fact leaves it None (and, for BNLayer attributes, out of `known`).
Tensors are lazy (`TensorRef`): a loader describes where the bytes are, and only the tensors a
rule asks for are ever read from disk.

Framework conventions (default eps, what momentum means, how the variance is stored) are in
`bnlint.conventions`, keyed by `BNLayer.framework`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Protocol

import numpy as np

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")

Framework = Literal["torch", "onnx", "keras", "caffe"]

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
    "keras",  # a Keras 3 .keras archive
    "keras-h5",  # a legacy Keras HDF5 model (config + weights)
    "keras-weights",  # Keras weights without a config (.weights.h5, legacy weights-only .h5)
    "caffe",  # .caffemodel and/or .prototxt
)

# Where a layer's mean/variance come from when it runs for inference:
#   stored   - tensors saved in the file (PyTorch buffers, ONNX initializers/Constants, Keras moving stats)
#   computed - computed from the input batch inside the graph (BN406)
#   input    - fed from outside the graph at run time
#   missing  - absent (e.g. track_running_stats=False)
#   unknown  - the loader could not tell
StatsSource = Literal["stored", "computed", "input", "missing", "unknown"]

# What an op is, as far as rules care. "conv" covers N-d convolutions; "dense" a fully connected
# layer (Linear, Gemm, Dense, InnerProduct); "matmul" a bare matrix product.
OpKind = Literal["conv", "conv_transpose", "dense", "matmul", "batchnorm", "other_norm", "other"]
FOLDABLE_KINDS = ("conv", "conv_transpose", "dense")  # a following inference BN folds into these


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


@dataclass(frozen=True)
class Producer:
    """The op whose output is a BatchNorm layer's input (graph formats: ONNX, Keras, Caffe)."""

    name: str  # node / layer name, for messages
    op: str  # the framework's own op or class name, for messages only (rules decide on `kind`)
    kind: OpKind
    has_bias: bool | None = None  # adds a bias (Conv bias input, use_bias, bias_term)
    bias: TensorRef | None = None  # that bias, when stored (None: computed or unknown)
    exclusive: bool = False  # the BN is its only consumer (and it is not a graph output): foldable


@dataclass(frozen=True)
class TracedCall:
    """A batch_norm call with training=True baked into a traced graph (TorchScript; BN405)."""

    layer: str | None  # the module that owns the call, if known
    code: str  # the call as written, for the message
    location: str = ""  # file:line inside the archive


@dataclass
class BNLayer:
    """One BatchNorm layer, whatever the file format.

    Attributes a format cannot tell are None *and* absent from `known`; `momentum` may be
    legitimately None in PyTorch (cumulative average), so rules check `is_known("momentum")`.
    `momentum` is always in PyTorch's convention: the weight of the *new* batch; `raw_momentum`
    is the number as the framework stores it (ONNX/Keras 0.9 is PyTorch 0.1; see conventions.py).
    """

    name: str  # a name a person recognises: module path (torch), layer path (Keras), node/layer name
    kind: str  # class or op: BatchNorm2d, SyncBatchNorm, BatchNormalization, BatchNorm (Caffe), ...
    framework: str  # "torch" | "onnx" | "keras" | "caffe": the row of bnlint.conventions
    certainty: str = "known"  # "known": class or op seen in the file; "inferred": from key names/shapes only
    order: int = 0  # position in definition / graph (execution) order
    channels: int | None = None
    tensors: dict[str, TensorRef] = field(default_factory=dict)  # weight, bias, running_mean, running_var
    eps: float | None = None
    momentum: float | None = None  # PyTorch convention
    raw_momentum: float | None = None  # the framework's own convention
    affine: bool | None = None
    track_running_stats: bool | None = None
    # Whether the layer normalises with batch statistics when the file is used as saved: a pickled
    # module's `training` flag, an ONNX node in training form, Caffe use_global_stats: false.
    training: bool | None = None
    training_reasons: list[str] = field(default_factory=list)  # why `training` is True, for messages
    num_batches_tracked: int | None = None
    # False when the format itself records that the statistics were never updated (Caffe: a zero
    # scale factor), with the reason for messages; None when the format does not say.
    stats_updated: bool | None = None
    stats_note: str | None = None
    requires_grad: dict[str, bool] = field(default_factory=dict)  # torch: per parameter
    # Keras: the layer's own `trainable` flag and the one in force (False if any enclosing model is
    # frozen). trainable=False puts Keras BatchNorm in inference mode even inside fit().
    trainable: bool | None = None
    effective_trainable: bool | None = None
    # Keras: the `training` argument a Functional config records at the call of this layer or of
    # its nearest enclosing sub-model that records one (`base(x, training=False)`); None when no
    # call records a bool. Keras 3's fit() passes training=True over it; tf.keras 2 honours it.
    call_training: bool | None = None
    stats_source: StatsSource = "stored"
    stats_ops: tuple[str, ...] = ()  # ops computing the statistics when stats_source == "computed"
    producer: Producer | None = None
    node_index: int | None = None  # this layer's entry in ModelInfo.nodes, when it has one
    axis: int | None = None  # the normalised (channel) axis as stored, when the format has one
    channel_axis: bool | None = None  # whether `axis` is the data's channel axis (False: suspicious)
    # Settings that change how statistics are computed in training (Keras/TF): renorm,
    # virtual_batch_size, synchronized; name -> value, only those set to a non-default.
    training_options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # other names of the same layer (e.g. the ONNX node name)
    # Whether a dropout / stochastic-depth module comes before this layer in definition or graph
    # order (None: the format does not show modules). Such a module makes train-mode statistics
    # larger than what eval mode sees ("variance shift", BN607).
    after_stochastic: bool | None = None
    # Two files describing the same layer disagree about its mode (Caffe: deploy prototxt vs
    # caffemodel); the loader's one-line account of how, for BN409.
    mode_disagreement: str | None = None
    # Why a statistic of this layer could not be checked the way the framework would read it (a
    # dataset of the wrong kind or shape, a name listed twice, a value behind an expression the
    # loader cannot resolve): one line each. Rules report these as warnings, never as clean.
    unchecked: list[str] = field(default_factory=list)
    known: set[str] = field(default_factory=set)
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

    def names(self) -> tuple[str, ...]:
        """The layer's name and its aliases (what per-layer ignores and baselines match)."""
        return (self.name, *self.aliases)


@dataclass
class ModuleRecord:
    """A module / layer of a model that has a tree (not only BN): what rules about modes need."""

    name: str
    class_name: str  # qualified, e.g. torch.nn.modules.batchnorm.BatchNorm2d, keras.layers.Conv2D
    training: bool | None = None  # torch: the saved train/eval flag
    trainable: bool | None = None  # Keras: the layer's own trainable flag
    effective_trainable: bool | None = None  # Keras: False if it or an enclosing model is frozen
    parent: str | None = None  # the enclosing (sub)model's name, "" for the top level
    has_weights: bool | None = None  # holds trainable-kind weights of its own (kernels, gammas)
    order: int = 0  # position in definition / execution order


@dataclass(frozen=True)
class GraphNode:
    """One op of a graph format, as rules see it: structure plus the stored weight and bias."""

    index: int
    name: str
    op: str  # the framework's op name, for messages only
    kind: OpKind
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    weight: TensorRef | None = None  # conv/dense/matmul: the stored weight, if any
    bias: TensorRef | None = None
    weight_rows_out: bool = True  # dense/matmul: whether rows of the weight are output units
    followed_by_bn: bool = False  # a BatchNorm consumes its output directly


@dataclass(frozen=True)
class GraphInput:
    """A runtime input of a graph: name, shape (ints, symbolic names or None) and dtype."""

    name: str
    shape: tuple[int | str | None, ...] | None
    dtype: str | None = None

    @property
    def batch(self) -> int | str | None:
        """The first dimension: an int when fixed at export, a name when symbolic."""
        return self.shape[0] if self.shape else None


@dataclass
class ModelInfo:
    """Everything a loader could learn safely from one model file."""

    path: str
    format: str
    framework: str = "torch"
    layers: list[BNLayer] = field(default_factory=list)
    modules: dict[str, ModuleRecord] = field(default_factory=dict)
    inputs: list[GraphInput] = field(default_factory=list)
    # Graph formats: the op list, built on first use of `.nodes` (rules that never walk the graph
    # should not pay for it).
    nodes_factory: Callable[[], list[GraphNode]] | None = field(default=None, repr=False)
    folded_bn: bool = False  # no BatchNorm left but linear ops: BN was probably folded at export
    # How many convolution and dense ops the whole file holds, control-flow bodies and functions
    # included (`nodes` lists the top-level graph only): what BN501 counts.
    linear_ops: tuple[int, int] = (0, 0)
    # An exported inference graph (ONNX, a Caffe net): folding BN into the op before it is a
    # deployment choice there (BN505), not in a training framework's model file.
    exported: bool = False
    other_norms: list[str] = field(default_factory=list)  # InstanceNorm/GroupNorm/LayerNorm/... seen and skipped
    key_prefix: str = ""  # a prefix shared by every tensor name ("module." from DataParallel)
    averaged_buffers: list[str] = field(default_factory=list)  # n_averaged buffers (SWA/EMA checkpoints)
    traced_training: list[TracedCall] = field(default_factory=list)
    hyper_parameters: Mapping[str, Any] | None = None  # Lightning hyper_parameters as plain values
    format_version: str | None = None  # e.g. "opset 13", "Keras 3.15.1": for messages
    # Informational facts for notes and debugging (opset, producer, checkpoint key, ...): never
    # read by rules; everything rules need is a field above.
    metadata: dict[str, Any] = field(default_factory=dict)
    # Qualified names the pickle scan found (never imported, never executed): execution
    # primitives the pickles name or call (BN001), and other callables outside the allowlist that
    # loading would call (BN003).
    unsafe_globals: list[str] = field(default_factory=list)
    unknown_callables: list[str] = field(default_factory=list)
    # TorchScript: operations its code would run that are not pure tensor computation (file or
    # console I/O, foreign op namespaces, anything unknown), as "op (where)"; running the model
    # then needs --trust.
    unsafe_code: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    file_format: str | None = None  # the bnlint.formats record that read it (set by load_model)

    _nodes: list[GraphNode] | None = field(default=None, repr=False, compare=False)
    _by_name: dict[str, BNLayer] | None = field(default=None, repr=False, compare=False)
    _by_name_size: int = field(default=-1, repr=False, compare=False)

    @property
    def nodes(self) -> list[GraphNode]:
        """The graph's ops in topological order ([] for formats without a graph)."""
        if self._nodes is None:
            self._nodes = self.nodes_factory() if self.nodes_factory is not None else []
        return self._nodes

    def layer(self, name: str) -> BNLayer | None:
        """The layer with this name or alias (the first one, as a scan in layer order would find).

        The index is built once and rebuilt when the list changes length: the engine asks once per
        finding, and a scan per question made a graph with one finding per layer quadratic.
        """
        if self._by_name is None or self._by_name_size != len(self.layers):
            index: dict[str, BNLayer] = {}
            for layer in self.layers:
                for alias in layer.names():
                    index.setdefault(alias, layer)
            self._by_name, self._by_name_size = index, len(self.layers)
        return self._by_name.get(name)
