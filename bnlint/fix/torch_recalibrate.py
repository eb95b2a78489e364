"""The torch engine of `bnlint fix`: exact, layer-by-layer BatchNorm recalibration.

    from bnlint.fix.torch_recalibrate import recalibrate_module
    result = recalibrate_module(model, batches, layers="layer3.*")   # writes the module's BN buffers
    write_torch_fix("model.pt", "fixed.pt", result.new_stats())      # bnlint.fix.torch_write

`recalibrate_file(path, data, arch=...)` does the same from a model file and a --data sample, naming
layers as bnlint's static loader names them for that file. The statistics (population mean and
unbiased variance of each layer's input in eval mode, upstream layers already recalibrated) are
explained in `bnlint.fix.recalibrate`. Three ways to run, chosen by `method="auto"`:

1. "layer-major" (an nn.Module torch.fx can trace: torchvision-style ResNets, EfficientNets).
   The graph is walked once in topological order, each node computed for every batch before the
   next node; values are freed after their last use and nodes after the last selected layer are
   skipped. At a BatchNorm node its input exists for all the data: its statistics are measured,
   merged and written, then its output is computed. Cost: one forward pass. Memory: the values
   alive across the widest cut of the graph, times the number of samples; a one-sample probe pass
   estimates it first and above `memory_budget` (default: half the memory available) the
   engine falls back to 2.
2. "truncated" (fx cannot trace the model, or over budget). Pass k runs every batch and stops (a
   private exception) once the k-th layer in execution order has been measured: ~K/2 passes for
   K layers. So, every submodule output completed before any unsettled layer ran is final: it is
   cached and replayed in later passes (each module's `forward` is wrapped for the run and
   restored in `finally`), and a pass then computes only from the last cached cut to its layer,
   near one pass in all for models built from submodules. Cached bytes count against
   `memory_budget` (beyond it, passes recompute). An output modified in place later is caught by
   its version counter and cloned from then on; outputs aliasing an input (in-place ReLU) rerun.
3. "torchscript" (`torch.jit.load`ed, scripted or traced in eval mode). Hooks never fire inside
   TorchScript, so the forward graph is copied, inlined and frozen in eval mode (`self.training`
   reads become False; shape checks that would keep everything alive are dropped once the full
   model has accepted a sample), then cut into segments that end at each selected batch_norm:
   layer-major again, each segment run over every batch from the values carried across the cut,
   returning the layer's per-sample input moments and what later nodes need. The scripted
   forward reads its buffers at run time, so `copy_` into them is what the next segment sees.
   Segments run without the profiling executor (`_unoptimised`): same kernels, same bits, none
   of the per-function profiling and specialisation that cost more than the convolutions.
   Above `memory_budget`, each segment starts from the inputs instead ("torchscript-truncated",
   ~K/2 passes). A graph traced in train mode has batch_norm(training=True) baked in and is
   refused: re-trace it after model.eval() (BN405).

Distributed (`process_group`, e.g. `torch.distributed.group.WORLD` under torchrun): each process
passes its shard; before a layer is written, every process's (n, mean, M2) is all-gathered and
merged with Chan's update in rank order, so all write the same bits (equal to one process's
result to rounding).

num_batches_tracked becomes the larger of the layer's old counter and the number of samples the
new statistics average (all processes). The batch count `update_bn` leaves would claim a short
momentum history: read as n EMA updates from the initial values it says 0.9**n of them remain
(43% after 8 batches), and linters flag it (BN105), while these statistics are an exact average
over the data. A larger old counter is kept (the layer's training history is unchanged); else
the sample count says the estimate is as good as that many one-sample updates. The counter only
matters to training with momentum=None, where a resumed cumulative average then weighs the
estimate as that many samples. Only running_mean, running_var and num_batches_tracked are
written; train/eval flags are restored afterwards.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn

from bnlint.conventions import conventions
from bnlint.dynamic.hooks import eval_mode, is_batchnorm, per_sample_moments
from bnlint.dynamic.stats import Accumulator, LayerMoments, NumpyOps, TorchOps
from bnlint.fix.recalibrate import (
    LayerRecalibration,
    RecalibrationError,
    RecalibrationResult,
    available_memory,
    empty_moments,
    finish_layer,
    gib,
    merge_parts,
    pack_moments,
    select,
    unpack_moments,
)

Batch = Any  # a Tensor, an np.ndarray, or a tuple/list of them (the model's positional inputs)
METHODS = ("auto", "layer-major", "truncated")


class _Stop(Exception):
    """Raised on entering the layer a truncated pass measures: the rest of the forward is not needed."""


@dataclass
class _Layer:
    """One BatchNorm layer being recalibrated: where its buffers are, and its input's per-sample moments so far."""

    name: str  # the static loader's name
    path: str  # module / attribute path in the running network
    owner: Any  # the module holding running_mean / running_var / num_batches_tracked
    order: int = 0
    moments: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # spatial size -> [(var, mean)]
    calls: int = 0


