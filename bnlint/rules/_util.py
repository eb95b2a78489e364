"""Small helpers shared by rule modules: number formatting and channel lists."""

from __future__ import annotations

import numpy as np

from bnlint.model import BNLayer

TORCH_DEFAULT_EPS = 1e-5
TORCH_DEFAULT_MOMENTUM = 0.1


def num(value: float) -> str:
    """A compact, stable rendering of a measured number for messages."""
    if value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}"


def channels(mask: np.ndarray, limit: int = 5) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)[:limit]]


def channel_text(mask: np.ndarray, limit: int = 5) -> str:
    picked = channels(mask, limit)
    more = int(mask.sum()) - len(picked)
    text = ", ".join(str(i) for i in picked)
    return f"{text}, ... (+{more})" if more > 0 else text


def eps_of(layer: BNLayer) -> float:
    """The layer's eps, or PyTorch's default when the file does not say (state dicts)."""
    return float(layer.eps) if layer.is_known("eps") and layer.eps is not None else TORCH_DEFAULT_EPS
