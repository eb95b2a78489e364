"""Content sniffers of the built-in formats (bnlint.formats names them; detect tries them by priority).

Each takes a `Sniff` (path, suffix, first 512 bytes) and answers whether the file is of its
format. The order matters where signatures overlap: a tar header starts with a member name that
can spell any other signature, so torch's tar check runs before HDF5, safetensors, pickles and the
Git LFS pointer; protocol 0/1 pickles have no header and are tried after every signature; Caffe
and headerless protobuf go last.
"""

from __future__ import annotations

from bnlint.errors import ModelPlaceholder, NotAModel
from bnlint.formats import Sniff
from bnlint.loaders.keras_h5 import HDF5_SIGNATURE
from bnlint.protowire import FIXED32, FIXED64, LEN, VARINT, leading_fields

# First member names of a Keras 3 archive (a torch zip's first member is `<root>/data.pkl` or `<root>/.data/...`).
KERAS_MEMBERS = (b"metadata.json", b"config.json", b"model.weights.h5", b"model.weights.npz")
CAFFE_EXTENSIONS = (".caffemodel", ".prototxt")


def _zip(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06")


def _first_zip_member(head: bytes) -> bytes:
    """The name of the first member from a zip's first local file header (b'' if none)."""
    if not head.startswith(b"PK\x03\x04") or len(head) < 30:
        return b""
    length = int.from_bytes(head[26:28], "little")
    return head[30:30 + length]


def keras_zip(file: Sniff) -> bool:
    return _zip(file.head) and (file.suffix == ".keras" or _first_zip_member(file.head) in KERAS_MEMBERS)


def torch_zip(file: Sniff) -> bool:
    return _zip(file.head)


def _tar_header(head: bytes) -> bool:
    """Whether the first 512 bytes are a tar header tarfile accepts (checksum checked; v7 headers too)."""
    import tarfile

    try:
        tarfile.TarInfo.frombuf(head[:512], tarfile.ENCODING, "surrogateescape")
    except (tarfile.HeaderError, ValueError, UnicodeError, OverflowError):
        return False
    return True


def torch_tar(file: Sniff) -> bool:
    """torch.load tries every non-zip file as a pre-0.4 tar checkpoint first."""
    if len(file.head) < 512 or not _tar_header(file.head):
        return False
    from bnlint.loaders.torch_legacy import is_torch_tar

    return is_torch_tar(file.path)


def hdf5(file: Sniff) -> bool:
    return file.head.startswith(HDF5_SIGNATURE)


def safetensors(file: Sniff) -> bool:
    """An 8-byte little-endian header length, then the JSON header (the library allows leading spaces)."""
    head = file.head
    return len(head) >= 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:].lstrip(b" \t\r\n")[:1] == b"{"


def pickle_protocol2(file: Sniff) -> bool:
    return file.head[:1] == b"\x80" and file.head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")


def lfs_pointer(file: Sniff) -> bool:
    """A Git LFS pointer keeps the model's name: say what it is instead of failing to parse it."""
    if file.head.startswith(b"version https://"):
        raise ModelPlaceholder(str(file.path), "a Git LFS pointer, not the model (run `git lfs pull`)")
    return False


def onnx_by_suffix(file: Sniff) -> bool:
    return file.suffix == ".onnx" and file.head[:1] == b"\x08"  # ModelProto.ir_version first


def pickle_text(file: Sniff) -> bool:
    """Protocol 0/1 pickles (no header: they start with an opcode such as `(`, `c`, `}` or `]`): the
    first 64 KiB must parse as a pickle stream, which text does not."""
    from bnlint.loaders.pickle_scan import looks_like_pickle

    window = 1 << 16
    start = file.window(window)
    return looks_like_pickle(start, window_full=len(start) == window)


def caffe_by_suffix(file: Sniff) -> bool:
    return file.suffix in CAFFE_EXTENSIONS  # no signature: a caffemodel's first byte can look like ONNX's


# TensorProto's fields and their wire types (onnx.proto; packed or not): a protobuf's leading
# fields tell it from a ModelProto (field 2 is the model's producer_name, a string, and the
# tensor's data_type, a varint). ONNX test data (test_data_set_0/input_0.pb, shipped next to model
# zoo models) is TensorProto.
ONNX_TENSOR_WIRES = {1: {VARINT, LEN}, 2: {VARINT}, 3: {LEN}, 4: {LEN, FIXED32}, 5: {LEN, VARINT}, 6: {LEN}, 7: {LEN, VARINT},
                     8: {LEN}, 9: {LEN}, 10: {LEN, FIXED64}, 11: {LEN, VARINT}, 12: {LEN}, 13: {LEN}, 14: {VARINT}}
LEADING_FIELDS = 64  # how many of a protobuf's first fields a sniffer looks at (within its 512-byte head)


def _keys(head: bytes) -> list[tuple[int, int]]:
    return [(f.number, f.wire_type) for f in leading_fields(head, LEADING_FIELDS)]


def _fits_model(keys: list[tuple[int, int]]) -> bool:
    from bnlint.loaders.onnx_wire import MODEL_FIELD_WIRES  # only for files no signature claimed

    return all(MODEL_FIELD_WIRES[number] == wire for number, wire in keys if number in MODEL_FIELD_WIRES)


def onnx_by_content(file: Sniff) -> bool:
    if file.suffix == ".onnx":
        return True
    return file.head[:1] in (b"\x08", b"\x12", b"\x1a", b"\x22", b"\x3a", b"\x42") and _fits_model(_keys(file.head))


def onnx_tensor(file: Sniff) -> bool:
    """An ONNX TensorProto (a test input or output) is data next to a model, not a model."""
    if file.suffix != ".pb":
        return False
    keys = _keys(file.head)
    if ((2, VARINT) in keys and not _fits_model(keys)
            and all(number in ONNX_TENSOR_WIRES and wire in ONNX_TENSOR_WIRES[number] for number, wire in keys)):
        raise NotAModel(str(file.path), "ONNX test data (a TensorProto or sequence, as in test_data_set_0/input_0.pb), not a model")
    return False
