"""A training-loop guard: forward hooks that catch BatchNorm misuse while the model runs.

    with bnlint.guard(model):            # warns (BnlintWarning) once per layer and condition
        for x, y in loader:
            loss = criterion(model(x), y)
            ...

    g = bnlint.guard(model, on="raise")  # or keep the hooks and remove them yourself
    ...
    g.remove()

Conditions (all checked in a forward *pre*-hook, so a raise stops the layer before it
normalises or touches its running statistics):

- ``small-batch`` (cf. BN604/BN605): a BN layer that normalises with batch statistics gets fewer
  than ``min_values_per_channel`` values per channel (N*H*W...). PyTorch itself refuses exactly
  1 value per channel in train mode; the guard reports it before PyTorch raises. A batch of one
  sample (N=1) with spatial dims is legal but normalises each sample by its own statistics;
  ``min_batch_size`` (default 2) reports that too.
- ``frozen-train`` (cf. BN403): all of a BN layer's parameters have ``requires_grad=False`` but
  the layer is in train mode, so its running statistics drift to the current data.
- ``no-grad-train``: a BN layer runs in train mode under ``torch.no_grad()`` /
  ``torch.inference_mode()``: inference with train-mode BN uses batch statistics and overwrites
  the running ones. Layers with ``momentum=None`` are exempt: that is how
  ``torch.optim.swa_utils.update_bn`` re-estimates statistics on purpose.

torch is imported only when a guard is created: ``import bnlint`` stays torch-free.
(The module is not called ``bnlint/guard.py`` on purpose: importing a submodule ``bnlint.guard``
would overwrite the ``bnlint.guard`` function on the package.)
"""

from __future__ import annotations

import math
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

from bnlint.errors import BnlintError

CHECKS = ("small-batch", "frozen-train", "no-grad-train")
# Related static/dynamic rule per condition, named in messages so users find the docs (`bnlint rule`).
_RELATED = {"small-batch": "BN604", "single-value": "BN605", "frozen-train": "BN403"}
# 16 values per channel: the sample variance of m values has a relative standard error of about
# sqrt(2/(m-1)), ~37% at m=16 and 100% at m=3; BN accuracy is known to fall off below ~16 per
# device (Wu & He, Group Normalization, 2018).
DEFAULT_MIN_VALUES_PER_CHANNEL = 16
_MAX_NAMED = 8  # layers named in one message; the rest are counted


class BnlintWarning(UserWarning):
    """Category of every warning the guard emits (filter with ``warnings.filterwarnings``)."""


class BnlintGuardError(BnlintError, RuntimeError):
    """Raised by a guard created with ``on="raise"``; ``.event`` says what and where."""

    def __init__(self, event: "GuardEvent") -> None:
        super().__init__(event.message)
        self.event = event


@dataclass(frozen=True)
class GuardEvent:
    """One report: a condition seen on one or more BN layers during one forward pass."""

    kind: str  # "small-batch", "single-value", "frozen-train" or "no-grad-train"
    layers: tuple[str, ...]
    message: str
    values: dict[str, Any] = field(default_factory=dict)


Action = Literal["warn", "raise"] | Callable[[GuardEvent], None]


