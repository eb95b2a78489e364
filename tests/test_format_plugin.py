"""A new format is one module: registering tests/toy_format.py makes bnlint find, sniff, read,
lint and explain it, with no change anywhere else (the registry is what detect, the folder
search, the runner choice and fix iterate)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bnlint.cli import main


@pytest.fixture()
def toy(tmp_path: Path) -> Iterator[Path]:
    from bnlint import formats
    from tests import toy_format  # importing it registers the format; again after an earlier test's teardown

    formats.register_format(toy_format.RECORD)

    (tmp_path / "models").mkdir()
    healthy = {"bntoy": 1, "layers": [{"name": "bn1", "mean": [0.1, -0.2], "var": [0.5, 2.0], "eps": 1e-5}]}
    broken = {"bntoy": 1, "layers": [{"name": "bn1", "mean": [0.1, -0.2], "var": [float("nan"), 2.0], "eps": 1e-5}]}
    (tmp_path / "models" / "good.bntoy").write_text(json.dumps(healthy))
    (tmp_path / "models" / "bad.weights").write_text(json.dumps(broken))  # no known suffix: found by content
    yield tmp_path / "models"
    formats._FORMATS.pop("toy", None)


def lint(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, [*args, "--format", "json"])
    return result.exit_code, json.loads(result.stdout)


def test_a_registered_format_is_found_read_and_linted(toy: Path) -> None:
    code, payload = lint(str(toy / "good.bntoy"))
    assert code == 0 and payload["files"][0]["format"] == "toy" and payload["files"][0]["layers"] == 1
    code, payload = lint(str(toy / "bad.weights"))  # no known suffix: the sniffer recognises it
    assert code == 1 and [f["code"] for f in payload["files"][0]["findings"]] == ["BN101"]


def test_the_folder_search_comes_from_the_record(toy: Path) -> None:
    code, payload = lint(str(toy))
    assert [Path(f["path"]).name for f in payload["files"]] == ["good.bntoy"]  # by extension, as the record says


def test_a_plugin_format_runs_on_data_in_the_isolated_child(toy: Path, tmp_path: Path) -> None:
    """The child is a fresh interpreter: it knows the format only because it imports the plugin."""
    rng = np.random.default_rng(0)
    mean, std = np.array([0.1, -0.2]), np.sqrt([0.5, 2.0])
    np.savez(tmp_path / "same.npz", x=(mean + std * rng.standard_normal((256, 2))).astype(np.float32))
    np.savez(tmp_path / "shifted.npz", x=(mean + 3.0 + std * rng.standard_normal((256, 2))).astype(np.float32))
    code, payload = lint(str(toy / "good.bntoy"), "--data", str(tmp_path / "same.npz"))
    assert code == 0 and payload["files"][0]["dynamic_error"] is None and len(payload["files"][0]["layer_stats"]) == 1
    code, payload = lint(str(toy / "good.bntoy"), "--data", str(tmp_path / "shifted.npz"))
    assert code == 1 and "BN601" in {f["code"] for f in payload["files"][0]["findings"]}
