"""The [tool.bnlint.dynamic] settings: defaults and checks, with no dependency on the rest of bnlint.

`bnlint.config` checks the table when it reads a file; `bnlint.dynamic.options` resolves the
settings for a run (config file, then command line). Both import this leaf, so neither imports
the other's package at run time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from bnlint.errors import UsageError

# [tool.bnlint.dynamic] keys (dashes or underscores) and their defaults. The drift and batch-noise
# thresholds come from measurements on the fixtures (README "Dynamic analysis").
DYNAMIC_DEFAULTS: dict[str, Any] = {
    "batch_size": 32,  # samples per forward pass
    "device": "auto",  # cpu | cuda | auto (cuda when available)
    "onnx_engine": "auto",  # onnxruntime | reference | auto (onnxruntime when installed)
    "drift_kl": 0.05,  # BN601: layer mean Gaussian KL(target || stored) at or above this is drift
    "drift_significance": 4.0,  # BN601: ... at least this many times the sample's own noise floor
    "drift_z": 3.0,  # BN601: ... and (KL - noise floor) at least this many jackknife standard errors
    "batch_noise_smd": 0.25,  # BN604: RMS normalised batch-mean error at the training batch size
    "batch_noise_lvr": 0.35,  # BN604: RMS log batch-variance error at the training batch size
    "batch_dependence_rtol": 1e-3,  # BN606: max |single - batched| / max |batched| above this
    "dependence_samples": 4,  # BN606: samples run one at a time and together
    "max_samples": 100_000,  # --data: read at most this many samples (a note says when the data holds more)
    "timeout": None,  # seconds for the isolated child that runs the model (None: sized to the model and data)
}

_INTEGER = {"batch_size", "dependence_samples", "max_samples"}
_POSITIVE = {"timeout"}  # a zero limit could never be met
_CHOICES = {"device": ("cpu", "cuda", "auto"), "onnx_engine": ("onnxruntime", "reference", "auto")}


@dataclass(frozen=True)
class DynamicThresholds:
    """The [tool.bnlint.dynamic] settings in force for one run, checked and typed (one field per key)."""

    batch_size: int = DYNAMIC_DEFAULTS["batch_size"]
    device: str = DYNAMIC_DEFAULTS["device"]
    onnx_engine: str = DYNAMIC_DEFAULTS["onnx_engine"]
    drift_kl: float = DYNAMIC_DEFAULTS["drift_kl"]
    drift_significance: float = DYNAMIC_DEFAULTS["drift_significance"]
    drift_z: float = DYNAMIC_DEFAULTS["drift_z"]
    batch_noise_smd: float = DYNAMIC_DEFAULTS["batch_noise_smd"]
    batch_noise_lvr: float = DYNAMIC_DEFAULTS["batch_noise_lvr"]
    batch_dependence_rtol: float = DYNAMIC_DEFAULTS["batch_dependence_rtol"]
    dependence_samples: int = DYNAMIC_DEFAULTS["dependence_samples"]
    max_samples: int = DYNAMIC_DEFAULTS["max_samples"]
    timeout: float | None = DYNAMIC_DEFAULTS["timeout"]


def checked_dynamic(table: Mapping[str, Any], source: str | None) -> DynamicThresholds:
    """The defaults overlaid with a [tool.bnlint.dynamic] table; unknown keys and bad values are UsageErrors."""
    settings: dict[str, Any] = {}
    where = source or "config"
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in DYNAMIC_DEFAULTS:
            raise UsageError(f"{where}: unknown [tool.bnlint.dynamic] key {raw_key!r} (known: {', '.join(k.replace('_', '-') for k in DYNAMIC_DEFAULTS)})")
        settings[key] = _check(key, value, where)
    return DynamicThresholds(**settings)


def override(settings: DynamicThresholds, key: str, value: Any) -> DynamicThresholds:
    """`settings` with a command-line value in place of the config file's (None: not given); checked like one."""
    if value is None:
        return settings
    return dataclasses.replace(settings, **{key: _check(key, value, f"--{key.replace('_', '-')}")})


def _check(key: str, value: Any, where: str) -> Any:
    """The checked value, or UsageError `WHERE: dynamic KEY: expected ..., got ...`.

    NaN and infinities are refused: every comparison with NaN is false, so a NaN threshold
    would silently switch its rule off (or, negated, on for everything).
    """
    name = f"dynamic {key.replace('_', '-')}"
    if key in _CHOICES:
        if not isinstance(value, str) or value not in _CHOICES[key]:
            raise UsageError(f"{where}: {name}: expected one of {', '.join(_CHOICES[key])}, got {_shown(value)}")
        return value
    expected = "a positive integer" if key in _INTEGER else "a positive number" if key in _POSITIVE else "a number >= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where}: {name}: expected {expected}, got {_shown(value)}")
    if key in _INTEGER:
        if int(value) != value or value < 1:
            raise UsageError(f"{where}: {name}: expected {expected}, got {_shown(value)}")
        return int(value)
    if value < 0 or (key in _POSITIVE and value == 0):
        raise UsageError(f"{where}: {name}: expected {expected}, got {_shown(value)}")
    return float(value)


def _shown(value: Any) -> str:
    """A value as the user wrote it, for an error message: its TOML type and a short repr."""
    kind = {bool: "a boolean", str: "a string", list: "a list", dict: "a table", float: "a number", int: "a number"}
    text = repr(value)
    return f"{kind.get(type(value), type(value).__name__)} {text[:60]}{'...' if len(text) > 60 else ''}"


