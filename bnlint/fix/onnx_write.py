"""The ONNX side of `bnlint fix`, input and output: the result of a fix (OnnxFix), loading a model
safely, feeding it the --data sample, running (sub-)graphs, and writing the fixed model.

Loading. The file is parsed without onnx's external-data loader. Every tensor onnx would read from
another file (initializers, Constant values, attribute tensors, subgraphs and functions included:
onnx's own list) is first checked by bnlint's loader (`bnlint.loaders.onnx_tensors`: the location
stays inside the model's folder, symlinks resolved, and the byte range exists), then read with
onnx's `load_external_data_for_tensor`. Fixes work on this in-memory, all-inline copy; the input
file is only ever read. Models whose tensors exceed protobuf's 2 GiB message limit are refused:
onnxruntime could not be handed the in-memory graph.

Writing. The whole model must pass `onnx.checker.check_model(full_check=True)` (which includes
strict shape inference) before a byte is written; it is then written to a temporary file in the
output folder and moved into place with `os.replace`, so nobody sees a half-written model and a
failure leaves any old file intact. Everything else in the ModelProto (ir_version, opset imports,
producer, doc strings, metadata_props, node names, value_info, local functions) is carried over
untouched. If the input kept tensors in external data, so does the output: the tensors that were
external (by name), and new tensors of 1 KiB or more, go to one file next to the output named
`<output file name>.data`; the input's data files are never written unless the fix is in place.

Running. Graphs run with onnxruntime (CPU provider; optimisation level chosen per use: "all" for
the recalibration segments, whose cut tensors are outputs and so cannot be folded away; "none" for
checks, so that a BN really executes) or with onnx's ReferenceEvaluator (`engine="reference"`).
Large initializers reach onnxruntime as OrtValues over numpy arrays rather than through protobuf
serialisation, all sessions share one CPU arena, and outputs can be written into given buffers.
Data arrays are matched to the graph inputs as the linter's --data does and cast to the inputs'
element types; a batch dimension fixed in the graph fixes the chunk size.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors, load_external_data_for_tensor

from bnlint.dynamic.data import ArraySource, Dataset, check_layout
from bnlint.errors import DataError, InputError, UsageError
from bnlint.fix.onnx_graph import GraphFacts
from bnlint.loaders.onnx_file import _torch_scope, load_onnx
from bnlint.loaders.onnx_tensors import _tensor_ref

if TYPE_CHECKING:
    from bnlint.fix.recalibrate import LayerRecalibration

Outputs = Callable[..., list[np.ndarray]]  # (names, feeds, into=None) -> arrays; `into`: buffers to write outputs into
_SHARED_ARENA = False
PROTOBUF_LIMIT = 2**31 - 1  # bytes: one serialised ModelProto
EXTERNAL_THRESHOLD = 1024  # bytes: new tensors at least this large go to external data (onnx's own default)


@dataclass
class OnnxFix:
    """A fixed ONNX model in memory and what was done to it; `write` saves it.

    `layers`: recalibrated layers (`bnlint.fix.recalibrate.LayerRecalibration`: name, old and new
    mean/var, count = samples x spatial positions, before/after drift); `rewritten`: layers turned
    from training to inference form; `folded`: layers folded into the op before them; `refused`:
    layer -> why it was left alone; `metrics`: numerical checks and costs (max abs differences,
    seconds, peak cache bytes). Layer names are bnlint's (node names, as `load_onnx` gives them).
    """

    source: str
    model: onnx.ModelProto
    names: dict[str, str]  # a BN node's first output (Y) -> its bnlint layer name
    external: dict[str, str]  # initializer -> its external-data location in the input
    original: frozenset[str]  # initializer names of the input
    layers: list[LayerRecalibration] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False

    def layer_name(self, index: int, node: onnx.NodeProto) -> str:
        return self.names.get(node.output[0] if node.output else "", node.name or f"BatchNormalization_{index}")

    def module_name(self, index: int, node: onnx.NodeProto) -> str:
        """The other name `--layers` globs may match: the node's own name when the layer is named by
        its PyTorch module path (`bn2` is `/bn2/BatchNormalization`), else the module path a dynamo
        export recorded."""
        name = self.layer_name(index, node)
        if node.name and node.name != name:
            return node.name
        return _torch_scope(node)[0] or name

    def copy(self) -> OnnxFix:
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        return OnnxFix(self.source, model, dict(self.names), dict(self.external), self.original, list(self.layers),
                       list(self.rewritten), list(self.folded), dict(self.refused), dict(self.metrics), list(self.notes), self.dry_run)

    def check(self) -> None:
        """onnx.checker with full_check (strict shape inference); a failure is an InputError."""
        try:
            onnx.checker.check_model(self.model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise InputError(self.source, f"the fixed model fails onnx.checker: {str(exc).strip().splitlines()[0][:300]}") from None

    def write(self, out_path: str | os.PathLike[str] | None, in_place: bool = False) -> Path:
        """Check, then write atomically; returns the path written. Refuses a dry run, and writing
        over the input unless `in_place`."""
        if self.dry_run:
            raise UsageError("dry run: the new statistics were computed but nothing is written")
        source = Path(self.source)
        target = source if in_place and out_path is None else Path(out_path) if out_path is not None else None
        if target is None:
            raise UsageError("give an output path (-o FIXED) or in_place=True")
        if target.resolve() == source.resolve() and not in_place:
            raise UsageError(f"{target} is the input model; pass in_place=True (--in-place) to overwrite it")
        if in_place and target.resolve() != source.resolve():
            raise UsageError("in_place=True writes over the input; do not give another output path")
        self.check()
        if not target.parent.is_dir():
            raise UsageError(f"output folder {target.parent} does not exist")
        if self.external:
            _write_external(self, target, in_place)
        else:
            _replace(target, self.model.SerializeToString())
        return target


def _replace(target: Path, payload: bytes) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _write_external(fix: OnnxFix, target: Path, in_place: bool) -> None:
    """Tensors external in the input (and large new ones) to `<target name>.data`, then the model."""
    location = f"{target.name}.data"
    data_path = target.parent / location
    inputs = {(Path(fix.source).parent / loc).resolve() for loc in fix.external.values()}
    if data_path.resolve() in inputs and not in_place:
        raise UsageError(f"writing {target} would overwrite {data_path}, external data of the input model; choose another output name")
    model = onnx.ModelProto()
    model.CopyFrom(fix.model)
    handle, temp = tempfile.mkstemp(prefix=f".{location}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            offset = 0
            for tensor in model.graph.initializer:
                size = len(tensor.raw_data) if tensor.HasField("raw_data") else None
                new_and_large = tensor.name not in fix.original and tensor.ByteSize() >= EXTERNAL_THRESHOLD
                if tensor.name not in fix.external and not new_and_large:
                    continue
                if size is None:  # typed fields (float_data, ...): store as raw bytes
                    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
                payload = tensor.raw_data
                stream.write(payload)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(payload)))):
                    tensor.external_data.add(key=key, value=value)
                offset += len(payload)
        payload = model.SerializeToString()
        os.replace(temp, data_path)  # data first: once the model appears, its data is in place
        _replace(target, payload)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fix.notes.append(f"tensors kept in external data: {data_path.name}")
    orphans = sorted({loc for loc in fix.external.values() if (Path(fix.source).parent / loc).resolve() != data_path.resolve()})
    if in_place and orphans:
        fix.notes.append(f"the input's external data file(s) {', '.join(orphans)} are no longer used by the model (left in place)")


def load_fix(source: str | os.PathLike[str] | OnnxFix) -> OnnxFix:
    """An OnnxFix to work on: a copy of one (fixes chain), or a model file read safely (see module doc)."""
    if isinstance(source, OnnxFix):
        return source.copy()
    path = Path(source)
    info = load_onnx(path)  # the linter's names for the layers; refuses unsafe external data
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types
        raise InputError(str(path), f"onnx.load failed: {exc}") from None
    external = {t.name: next((e.value for e in t.external_data if e.key == "location"), "")
                for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    size = path.stat().st_size
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        _tensor_ref(tensor, path)  # raises InputError for a location outside the folder or a bad range
        try:
            load_external_data_for_tensor(tensor, str(path.absolute().parent))
        except (OSError, ValueError) as exc:
            raise InputError(str(path), f"cannot read external data of {tensor.name!r}: {exc}") from None
        size += tensor.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise InputError(str(path), "the model is larger than 2 GiB with its tensors inline; the ONNX fix cannot run it")
    names: dict[str, str] = {}
    for layer in info.layers:
        if layer.node_index is not None and model.graph.node[layer.node_index].output:
            names[model.graph.node[layer.node_index].output[0]] = layer.name
    return OnnxFix(str(path), model, names, external, frozenset(t.name for t in model.graph.initializer))


@dataclass
class DataFeed:
    """The --data arrays feeding the model's runtime inputs, cast to their element types, in chunks."""

    path: str
    names: list[str]
    dtypes: list[np.dtype]
    sources: list[ArraySource]
    batch_size: int
    samples: int

    def batches(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        total = self.samples if limit is None else min(limit, self.samples)
        for chunk in zip(*(s.batches(self.batch_size, total) for s in self.sources)):
            yield {n: np.ascontiguousarray(a, dtype=d) for n, d, a in zip(self.names, self.dtypes, chunk)}

    def bytes(self) -> int:
        return sum(int(np.prod(s.sample_shape, dtype=np.int64)) * d.itemsize for s, d in zip(self.sources, self.dtypes)) * self.samples


def open_data(fix: OnnxFix, data: str | os.PathLike[str], inputs: Mapping[str, str] | None, batch_size: int) -> DataFeed:
    """Match the data's arrays to the graph inputs (like the linter's --data); a fixed batch size wins."""
    path = os.fspath(data)
    facts = GraphFacts(fix.model.graph)
    values = {v.name: v for v in fix.model.graph.input}
    names = facts.inputs
    sources = Dataset(path).select(names, dict(inputs or {}))
    dtypes, fixed = [], set()
    for name, source in zip(names, sources):
        tensor = values[name].type.tensor_type
        dtypes.append(np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)) if tensor.elem_type else np.dtype(np.float32))
        if tensor.HasField("shape") and len(tensor.shape.dim):
            dims = list(tensor.shape.dim)
            check_layout(source, [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:]], name, path)
            if dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                fixed.add(int(dims[0].dim_value))
    samples = sources[0].samples if sources else 0
    if fixed:
        batch_size = min(fixed)
        usable = samples - samples % batch_size
        if usable == 0:
            raise DataError(path, f"the model's batch size is fixed at {batch_size} but the data holds {samples} sample(s)")
        if usable < samples:
            fix.notes.append(f"the model's batch size is fixed at {batch_size}: the last {samples - usable} sample(s) were not used")
        samples = usable
    return DataFeed(path, names, dtypes, sources, int(batch_size), samples)


