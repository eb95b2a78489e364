"""End to end through `run_dynamic` on the committed fixtures (see fixtures/manifest.json)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnlint.config import Config  # noqa: E402
from bnlint.dynamic import DynamicOptions, DynamicResult, run_dynamic  # noqa: E402
from bnlint.errors import DataError, InputError, TrustRequired, UsageError  # noqa: E402
from bnlint.loaders import load_model  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATA = FIXTURES / "data"
CONVNET = f"{FIXTURES / 'models.py'}:convnet"
MLP = f"{FIXTURES / 'models.py'}:mlp"


def run(model: str, data: str, config: Config | None = None, **options: Any) -> DynamicResult:
    return run_dynamic(load_model(FIXTURES / model), DynamicOptions(data=str(DATA / data), quiet=True, **options), config or Config())


def codes(result: DynamicResult) -> list[str]:
    return sorted(f.code for f in result.findings)


def by_code(result: DynamicResult, code: str) -> list[str | None]:
    return [f.layer for f in result.findings if f.code == code]


@pytest.mark.parametrize("model, data, arch", [
    ("convnet_state_dict.pt", "convnet_indomain.npz", CONVNET),
    ("convnet_state_dict.pt", "convnet_indomain.npy", CONVNET),
    ("convnet_state_dict.pt", "convnet_shards", CONVNET),
    ("mlp_state_dict.pt", "mlp_indomain.npz", MLP),
    ("convnet_scripted.pt", "convnet_indomain.npz", None),
    ("convnet_traced.pt", "convnet_indomain.npz", None),
    ("convnet.onnx", "convnet_indomain.npz", None),
    ("mlp.onnx", "mlp_indomain.npz", None),
])
def test_in_domain_data_gives_no_finding(model: str, data: str, arch: str | None) -> None:
    result = run(model, data, arch=arch)
    assert codes(result) == []
    assert len(result.layer_stats) == (2 if "mlp" in model else 3)
    json.dumps(result.layer_stats)  # JSON-able, per-channel arrays included
    assert len(result.layer_stats[0]["channel"]["smd"]) == result.layer_stats[0]["channels"]


@pytest.mark.parametrize("model, data, arch, first", [
    ("convnet_state_dict.pt", "convnet_shifted.npz", CONVNET, "bn1"),
    ("mlp_state_dict.pt", "mlp_shifted.npz", MLP, "bn1"),
    ("convnet_scripted.pt", "convnet_shifted.npz", None, "bn1"),
    ("convnet.onnx", "convnet_shifted.npz", None, "bn1"),
    ("fault_frozen_finetuned.pt", "convnet_indomain.npz", CONVNET, "bn1"),
])
def test_shifted_data_drifts_from_the_first_layer(model: str, data: str, arch: str | None, first: str) -> None:
    result = run(model, data, arch=arch)
    assert set(codes(result)) == {"BN601", "BN602"}
    assert first in by_code(result, "BN601")
    assert by_code(result, "BN602") == [first]
    drift = next(f for f in result.findings if f.code == "BN601")
    assert drift.values["mean_kl"] > 0.05 and "running statistics" in drift.message


def test_tiny_sample_says_it_is_too_small_instead_of_guessing() -> None:
    result = run("convnet_state_dict.pt", "convnet_tiny.npz", arch=CONVNET)
    assert codes(result) == ["BN603"]
    assert "8" in result.findings[0].message


def test_thresholds_come_from_the_dynamic_config_table() -> None:
    loose = Config(dynamic={"drift-kl": 1.0})
    assert codes(run("convnet_state_dict.pt", "convnet_shifted.npz", loose, arch=CONVNET)) == []
    with pytest.raises(UsageError, match="unknown"):
        run("convnet_state_dict.pt", "convnet_shifted.npz", Config(dynamic={"drift_kll": 1}), arch=CONVNET)


@pytest.mark.parametrize("model, trust, dependent", [
    ("fault_traced_train.pt", False, True),
    ("convnet_trs_false_scripted.pt", False, True),
    ("fault_training_mode.onnx", False, True),
    ("fault_batch_stats.onnx", False, True),
    ("fault_no_running_stats_module.pt", True, True),
    ("convnet_traced.pt", False, False),
    ("convnet_scripted.pt", False, False),
    ("fault_train_mode_scripted.pt", False, False),  # scripted: eval() takes effect, so no dependence
    ("fault_train_mode_module.pt", True, False),
    ("convnet.onnx", False, False),
])
def test_batch_dependence_fires_exactly_on_batch_statistics(model: str, trust: bool, dependent: bool) -> None:
    result = run(model, "convnet_indomain.npz", trust=trust)
    found = by_code(result, "BN606")
    if not dependent:
        assert found == []
        return
    assert len(found) == 3  # every BN layer of the convnet, each with its evidence
    finding = next(f for f in result.findings if f.code == "BN606")
    assert finding.values["relative_diff"] > 0.1
    assert "batch statistics" in finding.message


def test_fixed_batch_training_onnx_is_caught_without_varying_the_batch() -> None:
    result = run("fault_fixed_batch1_training.onnx", "convnet_indomain.npz")
    assert len(by_code(result, "BN606")) == 3


def _channel_stats(result: DynamicResult) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.array(s["channel"]["mean"]), np.array(s["channel"]["var"])) for s in result.layer_stats]


def test_onnxruntime_reference_evaluator_and_torch_agree() -> None:
    torch_stats = _channel_stats(run("convnet_state_dict.pt", "convnet_shifted.npz", arch=CONVNET))
    ort_result = run("convnet.onnx", "convnet_shifted.npz", onnx_engine="onnxruntime")
    ref_result = run("convnet.onnx", "convnet_shifted.npz", onnx_engine="reference")
    assert ort_result.engine.startswith("onnxruntime") and ref_result.engine.startswith("onnx.reference")
    for other in (_channel_stats(ort_result), _channel_stats(ref_result)):
        for (mean_a, var_a), (mean_b, var_b) in zip(torch_stats, other):
            np.testing.assert_allclose(mean_b, mean_a, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(var_b, var_a, rtol=1e-4)
    assert codes(ort_result) == codes(ref_result)


def test_training_mode_onnx_reads_real_bn_inputs_reproducibly() -> None:
    """The ORT trap: BN folded into Conv or run-to-run differences; compare with the reference evaluator."""
    first = run("fault_training_mode.onnx", "convnet_shifted.npz", onnx_engine="onnxruntime")
    again = run("fault_training_mode.onnx", "convnet_shifted.npz", onnx_engine="onnxruntime")
    reference = run("fault_training_mode.onnx", "convnet_shifted.npz", onnx_engine="reference")
    assert "basic" in first.engine
    for (m1, v1), (m2, v2), (m3, v3) in zip(_channel_stats(first), _channel_stats(again), _channel_stats(reference)):
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_array_equal(v1, v2)
        np.testing.assert_allclose(m3, m1, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(v3, v1, rtol=1e-4)


def test_train_batch_size_small_batch_noise_and_single_value() -> None:
    assert set(codes(run("mlp_state_dict.pt", "mlp_indomain.npz", arch=MLP, train_batch_size=1))) == {"BN605"}
    noisy = run("mlp_state_dict.pt", "mlp_indomain.npz", arch=MLP, train_batch_size=4)
    assert by_code(noisy, "BN604") == ["bn1", "bn2"]
    assert codes(run("mlp_state_dict.pt", "mlp_indomain.npz", arch=MLP, train_batch_size=128)) == []
    lightning = run("convnet_lightning.ckpt", "convnet_indomain.npz", arch=CONVNET)  # hyper_parameters.batch_size
    assert codes(lightning) == []
    assert lightning.layer_stats[0]["batch_noise"]["batch_size"] > 1
    assert any("model." in note for note in lightning.notes)


@pytest.mark.parametrize("data, words", [
    ("data_nan.npz", "NaN"),
    ("data_nhwc.npz", "NCHW"),
    ("data_strings.npz", "non-numeric"),
    ("data_empty.npz", "empty"),
    ("data_pickled_object.npy", "pickle"),
    ("no_such_file.npz", "no such"),
])
@pytest.mark.parametrize("model, arch", [("convnet_state_dict.pt", CONVNET), ("convnet.onnx", None)])
def test_bad_data_is_one_line_error(data: str, words: str, model: str, arch: str | None) -> None:
    with pytest.raises(DataError) as error:
        run(model, data, arch=arch)
    message = str(error.value)
    assert "\n" not in message and words in message


def test_input_mapping_errors_name_the_arrays() -> None:
    with pytest.raises(DataError, match="no array 'pixels'.*arrays: input"):
        run("convnet_state_dict.pt", "convnet_indomain.npz", arch=CONVNET, inputs={"input": "pixels"})
    result = run("convnet.onnx", "convnet_indomain.npz", inputs={"input": "input"})
    assert codes(result) == []


def test_model_errors() -> None:
    with pytest.raises(TrustRequired, match="--trust"):
        run("convnet_module.pt", "convnet_indomain.npz")
    with pytest.raises(UsageError, match="--arch"):
        run("convnet_state_dict.pt", "convnet_indomain.npz")
    with pytest.raises(InputError, match="missing key.*unexpected key"):
        run("mlp_state_dict.pt", "convnet_indomain.npz", arch=CONVNET)
    with pytest.raises(UsageError, match="no callable"):
        run("convnet_state_dict.pt", "convnet_indomain.npz", arch=f"{FIXTURES / 'models.py'}:nothing")


def test_stored_model_is_never_modified(capsys: pytest.CaptureFixture[str]) -> None:
    path = FIXTURES / "fault_traced_train.pt"  # running it updates its in-memory running stats
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run("fault_traced_train.pt", "convnet_indomain.npz")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert result.layer_stats[1]["has_running_stats"]
    assert capsys.readouterr().err == ""  # no progress bar when stderr is not a TTY


def test_hooks_are_removed_even_when_the_data_fails(tmp_path: Path) -> None:
    from bnlint.dynamic.hooks import record_inputs
    from bnlint.dynamic.torch_runner import ModuleRunner
    from fixtures.models import convnet

    model = convnet()
    bad = np.zeros((4, 3, 16, 16), dtype=np.float32)
    runner = ModuleRunner(model, torch.device("cpu"), "x.npz", "test")
    with pytest.raises(DataError):
        runner.collect(iter([(0, [bad[:, :2]])]), lambda *a: None, lambda: None)  # 2 channels: the model refuses
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError):
        with record_inputs({"bn1": model.bn1}, lambda *a: None):
            raise RuntimeError("boom")
    assert not model.bn1._forward_pre_hooks


def test_options_are_checked_and_dependence_is_reported() -> None:
    with pytest.raises(UsageError, match="--device"):
        run("convnet.onnx", "convnet_indomain.npz", device="tpu")
    with pytest.raises(UsageError, match="--batch-size"):
        run("convnet.onnx", "convnet_indomain.npz", batch_size=0)
    result = run("convnet.onnx", "convnet_indomain.npz", batch_size=7)  # uneven batches: same statistics
    assert result.batch_dependence is not None and result.batch_dependence["relative_diff"] < 1e-4
    reference = run("convnet.onnx", "convnet_indomain.npz", batch_size=64)
    for (m1, v1), (m2, v2) in zip(_channel_stats(result), _channel_stats(reference)):
        np.testing.assert_allclose(m1, m2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v1, v2, rtol=1e-5)