def _tensor_of(owner: Any, key: str) -> torch.Tensor | None:
    value = getattr(owner, key, None)
    return value if isinstance(value, torch.Tensor) else None


def _storages(owner: Any) -> set[int]:
    """Where a layer's running statistics live: two layers sharing any is one layer."""
    found = (_tensor_of(owner, key) for key in ("running_mean", "running_var"))
    return {t.untyped_storage().data_ptr() for t in found if t is not None and t.numel()}


def _host(value: torch.Tensor | None) -> np.ndarray | None:
    return None if value is None else value.detach().double().cpu().numpy().reshape(-1)


class _Run:
    """Collects layers' per-sample input moments, merges them (across processes too) and writes the buffers.

    Per-sample (N, C) moments are kept until the layer is settled and then pooled in one
    Accumulator call: tiny tensor ops between large convolutions can each stall for tens of
    milliseconds on a CPU thread pool (measured: index_add_ 0.02 ms alone, ~50 ms right after a
    conv2d), so the small float64 work happens once per layer, in numpy on CPU.
    """

    def __init__(self, device: torch.device, group: Any) -> None:
        self.ops = TorchOps(device) if device.type != "cpu" else NumpyOps()
        self.group = group
        self.results: list[LayerRecalibration] = []
        self.settled = 0

    def add(self, layer: _Layer, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
            raise RecalibrationError(f"layer {layer.name}: expected an (N, C, ...) tensor input, got {type(x).__name__}")
        var, mean = per_sample_moments(x)
        self.add_moments(layer, var, mean, x[0, 0].numel())

    def add_moments(self, layer: _Layer, var: torch.Tensor, mean: torch.Tensor, size: int) -> None:
        layer.moments.setdefault(size, []).append((var, mean))
        layer.calls += 1

    def _local(self, layer: _Layer, channels: int) -> LayerMoments:
        parts = []
        for size, pairs in layer.moments.items():
            var, mean = (torch.cat([p[i] for p in pairs]) for i in (0, 1))
            accumulator = Accumulator(self.ops, np.full(channels, size), np.zeros(channels))
            if isinstance(self.ops, NumpyOps):
                accumulator.add(var.double().numpy(), mean.double().numpy())
            else:
                accumulator.add(var, mean)
            parts.append(accumulator.result())
        layer.moments.clear()
        moments = parts[0] if parts else empty_moments(channels)
        for more in parts[1:]:
            moments = moments.merged(more)
        return moments

    def gather(self, vector: np.ndarray) -> list[np.ndarray]:
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        mine = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float64)).to(device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, mine, group=self.group)
        return [p.cpu().numpy() for p in parts]

    def settle(self, layer: _Layer) -> None:
        """Merge (across processes too), check, and write the layer's new statistics."""
        mean_buffer, var_buffer = _tensor_of(layer.owner, "running_mean"), _tensor_of(layer.owner, "running_var")
        if mean_buffer is None or var_buffer is None:
            raise RecalibrationError(f"layer {layer.name} has no running statistics to write")
        moments, calls = self._local(layer, mean_buffer.numel()), layer.calls
        if self.group is not None:
            moments, calls = merge_parts([unpack_moments(v) for v in self.gather(pack_moments(moments, calls))])
        if moments.samples == 0:
            return  # reported as skipped: never ran on this data (on any process)
        counter = _tensor_of(layer.owner, "num_batches_tracked")
        old_counter = None if counter is None else int(counter.item())
        written = max(old_counter or 0, moments.samples)  # never a short batch count (module docstring)
        old = {key: _host(_tensor_of(layer.owner, key)) for key in ("running_mean", "running_var", "weight")}
        result = finish_layer(layer.name, layer.path, layer.order, moments, written, float(getattr(layer.owner, "eps", conventions("torch").default_eps)), old,
                              old_counter, counter is not None)
        with torch.no_grad():
            mean_buffer.copy_(torch.from_numpy(result.mean))
            var_buffer.copy_(torch.from_numpy(result.var))
            if counter is not None:
                counter.fill_(written)
        layer.order = self.settled
        result.order = self.settled
        self.settled += 1
        self.results.append(result)