def sample_inputs(fix: OnnxFix, data: str | os.PathLike[str] | None, inputs: Mapping[str, str] | None, samples: int,
                  seed: int = 0) -> dict[str, np.ndarray] | None:
    """A few samples to check a fix with: the first of `data`, else seeded standard-normal arrays
    (float inputs with fully known per-sample shapes only; None when that is not possible)."""
    if data is not None:
        feed = open_data(fix, data, inputs, samples)
        return next(feed.batches(limit=feed.batch_size), None)
    rng = np.random.default_rng(seed)
    feeds = {}
    runtime = GraphFacts(fix.model.graph).inputs
    for value in fix.model.graph.input:
        if value.name not in runtime:
            continue
        tensor = value.type.tensor_type
        dims = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else 0 for d in tensor.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)) if tensor.elem_type else None
        if not dims or 0 in dims[1:] or dtype is None or dtype.kind != "f":
            return None
        feeds[value.name] = rng.standard_normal((dims[0] or samples, *dims[1:])).astype(dtype)
    return feeds


def pick_engine(engine: str) -> str:
    if engine not in ("auto", "onnxruntime", "reference"):
        raise UsageError(f"onnx engine must be auto, onnxruntime or reference, not {engine!r}")
    if engine == "reference":
        return engine
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if engine == "onnxruntime":
            raise UsageError("onnxruntime is not installed (pip install bnlint[onnxruntime])") from None
        return "reference"
    return "onnxruntime"


