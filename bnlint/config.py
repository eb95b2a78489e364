"""One frozen Config, read from [tool.bnlint] in the nearest pyproject.toml or bnlint.toml.

Command-line flags win over the file; the file wins over the defaults here.
"""

from __future__ import annotations

import fnmatch
import math
import os
import stat
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from bnlint.errors import UsageError
from bnlint.fileio import nonblocking
from bnlint.findings import Severity
from bnlint.settings import DYNAMIC_DEFAULTS, checked_dynamic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Documented thresholds (README "Configuration"); rules read them through Config.threshold.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "min_var_plus_eps": 1e-8,  # BN103: below this 1/sqrt(var+eps) > 1e4
    "few_updates": 20,  # BN105: num_batches_tracked below this (0.9**20 = 12% weight left on init)
    "variance_outlier_ratio": 1e4,  # BN106: channel var vs layer median, either direction
    "dead_gamma": 1e-6,  # BN108: |gamma| at or below this is a dead channel
    "max_scale": 1e4,  # BN109: |gamma|/sqrt(var+eps) above this overflows fp16 once folded
    "folded_scale_outlier_ratio": 100.0,  # BN503: channel weight norm vs the 90th percentile of live channels
    "unusual_momentum": 0.5,  # BN304: torch momentum at or above this looks like Keras' convention
}


DEPLOY_PRECISIONS = ("float32", "float16", "bfloat16")
HALF_PRECISIONS = ("float16", "bfloat16")


@dataclass(frozen=True)
class Config:
    select: tuple[str, ...] = ()  # code prefixes; empty selects every rule
    ignore: tuple[str, ...] = ()
    fail_on: str = "warning"  # error | warning | info | never
    per_layer_ignores: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # glob -> code prefixes
    thresholds: Mapping[str, float] = field(default_factory=dict)
    dynamic: Mapping[str, Any] = field(default_factory=dict)  # [tool.bnlint.dynamic] options
    exclude: tuple[str, ...] = ()  # globs of paths not to lint (extend-exclude, --exclude)
    # The precision the model runs in once deployed (deploy-precision, --deploy-precision): rules
    # about half-precision hazards (BN107, BN109) are warnings only for a half-precision deployment.
    deploy_precision: str = "float32"
    source: str | None = None  # the file the config was read from

    def threshold(self, name: str, default: float | None = None) -> float:
        if name in self.thresholds:
            return float(self.thresholds[name])
        if name in DEFAULT_THRESHOLDS:
            return DEFAULT_THRESHOLDS[name]
        if default is None:
            raise KeyError(name)
        return default

    def deploys_in_half(self) -> bool:
        return self.deploy_precision in HALF_PRECISIONS

    def fail_level(self) -> Severity | None:
        return None if self.fail_on == "never" else Severity.parse(self.fail_on)

    def code_enabled(self, code: str) -> bool:
        """The longest matching prefix of select or ignore wins (flake8's rule); ties go to ignore."""
        selected = max((len(p) for p in self.select if code.startswith(p)), default=-1)
        if not self.select:
            selected = 0  # an empty select list selects everything, at the weakest length
        ignored = max((len(p) for p in self.ignore if code.startswith(p)), default=-1)
        return selected >= 0 and selected > ignored

    def layer_ignored(self, layer: str | None, code: str) -> bool:
        if layer is None:
            return False
        return any(
            fnmatch.fnmatchcase(layer, pattern) and any(code.startswith(p) for p in codes)
            for pattern, codes in self.per_layer_ignores.items()
        )

    def with_overrides(self, **changes: Any) -> "Config":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# A configuration file is a few hundred bytes; anything far larger is not one (or is /dev/zero).
MAX_CONFIG_BYTES = 1 << 20


def _shown(value: Any) -> str:
    """A value as the user wrote it, for an error message: its TOML type and a short repr."""
    kind = {bool: "a boolean", str: "a string", list: "a list", dict: "a table", float: "a number", int: "a number"}
    text = repr(value)
    return f"{kind.get(type(value), type(value).__name__)} {text[:60]}{'...' if len(text) > 60 else ''}"


