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
