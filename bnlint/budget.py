"""A time budget for the static lint of one file: a hostile file built to be slow to read ends in
one line, not a hang.

Every reader is meant to be linear in its input; this is the wall behind that promise. The
budget is a SIGALRM timer, so it works only in the main thread of a process (the CLI and its -j
workers); elsewhere (the Python API from a thread) it is a no-op. Time spent in the isolated
model run (bnlint.sandbox, which has its own deadline) is not counted: that code pauses it.
A timer interrupts Python code; a single C call that never returns is beyond it (the readers
make no such call on unbounded input).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from bnlint.errors import InputError

DEFAULT_SECONDS = 60.0


class StaticBudgetExceeded(InputError):
    """Reading and judging one file took longer than the static budget. Exit code 2."""


def budget_seconds() -> float:
    """The budget: BNLINT_STATIC_BUDGET seconds when set to a positive number, else 60."""
    try:
        value = float(os.environ.get("BNLINT_STATIC_BUDGET", ""))
    except ValueError:
        return DEFAULT_SECONDS
    return value if 0 < value < float("inf") else DEFAULT_SECONDS


class _State:
    path: str | None = None
    remaining: float = 0.0
    started: float = 0.0
    armed: bool = False


_state = _State()


def _fire(signum: int, frame: Any) -> None:
    path = _state.path or "<input>"
    _state.armed = False
    raise StaticBudgetExceeded(path, f"reading and checking this file took over {budget_seconds():g} s (the static "
                               "budget; BNLINT_STATIC_BUDGET sets another): a file built to be slow to read?")


def _arm(seconds: float) -> None:
    _state.started = time.monotonic()
    _state.armed = True
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))


def _disarm() -> None:
    if _state.armed:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _state.remaining -= time.monotonic() - _state.started
        _state.armed = False


@contextmanager
def static_budget(path: str) -> Iterator[None]:
    """Run the body under the budget for `path` (nested uses keep the outer budget)."""
    if threading.current_thread() is not threading.main_thread() or _state.path is not None:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _fire)
    _state.path, _state.remaining = path, budget_seconds()
    try:
        _arm(_state.remaining)
        yield
    finally:
        _disarm()
        _state.path = None
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def paused() -> Iterator[None]:
    """Stop the clock for the body (the isolated model run has a deadline of its own)."""
    if not _state.armed:
        yield
        return
    _disarm()
    try:
        yield
    finally:
        if _state.path is not None:
            _arm(max(_state.remaining, 1e-3))
