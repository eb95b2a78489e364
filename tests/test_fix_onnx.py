"""The ONNX side of `bnlint fix`: recalibration (against an independent float64 reference),
training-mode rewrites, folding, and writing (checker, byte-identical inputs, external data)."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

pytest.importorskip("onnxruntime")

from bnlint.api import lint_paths  # noqa: E402
from bnlint.config import Config  # noqa: E402
from bnlint.dynamic import DynamicOptions, run_dynamic  # noqa: E402
from bnlint.errors import InputError, UsageError  # noqa: E402
from bnlint.fix.onnx_fold import fold  # noqa: E402
from bnlint.fix.onnx_recalibrate import recalibrate_onnx, sample_moments  # noqa: E402
from bnlint.fix.onnx_rewrite import rewrite_training_mode  # noqa: E402
from bnlint.fix.onnx_write import OnnxFix, session  # noqa: E402
from bnlint.fix.recalibrate import RecalibrationError  # noqa: E402
from bnlint.loaders import load_model  # noqa: E402
from bnlint.loaders.onnx_file import load_onnx

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATA = FIXTURES / "data"
SHIFTED, INDOMAIN = DATA / "convnet_shifted.npz", DATA / "convnet_indomain.npz"
CONVNET = FIXTURES / "convnet.onnx"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_model(path: Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    model = onnx.load(str(path)) if isinstance(path, Path) else path
    runner = session(model, "onnxruntime", "test", level="none")
    return runner([model.graph.output[0].name], {model.graph.input[0].name: x})[0]


def data(path: Path = SHIFTED) -> np.ndarray:
    return np.load(path)["input"]


def dynamic_codes(path: Path, data_path: Path) -> list[str]:
    result = run_dynamic(load_model(path), DynamicOptions(data=str(data_path), quiet=True), Config())
    return sorted(f.code for f in result.findings)


def static_codes(path: Path) -> list[str]:
    return sorted(f.code for f in lint_paths([path]).findings)


def reference_statistics(path: Path, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Sequential population statistics computed independently of bnlint: the model cast to
    float64 and run by onnx's ReferenceEvaluator over all samples at once, one full pass per
    layer with the layers before it already set; numpy's mean and var(ddof=1) per channel."""
    model = onnx.load(str(path))
    graph = model.graph
    for index, init in enumerate(graph.initializer):
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32:
            graph.initializer[index].CopyFrom(numpy_helper.from_array(array.astype(np.float64), init.name))
    for value in [*graph.input, *graph.output]:
        value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    found = {}
    for node in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        values = ReferenceEvaluator(model).run(None, {"input": x.astype(np.float64)}, intermediate=True)
        activation = values[node.input[0]]
        axes = (0, *range(2, activation.ndim))
        mean, var = activation.mean(axis=axes), activation.var(axis=axes, ddof=1)
        for name, stat in ((node.input[3], mean), (node.input[4], var)):
            target = next(i for i, t in enumerate(graph.initializer) if t.name == name)
            graph.initializer[target].CopyFrom(numpy_helper.from_array(stat, name))
        found[node.name] = (mean, var)
    # keyed by bnlint's layer names (PyTorch exports: the module path; the node name is an alias)
    names = {alias: layer.name for layer in load_onnx(path).layers for alias in layer.names()}
    return {names.get(key, key): value for key, value in found.items()}


def assert_stats_close(fix: OnnxFix, expected: dict[str, tuple[np.ndarray, np.ndarray]], rtol: float = 1e-6) -> None:
    assert [layer.name for layer in fix.layers] == list(expected)
    for layer in fix.layers:
        mean, var = expected[layer.name]
        np.testing.assert_allclose(layer.var, var, rtol=rtol)
        # a mean near 0 has no relative precision: compare it on the channel's own scale
        np.testing.assert_array_less(np.abs(layer.mean - mean), rtol * (np.abs(mean) + np.sqrt(var)))


