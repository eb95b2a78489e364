"""ONNX and safetensors files whose statistics the runtime sees but a naive reader does not.

ONNX: BatchNormalization statistics stored as sparse initializers, behind constant expressions,
in Constant nodes of every kind, defined twice; each must be checked as onnxruntime computes it or
reported as unchecked, never read as clean. Long chains must lint in linear time. safetensors:
whatever the `safetensors` library refuses, bnlint refuses; what it accepts, bnlint reads alike.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bnlint.cli import main
from bnlint.config import Config
from bnlint.context import RuleContext
from bnlint.engine import run_rules
from bnlint.loaders import load_model
from bnlint.loaders.safetensors_file import extract_safetensors

C = 4
BNLINT = [sys.executable, "-m", "bnlint"]
BAD_STATS = ("BN101", "BN102")  # non-finite, negative variance


def save(path: Path, nodes: list[Any], inits: list[Any], *, var: str = "var", mean: str = "mean", sparse: Sequence[Any] = (),
         opset: int = 15, bn_attrs: dict[str, Any] | None = None) -> Path:
    """X -> BatchNormalization(scale, B, mean, var) -> Y; the caller supplies how mean/var are made."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, C).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.normal(0, 0.1, C).astype(np.float32), "B"), *inits]
    bn = helper.make_node("BatchNormalization", ["X", "scale", "B", mean, var], ["Y"], name="bn", **(bn_attrs or {}))
    graph = helper.make_graph([*nodes, bn], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, C])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, C])], initializer=inits,
                              sparse_initializer=list(sparse))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def healthy(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.5, C).astype(np.float32), rng.uniform(0.5, 2.0, C).astype(np.float32)


def init(name: str, values: Any) -> Any:
    return numpy_helper.from_array(np.asarray(values), name)


def sparse_tensor(name: str, dense: np.ndarray, two_d: bool = False) -> Any:
    index = np.flatnonzero(dense)
    indices = np.stack(np.unravel_index(index, dense.shape), axis=1) if two_d else index
    return helper.make_sparse_tensor(init(name, dense.reshape(-1)[index]), init("", indices.astype(np.int64)), list(dense.shape))