class BatchNormGuard:
    """Hooks on every BatchNorm layer of ``model`` (and one pair on the model itself).

    Created attached; ``remove()`` (or leaving the ``with`` block, even by an exception) takes
    every hook off. Re-entering a removed guard attaches it again. ``events`` lists every
    report made, in order.
    """

    def __init__(
        self,
        model: Any,
        *,
        on: Action = "warn",
        min_values_per_channel: int = DEFAULT_MIN_VALUES_PER_CHANNEL,
        min_batch_size: int = 2,
        checks: Iterable[str] = CHECKS,
        once: bool = True,
    ) -> None:
        if not (on in ("warn", "raise") or callable(on)):
            raise ValueError(f"on must be 'warn', 'raise' or a callable, got {on!r}")
        if min_values_per_channel < 2:
            raise ValueError("min_values_per_channel must be at least 2 (1 value per channel is what PyTorch refuses)")
        if min_batch_size < 1:
            raise ValueError("min_batch_size must be at least 1")
        self.checks = frozenset(checks)
        unknown = self.checks - set(CHECKS)
        if unknown:
            raise ValueError(f"unknown check(s) {sorted(unknown)}; expected some of {list(CHECKS)}")
        import torch
        from torch.nn.modules.batchnorm import _BatchNorm

        self._torch = torch
        self.model = model
        self.on = on
        self.min_values_per_channel = int(min_values_per_channel)
        self.min_batch_size = int(min_batch_size)
        self.once = once
        self.events: list[GuardEvent] = []
        # _BatchNorm covers BatchNorm1d/2d/3d, their Lazy variants and SyncBatchNorm.
        # (FrozenBatchNorm2d has no train-mode behaviour and is left alone.)
        self.layers: dict[Any, str] = {m: (n or type(m).__name__) for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
        self._handles: list[Any] = []
        self._reported: set[tuple[str, str]] = set()
        self._lock = threading.RLock()
        self._depth = 0  # nesting of the model's own forward (pending hits flush at depth 0)
        self._pending: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.attach()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "BatchNormGuard":
        if self._handles:
            return self
        try:
            # The model-level pair only groups per-layer hits into one message per forward pass;
            # always_call makes the flush run even when the forward raises.
            self._handles.append(self.model.register_forward_pre_hook(self._enter_model))
            self._handles.append(self.model.register_forward_hook(self._leave_model, always_call=True))
            for module in self.layers:
                self._handles.append(module.register_forward_pre_hook(self._check_layer, with_kwargs=True))
        except BaseException:
            self.remove()  # never leave half the hooks behind
            raise
        return self

    def remove(self) -> None:
        """Take every hook off (idempotent) and report anything still pending."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        with self._lock:
            self._depth = 0
            pending, self._pending = self._pending, {}
        if self.on != "raise":
            self._emit_grouped(pending)

    def __enter__(self) -> "BatchNormGuard":
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    # -- hooks -------------------------------------------------------------------------------

    def _enter_model(self, module: Any, args: Any) -> None:
        with self._lock:
            self._depth += 1

    def _leave_model(self, module: Any, args: Any, output: Any) -> None:
        with self._lock:
            self._depth = max(0, self._depth - 1)
            if self._depth:
                return
            pending, self._pending = self._pending, {}
        self._emit_grouped(pending)

    def _check_layer(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self.layers.get(module, type(module).__name__)
        tracks = getattr(module, "running_mean", None) is not None
        # BN normalises with batch statistics in train mode, and in eval mode when it has no buffers.
        batch_stats = module.training or not tracks
        if "small-batch" in self.checks and batch_stats:
            self._check_batch(module, name, args[0] if args else kwargs.get("input"))
        if not (module.training and tracks):
            return  # eval mode with running stats: nothing is overwritten
        if "frozen-train" in self.checks:
            params = [p for p in module.parameters(recurse=False)]
            if params and not any(p.requires_grad for p in params):
                self._hit("frozen-train", name, {"momentum": module.momentum})
        if "no-grad-train" in self.checks and not self._torch.is_grad_enabled() and module.momentum is not None:
            self._hit("no-grad-train", name, {"momentum": module.momentum})

    def _check_batch(self, module: Any, name: str, x: Any) -> None:
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) < 2 or 0 in shape:
            return
        per_channel = shape[0] * math.prod(shape[2:])  # the count PyTorch's _verify_batch_size uses
        values = {"values_per_channel": per_channel, "batch_size": shape[0], "shape": list(shape)}
        if per_channel <= 1:
            # PyTorch raises right after this hook returns: report now, not at the end of the pass.
            self._hit("single-value", name, values, immediate=True)
        elif per_channel < self.min_values_per_channel or shape[0] < self.min_batch_size:
            self._hit("small-batch", name, values)

    # -- reporting ---------------------------------------------------------------------------

    def _hit(self, kind: str, layer: str, values: dict[str, Any], immediate: bool = False) -> None:
        with self._lock:
            if self.once and (kind, layer) in self._reported:
                return
            self._reported.add((kind, layer))
            if self.on == "raise" or immediate or self._depth == 0:
                group = {kind: [(layer, values)]}
            else:
                self._pending.setdefault(kind, []).append((layer, values))
                return
        self._emit_grouped(group)

    def _emit_grouped(self, grouped: dict[str, list[tuple[str, dict[str, Any]]]]) -> None:
        for kind, hits in grouped.items():
            layers = tuple(layer for layer, _ in hits)
            event = GuardEvent(kind=kind, layers=layers, message=self._message(kind, hits), values=dict(hits[0][1]))
            self.events.append(event)
            if self.on == "raise":
                raise BnlintGuardError(event)
            if self.on == "warn":
                warnings.warn(BnlintWarning(event.message), stacklevel=_user_stacklevel())
            else:
                self.on(event)

    def _message(self, kind: str, hits: list[tuple[str, dict[str, Any]]]) -> str:
        layers = [layer for layer, _ in hits]
        named = ", ".join(f"'{n}'" for n in layers[:_MAX_NAMED]) + (f" and {len(layers) - _MAX_NAMED} more" if len(layers) > _MAX_NAMED else "")
        first = hits[0][1]
        noun = "BatchNorm layer" if len(layers) == 1 else f"{len(layers)} BatchNorm layers"
        code = _RELATED.get(kind)
        prefix = f"bnlint guard ({kind}{', cf. ' + code if code else ''}):"
        if kind == "single-value":
            return (f"{prefix} {noun} {named} got 1 value per channel (input shape {tuple(first['shape'])}) "
                    "while using batch statistics; PyTorch refuses this in train mode. Use drop_last=True in the "
                    "DataLoader, a larger batch, or eval mode for this layer.")
        if kind == "small-batch":
            if first["values_per_channel"] >= self.min_values_per_channel:
                detail = f"a batch of {first['batch_size']} sample(s) (each sample is normalised by its own statistics)"
            else:
                detail = f"{first['values_per_channel']} values per channel (below {self.min_values_per_channel})"
            return (f"{prefix} {noun} {named} normalised with batch statistics from {detail}, input shape "
                    f"{tuple(first['shape'])}: the statistics are noisy and training/inference disagree. Use a larger "
                    "batch, drop_last=True, SyncBatchNorm, or GroupNorm.")
        if kind == "frozen-train":
            return (f"{prefix} {noun} {named} {'has' if len(layers) == 1 else 'have'} all parameters frozen "
                    "(requires_grad=False) but ran in train mode: running_mean/running_var are being overwritten. "
                    "Call .eval() on frozen BN after every model.train(), or use FrozenBatchNorm2d.")
        return (f"{prefix} {noun} {named} ran in train mode under torch.no_grad()/inference_mode: "
                "inference is using batch statistics and overwriting the running statistics. Call model.eval() "
                "before inference.")


def guard(
    model: Any,
    *,
    on: Action = "warn",
    min_values_per_channel: int = DEFAULT_MIN_VALUES_PER_CHANNEL,
    min_batch_size: int = 2,
    checks: Iterable[str] = CHECKS,
    once: bool = True,
) -> BatchNormGuard:
    """Watch ``model``'s BatchNorm layers during training; returns an attached BatchNormGuard.

    ``on``: "warn" (BnlintWarning), "raise" (BnlintGuardError, before the layer runs), or a
    callable taking a GuardEvent. ``once``: report each (condition, layer) once per guard
    (False: on every forward). ``checks``: a subset of ``CHECKS``. Use it as a context manager,
    or call ``.remove()`` yourself.
    """
    return BatchNormGuard(model, on=on, min_values_per_channel=min_values_per_channel,
                          min_batch_size=min_batch_size, checks=checks, once=once)


def _user_stacklevel() -> int:
    """Point the warning at the user's `model(x)` line, past this file and torch's module code."""
    here = os.path.normcase(os.path.abspath(__file__))
    torch_dir = os.path.join("torch", "nn", "modules")
    frame = sys._getframe(2)  # our caller (_emit_grouped) is stacklevel 1; start above it
    level = 2
    while frame is not None:
        filename = os.path.normcase(os.path.abspath(frame.f_code.co_filename))
        if filename != here and torch_dir not in filename:
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 1
