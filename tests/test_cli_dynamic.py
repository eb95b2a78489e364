"""Dynamic analysis through the real CLI on committed fixtures: exact BN6xx codes, first drifting
layer, batch dependence on exactly the models that normalise with batch statistics, data errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlint.cli import main

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = json.loads((ROOT / "fixtures" / "manifest.json").read_text())
DATA = MANIFEST["data"]
RUNS = [(name, run) for name, entry in MANIFEST.items() if name != "data" for run in entry.get("runs", [])]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def lint(*args: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(main, ["--format", "json", *args], catch_exceptions=False)
    payload = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.exit_code, payload, result.stderr


def fixture_args(args: list[str]) -> list[str]:
    """Manifest paths are relative to fixtures/ (flags kept as they are)."""
    return [a if a.startswith("--") else f"fixtures/{a}" for a in args]


@pytest.mark.parametrize("name, run", RUNS, ids=[f"{n}:{' '.join(r['args'])}" for n, r in RUNS])
def test_model_runs_give_exactly_the_expected_codes(name: str, run: dict) -> None:
    code, payload, _ = lint(f"fixtures/{name}", *fixture_args(run["args"]))
    (file,) = payload["files"]
    assert file["error"] is None, file["error"]
    assert sorted({f["code"] for f in file["findings"]}) == sorted(run["expect"])


@pytest.mark.parametrize("data", sorted(k for k, v in DATA.items() if not v.get("expect_error")))
def test_data_files_give_exactly_the_expected_codes(data: str) -> None:
    entry = DATA[data]
    arch = ["--arch", f"fixtures/{entry['arch']}"] if "arch" in entry else []
    code, payload, _ = lint(f"fixtures/{entry['model']}", *arch, "--data", f"fixtures/data/{data}")
    (file,) = payload["files"]
    assert file["error"] is None, file["error"]
    assert sorted({f["code"] for f in file["findings"]}) == sorted(entry["expect"]), entry["intent"]
    assert [s["layer"] for s in file["layer_stats"]] == ["bn1", "bn2", "bn3"] if "convnet" in data else True


@pytest.mark.parametrize("data", sorted(k for k, v in DATA.items() if v.get("expect_error")))
def test_bad_data_is_one_line_exit_2(data: str) -> None:
    entry = DATA[data]
    result = CliRunner().invoke(main, [f"fixtures/{entry['model']}", "--arch", f"fixtures/{entry['arch']}", "--data", f"fixtures/data/{data}"], catch_exceptions=False)
    assert result.exit_code == 2
    # the model was read: what could not run is its dynamic part, said once
    lines = [line for line in result.output.splitlines() if ": dynamic analysis not run:" in line]
    assert len(lines) == 1 and f"data/{data.rstrip('/')}" in lines[0], result.output
    assert "Traceback" not in result.output


def test_shifted_data_names_the_first_drifting_layer() -> None:
    for model, arch, data in (("convnet_state_dict.pt", "convnet", "convnet_shifted.npz"), ("mlp_state_dict.pt", "mlp", "mlp_shifted.npz")):
        _, payload, _ = lint(f"fixtures/{model}", "--arch", f"fixtures/models.py:{arch}", "--data", f"fixtures/data/{data}")
        onset = [f for f in payload["files"][0]["findings"] if f["code"] == "BN602"]
        assert [f["layer"] for f in onset] == ["bn1"]


def test_scripted_and_state_dict_runs_agree() -> None:
    """TorchScript (no --arch) and state dict + architecture measure the same statistics."""
    _, scripted, _ = lint("fixtures/convnet_scripted.pt", "--data", "fixtures/data/convnet_shifted.npz")
    _, state, _ = lint("fixtures/convnet_state_dict.pt", "--arch", "fixtures/models.py:convnet", "--data", "fixtures/data/convnet_shifted.npz")
    a, b = scripted["files"][0]["layer_stats"], state["files"][0]["layer_stats"]
    assert [s["layer"] for s in a] == [s["layer"] for s in b]
    for left, right in zip(a, b):
        assert left["max_abs_smd"] == pytest.approx(right["max_abs_smd"], rel=1e-5)


def test_onnx_drift_matches_torch() -> None:
    _, onnx_run, _ = lint("fixtures/convnet.onnx", "--data", "fixtures/data/convnet_shifted.npz")
    _, torch_run, _ = lint("fixtures/convnet_scripted.pt", "--data", "fixtures/data/convnet_shifted.npz")
    onnx_stats = onnx_run["files"][0]["layer_stats"]
    torch_stats = torch_run["files"][0]["layer_stats"]
    assert len(onnx_stats) == len(torch_stats) == 3
    for left, right in zip(onnx_stats, torch_stats):
        assert left["max_abs_smd"] == pytest.approx(right["max_abs_smd"], rel=1e-3)
    assert {f["code"] for f in onnx_run["files"][0]["findings"]} >= {"BN601", "BN602"}


def test_pickled_module_needs_trust() -> None:
    code, payload, _ = lint("fixtures/convnet_module.pt", "--data", "fixtures/data/convnet_indomain.npz")
    assert code == 2 and "--trust" in payload["files"][0]["dynamic_error"] and payload["files"][0]["error"] is None
    code, payload, _ = lint("fixtures/convnet_module.pt", "--data", "fixtures/data/convnet_indomain.npz", "--trust")
    assert code == 0 and payload["files"][0]["error"] is None and payload["files"][0]["dynamic_error"] is None


def test_state_dict_without_arch_is_a_clear_error() -> None:
    code, payload, _ = lint("fixtures/convnet_state_dict.pt", "--data", "fixtures/data/convnet_indomain.npz")
    assert code == 2 and "--arch" in payload["files"][0]["dynamic_error"]


def test_wrong_architecture_reports_missing_and_unexpected_keys() -> None:
    code, payload, _ = lint("fixtures/convnet_state_dict.pt", "--arch", "fixtures/models.py:mlp", "--data", "fixtures/data/convnet_indomain.npz")
    assert code == 2
    message = payload["files"][0]["dynamic_error"]
    assert "missing" in message and "unexpected" in message


def test_small_training_batches_are_flagged() -> None:
    args = ("fixtures/convnet_scripted.pt", "--data", "fixtures/data/convnet_indomain.npz")
    _, payload, _ = lint(*args, "--train-batch-size", "2")
    assert "BN604" in {f["code"] for f in payload["files"][0]["findings"]}
    _, payload, _ = lint(*args, "--train-batch-size", "256")
    assert "BN604" not in {f["code"] for f in payload["files"][0]["findings"]}


def test_data_is_never_modified() -> None:
    before = (ROOT / "fixtures/data/convnet_indomain.npz").read_bytes()
    lint("fixtures/convnet_scripted.pt", "--data", "fixtures/data/convnet_indomain.npz")
    assert (ROOT / "fixtures/data/convnet_indomain.npz").read_bytes() == before


def test_json_with_layer_stats_validates_against_the_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "bnlint" / "schemas" / "bnlint-report.schema.json").read_text())
    _, payload, _ = lint("fixtures/convnet_scripted.pt", "--data", "fixtures/data/convnet_shifted.npz")
    assert payload["files"][0]["layer_stats"]
    jsonschema.validate(payload, schema)


def test_text_output_shows_the_drift_table() -> None:
    result = CliRunner().invoke(main, ["fixtures/convnet_scripted.pt", "--data", "fixtures/data/convnet_shifted.npz"])
    assert "drift by layer" in result.output and "100.0%" in result.output


def test_onnx_engines_agree_and_the_note_names_the_engine() -> None:
    runs = {}
    for engine in ("onnxruntime", "reference"):
        if engine == "onnxruntime":
            pytest.importorskip("onnxruntime")
        _, payload, _ = lint("fixtures/convnet.onnx", "--data", "fixtures/data/convnet_shifted.npz", "--onnx-engine", engine)
        file = payload["files"][0]
        assert any(engine.replace("reference", "ReferenceEvaluator") in note or engine in note for note in file["notes"]), file["notes"]
        runs[engine] = file["layer_stats"]
    for left, right in zip(runs["onnxruntime"], runs["reference"]):
        np_left, np_right = left["channel"]["mean"], right["channel"]["mean"]
        assert np_left == pytest.approx(np_right, rel=1e-4, abs=1e-6)


def test_overflowing_activations_are_named_not_mistaken_for_a_small_sample() -> None:
    """One image with finite 3e38 pixels overflows the first convolution: every BN input is NaN.

    The data passes the NaN/Inf check (it is finite), so the model produced the NaN: BN608 names
    the first layer, BN603 must not blame the sample size, and numpy's warnings stay off stderr.
    """
    code, payload, stderr = lint("fixtures/convnet_state_dict.pt", "--arch", "fixtures/models.py:convnet",
                                 "--data", "fixtures/data/data_overflow.npz")
    (file,) = payload["files"]
    (finding,) = file["findings"]
    assert (finding["code"], finding["layer"]) == ("BN608", "bn1")
    assert "NaN in 8 of 8 channel(s)" in finding["message"] and "3 of 3 BatchNorm layer(s)" in finding["message"]
    assert "RuntimeWarning" not in stderr and code == 1
