"""Structured fuzz inputs for every format bnlint reads, deterministic given an integer seed.

`generate(seed, role, marker_dir)` picks a seed file (a fixture, or a synthetic hostile file whose
payload would `touch marker_dir/pwned` if anything ever ran it) and applies one to three mutations:

- bytes: flips, interesting values, insertions, deletions, truncation, duplicated ranges;
- zips (torch checkpoints, TorchScript, .keras, .npz): a member is mutated by its own kind and the
  archive re-packed with valid CRCs, so the parser behind the zip is reached; or the archive itself
  is damaged after packing (bad CRC, encryption flag, unknown compression, forged sizes, bombs);
- pickles: opcode-level (delete, duplicate, swap, new integer/string arguments, inserted opcodes);
- protobuf (ONNX, caffemodel): field-level at a random depth (varints, lengths, wire types, numbers);
- JSON (Keras configs, safetensors headers): values replaced, keys dropped, deep nesting, big numbers;
- .npy headers: shapes, fortran order, dtypes (big-endian float16, objects, structs), nested or
  non-literal headers, format versions 1.0 to 3.0, sizes that disagree with the data;
- HDF5: random bytes, mostly in the metadata near the start and around object signatures.

`role="lint"` mutates model files; `role="data"` mutates `--data` arrays (run against a healthy model).
The per-format mutators live in tests/fuzz_mutators.py; this module picks seeds, re-packs zips,
builds bombs and dispatches. Both bench/fuzz.py and tests/test_fuzz.py use it; nothing here runs bnlint.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests import hostile
from tests.fuzz_mutators import (
    find_all,
    mutate_bytes,
    mutate_hdf5,
    mutate_json,
    mutate_legacy,
    mutate_npy,
    mutate_onnx,
    mutate_pickle,
    mutate_proto,
    mutate_safetensors,
    mutate_text,
    npy_bytes,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MARKER_NAME = "pwned"
MODEL_SUFFIXES = (".pt", ".pth", ".ckpt", ".onnx", ".safetensors", ".keras", ".h5", ".caffemodel", ".prototxt")
# --data runs: a healthy model, given as CLI arguments after the input (paths relative to the repo root).
DATA_MODELS = (("fixtures/convnet.onnx",), ("fixtures/convnet_state_dict.pt", "--arch", "fixtures/models.py:convnet"))


@dataclass
class FuzzInput:
    """One generated input: the files to write and the path to hand to bnlint."""

    seed: int
    role: str  # "lint" or "data"
    kind: str  # the seed's format
    source: str  # the seed's name
    files: dict[str, bytes]  # relative path -> content
    target: str  # relative path given on the command line (a file, or a folder of shards)
    mutations: list[str] = field(default_factory=list)

    def write(self, folder: Path) -> Path:
        for name, data in self.files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return folder / self.target

    def describe(self) -> str:
        return f"seed {self.seed} ({self.role}): {self.kind} {self.source}: {'; '.join(self.mutations) or 'unchanged'}"


# ---------------------------------------------------------------------------------------------- seeds


def _kind(name: str, data: bytes) -> str:
    suffix = Path(name).suffix.lower()
    if data.startswith(b"PK"):
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            return "bytes"
        if any(n.endswith("config.json") for n in names):
            return "keras-zip"
        if any(n.endswith(".npy") for n in names):
            return "npz"
        return "torchscript" if any("/code/" in n for n in names) else "torch-zip"
    if data.startswith(b"\x89HDF"):
        return "hdf5"
    return {".safetensors": "safetensors", ".onnx": "onnx", ".caffemodel": "caffemodel", ".prototxt": "prototxt",
            ".npy": "npy"}.get(suffix, "torch-pickle" if data[:1] == b"\x80" else "bytes")


@functools.lru_cache(maxsize=None)
def _fixture_seeds(role: str) -> tuple[tuple[str, bytes], ...]:
    if role == "data":
        files = sorted(p for p in (FIXTURES / "data").rglob("*") if p.suffix in (".npy", ".npz"))
    else:
        files = sorted(p for folder in (FIXTURES, FIXTURES / "keras", FIXTURES / "caffe") for p in folder.iterdir()
                       if p.is_file() and p.suffix in MODEL_SUFFIXES)
    return tuple((p.name, p.read_bytes()) for p in files)


@functools.lru_cache(maxsize=None)
def _seeds_by_kind(role: str) -> dict[str, tuple[tuple[str, bytes], ...]]:
    """Seed files grouped by format: a kind is picked first, so rare formats get their share."""
    groups: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in _fixture_seeds(role):
        groups.setdefault(_kind(name, data), []).append((name, data))
    return {kind: tuple(files) for kind, files in sorted(groups.items())}


def _pick(rng: random.Random, role: str) -> tuple[str, bytes]:
    groups = _seeds_by_kind(role)
    return rng.choice(groups[rng.choice(sorted(groups))])


def _hostile_seed(rng: random.Random, marker_dir: Path) -> tuple[str, bytes]:
    """A state dict (zip, legacy pickle or pre-0.4 tar) carrying one of tests/hostile.py's payloads."""
    name = rng.choice(sorted(hostile.PAYLOADS))
    payload = hostile.PAYLOADS[name](marker_dir / MARKER_NAME)
    layout = rng.random()
    if layout < 0.2:
        sink = _Sink()
        hostile.tar_checkpoint(sink, payload, rng.choice(["sys_info", "pickle", "storages", "tensors"]))  # type: ignore[arg-type]
        return f"hostile_tar_{name}.pt", sink.getvalue()
    if layout < 0.6:
        pickled = hostile.state_dict_pickle([(hostile.text("evil"), payload)])
        members = {"data.pkl": pickled, "byteorder": b"little", "version": b"3\n"}
        members.update({f"data/{k}": v for k, v in hostile.bn_storages().items()})
        return f"hostile_{name}.pt", _pack([(f"archive/{k}", v, zipfile.ZIP_STORED) for k, v in members.items()])
    sink = _Sink()
    hostile.legacy_file(sink, payload)  # type: ignore[arg-type]  # it only calls .write_bytes
    return f"hostile_legacy_{name}.pt", sink.getvalue()


