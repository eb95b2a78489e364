"""TensorFlow SavedModel / frozen GraphDef / checkpoint readers, without TensorFlow.

The fixtures come from fixtures/make_tf_fixtures.py (TF 2.21 + tf_keras 2.21, in a venv of their
own); expected.json holds the statistics the generator set, as float.hex strings, so every value
read here is compared with TF's own to the bit. Hostile inputs are built here, with a small
table/bundle writer that follows LevelDB's format.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bnlint.errors import InputError
from bnlint.loaders import tf_bundle as tb
from bnlint.loaders.tf_bundle import load_tf_checkpoint, read_bundle
from bnlint.loaders.tf_graphdef import load_tf_graphdef
from bnlint.loaders.tf_proto import sniff_pb
from bnlint.loaders.tf_savedmodel import load_tf_savedmodel
from bnlint.model import ModelInfo
from tests.proto_bytes import field, varint

TF = Path(__file__).resolve().parent.parent / "fixtures" / "tf_formats"
EXPECTED: dict[str, Any] = json.loads((TF / "expected.json").read_text())
ROLE_KEYS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
F32 = float(np.float32(1e-3))
SAVEDMODELS = ["savedmodel_healthy", "savedmodel_training", "savedmodel_nan", "savedmodel_never_updated", "savedmodel_frozen_base"]
OTHER_SAVEDMODELS = ["savedmodel_keras3", "savedmodel_keras3_training", "savedmodel_tf1"]


def hexes(info: ModelInfo, layer: str) -> dict[str, list[str]]:
    bn = info.layer(layer)
    assert bn is not None, [b.name for b in info.layers]
    return {ROLE_KEYS[role]: [float(v).hex() for v in np.asarray(ref.numpy(), dtype=np.float32).reshape(-1)]
            for role, ref in bn.tensors.items()}


def assert_matches(info: ModelInfo, fixture: str, prefix: str = "") -> None:
    expected = EXPECTED[fixture]
    assert sorted(b.name for b in info.layers) == sorted(prefix + name for name in expected)
    for name, stats in expected.items():
        assert hexes(info, prefix + name) == stats, (fixture, name)


def rejects(call: Any, *args: Any) -> str:
    start = time.perf_counter()
    with pytest.raises(InputError) as caught:
        call(*args)
    assert time.perf_counter() - start < 2.0
    line = str(caught.value)
    assert "\n" not in line and "Traceback" not in line
    return line


# ---- every fixture, to the bit -------------------------------------------------------------------

@pytest.mark.parametrize("fixture", SAVEDMODELS)
def test_savedmodel_statistics_equal_tfs(fixture: str) -> None:
    info = load_tf_savedmodel(TF / fixture)
    assert info.format == "tf-savedmodel" and info.framework == "tensorflow"
    assert_matches(info, fixture, "convnet/" if fixture == "savedmodel_frozen_base" else "")
    for bn in info.layers:
        assert bn.framework == "tensorflow" and bn.channels == 4
    eps = {bn.name.rsplit("/", 1)[-1]: bn.eps for bn in info.layers}
    assert eps == {"bn1": F32, "bn2": float(np.float32(1e-5))}


@pytest.mark.parametrize("fixture", ["savedmodel_keras3", "savedmodel_keras3_training", "savedmodel_tf1"])
def test_keras3_and_tf1_savedmodels(fixture: str) -> None:
    """Keras 3's TF backend writes BN unfused (Rsqrt/Mul/Sub over variables); TF1 at graph level."""
    info = load_tf_savedmodel(TF / fixture)
    assert_matches(info, fixture)
    bn = info.layers[0]
    assert bn.eps == F32
    training = fixture == "savedmodel_keras3_training"
    assert bn.training is training and bn.stats_source == ("computed" if training else "stored")
    if training:
        assert "batch's moments" in bn.training_reasons[0]


def test_savedmodel_file_path_and_directory_agree() -> None:
    by_dir = load_tf_savedmodel(TF / "savedmodel_healthy")
    by_file = load_tf_savedmodel(TF / "savedmodel_healthy" / "saved_model.pb")
    assert [b.name for b in by_dir.layers] == [b.name for b in by_file.layers] == ["bn1", "bn2"]


def test_training_flag_only_where_the_serving_graph_trains() -> None:
    """Keras 2 keeps training=True traces of every layer; only the signature's graph counts."""
    healthy = load_tf_savedmodel(TF / "savedmodel_healthy")
    assert [b.training for b in healthy.layers] == [False, False] and all(b.is_known("training") for b in healthy.layers)
    training = load_tf_savedmodel(TF / "savedmodel_training")
    assert [b.training for b in training.layers] == [True, True]
    assert "is_training=true" in training.layers[0].training_reasons[0]


