"""bnlint's own ONNX reader (`bnlint.loaders.onnx_wire` + `onnx_tensors`) against onnx's protobuf
parser: every committed fixture, every tensor storage form, every attribute type, subgraphs,
protobuf's merge and packed/unpacked rules; hostile bytes end in InputError, quickly; and the
static lint path never imports onnx or protobuf."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from bnlint.errors import InputError
from bnlint.loaders.onnx_file import _constant_value, load_onnx
from bnlint.loaders.onnx_tensors import _raw_bytes, _tensor_ref
from bnlint.loaders.onnx_wire import WireGraph, WireModel, WireNode, WireTensor, WireValueInfo, parse_model, parse_tensor, read_model
from bnlint.protowire import WireError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = sorted(p for p in (ROOT / "fixtures").glob("*.onnx") if not p.name.startswith("bad_"))


# ---- comparison with onnx's parser ---------------------------------------------------------------

def reference_values(proto: TensorProto, base: Path | None = None) -> np.ndarray:
    """numpy_helper's values, with ml_dtypes types widened to float32 as bnlint reads them."""
    array = numpy_helper.to_array(proto, str(base) if base else "")
    return array.astype(np.float32) if hasattr(ml_dtypes, array.dtype.name) else array


def same_values(mine: np.ndarray, ref: np.ndarray) -> None:
    assert mine.shape == ref.shape and mine.dtype == ref.dtype, (mine.dtype, ref.dtype, mine.shape, ref.shape)
    if ref.dtype == object:
        assert mine.tolist() == ref.tolist()
    else:
        assert mine.tobytes() == ref.tobytes()


def same_tensor(mine: WireTensor, ref: TensorProto, base: Path | None = None) -> None:
    assert (mine.name, list(mine.dims), mine.data_type, mine.data_location) == (ref.name, list(ref.dims), ref.data_type, ref.data_location)
    assert [(e.key, e.value) for e in mine.external_data] == [(e.key, e.value) for e in ref.external_data]
    assert mine.has_raw_data() == ref.HasField("raw_data")
    if ref.HasField("raw_data"):
        assert _raw_bytes(mine).tobytes() == ref.raw_data
    if ref.data_type and ref.data_location != TensorProto.EXTERNAL:
        same_values(_tensor_ref(mine, Path("<test>")).numpy(), reference_values(ref))
    elif ref.data_type and base is not None:
        same_values(_tensor_ref(mine, base / "model.onnx").numpy(), reference_values(ref, base))


def same_value_info(mine: WireValueInfo, ref: onnx.ValueInfoProto) -> None:
    tensor = ref.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None for d in tensor.shape.dim]
    assert (mine.name, mine.elem_type, mine.shape) == (ref.name, tensor.elem_type, shape)


def _bits(value: Any) -> Any:
    """Floats by their bits, so that NaN equals NaN."""
    if isinstance(value, list):
        return [_bits(v) for v in value]
    return struct.pack("<d", value) if isinstance(value, float) else value


def same_node(mine: WireNode, ref: onnx.NodeProto) -> None:
    assert (list(mine.input), list(mine.output)) == (list(ref.input), list(ref.output))
    assert (mine.name, mine.op_type, mine.domain) == (ref.name, ref.op_type, ref.domain)
    assert [(p.key, p.value) for p in mine.metadata_props] == [(p.key, p.value) for p in ref.metadata_props]
    assert len(mine.attribute) == len(ref.attribute)
    for attr, expected in zip(mine.attribute, ref.attribute):
        assert (attr.name, attr.type, attr.ref_attr_name, attr.i, attr.s) == (expected.name, expected.type, expected.ref_attr_name,
                                                                              expected.i, expected.s)
        assert _bits([attr.f, list(attr.floats)]) == _bits([expected.f, list(expected.floats)])
        assert (list(attr.ints), list(attr.strings)) == (list(expected.ints), list(expected.strings))
        if expected.HasField("t"):
            same_tensor(attr.t, expected.t)
        if expected.HasField("g"):
            same_graph(attr.g, expected.g)
        assert len(attr.tensors) == len(expected.tensors) and len(attr.graphs) == len(expected.graphs)
        for tensor, ref_tensor in zip(attr.tensors, expected.tensors):
            same_tensor(tensor, ref_tensor)
        for graph, ref_graph in zip(attr.graphs, expected.graphs):
            same_graph(graph, ref_graph)
        try:
            value = helper.get_attribute_value(expected)
        except ValueError:
            value = None
        if not isinstance(value, (onnx.TensorProto, onnx.GraphProto)) and not (value and isinstance(value, list) and
                                                                               isinstance(value[0], (onnx.TensorProto, onnx.GraphProto))):
            assert _bits(attr.value()) == _bits(value)  # what onnx.helper.get_attribute_value gives


