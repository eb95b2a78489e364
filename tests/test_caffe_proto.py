"""Caffe reading without Caffe: bnlint.protowire and bnlint.loaders.caffe_proto.

Three oracles: our own encoder (fixtures/caffe_writer.py), and the protobuf library driven by a
caffe.proto subset built here as a FileDescriptorProto (it both decodes our files and encodes
files our reader must read). Hostile inputs must end in InputError (WireError for protowire
alone), quickly, and never in another exception.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
)

from bnlint import protowire as pw
from bnlint.errors import InputError
from bnlint.loaders import caffe_proto as cp
from fixtures.caffe_writer import (
    Blob,
    Layer,
    Net,
    encode_net,
    key,
    len_field,
    prototxt,
    varint,
    write_caffemodel,
    write_prototxt,
)


def F32(value: float) -> float:
    """The float32 value Caffe stores for a float parameter."""
    return float(np.float32(value))


@contextmanager
def quick(limit: float = 1.0) -> Iterator[None]:
    start = time.perf_counter()
    yield
    assert time.perf_counter() - start < limit


def rejects(path: Path, reader: Callable[[Path], Any] = cp.read_caffemodel) -> InputError:
    """The reader raises InputError (nothing else) in under a second; returns it for message checks."""
    with quick(), pytest.raises(InputError) as info:
        reader(path)
    assert info.value.path == str(path) and "\n" not in str(info.value)
    return info.value


def special_floats(n: int, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    extras = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38, -1.17e-38], dtype=np.float32)
    return np.concatenate([values, extras])


def sample_net(packed: bool = True) -> Net:
    """A conv-BN-Scale-ReLU-IP net exercising every blob encoding the writer has."""
    rng = np.random.default_rng(1)
    return Net(name="sample", inputs=["data"], input_shapes=[(1, 3, 8, 8)], state_phase="TEST", layers=[
        Layer("conv1", "Convolution", ["data"], ["conv1"], [Blob(special_floats(100).reshape(9, 12), packed=packed)],
              {"convolution_param": {"num_output": 9, "bias_term": False}}),
        Layer("bn1", "BatchNorm", ["conv1"], ["conv1"],
              [Blob(rng.normal(size=9).astype(np.float32) * 999.98, packed=packed),
               Blob(rng.uniform(0.5, 2, 9).astype(np.float32) * 999.98, packed=not packed),
               Blob(np.array([999.98], np.float32), legacy_4d=True)],
              {"batch_norm_param": {"use_global_stats": True, "moving_average_fraction": 0.99, "eps": 1e-3}},
              include_phase="TEST"),
        Layer("scale1", "Scale", ["conv1"], ["conv1"],
              [Blob(rng.normal(size=9), double=True, packed=packed), Blob(rng.normal(size=(1, 9)), double=True, legacy_4d=True)],
              {"scale_param": {"axis": 1, "num_axes": 1, "bias_term": True}}),
        Layer("relu1", "ReLU", ["conv1"], ["conv1"], exclude_phase="TRAIN"),
        Layer("fc", "InnerProduct", ["conv1"], ["fc"], [Blob(rng.normal(size=(4, 9)).astype(np.float32), packed=packed)],
              {"inner_product_param": {"num_output": 4, "bias_term": False}}),
    ])


def v1_net() -> Net:
    return Net(name="old", inputs=["data"], input_dim=[1, 3, 4, 4], layers=[
        Layer("conv1", "Convolution", ["data"], ["conv1"], [Blob(np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1), legacy_4d=True)],
              {"convolution_param": {"num_output": 2}}, include_phase="TRAIN", v1=True),
        Layer("relu1", "ReLU", ["conv1"], ["conv1"], v1=True),
        Layer("ip", "InnerProduct", ["conv1"], ["ip"], params={"inner_product_param": {"num_output": 5, "bias_term": False}}, v1=True),
    ])


# ---- the reference: caffe.proto's subset as a descriptor, decoded by the protobuf library ----------

FD = descriptor_pb2.FieldDescriptorProto
MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {  # (name, number, label, type or message) from caffe.proto
    "BlobShape": [("dim", 1, "repeated", "int64")],
    "BlobProto": [("shape", 7, "optional", "BlobShape"), ("data", 5, "repeated", "float"), ("double_data", 8, "repeated", "double"),
                  ("num", 1, "optional", "int32"), ("channels", 2, "optional", "int32"), ("height", 3, "optional", "int32"),
                  ("width", 4, "optional", "int32")],
    "NetState": [("phase", 1, "optional", "Phase")],
    "NetStateRule": [("phase", 1, "optional", "Phase"), ("stage", 4, "repeated", "string"), ("not_stage", 5, "repeated", "string")],
    "BatchNormParameter": [("use_global_stats", 1, "optional", "bool"), ("moving_average_fraction", 2, "optional", "float"),
                           ("eps", 3, "optional", "float")],
    "ScaleParameter": [("axis", 1, "optional", "int32"), ("num_axes", 2, "optional", "int32"), ("bias_term", 4, "optional", "bool")],
    "ConvolutionParameter": [("num_output", 1, "optional", "uint32"), ("bias_term", 2, "optional", "bool")],
    "InnerProductParameter": [("num_output", 1, "optional", "uint32"), ("bias_term", 2, "optional", "bool")],
    "LayerParameter": [("name", 1, "optional", "string"), ("type", 2, "optional", "string"), ("bottom", 3, "repeated", "string"),
                       ("top", 4, "repeated", "string"), ("blobs", 7, "repeated", "BlobProto"), ("include", 8, "repeated", "NetStateRule"),
                       ("exclude", 9, "repeated", "NetStateRule"), ("convolution_param", 106, "optional", "ConvolutionParameter"),
                       ("inner_product_param", 117, "optional", "InnerProductParameter"),
                       ("batch_norm_param", 139, "optional", "BatchNormParameter"), ("scale_param", 142, "optional", "ScaleParameter")],
    "V1LayerParameter": [("bottom", 2, "repeated", "string"), ("top", 3, "repeated", "string"), ("name", 4, "optional", "string"),
                         ("type", 5, "optional", "V1LayerParameter.LayerType"), ("blobs", 6, "repeated", "BlobProto"),
                         ("convolution_param", 10, "optional", "ConvolutionParameter"),
                         ("inner_product_param", 17, "optional", "InnerProductParameter"),
                         ("include", 32, "repeated", "NetStateRule"), ("exclude", 33, "repeated", "NetStateRule")],
    "NetParameter": [("name", 1, "optional", "string"), ("layers", 2, "repeated", "V1LayerParameter"), ("input", 3, "repeated", "string"),
                     ("input_dim", 4, "repeated", "int64"), ("state", 6, "optional", "NetState"),
                     ("input_shape", 8, "repeated", "BlobShape"), ("layer", 100, "repeated", "LayerParameter")],
}
DEFAULTS = {("BatchNormParameter", "moving_average_fraction"): "0.999", ("BatchNormParameter", "eps"): "1e-05",
            ("ScaleParameter", "axis"): "1", ("ScaleParameter", "num_axes"): "1", ("ConvolutionParameter", "bias_term"): "true",
            ("InnerProductParameter", "bias_term"): "true", ("NetState", "phase"): "TEST"}
V1_SUBSET = {"NONE": 0, "CONCAT": 3, "CONVOLUTION": 4, "DATA": 5, "DROPOUT": 6, "INNER_PRODUCT": 14, "LRN": 15, "POOLING": 17,
             "RELU": 18, "SOFTMAX": 20, "SPLIT": 22, "ELTWISE": 25}


def reference_classes(packed: bool) -> dict[str, Any]:
    """Message classes for the subset; `packed` sets [packed = true] on the repeated numbers, as caffe.proto does."""
    package = f"caffe_ref_{'packed' if packed else 'unpacked'}"
    proto = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto2")
    proto.enum_type.add(name="Phase").value.extend(
        [descriptor_pb2.EnumValueDescriptorProto(name="TRAIN", number=0), descriptor_pb2.EnumValueDescriptorProto(name="TEST", number=1)])
    scalars = {"int64": FD.TYPE_INT64, "int32": FD.TYPE_INT32, "uint32": FD.TYPE_UINT32, "float": FD.TYPE_FLOAT,
               "double": FD.TYPE_DOUBLE, "bool": FD.TYPE_BOOL, "string": FD.TYPE_STRING}
    for message, fields in MESSAGES.items():
        described = proto.message_type.add(name=message)
        if message == "V1LayerParameter":
            described.enum_type.add(name="LayerType").value.extend(
                descriptor_pb2.EnumValueDescriptorProto(name=n, number=v) for n, v in V1_SUBSET.items())
        for name, number, label, kind in fields:
            spec = described.field.add(name=name, number=number,
                                       label=FD.LABEL_REPEATED if label == "repeated" else FD.LABEL_OPTIONAL)
            if kind in scalars:
                spec.type = scalars[kind]
                if label == "repeated" and kind in ("int64", "float", "double") and packed and name != "input_dim":
                    spec.options.packed = True
            else:
                spec.type = FD.TYPE_ENUM if kind in ("Phase", "V1LayerParameter.LayerType") else FD.TYPE_MESSAGE
                spec.type_name = f".{package}.{kind}"
            if (message, name) in DEFAULTS:
                spec.default_value = DEFAULTS[(message, name)]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {m: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{m}")) for m in MESSAGES}


REF = {packed: reference_classes(packed) for packed in (True, False)}


def bits(values: Any) -> np.ndarray:
    array = np.asarray(values)
    return array.view(np.uint32 if array.dtype == np.float32 else np.uint64)


def ref_blob_values(blob: Any) -> np.ndarray:
    if len(blob.double_data):
        return np.array(blob.double_data, dtype=np.float64)
    return np.array(blob.data, dtype=np.float64).astype(np.float32)  # the library widens float32 exactly


def ref_shape(blob: Any) -> tuple[int, ...]:
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    return tuple(blob.shape.dim)


def assert_same_as_reference(net: cp.CaffeNet, ref: Any, *, blobs: bool = True) -> None:
    """Our CaffeNet against the library's decoding: names, types, wiring, params, and blobs bit for bit."""
    assert net.name == ref.name and net.inputs == list(ref.input)
    ref_layers = [(layer, False) for layer in ref.layer] + [(layer, True) for layer in ref.layers]
    assert len(net.layers) == len(ref_layers)
    for ours, (theirs, v1) in zip(net.layers, ref_layers):
        assert (ours.name, ours.bottom, ours.top, ours.v1) == (theirs.name, list(theirs.bottom), list(theirs.top), v1)
        assert ours.v1_type == theirs.type if v1 else ours.type == theirs.type
        for rules, ref_rules in ((ours.include, theirs.include), (ours.exclude, theirs.exclude)):
            assert [r.phase for r in rules] == [("TRAIN", "TEST")[r.phase] if r.HasField("phase") else None for r in ref_rules]
        for param in ("convolution_param", "inner_product_param"):
            if theirs.HasField(param):
                ref_param = getattr(theirs, param)
                assert getattr(ours, param) == cp.ConvParam(ref_param.num_output if ref_param.HasField("num_output") else None,
                                                            ref_param.bias_term)
            else:
                assert getattr(ours, param) is None
        if not v1 and theirs.HasField("batch_norm_param"):
            bn = theirs.batch_norm_param
            assert ours.batch_norm_param == cp.BatchNormParam(
                bn.use_global_stats if bn.HasField("use_global_stats") else None, bn.moving_average_fraction, bn.eps)
        if not v1 and theirs.HasField("scale_param"):
            sp = theirs.scale_param
            assert ours.scale_param == cp.ScaleParam(sp.axis, sp.num_axes, sp.bias_term)
        if blobs:
            assert len(ours.blobs) == len(theirs.blobs)
            for mine, ref_blob in zip(ours.blobs, theirs.blobs):
                expected = ref_blob_values(ref_blob)
                assert mine.shape == ref_shape(ref_blob) and mine.dtype == str(expected.dtype)
                assert np.array_equal(bits(mine.numpy().ravel()), bits(expected))