# ------------------------------------------------------------------ 1. layer-major over an fx graph
class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every BatchNorm (also user subclasses) kept as one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module) -> fx.Graph | None:
    """The module's fx graph (traced in its current mode), or None when fx cannot trace it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _Tracer().trace(module)
    except Exception:  # noqa: BLE001 - fx fails in many ways (TraceError, TypeError, NotImplementedError, ...): fall back
        return None


def _storage_bytes(values: Iterable[Any], seen: set[int]) -> int:
    total = 0
    for value in values:
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


class LayerMajor:
    """Walk an fx graph node by node, each node over every batch; settle BN layers as they come."""

    def __init__(self, root: nn.Module, graph: fx.Graph, layers: Mapping[str, _Layer]) -> None:
        self.root = root
        self.nodes = list(graph.nodes)
        self.layers = layers
        calls = [n for n in self.nodes if n.op == "call_module" and n.target in layers]
        shared = sorted({str(n.target) for n in calls if sum(m.target == n.target for m in calls) > 1})
        if shared:
            raise RecalibrationError(f"BatchNorm layer {layers[shared[0]].name} is called more than once per forward pass: its statistics "
                                     "would depend on its own output, so exact recalibration is not defined for it")
        self.missing = [p for p in layers if p not in {str(n.target) for n in calls}]
        needed = set(calls)
        for node in reversed(self.nodes):
            if node in needed:
                needed.update(node.all_input_nodes)
        self.needed = needed
        self.last_use: dict[fx.Node, int] = {}
        for index, node in enumerate(self.nodes):
            if node in needed:
                for source in node.all_input_nodes:
                    self.last_use[source] = index

    def _value(self, node: fx.Node, env: dict[fx.Node, list[Any]], chunk: int) -> Any:
        args = fx.node.map_arg(node.args, lambda n: env[n][chunk])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][chunk])
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]  # fx types targets as str | Callable
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)  # call_method

    def run(self, chunks: Sequence[tuple[Any, ...]], run: _Run | None) -> int:
        """Settle every layer (or, with run=None, only measure): returns the peak bytes of live values."""
        env: dict[fx.Node, list[Any]] = {}
        position, peak = 0, 0
        for index, node in enumerate(self.nodes):
            if node not in self.needed:
                continue
            if node.op == "placeholder":
                default = node.args[0] if node.args else None
                env[node] = [c[position] if position < len(c) else default for c in chunks]
                position += 1
            elif node.op == "get_attr":
                target: Any = self.root
                for atom in str(node.target).split("."):
                    target = getattr(target, atom)
                env[node] = [target] * len(chunks)
            else:
                layer = self.layers.get(str(node.target)) if node.op == "call_module" else None
                if layer is not None and run is not None:
                    for chunk in range(len(chunks)):
                        run.add(layer, env[node.args[0]][chunk])  # a BN's first argument is a Node
                    run.settle(layer)
                if node in self.last_use:  # something still needs this node's output
                    env[node] = [self._value(node, env, chunk) for chunk in range(len(chunks))]
            if run is None:  # probe: bytes alive after this node (parameters excluded: they exist anyway)
                seen: set[int] = set()
                live = [v for n, values in env.items() if n.op != "get_attr" for v in values]
                peak = max(peak, _storage_bytes(live, seen))
            for source in node.all_input_nodes:
                if self.last_use.get(source) == index:
                    del env[source]
        return peak


# ------------------------------------------------------------------ 2. truncated passes over an nn.Module
def _leaves(value: Any) -> list[torch.Tensor] | None:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        found: list[torch.Tensor] = []
        for item in value:
            inner = _leaves(item)
            if inner is None:
                return None
            found += inner
        return found
    return None


def _rebuild(template: Any, tensors: Iterable[torch.Tensor]) -> Any:
    it = iter(tensors)

    def build(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return next(it)
        return type(value)(build(v) for v in value)

    return build(template)


@dataclass
class _Entry:
    """A cached, final submodule output: replayed as is unless modified in place since (then cloned)."""

    template: Any
    tensors: list[torch.Tensor]
    versions: list[int]
    clone: bool
    size: int

    def replay(self) -> Any:
        if self.clone:
            return _rebuild(self.template, [t.clone() for t in self.tensors])
        if any(t._version != v for t, v in zip(self.tensors, self.versions)):
            return None  # a consumer wrote into it after it was returned: stale
        return _rebuild(self.template, self.tensors)


class Truncated:
    """Truncated passes over an nn.Module, resumed from cached final submodule outputs."""

    def __init__(self, root: nn.Module, layers: Mapping[str, _Layer], run: _Run, budget: float) -> None:
        self.root, self.layers, self.run, self.budget = root, layers, run, budget
        self.unsettled = set(layers)
        self.target: str | None = None
        self.key: tuple[int, ...] = ()
        self.seen: dict[str, int] = {}
        self.dirty = False  # an unsettled layer ran in this forward: nothing after it is final
        self.cache: dict[tuple[Any, ...], _Entry] = {}
        self.cached_bytes = 0
        self.clones: set[tuple[str, int]] = set()
        self.nested: list[list[tuple[Any, ...]]] = []
        self.mixed: set[str] = set()

    def _forward(self, name: str, original: Any, *args: Any, **kwargs: Any) -> Any:
        occurrence = self.seen.get(name, 0)
        self.seen[name] = occurrence + 1
        if name in self.layers:
            if occurrence:
                raise RecalibrationError(f"BatchNorm layer {self.layers[name].name} is called more than once per forward pass: its statistics "
                                         "would depend on its own output, so exact recalibration is not defined for it")
            if name in self.unsettled:
                if name == self.target:
                    self.run.add(self.layers[name], args[0])
                    raise _Stop
                self.dirty = True
                self.mixed.add(str(self.target))
        key = (*self.key, name, occurrence)
        entry = self.cache.pop(key, None)
        if entry is not None:
            self.cached_bytes -= entry.size
            value = entry.replay()
            if value is not None:
                self._store(key, entry)
                return value
            self.clones.add((name, occurrence))
        self.nested.append([])
        try:
            out = original(*args, **kwargs)
        finally:
            inner = self.nested.pop()
        entry = None if self.dirty else self._entry(out, args, (name, occurrence) in self.clones)
        if entry is not None and self.cached_bytes + entry.size <= self.budget:
            for nested_key in inner:  # covered by this call from now on
                dropped = self.cache.pop(nested_key, None)
                self.cached_bytes -= dropped.size if dropped else 0
            self._store(key, entry)
        elif self.nested:
            self.nested[-1].extend(inner)
        return out

    def _store(self, key: tuple[Any, ...], entry: _Entry) -> None:
        self.cache[key] = entry
        self.cached_bytes += entry.size
        if self.nested:
            self.nested[-1].append(key)

    @staticmethod
    def _entry(out: Any, args: tuple[Any, ...], clone: bool) -> _Entry | None:
        tensors = _leaves(out)
        if not tensors:
            return None
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        if any(t.untyped_storage().data_ptr() in inputs for t in tensors):
            return None  # in place: rerunning it is as cheap as replaying it
        kept = [t.clone() for t in tensors] if clone else tensors
        size = _storage_bytes(kept, set())
        return _Entry(out, kept, [t._version for t in kept], clone, size)

    def run_passes(self, chunks: Sequence[tuple[Any, ...]], order: Sequence[str]) -> int:
        """One truncated pass per layer, in `order` (execution order); returns the passes run. Wrappers removed in `finally`."""
        wrapped: list[tuple[nn.Module, Any]] = []
        try:
            for name, module in self.root.named_modules():
                if name:
                    wrapped.append((module, module.__dict__.get("forward")))
                    module.forward = functools.partial(self._forward, name, module.forward)  # an instance attribute, on purpose
            active = list(range(len(chunks)))
            for self.target in order:
                finished = []
                for index in active:
                    self.key, self.seen, self.dirty = (index,), {}, False
                    try:
                        self.root(*chunks[index])
                        if not self.dirty:
                            finished.append(index)  # reached no unsettled layer: never will
                    except _Stop:
                        pass
                active = [i for i in active if i not in finished]
                self.run.settle(self.layers[self.target])
                self.unsettled.discard(self.target)
            return len(order)
        finally:
            for module, previous in wrapped:
                if previous is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = previous
            self.cache.clear()


# ------------------------------------------------------------------ 3. TorchScript
# Ops an output-less `if` may hold and still be only a check (raise on a bad shape): safe to drop
# once the full model has accepted the data, and dropping them lets the graph be cut.
CHECK_OPS = frozenset({"prim::RaiseException", "prim::Constant", "aten::format", "aten::dim", "aten::size", "aten::len", "aten::__getitem__",
                       "aten::eq", "aten::ne", "aten::lt", "aten::gt", "aten::le", "aten::ge", "aten::__not__", "aten::__and__", "aten::__or__",
                       "aten::str", "aten::warn", "aten::add", "aten::sub", "aten::mul", "prim::ListConstruct", "prim::TupleConstruct",
                       "prim::Uninitialized", "aten::Int", "aten::numel", "prim::If", "prim::Loop", "prim::min", "prim::max"})


def _only_checks(block: Any) -> bool:
    return all(n.kind() in CHECK_OPS and all(_only_checks(b) for b in n.blocks()) for n in block.nodes())


def _unoptimised() -> Any:
    """TorchScript's executor without its profiling and optimising passes, for the segment functions.

    Each segment is a new function run a few times: the profiling executor would profile its
    first calls, then compile a specialised plan for it (seconds per model, more than the
    convolutions on CPU) that the next batch size throws away. The ops and their kernels are the
    same, so are the results. Graphs must be inlined before this runs: a callee first compiled
    here keeps an un-inlined graph for the rest of the process (`_frozen_graph` inlines first).
    """
    return torch.jit.optimized_execution(False)


def _frozen_graph(module: torch.jit.ScriptModule) -> Any:
    """The inlined forward graph in eval mode: `self.training` reads are False, so train-only branches fold away."""
    graph = module.forward.graph.copy()  # type: ignore[attr-defined]  # a ScriptMethod
    torch._C._jit_pass_inline(graph)
    for node in list(graph.findAllNodes("prim::GetAttr", True)):
        if node.s("name") == "training":
            with graph.insert_point_guard(node):
                node.output().replaceAllUsesWith(graph.insertConstant(False))
    torch._C._jit_pass_constant_propagation(graph)
    for node in list(graph.nodes()):
        if node.kind() == "prim::If" and node.outputsSize() == 0 and all(_only_checks(b) for b in node.blocks()):
            node.destroy()
    torch._C._jit_pass_dce(graph)
    return graph


STATIC = ("prim::Constant", "prim::GetAttr")  # recomputed wherever needed, never carried between segments
Key = tuple[Any, ...]  # ("in", k): graph input k; ("node", i, o): output o of top-level node i


class ScriptSegments:
    """Layer-major for TorchScript: the frozen graph cut into segments that end at each selected batch_norm.

    Segment k runs the top-level nodes from the previous cut up to (not including) the k-th
    selected batch_norm, for every batch, from the values carried over the cut; it returns that
    layer's per-sample input moments and the values later nodes use. Nodes run in graph order,
    each once per batch (in-place ops keep their meaning); memory is the carried values. With
    carry=False every segment starts from the inputs: truncated passes, ~K/2 passes, no memory.
    """

    def __init__(self, graph: Any, positions: Sequence[int], carry: bool = True) -> None:
        self.graph, self.positions, self.carry = graph, sorted(positions), carry
        self.top = list(graph.nodes())
        self.index = {node: i for i, node in enumerate(self.top)}
        self.params = list(graph.inputs())
        end = self.positions[-1] if self.positions else -1
        self.uses = [self._outer_uses(node, i) if i <= end else set() for i, node in enumerate(self.top)]
        self.functions: dict[int, tuple[list[Key], list[Key], Any]] = {}

    def _key(self, value: Any) -> Key | None:
        node = value.node()
        if node.kind() == "prim::Param":
            k = self.params.index(value)
            return ("in", k) if k else None
        i = self.index.get(node)
        return None if i is None or node.kind() in STATIC else ("node", i, value.offset())

    def _outer_uses(self, node: Any, at: int) -> set[Key]:
        keys, stack = set(), [node]
        while stack:
            current = stack.pop()
            for value in current.inputs():
                key = self._key(value)
                if key is not None and not (key[0] == "node" and key[1] == at):
                    keys.add(key)
            for block in current.blocks():
                stack.extend(block.nodes())
                stack.append(block.returnNode())
        return keys

    def _function(self, start: int, end: int) -> tuple[list[Key], list[Key], Any]:
        """(keys in, keys out, function of (self, *in) -> (moments of node end's input, *out)), built once."""
        if end in self.functions:
            return self.functions[end]
        from bnlint.dynamic.torch_runner import _ts_moments  # the linter's scripted per-sample reduction

        keys_in = sorted({k for i in range(start, end + 1) for k in self.uses[i] if k[0] == "in" or k[1] < start})
        keys_out = sorted({k for i in range(end, len(self.top)) for k in self.uses[i] if k[0] == "node" and start <= k[1] < end}
                          if self.carry else ())
        graph = self.graph.copy()
        top, params = list(graph.nodes()), list(graph.inputs())
        value = {k: params[k[1]] if k[0] == "in" else top[k[1]].outputsAt(k[2]) for k in set(keys_in) | set(keys_out)}
        for key in keys_in:
            fresh = graph.addInput()
            fresh.setType(value[key].type())
            value[key].replaceAllUsesWith(fresh)
            value[key] = fresh
        with graph.insert_point_guard(top[end]):
            outputs = [graph.insertGraph(_ts_moments.graph, [top[end].inputsAt(0)])[0]] + [value[k] for k in keys_out]
        for position in reversed(range(graph.return_node().inputsSize())):
            graph.eraseOutput(position)
        for out in outputs:
            graph.registerOutput(out)
        graph.makeMultiOutputIntoTuple()
        for i in reversed(range(len(top))):
            if (i < start or i >= end) and top[i].kind() not in STATIC:
                top[i].destroy()
        for position in reversed(range(1, len(params))):
            graph.eraseInput(position)
        torch._C._jit_pass_dce(graph)
        self.functions[end] = (keys_in, keys_out, torch._C._create_function_from_graph("bnlint_fix_segment", graph))
        return self.functions[end]

    def run(self, module: Any, chunks: Sequence[tuple[Any, ...]], layers: Mapping[int, _Layer], run: _Run | None) -> int:
        """Settle the layers at `positions` (or, run=None, only measure): returns the peak bytes carried."""
        store: dict[Key, list[Any]] = {("in", k): [c[k - 1] for c in chunks] for k in range(1, len(self.params))}
        last = {k: i for i, used in enumerate(self.uses) for k in used}
        start, peak = 0, 0
        for end in self.positions:
            keys_in, keys_out, function = self._function(start, end)
            carried: dict[Key, list[Any]] = {k: [] for k in keys_out}
            for c in range(len(chunks)):
                result = function(module._c, *[store[k][c] for k in keys_in])
                result = result if isinstance(result, tuple) else (result,)
                if run is not None:
                    run.add_moments(layers[end], result[0][0], result[0][1], int(result[0][2, 0, 0].item()) if result[0].shape[1] else 1)
                for key, out in zip(keys_out, result[1:]):
                    carried[key].append(out)
            if run is not None:
                run.settle(layers[end])
            alive = [v for values in (*store.values(), *carried.values()) for v in values]
            peak = max(peak, _storage_bytes(alive, set()))  # both sides of the cut are alive until the old side is dropped
            store = {k: v for k, v in store.items() if last.get(k, -1) >= end or not self.carry}
            store.update(carried)
            start = end if self.carry else 0
        return peak


def recalibrate_script(module: torch.jit.ScriptModule, batches: Iterable[Batch], *, layers: str | Sequence[str] | None = None,
                       device: str | torch.device | None = None, process_group: Any = None, names: Mapping[str, str] | None = None,
                       memory_budget: float | None = None) -> RecalibrationResult:
    """`recalibrate_module` for TorchScript: the frozen forward graph run segment by segment, each over every batch."""
    from bnlint.dynamic.torch_runner import _attr_path, _constant

    target = torch.device(device) if device is not None else next((p.device for p in module.parameters()), torch.device("cpu"))
    module.to(target)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    chunks, alias = _chunks(batches, target, dtype), dict(names or {})
    run, notes, skipped = _Run(target, process_group), [], {}
    with torch.no_grad(), eval_mode(module):
        graph = _frozen_graph(module)  # first: it caches every callee's inlined graph before anything runs unoptimised
        if chunks:
            try:
                with _unoptimised():
                    module(*_one_sample(chunks[0]))
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise RecalibrationError(f"the model rejected the data: {str(exc).strip().splitlines()[-1][:300]}") from None
        top = list(graph.nodes())
        nodes = [(i, node) for i, node in enumerate(top) if node.kind() == "aten::batch_norm"]  # by top-level position
        nested = len(graph.findAllNodes("aten::batch_norm", True)) - len(nodes)
        if nested:
            notes.append(f"{nested} batch_norm call(s) inside TorchScript control flow were left alone")
        by_index: dict[int, _Layer] = {}
        for i, node in nodes:
            path = _attr_path(node.inputsAt(3), list(graph.inputs())[0])
            name = alias.get(".".join(path[:-1]), ".".join(path[:-1])) if path else f"batch_norm#{len(by_index)}"
            if _constant(node.inputsAt(5)) is True:
                raise RecalibrationError(f"layer {name}: this TorchScript was traced in train mode (batch_norm(training=True) is baked into "
                                         "its graph), so it normalises with batch statistics whatever its buffers hold; re-trace it after "
                                         "model.eval() (BN405), then recalibrate")
            if path is None:
                skipped[name] = "no running statistics in the graph"
                continue
            owner: Any = module
            for part in path[:-1]:
                owner = getattr(owner, part)
            # One module under two attribute names (nn.Sequential(bn, relu, bn) scripted) has two
            # paths but one set of buffers: it is the same layer called twice.
            if any(layer.path == ".".join(path[:-1]) or _storages(layer.owner) & _storages(owner) for layer in by_index.values()):
                raise RecalibrationError(f"BatchNorm layer {name} is called more than once per forward pass: exact recalibration is not "
                                         "defined for it")
            by_index[i] = _Layer(name, ".".join(path[:-1]), owner)
        chosen = set(select([layer.name for layer in by_index.values()], layers, {layer.name: layer.path for layer in by_index.values()}))
        selected = {i: layer for i, layer in by_index.items() if layer.name in chosen}
        segments = ScriptSegments(graph, list(selected))
        with _unoptimised():
            estimate = segments.run(module, [_one_sample(chunks[0])], selected, None) if chunks else 0
        estimate *= sum(int(c[0].shape[0]) for c in chunks)
        if estimate > _budget(memory_budget, target):
            notes.append(f"carrying values between segments would hold ~{gib(estimate)} (budget {gib(_budget(memory_budget, target))}): "
                         "ran truncated passes")
            segments = ScriptSegments(graph, list(selected), carry=False)
        with _unoptimised():
            segments.run(module, chunks, selected, run)
    settled = {r.module for r in run.results}
    skipped.update({layer.name: "never ran on this data" for layer in by_index.values() if layer.name in chosen and layer.path not in settled})
    passes = 1 if segments.carry else len(selected)
    return _result(run, "torchscript" if segments.carry else "torchscript-truncated", passes, chunks, skipped, notes, estimate)


# ------------------------------------------------------------------ entry points
def _chunks(batches: Iterable[Batch], device: torch.device, dtype: torch.dtype) -> list[tuple[Any, ...]]:
    out = []
    for batch in batches:
        items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        converted = []
        for item in items:
            tensor = torch.from_numpy(np.ascontiguousarray(item)) if isinstance(item, np.ndarray) else item
            if isinstance(tensor, torch.Tensor):
                tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            converted.append(tensor)
        out.append(tuple(converted))
    return out


def _one_sample(chunk: tuple[Any, ...]) -> tuple[Any, ...]:
    """The first sample of a batch, in storage of its own (a view would count the whole batch in memory probes)."""
    return tuple(t[:1].clone() if isinstance(t, torch.Tensor) else t for t in chunk)


def _budget(requested: float | None, device: torch.device) -> float:
    if requested is not None:
        return float(requested)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2
    free = available_memory()
    return free / 2 if free else float("inf")


def _result(run: _Run, method: str, passes: int, chunks: Sequence[tuple[Any, ...]], skipped: dict[str, str], notes: list[str],
            estimate: int | None) -> RecalibrationResult:
    samples = sum(int(c[0].shape[0]) for c in chunks if c and isinstance(c[0], torch.Tensor))
    world, count = 1, len(chunks)
    if run.group is not None:
        totals = run.gather(np.array([samples, count], dtype=np.float64))
        world, samples, count = len(totals), int(sum(t[0] for t in totals)), int(sum(t[1] for t in totals))
    return RecalibrationResult(sorted(run.results, key=lambda r: r.order), method, passes, samples, count, world, skipped, notes, estimate)


def _first_entries(module: nn.Module, chunk: tuple[Any, ...], layers: Mapping[str, _Layer]) -> list[str]:
    """Selected layers in the order one forward call enters them (pre-hooks, removed in `finally`)."""
    order: list[str] = []

    def entered(path: str) -> None:
        if path in order:
            raise RecalibrationError(f"BatchNorm layer {layers[path].name} is called more than once per forward pass: its statistics "
                                     "would depend on its own output, so exact recalibration is not defined for it")
        order.append(path)

    handles = []
    try:
        for path, layer in layers.items():
            handles.append(layer.owner.register_forward_pre_hook(lambda m, a, p=path: entered(p)))
        module(*chunk)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _layer_major(module: nn.Module, layers: Mapping[str, _Layer], chunks: Sequence[tuple[Any, ...]], method: str, budget: float,
                 run: _Run, notes: list[str]) -> tuple[LayerMajor | None, int | None]:
    """The fx walker, when the layer-major path applies: traceable, every layer a node, within budget, on every process."""
    if method == "truncated" or not layers:
        return None, None
    graph = trace(module)
    walker = LayerMajor(module, graph, layers) if graph is not None else None
    reason, estimate = "" if walker is not None else "torch.fx cannot trace this model", None
    if walker is not None and walker.missing:  # inside a module fx keeps whole
        reason = f"{len(walker.missing)} layer(s) are not separate nodes of the fx graph"
    if walker is not None and not reason and chunks:
        estimate = walker.run([_one_sample(chunks[0])], None) * sum(int(c[0].shape[0]) for c in chunks)
        reason = f"a layer-major pass would hold ~{gib(estimate)} (budget {gib(budget)})" if estimate > budget else ""
    if run.group is not None and not all(v[0] for v in run.gather(np.array([not reason], dtype=np.float64))):
        reason = reason or "another process cannot run layer-major"  # every process must take the same path
    if reason and method == "layer-major":
        raise RecalibrationError(f"{reason}: use method='truncated' or 'auto'")
    if reason:
        notes.append(f"{reason}: ran truncated passes")
    return (None if reason else walker), estimate


def _order(module: nn.Module, chunks: Sequence[tuple[Any, ...]], layers: Mapping[str, _Layer], run: _Run) -> list[str]:
    """Execution order of the layers, from one sample (rank 0's, or the first rank with data, for every process)."""
    order = _first_entries(module, _one_sample(chunks[0]), layers) if chunks else []
    if run.group is not None:
        positions = {p: i for i, p in enumerate(layers)}
        vector = np.full(len(layers) + 1, -1.0)
        vector[: len(order)] = [positions[p] for p in order]
        agreed = next((v for v in run.gather(vector) if v[0] >= 0), vector)
        order = [list(layers)[int(i)] for i in agreed if i >= 0]
    return order + [p for p in layers if p not in order]


def recalibrate_module(module: nn.Module, batches: Iterable[Batch], *, layers: str | Sequence[str] | None = None,
                       device: str | torch.device | None = None, process_group: Any = None, method: str = "auto",
                       memory_budget: float | None = None, names: Mapping[str, str] | None = None) -> RecalibrationResult:
    """Recalibrate every (selected) BatchNorm layer of `module` in place, in execution order.

    batches: the data (this process's shard), each a tensor/array or a tuple of the model's inputs.
    layers: glob(s) over layer names (their `names` alias or their module path); None = all.
    names: module path -> the name the file gives the layer (`static_names`); results use it.
    process_group: merge statistics across the processes of this group (gloo or nccl).
    method: "auto", "layer-major" or "truncated" (a ScriptModule always runs "torchscript").
    memory_budget: bytes the layer-major pass, or the truncated passes' cache, may hold.
    Raises RecalibrationError (one line) for what cannot be recalibrated.
    """
    if method not in METHODS:
        raise RecalibrationError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(module, torch.jit.ScriptModule):
        return recalibrate_script(module, batches, layers=layers, device=device, process_group=process_group, names=names,
                                  memory_budget=memory_budget)
    target = torch.device(device) if device is not None else next((p.device for p in module.parameters()), torch.device("cpu"))
    module.to(target)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    alias = dict(names or {})
    found = {name: m for name, m in module.named_modules() if is_batchnorm(m)}
    skipped = {alias.get(p, p): "no running statistics (track_running_stats=False)" for p, m in found.items()
               if _tensor_of(m, "running_mean") is None or _tensor_of(m, "running_var") is None}
    chosen = select([p for p in found if alias.get(p, p) not in skipped], layers, alias)
    chosen_layers = {p: _Layer(alias.get(p, p), p, found[p]) for p in chosen}
    chunks, run, budget = _chunks(batches, target, dtype), _Run(target, process_group), _budget(memory_budget, target)
    notes: list[str] = []
    with torch.no_grad(), eval_mode(module):
        walker, estimate = _layer_major(module, chosen_layers, chunks, method, budget, run, notes)
        if walker is not None:
            walker.run(chunks, run)
            used, passes = "layer-major", 1
        else:
            truncated = Truncated(module, chosen_layers, run, budget)
            passes, used = truncated.run_passes(chunks, _order(module, chunks, chosen_layers, run)), "truncated"
            if truncated.mixed:
                notes.append(f"{len(truncated.mixed)} layer(s) ran after a not-yet-recalibrated layer on some batches (data-dependent "
                             f"control flow): {', '.join(sorted(truncated.mixed)[:3])}")
    settled = {r.module for r in run.results}
    skipped.update({layer.name: "never ran on this data" for path, layer in chosen_layers.items() if path not in settled})
    return _result(run, used, passes, chunks, skipped, notes, estimate)


def static_names(model_info: Any, module_names: Sequence[str], hints: Mapping[str, str]) -> dict[str, str]:
    """Module path -> the static loader's layer name (`hints`: module path -> the file's key prefix, from `load_weights`)."""
    from bnlint.dynamic.analysis import align_names

    return align_names(model_info, list(module_names), dict(hints))


def recalibrate_file(path: str, data: str, *, arch: str | None = None, arch_kwargs: Mapping[str, Any] | None = None, trust: bool = False,
                     inputs: Mapping[str, str] | None = None, batch_size: int = 32, layers: str | Sequence[str] | None = None,
                     device: str = "cpu", process_group: Any = None, method: str = "auto",
                     memory_budget: float | None = None, info: Any = None, runner: Any = None) -> RecalibrationResult:
    """Recalibrate the model in `path` on the --data sample `data`, layers named as bnlint's static loader names them.

    The model is opened as the linter's dynamic analysis opens it (TorchScript; weights + --arch;
    a pickled module only with trust). With a process group, process r reads batches r, r+W, ...
    The file is not written: pass `result.new_stats()` to `bnlint.fix.torch_write.write_torch_fix`.
    info: `load_model(path)` when the caller has it already (the file is not parsed twice).
    runner: the runner the caller measured this file with (bnlint fix): its module is reused, not opened again.
    """
    from bnlint.dynamic.data import Dataset, zip_batches
    from bnlint.dynamic.loading import open_torch
    from bnlint.loaders import load_model

    info = info if info is not None and getattr(info, "path", None) == path else load_model(path)
    if info.traced_training:
        call = info.traced_training[0]
        raise RecalibrationError(f"{path}: traced in train mode ({call.code} at {call.location}): batch statistics are baked into the graph, "
                                 "so recalibrated buffers would change nothing; re-trace it after model.eval() (BN405)")
    if runner is None:
        runner = open_torch(info, arch, arch_kwargs or {}, trust, torch.device(device), data)
    module = runner.module
    own = list(getattr(runner, "bn", {})) or [spec.name for spec in runner.layers]
    names = static_names(info, own, getattr(runner, "file_names", {}))
    sources = Dataset(data).select(runner.input_names, dict(inputs or {}))
    batches: Iterable[Any] = (tuple(arrays) for _, arrays in zip_batches(sources, batch_size))
    if process_group is not None:
        import torch.distributed as dist

        batches = shard(batches, dist.get_rank(process_group), dist.get_world_size(process_group))
    return recalibrate_module(module, batches, layers=layers, device=device, process_group=process_group, method=method,
                              memory_budget=memory_budget, names=names)


def shard(items: Iterable[Any], rank: int, world: int) -> Iterable[Any]:
    """Every world-th item starting at rank: one process's share of the batches."""
    return itertools.islice(items, rank, None, world)