def same_graph(mine: WireGraph, ref: onnx.GraphProto, base: Path | None = None) -> None:
    assert mine.name == ref.name
    assert [(p.key, p.value) for p in mine.metadata_props] == [(p.key, p.value) for p in ref.metadata_props]
    for mine_list, ref_list, check in ((mine.node, ref.node, same_node), (mine.input, ref.input, same_value_info),
                                       (mine.output, ref.output, same_value_info), (mine.value_info, ref.value_info, same_value_info)):
        assert len(mine_list) == len(ref_list)
        for item, expected in zip(mine_list, ref_list):
            check(item, expected)
    assert len(mine.initializer) == len(ref.initializer)
    for tensor, ref_tensor in zip(mine.initializer, ref.initializer):
        same_tensor(tensor, ref_tensor, base)
    assert len(mine.sparse_initializer) == len(ref.sparse_initializer)
    for sparse, ref_sparse in zip(mine.sparse_initializer, ref.sparse_initializer):
        assert list(sparse.dims) == list(ref_sparse.dims) and sparse.values is not None and sparse.indices is not None
        same_tensor(sparse.values, ref_sparse.values)
        same_tensor(sparse.indices, ref_sparse.indices)


def same_model(mine: WireModel, ref: onnx.ModelProto, base: Path | None = None) -> None:
    assert (mine.ir_version, mine.producer_name, mine.producer_version, mine.domain, mine.model_version) == (
        ref.ir_version, ref.producer_name, ref.producer_version, ref.domain, ref.model_version)
    assert [(o.domain, o.version) for o in mine.opset_import] == [(o.domain, o.version) for o in ref.opset_import]
    assert [(p.key, p.value) for p in mine.metadata_props] == [(p.key, p.value) for p in ref.metadata_props]
    assert (mine.graph is not None) == ref.HasField("graph")
    if mine.graph is not None:
        same_graph(mine.graph, ref.graph, base)
    assert [(f.name, f.domain, [(o.domain, o.version) for o in f.opset_import]) for f in mine.functions] == [
        (f.name, f.domain, [(o.domain, o.version) for o in f.opset_import]) for f in ref.functions]
    for function, expected in zip(mine.functions, ref.functions):
        assert len(function.node) == len(expected.node)
        for node, ref_node in zip(function.node, expected.node):
            same_node(node, ref_node)


def check_bytes(data: bytes) -> WireModel:
    ref = onnx.ModelProto()
    ref.ParseFromString(data)
    mine = parse_model(data)
    same_model(mine, ref)
    return mine


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_committed_fixtures_read_as_onnx_reads_them(path: Path) -> None:
    same_model(read_model(path), onnx.load(path, load_external_data=False))


def test_garbage_fixture_is_an_input_error() -> None:
    with pytest.raises(InputError, match="not a valid ONNX file"):
        load_onnx(ROOT / "fixtures/bad_garbage.onnx")


# ---- models built with onnx.helper ------------------------------------------------------------------

def _exotic(values: list[float], dtype: Any) -> np.ndarray:
    return np.array(values, dtype=np.float32).astype(dtype)