def lint(path: Path, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    result = CliRunner().invoke(main, [str(path), "--format", "json", "--fail-on", "never", *args])
    if result.exit_code == 2:
        return 2, [], result.output
    report = json.loads(result.output)
    return result.exit_code, report["files"][0]["findings"], result.output


def found(path: Path) -> set[str]:
    code, findings, output = lint(path)
    assert code == 0, output
    return {f["code"] for f in findings}


def ort_output(path: Path) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(None, {"X": np.ones((2, C), np.float32)})[0]
    return result


# ---------------------------------------------------------------- sparse initializers and Constant nodes

@pytest.mark.parametrize("two_d", [False, True], ids=["linear-indices", "nnz-by-rank"])
def test_sparse_initializer_nan_variance_is_found(tmp_path: Path, two_d: bool) -> None:
    mean, var = healthy()
    var[1] = np.nan
    path = save(tmp_path / "m.onnx", [], [init("mean", mean)], sparse=[sparse_tensor("var", var, two_d)])
    assert np.isnan(ort_output(path)[:, 1]).all() and np.isfinite(ort_output(path)[:, 0]).all()  # what the runtime does
    assert "BN101" in found(path)
    (layer,) = load_model(path).layers
    np.testing.assert_array_equal(layer.array("running_var"), var.astype(np.float64))
    assert layer.unchecked == []


def test_sparse_variance_zeros_are_densified(tmp_path: Path) -> None:
    """Unset positions of a sparse variance are 0: channels the runtime divides by sqrt(eps)."""
    var = np.array([0.0, 2.0, 0.0, -3.0], np.float32)
    path = save(tmp_path / "m.onnx", [], [init("mean", np.zeros(C, np.float32))], sparse=[sparse_tensor("var", var)])
    assert "BN102" in found(path)
    np.testing.assert_array_equal(load_model(path).layers[0].array("running_var"), var)


def test_sparse_index_out_of_range_is_refused(tmp_path: Path) -> None:
    bad = helper.make_sparse_tensor(init("var", np.array([1.0], np.float32)), init("", np.array([7], np.int64)), [C])
    path = save(tmp_path / "m.onnx", [], [init("mean", np.zeros(C, np.float32))], sparse=[bad])
    code, _, output = lint(path)
    assert code == 2 and "out of range" in output and "Traceback" not in output


def test_huge_sparse_initializer_is_unchecked_not_allocated(tmp_path: Path) -> None:
    huge = helper.make_sparse_tensor(init("var", np.array([1.0], np.float32)), init("", np.array([0], np.int64)), [1 << 40])
    path = save(tmp_path / "m.onnx", [], [init("mean", np.zeros(C, np.float32))], sparse=[huge])
    (layer,) = load_model(path).layers
    assert any("densifies to" in why for why in layer.unchecked) and "running_var" not in layer.tensors


@pytest.mark.parametrize("attr", ["value_floats", "sparse_value", "value"])
def test_constant_node_variance_is_checked(tmp_path: Path, attr: str) -> None:
    mean, var = healthy()
    var[2] = -4.0
    value: Any = {"value_floats": [float(v) for v in var], "sparse_value": sparse_tensor("v", var),
                  "value": init("v", var)}[attr]
    node = helper.make_node("Constant", [], ["var"], **{attr: value})
    path = save(tmp_path / "m.onnx", [node], [init("mean", mean)])
    assert np.isnan(ort_output(path)[:, 2]).all()
    assert "BN102" in found(path)


def test_constant_of_shape_nan_variance(tmp_path: Path) -> None:
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["var"], value=init("", np.array([np.nan], np.float32)))]
    path = save(tmp_path / "m.onnx", nodes, [init("mean", np.zeros(C, np.float32)), init("shape", np.array([C], np.int64))])
    assert np.isnan(ort_output(path)).all()
    assert "BN101" in found(path)


# ---------------------------------------------------------------- constant expressions

def test_reshape_of_initializer_is_checked(tmp_path: Path) -> None:
    mean, var = healthy()
    var[0] = np.nan
    nodes = [helper.make_node("Reshape", ["v2d", "shape"], ["var"]), helper.make_node("Unsqueeze", ["m1", "axes"], ["m2"]),
             helper.make_node("Squeeze", ["m2", "axes"], ["mean"])]
    inits = [init("v2d", var.reshape(2, 2)), init("shape", np.array([-1], np.int64)), init("m1", mean), init("axes", np.array([0], np.int64))]
    path = save(tmp_path / "m.onnx", nodes, inits)
    assert np.isnan(ort_output(path)[:, 0]).all()
    assert "BN101" in found(path)
    (layer,) = load_model(path).layers
    np.testing.assert_array_equal(layer.array("running_mean"), mean)


def test_arithmetic_and_concat_are_folded(tmp_path: Path) -> None:
    """var = Concat(a, b) * 2 - 3: negative where the stored halves look positive."""
    nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], axis=0), helper.make_node("Mul", ["ab", "two"], ["ab2"]),
             helper.make_node("Sub", ["ab2", "three"], ["var"])]
    inits = [init("a", np.array([2.0, 2.0], np.float32)), init("b", np.array([2.0, 1.0], np.float32)),
             init("two", np.float32(2.0)), init("three", np.float32(3.0)), init("mean", np.zeros(C, np.float32))]
    path = save(tmp_path / "m.onnx", nodes, inits)
    assert np.isnan(ort_output(path)[:, 3]).all()
    assert "BN102" in found(path)
    np.testing.assert_array_equal(load_model(path).layers[0].array("running_var"), [1.0, 1.0, 1.0, -1.0])


