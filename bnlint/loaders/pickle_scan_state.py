"""What the pickle scan keeps and reports: stack markers, the scanner's state, and its results.

`pickle_scan` walks a pickle's opcodes the way CPython's C unpickler does but pushes markers
(`_Global`, `_Made`, `_Tuple`...) instead of objects. This module holds everything below the
opcode loop: the markers, the bound errors (`_Invalid`, `_Truncated`), the scanner's state with
the steps its opcode handlers share (bounded reading, the stack and marks as Pdata in _pickle.c,
and `call`, where each would-be call is judged by `pickle_policy`), and the results: one
pickle's `PickleScan` and one file's `PickleFindings`. It is split from the opcode handlers so
that they can depend on it without a cycle (the loop in `pickle_scan` needs the handler table).
"""

from __future__ import annotations

import _compat_pickle
import mmap
import re
from dataclasses import dataclass, field
from typing import Union

from bnlint.errors import InputError, UnsafeInputError
from bnlint.loaders.pickle_policy import CALLS_ARGUMENTS, READS_ARGUMENTS, is_primitive, is_walk, judge_call


class _Sym:
    """What the scan knows about one stack value: by default, nothing that matters.

    `weight` bounds the work of hashing or comparing the value: the size of the tree it expands to
    (a tuple memoised once and nested twice per level is 2**depth nodes to hash as a dict key).
    """

    __slots__ = ()
    weight = 1


class _Str(_Sym):
    __slots__ = ("text",)

    def __init__(self, text: str | None) -> None:
        self.text = text  # None when too long to be a name


class _Global(_Sym):
    __slots__ = ("name", "walk")

    def __init__(self, name: str, walk: str | None = None) -> None:
        self.name = name
        self.walk = walk  # the dotted name of an attribute walk (never allowed), else None


class _Made(_Sym):
    """What calling `origin` returned (origin None: the callee was itself computed)."""

    __slots__ = ("origin", "weight")

    def __init__(self, origin: str | None, weight: int = 1) -> None:
        self.origin = origin
        self.weight = weight  # a builder may return (part of) its arguments: it weighs as much


class _Tuple(_Sym):
    __slots__ = ("items", "weight", "_names", "read_by")

    def __init__(self, items: list[_Sym]) -> None:
        self.items = items
        self.weight = min(_WEIGHT_CAP, 1 + sum(item.weight for item in items))
        self._names: list[str | None] | None = None
        self.read_by: set[str] = set()  # READS_ARGUMENTS callees whose reading of the items was judged

    def names(self) -> list[str | None]:
        """The global each item names (None for other values), computed once per tuple: a memoised
        tuple handed to a thousand calls must not be walked a thousand times."""
        if self._names is None:
            self._names = [item.name if isinstance(item, _Global) else None for item in self.items]
        return self._names


class _Weighed(_Sym):
    """A hashable container other than a tuple (a frozenset): only its hashing weight matters."""

    __slots__ = ("weight",)

    def __init__(self, weight: int) -> None:
        self.weight = weight


class _Persistent(_Sym):
    """What persistent_load returned: torch's legacy loaders hand back an element of the id itself
    (`("module", cls, ...)` -> cls; the tar format's tuples -> their first element)."""

    __slots__ = ("globals",)

    def __init__(self, pid: _Sym) -> None:
        items = pid.items[:2] if isinstance(pid, _Tuple) else []
        self.globals = [item for item in items if isinstance(item, _Global)]


_DATA = _Sym()
_WEIGHT_CAP = 1 << 62
_IDENTIFIER_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

Buffer = Union[bytes, bytearray, mmap.mmap]


class _Invalid(Exception):
    """The stream is not a pickle the C unpickler would load (or breaks a bound)."""


class _Truncated(_Invalid):
    """The stream ends in the middle of an opcode."""


@dataclass
class PickleScan:
    """What one pickle would do if loaded: its extent, findings and (if it is invalid) why."""

    start: int
    end: int = 0  # just past STOP; where the scan stopped if `error`
    unsafe: list[str] = field(default_factory=list)  # execution primitives: BN001
    unknown: list[str] = field(default_factory=list)  # other callables outside the allowlist: BN003
    globals_seen: set[str] = field(default_factory=set)
    opcodes: int = 0
    error: str | None = None
    truncated: bool = False