# (ONNX type, values) in every typed-field storage (make_tensor, raw=False) and as raw bytes.
TYPED: list[tuple[int, list[Any]]] = [
    (TensorProto.FLOAT, [1.5, -0.0, float("inf"), 3.25]), (TensorProto.DOUBLE, [1e300, -2.5, 0.1, 7.0]),
    (TensorProto.INT64, [-(2**62), -1, 0, 2**40]), (TensorProto.INT32, [-(2**31), -1, 7, 2**31 - 1]),
    (TensorProto.INT16, [-32768, -1, 2, 32767]), (TensorProto.UINT16, [0, 1, 65535, 300]), (TensorProto.INT8, [-128, -1, 5, 127]),
    (TensorProto.UINT8, [0, 1, 200, 255]), (TensorProto.BOOL, [True, False, True, True]), (TensorProto.FLOAT16, [0.5, -2.0, 65504.0, 1e-4]),
    (TensorProto.BFLOAT16, [0.5, -2.0, 3.0e38, 1.0]), (TensorProto.UINT32, [0, 1, 2**32 - 1, 5]),
    (TensorProto.UINT64, [0, 1, 2**64 - 1, 2**63]), (TensorProto.COMPLEX64, [1 + 2j, -3j, 0.5, 4]),
    (TensorProto.COMPLEX128, [1 + 2j, -3j, 0.5, 1e200]), (TensorProto.FLOAT8E4M3FN, [0.5, -2.0, 448.0, 1.0]),
    (TensorProto.FLOAT8E4M3FNUZ, [0.5, -2.0, 240.0, 1.0]), (TensorProto.FLOAT8E5M2, [0.5, -2.0, 57344.0, 1.0]),
    (TensorProto.FLOAT8E5M2FNUZ, [0.5, -2.0, 57344.0, 1.0]), (TensorProto.FLOAT8E8M0, [0.5, 2.0, 1024.0, 1.0]),
    (TensorProto.INT4, [-8, -1, 3, 7]), (TensorProto.UINT4, [0, 1, 9, 15]), (TensorProto.FLOAT4E2M1, [0.5, -2.0, 6.0, 1.0]),
    (TensorProto.INT2, [-2, -1, 0, 1]), (TensorProto.UINT2, [0, 1, 2, 3]), (TensorProto.FLOAT6E2M3, [0.5, -2.0, 7.5, 1.0]),
    (TensorProto.FLOAT6E3M2, [0.5, -2.0, 28.0, 1.0]),
]
ODD_SHAPES = [(TensorProto.INT4, [-8, -1, 3]), (TensorProto.UINT2, [0, 1, 2, 3, 1]), (TensorProto.FLOAT6E2M3, [0.5, -2.0, 7.5])]


@pytest.mark.parametrize("raw", [False, True], ids=["typed-fields", "raw-data"])
@pytest.mark.parametrize(("data_type", "values"), TYPED + ODD_SHAPES, ids=lambda v: helper.tensor_dtype_to_string(v) if isinstance(v, int) else "")
def test_every_element_type_and_storage(data_type: int, values: list[Any], raw: bool) -> None:
    if raw:
        np_type = helper.tensor_dtype_to_np_dtype(data_type)
        array = np.array(values).astype(np_type) if np_type.kind in "biufc" and np_type.name != "float8_e5m2" else _exotic(values, np_type)
        tensor = numpy_helper.from_array(array, "t")
    else:
        tensor = helper.make_tensor("t", data_type, [len(values)], values)
    data = tensor.SerializeToString()
    ref = TensorProto()
    ref.ParseFromString(data)
    same_tensor(parse_tensor(data), ref)


