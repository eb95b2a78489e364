"""plots.warm_up: matplotlib's import and first drawing in a background thread, never changing a byte."""

from __future__ import annotations

import importlib.util
import threading

import pytest

from bnlint.report import plots

pytest.importorskip("matplotlib")


def test_warm_up_runs_once_in_the_background_and_drawing_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "_warming", None)
    before = plots._render(plots._tiny_figure)
    plots.warm_up()
    thread = plots._warming
    assert isinstance(thread, threading.Thread) and thread.daemon
    plots.warm_up()
    assert plots._warming is thread  # once per process
    after = plots._render(plots._tiny_figure)  # joins the warm-up first
    assert not thread.is_alive()
    assert after == before  # the same PNG bytes with or without a warm-up


def test_warm_up_without_matplotlib_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "_warming", None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    plots.warm_up()
    assert plots._warming is None


POOLED_VS_ALONE = """
import concurrent.futures, functools, threading
from bnlint.report import plots
stats = [{"layer": f"bn{i}", "order": i, "mean_abs_smd": 0.1 * i, "mean_kl": 0.01 * i, "noise_kl": 0.001,
          "channel": {"smd": [0.1 * i, -0.2], "lvr": [0.05, 0.1 * i], "se_smd": [0.01, 0.01], "se_lvr": [0.02, 0.02]}}
         for i in range(1, 5)]
renders = [functools.partial(plots.layer_png, s) for s in stats] + [functools.partial(plots.overview_png, stats)]
plots._cores = lambda: 1
alone = plots.render_all(renders)
plots._cores = lambda: 2
pools = []
real = concurrent.futures.ProcessPoolExecutor
class Counted(real):
    def __init__(self, *args, **kwargs):
        pools.append(1)
        super().__init__(*args, **kwargs)
concurrent.futures.ProcessPoolExecutor = Counted
assert threading.active_count() == 1
pooled = plots.render_all(renders)
assert pools == [1], pools  # drawn by the worker processes
assert pooled == alone and len(pooled) == 5 and all(p.startswith(b"\\x89PNG") for p in pooled)
print("same bytes")
"""


def test_render_all_in_worker_processes_gives_the_bytes_of_one_process() -> None:
    """In a fresh single-threaded process, as the CLI draws a report: the pooled figures are the bytes
    one process draws. (Not in this pytest-xdist worker: its IO threads make forking unsafe.)"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", POOLED_VS_ALONE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "same bytes" in done.stdout, done.stderr[-2000:]


def test_render_all_never_forks_beside_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test of bnlint's report hung in a pytest-xdist worker: both forked children waited for ever
    on a lock another thread held at the fork. With another thread alive, figures are drawn here."""
    import concurrent.futures
    import functools
    import threading

    stats = [{"layer": f"bn{i}", "order": i, "mean_abs_smd": 0.1 * i, "mean_kl": 0.01 * i, "noise_kl": 0.001}
             for i in range(1, 5)]
    renders = [functools.partial(plots.overview_png, stats)] * 3
    monkeypatch.setattr(plots, "_cores", lambda: 2)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("forked beside another thread")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", refuse)
    release = threading.Event()
    other = threading.Thread(target=release.wait, daemon=True)
    other.start()
    try:
        drawn = plots.render_all(renders)
    finally:
        release.set()
        other.join()
    assert len(drawn) == 3 and all(p.startswith(b"\x89PNG") for p in drawn)