# ---- protowire ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1])
def test_varint_round_trip(value: int) -> None:
    encoded = varint(value)
    assert pw.read_varint(encoded, 0, len(encoded)) == (value, len(encoded))


def test_negative_int_is_a_ten_byte_varint() -> None:
    encoded = varint(-5)
    assert len(encoded) == 10
    assert pw.to_int64(pw.read_varint(encoded, 0, 10)[0]) == -5


@pytest.mark.parametrize("data", [b"\x80" * 10 + b"\x01", b"\xff" * 11, b"\x80", b"\x80\x80"])
def test_bad_varints(data: bytes) -> None:
    with quick(), pytest.raises(pw.WireError):
        pw.read_varint(data, 0, len(data))


def test_varint_does_not_read_past_its_message_end() -> None:
    with pytest.raises(pw.WireError, match="truncated"):
        pw.read_varint(b"\x80\x01", 0, 1)


def test_iter_fields_all_wire_types() -> None:
    data = (key(1, 0) + varint(150) + key(2, 1) + struct.pack("<d", 2.5) + len_field(3, b"abc")
            + key(4, 5) + struct.pack("<f", 1.5))
    fields = list(pw.iter_fields(data))
    assert [(f.number, f.wire_type) for f in fields] == [(1, 0), (2, 1), (3, 2), (4, 5)]
    assert fields[0].value == 150 and data[fields[2].start:fields[2].end] == b"abc"
    assert pw.float_value(data, fields[1]) == 2.5 and pw.float_value(data, fields[3]) == 1.5