class _ScanState:
    """The scanner's state and the steps its opcode handlers share (the loop is `pickle_scan._Scanner`)."""

    def __init__(self, data: Buffer, start: int, stop: int, strict_names: bool) -> None:
        self.data = data
        self.pos = start
        self.stop = stop
        self.strict_names = strict_names
        self.stack: list[_Sym] = []
        self.marks: list[int] = []
        self.memo: dict[int, _Sym] = {}
        # A real pickler numbers memo entries 0, 1, 2...: an index past the pickle's size can only
        # be a request for a huge memo table (the C unpickler allocates up to the index).
        self.memo_limit = max(256, stop - start)
        self.proto = 0
        self.result = PickleScan(start)
        self._unsafe: dict[str, None] = {}
        self._unknown: dict[str, None] = {}
        self.surrogates = False  # a string held surrogate code points (pickle_scan._unicode)
        # Nodes the unpickler would hash (dict keys, set members): linear in the pickle, or refused.
        self.hash_budget = 8 * (stop - start) + 100_000

    # -- reading ------------------------------------------------------------------------------

    def take(self, count: int) -> bytes:
        pos = self.pos
        end = pos + count
        if count < 0 or end > self.stop:
            raise _Truncated(f"an opcode at byte {pos} needs {count} bytes, only {self.stop - pos} remain")
        self.pos = end
        return bytes(self.data[pos:end])  # bytes: no copy for bytes input, a slice for an mmap

    def uint(self, count: int) -> int:
        return int.from_bytes(self.take(count), "little")

    def line(self) -> bytes:
        end = self.data.find(b"\n", self.pos, self.stop)
        if end < 0:
            raise _Truncated("a text opcode is missing its end of line")
        chunk = bytes(self.data[self.pos:end])
        self.pos = end + 1
        return chunk

    def name_line(self) -> str:
        try:
            text = self.line().decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid("a global's name is not UTF-8") from None
        if not text:
            raise _Invalid("a global with an empty name")
        if self.strict_names and not _IDENTIFIER_PATH.fullmatch(text):
            raise _Invalid("a global's name is not a dotted identifier")
        return text

    def counted(self, width: int, signed: bool = False) -> bytes:
        size = int.from_bytes(self.take(width), "little", signed=signed)
        if size < 0:
            raise _Invalid("negative byte count")
        return self.take(size)

    # -- stack, as Pdata in _pickle.c -----------------------------------------------------------

    @property
    def fence(self) -> int:
        return self.marks[-1] if self.marks else 0

    def push(self, value: _Sym) -> None:
        self.stack.append(value)

    def pop(self) -> _Sym:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Invalid("unpickling stack underflow")
        return self.stack.pop()

    def top(self) -> _Sym:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Invalid("unpickling stack underflow")
        return self.stack[-1]

    def pop_from(self, start: int) -> list[_Sym]:
        if start < self.fence or start > len(self.stack):
            raise _Invalid("unpickling stack underflow")
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def marker(self) -> int:
        if not self.marks:
            raise _Invalid("could not find MARK")
        return self.marks.pop()

    def target(self, first: int, what: str) -> _Sym:
        """The object that APPENDS/SETITEMS/ADDITEMS fill (do_append/do_setitems' checks)."""
        if first > len(self.stack) or first <= self.fence:
            raise _Invalid("unpickling stack underflow")
        target = self.stack[first - 1]
        if first < len(self.stack):
            self.mutated(target, what)
        return target

    def mutated(self, target: _Sym, what: str) -> None:
        """BUILD/SETITEM/APPEND on a global: it changes a live object of the loading process."""
        for name in _global_names(target):
            self.flag_unsafe(f"{name} [changed by {what}]")

    # -- findings -------------------------------------------------------------------------------

    def hashed(self, values: list[_Sym]) -> None:
        """Values the unpickler hashes (dict keys, set members): refuse a pickle whose shared values
        would expand into exponentially many nodes to hash or compare (a memo DAG used as a key)."""
        for value in values:
            self.hash_budget -= value.weight
        if self.hash_budget < 0:
            raise _Invalid("shared values nested as dict keys or set members would take exponential time to hash")

    def flag_unsafe(self, name: str) -> None:
        self._unsafe.setdefault(name)

    def flag_unknown(self, name: str) -> None:
        self._unknown.setdefault(name)

    def global_(self, module: str, name: str) -> _Global:
        self.result.globals_seen.add(f"{module}.{name}")
        if self.proto < 3:  # the C unpickler maps Python 2 names (fix_imports) below protocol 3
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        qualname = f"{module}.{name}"
        self.result.globals_seen.add(qualname)
        if is_walk(name):  # an attribute walk: never a plain class, judged even if never called
            if judge_call(qualname, walk=name) == "primitive":
                self.flag_unsafe(qualname)
            else:
                self.flag_unknown(qualname)
            return _Global(qualname, name)
        if is_primitive(qualname):  # named is enough: importing or fetching it is the first step
            self.flag_unsafe(qualname)
        return _Global(qualname)

    def call(self, callee: _Sym, args: _Sym | None) -> _Sym:
        if isinstance(callee, _Global):
            name = callee.name
            items = args.items if isinstance(args, _Tuple) else None
            names = args.names() if isinstance(args, _Tuple) else None
            verdict = judge_call(name, names, callee.walk)
            if verdict == "primitive":
                self.flag_unsafe(name)
            elif verdict == "unknown":
                self.flag_unknown(name)
            elif name in READS_ARGUMENTS and isinstance(args, _Tuple) and name not in args.read_by:
                args.read_by.add(name)  # once per tuple and reader: a memoised tuple is not re-walked
                for item in args.items:
                    if isinstance(item, (_Global, _Persistent)):
                        for other in _global_names(item):
                            if judge_call(other) == "unknown":
                                self.flag_unknown(f"{other} [read by {name}]")
            elif name in CALLS_ARGUMENTS:
                if items is None:
                    self.flag_unsafe(f"{name} [computed arguments]")
                else:
                    for index in CALLS_ARGUMENTS[name]:
                        if index < len(items) and isinstance(items[index], (_Global, _Made)):
                            self.call(items[index], None)
            return _Made(name, args.weight if isinstance(args, _Tuple) else 1)
        if isinstance(callee, _Persistent):
            for option in callee.globals:
                self.call(option, args)
            return _Made(callee.globals[0].name if callee.globals else None)
        if isinstance(callee, _Made):  # calls what a call returned: `getattr(...)(...)`
            made = f"{callee.origin or '?'}(...)"
            made = made if len(made) <= 200 else callee.origin or "?"  # chains stay short
            self.flag_unsafe(f"{made}(...)")
            return _Made(made)
        return _Made(None)  # a number, string or container: not callable, nothing runs


