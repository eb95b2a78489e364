"""Crash sites found by the fuzzer (tests/test_fuzz.py, bench/fuzz.py), each pinned as one small case.

Every case must end in one typed line (DataError / InputError), never in the CLI's "internal
error" safety net, and bombs must be refused before anything is inflated.
"""

from __future__ import annotations

import io
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from bnlint.cli import main
from bnlint.dynamic.data import Dataset
from bnlint.errors import DataError, InputError
from bnlint.loaders import load_model
from tests import hostile

ROOT = Path(__file__).resolve().parent.parent
ONNX_MODEL = str(ROOT / "fixtures" / "convnet.onnx")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _patch_member(path: Path, name: str, offset_central: int, offset_local: int, value: bytes) -> None:
    """Overwrite a field of one member's central and local headers (same bytes in both)."""
    data = bytearray(path.read_bytes())
    raw = name.encode()
    central = data.find(b"PK\x01\x02")
    while data[central + 46:central + 46 + len(raw)] != raw:
        central = data.find(b"PK\x01\x02", central + 1)
    local = data.find(b"PK\x03\x04")
    data[central + offset_central:central + offset_central + len(value)] = value
    data[local + offset_local:local + offset_local + len(value)] = value
    path.write_bytes(bytes(data))


def _samples(count: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(count, 3, 16, 16)).astype(np.float32)


def _read_all(path: Path) -> None:
    for source in Dataset(path).sources.values():
        for _ in source.batches(32):
            pass


@pytest.mark.parametrize("damage", ["crc", "encrypted", "strong-encryption", "bzip2", "method-99"])
def test_npz_member_damage_is_one_data_error(tmp_path: Path, damage: str) -> None:
    path = _npz(tmp_path / "x.npz", {"input.npy": _npy(_samples(8))}, zipfile.ZIP_STORED)
    if damage == "crc":
        _patch_member(path, "input.npy", 16, 14, b"\x00\x00\x00\x00")
    elif damage in ("encrypted", "strong-encryption"):
        _patch_member(path, "input.npy", 8, 6, b"\x01" if damage == "encrypted" else b"\x41")
    else:
        _patch_member(path, "input.npy", 10, 8, struct.pack("<H", 12 if damage == "bzip2" else 99))
    with pytest.raises(DataError) as caught:
        _read_all(path)
    assert "\n" not in str(caught.value)
    expected = {"crc": "CRC", "encrypted": "encrypted", "strong-encryption": "encrypted", "bzip2": "compression method 12",
                "method-99": "compression method 99"}[damage]
    assert expected in str(caught.value)


def test_npz_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    size = 256 << 20
    stream, crc = hostile.deflated_zeros(size)
    header = _npy(np.zeros((0, 3, 16, 16), dtype=np.float32)).replace(b"(0, 3", f"({size // 3072}, 3".encode())
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as archive:  # a stored header, then the zeros as one deflated member
        info = zipfile.ZipInfo("input.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size, info.compress_size, info.CRC = size + len(header), len(stream), crc
        archive.fp.write(info.FileHeader())  # type: ignore[union-attr]
        info.header_offset = archive.start_dir
        archive.fp.write(stream)  # type: ignore[union-attr]
        archive.start_dir = archive.fp.tell()  # type: ignore[union-attr]
        archive.filelist.append(info)
        archive.NameToInfo[info.filename] = info
    start = time.perf_counter()
    with pytest.raises(DataError, match="decompression bomb"):
        Dataset(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_npy_is_refused_before_reading(tmp_path: Path, cut: float) -> None:
    data = _npy(_samples(16))
    path = tmp_path / "x.npy"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(DataError, match="truncated"):
        Dataset(path)


def test_truncated_fortran_npy_is_a_data_error(tmp_path: Path) -> None:
    data = _npy(np.asfortranarray(_samples(16)))
    path = tmp_path / "x.npy"
    path.write_bytes(data[:-100])
    with pytest.raises(DataError, match="truncated"):
        Dataset(path)


def test_fortran_npz_reads_like_c_order(tmp_path: Path) -> None:
    array = _samples(40)
    path = _npz(tmp_path / "f.npz", {"input.npy": _npy(np.asfortranarray(array))})
    (source,) = Dataset(path).sources.values()
    np.testing.assert_array_equal(np.concatenate(list(source.batches(16))), array)


def test_huge_declared_shape_is_refused_before_allocation(tmp_path: Path) -> None:
    data = _npy(_samples(4)).replace(b"(4, 3, 16, 16)", b"(4, 3, 16, 2**61)".replace(b"2**61", str(2**61).encode()))
    path = tmp_path / "x.npy"
    path.write_bytes(data)
    with pytest.raises(DataError, match="truncated"):
        Dataset(path)


def test_big_endian_data_runs(tmp_path: Path) -> None:
    path = tmp_path / "be.npy"
    np.save(path, _samples(8).astype(">f4"))
    (source,) = Dataset(path).sources.values()
    batch = next(source.batches(8))
    assert batch.dtype.isnative and batch.dtype == np.float32


def test_max_samples_caps_what_is_read_with_a_note(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, _samples(100))
    dataset = Dataset(path, max_samples=30)
    (source,) = dataset.select(["input"], {})
    assert (source.stored, source.samples) == (100, 30)
    assert sum(batch.shape[0] for batch in source.batches(8)) == 30
    assert dataset.notes and "first 30 of 100" in dataset.notes[0]


def test_max_samples_from_config_reaches_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.save(tmp_path / "x.npy", _samples(50))
    (tmp_path / "bnlint.toml").write_text("[dynamic]\nmax-samples = 20\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [ONNX_MODEL, "--data", "x.npy", "--config", "bnlint.toml", "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    assert "over 20 samples" in result.output and "first 20 of 50" in result.output


def _bn_model(path: Path, attribute: onnx.AttributeProto) -> Path:
    init = [helper.make_tensor(n, onnx.TensorProto.FLOAT, [2], [1.0, 1.0]) for n in ("s", "b", "m", "v")]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")
    node.attribute.append(attribute)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])], init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)
    return path


