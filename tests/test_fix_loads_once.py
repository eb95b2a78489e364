"""`bnlint fix` reads its input once in the parent: the model loaded to choose the repair is the
one the "before" verdict is judged on (issue 14: run_fix reuses the loaded model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import bnlint.api
import bnlint.loaders
from bnlint.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_fix_loads_its_input_once_and_its_output_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    real = bnlint.loaders.load_model
    loads: list[str] = []

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(bnlint.loaders, "load_model", counting)
    monkeypatch.setattr(bnlint.api, "load_model", counting)
    out = tmp_path / "fixed.onnx"
    result = CliRunner().invoke(main, ["fix", str(ROOT / "fixtures/convnet.onnx"), "--data", str(ROOT / "fixtures/data/convnet_shifted.npz"),
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert loads.count("convnet.onnx") == 1 and loads.count("fixed.onnx") == 1, loads
