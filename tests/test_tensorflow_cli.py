"""TensorFlow's own formats through the CLI: SavedModel folders, frozen GraphDefs and checkpoints
found by content, linted statically without importing TensorFlow."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlint.cli import main

ROOT = Path(__file__).resolve().parents[1]
TF = ROOT / "fixtures" / "tf_formats"

EXPECTED = {  # fixture -> (format, codes at warning or above)
    "savedmodel_healthy": ("tf-savedmodel", set()),
    "savedmodel_tf1": ("tf-savedmodel", set()),
    "savedmodel_keras3": ("tf-savedmodel", set()),
    "savedmodel_training": ("tf-savedmodel", {"BN404"}),
    "savedmodel_keras3_training": ("tf-savedmodel", {"BN404", "BN406"}),
    "savedmodel_nan": ("tf-savedmodel", {"BN101"}),
    "savedmodel_never_updated": ("tf-savedmodel", {"BN104"}),
    "savedmodel_frozen_base": ("tf-savedmodel", {"BN408"}),
    "frozen_graph.pb": ("tf-graphdef", set()),
    "frozen_unfused.pb": ("tf-graphdef", set()),
    "frozen_folded.pb": ("tf-graphdef", {"BN502", "BN503"}),  # BN folded into convs: graph rules (tf_nodes)
    "ckpt_name": ("tf-checkpoint", set()),
    "ckpt_object": ("tf-checkpoint", set()),
}


def lint(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, [*args, "--format", "json"])
    return result.exit_code, json.loads(result.stdout)


def serious(entry: dict) -> set[str]:
    return {f["code"] for f in entry["findings"] if f["severity"] in ("error", "warning")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_fixture(name: str) -> None:
    kind, codes = EXPECTED[name]
    code, payload = lint(str(TF / name))
    (entry,) = payload["files"]
    assert entry["error"] is None, entry["error"]
    assert (entry["layers"] >= 1 or name == "frozen_folded.pb") and serious(entry) == codes
    assert code == (1 if codes else 0)


def test_a_folder_search_finds_savedmodels_and_checkpoints_as_one_model_each() -> None:
    code, payload = lint(str(TF))
    shown = sorted(Path(entry["path"]).name for entry in payload["files"])
    assert shown == sorted(EXPECTED)  # variables/, shards and metadata files are parts, never linted alone
    assert not [entry for entry in payload["files"] if entry["error"]]


def test_checkpoint_by_index_or_shard_is_the_same_checkpoint() -> None:
    index = next((TF / "ckpt_object").glob("*.index"))
    shard = next((TF / "ckpt_object").glob("*.data-*"))
    results = [lint(str(path))[1]["files"][0] for path in (TF / "ckpt_object", index, shard)]
    assert len({entry["layers"] for entry in results}) == 1 and all(entry["error"] is None for entry in results)


def test_pb_files_are_told_apart_by_content(tmp_path: Path) -> None:
    renamed = tmp_path / "model.onnx"  # a GraphDef named like ONNX is still read as a GraphDef
    renamed.write_bytes((TF / "frozen_graph.pb").read_bytes())
    _, payload = lint(str(renamed))
    assert payload["files"][0]["format"] == "tf-graphdef"
    garbage = tmp_path / "weights.pb"
    garbage.write_bytes(b"\xff\xfe not protobuf at all" * 10)
    code, payload = lint(str(garbage))
    assert code == 2 and "not a recognised model file" in payload["files"][0]["error"]


def test_data_on_a_savedmodel_without_tensorflow_names_the_extra_and_keeps_the_static_findings() -> None:
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here: the SavedModel runs (tests/test_tf_dynamic.py)")
    data = ROOT / "fixtures" / "data" / "convnet_tiny.npz"
    code, payload = lint(str(TF / "savedmodel_nan"), "--data", str(data))
    (entry,) = payload["files"]
    assert code == 2 and "BN101" in serious(entry)
    assert "bnlint[tensorflow]" in entry["dynamic_error"]


def test_data_on_a_frozen_graphdef_or_checkpoint_says_why_it_cannot_run() -> None:
    data = ROOT / "fixtures" / "data" / "convnet_tiny.npz"
    code, payload = lint(str(TF / "frozen_graph.pb"), "--data", str(data))
    assert code == 2 and payload["files"][0]["dynamic_error"]
    code, payload = lint(str(TF / "ckpt_name" / "model.ckpt.index"), "--data", str(data))
    assert code == 2 and "no graph to run" in payload["files"][0]["dynamic_error"]


def test_static_lint_of_tensorflow_formats_never_imports_tensorflow() -> None:
    code = ("import sys\nfrom bnlint.api import lint_paths\n"
            f"report = lint_paths([{str(TF)!r}])\n"
            "assert not report.errors, report.errors\n"
            "print(sorted(m for m in ('tensorflow', 'tf_keras', 'keras', 'torch', 'google.protobuf') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_batch_statistics_in_a_savedmodel_are_explained_in_tensorflow_terms() -> None:
    """BN406 on a Keras 3 model saved while called with training=True: the message names that cause
    and the fix says how to export again; neither talks about PyTorch's track_running_stats."""
    result = CliRunner().invoke(main, [str(TF / "savedmodel_keras3_training"), "--format", "json"])
    payload = json.loads(result.stdout)
    (bn406,) = [f for f in payload["files"][0]["findings"] if f["code"] == "BN406"]
    assert "called with training=True" in bn406["message"] and "track_running_stats" not in bn406["message"]
    assert "training=False" in bn406["fix"] and "track_running_stats" not in bn406["fix"]
