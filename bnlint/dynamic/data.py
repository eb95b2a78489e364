"""The --data sample: .npz, .npy or a folder of .npy/.npz shards, streamed batch by batch.

Arrays are never unpickled: object dtypes are refused, and headers are parsed by `_read_header`
(public numpy API only, `ast.literal_eval`, never code). C-ordered arrays (nearly all) are read
sequentially from the .npy bytes (inside the .npz zip too, compressed or not), one batch at a
time, so memory stays flat however large the sample is; a Fortran-ordered .npy is memory-mapped,
a Fortran-ordered .npz member is read whole (capped).

Bounds, checked before anything is allocated or inflated: a header's shape must fit the bytes
behind it; an .npz member must be stored or deflated and not encrypted, and a deflated member
over NPZ_RATIO_FLOOR bytes declaring more than NPZ_RATIO times its compressed size is refused
as a decompression bomb; at most `max_samples` samples are read (the analysis notes the cap).
Every problem, a bad CRC found at a member's end included, is a one-line DataError(path, problem).
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Mapping, Sequence

import numpy as np

from bnlint.errors import DataError
from bnlint.fileio import open_regular
from bnlint.loaders.zip_members import ZIP_ERRORS, describe, member_problem, ratio_problem

# When a model has one input and the file several arrays, these names are taken as the input.
INPUT_NAMES = ("x", "input", "inputs", "data", "images", "image", "features", "X")


@dataclass(frozen=True)
class _Member:
    """One stored array: a .npy file, or one .npy inside an .npz."""

    path: str
    member: str | None  # name inside the zip, None for a plain .npy
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # where the data starts in a plain .npy

    @property
    def label(self) -> str:
        return self.path if self.member is None else f"{self.path}[{self.member[:-4]}]"

    @contextlib.contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        """A stream positioned at the first data byte; closes the zip archive too.

        Any zip error while the stream is read (a bad CRC surfaces at the member's end) is a DataError.
        """
        with contextlib.ExitStack() as stack:
            try:
                if self.member is None:
                    handle: IO[bytes] = stack.enter_context(open(self.path, "rb"))
                    handle.seek(self.offset)
                else:
                    archive = stack.enter_context(zipfile.ZipFile(self.path))
                    handle = stack.enter_context(archive.open(self.member))
                    _read_header(handle, self.label)
                yield handle
            except ZIP_ERRORS as exc:
                raise DataError(self.path, _read_problem(self.member, exc)) from None

    def read_fortran(self) -> np.ndarray:
        """The whole array, for Fortran order (which cannot be read sample by sample from a stream).

        A plain .npy is memory-mapped (its size was checked against the header's shape); inside
        an .npz the member is inflated into one array, so its size is capped.
        """
        if self.shape[0] == 0:
            return np.empty(self.shape, dtype=self.dtype)
        if self.member is None:
            try:
                return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape, order="F")
            except (OSError, ValueError) as exc:
                raise DataError(self.path, f"cannot map the array: {exc}") from None
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        if nbytes > MAX_FORTRAN_BYTES:
            raise DataError(self.label, f"a Fortran-ordered array inside an .npz is read whole, and this one holds {nbytes} bytes "
                            f"(at most {MAX_FORTRAN_BYTES}); save it C-ordered (np.ascontiguousarray) or as a plain .npy")
        array = np.empty(self.shape[::-1], dtype=self.dtype)  # C order of the reversed shape = Fortran order of the shape
        with self.open() as handle:
            if _read_into(handle, array) != nbytes:
                raise DataError(self.label, f"array is truncated (its header declares shape {self.shape})")
        return array.T


NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER = 100_000  # numpy's own reader refuses headers above 10,000 bytes by default
MAX_NPY_DIMS = 32
MAX_NPZ_MEMBERS = 10_000
# A deflated .npz member above NPZ_RATIO_FLOOR bytes that declares more than NPZ_RATIO times its
# compressed size is refused before inflating: real samples compress a few times, a bomb of zeros
# ~1000x. np.savez (uncompressed) is never refused this way.
NPZ_RATIO = 200
NPZ_RATIO_FLOOR = 16 << 20
MAX_FORTRAN_BYTES = 1 << 30


def _read_problem(member: str | None, exc: BaseException) -> str:
    where = f"member {member} of the .npz archive" if member else "the array"
    return f"cannot read {where} ({describe(exc)})"


def _read_header(handle: IO[bytes], path: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy header, versions 1.0 to 3.0, read with public API only.

    The header is a Python dict literal; it is parsed with `ast.literal_eval` (never evaluated
    as code) after a size check, and every field is validated before anything is allocated.
    """
    magic = handle.read(8)
    if len(magic) != 8 or not magic.startswith(NPY_MAGIC):
        raise DataError(path, "not a valid .npy array (no NUMPY magic)")
    major = magic[6]
    if major not in (1, 2, 3):
        raise DataError(path, f"not a valid .npy array (unknown format version {major}.{magic[7]})")
    size_bytes = 2 if major == 1 else 4
    raw_size = handle.read(size_bytes)
    if len(raw_size) != size_bytes:
        raise DataError(path, "not a valid .npy array (truncated header)")
    size = int.from_bytes(raw_size, "little")
    if size > MAX_NPY_HEADER:
        raise DataError(path, f"not a valid .npy array (header of {size} bytes)")
    raw = handle.read(size)
    if len(raw) != size:
        raise DataError(path, "not a valid .npy array (truncated header)")
    try:
        header = ast.literal_eval(raw.decode("utf-8" if major == 3 else "latin-1"))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError, TypeError):
        raise DataError(path, "not a valid .npy array (unreadable header)") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise DataError(path, "not a valid .npy array (header is not {descr, fortran_order, shape})")
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise DataError(path, f"not a valid .npy array (bad shape {_clip(shape)})")
    if len(shape) > MAX_NPY_DIMS:
        raise DataError(path, f"not a valid .npy array ({len(shape)} dimensions, at most {MAX_NPY_DIMS})")
    if not isinstance(fortran, bool):
        raise DataError(path, "not a valid .npy array (fortran_order is not a bool)")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise DataError(path, f"not a valid .npy array (dtype {_clip(header['descr'])}: {_clip(exc)})") from None
    return tuple(shape), fortran, np.dtype(dtype)


def _clip(value: object) -> str:
    """A value from the file, repr'd and cut short (repr of a huge int would itself be slow)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"
    if isinstance(value, tuple) and any(isinstance(v, int) and v.bit_length() > 64 for v in value):
        return "(<integers over 64 bits>)"
    text = repr(value) if not isinstance(value, BaseException) else (str(value).splitlines() or [""])[0]
    return text[:80] + ("..." if len(text) > 80 else "")


def _check_size(label: str, shape: tuple[int, ...], dtype: np.dtype, available: int) -> None:
    """The header's shape must fit the bytes that follow it: checked before anything is allocated."""
    needed = math.prod(shape) * dtype.itemsize
    if needed > available:
        raise DataError(label, f"array is truncated: shape {_clip(shape)} of {dtype} needs {needed} bytes, "
                        f"the file holds {max(available, 0)}")


def _npy_member(path: str) -> _Member:
    try:
        with open_regular(path) as handle:
            shape, fortran, dtype = _read_header(handle, path)
            offset = handle.tell()
            size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
    _check_size(path, shape, dtype, size - offset)
    return _Member(path, None, shape, dtype, fortran, offset)


def _npz_members(path: str) -> dict[str, _Member]:
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except ZIP_ERRORS as exc:
        raise DataError(path, f"not a valid .npz archive ({describe(exc)})") from None
    members: dict[str, _Member] = {}
    with archive:
        infos = [info for info in archive.infolist() if info.filename.endswith(".npy")]
        if len(infos) > MAX_NPZ_MEMBERS:
            raise DataError(path, f"the .npz archive holds {len(infos)} arrays (at most {MAX_NPZ_MEMBERS})")
        for info in infos:
            name = info.filename
            label = f"{path}[{name[:-4]}]"
            problem = member_problem(info) or ratio_problem(info, NPZ_RATIO, NPZ_RATIO_FLOOR)
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                problem = f"zip member {name} is stored but declares {info.file_size} bytes in {info.compress_size}"
            if problem:
                raise DataError(path, problem + ("; save the sample with np.savez (uncompressed)" if "bomb" in problem else ""))
            try:
                with archive.open(info) as stream:
                    shape, fortran, dtype = _read_header(stream, label)
                    header_size = stream.tell()
            except ZIP_ERRORS as exc:
                raise DataError(path, _read_problem(name, exc)) from None
            _check_size(label, shape, dtype, info.file_size - header_size)
            members[name[:-4]] = _Member(path, name, shape, dtype, fortran, 0)
    if not members:
        raise DataError(path, "the .npz archive holds no arrays")
    return members


class ArraySource:
    """One named array, possibly split over shards along the sample axis, read in batches."""

    def __init__(self, key: str, members: Sequence[_Member], where: str, max_samples: int | None = None) -> None:
        self.key = key
        self.members = list(members)
        self.where = where
        first = members[0]
        for member in members:
            self._check(member)
            if member.shape[1:] != first.shape[1:]:
                raise DataError(member.path, f"array '{key}' has per-sample shape {_clip(member.shape[1:])} "
                                f"but the first shard has {_clip(first.shape[1:])}")
        self.stored = sum(m.shape[0] for m in members)  # samples in the file(s)
        self.samples = self.stored if max_samples is None else min(self.stored, max_samples)  # samples read
        self.sample_shape = first.shape[1:]
        self.dtype = first.dtype.newbyteorder("=")  # batches come in native byte order
        if self.samples == 0:
            raise DataError(where, f"array '{key}' is empty (shape {_shape(first.shape, 0)})")

    def _check(self, member: _Member) -> None:
        label = f"array '{self.key}'"
        if member.dtype.hasobject or member.dtype.kind not in "biuf":
            kind = "object (would need pickle)" if member.dtype.hasobject else str(member.dtype)
            raise DataError(member.path, f"{label} has non-numeric dtype {kind}; bnlint needs numbers (int, float or bool)")
        if not member.shape:
            raise DataError(member.path, f"{label} is a scalar; expected samples along the first axis")
        if any(d == 0 for d in member.shape[1:]):
            raise DataError(member.path, f"{label} is empty (shape {_clip(member.shape)})")

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Consecutive batches of `batch_size` samples (the last may be short), checked for NaN/Inf."""
        total = self.samples if limit is None else min(limit, self.samples)
        pending: list[np.ndarray] = []
        held = done = 0
        for member in self.members:
            for chunk in self._read(member, batch_size):
                chunk = chunk[: total - done - held]
                if chunk.shape[0] == 0:
                    break
                pending.append(chunk)
                held += chunk.shape[0]
                while held >= batch_size or (held and done + held >= total):
                    batch, pending, held = _split(pending, held, batch_size)
                    self._check_finite(batch, done)
                    done += batch.shape[0]
                    yield batch
            if done + held >= total:
                break

    def _read(self, member: _Member, batch_size: int) -> Iterator[np.ndarray]:
        rows = member.shape[0]
        native = member.dtype.newbyteorder("=")  # runners (torch.from_numpy) take native byte order only
        if member.fortran and len(member.shape) > 1:
            array = member.read_fortran()  # Fortran order cannot be read sample by sample from the bytes
            for start in range(0, rows, batch_size):
                yield np.ascontiguousarray(array[start : start + batch_size], dtype=native)
            return
        per_sample = math.prod(member.shape[1:]) * member.dtype.itemsize
        with member.open() as handle:
            for start in range(0, rows, batch_size):
                count = min(batch_size, rows - start)
                batch = np.empty((count, *member.shape[1:]), dtype=member.dtype)  # writable, unlike frombuffer(bytes)
                if _read_into(handle, batch) != count * per_sample:
                    raise DataError(member.path, f"array '{self.key}' is truncated (expected {rows} samples)")
                yield batch if member.dtype.isnative else batch.astype(native)

    def _check_finite(self, batch: np.ndarray, start: int) -> None:
        if batch.dtype.kind != "f":
            return
        finite = np.isfinite(batch.reshape(batch.shape[0], -1)).all(axis=1)
        if not finite.all():
            index = int(np.argmin(finite))
            bad = "NaN" if np.isnan(batch[index]).any() else "Inf"
            raise DataError(self.where, f"array '{self.key}' holds {bad} at sample {start + index}; drop or repair those samples")


def _read_into(handle: IO[bytes], array: np.ndarray) -> int:
    """Fill a C-contiguous array from the stream; returns the bytes read (short on truncation)."""
    view = array.reshape(-1).view(np.uint8).data
    done = 0
    while done < len(view):
        chunk = handle.read(min(len(view) - done, 1 << 24))
        if not chunk:
            break
        view[done:done + len(chunk)] = chunk
        done += len(chunk)
    return done


def _split(pending: list[np.ndarray], held: int, size: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
    batch, rest = joined[:size], joined[size:]
    return batch, ([rest] if rest.shape[0] else []), held - batch.shape[0]


def _shape(shape: tuple[int, ...], samples: int | str) -> str:
    return "(" + ", ".join([str(samples), *(str(d) for d in shape[1:])]) + ")"


class Dataset:
    """Every array of a --data path, by key; shards of a folder are concatenated per key.

    With `max_samples`, at most that many samples of each array are read (the first ones); `select`
    leaves a note in `notes` when the cap cuts the arrays it chose.
    """

    def __init__(self, path: str | os.PathLike[str], max_samples: int | None = None) -> None:
        self.path = os.fspath(path)
        self.notes: list[str] = []
        folder = Path(self.path)
        if folder.is_dir():
            # shards are regular files: a named pipe or device among them is never opened
            files = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
            if not files:
                raise DataError(self.path, "folder holds no .npy or .npz shards")
            kinds = {p.suffix for p in files}
            if len(kinds) > 1:
                raise DataError(self.path, "folder mixes .npy and .npz shards; use one kind")
            shards = [self._members(str(p)) for p in files]
            keys = list(shards[0])
            for file, shard in zip(files, shards):
                if list(shard) != keys:
                    raise DataError(str(file), f"shard holds arrays {sorted(shard)} but the first shard holds {sorted(keys)}")
            self.sources = {k: ArraySource(k, [s[k] for s in shards], self.path, max_samples) for k in keys}
        else:
            if not folder.exists():
                raise DataError(self.path, "no such file or folder")
            members = self._members(self.path)
            self.sources = {k: ArraySource(k, [m], self.path, max_samples) for k, m in members.items()}

    @staticmethod
    def _members(path: str) -> dict[str, _Member]:
        if path.endswith(".npy"):
            return {"x": _npy_member(path)}
        if path.endswith(".npz"):
            try:
                open_regular(path).close()  # zipfile would wait on a named pipe forever
            except FileNotFoundError:
                raise DataError(path, "no such file") from None
            except OSError as exc:
                raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
            return _npz_members(path)
        raise DataError(path, "unsupported data file (expected .npz, .npy or a folder of them)")

    def select(self, model_inputs: Sequence[str], mapping: Mapping[str, str]) -> list[ArraySource]:
        """The arrays that feed the model's inputs, in the model's order."""
        unknown = [name for name in mapping if name not in model_inputs]
        if unknown and model_inputs:
            raise DataError(self.path, f"--input names {', '.join(unknown)} but the model's inputs are {', '.join(model_inputs)}")
        keys = list(self.sources)
        chosen: list[ArraySource] = []
        for name in model_inputs:
            key = mapping.get(name) or self._guess(name, len(model_inputs))
            if key not in self.sources:
                raise DataError(self.path, f"no array '{key}' for model input '{name}' (arrays: {', '.join(keys)}); map one with --input {name}=KEY")
            chosen.append(self.sources[key])
        lengths = {s.key: s.stored for s in chosen}
        if len(set(lengths.values())) > 1:
            raise DataError(self.path, "model inputs have different sample counts: " + ", ".join(f"'{k}' {n}" for k, n in lengths.items()))
        if chosen and chosen[0].samples < chosen[0].stored:
            self.notes.append(f"read the first {chosen[0].samples} of {chosen[0].stored} samples in {self.path} "
                              "(max-samples in [tool.bnlint.dynamic])")
        return chosen

    def _guess(self, name: str, inputs: int) -> str:
        if name in self.sources:
            return name
        if len(self.sources) == 1:
            return next(iter(self.sources))
        if inputs == 1:
            common = [k for k in INPUT_NAMES if k in self.sources]
            if len(common) == 1:
                return common[0]
        raise DataError(self.path, f"cannot tell which array feeds model input '{name}' (arrays: {', '.join(self.sources)}); say --input {name}=KEY")


def check_layout(source: ArraySource, expected: Sequence[int | None] | None, input_name: str, where: str) -> None:
    """Compare an array's per-sample shape with what the model input expects (None = any size)."""
    if expected is None:
        return
    got = source.sample_shape
    if len(got) == len(expected) and _fits(got, expected):
        return
    want = _shape((0, *[("?" if e is None else e) for e in expected]), "N")  # type: ignore[arg-type]
    have = _shape((0, *got), "N")
    hint = ""
    if len(got) == len(expected) >= 2 and _fits(got, (*expected[1:], expected[0])):
        hint = " (the data looks channels-last, NHWC; the model expects channels-first, NCHW: np.moveaxis(x, -1, 1))"
    elif len(got) == len(expected) >= 2 and _fits(got, (expected[-1], *expected[:-1])):
        hint = " (the data looks channels-first, NCHW; the model expects channels-last, NHWC: np.moveaxis(x, 1, -1))"
    raise DataError(where, f"array '{source.key}' has shape {have} but model input '{input_name}' expects {want}{hint}")


def _fits(got: Sequence[int], expected: Sequence[int | None]) -> bool:
    return all(e is None or e == g for e, g in zip(expected, got))


def zip_batches(sources: Sequence[ArraySource], batch_size: int, limit: int | None = None) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(first sample index, one batch per source) in lockstep."""
    start = 0
    for batch in zip(*(s.batches(batch_size, limit) for s in sources)):
        yield start, list(batch)
        start += batch[0].shape[0]
