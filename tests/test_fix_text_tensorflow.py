"""Re-estimation advice on a TensorFlow model names TensorFlow's way, never a PyTorch call."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from bnlint.cli import main
from bnlint.findings import REESTIMATE_BY_FRAMEWORK, reestimate
from bnlint.formats import frameworks

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tf_formats"


def test_every_framework_has_its_own_reestimation_advice() -> None:
    advice = reestimate()
    for framework in frameworks():
        assert framework in REESTIMATE_BY_FRAMEWORK, framework
        assert framework in advice.variants, framework


def test_tensorflow_fix_text_names_tensorflow_not_torch() -> None:
    result = CliRunner().invoke(main, [str(FIXTURES / "savedmodel_never_updated"), "--show-fixes", "--color", "never"])
    assert result.exit_code == 1, result.output
    assert "BN104" in result.output
    assert "in TensorFlow:" in result.output
    assert "swa_utils" not in result.output
