"""What the isolated child tells its parent while it runs: the stage it is in and the last
BatchNorm layer it measured, so a deadline or a crash can say where the model was.

Outside a child (a live module from the Python API, torchrun ranks) every call is a no-op. The
parent reads these as untrusted text: one JSON object per line, bounded, and only for messages.
"""

from __future__ import annotations

import json
from typing import IO, Any

_sink: IO[str] | None = None
_last_layer: str | None = None


def install(stream: IO[str]) -> None:
    """Send events to `stream` (the child's private protocol pipe)."""
    global _sink
    _sink = stream


def _send(event: dict[str, Any]) -> None:
    if _sink is None:
        return
    try:
        _sink.write(json.dumps(event) + "\n")
        _sink.flush()
    except (OSError, ValueError):  # the parent went away: nothing to tell
        pass


def stage(text: str) -> None:
    """What the child is doing now ("loading the model", "batch 3 of 8")."""
    _send({"stage": text[:200]})


def layer(name: str) -> None:
    """The BatchNorm layer just measured (sent only when it changes)."""
    global _last_layer
    if _sink is not None and name != _last_layer:
        _last_layer = name
        _send({"layer": name[:200]})


def progress(done: int, total: int) -> None:
    _send({"progress": [int(done), int(total)]})