@pytest.mark.parametrize("data, message", [
    (key(3, 2) + varint(10) + b"abc", "past the end"),
    (key(3, 3), "group"), (key(3, 4), "group"), (key(3, 6), "wire type"), (key(3, 7), "wire type"),
    (b"\x00\x01", "field number"), (key(1, 5) + b"\x00\x00", "truncated"), (key(1, 1) + b"\x00" * 7, "truncated"),
])
def test_iter_fields_rejects(data: bytes, message: str) -> None:
    with quick(), pytest.raises(pw.WireError, match=message):
        list(pw.iter_fields(data))


def test_iter_fields_checks_its_range() -> None:
    with pytest.raises(pw.WireError):
        list(pw.iter_fields(b"abc", 2, 10))


@pytest.mark.parametrize("count", [1, 2, 15, 16, 17, 18, 1000, 4099])
@pytest.mark.parametrize("number", [5, 16, 3000])  # one-, two- and three-byte keys
def test_unpacked_runs_are_coalesced(count: int, number: int) -> None:
    values = special_floats(count)[:count]
    run = b"".join(key(number, 5) + v.tobytes() for v in values)
    data = len_field(1, b"x") + run + key(number, 0) + varint(7) + key(number, 5) + b"\x00\x00\x80\x3f"
    fields = list(pw.iter_fields(data))
    assert [(f.number, f.wire_type, f.n_values) for f in fields] == [(1, 2, 1), (number, 5, count), (number, 0, 1), (number, 5, 1)]
    assert np.array_equal(bits(pw.decode_fixed(data, fields[1], "<f4")), bits(values))
    assert pw.float_value(data, fields[3]) == 1.0


def test_unpacked_run_with_truncated_last_record() -> None:
    data = (key(5, 5) + b"\x00" * 4) * 40 + key(5, 5) + b"\x00\x00"
    with pytest.raises(pw.WireError, match="truncated"):
        list(pw.iter_fields(data))