def session(model: onnx.ModelProto, engine: str, where: str, level: str = "all") -> Outputs:
    """A callable running `model` with onnxruntime (optimisation `level`: all, basic or none) or
    onnx's ReferenceEvaluator. Errors become one-line InputErrors (load) or DataErrors (run)."""
    if engine == "reference":
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model)
        return lambda names, feeds, into=None: [np.asarray(v) for v in evaluator.run(names, dict(feeds))]
    import onnxruntime as ort

    options = ort.SessionOptions()
    levels = {"all": "ORT_ENABLE_ALL", "basic": "ORT_ENABLE_BASIC", "none": "ORT_DISABLE_ALL"}
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[level])
    options.log_severity_level = 3
    # One arena shared by all our sessions (registered once per process): a segment's session
    # otherwise page-faults its own fresh intermediate buffers in (53 sessions for a ResNet-50:
    # a quarter of the run in system time). The arena keeps its peak size until the process ends.
    global _SHARED_ARENA
    if not _SHARED_ARENA:
        try:
            memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))
        except Exception:  # already registered by someone else in this process: share theirs
            pass
        _SHARED_ARENA = True
    options.add_session_config_entry("session.use_env_allocators", "1")
    # Large initializers go to onnxruntime as OrtValues over numpy arrays (its documented
    # external-initializer path) instead of through protobuf: serialising a 100 MB graph costs
    # ~1 s, handing it over ~0.1 s. `arrays` keeps the buffers alive as long as the session.
    light = onnx.ModelProto()
    light.CopyFrom(model)
    names, arrays = [], []
    for tensor in light.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD and tensor.data_type != onnx.TensorProto.STRING:
            arrays.append(numpy_helper.to_array(tensor))
            names.append(tensor.name)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value="bnlint-in-memory")
    if names:
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    try:
        sess = ort.InferenceSession(light.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InputError(where, f"onnxruntime could not load the graph: {str(exc).strip().splitlines()[0][:300]}") from None
    return _OrtRunner(sess, arrays, where)


class _OrtRunner:
    """An onnxruntime session as a Runner; holds the arrays its external initializers point into."""

    def __init__(self, sess: Any, arrays: list[np.ndarray], where: str) -> None:
        self.sess, self.arrays, self.where = sess, arrays, where

    def __call__(self, names: list[str], feeds: Mapping[str, np.ndarray], into: list[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """Outputs `names`; with `into`, written into those buffers (None: a new array) through an
        IO binding, which saves the page faults of a fresh 100 MB array per output and call."""
        try:
            if into is None or not any(buffer is not None for buffer in into):
                return list(self.sess.run(names, dict(feeds)))
            binding = self.sess.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            for name, buffer in zip(names, into):
                if buffer is None:
                    binding.bind_output(name, "cpu")
                else:
                    binding.bind_output(name, "cpu", 0, buffer.dtype.type, list(buffer.shape), buffer.ctypes.data)
            try:
                self.sess.run_with_iobinding(binding)
            except Exception:  # a bound buffer's shape was wrong (an output without a batch axis): allocate
                return list(self.sess.run(names, dict(feeds)))
            values = binding.get_outputs()
            return [buffer if buffer is not None else values[i].numpy() for i, buffer in enumerate(into)]
        except Exception as exc:  # shape/type mismatches with the data
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise DataError(self.where, f"the model rejected the data: {text}") from None
