"""Read torch pickles without importing or calling anything from them, and judge what they would run.

Every pickle goes through two passes.

1. `scan_pickle` (`pickle_scan`) walks the opcode stream the way CPython's C unpickler does, but
   builds nothing: it records every global that *loading* would call and judges each by the
   policy in `pickle_policy`: an **allowlist** of tensor rebuilders and data-only classes,
   execution primitives (errors, BN001; also reported when only referenced), and everything else
   (unknown callables: warnings, BN003). The scan's findings survive whatever happens to the
   load afterwards.
2. `SafeUnpickler` (the C unpickler with a `find_class` that never imports) then builds the
   objects: allowlisted names map to builders in `pickle_stubs` that only arrange data (lazy
   tensors, tuples, dicts); every other global becomes an inert `Stub` class that records
   arguments and state. A budget stops shared (memoised) values from being copied into gigabytes.

This module is the entry point: `safe_load` runs both passes, `storage_from_pid` reads torch's
persistent ids, and `PICKLE_ERRORS` lists what a hostile or broken pickle may raise. It also
re-exports the names loaders and tests imported from here before the policy, the scan and the
builders moved to their own modules. How to extend the allowlist: see `pickle_policy`.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import struct
from typing import Any, Callable

from bnlint.loaders.lazy_tensor import StorageRef
from bnlint.loaders.pickle_policy import ALLOWED_CALLABLES, ALLOWED_PATTERNS, is_primitive, judge_call
from bnlint.loaders.pickle_scan import looks_like_pickle, scan_pickle
from bnlint.loaders.pickle_scan_state import Buffer, PickleFindings, PickleScan
from bnlint.loaders.pickle_stubs import (
    _EXPANSION,
    BadPickle,
    NumpyArray,
    StorageType,
    Stub,
    resolve_global,
    stub_class,
    stub_name,
)

__all__ = [
    "ALLOWED_CALLABLES", "ALLOWED_PATTERNS", "PICKLE_ERRORS", "BadPickle", "Buffer", "NumpyArray", "PickleFindings",
    "PickleScan", "SafeUnpickler", "StorageType", "Stub", "is_primitive", "judge_call", "looks_like_pickle",
    "safe_load", "scan_pickle", "storage_from_pid", "stub_class", "stub_name",
]


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class never imports and whose persistent ids go to a callback."""

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, persistent: Callable[[Any], Any] | None = None) -> None:
        # latin1: Python 2 `str` payloads decode without error (they only name things here).
        super().__init__(file, encoding="latin1")
        self._persistent = persistent
        self.globals_seen: set[str] = set()
        self.walks: dict[str, str] = {}  # qualified name -> its dotted name (an attribute walk)

    def find_class(self, module: str, name: str) -> Any:
        # Protocol <= 2 pickles written by Python 3 name Python 2 modules (__builtin__, commands
        # for subprocess...): map them back like pickle's own find_class (a table, no import).
        self.globals_seen.add(f"{module}.{name}")
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        self.globals_seen.add(f"{module}.{name}")
        if "." in name:
            self.walks[f"{module}.{name}"] = name
        return resolve_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent id in a pickle that should have none")
        return self._persistent(pid)


def storage_from_pid(pid: Any, make_source: Callable[[str, str, int], StorageRef]) -> StorageRef:
    """Interpret a torch persistent id ('storage', storage_type, key, location, numel[, view]).

    `make_source(key, dtype, numel)` returns the StorageRef (shared per key) to use.
    """
    if not isinstance(pid, tuple) or len(pid) < 5:
        raise BadPickle("unexpected persistent id in a torch pickle")
    typename = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
    if typename != "storage":
        raise BadPickle(f"unexpected persistent id type {str(typename)[:40]!r}")
    storage_type, key, location, numel = pid[1:5]
    if not isinstance(storage_type, StorageType):
        raise BadPickle(f"unknown storage type {stub_name(storage_type) or type(storage_type).__name__}")
    if not isinstance(numel, int) or numel < 0 or numel > 1 << 48:
        raise BadPickle("storage size is not a sane non-negative int")
    if not isinstance(key, (str, bytes, int)) or len(str(key)) > 256:
        raise BadPickle("storage key is not a short name")
    storage = make_source(str(key), storage_type.dtype, numel)
    if isinstance(location, bytes):
        location = location.decode("ascii", "replace")
    storage.location = str(location)[:64]
    return storage


def safe_load(data: Buffer, persistent: Callable[[Any], Any] | None = None, scan: PickleScan | None = None) -> tuple[Any, PickleScan]:
    """Scan, then unpickle one pickle safely: (object, scan). Raises BadPickle / pickle errors.

    `scan` (of the same buffer) saves scanning twice; the pickle is `data[scan.start:scan.end]`.
    """
    scan = scan if scan is not None else scan_pickle(data)
    if scan.error is not None:
        raise BadPickle(scan.error)
    body = bytes(data[scan.start:scan.end])
    unpickler = SafeUnpickler(io.BytesIO(body), persistent)
    token = _EXPANSION.set([4 * len(body) + 1_000_000])
    try:
        obj = unpickler.load()
    finally:
        _EXPANSION.reset(token)
    # The scan and the C unpickler must agree on what the stream names; a global only the latter
    # saw means the two parsers read different streams, so judge it now.
    for name in sorted(unpickler.globals_seen - scan.globals_seen):
        verdict = judge_call(name, walk=unpickler.walks.get(name))
        if verdict == "primitive" and name not in scan.unsafe:
            scan.unsafe.append(name)
        elif verdict == "unknown" and name not in scan.unknown:
            scan.unknown.append(name)
    return obj, scan


PICKLE_ERRORS = (pickle.UnpicklingError, BadPickle, EOFError, ValueError, TypeError, AttributeError,
                 KeyError, IndexError, RecursionError, MemoryError, struct.error, UnicodeDecodeError, OverflowError)
