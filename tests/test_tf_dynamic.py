"""TensorFlow SavedModels on --data and `bnlint fix`, through the CLI, in the isolated child.

Tests marked `tensorflow` need TensorFlow (run them with a venv that has it:
`/tmp/tfenv/bin/python -m pytest tests/test_tf_dynamic.py`); they skip where it is absent. The
rest run everywhere: without TensorFlow the run is one line naming what to install, a checkpoint
has no graph to run, and a fixed folder is published into place.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.errors import OutputError
from bnlint.fix.publish_folder import publish_folder

ROOT = Path(__file__).resolve().parents[1]
TF = ROOT / "fixtures" / "tf_formats"
HEALTHY = TF / "savedmodel_healthy"
HAS_TF = importlib.util.find_spec("tensorflow") is not None
NO_TF = "TensorFlow is not installed (pip install '.[tensorflow]')"


def _data(folder: Path) -> tuple[Path, Path]:
    """Inputs for the 8x8x3 convnets: one domain, and the same shifted and rescaled."""
    rng = np.random.default_rng(0)
    plain, shifted = folder / "plain.npz", folder / "shifted.npz"
    np.savez(plain, image=rng.normal(0, 1, (48, 8, 8, 3)).astype(np.float32))
    np.savez(shifted, image=(rng.normal(0, 1, (48, 8, 8, 3)) * 3 + 2).astype(np.float32))
    return plain, shifted


def lint(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, [*args, "--format", "json"], catch_exceptions=False)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, json.loads(result.stdout)


def codes(entry: dict[str, Any], prefix: str = "BN6") -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in entry["findings"]:
        if f["code"].startswith(prefix):
            found.setdefault(f["code"], set()).add(f["layer"])
    return found


def test_without_tensorflow_data_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    # The child imports from the parent's path: a `tensorflow` first on it that fails to import is
    # what a machine without TensorFlow looks like to it (and is one, in the project's venv).
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'tensorflow'\")\n")
    plain, _ = _data(tmp_path)
    code = f"from bnlint.cli import main\nmain([{str(HEALTHY)!r}, '--data', {str(plain)!r}])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(ROOT)])})
    output = run.stdout + run.stderr
    naming = [line for line in output.splitlines() if "bnlint[tensorflow]" in line]
    assert run.returncode == 2 and len(naming) == 1 and "Traceback" not in output, output
    assert "needs TensorFlow" in naming[0]


def test_a_checkpoint_has_no_graph_to_run(tmp_path: Path) -> None:
    plain, _ = _data(tmp_path)
    code, payload = lint(str(TF / "ckpt_object"), "--data", str(plain))
    (entry,) = payload["files"]
    assert code == 2 and "no graph to run" in entry["dynamic_error"] and "SavedModel" in entry["dynamic_error"]


def test_publish_folder_puts_a_new_folder_in_place_and_replaces_an_old_one(tmp_path: Path) -> None:
    staged = tmp_path / "stage" / "fixed"
    (staged / "variables").mkdir(parents=True)
    (staged / "saved_model.pb").write_bytes(b"new graph")
    (staged / "variables" / "variables.index").write_bytes(b"new index")
    target = tmp_path / "out"
    assert publish_folder(staged, target, source=HEALTHY, in_place=False) == [target]
    assert (target / "variables" / "variables.index").read_bytes() == b"new index"
    (staged / "saved_model.pb").write_bytes(b"newer graph")
    (target / "stale").write_bytes(b"from the old output")
    publish_folder(staged, target, source=HEALTHY, in_place=True)
    assert (target / "saved_model.pb").read_bytes() == b"newer graph" and not (target / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stage"]  # no temporary or old folder left
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(OutputError, match="not a folder"):
        publish_folder(staged, tmp_path / "file", source=HEALTHY, in_place=False)
    with pytest.raises(OutputError, match="does not exist"):
        publish_folder(staged, tmp_path / "missing" / "out", source=HEALTHY, in_place=False)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`bnlint fix` of the healthy SavedModel on the plain data (one isolated run for the module),
    published as a folder by bnlint.fix.publish."""
    if not HAS_TF:
        pytest.skip(NO_TF)
    folder = tmp_path_factory.mktemp("tf_fix")
    plain, _ = _data(folder)
    out = folder / "fixed"
    result = CliRunner().invoke(main, ["fix", str(HEALTHY), "--data", str(plain), "-o", str(out), "--format", "json"],
                                catch_exceptions=False)
    assert "Traceback" not in result.output, result.output
    return {"code": result.exit_code, "payload": json.loads(result.stdout), "out": out, "plain": plain}


@pytest.mark.tensorflow
@pytest.mark.skipif(not HAS_TF, reason=NO_TF)
def test_savedmodel_on_shifted_data_drifts_under_the_static_names(tmp_path: Path) -> None:
    _, shifted = _data(tmp_path)
    imported = "tensorflow" in sys.modules  # True only if another test imported it in this process first
    code, payload = lint(str(HEALTHY), "--data", str(shifted))
    (entry,) = payload["files"]
    assert code == 1 and entry["dynamic_error"] is None
    assert imported or "tensorflow" not in sys.modules  # TensorFlow ran in the isolated child only
    assert codes(entry)["BN601"] == {"bn1", "bn2"} and codes(entry)["BN602"] == {"bn1"}
    assert any("tensorflow" in note for note in entry["notes"]), entry["notes"]
    assert [s["layer"] for s in entry["layer_stats"]] == ["bn1", "bn2"]


