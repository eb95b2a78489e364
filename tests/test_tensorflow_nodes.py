"""TensorFlow graphs as GraphNodes for the graph rules (bnlint.loaders.tf_nodes): the op mapping,
kernels in ONNX's layout, BiasAdd folded into its conv/dense, variables read from a SavedModel's
bundle, BN501-BN503 through the CLI on a TF-made folded graph, and a large hostile graph."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.loaders.tf_graphdef import load_tf_graphdef
from bnlint.loaders.tf_nodes import KernelTensor
from bnlint.loaders.tf_proto import Msg, read_graph
from bnlint.loaders.tf_savedmodel import load_tf_savedmodel
from bnlint.model import ArrayTensor, GraphNode, ModelInfo
from tests.proto_bytes import field

TF = Path(__file__).resolve().parents[1] / "fixtures" / "tf_formats"
GRAPH_RULES = {"BN501", "BN502", "BN503"}


def lint(path: Path) -> tuple[int, dict]:
    result = CliRunner().invoke(main, [str(path), "--format", "json"])
    return result.exit_code, json.loads(result.stdout)


def by_name(info: ModelInfo) -> dict[str, GraphNode]:
    return {node.name: node for node in info.nodes}


def const_value(path: Path, name: str) -> np.ndarray:
    """A Const node's value, read independently of the node builder."""
    graph = read_graph(Msg(path.read_bytes()))
    (node,) = [n for n in graph.nodes if n.name == name]
    return node.attr("value").numpy()


# ---- the mapping on TF-made files ----------------------------------------------------------------

def test_frozen_graph_ops_mapped_with_kernels_in_onnx_layout() -> None:
    info = load_tf_graphdef(TF / "frozen_graph.pb")
    nodes = by_name(info)
    conv, bn, head = nodes["convnet/conv1"], nodes["convnet/bn1"], nodes["convnet/head"]
    assert (conv.op, conv.kind, bn.op, bn.kind, head.op, head.kind) == ("Conv", "conv", "BatchNormalization", "batchnorm", "Gemm", "dense")
    assert conv.followed_by_bn and not head.followed_by_bn
    # HWIO (3, 3, 3, 4) read as ONNX's (O, I, kh, kw): BN503's per-output-channel norms need it
    hwio = const_value(TF / "frozen_graph.pb", "convnet/conv1/Conv2D/ReadVariableOp/resource")
    assert conv.weight is not None and conv.weight.shape == (4, 3, 3, 3)
    assert np.array_equal(conv.weight.numpy(), hwio.transpose(3, 2, 0, 1))
    # Dense: MatMul (in, out) + BiasAdd, one node with its bias; rows of the weight are inputs
    assert head.weight is not None and head.weight.shape == (4, 2) and not head.weight_rows_out
    assert head.bias is not None and head.bias.shape == (2,)
    assert head.outputs == ("convnet/head/BiasAdd",) and "convnet/head/BiasAdd" not in nodes
    assert [n.index for n in info.nodes] == list(range(len(info.nodes)))
    assert bn.inputs[0] == conv.outputs[0]  # edges connect


def test_savedmodel_nodes_read_their_weights_from_the_bundle() -> None:
    """savedmodel_healthy and frozen_graph.pb hold the same model: the same weights, one from the
    variables bundle through the serving function's captured inputs, one from Consts."""
    saved, frozen = by_name(load_tf_savedmodel(TF / "savedmodel_healthy")), by_name(load_tf_graphdef(TF / "frozen_graph.pb"))
    for name in ("convnet/conv1", "convnet/conv2", "convnet/head"):
        ours, theirs = saved[name], frozen[name]
        assert (ours.op, ours.kind, ours.followed_by_bn) == (theirs.op, theirs.kind, theirs.followed_by_bn)
        assert ours.weight is not None and theirs.weight is not None
        assert np.array_equal(ours.weight.numpy(), theirs.weight.numpy())
    assert saved["convnet/head"].bias is not None
    assert np.array_equal(saved["convnet/head"].bias.numpy(), frozen["convnet/head"].bias.numpy())


@pytest.mark.parametrize("fixture", ["savedmodel_healthy", "savedmodel_training", "savedmodel_keras3", "savedmodel_frozen_base"])
def test_each_variable_is_one_node_s_weight(fixture: str) -> None:
    """A SavedModel keeps several traces of a layer: a stored tensor is reported by one node only."""
    nodes = load_tf_savedmodel(TF / fixture).nodes
    weighted = [n for n in nodes if n.weight is not None]
    assert weighted
    keys = [n.weight.base.entry.key if isinstance(n.weight, KernelTensor) else n.weight.entry.key  # type: ignore[union-attr]
            for n in weighted]
    assert len(keys) == len(set(keys))