def test_string_tensor_and_scalar_shapes() -> None:
    for tensor in (helper.make_tensor("s", TensorProto.STRING, [2], [b"ab", "\u00e9".encode()]),
                   helper.make_tensor("scalar", TensorProto.FLOAT, [], [2.5]), numpy_helper.from_array(np.zeros((0, 3), np.float32), "empty")):
        same_tensor(parse_tensor(tensor.SerializeToString()), tensor)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _len(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


@pytest.mark.parametrize(("data_type", "number", "encode", "values"), [
    (TensorProto.FLOAT, 4, lambda v: _key(4, 5) + struct.pack("<f", v), [1.5, -2.0, 0.25]),
    (TensorProto.DOUBLE, 10, lambda v: _key(10, 1) + struct.pack("<d", v), [1e-300, -2.0, 3.0]),
    (TensorProto.INT64, 7, lambda v: _key(7, 0) + _varint(v), [-1, 2**40, -(2**63)]),
    (TensorProto.INT8, 5, lambda v: _key(5, 0) + _varint(v), [-128, 127, -1]),
    (TensorProto.UINT64, 11, lambda v: _key(11, 0) + _varint(v), [2**64 - 1, 0, 5]),
])
def test_unpacked_repeated_fields_and_packed_dims(data_type: int, number: int, encode: Any, values: list[Any]) -> None:
    """onnx writes float_data & co packed and dims unpacked; a parser must take either form of both."""
    dims = _len(1, _varint(len(values)))  # dims packed: one LEN field holding the varints
    data = dims + _key(2, 0) + _varint(data_type) + b"".join(encode(v) for v in values) + _len(8, b"t")
    ref = TensorProto()
    ref.ParseFromString(data)
    assert list(ref.dims) == [len(values)]
    same_tensor(parse_tensor(data), ref)


def _sub(name: str, op: str = "Relu") -> onnx.GraphProto:
    return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_y"], name=f"{name}_node")], name, [],
                             [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", None])])


def rich_model() -> onnx.ModelProto:
    """Attributes of every type, If/Loop subgraphs with a BN inside, Constants of every form,
    metadata at three levels, several opset domains, a sparse initializer, a local function."""
    t1 = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "t1")
    custom = helper.make_node("Custom", ["x"], ["c"], name="custom", domain="com.example", f=1.5, i=-3, s="text", t=t1, g=_sub("g"),
                              floats=[0.5, float("nan")], ints=[-1, 2**40], strings=["a", "b"], tensors=[t1, t1], graphs=[_sub("a"), _sub("b")])
    custom.attribute.append(helper.make_attribute_ref("alpha", AttributeProto.FLOAT))
    helper.set_metadata_props(custom, {"pkg.torch.onnx.name_scopes": "['', 'layer1', 'bn']", "other": "x"})
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn_y"], name="inner_bn", epsilon=1e-3)
    branch = helper.make_graph([bn], "then", [], [helper.make_tensor_value_info("bn_y", TensorProto.FLOAT, None)])
    loop_body = helper.make_graph([helper.make_node("Identity", ["cond"], ["cond_out"])], "body",
                                  [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                   helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                                  [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
    channel = np.ones(2, np.float32)
    nodes = [
        helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(channel, "s_value")),
        helper.make_node("Constant", [], ["b"], value_float=0.25), helper.make_node("Constant", [], ["m"], value_floats=[0.0, 1.0]),
        helper.make_node("Constant", [], ["k"], value_int=3), helper.make_node("Constant", [], ["ks"], value_ints=[1, -2]),
        helper.make_node("Constant", [], ["v"], value=helper.make_tensor("v_value", TensorProto.FLOAT, [2], [1.0, 2.0])),
        custom,
        helper.make_node("If", ["cond"], ["bn_y"], name="if", then_branch=branch, else_branch=_sub("else")),
        helper.make_node("Loop", ["", "cond"], ["cond_final"], name="loop", body=loop_body),
    ]
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([5.0], np.float32), "sp"),
                                       numpy_helper.from_array(np.array([1], np.int64), "sp_idx"), [3])
    graph = helper.make_graph(nodes, "rich", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4]),
                                              helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                              helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("bn_y", TensorProto.FLOAT, None)],
                              value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT16, [1, "C"])], sparse_initializer=[sparse])
    graph.metadata_props.add(key="graph_key", value="graph_value")
    function = helper.make_function("com.example", "Fn", ["a"], ["b"], [helper.make_node("BatchNormalization", ["a"] * 5, ["b"])],
                                    [helper.make_opsetid("", 15)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("com.example", 2)],
                              producer_name="bnlint-tests", producer_version="\u00e9", functions=[function])
    model.domain, model.model_version = "ai.example", 7
    helper.set_model_props(model, {"author": "tests", "empty": ""})
    return model


def test_rich_model_matches_onnx(tmp_path: Path) -> None:
    model = rich_model()
    mine = check_bytes(model.SerializeToString())
    path = tmp_path / "rich.onnx"
    onnx.save_model(model, path)
    info = load_onnx(path)  # the loader over the same objects: the BN in the If branch, the function noted
    assert [layer.name for layer in info.layers] == ["if/then_branch/inner_bn"]
    assert info.layers[0].eps == 0.001 and info.layers[0].tensors["running_var"].numpy().tolist() == [1.0, 2.0]
    assert any("local functions" in note for note in info.notes)
    assert info.inputs[0].shape == ("N", 2, 4, 4) and info.inputs[2].shape is None
    assert info.metadata["opsets"] == {"ai.onnx": 15, "com.example": 2}
    assert mine.graph is not None
    constants = [_constant_value(node, path) for node in mine.graph.node[:6]]
    expected = [[1.0, 1.0], 0.25, [0.0, 1.0], 3, [1, -2], [1.0, 2.0]]
    assert [c.numpy().tolist() for c in constants if c is not None] == expected
    reference = [_constant_value(node, path) for node in model.graph.node[:6]]  # the same helper on onnx protos (bnlint.fix)
    assert [c.numpy().tolist() for c in reference if c is not None] == expected