def test_unfolded_expression_is_unchecked(tmp_path: Path) -> None:
    """Sqrt is not folded: the layer says so (BN110) instead of passing as clean."""
    nodes = [helper.make_node("Sqrt", ["v0"], ["var"])]
    path = save(tmp_path / "m.onnx", nodes, [init("v0", np.array([1, 4, np.nan, 9], np.float32)), init("mean", np.zeros(C, np.float32))])
    (layer,) = load_model(path).layers
    assert "running_var" not in layer.tensors
    assert len(layer.unchecked) == 1 and "Sqrt" in layer.unchecked[0] and "running_var" in layer.unchecked[0]
    assert "BN110" in found(path)


def test_doubling_concat_is_refused_before_allocation(tmp_path: Path) -> None:
    """60 Concat(x, x) steps would be 4 * 2**60 values: unchecked, not a MemoryError or a hang."""
    nodes = [helper.make_node("Concat", [f"d{i}", f"d{i}"], [f"d{i + 1}"], axis=0) for i in range(60)]
    nodes.append(helper.make_node("Identity", ["d60"], ["var"]))
    path = save(tmp_path / "m.onnx", nodes, [init("d0", np.ones(C, np.float32)), init("mean", np.zeros(C, np.float32))])
    (layer,) = load_model(path).layers
    assert "running_var" not in layer.tensors and any("larger than bnlint folds" in why for why in layer.unchecked)


def test_two_casts_round_as_the_runtime_does(tmp_path: Path) -> None:
    """float -> int64 -> float truncates -0.5 to 0: the variance the runtime sees is not negative."""
    nodes = [helper.make_node("Cast", ["v0"], ["vi"], to=TensorProto.INT64), helper.make_node("Cast", ["vi"], ["var"], to=TensorProto.FLOAT)]
    path = save(tmp_path / "m.onnx", nodes, [init("v0", np.array([1.5, 2.0, -0.5, 3.0], np.float32)), init("mean", np.zeros(C, np.float32))])
    np.testing.assert_array_equal(load_model(path).layers[0].array("running_var"), [1.0, 2.0, 0.0, 3.0])


# ---------------------------------------------------------------- duplicates, wrong types and shapes, attributes

def test_duplicate_initializer_last_one_wins_as_in_onnxruntime(tmp_path: Path) -> None:
    mean, var = healthy()
    bad = var.copy()
    bad[3] = np.nan
    path = save(tmp_path / "m.onnx", [], [init("mean", mean), init("var", var), init("var", bad)])
    assert np.isnan(ort_output(path)[:, 3]).all()  # onnxruntime: "the model will use the latest encountered initializer"
    code, findings, _ = lint(path)
    assert "BN101" in {f["code"] for f in findings}
    assert any("defined more than once" in note for note in load_model(path).notes)


def test_sparse_overrides_dense_and_constant_overrides_both(tmp_path: Path) -> None:
    mean, var = healthy()
    dense = init("var", var)
    sparse = sparse_tensor("var", np.array([1.0, 1.0, -2.0, 1.0], np.float32))
    path = save(tmp_path / "m.onnx", [], [init("mean", mean), dense], sparse=[sparse])
    assert "BN102" in found(path)
    constant = helper.make_node("Constant", [], ["var"], value_floats=[1.0, 1.0, 1.0, float("nan")])
    path = save(tmp_path / "m2.onnx", [constant], [init("mean", mean), dense], sparse=[sparse])
    assert {"BN101"} <= found(path) and "BN102" not in found(path)


