"""Run PyTorch models: an nn.Module (from --arch plus weights, or a trusted pickle) or TorchScript.

Inference always runs under `torch.no_grad()` in eval mode; the model file is never written.
An nn.Module is observed with forward pre-hooks (hooks.py). Hooks never fire inside a loaded
TorchScript archive, so for TorchScript the forward graph is copied, inlined, and a small scripted
reduction is inserted before every `aten::batch_norm`; the copy returns only those reductions.
The archive's own methods are untouched.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bnlint.conventions import conventions
from bnlint.dynamic.hooks import capture_io, eval_mode, is_batchnorm, record_inputs
from bnlint.dynamic.runner import Batches, Capture, LayerSpec, flatten_outputs
from bnlint.dynamic.stats import TorchOps
from bnlint.errors import DataError
from bnlint.norms import is_stochastic


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        from bnlint.errors import UsageError

        raise UsageError("--device cuda: no CUDA device is available to torch here")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _numpy(value: torch.Tensor | None) -> np.ndarray | None:
    return None if value is None else value.detach().float().cpu().numpy().astype(np.float64).reshape(-1)


def _to_tensor(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_floating_point() or tensor.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool):
        tensor = tensor.to(dtype)
    return tensor.to(device, non_blocking=True)


def _model_error(exc: Exception, data: str, arrays: list[np.ndarray]) -> DataError:
    """The model refused the data: one line, with a layout hint when the data looks channels-last."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[-1 if "Traceback" in str(exc) else 0]
    hint = ""
    shape = arrays[0].shape if arrays else ()
    if len(shape) == 4 and shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        hint = " (the data looks channels-last, NHWC; PyTorch models expect NCHW: np.moveaxis(x, -1, 1))"
    return DataError(data, f"the model rejected the data (batch shape {tuple(shape)}): {text[:300]}{hint}")


class ModuleRunner:
    """An nn.Module observed through forward pre-hooks on its BatchNorm modules."""

    def __init__(self, module: nn.Module, device: torch.device, data_path: str, description: str) -> None:
        self.module = module.to(device)
        self.device = device
        self.data_path = data_path
        self.ops = TorchOps(device)
        self.notes: list[str] = []
        self.fixed_batch: int | None = None
        self.file_names: dict[str, str] = {}  # layer -> the name its weights have in the file (set by the loader)
        self.bn = {name or type(m).__name__: m for name, m in module.named_modules() if is_batchnorm(m)}
        self.layers = [self._spec(name, m) for name, m in self.bn.items()]
        stochastic_seen, after = False, set()
        for name, sub in module.named_modules():
            stochastic_seen = stochastic_seen or is_stochastic(type(sub).__name__)
            if stochastic_seen and (name or type(sub).__name__) in self.bn:
                after.add(name or type(sub).__name__)
        for spec in self.layers:
            spec.after_stochastic = spec.name in after
        self.input_names = self._input_names()
        self.input_shapes = [self._first_conv_shape()] + [None] * (len(self.input_names) - 1)
        self.dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        self.engine = f"torch {torch.__version__} ({device.type}, {description})"

    @staticmethod
    def _spec(name: str, module: nn.Module) -> LayerSpec:
        stats_off = getattr(module, "track_running_stats", True) is False or getattr(module, "running_mean", 0) is None
        return LayerSpec(
            name=name,
            eps=float(getattr(module, "eps", conventions("torch").default_eps)),
            running_mean=_numpy(getattr(module, "running_mean", None)),
            running_var=_numpy(getattr(module, "running_var", None)),
            weight=_numpy(getattr(module, "weight", None)),
            bias=_numpy(getattr(module, "bias", None)),
            uses_batch_stats=True if stats_off else None,
        )

    def _input_names(self) -> list[str]:
        try:
            params = inspect.signature(self.module.forward).parameters.values()
        except (TypeError, ValueError):
            return ["input"]
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        return names or ["input"]

    def _first_conv_shape(self) -> tuple[int | None, ...] | None:
        """(C_in, None, ...) when the first module with weights is a convolution (NCHW check)."""
        for module in self.module.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                spatial = module.weight.dim() - 2
                return (module.in_channels, *([None] * spatial))
            if any(True for _ in module.parameters(recurse=False)):
                return None
        return None

    def _forward(self, arrays: list[np.ndarray]) -> Any:
        tensors = [_to_tensor(a, self.device, self.dtype) for a in arrays]
        try:
            return self.module(*tensors)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise _model_error(exc, self.data_path, arrays) from None

    def collect(self, batches: Batches, add: Callable[[str, Any, Any, int], None], end_batch: Callable[[], None]) -> None:
        with torch.no_grad(), eval_mode(self.module), record_inputs(self.bn, add):
            for _, arrays in batches:
                self._forward(arrays)
                end_batch()

    def capture(self, arrays: list[np.ndarray]) -> Capture:
        store: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        with torch.no_grad(), eval_mode(self.module), capture_io(self.bn, store):
            output = self._forward(arrays)
        return Capture(
            outputs=[t.detach().float().cpu().numpy() for t in flatten_outputs(output) if isinstance(t, torch.Tensor)],
            layers={k: [(x.float().cpu().numpy(), y.float().cpu().numpy()) for x, y in v] for k, v in store.items()},
        )