def _codes(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: expected a list of rule codes, got {_shown(value)}")
    return rule_tokens(value)


def rule_tokens(tokens: Any) -> tuple[str, ...]:
    """Rule codes, prefixes or names as written (codes upper-cased, blanks dropped). They are resolved
    to codes and checked against the rules by `bnlint.selection.resolve`, a layer above both."""
    out = []
    for raw in tokens:
        token = raw.strip()
        if token:
            out.append(token.upper() if token[:2].upper() == "BN" and not any(c in token for c in "-_") else token)
    return tuple(out)


def _suggest(key: str, known: Any) -> str:
    """` (did you mean 'fail-on'?)` for a misspelt key, in the documented dash style."""
    import difflib

    matches = difflib.get_close_matches(key.replace("_", "-"), [k.replace("_", "-") for k in known], n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _keys(table: Mapping[str, Any], known: Any, where: str, what: str) -> dict[str, Any]:
    """`table` with each key spelled as in `known`: `few-updates` and `few_updates` are one key, in
    every table. A key given in both spellings, or unknown, is a UsageError naming the closest key."""
    canonical = {k.replace("_", "-"): k for k in known}
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = canonical.get(key.replace("_", "-"))
        if name is None:
            raise UsageError(f"{where}: unknown {what} {key!r}{_suggest(key, known)} (known: {', '.join(sorted(canonical))})")
        if name in out:
            raise UsageError(f"{where}: {what} {name.replace('_', '-')!r} is given twice (as - and as _)")
        out[name] = value
    return out


def _globs(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: expected a list of path globs, got {_shown(value)}")
    return tuple(value)


def _table(value: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected {what}, got {_shown(value)}")
    return value


def _threshold(value: Any, where: str) -> float:
    """A finite number >= 0: a NaN threshold makes every comparison false and switches its rule off."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{where}: expected a finite number >= 0, got {_shown(value)}")
    return float(value)


def from_table(table: Mapping[str, Any], source: str | None = None) -> Config:
    """A Config from a [tool.bnlint] table; any key of the wrong type is `SOURCE: key: expected ..., got ...`."""
    where = source or "config"
    table = _table(table, where, "a [tool.bnlint] table")
    known = {"select", "ignore", "fail-on", "per-layer-ignores", "thresholds", "dynamic", "extend-exclude", "deploy-precision"}
    table = _keys(table, known, where, "[tool.bnlint] key")
    fail_on = table.get("fail-on", "warning")
    if not isinstance(fail_on, str) or fail_on.lower() not in ("error", "warning", "info", "never"):
        raise UsageError(f"{where}: fail-on: expected error, warning, info or never, got {_shown(fail_on)}")
    precision = table.get("deploy-precision", "float32")
    if not isinstance(precision, str) or precision.lower() not in DEPLOY_PRECISIONS:
        raise UsageError(f"{where}: deploy-precision: expected {', '.join(DEPLOY_PRECISIONS[:-1])} or {DEPLOY_PRECISIONS[-1]}, "
                         f"got {_shown(precision)}")
    per_layer = _table(table.get("per-layer-ignores", {}), f"{where}: per-layer-ignores", "a table of glob = [codes]")
    thresholds = _table(table.get("thresholds", {}), f"{where}: thresholds", "a table of name = number")
    thresholds = _keys(thresholds, DEFAULT_THRESHOLDS, where, "threshold")
    config = Config(
        select=_codes(table.get("select", []), f"{where}: select"),
        ignore=_codes(table.get("ignore", []), f"{where}: ignore"),
        fail_on=fail_on.lower(),
        per_layer_ignores={g: _codes(c, f"{where}: per-layer-ignores: {g}") for g, c in per_layer.items()},
        thresholds={k: _threshold(v, f"{where}: thresholds.{k}") for k, v in thresholds.items()},
        dynamic=_dynamic_table(table.get("dynamic", {}), where),
        exclude=_globs(table.get("extend-exclude", []), f"{where}: extend-exclude"),
        deploy_precision=precision.lower(),
        source=source,
    )
    checked_dynamic(config.dynamic, config.source)  # checked now, not only when --data is given
    return config


def _dynamic_table(value: Any, where: str) -> dict[str, Any]:
    """[tool.bnlint.dynamic] with its keys in one spelling; its values are checked by dynamic_settings."""
    return _keys(_table(value, f"{where}: dynamic", "a table of [tool.bnlint.dynamic] settings"), DYNAMIC_DEFAULTS, where,
                 "[tool.bnlint.dynamic] key")


def find_config_file(start: Path) -> Path | None:
    """The nearest bnlint.toml, or pyproject.toml with a [tool.bnlint] table, from start upwards."""
    here = start.resolve()
    for folder in (here, *here.parents):
        candidate = folder / "bnlint.toml"
        if candidate.is_file():
            return candidate
        candidate = folder / "pyproject.toml"
        if candidate.is_file() and "bnlint" in _read_toml(candidate).get("tool", {}):
            return candidate
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed file; a FIFO, device or oversized file is refused before it is read."""
    try:
        with open(path, "rb", opener=nonblocking) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UsageError(f"{path}: cannot read configuration: not a regular file")
            if info.st_size > MAX_CONFIG_BYTES:
                raise UsageError(f"{path}: cannot read configuration: {info.st_size} bytes (a configuration file is at most {MAX_CONFIG_BYTES})")
            text = handle.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise UsageError(f"{path}: cannot read configuration: larger than {MAX_CONFIG_BYTES} bytes")
        return tomllib.loads(text.decode("utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read configuration: {exc}") from None




def load_config(explicit: str | os.PathLike[str] | None = None, start: Path | None = None) -> Config:
    """The settings in `explicit` (any name: [tool.bnlint] when it has one, else its top level) or
    in the nearest bnlint.toml / pyproject.toml with a [tool.bnlint] table."""
    path = Path(explicit) if explicit else find_config_file(start or Path.cwd())
    if path is None:
        return Config()
    data = _read_toml(path)
    tool = data.get("tool")
    if isinstance(tool, dict) and "bnlint" in tool:
        table = tool["bnlint"]
    elif path.name == "pyproject.toml":
        table = {}  # a project file without a [tool.bnlint] table: nothing set
    else:
        table = data  # bnlint.toml-style: the settings at the top level, whatever the file's name
    return from_table(table, str(path))