def test_alternating_short_runs_are_linear() -> None:
    record = key(5, 5) + b"\x00" * 4
    data = (record * 2 + key(6, 0) + b"\x01") * 20_000  # 240 kB of runs of two: quadratic would take minutes
    with quick():
        assert sum(f.n_values for f in pw.iter_fields(data) if f.number == 5) == 40_000


def test_packed_values_and_counts() -> None:
    values = special_floats(50)
    field = next(pw.iter_fields(len_field(5, values.tobytes())))
    assert pw.fixed_count(field, 4) == values.size
    assert np.array_equal(bits(pw.decode_fixed(len_field(5, values.tobytes()), field, "<f4")), bits(values))
    with pytest.raises(pw.WireError, match="not a multiple of 4"):
        pw.fixed_count(next(pw.iter_fields(len_field(5, b"123"))), 4)


def test_packed_varints_match_a_scalar_decoder() -> None:
    rng = np.random.default_rng(2)
    numbers = [0, 1, 127, 128, 2**63, 2**64 - 1, *(int(x) for x in rng.integers(0, 2**63, 500, dtype=np.int64)), *(int(x) for x in rng.integers(0, 300, 500))]
    data = len_field(1, b"".join(varint(n) for n in numbers))
    decoded = pw.decode_varints(data, next(pw.iter_fields(data)))
    assert decoded.dtype == np.uint64 and [int(x) for x in decoded] == numbers


@pytest.mark.parametrize("payload", [b"\x80", b"\x01\xff", b"\xff" * 10 + b"\x01"])
def test_malformed_packed_varints(payload: bytes) -> None:
    data = len_field(1, payload)
    with pytest.raises(pw.WireError):
        pw.decode_varints(data, next(pw.iter_fields(data)))


def test_depth_limit() -> None:
    data = b""
    for _ in range(pw.MAX_DEPTH + 5):
        data = len_field(1, data)
    view = pw.MessageView(data)
    with quick(), pytest.raises(pw.WireError, match="nested deeper"):
        while True:
            view = view.sub(next(view.fields()))


def test_parse_text_features() -> None:
    text = """# comment
    a: 1 b: -2.5e-3 c: "x\\n\\x41\\101\\u00e9" 'y' c: 'it''s'  # adjacent strings concatenate
    m { n: true } m: { n: false } m < n: t >; d: [1, 0x10, -inf]; e: ENUM_V, [ext.name]: 3
    l: [{ n: 1 }, { n: 2 }]
    """
    tree = pw.parse_text(text)

    def scalars(name: str) -> list[tuple[str, str]]:
        return [(v.kind, v.text) for v in tree[name] if isinstance(v, pw.TextValue)]

    assert scalars("a") + scalars("b") == [("num", "1"), ("num", "-2.5e-3")]
    assert scalars("c") == [("str", "x\nAAé" + "y"), ("str", "its")]
    assert len(tree["m"]) == 3 and all(isinstance(m, pw.TextMessage) for m in tree["m"])
    assert scalars("d") == [("num", "1"), ("num", "0x10"), ("ident", "-inf")]
    assert tree["e"][0].line == 3 and "[ext.name]" in tree and len(tree["l"]) == 2


@pytest.mark.parametrize("text, message", [
    ("a { b: 1", "line 1: missing '}'"), ("a: 1 }", "expected a field name"), ("a: \"abc", "unterminated string"),
    ("\n\na: 'ab\ncd'", "line 3: unterminated"), ("a: \"\\q\"", "unknown escape"), ("a 1", "expected ':' or '{'"),
    ("a: ", "expected a value"), ("a: [1 2]", "expected ',' or ']'"), ("a: @", "unexpected character"),
    ("a {" * 100_000 + "}" * 100_000, "nested deeper"), ("a: \"\\U00110000\"", "invalid unicode"),
])
def test_parse_text_rejects(text: str, message: str) -> None:
    with quick(), pytest.raises(pw.TextError, match=message):
        pw.parse_text(text)


# ---- round trips through our writer -----------------------------------------------------------------

@pytest.mark.parametrize("packed", [True, False])
def test_caffemodel_round_trip(tmp_path: Path, packed: bool) -> None:
    source = sample_net(packed)
    net = cp.read_caffemodel(write_caffemodel(tmp_path / "m.caffemodel", source))
    assert (net.name, net.format, net.inputs, net.input_shapes, net.phase) == ("sample", "caffemodel", ["data"], [(1, 3, 8, 8)], "TEST")
    assert [(layer.name, layer.type, layer.v1) for layer in net.layers] == [(layer.name, layer.type, False) for layer in source.layers]
    conv, bn, scale, relu, fc = net.layers
    assert conv.convolution_param == cp.ConvParam(9, False) and fc.inner_product_param == cp.ConvParam(4, False)
    assert bn.batch_norm_param == cp.BatchNormParam(True, F32(0.99), F32(1e-3))
    assert scale.scale_param == cp.ScaleParam(1, 1, True)
    assert bn.include == [cp.StateRule("TEST")] and relu.exclude == [cp.StateRule("TRAIN")] and not relu.blobs
    for layer, written in zip(net.layers, source.layers):
        for blob, original in zip(layer.blobs, written.blobs, strict=True):
            want = original.data.astype(np.float64 if original.double else np.float32)
            shape = (1,) * (4 - want.ndim) + want.shape if original.legacy_4d else want.shape
            assert blob.shape == shape and blob.dtype == str(want.dtype)
            out = blob.numpy()
            assert out.shape == shape and out.flags.writeable and np.array_equal(bits(out.ravel()), bits(want.ravel()))
    assert (conv.blobs[0].byte_range is not None) == packed and (bn.blobs[1].byte_range is None) == packed