@pytest.mark.tensorflow
@pytest.mark.skipif(not HAS_TF, reason=NO_TF)
def test_fix_writes_a_savedmodel_that_lints_clean_and_input_untouched(fixed: dict[str, Any]) -> None:
    record = fixed["payload"]["fix"]
    assert fixed["code"] == 0 and record["first_drift_before"] == "bn1" and record["first_drift_after"] is None
    assert [row["layer"] for row in record["layers"]] == ["bn1", "bn2"]
    assert all(row["mean_kl_after"] < 1e-5 for row in record["layers"]), record["layers"]
    out = fixed["out"]
    for same in ("saved_model.pb", "keras_metadata.pb"):  # everything but the variables, byte for byte
        assert (out / same).read_bytes() == (HEALTHY / same).read_bytes()
    code, payload = lint(str(out), "--data", str(fixed["plain"]))  # "a fixed file always lints clean"
    assert code == 0 and not codes(payload["files"][0]), payload["files"][0]["findings"]


@pytest.mark.tensorflow
@pytest.mark.skipif(not HAS_TF, reason=NO_TF)
def test_fixed_statistics_load_in_tensorflow_and_match_an_independent_computation(fixed: dict[str, Any]) -> None:
    """The fixed SavedModel loads with tf.saved_model.load; its statistics are the population
    statistics of each layer's input in inference form with the layer before it fixed, computed
    here in float64 from the checkpoint's kernels (tf.nn.conv2d), not by bnlint's code."""
    import tensorflow as tf

    out = fixed["out"]
    loaded = tf.saved_model.load(str(out))
    reader = tf.train.load_checkpoint(str(out / "variables" / "variables"))
    old = tf.train.load_checkpoint(str(HEALTHY / "variables" / "variables"))

    def value(key: str, source: Any = reader) -> np.ndarray:
        return np.asarray(source.get_tensor(f"layer_with_weights-{key}/.ATTRIBUTES/VARIABLE_VALUE"), np.float64)

    x = np.load(fixed["plain"])["image"].astype(np.float64)
    conv1 = tf.nn.conv2d(x, value("0/kernel"), 1, "VALID").numpy()
    mean1, var1 = conv1.mean(axis=(0, 1, 2)), conv1.var(axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(value("1/moving_mean"), mean1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value("1/moving_variance"), var1, rtol=1e-5)
    bn1 = (conv1 - value("1/moving_mean")) / np.sqrt(value("1/moving_variance") + 1e-3) * value("1/gamma") + value("1/beta")
    conv2 = tf.nn.conv2d(np.maximum(bn1, 0), value("2/kernel"), 1, "VALID").numpy()
    np.testing.assert_allclose(value("3/moving_mean"), conv2.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value("3/moving_variance"), conv2.var(axis=(0, 1, 2), ddof=1), rtol=1e-5)
    for key in ("0/kernel", "1/gamma", "1/beta", "2/kernel", "3/gamma", "3/beta", "4/kernel", "4/bias"):
        assert np.array_equal(value(key), value(key, old))  # only the statistics changed
    restored = {v.name: v.numpy() for v in loaded.variables}
    np.testing.assert_array_equal(restored["bn2/moving_variance:0"], np.float32(value("3/moving_variance")))
    head = loaded.signatures["serving_default"](image=tf.constant(x[:2], tf.float32))["head"].numpy()
    assert head.shape == (2, 2) and np.isfinite(head).all()


@pytest.mark.tensorflow
@pytest.mark.skipif(not HAS_TF, reason=NO_TF)
def test_training_graph_reports_batch_statistics_layers(tmp_path: Path) -> None:
    plain, _ = _data(tmp_path)
    code, payload = lint(str(TF / "savedmodel_training"), "--data", str(plain))
    (entry,) = payload["files"]
    assert code == 1 and entry["dynamic_error"] is None
    assert codes(entry)["BN606"] == {"bn1", "bn2"}
    assert codes(entry, "BN404")["BN404"] == {"bn1", "bn2"}  # the static finding, under the same names


@pytest.mark.tensorflow
@pytest.mark.skipif(not HAS_TF, reason=NO_TF)
def test_fix_of_a_training_graph_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    plain, _ = _data(tmp_path)
    out = tmp_path / "fixed"
    result = CliRunner().invoke(main, ["fix", str(TF / "savedmodel_training"), "--data", str(plain), "-o", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "nothing written" in lines[0] and "layer bn1" in lines[0] and "is_training=true" in lines[0]
    assert not out.exists()


@pytest.mark.tensorflow
@pytest.mark.skipif(not HAS_TF, reason=NO_TF)
def test_a_shipped_savedmodel_runs_fixes_and_relints_clean(tmp_path: Path) -> None:
    """basic-pitch's own SavedModel (fixtures/third_party, a real tf.keras 2 export): measured on
    audio it was not trained on it drifts; `bnlint fix` writes a SavedModel that lints clean with and
    without that data."""
    real = Path(__file__).resolve().parents[1] / "fixtures" / "third_party" / "basic_pitch_nmp"
    data = tmp_path / "audio.npy"
    np.save(data, np.random.default_rng(0).normal(0, 0.1, (32, 43844, 1)).astype(np.float32))  # fix needs 32 samples
    code, payload = lint(str(real), "--data", str(data))
    (entry,) = payload["files"]
    assert code == 1 and entry["dynamic_error"] is None and "BN601" in codes(entry)
    fixed = tmp_path / "fixed"
    result = CliRunner().invoke(main, ["fix", str(real), "--data", str(data), "-o", str(fixed)])
    assert result.exit_code == 0, result.output
    for extra in ([], ["--data", str(data)]):
        code, payload = lint(str(fixed), *extra)
        found = {(f["code"], f["severity"]) for f in payload["files"][0]["findings"]}
        assert code == 0 and found <= {("BN505", "info"), ("BN506", "info")}, payload  # the input's own graph facts
