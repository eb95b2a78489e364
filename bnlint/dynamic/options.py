"""Options and results of a dynamic run, and the [tool.bnlint.dynamic] settings with their defaults.

Nothing here imports torch: the CLI builds DynamicOptions and the rules read the thresholds
without loading any framework.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from bnlint.config import Config
from bnlint.errors import UsageError
from bnlint.settings import DynamicThresholds, checked_dynamic


def dynamic_settings(config: Config) -> DynamicThresholds:
    """The defaults overlaid with the config's [tool.bnlint.dynamic]; bad values are UsageErrors."""
    return checked_dynamic(config.dynamic, config.source)


def parse_inputs(pairs: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """`--input NAME=KEY` pairs as a mapping from model input name to data key."""
    mapping: dict[str, str] = {}
    for pair in pairs or ():
        name, sep, key = pair.partition("=")
        if not sep or not name.strip() or not key.strip():
            raise UsageError(f"--input expects NAME=KEY (model input = data array), got {pair!r}")
        mapping[name.strip()] = key.strip()
    return mapping


def parse_arch_kwargs(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--arch-kwargs is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(value, dict):
        raise UsageError("--arch-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


@dataclass
class DynamicOptions:
    """What the CLI passes to `measure`; None means "not given" (config, then default)."""

    data: str
    inputs: Mapping[str, str] = field(default_factory=dict)  # model input name -> data key
    batch_size: int | None = None
    arch: str | None = None  # "package.module:factory" or "path/to/file.py:factory"
    arch_kwargs: str | Mapping[str, Any] | None = None  # JSON text or a mapping
    trust: bool = False  # allow unpickling an nn.Module (runs code from the file)
    device: str | None = None  # cpu | cuda | auto
    train_batch_size: int | None = None  # else a Lightning checkpoint's hyper_parameters.batch_size
    quiet: bool = False
    onnx_engine: str | None = None  # onnxruntime | reference | auto
    # Wall-clock limit in seconds for running the model in its isolated child (None: sized to the
    # work, see bnlint.sandbox.default_timeout). --timeout on the command line.
    timeout: float | None = None
