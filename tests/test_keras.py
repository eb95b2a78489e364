"""Keras models through the real CLI: static lint, and --data on Keras 3 with the torch backend.

The runner's statistics are checked against Keras itself: a sub-model that outputs each
BatchNormalization layer's input, reduced in float64 numpy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bnlint.cli import main

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("KERAS_BACKEND", "torch")  # before any import of keras: no TensorFlow here
KERAS = "fixtures/keras"
DATA = "fixtures/data"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def lint(*args: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(main, ["--format", "json", *args], catch_exceptions=False)
    return result.exit_code, (json.loads(result.stdout) if result.stdout.strip() else {}), result.stderr


def test_static_names_and_dynamic_names_agree_in_nested_models() -> None:
    pytest.importorskip("keras")
    code, payload, _ = lint(f"{KERAS}/keras_nested_backbone_frozen.keras", "--data", f"{DATA}/keras_indomain.npz")
    (file,) = payload["files"]
    assert file["error"] is None and file["format"] == "keras"
    assert [s["layer"] for s in file["layer_stats"]] == ["backbone/bn1", "backbone/bn2"]


def test_runner_statistics_match_keras_submodels() -> None:
    keras = pytest.importorskip("keras")
    code, payload, _ = lint(f"{KERAS}/keras_convnet.keras", "--data", f"{DATA}/keras_shifted.npz")
    stats = {s["layer"]: s for s in payload["files"][0]["layer_stats"]}
    model = keras.saving.load_model(ROOT / KERAS / "keras_convnet.keras", safe_mode=True, compile=False)
    x = np.load(ROOT / DATA / "keras_shifted.npz")["input"]
    for name in ("bn1", "bn2"):
        probe = keras.Model(model.inputs, model.get_layer(name).input)
        values = np.asarray(keras.ops.convert_to_numpy(probe(x, training=False)), dtype=np.float64)
        flat = values.reshape(-1, values.shape[-1])  # channels-last: channels on the last axis
        mean, var = flat.mean(0), flat.var(0)
        assert np.allclose(stats[name]["channel"]["mean"], mean, rtol=1e-5, atol=1e-6)
        assert np.allclose(stats[name]["channel"]["var"], var, rtol=1e-5)
        n = flat.shape[0]
        assert np.allclose(stats[name]["channel"]["var_unbiased"], var * n / (n - 1), rtol=1e-5)


def test_lambda_needs_trust_to_run_but_lints_statically() -> None:
    pytest.importorskip("keras")
    code, payload, _ = lint(f"{KERAS}/keras_lambda.keras")
    assert code == 0 and payload["files"][0]["layers"] == 2
    result = CliRunner().invoke(main, [f"{KERAS}/keras_lambda.keras", "--data", f"{DATA}/keras_indomain.npz"])
    assert result.exit_code == 2 and "--trust" in result.output and "Traceback" not in result.output
    code, payload, _ = lint(f"{KERAS}/keras_lambda.keras", "--data", f"{DATA}/keras_indomain.npz", "--trust")
    assert payload["files"][0]["error"] is None and len(payload["files"][0]["layer_stats"]) == 2


def test_channels_first_data_gets_a_layout_hint(tmp_path: Path) -> None:
    pytest.importorskip("keras")
    x = np.load(ROOT / DATA / "keras_indomain.npz")["input"]
    np.savez(tmp_path / "nchw.npz", input=np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    result = CliRunner().invoke(main, [f"{KERAS}/keras_convnet.keras", "--data", str(tmp_path / "nchw.npz")])
    assert result.exit_code == 2 and "channels-first" in result.output and "Traceback" not in result.output


def test_weights_only_file_cannot_run_and_says_why() -> None:
    result = CliRunner().invoke(main, [f"{KERAS}/keras_convnet.weights.h5", "--data", f"{DATA}/keras_indomain.npz"])
    assert result.exit_code == 2 and "weights only" in result.output


def test_plain_hdf5_is_skipped_with_a_note_in_hook_mode() -> None:
    result = CliRunner().invoke(main, [f"{KERAS}/not_keras.h5", "--skip-unrecognised"])
    assert result.exit_code == 0 and "skipped" in result.stderr
    assert CliRunner().invoke(main, [f"{KERAS}/not_keras.h5"]).exit_code == 2


def test_missing_keras_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    # The model runs in the isolated child, which imports from the parent's path: a `keras` first
    # on that path that fails to import is what a machine without Keras looks like to it.
    fake = tmp_path / "keras"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'keras'\")\n")
    code = ("from bnlint.cli import main\n"
            f"main([{KERAS + '/keras_convnet.keras'!r}, '--data', {DATA + '/keras_indomain.npz'!r}])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    output = run.stdout + run.stderr
    assert run.returncode == 2 and "pip install bnlint[keras]" in output and "Traceback" not in output, output


def test_static_lint_never_imports_keras_or_tensorflow() -> None:
    code = ("import sys\nfrom bnlint.api import lint_paths\n"
            f"r = lint_paths([{KERAS + '/keras_frozen_bn_trainable.keras'!r}, {KERAS + '/keras_tf2_style.h5'!r}])\n"
            "assert not r.errors, r.errors\n"
            "print(sorted(m for m in ('keras', 'tensorflow', 'torch') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