def test_prototxt_round_trip(tmp_path: Path) -> None:
    binary = cp.read_caffemodel(write_caffemodel(tmp_path / "m.caffemodel", sample_net()))
    text = cp.read_prototxt(write_prototxt(tmp_path / "m.prototxt", sample_net()))
    assert text.format == "prototxt" and all(not layer.blobs for layer in text.layers)
    for ours, theirs in ((text, binary), *zip(text.layers, binary.layers)):
        strip = {"blobs", "path", "format"}
        assert {k: v for k, v in vars(ours).items() if k not in strip | {"layers"}} == \
            {k: v for k, v in vars(theirs).items() if k not in strip | {"layers"}}


def test_v1_layers(tmp_path: Path) -> None:
    for net in (cp.read_caffemodel(write_caffemodel(tmp_path / "v1.caffemodel", v1_net())),
                cp.read_prototxt(write_prototxt(tmp_path / "v1.prototxt", v1_net()))):
        assert [(layer.name, layer.type, layer.v1_type, layer.v1) for layer in net.layers] == [
            ("conv1", "Convolution", 4, True), ("relu1", "ReLU", 18, True), ("ip", "InnerProduct", 14, True)]
        assert net.layers[0].include == [cp.StateRule("TRAIN")] and net.layers[0].convolution_param == cp.ConvParam(2, True)
        assert net.layers[2].inner_product_param == cp.ConvParam(5, False)
        assert net.input_dim == [1, 3, 4, 4] and net.input_shapes == [(1, 3, 4, 4)]
    assert net.format == "prototxt"
    binary = cp.read_caffemodel(tmp_path / "v1.caffemodel")
    assert binary.layers[0].blobs[0].shape == (2, 3, 1, 1) and binary.layers[0].blobs[0].numpy().ravel().tolist() == [0, 1, 2, 3, 4, 5]


def test_unknown_v1_type_number(tmp_path: Path) -> None:
    path = write_caffemodel(tmp_path / "m.caffemodel", Net(layers=[Layer("x", "77", v1=True)]))
    assert [(layer.type, layer.v1_type) for layer in cp.read_caffemodel(path).layers] == [("V1_77", 77)]


def test_unknown_fields_are_skipped(tmp_path: Path) -> None:
    junk = key(999, 0) + varint(5) + key(998, 1) + b"\x00" * 8 + len_field(997, b"\xff\xff") + key(996, 5) + b"\x00" * 4
    blob = len_field(7, len_field(1, varint(2)) + junk) + junk + len_field(5, np.array([1, 2], np.float32).tobytes())
    layer = junk + len_field(1, b"bn") + len_field(2, b"BatchNorm") + len_field(7, blob) + len_field(139, junk + key(3, 5) + struct.pack("<f", 0.5))
    data = junk + len_field(100, layer + junk) + len_field(6, junk + key(1, 0) + varint(0))
    (tmp_path / "m.caffemodel").write_bytes(data)
    net = cp.read_caffemodel(tmp_path / "m.caffemodel")
    assert net.phase == "TRAIN" and net.layers[0].batch_norm_param == cp.BatchNormParam(None, F32(0.999), 0.5)
    assert net.layers[0].blobs[0].numpy().tolist() == [1.0, 2.0]
    (tmp_path / "m.prototxt").write_text('unknown_top { deep { deeper: [1, 2] } } layer { name: "bn" type: "BatchNorm" '
                                         'engine: CUDNN param { lr_mult: 0 } batch_norm_param { eps: 0.5 [ext.x]: 1 } }\n')
    assert cp.read_prototxt(tmp_path / "m.prototxt").layers[0].batch_norm_param == cp.BatchNormParam(None, F32(0.999), 0.5)


def test_repeated_submessages_merge_and_last_scalar_wins(tmp_path: Path) -> None:
    bn1 = key(1, 0) + varint(1) + key(3, 5) + struct.pack("<f", 0.25)
    bn2 = key(3, 5) + struct.pack("<f", 0.5)
    layer = len_field(1, b"a") + len_field(1, b"bn") + len_field(139, bn1) + len_field(139, bn2)
    (tmp_path / "m.caffemodel").write_bytes(len_field(100, layer))
    parsed = cp.read_caffemodel(tmp_path / "m.caffemodel").layers[0]
    assert parsed.name == "bn" and parsed.batch_norm_param == cp.BatchNormParam(True, F32(0.999), 0.5)