@pytest.mark.parametrize("two_d", [False, True], ids=["linear-indices", "nnz-by-rank"])
def test_sparse_tensors_densify_as_onnx_does(tmp_path: Path, two_d: bool) -> None:
    """SparseTensorProto in a graph's sparse_initializer and a Constant's sparse_value: the wire
    reader's and onnx's protos densify to what onnx.numpy_helper reads from the values/indices."""
    from bnlint.loaders.onnx_const import SparseTensor, densify

    dense = np.array([[0.0, 1.5], [0.0, -2.0], [3.0, 0.0]], np.float32)
    flat = np.flatnonzero(dense)
    indices = np.stack(np.unravel_index(flat, dense.shape), axis=1) if two_d else flat
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(dense.reshape(-1)[flat], "s"),
                                       numpy_helper.from_array(indices.astype(np.int64), ""), list(dense.shape))
    constant = helper.make_node("Constant", [], ["c"], sparse_value=sparse)
    graph = helper.make_graph([constant], "g", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
                              sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    mine = parse_model(model.SerializeToString())
    assert mine.graph is not None
    np.testing.assert_array_equal(densify(mine.graph.sparse_initializer[0], tmp_path), dense)
    from_wire = _constant_value(mine.graph.node[0], tmp_path)
    from_onnx = _constant_value(model.graph.node[0], tmp_path)  # bnlint.fix calls it on onnx protos
    assert isinstance(from_wire, SparseTensor) and isinstance(from_onnx, SparseTensor)
    np.testing.assert_array_equal(from_wire.numpy(), dense)
    np.testing.assert_array_equal(from_onnx.numpy(), dense)
    assert from_wire.shape == (3, 2) and from_wire.dtype == "float32"


def test_merged_messages_and_last_value_wins() -> None:
    """Protobuf parses concatenated messages as a merge: repeated fields append, singular ones
    are overwritten, and a singular message (the graph) merges field by field."""
    first = rich_model()
    second = onnx.ModelProto(ir_version=3, producer_name="second")
    second.graph.node.append(helper.make_node("Relu", ["bn_y"], ["z"], name="appended"))
    second.graph.name = "renamed"
    second.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    mine = check_bytes(first.SerializeToString() + second.SerializeToString())
    assert mine.graph is not None and mine.graph.node[-1].name == "appended" and mine.ir_version == 3


def test_external_data_values_and_no_copy(tmp_path: Path) -> None:
    weight = np.random.default_rng(0).normal(size=(64, 64, 8, 8)).astype(np.float32)  # 1 MiB
    stats = [numpy_helper.from_array(np.full(64, v, np.float32), n) for v, n in ((1.0, "s"), (0.0, "b"), (0.0, "m"), (2.0, "v"))]
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                               helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(weight, "w"), *stats])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    inline = tmp_path / "inline.onnx"
    onnx.save_model(model, inline)
    info = load_onnx(inline)
    tracemalloc.start()
    array = info.nodes[0].weight.numpy()  # what BN502/BN503 read
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 1024 and not array.flags.writeable and array.tobytes() == weight.tobytes()
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save_model(model, folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                    size_threshold=0)
    same_model(read_model(folder / "model.onnx"), onnx.load(folder / "model.onnx", load_external_data=False), base=folder)
    info = load_onnx(folder / "model.onnx")
    assert info.metadata["external_data"] is True and info.layers[0].tensors["running_var"].numpy().tolist() == [2.0] * 64
    assert info.nodes[0].weight.numpy().tobytes() == weight.tobytes()


# ---- hostile bytes -----------------------------------------------------------------------------------

SMALL = helper.make_model(helper.make_graph(
    [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3)], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    initializer=[numpy_helper.from_array(np.ones(2, np.float32), n) for n in "sbmv"]), opset_imports=[helper.make_opsetid("", 15)])