def _global_names(value: _Sym) -> list[str]:
    if isinstance(value, _Global):
        return [value.name]
    if isinstance(value, _Persistent):
        return [g.name for g in value.globals]
    return []


@dataclass
class PickleFindings:
    """What the scans of every pickle in one file found (names kept once, in order)."""

    unsafe: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def add(self, scan: PickleScan) -> None:
        self.add_names(scan.unsafe, scan.unknown)

    def add_names(self, unsafe: list[str], unknown: list[str]) -> None:
        self.unsafe.extend(n for n in unsafe if n not in self.unsafe)
        self.unknown.extend(n for n in unknown if n not in self.unknown and n not in self.unsafe)
        self.unknown = [n for n in self.unknown if n not in self.unsafe]

    def __bool__(self) -> bool:
        return bool(self.unsafe or self.unknown)

    def error(self, path: str, problem: str) -> InputError:
        """The error to raise for an unreadable file: it keeps the findings if there are any."""
        if self:
            return UnsafeInputError(path, problem, self.unsafe, self.unknown)
        return InputError(path, problem)

    def wrap(self, exc: InputError) -> InputError:
        if not self or isinstance(exc, UnsafeInputError):
            return exc
        wrapped = UnsafeInputError(exc.path, exc.problem, self.unsafe, self.unknown)
        return wrapped