# ---------------------------------------------------------------- (a) exact statistics
@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return reference_statistics(CONVNET, data())


def test_recalibration_matches_an_independent_float64_reference(reference: dict[str, Any]) -> None:
    fix = recalibrate_onnx(CONVNET, SHIFTED)
    assert_stats_close(fix, reference)
    assert [layer.count for layer in fix.layers] == [256 * 16 * 16, 256 * 8 * 8, 256 * 4 * 4]
    for layer in fix.layers:
        assert layer.old_mean is not None and layer.old_var is not None
        assert layer.before["mean_kl"] > 10 * layer.after["mean_kl"]
    assert fix.metrics["recalibrate_segments"] == 3 and fix.metrics["recalibrate_truncated_passes"] == 0


@pytest.mark.parametrize("options", [{"batch_size": 7}, {"batch_size": 100}, {"batch_size": 256}, {"strategy": "passes"},
                                     {"memory_budget": 1 << 20}, {"engine": "reference", "batch_size": 64}])
def test_batch_splits_strategies_and_engines_agree(reference: dict[str, Any], options: dict[str, Any]) -> None:
    fix = recalibrate_onnx(CONVNET, SHIFTED, **options)
    assert_stats_close(fix, reference)
    if "memory_budget" in options:
        assert fix.metrics["recalibrate_truncated_passes"] > 0 and any("budget" in note for note in fix.notes)


def test_sample_moments_match_float64_numpy() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 3, 70, 90)) * [[[[0.01]], [[3.0]], [[1.0]]]] + [[[[100.0]], [[-2.0]], [[0.0]]]]).astype(np.float32)
    var, mean = sample_moments(x)
    flat = x.reshape(5, 3, -1).astype(np.float64)
    scale = np.abs(flat.mean(axis=2)) + flat.std(axis=2)
    np.testing.assert_array_less(np.abs(mean - flat.mean(axis=2)), 1e-7 * scale)
    np.testing.assert_allclose(var, flat.var(axis=2), rtol=1e-6)


# ---------------------------------------------------------------- (b) drift gone
def test_recalibrated_model_shows_no_drift(tmp_path: Path) -> None:
    assert "BN601" in dynamic_codes(CONVNET, SHIFTED)
    out = recalibrate_onnx(CONVNET, SHIFTED).write(tmp_path / "fixed.onnx")
    found = dynamic_codes(out, SHIFTED)
    assert "BN601" not in found and "BN602" not in found