def test_nodes_are_built_only_when_a_rule_asks() -> None:
    info = load_tf_savedmodel(TF / "savedmodel_healthy")
    assert info.nodes_factory is not None and info._nodes is None


def test_depthwise_kernel_layout() -> None:
    kh, kw, c, m = 2, 3, 4, 2
    raw = np.arange(kh * kw * c * m, dtype=np.float32).reshape(kh, kw, c, m)
    ref = KernelTensor(ArrayTensor(raw), "depthwise")
    out = ref.numpy()
    assert ref.shape == out.shape == (c * m, 1, kh, kw)
    for channel in range(c):
        for k in range(m):  # TF's output channel c * M + k
            assert np.array_equal(out[channel * m + k, 0], raw[:, :, channel, k])
    odd = KernelTensor(ArrayTensor(np.zeros(5, dtype=np.float32)), "conv")  # not a kernel: left as stored
    assert odd.shape == (5,) and odd.numpy().shape == (5,)


# ---- graph rules through the CLI -------------------------------------------------------------------

def test_folded_frozen_graph_fires_the_graph_rules() -> None:
    """frozen_folded.pb (make_tf_fixtures.folded): no BN, conv2's channel 2 blown up 1000x, a NaN in
    conv1's bias. Before TF nodes existed BN501 counted 0 convolutions and BN502/BN503 were silent."""
    code, payload = lint(TF / "frozen_folded.pb")
    (entry,) = payload["files"]
    found = {(f["code"], f.get("layer")) for f in entry["findings"]}
    assert ("BN502", "folded/conv1") in found and ("BN503", "folded/conv2") in found
    (bn501,) = [f for f in entry["findings"] if f["code"] == "BN501"]
    assert "2 convolution and 1 dense" in bn501["message"]
    (bn503,) = [f for f in entry["findings"] if f["code"] == "BN503"]
    assert bn503["values"]["channels"] == [2]
    assert code == 1


@pytest.mark.parametrize("fixture", ["frozen_graph.pb", "frozen_unfused.pb", "savedmodel_healthy", "savedmodel_keras3",
                                     "savedmodel_tf1", "savedmodel_training", "savedmodel_frozen_base"])
def test_healthy_graphs_stay_quiet(fixture: str) -> None:
    _, payload = lint(TF / fixture)
    (entry,) = payload["files"]
    assert entry["error"] is None
    assert not {f["code"] for f in entry["findings"]} & GRAPH_RULES


# ---- hostile graphs --------------------------------------------------------------------------------


def const(name: str, shape: tuple[int, ...], content: bytes) -> bytes:
    dims = b"".join(field(2, field(1, d)) for d in shape)
    tensor = field(1, 1) + field(2, dims) + field(4, content)
    return node(name, "Const", [], {"value": field(8, tensor), "dtype": field(6, 1)})


def node(name: str, op: str, inputs: list[str], attrs: dict[str, bytes] | None = None) -> bytes:
    body = field(1, name.encode()) + field(2, op.encode()) + b"".join(field(3, i.encode()) for i in inputs)
    for key, value in (attrs or {}).items():
        body += field(5, field(1, key.encode()) + field(2, value))
    return field(1, body)


def test_a_graph_of_many_nodes_is_built_fast(tmp_path: Path) -> None:
    """30k nodes: long Identity chains, a node read by thousands, convs behind a chain longer than
    the look-through bound. Building stays linear, and the rules run over it through the CLI."""
    kernel = np.ones((1, 1, 2, 2), dtype=np.float32).tobytes()
    parts = [node("x", "Placeholder", []), const("w", (1, 1, 2, 2), kernel)]
    parts += [node(f"id{i}", "Identity", [f"id{i - 1}" if i else "x"]) for i in range(10_000)]
    parts += [node(f"fan{i}", "Relu", ["x"]) for i in range(10_000)]
    for i in range(100):  # conv -> 100 Identities -> FusedBatchNormV3: past MAX_FOLLOW (a bound, not a BN)
        parts.append(node(f"conv{i}", "Conv2D", ["id9999", "w"]))
        parts += [node(f"c{i}_{j}", "Identity", [f"c{i}_{j - 1}" if j else f"conv{i}"]) for j in range(100)]
    parts.append(node("bn", "FusedBatchNormV3", ["conv0", "w", "w", "w", "w"], {"is_training": field(5, 0)}))
    path = tmp_path / "many.pb"
    path.write_bytes(b"".join(parts))
    start = time.perf_counter()
    info = load_tf_graphdef(path)
    nodes = info.nodes
    took = time.perf_counter() - start
    assert len(nodes) == len(parts) and took < 10, took
    convs = [n for n in nodes if n.kind == "conv"]
    assert len(convs) == 100 and convs[0].followed_by_bn and not convs[1].followed_by_bn
    assert sum(n.weight is not None for n in convs) == 1  # one Const, given once
    code, payload = lint(path)
    assert payload["files"][0]["error"] is None and code in (0, 1)