def test_text_syntax_variants(tmp_path: Path) -> None:
    (tmp_path / "m.prototxt").write_text("""
    name: 'n\\x31'  # hex escape
    input: "data" input_shape: { dim: [1, 3, 0x10, 16] }
    state < phase: 0 >
    layer { name: "bn" type: "Batch" "Norm" bottom: "x" top: "x"
      batch_norm_param: { use_global_stats: True eps: 1E-5f moving_average_fraction: .9 }
      include { phase: TEST stage: "deploy" } include { not_stage: "train" }
    };
    layer { name: "s" type: "Scale" scale_param { axis: -1 num_axes: 0 bias_term: 1 } }
    layer { name: "c" type: "Convolution" convolution_param { num_output: 010 } }
    """, encoding="utf-8")
    net = cp.read_prototxt(tmp_path / "m.prototxt")
    assert (net.name, net.input_shapes, net.phase) == ("n1", [(1, 3, 16, 16)], "TRAIN")
    bn, scale, conv = net.layers
    assert bn.type == "BatchNorm" and bn.batch_norm_param == cp.BatchNormParam(True, F32(0.9), F32(1e-5))
    assert bn.include == [cp.StateRule("TEST", ("deploy",)), cp.StateRule(None, (), ("train",))]
    assert scale.scale_param == cp.ScaleParam(-1, 0, True) and conv.convolution_param == cp.ConvParam(8, True)


def test_text_floats_inf_nan(tmp_path: Path) -> None:
    (tmp_path / "m.prototxt").write_text('layer { batch_norm_param { eps: -inf moving_average_fraction: nan } }')
    param = cp.read_prototxt(tmp_path / "m.prototxt").layers[0].batch_norm_param
    assert param is not None and param.eps == -math.inf and math.isnan(param.moving_average_fraction)


# ---- the protobuf library as the reference --------------------------------------------------------

@pytest.mark.parametrize("packed", [True, False])
def test_library_decodes_our_files_identically(tmp_path: Path, packed: bool) -> None:
    for source in (sample_net(packed), v1_net()):
        path = write_caffemodel(tmp_path / "m.caffemodel", source)
        ref = REF[True]["NetParameter"]()
        ref.ParseFromString(path.read_bytes())
        assert_same_as_reference(cp.read_caffemodel(path), ref)


@pytest.mark.parametrize("packed", [True, False])
def test_we_decode_library_written_files(tmp_path: Path, packed: bool) -> None:
    """The library as the encoder: packed per caffe.proto, or every repeated number unpacked."""
    classes = REF[packed]
    ref = classes["NetParameter"]()
    ref.ParseFromString(encode_net(sample_net()))  # content from our writer, bytes re-encoded by the library
    ref.layers.add(name="old", type=4, bottom=["a"], top=["b"]).blobs.add(num=1, channels=2, height=1, width=1, data=[1.5, -2.0])
    ref.layer[0].blobs.add(data=special_floats(3)[:3]).shape.dim.extend([3])
    ref.input_dim.extend([1, 2])
    path = tmp_path / "lib.caffemodel"
    path.write_bytes(ref.SerializeToString())
    ours = cp.read_caffemodel(path)
    assert_same_as_reference(ours, ref)
    assert ours.input_dim == [1, 2] and ours.layers[-1].blobs[0].shape == (1, 2, 1, 1)
    if not packed:
        assert all(blob.byte_range is None for layer in ours.layers for blob in layer.blobs if blob.size > 1)


def test_library_parses_our_prototxt_identically(tmp_path: Path) -> None:
    for source in (sample_net(), v1_net()):
        text = prototxt(source)
        ref = text_format.Parse(text, REF[True]["NetParameter"]())
        (tmp_path / "m.prototxt").write_text(text)
        assert_same_as_reference(cp.read_prototxt(tmp_path / "m.prototxt"), ref, blobs=False)


def test_we_parse_library_written_prototxt(tmp_path: Path) -> None:
    ref = REF[True]["NetParameter"]()
    ref.ParseFromString(encode_net(sample_net()))
    for layer in ref.layer:
        del layer.blobs[:]
    ref.layer[0].name = 'quote" backslash\\ tab\t é \x01'
    (tmp_path / "m.prototxt").write_text(text_format.MessageToString(ref), encoding="utf-8")
    assert_same_as_reference(cp.read_prototxt(tmp_path / "m.prototxt"), ref, blobs=False)


# ---- BatchNorm statistics and in-place patching -------------------------------------------------

def bn_net(factor: float, blobs: int = 3) -> Net:
    data = [Blob(np.array([2.0, 4.0], np.float32)), Blob(np.array([6.0, 8.0], np.float32)), Blob(np.array([factor], np.float32))]
    return Net(layers=[Layer("bn", "BatchNorm", blobs=data[:blobs])])


def test_batchnorm_statistics(tmp_path: Path) -> None:
    layer = cp.read_caffemodel(write_caffemodel(tmp_path / "m.caffemodel", bn_net(2.0))).layers[0]
    mean, var, factor = cp.batchnorm_statistics(layer)
    assert factor == 2.0 and mean.dtype == np.float64 and mean.tolist() == [1.0, 2.0] and var.tolist() == [3.0, 4.0]
    never = cp.read_caffemodel(write_caffemodel(tmp_path / "z.caffemodel", bn_net(0.0))).layers[0]
    mean, var, factor = cp.batchnorm_statistics(never)
    assert factor == 0.0 and mean.tolist() == [0.0, 0.0] and var.tolist() == [0.0, 0.0]
    short = cp.read_caffemodel(write_caffemodel(tmp_path / "s.caffemodel", bn_net(1.0, blobs=2))).layers[0]
    with pytest.raises(InputError, match="needs 3"):
        cp.batchnorm_statistics(short)