# The reduction inserted into TorchScript graphs: hooks.per_sample_moments in TorchScript, returning
# one (3, N, C) tensor (variance, mean, spatial size) so that insertGraph yields a single value.
def _moments_stacked(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 and x.dtype != torch.float64:
        x = x.float()
    n, c = x.shape[0], x.shape[1]
    flat = x.reshape(n * c, -1)
    size = flat.shape[1]
    if x.device.type != "cpu" or size == 1:
        var, mean = torch.var_mean(flat, dim=1, correction=0)
    else:
        mean = flat.sum(1) / size
        var = (torch.linalg.vector_norm(flat, 2.0, [1]).square() / size - mean * mean).clamp_min(0.0)
        risky = (mean * mean > 1e3 * var) | torch.logical_not(torch.isfinite(var))
        if bool(risky.any()):
            rows = risky.nonzero().squeeze(1)
            exact_var, exact_mean = torch.var_mean(flat.index_select(0, rows).double(), dim=1, correction=0)
            var = var.index_copy(0, rows, exact_var.to(var.dtype))
            mean = mean.index_copy(0, rows, exact_mean.to(mean.dtype))
    var, mean = var.view(n, c), mean.view(n, c)
    return torch.stack([var, mean, torch.full_like(mean, float(size))])


with warnings.catch_warnings():  # torch.jit.script is deprecated, but TorchScript graphs need a scripted helper
    warnings.simplefilter("ignore", DeprecationWarning)
    _ts_moments = torch.jit.script(_moments_stacked)


def _attr_path(value: Any, self_value: Any) -> list[str] | None:
    """Module path of a value read by a chain of prim::GetAttr from `self`, e.g. ['layer1', '0', 'bn1', 'weight']."""
    names: list[str] = []
    while value is not self_value:
        node = value.node()
        if node.kind() == "prim::GetAttr":
            names.append(node.s("name"))
            value = node.input()
        elif node.kind() in ("prim::unchecked_cast", "aten::contiguous"):
            value = node.inputsAt(0)
        else:
            return None
    return names[::-1]


def _constant(value: Any) -> Any:
    try:
        return value.toIValue()
    except RuntimeError:
        return None


class ScriptRunner:
    """A TorchScript archive: BatchNorm inputs read by a rewritten copy of its forward graph."""

    def __init__(self, module: torch.jit.ScriptModule, device: torch.device, data_path: str) -> None:
        self.module = module
        self.device = device
        self.data_path = data_path
        self.ops = TorchOps(device)
        self.notes: list[str] = []
        self.fixed_batch: int | None = None
        self.engine = f"torch {torch.__version__} ({device.type}, TorchScript)"
        module.eval()  # the in-memory copy only; scripted BN reads `training` at run time
        graph = module.forward.graph.copy()  # type: ignore[attr-defined]  # a ScriptMethod, typed as a plain callable
        torch._C._jit_pass_inline(graph)
        self.graph = graph
        self.self_value = list(graph.inputs())[0]
        self.input_names = [v.debugName().split(".")[0] for v in list(graph.inputs())[1:]]
        self.input_shapes: list[tuple[int | None, ...] | None] = [None] * len(self.input_names)
        self.nodes = list(graph.findAllNodes("aten::batch_norm", False))
        nested = len(graph.findAllNodes("aten::batch_norm", True)) - len(self.nodes)
        if nested:
            self.notes.append(f"{nested} batch_norm call(s) inside TorchScript control flow were not measured")
        self.node_names: list[str] = []
        self.layers: list[LayerSpec] = []
        for index, node in enumerate(self.nodes):
            spec = self._spec(node, index)
            self.node_names.append(spec.name)
            if all(s.name != spec.name for s in self.layers):
                self.layers.append(spec)
        self._stats_fn = self._rewrite(with_io=False) if self.nodes else None
        self.dtype = torch.float32

    def _spec(self, node: Any, index: int) -> LayerSpec:
        tensors: dict[str, torch.Tensor | None] = {}
        path: list[str] | None = None
        for position, key in ((3, "running_mean"), (4, "running_var"), (1, "weight"), (2, "bias")):
            found = _attr_path(node.inputsAt(position), self.self_value)
            if found is None:
                continue
            target: Any = self.module
            for part in found:
                target = getattr(target, part, None)
            tensors[key] = target if isinstance(target, torch.Tensor) else None
            path = path or found[:-1]
        name = ".".join(path) if path else f"batch_norm#{index}"
        training = _constant(node.inputsAt(5))
        eps = _constant(node.inputsAt(7))
        return LayerSpec(
            name=name,
            eps=float(eps) if isinstance(eps, float) else conventions("torch").default_eps,
            running_mean=_numpy(tensors.get("running_mean")),
            running_var=_numpy(tensors.get("running_var")),
            weight=_numpy(tensors.get("weight")),
            bias=_numpy(tensors.get("bias")),
            uses_batch_stats=True if training is True or tensors.get("running_mean") is None else None,
        )

    def _rewrite(self, with_io: bool) -> Any:
        """A function over (self, *inputs) returning the BN reductions (or BN inputs/outputs and the model output)."""
        graph = self.graph.copy()
        nodes = list(graph.findAllNodes("aten::batch_norm", False))
        outputs = []
        if with_io:
            outputs.append(graph.return_node().inputsAt(0))
        for node in nodes:
            if with_io:
                outputs += [node.inputsAt(0), node.output()]
            else:
                with graph.insert_point_guard(node):
                    (reduced,) = graph.insertGraph(_ts_moments.graph, [node.inputsAt(0)])
                outputs.append(reduced)
        for position in reversed(range(graph.return_node().inputsSize())):
            graph.eraseOutput(position)
        for value in outputs:
            graph.registerOutput(value)
        graph.makeMultiOutputIntoTuple()
        torch._C._jit_pass_dce(graph)  # without the model's output, layers after the last BN drop out
        return torch._C._create_function_from_graph("bnlint_with_io" if with_io else "bnlint_bn_moments", graph)

    def _call(self, fn: Any, arrays: list[np.ndarray]) -> Any:
        tensors = [_to_tensor(a, self.device, self.dtype) for a in arrays]
        try:
            return fn(self.module._c, *tensors)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise _model_error(exc, self.data_path, arrays) from None

    def collect(self, batches: Batches, add: Callable[[str, Any, Any, int], None], end_batch: Callable[[], None]) -> None:
        if self._stats_fn is None:
            return
        sizes: dict[int, int] = {}
        with torch.no_grad():
            for _, arrays in batches:
                result = self._call(self._stats_fn, arrays)
                result = result if isinstance(result, tuple) else (result,)
                for index, stacked in enumerate(result):
                    if index not in sizes:  # spatial size: read once per node (a host sync on CUDA)
                        sizes[index] = int(stacked[2, 0, 0].item()) if stacked.shape[1] else 1
                    add(self.node_names[index], stacked[0], stacked[1], sizes[index])
                end_batch()

    def capture(self, arrays: list[np.ndarray]) -> Capture:
        fn = self._rewrite(with_io=True)
        with torch.no_grad():
            result = self._call(fn, arrays)
        result = result if isinstance(result, tuple) else (result,)
        layers: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for index, name in enumerate(self.node_names):
            x, y = result[1 + 2 * index], result[2 + 2 * index]
            layers.setdefault(name, []).append((x.float().cpu().numpy(), y.float().cpu().numpy()))
        outputs = [t.detach().float().cpu().numpy() for t in flatten_outputs(result[0]) if isinstance(t, torch.Tensor)]
        return Capture(outputs=outputs, layers=layers)
