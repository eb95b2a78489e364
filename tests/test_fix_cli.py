"""`bnlint fix` through the real CLI on committed fixtures: every runnable format, outputs that load
with the ordinary tools, no drift afterwards, inputs untouched, and the repairs that matter:
accuracy on a shifted domain, and a variance shift update_bn cannot remove."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bnlint.cli import main

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
FIX = "fixtures"
CONVNET = "fixtures/models.py:convnet"
SHIFTED = "fixtures/data/convnet_shifted.npz"
os.environ.setdefault("KERAS_BACKEND", "torch")


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fix(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["fix", *args, "--format", "json"], catch_exceptions=False)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}


def drift_codes(path: Path, *args: str) -> set[str]:
    result = CliRunner().invoke(main, [str(path), *args, "--format", "json"], catch_exceptions=False)
    return {f["code"] for f in json.loads(result.stdout)["files"][0]["findings"]}


@pytest.mark.parametrize("model, args", [
    ("convnet_state_dict.pt", ["--arch", CONVNET]),
    ("convnet_lightning.ckpt", ["--arch", CONVNET]),
    ("convnet.safetensors", ["--arch", CONVNET]),
    ("convnet_scripted.pt", []),
    ("convnet.onnx", []),
])
def test_fix_removes_the_drift_and_leaves_the_input_alone(tmp_path: Path, model: str, args: list[str]) -> None:
    source = Path(FIX) / model
    before = digest(source)
    out = tmp_path / f"fixed{source.suffix}"
    code, payload = fix(str(source), *args, "--data", SHIFTED, "-o", str(out))
    record = payload["fix"]
    assert code == 0 and record["first_drift_before"] is not None and record["first_drift_after"] is None
    assert all(row["mean_kl_after"] < 1e-6 for row in record["layers"]), record["layers"]
    assert digest(source) == before
    assert not {"BN601", "BN602"} & drift_codes(out, *args, "--data", SHIFTED)
    if model == "convnet_lightning.ckpt":  # named as the checkpoint names them, statically and measured
        assert [row["layer"] for row in record["layers"]] == ["model.bn1", "model.bn2", "model.bn3"]
    if source.suffix == ".onnx":
        import onnx

        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    elif model == "convnet_scripted.pt":
        torch.jit.load(str(out))
    elif model.endswith((".pt", ".ckpt")):
        torch.load(out, weights_only=True)


def test_keras_fix_loads_in_keras_and_removes_the_drift(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    out = tmp_path / "fixed.keras"
    code, payload = fix("fixtures/keras/keras_convnet.keras", "--data", "fixtures/data/keras_shifted.npz", "-o", str(out))
    assert code == 0 and payload["fix"]["first_drift_after"] is None
    model = keras.saving.load_model(out, safe_mode=True, compile=False)
    assert len(model.layers) == 9


def test_training_mode_onnx_is_rewritten_and_batch_independent(tmp_path: Path) -> None:
    out = tmp_path / "eval.onnx"
    code, payload = fix("fixtures/fault_training_mode.onnx", "--data", "fixtures/data/convnet_indomain.npz", "-o", str(out))
    assert code == 0 and any("inference form" in action for action in payload["fix"]["actions"])
    codes = drift_codes(out, "--data", "fixtures/data/convnet_indomain.npz")
    assert not {"BN404", "BN606", "BN601"} & codes


def test_dry_run_writes_nothing_and_output_must_differ_from_input(tmp_path: Path) -> None:
    code, payload = fix(f"{FIX}/convnet_state_dict.pt", "--arch", CONVNET, "--data", SHIFTED, "--dry-run")
    assert code == 0 and payload["fix"]["output"] is None and payload["fix"]["first_drift_before"] == "bn1"
    result = CliRunner().invoke(main, ["fix", f"{FIX}/convnet_state_dict.pt", "--arch", CONVNET, "--data", SHIFTED,
                                       "-o", f"{FIX}/convnet_state_dict.pt"])
    assert result.exit_code == 2 and "--in-place" in result.output
    assert CliRunner().invoke(main, ["fix", f"{FIX}/convnet_state_dict.pt", "--arch", CONVNET]).exit_code == 2  # no data


def _accuracy(state_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fixture_models", ROOT / "fixtures" / "models.py")
    assert spec is not None and spec.loader is not None
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    net = models.convnet()
    net.load_state_dict(torch.load(state_path, weights_only=True))
    with torch.no_grad():
        return float((net.eval()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_recalibration_improves_accuracy_on_the_shifted_domain(tmp_path: Path) -> None:
    labelled = np.load(ROOT / "fixtures/data/convnet_shifted_labelled.npz")
    x, y = labelled["input"], labelled["label"]
    out = tmp_path / "adapted.pt"
    code, _ = fix(f"{FIX}/convnet_state_dict.pt", "--arch", CONVNET, "--data", "fixtures/data/convnet_shifted_labelled.npz",
                  "-o", str(out))
    before, after = _accuracy(ROOT / FIX / "convnet_state_dict.pt", x, y), _accuracy(out, x, y)
    assert code == 0 and after >= before + 0.05, (before, after)


def test_variance_shift_survives_update_bn_and_not_bnlint_fix(tmp_path: Path) -> None:
    arch = "fixtures/models.py:convnet_dropout"
    data = "fixtures/data/convnet_indomain.npz"
    assert "BN607" in drift_codes(Path(FIX) / "fault_variance_shift.pt", "--arch", arch, "--data", data)
    import importlib.util

    spec = importlib.util.spec_from_file_location("fixture_models2", ROOT / "fixtures" / "models.py")
    assert spec is not None and spec.loader is not None
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    net = models.convnet_dropout()
    net.load_state_dict(torch.load(ROOT / FIX / "fault_variance_shift.pt", weights_only=True))
    x = torch.from_numpy(np.load(ROOT / data)["input"])
    torch.optim.swa_utils.update_bn([x[i:i + 32] for i in range(0, len(x), 32)], net)  # train mode: dropout active
    updated = tmp_path / "update_bn.pt"
    torch.save(net.state_dict(), updated)
    assert "BN607" in drift_codes(updated, "--arch", arch, "--data", data)
    fixed = tmp_path / "fixed.pt"
    code, payload = fix(f"{FIX}/fault_variance_shift.pt", "--arch", arch, "--data", data, "-o", str(fixed))
    assert code == 0 and not {"BN607", "BN601"} & drift_codes(fixed, "--arch", arch, "--data", data)


def test_html_report_of_a_fix(tmp_path: Path) -> None:
    report = tmp_path / "fix.html"
    result = CliRunner().invoke(main, ["fix", f"{FIX}/convnet_state_dict.pt", "--arch", CONVNET, "--data", SHIFTED,
                                       "-o", str(tmp_path / "f.pt"), "--report", str(report)], catch_exceptions=False)
    assert result.exit_code == 0 and report.is_file()
    html = report.read_text()
    assert "bn1" in html and "before" in html.lower()


def test_a_handful_of_samples_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """Four samples of data would overwrite trained statistics with noise (seen: a real layout model
    'fixed' from 4 images). Refused in one line, nothing written; --min-samples N accepts N."""
    with np.load(SHIFTED) as data:
        small = {key: data[key][:4] for key in data.files}
    few = tmp_path / "few.npz"
    np.savez(few, **small)
    out = tmp_path / "fixed.pt"
    result = CliRunner().invoke(main, ["fix", f"{FIX}/convnet_scripted.pt", "--data", str(few), "-o", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert "4 sample(s)" in result.output and "--min-samples 4" in result.output and "Traceback" not in result.output
    allowed = CliRunner().invoke(main, ["fix", f"{FIX}/convnet_scripted.pt", "--data", str(few), "-o", str(out), "--min-samples", "4"])
    assert allowed.exit_code == 0 and out.exists(), allowed.output


def test_the_sample_floor_counts_the_array_the_model_reads(tmp_path: Path) -> None:
    """Other arrays in the .npz do not decide: a 3-value normalisation vector beside 64 inputs is
    no reason to refuse, and 100 rows of something else beside 4 inputs do not make 4 enough
    (that case is refused in the isolated child, once the input array is known)."""
    with np.load(SHIFTED) as data:
        images = data["input"]
    ok, small = tmp_path / "ok.npz", tmp_path / "small.npz"
    np.savez(ok, input=images[:64], mean=np.zeros(3, np.float32))
    np.savez(small, input=images[:4], extra=np.zeros((100, 2), np.float32))
    out = tmp_path / "fixed.pt"
    accepted = CliRunner().invoke(main, ["fix", f"{FIX}/convnet_scripted.pt", "--data", str(ok), "-o", str(out)])
    assert accepted.exit_code == 0 and out.exists(), accepted.output
    out.unlink()
    refused = CliRunner().invoke(main, ["fix", f"{FIX}/convnet_scripted.pt", "--data", str(small), "-o", str(out)])
    assert refused.exit_code == 2 and not out.exists() and "4 sample(s)" in refused.output, refused.output