def test_keras_metadata_settings() -> None:
    info = load_tf_savedmodel(TF / "savedmodel_healthy")
    bn1, bn2 = info.layers
    assert bn1.kind == "BatchNormalization" and bn1.axis == 3
    assert bn1.raw_momentum == pytest.approx(0.01) and bn2.raw_momentum == pytest.approx(0.1)
    assert bn1.trainable is True and bn1.effective_trainable is True
    assert "conv1" in info.modules


def test_momentum_from_exponential_avg_factor_without_metadata() -> None:
    info = load_tf_savedmodel(TF / "savedmodel_nan")
    assert not info.metadata["keras_metadata"]
    assert [b.raw_momentum for b in info.layers] == [float(np.float32(0.01)), float(np.float32(0.1))]
    assert info.layers[0].trainable is None


def test_trainable_bn_inside_a_frozen_base() -> None:
    info = load_tf_savedmodel(TF / "savedmodel_frozen_base")
    bn1, bn2 = info.layer("convnet/bn1"), info.layer("convnet/bn2")
    assert bn1 is not None and bn2 is not None
    assert (bn1.trainable, bn1.effective_trainable) == (True, True)  # tf.keras 2: a BN follows its own flag
    assert (bn2.trainable, bn2.effective_trainable) == (False, False)
    assert info.modules["convnet"].trainable is False


@pytest.mark.parametrize("target", ["ckpt_name", "ckpt_name/model.ckpt.index", "ckpt_name/model.ckpt"])
def test_name_based_checkpoint(target: str) -> None:
    info = load_tf_checkpoint(TF / target)
    assert info.metadata["layout"] == "name-based"
    assert_matches(info, "ckpt_name")
    assert all(b.certainty == "inferred" for b in info.layers)


@pytest.mark.parametrize("target", ["ckpt_object", "ckpt_object/ckpt-1.index", "ckpt_object/ckpt-1.data-00000-of-00001"])
def test_object_based_checkpoint_named_by_its_object_graph(target: str) -> None:
    info = load_tf_checkpoint(TF / target)
    assert info.metadata["layout"] == "object-based"
    assert_matches(info, "ckpt_object")
    assert info.layer("model/layer_with_weights-1") is info.layer("bn1")


def test_frozen_graph_fused() -> None:
    info = load_tf_graphdef(TF / "frozen_graph.pb")
    assert_matches(info, "frozen_graph", "convnet/")
    bn1 = info.layer("convnet/bn1")
    assert bn1 is not None and bn1.training is False and bn1.eps == F32
    assert bn1.producer is not None and bn1.producer.kind == "conv" and bn1.producer.exclusive


def test_frozen_graph_unfused_pattern() -> None:
    info = load_tf_graphdef(TF / "frozen_unfused.pb")
    assert_matches(info, "frozen_unfused")
    assert info.layers[0].certainty == "inferred" and info.layers[0].eps == F32
    assert any("unfused" in note for note in info.notes)


def test_sniff_pb() -> None:
    assert sniff_pb((TF / "savedmodel_healthy" / "saved_model.pb").read_bytes()[:512], "saved_model.pb") == "savedmodel"
    assert sniff_pb((TF / "savedmodel_training" / "saved_model.pb").read_bytes()[:512], "x.pb") == "savedmodel"
    assert sniff_pb((TF / "frozen_graph.pb").read_bytes()[:512], "frozen_graph.pb") == "graphdef"
    assert sniff_pb((TF / "frozen_unfused.pb").read_bytes()[:512]) == "graphdef"
    onnx = TF.parent / "convnet.onnx"
    assert sniff_pb(onnx.read_bytes()[:512], "model.pb") == "onnx"
    for other in (b"", b"\x00\x01garbage", b"hello world, not protobuf", (TF / "savedmodel_healthy" / "keras_metadata.pb").read_bytes()[:512],
                  (TF.parent / "caffe" / "caffe_convnet.caffemodel").read_bytes()[:512]):
        assert sniff_pb(other, "x.pb") is None