@pytest.mark.parametrize("attribute", [
    helper.make_attribute("training_mode", 0.5),
    helper.make_attribute("epsilon", "tiny"),
    helper.make_attribute("momentum", [0.9, 0.1]),
    onnx.AttributeProto(name="training_mode"),  # type UNDEFINED (a fuzzer deleted the field)
], ids=["float-training-mode", "string-epsilon", "list-momentum", "untyped"])
def test_onnx_attribute_of_the_wrong_type_is_an_input_error(tmp_path: Path, attribute: onnx.AttributeProto) -> None:
    path = _bn_model(tmp_path / "m.onnx", attribute)
    with pytest.raises(InputError, match=f"attribute '{attribute.name}'"):
        load_model(path)


def test_surrogate_key_is_refused_after_a_complete_scan(tmp_path: Path) -> None:
    """A key holding a lone surrogate (fine for pickle, unprintable for a report) refuses the file in
    one line, and a payload after it is still reported (BN001): the scan walks the whole pickle."""
    raw = "bn\udcff".encode("utf-8", "surrogatepass")
    key = b"X" + struct.pack("<I", len(raw)) + raw
    payload = hostile.call(hostile.glob("posix", "system"), hostile.text("true"))
    pickled = hostile.state_dict_pickle([(key, hostile.tensor("0", (3,), (1,))), (hostile.text("evil"), payload)])
    path = hostile.torch_zip(tmp_path / "sur.pt", pickled)
    result = CliRunner().invoke(main, [str(path), "--color", "never"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "surrogate" in result.output and "BN001" in result.output and "internal error" not in result.output


@pytest.mark.parametrize("inbound", [1, [1], [{"config": 1}], [{"config": {"keras_history": 7}}], "x"])
def test_keras_inbound_nodes_of_the_wrong_type_still_lint(tmp_path: Path, inbound: object) -> None:
    """A fuzzer set `config/layers/4/inbound_nodes/0/args` to 1 and reached the safety net: the
    graph walk indexed into whatever it found. Wrong-typed links are now just "no known producer"."""
    import json

    source = ROOT / "fixtures" / "keras" / "keras_conv_bias.keras"
    target = tmp_path / "inbound.keras"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for info in original.infolist():
            data = original.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                layer = config["config"]["layers"][4]
                assert layer["inbound_nodes"], layer
                layer["inbound_nodes"][0]["args"] = inbound
                data = json.dumps(config).encode()
            copy.writestr(info, data)
    result = CliRunner().invoke(main, [str(target), "--color", "never"], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    assert "internal error" not in result.output and "BN" in result.output
