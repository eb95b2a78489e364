"""Content sniffers of the built-in formats (bnlint.formats names them; detect tries them by priority).

Each takes a `Sniff` (path, suffix, first 512 bytes) and answers whether the file is of its
format. The order matters where signatures overlap: a tar header starts with a member name that
can spell any other signature, so torch's tar check runs before HDF5, safetensors, pickles and the
Git LFS pointer; protocol 0/1 pickles have no header and are tried after every signature; Caffe
and headerless protobuf go last.
"""

from __future__ import annotations

from bnlint.errors import NotAModel
from bnlint.formats import Sniff
from bnlint.loaders.keras_h5 import HDF5_SIGNATURE

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
        raise NotAModel(str(file.path), "a Git LFS pointer, not the model (run `git lfs pull`)")
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


def onnx_by_content(file: Sniff) -> bool:
    return file.suffix == ".onnx" or file.head[:1] in (b"\x08", b"\x12", b"\x1a", b"\x22", b"\x3a", b"\x42")