def test_static_reading_never_imports_tensorflow() -> None:
    code = f"""
import sys
from pathlib import Path
from bnlint.loaders.tf_savedmodel import load_tf_savedmodel
from bnlint.loaders.tf_graphdef import load_tf_graphdef
from bnlint.loaders.tf_bundle import load_tf_checkpoint
tf = Path({str(TF)!r})
infos = [load_tf_savedmodel(tf / name) for name in {SAVEDMODELS + OTHER_SAVEDMODELS!r}]
infos += [load_tf_graphdef(tf / "frozen_graph.pb"), load_tf_graphdef(tf / "frozen_unfused.pb")]
infos += [load_tf_checkpoint(tf / "ckpt_name"), load_tf_checkpoint(tf / "ckpt_object")]
for info in infos:
    for layer in info.layers:
        for role in layer.tensors:
            layer.array(role)
banned = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras", "google", "torch")]
assert not banned, banned
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---- hostile inputs ------------------------------------------------------------------------------


def entry(dims: list[int], offset: int, size: int, shard: int = 0, crc: int | None = None, dtype: int = 1) -> bytes:
    shape = b"".join(field(2, field(1, d)) for d in dims)
    out = field(1, dtype) + field(2, shape) + field(3, shard) + field(4, offset) + field(5, size)
    return out + (b"\x35" + struct.pack("<I", crc) if crc is not None else b"")


def block(pairs: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in pairs)
    return body + struct.pack("<II", 0, 1)


def table(pairs: list[tuple[bytes, bytes]], magic: int = tb.MAGIC) -> bytes:
    """A LevelDB-format table: one data block, an empty metaindex block, an index block, the footer."""
    out = bytearray()

    def put(contents: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(contents))
        out.extend(contents + b"\x00" + struct.pack("<I", tb.mask(tb.crc32c(contents + b"\x00"))))
        return handle

    data = put(block(sorted(pairs)))
    meta = put(block([]))
    index = put(block([(b"\xff", data)]))
    footer = (meta + index).ljust(40, b"\x00") + struct.pack("<Q", magic)
    return bytes(out) + footer


def write_bundle(folder: Path, entries: list[tuple[str, bytes]], data: bytes, shards: int = 1, name: str = "ckpt") -> Path:
    pairs = [(b"", field(1, shards))] + [(k.encode(), v) for k, v in entries]
    (folder / f"{name}.index").write_bytes(table(pairs))
    (folder / f"{name}.data-00000-of-{shards:05d}").write_bytes(data)
    return folder / f"{name}.index"


def bn_bundle(folder: Path, values: np.ndarray | None = None, **override: Any) -> Path:
    values = np.arange(4, dtype=np.float32) + 1 if values is None else values
    raw = values.tobytes()
    crc = tb.mask(tb.crc32c(raw))
    entries = []
    for offset, role in enumerate(("beta", "gamma", "moving_mean", "moving_variance")):
        spec = {"dims": [4], "offset": offset * 16, "size": 16, "crc": crc} | override.get(role, {})
        entries.append((f"bn/{role}", entry(**spec)))
    return write_bundle(folder, entries, raw * 4)


def test_the_writer_here_makes_readable_bundles(tmp_path: Path) -> None:
    info = load_tf_checkpoint(bn_bundle(tmp_path))
    assert [b.name for b in info.layers] == ["bn"]
    assert info.layers[0].array("running_var").tolist() == [1, 2, 3, 4]


def test_truncated_index(tmp_path: Path) -> None:
    index = TF / "ckpt_name" / "model.ckpt.index"
    for cut in (10, len(index.read_bytes()) // 2, len(index.read_bytes()) - 1):
        target = tmp_path / f"cut{cut}.index"
        target.write_bytes(index.read_bytes()[:cut])
        assert "checkpoint index" in rejects(read_bundle, target)


def test_bad_magic(tmp_path: Path) -> None:
    target = tmp_path / "m.index"
    target.write_bytes(table([(b"", field(1, 1))], magic=0x1234))
    assert "magic" in rejects(read_bundle, target)


def test_index_block_checksum(tmp_path: Path) -> None:
    raw = bytearray((TF / "ckpt_name" / "model.ckpt.index").read_bytes())
    raw[5] ^= 0x40
    (tmp_path / "m.index").write_bytes(bytes(raw))
    assert "checksum" in rejects(read_bundle, tmp_path / "m.index")


def test_tensor_checksum_mismatch(tmp_path: Path) -> None:
    target = bn_bundle(tmp_path)
    shard = tmp_path / "ckpt.data-00000-of-00001"
    data = bytearray(shard.read_bytes())
    data[40] ^= 1  # inside moving_mean (bytes 32-48)
    shard.write_bytes(bytes(data))
    layer = load_tf_checkpoint(target).layers[0]
    assert layer.array("weight") is not None  # other tensors still read
    assert "checksum mismatch" in rejects(layer.array, "running_mean")


def test_object_graph_checksum(tmp_path: Path) -> None:
    for name in ("ckpt-1.index", "ckpt-1.data-00000-of-00001"):
        (tmp_path / name).write_bytes((TF / "ckpt_object" / name).read_bytes())
    shard = tmp_path / "ckpt-1.data-00000-of-00001"
    bundle = read_bundle(tmp_path / "ckpt-1.index")
    at = bundle.entries["_CHECKPOINTABLE_OBJECT_GRAPH"].offset + 40
    data = bytearray(shard.read_bytes())
    data[at] ^= 1
    shard.write_bytes(bytes(data))
    assert "checksum" in rejects(load_tf_checkpoint, tmp_path / "ckpt-1.index")


def test_offsets_past_the_shard(tmp_path: Path) -> None:
    layer = load_tf_checkpoint(bn_bundle(tmp_path, moving_variance={"offset": 60})).layers[0]
    assert "past the end" in rejects(layer.array, "running_var")


def test_huge_declared_sizes_refused_before_allocation(tmp_path: Path) -> None:
    huge = bn_bundle(tmp_path, moving_mean={"dims": [1 << 40], "size": 1 << 42})
    assert "elements" in rejects(load_tf_checkpoint, huge)
    (tmp_path / "b").mkdir()
    lying = load_tf_checkpoint(bn_bundle(tmp_path / "b", moving_mean={"size": 1 << 40})).layers[0]
    assert "declares" in rejects(lying.array, "running_mean")


def test_shard_out_of_range_and_too_many_shards(tmp_path: Path) -> None:
    layer = load_tf_checkpoint(bn_bundle(tmp_path, gamma={"shard": 7})).layers[0]
    assert "shard 7" in rejects(layer.array, "weight")
    target = write_bundle(tmp_path, [], b"", shards=10**7, name="many")
    assert "data shards" in rejects(read_bundle, target)


def test_checkpoint_state_pointing_outside(tmp_path: Path) -> None:
    bn_bundle(tmp_path)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "../x"\n')
    assert "outside the checkpoint's folder" in rejects(load_tf_checkpoint, tmp_path)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/training/ckpt"\n')
    assert [b.name for b in load_tf_checkpoint(tmp_path).layers] == ["bn"]  # the same name, in this folder
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: {')
    assert "state file" in rejects(load_tf_checkpoint, tmp_path)


def test_shard_symlinked_outside_the_folder(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    target = bn_bundle(inside)
    shard = inside / "ckpt.data-00000-of-00001"
    (outside / "secret").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside / "secret")
    layer = load_tf_checkpoint(target).layers[0]
    assert "outside the checkpoint's folder" in rejects(layer.array, "running_var")


def test_snappy_blocks_are_inflated() -> None:
    literal = b"abcdefgh"
    compressed = varint(24) + bytes([(len(literal) - 1) << 2]) + literal + bytes([((16 - 1) << 2) | 2]) + struct.pack("<H", 8)
    assert tb.snappy_decompress(compressed) == literal * 3
    for bad in (varint(10) + b"\x08ab", varint(4) + bytes([(3 << 2) | 2]) + b"\x05\x00", varint(1 << 40)):
        with pytest.raises(ValueError):
            tb.snappy_decompress(bad)


def node(name: str, op: str, inputs: list[str], attrs: dict[str, bytes]) -> bytes:
    body = field(1, name.encode()) + field(2, op.encode()) + b"".join(field(3, i.encode()) for i in inputs)
    return body + b"".join(field(5, field(1, k.encode()) + field(2, v)) for k, v in attrs.items())


def tensor_attr(values: np.ndarray, dims: list[int] | None = None, content: bytes | None = None) -> bytes:
    shape = b"".join(field(2, field(1, d)) for d in (dims if dims is not None else list(values.shape)))
    return field(8, field(1, 1) + field(2, shape) + field(4, values.astype("<f4").tobytes() if content is None else content))


def bn_graph(eps_attr: bytes | None = None, mean: bytes | None = None) -> bytes:
    c = tensor_attr(np.ones(4, np.float32))
    nodes = [node("x", "Placeholder", [], {})] + [node(n, "Const", [], {"value": mean if n == "m" and mean else c}) for n in "sbmv"]
    attrs = {"epsilon": eps_attr if eps_attr is not None else b"\x25" + struct.pack("<f", 1e-3)}
    nodes.append(node("bn/FusedBatchNormV3", "FusedBatchNormV3", ["x", "s", "b", "m", "v"], attrs))
    return b"".join(field(1, n) for n in nodes)


def test_graphdef_written_here_reads(tmp_path: Path) -> None:
    (tmp_path / "g.pb").write_bytes(bn_graph())
    assert sniff_pb(bn_graph()[:512], "g.pb") == "graphdef"
    info = load_tf_graphdef(tmp_path / "g.pb")
    assert [b.name for b in info.layers] == ["bn"] and info.layers[0].training is True  # the op's default
    assert info.layers[0].array("running_mean").tolist() == [1, 1, 1, 1]


def test_deep_nesting(tmp_path: Path) -> None:
    nested = field(1, b"f")
    for _ in range(200):
        nested = field(1, b"f") + field(2, field(1, b"k") + field(2, field(10, nested)))
    (tmp_path / "g.pb").write_bytes(bn_graph(eps_attr=field(10, nested)))
    assert "nested deeper" in rejects(load_tf_graphdef, tmp_path / "g.pb")


def test_wrong_attribute_type(tmp_path: Path) -> None:
    (tmp_path / "g.pb").write_bytes(bn_graph(eps_attr=field(2, b"tiny")))
    assert "epsilon" in rejects(load_tf_graphdef, tmp_path / "g.pb")


def test_const_with_a_huge_shape_and_few_bytes(tmp_path: Path) -> None:
    (tmp_path / "g.pb").write_bytes(bn_graph(mean=tensor_attr(np.ones(4, np.float32), dims=[1 << 10, 1 << 10])))
    layer = load_tf_graphdef(tmp_path / "g.pb").layers[0]
    assert "tensor_content" in rejects(layer.array, "running_mean")
    (tmp_path / "h.pb").write_bytes(bn_graph(mean=tensor_attr(np.ones(4, np.float32), dims=[1 << 40, 1 << 40])))
    layer = load_tf_graphdef(tmp_path / "h.pb").layers[0]
    assert "elements" in rejects(layer.array, "running_mean")


def test_truncated_savedmodel_and_graphdef(tmp_path: Path) -> None:
    raw = (TF / "savedmodel_healthy" / "saved_model.pb").read_bytes()
    (tmp_path / "saved_model.pb").write_bytes(raw[: len(raw) // 3])
    assert "not a valid SavedModel" in rejects(load_tf_savedmodel, tmp_path)
    frozen = (TF / "frozen_graph.pb").read_bytes()
    (tmp_path / "g.pb").write_bytes(frozen[:-7])
    assert "not a valid TensorFlow GraphDef" in rejects(load_tf_graphdef, tmp_path / "g.pb")


def test_a_pb_that_is_none_of_the_three(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\xfe this is not protobuf at all" * 10)
    assert sniff_pb(junk.read_bytes()[:512], junk) is None
    assert "GraphDef" in rejects(load_tf_graphdef, junk)
    (tmp_path / "saved_model.pb").write_bytes(junk.read_bytes())
    assert "SavedModel" in rejects(load_tf_savedmodel, tmp_path)
    (tmp_path / "empty").mkdir()
    assert "not a SavedModel directory" in rejects(load_tf_savedmodel, tmp_path / "empty")


def test_crc32c_known_answer() -> None:
    assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tb.unmask(tb.mask(0x12345678)) == 0x12345678


def test_savedmodel_layers_know_their_producer_and_its_bias_from_the_bundle() -> None:
    """BN506 on SavedModels: the Conv2D feeding a FusedBatchNorm in the serving function, and the
    bias its BiasAdd reads through ReadVariableOp from variables/ (basic-pitch's real export)."""
    from bnlint.loaders import load_model

    real = load_model(Path(__file__).resolve().parents[1] / "fixtures" / "third_party" / "basic_pitch_nmp")
    producers = {layer.name: layer.producer for layer in real.layers}
    fed = producers["batch_normalization_2"]
    assert fed is not None and fed.kind == "conv" and fed.has_bias and fed.exclusive
    assert fed.bias is not None and fed.bias.shape == (fed.bias.numpy().size,) and 0 < abs(fed.bias.numpy()).max() < 0.01
    healthy = load_model(TF / "savedmodel_healthy")  # Conv2D(use_bias=False) before each BatchNormalization
    assert all(layer.producer is not None and not layer.producer.has_bias for layer in healthy.layers)