def test_integer_and_misshaped_statistics_are_unchecked(tmp_path: Path) -> None:
    mean, _ = healthy()
    path = save(tmp_path / "m.onnx", [], [init("mean", mean), init("var", np.ones(C, np.int64))])
    (layer,) = load_model(path).layers
    assert any("running_var is of type int64" in why for why in layer.unchecked)
    path = save(tmp_path / "m2.onnx", [], [init("mean", mean), init("var", np.ones((C, 1), np.float32))])
    (layer,) = load_model(path).layers
    assert any("running_var has shape [4, 1]" in why for why in layer.unchecked)
    strings = helper.make_tensor("var", TensorProto.STRING, [C], [b"a"] * C)  # type: ignore[list-item]
    path = save(tmp_path / "m3.onnx", [], [init("mean", mean), strings])
    (layer,) = load_model(path).layers
    assert "running_var" not in layer.tensors and any("not numbers" in why for why in layer.unchecked)
    assert "BN110" in found(path)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_attributes_reach_the_layer(tmp_path: Path, value: float) -> None:
    mean, var = healthy()
    path = save(tmp_path / "m.onnx", [], [init("mean", mean), init("var", var)], bn_attrs={"epsilon": value, "momentum": value})
    (layer,) = load_model(path).layers
    assert layer.eps is not None and layer.momentum is not None and layer.raw_momentum is not None
    assert (math.isnan(layer.eps) if math.isnan(value) else layer.eps == math.inf)
    assert math.isnan(layer.raw_momentum) if math.isnan(value) else layer.raw_momentum == math.inf
    assert not math.isfinite(layer.momentum)  # 1 - raw, PyTorch's convention: NaN or -inf, never clamped


# ---------------------------------------------------------------- seeded structure-aware generator

def _source(rng: np.random.Generator, name: str, values: np.ndarray, nodes: list[Any], inits: list[Any], sparse: list[Any]) -> None:
    kind = rng.choice(["initializer", "constant", "floats", "sparse"])
    if kind == "initializer" or (kind == "floats" and values.dtype != np.float32):
        inits.append(init(name, values))
    elif kind == "constant":
        nodes.append(helper.make_node("Constant", [], [name], value=init(name, values)))
    elif kind == "floats" and values.ndim == 1:
        nodes.append(helper.make_node("Constant", [], [name], value_floats=[float(v) for v in values]))
    elif kind == "floats":
        inits.append(init(name, values))
    else:
        sparse.append(sparse_tensor(name, values))


def _chain(rng: np.random.Generator, target: str, values: np.ndarray, nodes: list[Any], inits: list[Any], sparse: list[Any]) -> None:
    """`target` = a random chain of ops over a stored tensor, computing exactly `values`.

    Built from the output backwards: each step picks the input that makes its output `current`.
    """
    ops = ["Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Mul", "Add", "Concat", "Sqrt"]
    current = values
    tail: list[tuple[str, list[str], dict[str, Any], Any]] = []  # (op, extra inputs, attributes, initializer), last first
    for step in rng.choice(ops, size=int(rng.integers(0, 6))):
        key = f"{target}_k{len(tail)}"
        if step == "Reshape":
            stored = current.reshape(2, -1) if current.size % 2 == 0 else current.reshape(1, -1)
            tail.append(("Reshape", [key], {}, init(key, np.array(current.shape, np.int64))))
        elif step == "Squeeze":
            stored = current[None]
            tail.append(("Squeeze", [key], {}, init(key, np.array([0], np.int64))))
        elif step == "Unsqueeze" and current.ndim and current.shape[0] == 1:
            stored = current[0]
            tail.append(("Unsqueeze", [key], {}, init(key, np.array([0], np.int64))))
        elif step in ("Mul", "Add"):
            stored = current
            tail.append((step, [key], {}, init(key, np.array(1.0 if step == "Mul" else 0.0, current.dtype))))
        elif step == "Cast" and current.dtype == np.float32:
            stored = current.astype(np.float64)  # exact: float32 values round-trip
            tail.append(("Cast", [], {"to": TensorProto.FLOAT}, None))
        elif step == "Concat" and current.ndim == 1 and current.size >= 2:
            half = current.size // 2
            stored = current[:half]
            tail.append(("Concat", [key], {"axis": 0}, init(key, current[half:])))
        elif step == "Sqrt" and not (current < 0).any():  # not folded: the layer must end up unchecked
            stored = np.square(current)
            tail.append(("Sqrt", [], {}, None))
        else:
            stored = current
            tail.append(("Identity", [], {}, None))
        current = stored
    source = f"{target}_src"
    _source(rng, source, current, nodes, inits, sparse)
    previous = source
    for index, (op, extra, attrs, extra_init) in enumerate(reversed(tail)):
        out = target if index == len(tail) - 1 else f"{target}_step{index}"
        if extra_init is not None:
            inits.append(extra_init)
        nodes.append(helper.make_node(op, [previous, *extra], [out], **attrs))
        previous = out
    if not tail:
        nodes.append(helper.make_node("Identity", [source], [target]))