class _Sink(io.BytesIO):
    def write_bytes(self, data: bytes) -> None:
        self.write(data)


# ---------------------------------------------------------------------------------------------- zips


def _pack(members: list[tuple[str, bytes, int]]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", allowZip64=True) as archive:
        warnings.simplefilter("ignore")  # duplicate names are one of the mutations
        for name, data, method in members:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = method
            archive.writestr(info, data)
    return buffer.getvalue()


def member_mutator(name: str) -> Callable[[random.Random, bytes, list[str]], bytes]:
    if name.endswith(".pkl"):
        return mutate_pickle
    if name.endswith(".json"):
        return mutate_json
    if name.endswith(".h5"):
        return mutate_hdf5
    if name.endswith(".npy"):
        return mutate_npy
    if name.endswith(".py"):
        return mutate_text
    return mutate_bytes


def _weight(name: str) -> float:
    if name.endswith(("data.pkl", "config.json", ".npy", ".h5")):
        return 6.0
    if name.endswith((".pkl", ".json", "byteorder", ".py")):
        return 2.0
    return 0.5


def mutate_zip(rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [(i.filename, archive.read(i), i.compress_type) for i in archive.infolist()]
    except Exception:  # noqa: BLE001 - an already broken zip
        return mutate_bytes(rng, data, notes)
    if not members:
        return mutate_bytes(rng, data, notes)
    op = rng.random()
    if op < 0.6:
        k = rng.choices(range(len(members)), weights=[_weight(m[0]) for m in members])[0]
        name, body, method = members[k]
        before = len(notes)
        members[k] = (name, member_mutator(name)(rng, body, notes), method)
        notes[before:] = [f"{name}: {n}" for n in notes[before:]]
        return _pack(members)
    k = rng.randrange(len(members))
    name = members[k][0]
    if op < 0.68:
        members.insert(rng.randrange(len(members) + 1), members[k])
        notes.append(f"zip: duplicated {name}")
    elif op < 0.74:
        del members[k]
        notes.append(f"zip: removed {name}")
    elif op < 0.8:
        new = rng.choice(["../" + name, "/" + name, name + "/", name.upper(), "x/" + name, name.replace("data.pkl", "constants.pkl")])
        members[k] = (new, *members[k][1:])
        notes.append(f"zip: renamed {name} -> {new}")
    elif op < 0.86:
        method = rng.choice([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
        members[k] = (name, members[k][1], method)
        notes.append(f"zip: {name} compressed with method {method}")
    else:
        packed = bytearray(_pack(members))
        return _damage_headers(rng, packed, name, notes)
    return _pack(members)


def _damage_headers(rng: random.Random, packed: bytearray, name: str, notes: list[str]) -> bytes:
    """Edit one member's central and local headers in place: CRC, flags, method, sizes."""
    raw = name.encode()
    spots = [i for i in find_all(bytes(packed), b"PK\x01\x02") if packed[i + 46:i + 46 + len(raw)] == raw]
    local = [i for i in find_all(bytes(packed), b"PK\x03\x04") if packed[i + 30:i + 30 + len(raw)] == raw]
    if not spots or not local:
        return bytes(packed)
    central, start = spots[0], local[0]
    op = rng.randrange(5)
    if op == 0:
        for at in (central + 16, start + 14):
            packed[at:at + 4] = struct.pack("<I", rng.randrange(2**32))
        notes.append(f"zip: {name} bad CRC")
    elif op == 1:
        for at in (central + 8, start + 6):
            packed[at] |= rng.choice([0x01, 0x40, 0x41, 0x08])
        notes.append(f"zip: {name} flag bits (encrypted / strong encryption / data descriptor)")
    elif op == 2:
        method = rng.choice([1, 6, 9, 12, 14, 93, 95, 98, 99, 0xFFFF])
        for at in (central + 10, start + 8):
            packed[at:at + 2] = struct.pack("<H", method)
        notes.append(f"zip: {name} compression method {method}")
    elif op == 3:
        size = rng.choice([0, 1, 2**31, 2**32 - 2, 10**9])
        for at in (central + 24, start + 22):
            packed[at:at + 4] = struct.pack("<I", size)
        notes.append(f"zip: {name} declared size {size}")
    else:
        size = rng.choice([0, 1, 2**31, 2**32 - 2])
        for at in (central + 20, start + 18):
            packed[at:at + 4] = struct.pack("<I", size)
        notes.append(f"zip: {name} compressed size {size}")
    return bytes(packed)


@functools.lru_cache(maxsize=4)
def _zeros_stream(size: int) -> bytes:
    return hostile.deflated_zeros(size)[0]


@functools.lru_cache(maxsize=8)
def _zeros_crc(size: int, start: int, chunk: int = 1 << 22) -> int:
    zero, crc = bytes(chunk), start
    for _ in range(size // chunk):
        crc = zlib.crc32(zero, crc)
    return crc


def npz_bomb(rng: random.Random, notes: list[str]) -> bytes:
    """An .npz whose one array inflates from ~1 MB (zeros: ~1000:1) to a large sample; sometimes with a forged size."""
    size = rng.choice([64 << 20, 256 << 20, 1 << 30])
    samples = size // (3 * 16 * 16 * 4)
    header = npy_bytes(repr({"descr": "<f4", "fortran_order": False, "shape": (samples, 3, 16, 16)}), b"")
    stream = _zeros_stream(size)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    body = head + stream
    crc = _zeros_crc(size, zlib.crc32(header))
    declared = len(header) + size
    if rng.random() < 0.3:
        declared = rng.choice([len(header) + 1024, 2**40])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", allowZip64=True) as archive:
        info = zipfile.ZipInfo("x.npy", date_time=(2020, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size, info.compress_size, info.CRC = declared, len(body), crc
        archive.fp.write(info.FileHeader(zip64=True))  # type: ignore[union-attr]
        info.header_offset = archive.start_dir
        archive.fp.write(body)  # type: ignore[union-attr]
        archive.start_dir = archive.fp.tell()  # type: ignore[union-attr]
        archive.filelist.append(info)
        archive.NameToInfo[info.filename] = info
    notes.append(f"npz bomb: {size >> 20} MiB of zeros in {len(body)} bytes, declared {declared}")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- dispatch

Mutator = Callable[[random.Random, bytes, list[str]], bytes]
MUTATORS: dict[str, Mutator] = {
    "torch-zip": mutate_zip, "torchscript": mutate_zip, "keras-zip": mutate_zip, "npz": mutate_zip,
    "torch-pickle": mutate_legacy, "safetensors": mutate_safetensors, "onnx": mutate_onnx, "caffemodel": mutate_proto,
    "prototxt": mutate_text, "hdf5": mutate_hdf5, "npy": mutate_npy, "bytes": mutate_bytes,
}


def _mutate(mutator: Mutator, rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    """One mutation; a document nested too deeply for the mutator's own parser gets byte edits instead."""
    try:
        return mutator(rng, data, notes)
    except RecursionError:
        return mutate_bytes(rng, data, notes)


def generate(seed: int, role: str = "lint", marker_dir: Path | None = None) -> FuzzInput:
    """The input for `seed`: same seed, same bytes. `marker_dir` is where hostile payloads would write."""
    rng = random.Random(f"{role}:{seed}")
    notes: list[str] = []
    if role == "data":
        return _generate_data(seed, rng, notes)
    if marker_dir is not None and rng.random() < 0.08:
        name, data = _hostile_seed(rng, marker_dir)
    else:
        name, data = _pick(rng, "lint")
    kind = _kind(name, data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        data = _mutate(MUTATORS[kind] if rng.random() < 0.9 else mutate_bytes, rng, data, notes)
    files = {name: data}
    if name.endswith(".caffemodel") and rng.random() < 0.5:  # with its deploy text, as `bnlint DIR` pairs them
        text = (FIXTURES / "caffe" / "caffe_convnet.prototxt").read_bytes()
        files[Path(name).stem + ".prototxt"] = mutate_text(rng, text, notes) if rng.random() < 0.5 else text
        return FuzzInput(seed, role, kind, name, files, ".", notes)
    return FuzzInput(seed, role, kind, name, files, name, notes)


def _generate_data(seed: int, rng: random.Random, notes: list[str]) -> FuzzInput:
    if rng.random() < 0.04:
        return FuzzInput(seed, "data", "npz", "bomb.npz", {"bomb.npz": npz_bomb(rng, notes)}, "bomb.npz", notes)
    name, data = _pick(rng, "data")
    kind = _kind(name, data)
    for _ in range(rng.choice([1, 1, 2])):
        data = _mutate(MUTATORS[kind] if rng.random() < 0.9 else mutate_bytes, rng, data, notes)
    if name.startswith("part-") and rng.random() < 0.5:  # a folder of shards, one of them mutated
        files = {f"shards/{p.name}": p.read_bytes() for p in sorted((FIXTURES / "data" / "convnet_shards").iterdir())}
        files[f"shards/{name}"] = data
        return FuzzInput(seed, "data", kind, name, files, "shards", notes)
    return FuzzInput(seed, "data", kind, name, {name: data}, name, notes)


def data_args(seed: int) -> tuple[str, ...]:
    """The healthy model (and --arch) a data input is run against."""
    return DATA_MODELS[seed % len(DATA_MODELS)]