def lint_or_input_error(path: Path) -> None:
    """The whole static read of a file: it loads and its tensors decode, or InputError; nothing else."""
    try:
        info = load_onnx(path)
        for layer in info.layers:
            for ref in layer.tensors.values():
                ref.numpy()
        for node in info.nodes:
            for ref in (node.weight, node.bias):
                if ref is not None:
                    ref.numpy()
    except InputError as exc:
        assert "\n" not in str(exc)


def test_every_truncation(tmp_path: Path) -> None:
    data = SMALL.SerializeToString()
    path = tmp_path / "cut.onnx"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        lint_or_input_error(path)


def test_seeded_mutations(tmp_path: Path) -> None:
    rng = np.random.default_rng(1234)
    base = bytearray((ROOT / "fixtures/convnet.onnx").read_bytes())
    path = tmp_path / "mutated.onnx"
    for _ in range(300):
        data = bytearray(base)
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[position] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        lint_or_input_error(path)


@pytest.mark.parametrize(("data", "message"), [
    (b"\x08\x07" + _len(7, b"") + b"\x0a\x01\x00", "length-delimited, not varint"),  # ir_version as bytes
    (b"\x08\x07\x38\x01", "is varint, not length-delimited"),  # the graph as a varint
    (b"\x08\x07\x3a\xff\xff\xff\x0f", "past the end"),  # a length past EOF
    (b"\x08\x07" + _len(7, _len(1, _len(5, b"\x15\x00\x00"))), "truncated"),  # an attribute's float cut short
    (b"\x08\x07" + _len(7, _len(5, _len(4, b"\x00\x00\x00"))), "not a multiple of 4"),  # float_data of 3 bytes
    (b"\x08\x07" + _len(7, b"\x0b"), "group"),  # wire type 3
    (b"\x08" + b"\xff" * 11, "varint longer"),
])
def test_malformed_bytes_are_input_errors(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(InputError, match=message) as info:
        load_onnx(path)
    assert "not a valid ONNX file" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("payload", "message"), [
    (b"\x01\x80", "ends inside a varint"),  # a packed varint run cut short
    (b"\x01" * 100_000, "more than 2 varints"),  # far more values than the shape holds: refused before decoding
])
def test_bad_payload_fails_when_read(tmp_path: Path, payload: bytes, message: str) -> None:
    """Payloads are checked when decoded, and then are an InputError."""
    tensor = _len(1, b"\x02") + _key(2, 0) + _varint(TensorProto.INT64) + _len(7, payload) + _len(8, b"v")
    graph = _len(1, helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"]).SerializeToString()) + _len(5, tensor)
    path = tmp_path / "payload.onnx"
    path.write_bytes(b"\x08\x07" + _len(7, graph) + _len(8, _key(2, 0) + _varint(15)))
    (layer,) = load_onnx(path).layers
    with pytest.raises(InputError, match=f"cannot be decoded: .*{message}"):
        layer.tensors["running_var"].numpy()


def test_deep_nesting_is_refused_quickly(tmp_path: Path) -> None:
    graph = b""
    for _ in range(2000):  # graph > node > attribute(g) > graph ...
        attribute = _len(1, b"body") + _key(20, 0) + _varint(AttributeProto.GRAPH) + _len(6, graph)
        graph = _len(1, _len(4, b"If") + _len(5, attribute))
    path = tmp_path / "deep.onnx"
    path.write_bytes(b"\x08\x07" + _len(7, graph))
    start = time.perf_counter()
    with pytest.raises(InputError, match="nested deeper"):
        load_onnx(path)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(WireError):
        parse_model(path.read_bytes())


# ---- cost ----------------------------------------------------------------------------------------------

def test_static_lint_imports_neither_onnx_nor_protobuf() -> None:
    script = (
        "import json, runpy, sys\n"
        "sys.argv = ['bnlint', '--format', 'json', '--fail-on', 'never', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('bnlint', run_name='__main__', alter_sys=True)\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime') or m.startswith('google.protobuf'))\n"
        "print('\\nMODULES ' + json.dumps(heavy))\n"
    )
    files = [str(p) for p in FIXTURES]
    env = {**os.environ, "BNLINT_NORMAL_EXIT": "1"}  # return from the CLI instead of os._exit, to inspect sys.modules
    done = subprocess.run([sys.executable, "-c", script, *files], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert '"BN' in done.stdout, done.stderr  # it linted and found things
    assert done.stdout.rsplit("MODULES ", 1)[1].strip() == "[]"