def test_byte_range_allows_patching_in_place(tmp_path: Path) -> None:
    path = write_caffemodel(tmp_path / "m.caffemodel", bn_net(2.0))
    blob = cp.read_caffemodel(path).layers[0].blobs[1]
    assert blob.byte_range is not None
    offset, length = blob.byte_range
    data = bytearray(path.read_bytes())
    data[offset:offset + length] = np.array([1.0, 1.0], "<f4").tobytes()
    path.write_bytes(bytes(data))
    assert cp.read_caffemodel(path).layers[0].blobs[1].numpy().tolist() == [1.0, 1.0]


def test_sniffing(tmp_path: Path) -> None:
    assert cp.looks_like_caffemodel(encode_net(sample_net())[:16])
    assert cp.looks_like_caffemodel(encode_net(Net(layers=[Layer("a", "ReLU")]))[:16])
    assert not cp.looks_like_caffemodel(prototxt(sample_net()).encode()[:16])
    assert not cp.looks_like_caffemodel(b"\x08\x07\x12\x00")  # an ONNX ModelProto starts with ir_version
    assert not cp.looks_like_caffemodel(b"")


# ---- hostile inputs ---------------------------------------------------------------------------------

def test_empty_and_missing(tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"")
    assert "empty" in str(rejects(tmp_path / "e"))
    assert "empty" in str(rejects(tmp_path / "e", cp.read_prototxt))
    rejects(tmp_path / "missing")
    rejects(tmp_path, cp.read_prototxt)


def test_every_truncation(tmp_path: Path) -> None:
    data = encode_net(sample_net())
    boundaries = {f.end for f in pw.iter_fields(data)}
    first_layer = min(f.start for f in pw.iter_fields(data) if f.number == 100)
    path = tmp_path / "t.caffemodel"
    with quick(5.0):  # ~1,900 reads
        for cut in range(1, len(data)):
            path.write_bytes(data[:cut])
            if cut in boundaries and cut > first_layer:  # a prefix ending between fields is a smaller valid net
                assert isinstance(cp.read_caffemodel(path), cp.CaffeNet)
            elif cut in boundaries:
                assert "no layers" in str(rejects(path))
            else:
                rejects(path)


@pytest.mark.parametrize("name, data", [
    ("length past EOF", len_field(1, b"n") + key(100, 2) + varint(1000) + b"\x0a\x01a"),
    ("11-byte varint key", b"\x80" * 10 + b"\x01"),
    ("11-byte varint in a layer", len_field(100, key(1, 0) + b"\xff" * 10 + b"\x01")),
    ("group at top", key(100, 3) + len_field(100, b"")),
    ("group end in a layer", len_field(100, len_field(1, b"a") + key(5, 4))),
    ("group in a blob", len_field(100, len_field(7, key(7, 3) + key(7, 4)))),
    ("no layers", len_field(1, b"just a name")),
    ("prototxt bytes", b'name: "x"\nlayer { name: "a" }\n'),
    ("garbage", bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8))),
    ("zip header", b"PK\x03\x04" + b"\x00" * 60),
    ("huge shape", len_field(100, len_field(7, len_field(7, len_field(1, varint(10**12))) + len_field(5, b"\x00" * 12)))),
    ("negative dim", len_field(100, len_field(7, len_field(7, len_field(1, varint(-3))) + len_field(5, b"\x00" * 12)))),
    ("legacy shape mismatch", len_field(100, len_field(7, key(2, 0) + varint(4) + len_field(5, b"\x00" * 12)))),
    ("odd packed length", len_field(100, len_field(7, len_field(7, len_field(1, varint(1))) + len_field(5, b"\x00" * 5)))),
    ("bad packed dims", len_field(100, len_field(7, len_field(7, len_field(1, b"\x80"))))),
    ("truncated float run", len_field(100, len_field(7, (key(5, 5) + b"\x00" * 4) * 3 + key(5, 5) + b"\x00"))),
])
def test_hostile_caffemodels(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(data)
    rejects(path)


def test_field_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of tiny fields (or a packed list of many integers) stops at MAX_FIELDS, not after minutes."""
    monkeypatch.setattr(cp, "MAX_FIELDS", 1000)
    path = tmp_path / "many.caffemodel"
    path.write_bytes(len_field(100, (key(900, 0) + b"\x01") * 2000))
    assert "plausible" in str(rejects(path))
    path.write_bytes(len_field(100, len_field(7, len_field(7, len_field(1, b"\x01" * 5000)))))
    assert "more than" in str(rejects(path))
    monkeypatch.setattr(cp, "MAX_FIELDS", 10_000)
    path.write_bytes(len_field(100, (key(900, 0) + b"\x01") * 2000))
    assert isinstance(cp.read_caffemodel(path), cp.CaffeNet)


def test_too_many_axes_short_message(tmp_path: Path) -> None:
    path = tmp_path / "axes.caffemodel"
    path.write_bytes(len_field(100, len_field(7, len_field(7, len_field(1, b"\x01" * 100_000)))))
    error = rejects(path)
    assert "100000 axes" in str(error) and len(str(error)) < len(str(path)) + 200
    path.write_bytes(len_field(100, len_field(7, len_field(7, len_field(1, b"\x01" * 32)) + len_field(5, b"\x00" * 4))))
    assert cp.read_caffemodel(path).layers[0].blobs[0].shape == (1,) * 32


def test_deep_nesting_in_unknown_fields_is_skipped_not_recursed(tmp_path: Path) -> None:
    headers, length = [], 0
    for _ in range(100_000):  # built from the inside out in linear time
        headers.append(key(1, 2) + varint(length))
        length += len(headers[-1])
    nested = b"".join(reversed(headers))
    path = tmp_path / "deep.caffemodel"
    path.write_bytes(len_field(100, len_field(1, b"a") + len_field(500, nested)))
    with quick():
        assert [layer.name for layer in cp.read_caffemodel(path).layers] == ["a"]


@pytest.mark.parametrize("text, message", [
    ("layer { name: 'a'", "line 1: missing '}'"), ("layer { }\n}", "line 2"), ("layer {" * 100_000, "nested deeper"),
    ('layer { name: "abc }', "unterminated string"), ("layer { include { phase: DEPLOY } }", "expected an enum"),
    ("layer {\n batch_norm_param { eps: \"small\" } }", "line 2: expected a number"),
    ("layer { convolution_param { num_output: 1.5 } }", "expected an integer"), ("layer: 3", "must be a message"),
    ("layer { name { x: 1 } }", "must be a value"), ("layer { scale_param { bias_term: yes } }", "expected true or false"),
    ("input_dim: 99999999999999999999999", "expected an integer"), ("name: \"\\xff\\", "unterminated"),
])
def test_hostile_prototxt(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.prototxt"
    path.write_text(text, encoding="utf-8")
    assert message in str(rejects(path, cp.read_prototxt))


def mutations(data: bytes, seed: int, count: int) -> Iterator[bytes]:
    """Seeded random corruptions: flipped bits, overwritten, deleted and inserted bytes."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        mutated = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            at, kind = int(rng.integers(0, len(mutated))), int(rng.integers(0, 4))
            if kind == 0:
                mutated[at] ^= 1 << int(rng.integers(0, 8))
            elif kind == 1:
                mutated[at] = int(rng.integers(0, 256))
            elif kind == 2:
                del mutated[at:at + int(rng.integers(1, 8))]
            else:
                mutated[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 8)), dtype=np.uint8))
        yield bytes(mutated)