def test_layers_glob_and_dry_run(tmp_path: Path) -> None:
    fix = recalibrate_onnx(CONVNET, SHIFTED, layers="/bn2/*", dry_run=True)
    assert [layer.name for layer in fix.layers] == ["bn2"]  # the glob matched the node name, an alias
    stored = {t.name: numpy_helper.to_array(t) for t in fix.model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(CONVNET)).graph.initializer}
    np.testing.assert_array_equal(stored["bn1.running_mean"], original["bn1.running_mean"])
    np.testing.assert_allclose(stored["bn2.running_var"], fix.layers[0].var.astype(np.float32))
    with pytest.raises(UsageError, match="dry run"):
        fix.write(tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(UsageError, match="matches no"):
        recalibrate_onnx(CONVNET, SHIFTED, layers="nothing*")


def test_constant_node_and_shared_statistics(tmp_path: Path, reference: dict[str, Any]) -> None:
    """Statistics in Constant nodes (PaddlePaddle's exports) are updated in place; a tensor two
    BNs share gets a new initializer per layer, so writing one cannot change the other."""
    model = onnx.load(str(CONVNET))
    graph = model.graph
    for name in ("bn1.running_mean", "bn1.running_var"):
        index = next(i for i, t in enumerate(graph.initializer) if t.name == name)
        tensor = graph.initializer[index]
        graph.node.insert(0, helper.make_node("Constant", [], [name], value=tensor))
        del graph.initializer[index]
    shared = numpy_helper.from_array(np.ones(16, np.float32), "shared_var")
    graph.initializer.append(shared)
    bn2 = next(n for n in graph.node if n.name == "/bn2/BatchNormalization")
    bn2.input[4] = "shared_var"
    graph.node.append(helper.make_node("Identity", ["shared_var"], ["shared_copy"]))
    graph.output.append(helper.make_tensor_value_info("shared_copy", TensorProto.FLOAT, [16]))
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    fix = recalibrate_onnx(path, SHIFTED)
    np.testing.assert_allclose(fix.layers[0].var, reference["bn1"][1], rtol=1e-6)
    out = fix.write(tmp_path / "odd_fixed.onnx")
    written = onnx.load(str(out))
    assert {n.output[0] for n in written.graph.node if n.op_type == "Constant"} == {"bn1.running_mean", "bn1.running_var"}
    values = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    np.testing.assert_array_equal(values["shared_var"], np.ones(16, np.float32))
    assert next(n for n in written.graph.node if n.name == "/bn2/BatchNormalization").input[4] == "/bn2/BatchNormalization.running_var"


# ---------------------------------------------------------------- (c) rewrite
@pytest.mark.parametrize("name", ["fault_training_mode.onnx", "fault_fixed_batch1_training.onnx"])
def test_training_mode_rewritten_to_eval_semantics(tmp_path: Path, name: str) -> None:
    source = FIXTURES / name
    assert "BN404" in static_codes(source)
    fix = rewrite_training_mode(source)
    assert len(fix.rewritten) == 3
    out = fix.write(tmp_path / "eval.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert all(len(n.output) == 1 for n in model.graph.node if n.op_type == "BatchNormalization")
    assert [n.name for n in model.graph.node] == [n.name for n in onnx.load(str(source)).graph.node]
    x = data(INDOMAIN)[:8]
    expected = np.concatenate([run_model(CONVNET, x[i:i + 1]) for i in range(8)])  # the same net exported in eval mode
    got = np.concatenate([run_model(out, x[i:i + 1]) for i in range(8)])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert fix.metrics["eval_form_max_abs"] < 1e-5
    assert "BN404" not in static_codes(out) and "BN504" not in static_codes(out)
    assert "BN606" not in dynamic_codes(out, INDOMAIN)


def test_batch_statistics_replaced_by_population_statistics(tmp_path: Path) -> None:
    source = FIXTURES / "fault_batch_stats.onnx"
    assert "BN406" in static_codes(source)
    with pytest.raises(RecalibrationError, match="never invents"):
        rewrite_training_mode(source)
    fix = rewrite_training_mode(source, SHIFTED)
    out = fix.write(tmp_path / "stats.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type in ("Sub", "Mul") for n in model.graph.node)  # the batch-statistics subgraphs are gone
    assert "BN406" not in static_codes(out)
    assert "BN606" not in dynamic_codes(out, SHIFTED)
    assert fix.metrics["batch_dependence_max_abs"] < 1e-5
    # The original graph run on the whole sample as one batch normalises with exactly the
    # population statistics, with the biased variance: ours times (n-1)/n.
    x = data()
    batch = run_model(source, x)
    np.testing.assert_allclose(run_model(out, x), batch, rtol=5e-3, atol=5e-3)  # Bessel's n/(n-1) apart (n = 4096 at bn3)
    biased = onnx.ModelProto()
    biased.CopyFrom(fix.model)
    node_of = {layer.name: alias for layer in load_onnx(source).layers for alias in layer.aliases}
    for layer in fix.layers:
        node = next(n for n in biased.graph.node if n.name == node_of.get(layer.name, layer.name))
        index = next(i for i, t in enumerate(biased.graph.initializer) if t.name == node.input[4])
        values = (layer.var * (layer.count - 1) / layer.count).astype(np.float32)
        biased.graph.initializer[index].CopyFrom(numpy_helper.from_array(values, node.input[4]))
    np.testing.assert_allclose(run_model(biased, x), batch, rtol=1e-4, atol=1e-4 * np.abs(batch).max())
    assert [layer.old_mean for layer in fix.layers] == [None] * 3


def test_consumed_training_outputs_are_refused(tmp_path: Path) -> None:
    model = onnx.load(str(FIXTURES / "fault_training_mode.onnx"))
    model.graph.output.append(helper.make_tensor_value_info("/bn2/BatchNormalization_output_1", TensorProto.FLOAT, None))
    path = tmp_path / "consumed.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InputError, match="without guessing.*output_1"):
        rewrite_training_mode(path)


def _tiny_bn_model(opset: int, outputs: int, attrs: dict[str, Any], var: np.ndarray | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(opset)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w", rng.standard_normal((4, 3, 3, 3))), ("scale", rng.uniform(0.5, 1.5, 4)), ("b", rng.standard_normal(4)),
        ("mean", rng.standard_normal(4)), ("var", rng.uniform(0.5, 2.0, 4) if var is None else var))]
    names = ["y", "rm", "rv", "sm", "sv"][:outputs]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "b", "mean", "var"], names, name="bn", **attrs),
             helper.make_node("Relu", ["y"], ["out"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7 if opset < 14 else 9)


@pytest.mark.parametrize("opset, outputs, attrs, flag", [
    (12, 5, {}, None), (15, 3, {"training_mode": 1}, ("training_mode", 0)), (6, 5, {"is_test": 0, "spatial": 1}, ("is_test", 1)),
])
def test_every_training_form(tmp_path: Path, opset: int, outputs: int, attrs: dict[str, Any], flag: tuple[str, int] | None) -> None:
    path = tmp_path / f"opset{opset}.onnx"
    onnx.save(_tiny_bn_model(opset, outputs, attrs), str(path))
    fix = rewrite_training_mode(path, verify=opset >= 7)
    assert fix.rewritten == ["bn"]
    node = fix.model.graph.node[1]
    assert list(node.output) == ["y"]
    if flag is not None:
        assert helper.get_attribute_value(next(a for a in node.attribute if a.name == flag[0])) == flag[1]
    out = fix.write(tmp_path / "eval.onnx")
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    if opset >= 7:
        assert fix.metrics["batch_dependence_max_abs"] < 1e-6 and fix.metrics["eval_form_max_abs"] < 1e-5


def test_bad_stored_variance_needs_data(tmp_path: Path) -> None:
    path = tmp_path / "nan.onnx"
    onnx.save(_tiny_bn_model(15, 3, {"training_mode": 1}, var=np.array([1.0, np.nan, -1.0, 0.0])), str(path))
    fix = rewrite_training_mode(path)
    assert "unfixable without data" in fix.refused["bn"] and "1 NaN/Inf" in fix.refused["bn"]
    x = np.random.default_rng(1).standard_normal((64, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    fixed = rewrite_training_mode(path, tmp_path / "x.npz")
    assert not fixed.refused and fixed.layers[0].name == "bn" and np.isfinite(fixed.layers[0].var).all()
    assert fixed.layers[0].var.min() > 0


# ---------------------------------------------------------------- (d) fold
@pytest.mark.parametrize("name, data_path", [
    ("convnet.onnx", SHIFTED), ("fault_conv_bias.onnx", None), ("mlp.onnx", DATA / "mlp_shifted.npz"),
])
def test_fold_matches_unfolded(tmp_path: Path, name: str, data_path: Path | None) -> None:
    source = FIXTURES / name
    fix = fold(source, data_path)
    assert len(fix.folded) >= 2 and not fix.refused
    assert fix.metrics["fold_max_rel_diff"] < 1e-5
    out = fix.write(tmp_path / "folded.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    if data_path is not None:
        x = np.load(data_path)[np.load(data_path).files[0]]
    else:
        x = np.random.default_rng(3).standard_normal((8, 3, 16, 16)).astype(np.float32)
    before, after = run_model(source, x[:32]), run_model(out, x[:32])
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    assert "BN505" not in static_codes(out)


def _linear_bn_model(op: str, attrs: dict[str, Any], w: np.ndarray, bias: bool, dtype: Any = np.float32,
                     var: float = 1.0) -> onnx.ModelProto:
    """op(x, w[, bias]) -> BatchNormalization, in `dtype`; a tiny `var` comes with a tiny epsilon."""
    rng = np.random.default_rng(5)
    group = attrs.get("group", 1)
    if op == "Conv":
        channels, in_channels = w.shape[0], w.shape[1] * group
    elif op == "ConvTranspose":
        channels, in_channels = w.shape[1] * group, w.shape[0]
    else:  # Gemm: B is (N, K) with transB=1, else (K, N)
        channels, in_channels = (w.shape[0], w.shape[1]) if attrs.get("transB") else (w.shape[1], w.shape[0])
    params = {"w": w, "s": rng.uniform(0.5, 2, channels), "b": rng.standard_normal(channels), "m": rng.standard_normal(channels),
              "v": np.full(channels, var)}
    if bias:
        params["bias"] = rng.standard_normal(channels)
    inits = [numpy_helper.from_array(np.asarray(value).astype(dtype), name) for name, value in params.items()]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rank = 2 if op == "Gemm" else 4
    in_shape = ["N", in_channels] + [5] * (rank - 2)
    nodes = [helper.make_node(op, ["x", "w", "bias"] if bias else ["x", "w"], ["z"], name="lin", **attrs),
             helper.make_node("BatchNormalization", ["z", "s", "b", "m", "v"], ["y"], name="bn", epsilon=1e-10 if var < 1e-6 else 1e-5)]
    graph = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", elem, in_shape)],
                              [helper.make_tensor_value_info("y", elem, ["N", channels] + ["H", "W"][:rank - 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("op, attrs, shape, bias", [
    ("ConvTranspose", {"group": 2, "kernel_shape": [3, 3], "strides": [2, 2]}, (6, 4, 3, 3), True),
    ("ConvTranspose", {}, (3, 5, 2, 2), False),
    ("Conv", {"group": 3, "kernel_shape": [3, 3]}, (6, 2, 3, 3), False),
    ("Gemm", {"transB": 0, "alpha": 0.5, "beta": 2.0}, (7, 4), True),
    ("Gemm", {"transB": 1}, (4, 7), False),
])
def test_fold_weight_layouts(tmp_path: Path, op: str, attrs: dict[str, Any], shape: tuple[int, ...], bias: bool) -> None:
    model = _linear_bn_model(op, attrs, np.random.default_rng(9).standard_normal(shape), bias)
    path = tmp_path / "lin.onnx"
    onnx.save(model, str(path))
    fix = fold(path)
    assert fix.folded == ["bn"], fix.refused
    assert fix.metrics["fold_max_rel_diff"] < 1e-5
    onnx.checker.check_model(fix.model, full_check=True)
    x = np.random.default_rng(2).standard_normal([3, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]])
    expected = run_model(model, x.astype(np.float32))  # BN executed as such (optimisations off)
    np.testing.assert_allclose(run_model(fix.model, x.astype(np.float32)), expected, rtol=1e-4, atol=1e-5)


def test_fold_refusals(tmp_path: Path) -> None:
    tiny = _linear_bn_model("Conv", {"kernel_shape": [3, 3]}, np.full((4, 3, 3, 3), 10.0), False, dtype=np.float16, var=1e-12)
    onnx.save(tiny, str(tmp_path / "fp16.onnx"))
    fix = fold(tmp_path / "fp16.onnx")
    assert not fix.folded and "float16" in fix.refused["bn"] and "65504" in fix.refused["bn"]
    assert any(n.op_type == "BatchNormalization" for n in fix.model.graph.node)
    wide = _linear_bn_model("Conv", {"kernel_shape": [3, 3]}, np.full((4, 3, 3, 3), 10.0), False, var=1e-12)
    onnx.save(wide, str(tmp_path / "fp32.onnx"))
    assert fold(tmp_path / "fp32.onnx").folded == ["bn"]  # the same scale fits float32
    training = fold(FIXTURES / "fault_training_mode.onnx")
    assert not training.folded and all("training form" in why for why in training.refused.values())
    shared = _linear_bn_model("Conv", {"kernel_shape": [3, 3]}, np.ones((4, 3, 3, 3)), False)
    shared.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    onnx.save(shared, str(tmp_path / "shared.onnx"))
    assert "also read elsewhere" in fold(tmp_path / "shared.onnx").refused["bn"]


# ---------------------------------------------------------------- (e) writing
OPERATIONS: dict[str, Callable[[Path], OnnxFix]] = {
    "recalibrate": lambda p: recalibrate_onnx(p, SHIFTED),
    "rewrite": lambda p: rewrite_training_mode(p, SHIFTED),
    "fold": lambda p: fold(p),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_input_bytes_unchanged_and_in_place(tmp_path: Path, operation: str) -> None:
    before = {p: sha(p) for p in FIXTURES.glob("*.onnx")}
    OPERATIONS[operation](CONVNET).write(tmp_path / "out.onnx")
    OPERATIONS[operation](FIXTURES / "fault_batch_stats.onnx" if operation == "rewrite" else CONVNET).write(tmp_path / "out2.onnx")
    assert {p: sha(p) for p in FIXTURES.glob("*.onnx")} == before
    copy = tmp_path / "copy.onnx"
    shutil.copy(CONVNET, copy)
    fix = OPERATIONS[operation](copy)
    with pytest.raises(UsageError, match="in_place"):
        fix.write(copy)
    assert sha(copy) == sha(CONVNET)
    fix.write(None, in_place=True)
    onnx.checker.check_model(str(copy), full_check=True)
    assert not list(tmp_path.glob(".*.tmp"))


def test_external_data_layout_kept(tmp_path: Path, reference: dict[str, Any]) -> None:
    folder = tmp_path / "ext"
    folder.mkdir()
    model = onnx.load(str(CONVNET))
    onnx.save(onnx.load(str(CONVNET)), str(folder / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=64)
    data_before = sha(folder / "weights.bin")
    fix = recalibrate_onnx(folder / "model.onnx", SHIFTED)
    assert_stats_close(fix, reference)
    out = fix.write(folder / "fixed.onnx")
    assert sha(folder / "weights.bin") == data_before
    assert (folder / "fixed.onnx.data").is_file()
    written = onnx.load(str(out), load_external_data=False)
    external = {t.name for t in written.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    original = {t.name for t in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.initializer
                if t.data_location == TensorProto.EXTERNAL}
    assert external == original
    onnx.checker.check_model(str(out), full_check=True)
    assert written.producer_name == model.producer_name and written.opset_import == model.opset_import
    np.testing.assert_allclose(run_model(out, data()[:4]), run_model(fix.model, data()[:4]), rtol=1e-6)
    onnx.save(onnx.load(str(CONVNET)), str(folder / "second.onnx"), save_as_external_data=True, location="out.onnx.data", size_threshold=64)
    clash = recalibrate_onnx(folder / "second.onnx", SHIFTED)
    with pytest.raises(UsageError, match="external data of the input"):
        clash.write(folder / "out.onnx")  # its data file would be the input's out.onnx.data


def test_external_data_outside_the_folder_is_refused(tmp_path: Path) -> None:
    model = onnx.load(str(CONVNET))
    (tmp_path / "inner").mkdir()
    onnx.save(model, str(tmp_path / "weights.onnx"), save_as_external_data=True, location="w.bin", size_threshold=64)
    proto = onnx.load(str(tmp_path / "weights.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    onnx.save(proto, str(tmp_path / "inner" / "evil.onnx"))
    with pytest.raises(InputError, match="outside the model's folder"):
        recalibrate_onnx(tmp_path / "inner" / "evil.onnx", SHIFTED)


def test_recalibration_refuses_batch_statistics_and_chains_after_rewrite(tmp_path: Path) -> None:
    source = FIXTURES / "fault_training_mode.onnx"
    with pytest.raises(RecalibrationError, match="rewrite them to inference form first"):
        recalibrate_onnx(source, SHIFTED)
    chained = fold(recalibrate_onnx(rewrite_training_mode(source), SHIFTED), SHIFTED)
    assert len(chained.rewritten) == 3 and len(chained.layers) == 3 and len(chained.folded) == 3
    assert chained.metrics["fold_max_rel_diff"] < 1e-5
    out = chained.write(tmp_path / "chained.onnx")
    direct = recalibrate_onnx(CONVNET, SHIFTED).write(tmp_path / "direct.onnx")  # the same net, exported in eval mode
    x = data()[:16]
    np.testing.assert_allclose(run_model(out, x), run_model(direct, x), rtol=1e-4, atol=1e-4)
    assert sha(source) == sha(FIXTURES / "fault_training_mode.onnx")


def test_nonfinite_stored_statistics_are_recalibrated(tmp_path: Path, reference: dict[str, Any]) -> None:
    model = onnx.load(str(CONVNET))
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == "bn2.running_var")
    broken = numpy_helper.to_array(model.graph.initializer[index]).copy()
    broken[[1, 5]] = [np.nan, -1.0]
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(broken, "bn2.running_var"))
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fix = recalibrate_onnx(tmp_path / "broken.onnx", SHIFTED)
    assert_stats_close(fix, reference)


def test_deduplicated_statistics_keep_their_names(tmp_path: Path, reference: dict[str, Any]) -> None:
    """The legacy exporter stores a fresh model's equal tensors once and reaches them through
    Identity (running_var = Identity(weight) when both are ones): the recalibrated statistics
    become initializers under the same names, the weights stay, the Identity nodes go."""
    model = onnx.load(str(CONVNET))
    graph = model.graph
    for stat, source in (("bn1.running_mean", "bn1.bias"), ("bn1.running_var", "bn1.weight")):
        del graph.initializer[next(i for i, t in enumerate(graph.initializer) if t.name == stat)]
        graph.node.insert(0, helper.make_node("Identity", [source], [stat]))
    onnx.save(model, str(tmp_path / "dedup.onnx"))
    fix = recalibrate_onnx(tmp_path / "dedup.onnx", SHIFTED)
    assert_stats_close(fix, reference)
    bn1 = next(n for n in fix.model.graph.node if n.name == "/bn1/BatchNormalization")
    assert list(bn1.input[3:5]) == ["bn1.running_mean", "bn1.running_var"]
    assert not any(n.op_type == "Identity" for n in fix.model.graph.node)
    weights = {t.name: numpy_helper.to_array(t) for t in fix.model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(CONVNET)).graph.initializer}
    np.testing.assert_array_equal(weights["bn1.weight"], original["bn1.weight"])
    onnx.checker.check_model(fix.model, full_check=True)


def test_layers_match_dynamo_module_paths_too() -> None:
    rewritten = rewrite_training_mode(FIXTURES / "fault_batch_stats.onnx", INDOMAIN, verify=False)
    # Layers are named by the PyTorch module path the dynamo exporter recorded; globs match it and the node name.
    fix = recalibrate_onnx(rewritten, SHIFTED, layers="bn2")
    assert [layer.name for layer in fix.layers[3:]] == ["bn2"]
    assert [layer.module for layer in fix.layers[3:]] == ["node__native_batch_norm_legit_1__0"]
    assert fold(rewritten, layers="bn3").folded == ["bn3"]
    assert fold(rewritten, layers="node__native_batch_norm_legit_2__0").folded == ["bn3"]