def layer_ops(nodes: list[Any]) -> set[str]:
    return {node.op_type for node in nodes}


@pytest.mark.parametrize("seed", range(24))
def test_generated_constant_chains_are_never_clean(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mean, var = healthy(seed)
    channel = int(rng.integers(C))
    broken = "var" if rng.random() < 0.7 else "mean"
    if broken == "var":
        var[channel] = np.nan if rng.random() < 0.5 else -float(rng.uniform(1, 5))
    else:
        mean[channel] = np.nan
    nodes: list[Any] = []
    inits: list[Any] = []
    sparse: list[Any] = []
    _chain(rng, "mean", mean, nodes, inits, sparse)
    _chain(rng, "var", var, nodes, inits, sparse)
    path = save(tmp_path / "m.onnx", nodes, inits, sparse=sparse)
    onnx.checker.check_model(onnx.load(path))  # the generator writes valid graphs
    if not layer_ops(nodes) & {"Sqrt"}:  # onnxruntime agrees: the broken channel comes out NaN
        assert np.isnan(ort_output(path)[:, channel]).all()
    model = load_model(path)
    (layer,) = model.layers
    codes = {f.code for f in run_rules(RuleContext(model, Config(select=("BN1",))))}
    assert codes & set(BAD_STATS) or layer.unchecked, (seed, layer.unchecked, codes)
    if layer.unchecked:
        assert "BN110" in codes


# ---------------------------------------------------------------- linear time on long chains

def _run(path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BNLINT, str(path), "--fail-on", "never", "-q"], capture_output=True, text=True, timeout=timeout, check=False)


def _bn_chain(path: Path, count: int) -> Path:
    """X -> BN -> BN -> ... (count nodes) sharing one set of healthy statistics.

    Healthy on purpose: with a finding per layer, the engine's ModelInfo.layer lookup (a scan of
    every layer, bnlint/model.py) makes the lint quadratic whatever the loader does.
    """
    mean, var = healthy()
    nodes = [helper.make_node("BatchNormalization", [f"t{i}", "scale", "B", "mean", "var"], [f"t{i + 1}"], name=f"bn{i}") for i in range(count)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, C])],
                              [helper.make_tensor_value_info(f"t{count}", TensorProto.FLOAT, [1, C])],
                              [init("scale", np.full(C, 0.9, np.float32)), init("B", np.full(C, 0.1, np.float32)), init("mean", mean), init("var", var)])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]).SerializeToString())
    return path


def test_long_batchnorm_chain_loads_in_linear_time(tmp_path: Path) -> None:
    _run(_bn_chain(tmp_path / "chain.onnx", 10_000), timeout=60).check_returncode()