def test_a_malformed_weight_is_one_error_line(tmp_path: Path) -> None:
    """A conv's Const whose bytes do not fill its shape: read only by BN502/BN503, still exit 2, no traceback."""
    path = tmp_path / "bad.pb"
    path.write_bytes(node("x", "Placeholder", []) + const("w", (3, 3, 2, 4), b"\0" * 10) + node("conv", "Conv2D", ["x", "w"]))
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "tensor_content holds 10 bytes" in result.output


def test_a_conv_before_unfused_batchnorm_is_followed_by_bn() -> None:
    """Keras 3 writes BN as arithmetic (x * rsqrt(var + eps) * gamma ...): its conv is not where a
    folded BN went, so BN502/BN503 skip its weights as they do before a fused BN."""
    nodes = by_name(load_tf_savedmodel(TF / "savedmodel_keras3"))
    conv = nodes["convnet3_1/conv1_1/convolution"]
    assert conv.kind == "conv" and conv.followed_by_bn and conv.weight is not None
    assert not nodes["convnet3_1/head_1"].followed_by_bn


@pytest.mark.parametrize("size", [0, 1, 9, 4095, 4096, 4097, 8 * 512 * 3 + 11, 300_001])
def test_vectorised_crc32c_equals_the_byte_loop(size: int) -> None:
    from bnlint.loaders import tf_bundle as tb

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    for start in (0, 0x1234ABCD):
        assert tb.crc32c(data, start) == tb._register(data, start ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    assert tb.crc32c(b"123456789") == 0xE3069283  # the standard check value


def test_a_bias_read_through_reshape_and_squeeze_is_folded(tmp_path: Path) -> None:
    """Keras 3 reads a conv bias as Squeeze(Reshape(variable)): still the conv's stored bias."""
    kernel = np.ones((1, 1, 2, 2), dtype=np.float32).tobytes()
    bias = np.array([0.5, np.nan], dtype=np.float32).tobytes()
    path = tmp_path / "reshaped.pb"
    path.write_bytes(node("x", "Placeholder", []) + const("w", (1, 1, 2, 2), kernel) + const("b", (2,), bias)
                     + node("r", "Reshape", ["b", "w"]) + node("s", "Squeeze", ["r"])
                     + node("conv", "Conv2D", ["x", "w"]) + node("add", "BiasAdd", ["conv", "s"]) + node("y", "Relu", ["add"]))
    (conv,) = [n for n in load_tf_graphdef(path).nodes if n.kind == "conv"]
    assert conv.bias is not None and conv.outputs == ("add",)
    _, payload = lint(path)
    assert [f["code"] for f in payload["files"][0]["findings"] if f["code"] == "BN502"] == ["BN502"]


@pytest.mark.parametrize("body", [
    field(1, field(1, 7)),  # a node whose name is a varint
    field(1, b"\x0a\x09abc"),  # a name longer than its node
    field(1, b"\x12"),  # a key with no length
    field(1, b"\x00\x01"),  # field number 0
])
def test_malformed_nodes_are_one_error(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "bad.pb"
    path.write_bytes(body)
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_flipped_bytes_never_escape_as_tracebacks(tmp_path: Path) -> None:
    """The node scanner and node building on corrupted copies of a real frozen graph: a model, or InputError."""
    from bnlint.errors import InputError

    good = (TF / "frozen_folded.pb").read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "flipped.pb"
    for _ in range(150):
        data = bytearray(good)
        for at in rng.integers(0, len(data), 3):
            data[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            info = load_tf_graphdef(path)
            for graph_node in info.nodes:
                for ref in (graph_node.weight, graph_node.bias):
                    if ref is not None:
                        ref.numpy()
        except InputError:
            pass
