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


def test_the_isolated_fix_opens_a_torch_model_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the child, the repair reuses the runner the input was measured with: the TorchScript archive
    is opened (loaded and vetted) once, not once to measure and again to recalibrate."""
    pytest.importorskip("torch")
    import bnlint.dynamic.loading
    from bnlint.config import Config
    from bnlint.fix.run import FixOptions, fix_in_child

    real = bnlint.dynamic.loading.open_torch
    opened: list[str] = []

    def counting(model: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(model.path).name)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(bnlint.dynamic.loading, "open_torch", counting)
    options = FixOptions(model=str(ROOT / "fixtures/convnet_scripted.pt"), data=str(ROOT / "fixtures/data/convnet_shifted.npz"),
                         output=str(tmp_path / "unused.pt"))
    result = fix_in_child(options, Config(), "fixed.pt", tmp_path)
    assert opened == ["convnet_scripted.pt"]
    assert (tmp_path / "staged" / "fixed.pt").is_file() and result["after"] is not None
    assert result["record"]["actions"][0].startswith("recalibrated 3 layer(s)")