def test_long_constant_chains_fold_in_linear_time(tmp_path: Path) -> None:
    """20,000 Identity/Add nodes in one chain over a Constant, and a BN fed from every fourth link:
    each BN's "does this depend on the input?" walk used to go back to the chain's start."""
    count = 20_000
    nodes = [helper.make_node("Constant", [], ["c0"], value=init("c0", np.full(C, 2.0, np.float32)))]  # not 1: no BN104 per layer
    for i in range(1, count):
        op = "Add" if i % 2 else "Identity"
        nodes.append(helper.make_node(op, [f"c{i - 1}", "zero"] if op == "Add" else [f"c{i - 1}"], [f"c{i}"]))
    nodes.append(helper.make_node("Neg", [f"c{count - 1}"], ["var"]))  # the end of the chain is negative
    tail = [helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", f"c{i}"], [f"y{i}"]) for i in range(3, count, 4)]
    path = save(tmp_path / "chain.onnx", nodes + tail, [init("zero", np.float32(0.0)), init("mean", np.zeros(C, np.float32))])
    result = _run(path, timeout=60)
    assert result.returncode == 0 and "BN102" in result.stdout, result.stderr[-500:]


# ---------------------------------------------------------------- safetensors against the library

def _safetensors(header: str | dict[str, Any], data: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(begin: int, end: int, shape: list[Any] | None = None, dtype: str = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape if shape is not None else [(end - begin) // 4], "data_offsets": [begin, end]}


F = np.arange(1, 9, dtype=np.float32).tobytes()  # 32 bytes
SAFETENSORS_CASES: dict[str, tuple[str | dict[str, Any], bytes]] = {
    "healthy": ({"bn.running_mean": _entry(0, 16), "bn.running_var": _entry(16, 32)}, F),
    "listed-out-of-order": ({"bn.running_var": _entry(16, 32), "bn.running_mean": _entry(0, 16)}, F),
    "duplicate-key-overlapping": ('{"bn.running_var": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
                                  '"bn.running_var": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}', F),
    "duplicate-key-same-bytes": ('{"bn.running_var": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}, '
                                 '"bn.running_var": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}', F),
    "duplicate-metadata": ('{"__metadata__": {"a": "1"}, "__metadata__": {"b": "2"}, '
                           '"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}', F),
    "duplicate-field": ('{"x": {"dtype": "F32", "dtype": "F64", "shape": [8], "data_offsets": [0, 32]}}', F),
    "gap": ({"bn.running_mean": _entry(0, 12), "bn.running_var": _entry(16, 32)}, F),
    "overlap": ({"bn.running_mean": _entry(0, 16), "bn.running_var": _entry(12, 28)}, F[:28]),
    "trailing-bytes": ({"bn.running_mean": _entry(0, 16)}, F),
    "empty-header-with-data": ({}, F),
    "does-not-start-at-zero": ({"x": _entry(4, 32)}, F),
    "size-mismatch": ({"x": _entry(0, 32, [7])}, F),
    "bool-shape": ({"x": _entry(0, 4, [True])}, F[:4]),
    "metadata-not-strings": ({"__metadata__": {"a": 1}, "x": _entry(0, 32)}, F),
    "metadata-null": ({"__metadata__": None, "x": _entry(0, 32)}, F),
    "unknown-fields-ignored": ({"x": {**_entry(0, 32), "extra": [1, 2]}}, F),
    "nan-token": ('{"__metadata__": {"a": "1"}, "x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32], "n": NaN}}', F),
    "empty-tensors-share-an-offset": ({"a": _entry(0, 0, [0]), "b": _entry(0, 0, [0]), "c": _entry(0, 32)}, F),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_safetensors_refuses_what_the_library_refuses(tmp_path: Path, case: str) -> None:
    numpy_loader = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "m.safetensors"
    path.write_bytes(_safetensors(*SAFETENSORS_CASES[case]))
    try:
        expected: dict[str, np.ndarray] | None = numpy_loader.load_file(str(path))
    except Exception:  # noqa: BLE001 - the library's own error types vary by version
        expected = None
    result = CliRunner().invoke(main, [str(path), "-q", "--fail-on", "never"])
    if expected is None:
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and len([line for line in result.output.splitlines() if "error" in line]) == 1
    else:
        assert result.exit_code == 0, result.output
        tensors = extract_safetensors(path).tensors
        assert set(tensors) == set(expected)
        for key, values in expected.items():
            np.testing.assert_array_equal(tensors[key].numpy(), values)


def test_safetensors_with_400k_tensors_is_fast(tmp_path: Path) -> None:
    count = 400_000
    header = {f"layer{i}.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(count)}
    path = tmp_path / "many.safetensors"
    path.write_bytes(_safetensors(header, np.ones(count, np.float32).tobytes()))
    result = _run(path, timeout=45)
    assert result.returncode == 0, result.stderr[-500:]
