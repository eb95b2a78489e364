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


def test_render_all_in_worker_processes_gives_the_bytes_of_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    stats = [{"layer": f"bn{i}", "order": i, "mean_abs_smd": 0.1 * i, "mean_kl": 0.01 * i, "noise_kl": 0.001,
              "channel": {"smd": [0.1 * i, -0.2], "lvr": [0.05, 0.1 * i], "se_smd": [0.01, 0.01], "se_lvr": [0.02, 0.02]}}
             for i in range(1, 5)]
    renders = [functools.partial(plots.layer_png, s) for s in stats] + [functools.partial(plots.overview_png, stats)]
    monkeypatch.setattr(plots, "_cores", lambda: 1)
    alone = plots.render_all(renders)
    monkeypatch.setattr(plots, "_cores", lambda: 2)
    import concurrent.futures

    pools: list[int] = []
    real = concurrent.futures.ProcessPoolExecutor

    class Counted(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            pools.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Counted)
    pooled = plots.render_all(renders)
    assert pools == [1]  # drawn by the worker processes
    assert pooled == alone and len(pooled) == 5 and all(p.startswith(b"\x89PNG") for p in pooled)