def read_everything(path: Path, reader: Callable[[Path], cp.CaffeNet]) -> None:
    for layer in reader(path).layers:
        for blob in layer.blobs:
            blob.numpy()
        if layer.type == "BatchNorm" and layer.blobs:
            cp.batchnorm_statistics(layer)


@pytest.mark.parametrize("reader, data", [
    (cp.read_caffemodel, encode_net(sample_net())), (cp.read_caffemodel, encode_net(sample_net(packed=False))),
    (cp.read_caffemodel, encode_net(v1_net())), (cp.read_prototxt, prototxt(sample_net()).encode()),
], ids=["packed", "unpacked", "v1", "prototxt"])
def test_corrupted_files_raise_only_input_error(tmp_path: Path, reader: Callable[[Path], cp.CaffeNet], data: bytes) -> None:
    path = tmp_path / "fuzz"
    with quick(10.0):  # 1,500 files
        for mutated in mutations(data, len(data), 1500):
            path.write_bytes(mutated)
            try:
                read_everything(path, reader)
            except InputError:
                pass


def test_solver_prototxt_is_not_a_network(tmp_path: Path) -> None:
    path = tmp_path / "solver.prototxt"
    path.write_text('net: "train_val.prototxt"\nbase_lr: 0.01\nlr_policy: "step"\nsolver_mode: GPU\n')
    assert "no layers" in str(rejects(path, cp.read_prototxt))
    (tmp_path / "blank.prototxt").write_text(" \n\t\n")
    assert "empty" in str(rejects(tmp_path / "blank.prototxt", cp.read_prototxt))


def test_prototxt_that_is_not_text(tmp_path: Path) -> None:
    path = write_caffemodel(tmp_path / "m.prototxt", sample_net())
    assert "UTF-8" in str(rejects(path, cp.read_prototxt))


def test_big_file_is_one_pass(tmp_path: Path) -> None:
    """~24 MB of packed weights in 60 layers: the structure pass must not touch the floats."""
    weights = np.ones((250, 100, 4), np.float32)
    net = Net(layers=[Layer(f"c{i}", "Convolution", blobs=[Blob(weights)]) for i in range(60)])
    path = write_caffemodel(tmp_path / "big.caffemodel", net)
    with quick(0.5):
        parsed = cp.read_caffemodel(path)
    assert len(parsed.layers) == 60 and parsed.layers[-1].blobs[0].numpy().sum() == weights.size


def test_import_stays_light() -> None:
    code = ("import sys, bnlint.protowire, bnlint.loaders.caffe_proto; "
            "print(sorted(m for m in ('torch', 'onnx', 'keras', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"
