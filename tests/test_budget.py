"""The static time budget: one file that takes too long to read is one line, and the others go on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import bnlint.api
from bnlint.budget import paused, static_budget
from bnlint.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_a_file_over_the_budget_is_one_error_line_and_the_next_file_is_linted(monkeypatch: pytest.MonkeyPatch) -> None:
    real = bnlint.api.load_model

    def slow(path, companion=None):  # a reader that never finishes on this file
        if Path(path).name == "convnet.onnx":
            while True:
                time.sleep(0.01)
        return real(path, companion)

    monkeypatch.setattr(bnlint.api, "load_model", slow)
    monkeypatch.setenv("BNLINT_STATIC_BUDGET", "0.5")
    started = time.monotonic()
    result = CliRunner().invoke(main, [str(FIXTURES / "convnet.onnx"), str(FIXTURES / "fault_nan_stats.pt")])
    assert time.monotonic() - started < 20
    assert result.exit_code == 2, result.output
    assert "took over 0.5 s (the static budget" in result.output
    assert "BN101" in result.output  # the second file was linted in full


def test_paused_time_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNLINT_STATIC_BUDGET", "0.3")
    with static_budget("m.pt"):
        with paused():
            time.sleep(0.6)  # the isolated run's time: not the reader's
        time.sleep(0.05)


def test_the_budget_fires_without_a_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnlint.budget import StaticBudgetExceeded

    monkeypatch.setenv("BNLINT_STATIC_BUDGET", "0.2")
    with pytest.raises(StaticBudgetExceeded):
        with static_budget("m.pt"):
            while True:
                time.sleep(0.01)
