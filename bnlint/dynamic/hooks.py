"""Forward hooks on the BatchNorm modules of a live nn.Module: always removed, whatever happens.

A forward *pre*-hook sees exactly the tensor BatchNorm normalises. It reduces it on its own device
to per-sample float32 mean and variance (one pass over memory the previous layer just wrote; the
float64 merging in stats.py then touches only (N, C) numbers) and records the effective batch
size, N * spatial values per channel, like fvcore's precise BN does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn


def is_batchnorm(module: nn.Module) -> bool:
    """torch BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants, FrozenBatchNorm and their subclasses
    (bnlint.norms decides, by the class and its bases, as the static loaders do)."""
    from bnlint.loaders.live_module import module_classes
    from bnlint.norms import is_batchnorm_class

    return is_batchnorm_class(module_classes(module))


# Above this mean^2 / var, float32 E[x^2] - E[x]^2 could lose more than ~1e-3 of the variance.
CANCELLATION_RATIO = 1e3


def per_sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population variance and mean of each (sample, channel) over the other axes: (N, C) each.

    On CPU, `torch.var_mean` (Welford) costs ~1.5x a ResNet-50 forward pass by itself, while a
    plain sum and `vector_norm` are vectorised and cheap (~1.01x measured): so the variance is
    E[x^2] - E[x]^2 from float32 sums, and the rare rows where that could cancel badly
    (mean^2 > 1e3 var, e.g. near-constant channels) are recomputed exactly. On CUDA, where
    reductions are cheap and host syncs are not, var_mean is used throughout.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half/bfloat16 reductions lose too much
    n, c = x.shape[0], x.shape[1]
    flat = x.reshape(n * c, -1)
    if x.device.type != "cpu" or flat.shape[1] == 1:
        var, mean = torch.var_mean(flat, dim=1, correction=0)
        return var.view(n, c), mean.view(n, c)
    size = flat.shape[1]
    mean = flat.sum(1) / size
    var = (torch.linalg.vector_norm(flat, dim=1).square() / size - mean * mean).clamp_min(0.0)
    risky = (mean * mean > CANCELLATION_RATIO * var) | ~torch.isfinite(var)
    if bool(risky.any()):
        rows = risky.nonzero().squeeze(1)
        exact_var, exact_mean = torch.var_mean(flat.index_select(0, rows).double(), dim=1, correction=0)
        var = var.index_copy(0, rows, exact_var.to(var.dtype))
        mean = mean.index_copy(0, rows, exact_mean.to(mean.dtype))
    return var.view(n, c), mean.view(n, c)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, and restore each one's own flag afterwards."""
    flags = {m: m.training for m in module.modules()}
    try:
        module.eval()
        yield module
    finally:
        for sub, flag in flags.items():
            sub.training = flag


@contextlib.contextmanager
def record_inputs(layers: dict[str, nn.Module], add: Callable[[str, Any, Any, int], None]) -> Iterator[None]:
    """Pre-hooks that pass each BN layer's per-sample input moments to `add`; removed in `finally`."""
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] > 0:
                var, mean = per_sample_moments(x)
                add(name, var, mean, x[0, 0].numel())

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_io(layers: dict[str, nn.Module], store: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> Iterator[None]:
    """Keep a copy of each BN layer's input and output (for the few-sample batch-dependence run)."""
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                store.setdefault(name, []).append((args[0].detach().clone(), output.detach().clone()))

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
