"""`bnlint fix` judges its output from the exact recalibration's own moments instead of running the
model a second time; those judgements must equal a real second run on the written file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bnlint.config import Config
from bnlint.dynamic import DynamicOptions, measure
from bnlint.fix.run import FixOptions, fix_in_child
from bnlint.loaders import load_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
SHIFTED = str(FIXTURES / "data" / "convnet_shifted.npz")

CASES = [
    pytest.param("convnet_scripted.pt", SHIFTED, None, id="torchscript"),
    pytest.param("convnet_state_dict.pt", SHIFTED, str(FIXTURES / "models.py") + ":convnet", id="state-dict-fx"),
    pytest.param("convnet.onnx", SHIFTED, None, id="onnx"),
    pytest.param("keras/keras_convnet.keras", str(FIXTURES / "data" / "keras_shifted.npz"), None, id="keras"),
]


@pytest.mark.parametrize(("model", "data", "arch"), CASES)
def test_the_judged_output_equals_a_second_run(tmp_path: Path, model: str, data: str, arch: str | None) -> None:
    path = FIXTURES / model
    if not path.exists():
        pytest.skip(f"no fixture {model}")
    options = FixOptions(model=str(path), data=data, output="unused", arch=arch, batch_size=32, device="cpu")
    result = fix_in_child(options, Config(), path.name, tmp_path)
    judged = result["after"]
    assert judged is not None and any("no second run" in note for note in judged.notes)
    staged = tmp_path / "staged" / path.name
    rerun = measure(load_model(staged), DynamicOptions(data=data, arch=arch, batch_size=32, device="cpu", quiet=True), Config())
    assert [layer.name for layer in judged.layers] == [layer.name for layer in rerun.layers]
    for mine, real in zip(judged.layers, rerun.layers):
        assert mine.samples == real.samples and mine.channels == real.channels
        np.testing.assert_allclose(mine.mean_t, real.mean_t, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(mine.var_t, real.var_t, rtol=1e-6, atol=1e-9)
        for key in ("mean_kl", "max_kl", "mean_abs_smd"):
            assert getattr(mine.summary, key) == pytest.approx(getattr(real.summary, key), rel=1e-3, abs=1e-7), key
