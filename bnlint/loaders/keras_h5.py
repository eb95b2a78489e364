"""The HDF5 side of the Keras reader: an owner that keeps the file open, lazy dataset tensors, and
safe access to the two weight layouts Keras writes.

h5py is imported only when a file is opened (importing this module stays cheap). Files are
opened read-only; soft and external links, external and virtual datasets are refused (an HDF5
file must not make us read another file), and a dataset whose declared size dwarfs the bytes it
stores (a shape bomb) is refused before it is read. Every h5py failure becomes an InputError.

Layouts (checked on files written by Keras 3.15):
- Keras 3 (`model.weights.h5` inside a `.keras` zip, or `*.weights.h5`): one group per saveable,
  `<path>/vars/<i>` with i = 0, 1, ... in `Layer.save_own_variables` order; recent Keras 3
  puts the layer's name in the `vars` group's `name` attribute (saving_lib `_save_state`).
- legacy (`legacy_h5_format.py`, tf.keras 2 `hdf5_format.py`): `layer_names` on the weights
  root, one group per top-level layer with attribute `weight_names` (split into `weight_names0`,
  `weight_names1`, ... when longer than 64 KiB), each dataset at `<group>/<weight name>`.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Protocol

import numpy as np

from bnlint.errors import InputError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# What h5py raises for a corrupt or hostile file (it maps HDF5's error stack onto these).
H5_ERRORS: tuple[type[BaseException], ...] = (OSError, KeyError, ValueError, TypeError, RuntimeError, LookupError, ArithmeticError)
ATTR_LIMIT = 64 << 20  # a model_config attribute larger than this is refused, like config.json
MAX_NAMES = 1_000_000
MAX_GROUPS = 1_000_000
# Shape bombs: as Keras's own loader (saving_lib safe_get_h5_dataset), above a floor the declared
# size may exceed the stored bytes at most this many times (compression of real weights is ~2-10x).
_BOMB_FLOOR = 1 << 30
_BOMB_EXPANSION = 1000


class Closeable(Protocol):
    def close(self) -> None: ...


class H5Owner:
    """Keeps one h5py.File, and the file objects under it, open while tensors read from it live.

    Why: rules read only the tensors they need, after `read_keras` has returned, so the HDF5
    file cannot be closed when parsing ends. Every H5Tensor holds its owner; `close()` (called by
    `KerasFile.close()` / leaving `with read_keras(p) as kf:`) releases the file and its handles
    at once, after which a tensor's `numpy()` raises InputError. Without `close()` the file is
    released when the last KerasFile and tensor referring to it are garbage-collected.
    """

    def __init__(self, path: str, file: Any, handles: tuple[Closeable, ...] = ()) -> None:
        self.path = path
        self.file = file  # h5py.File (typed Any: h5py ships no type information)
        self._handles = handles
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.file.close()
        finally:
            for handle in self._handles:
                handle.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finaliser (e.g. at interpreter exit)
            self.close()


class H5Tensor:
    """A TensorRef over one HDF5 dataset: shape and dtype now (object header only), values on `numpy()`."""

    __slots__ = ("_bfloat16", "_dataset", "_dtype", "_label", "_owner", "_shape")

    def __init__(self, owner: H5Owner, dataset: Any, label: str) -> None:
        self._owner = owner
        self._dataset = dataset
        self._label = label
        self._shape = tuple(int(n) for n in dataset.shape)
        self._bfloat16 = dataset.dtype.kind == "V" and dataset.dtype.itemsize == 2 and _attr_is(dataset, "dtype", "bfloat16")
        self._dtype = "bfloat16" if self._bfloat16 else dataset.dtype.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def label(self) -> str:
        """Where the values live: the dataset's path in the HDF5 file."""
        return self._label

    def numpy(self) -> np.ndarray:
        """Read the values now (bfloat16, which Keras stores as 2-byte opaque data, comes back as float32)."""
        owner = self._owner
        if owner.closed:
            raise InputError(owner.path, f"{self._label}: the file was closed before this tensor was read")
        try:
            declared = math.prod(self._shape) * self._dataset.dtype.itemsize
            stored = self._dataset.id.get_storage_size()
            if declared > _BOMB_FLOOR and declared > _BOMB_EXPANSION * max(stored, 1):
                raise InputError(owner.path, f"{self._label} declares {declared} bytes but stores {stored}: refused")
            raw = self._dataset[()]
        except InputError:
            raise
        except H5_ERRORS as exc:
            raise InputError(owner.path, f"cannot read {self._label}: {_one_line(exc)}") from None
        array = np.asarray(raw)
        if self._bfloat16:
            bits = np.frombuffer(array.tobytes(), dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self._shape)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        return array


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _attr_is(obj: Any, name: str, value: str) -> bool:
    import h5py

    try:
        if name not in obj.attrs or obj.attrs.get_id(name).get_type().get_class() != h5py.h5t.STRING:
            return False  # checked before h5py converts it: see _require_string_type
        found = obj.attrs[name]
    except H5_ERRORS:
        return False
    if isinstance(found, bytes):
        found = found.decode("utf-8", "replace")
    return bool(found == value)


def open_h5(path: str, fileobj: io.IOBase | None = None, handles: tuple[Closeable, ...] = ()) -> H5Owner:
    """Open an HDF5 file (a path, or a seekable file object over a zip member) read-only."""
    import h5py

    try:
        # The library's default locking: HDF5 refuses to open one file twice in a process with
        # different locking flags, so anything else would break a caller who also has it open.
        file = h5py.File(fileobj if fileobj is not None else path, "r")
    except H5_ERRORS as exc:
        for handle in handles:
            handle.close()
        raise InputError(path, f"not a readable HDF5 file ({_one_line(exc)})") from None
    return H5Owner(path, file, handles)


def child(owner: H5Owner, group: Any, name: str) -> Any | None:
    """group[name] for a relative path, None when absent; refuses soft/external links on the way."""
    import h5py

    if not name or name.startswith("/") or ".." in name.split("/"):
        return None
    current = group
    for part in name.split("/"):
        if not part:
            return None
        if not isinstance(current, h5py.Group):
            return None
        link = current.get(part, default=None, getclass=True, getlink=True)
        if link is None:
            return None
        if link in (h5py.SoftLink, h5py.ExternalLink):
            raise InputError(owner.path, f"HDF5 {link.__name__} at {current.name}/{part}: refused")
        current = current[part]
    return current


class UnreadableTensor:
    """A variable Keras would read but bnlint cannot judge as numbers: why, in one line. Loaders put
    it where the tensor would be so that the layer records the reason (`BNLayer.unchecked`) instead
    of silently missing a statistic; `numpy()` is never meant to be called."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    @property
    def shape(self) -> tuple[int, ...]:
        return ()

    @property
    def dtype(self) -> str:
        return "unreadable"

    def numpy(self) -> np.ndarray:
        raise ValueError(self.reason)


def _dtype_problem(dtype: Any) -> str | None:
    """What an HDF5 dataset's type is when it is not plain numbers (None when it is)."""
    import h5py

    if dtype.fields is not None:
        return "a compound (record) dataset"
    if h5py.check_string_dtype(dtype) is not None or dtype.kind in "SU":
        return "a string dataset"
    if h5py.check_ref_dtype(dtype) is not None:
        return "an object-reference dataset"
    if h5py.check_vlen_dtype(dtype) is not None or dtype.kind == "O":
        return "a variable-length dataset"
    if dtype.kind == "c":
        return "a complex-number dataset"
    if dtype.kind in "fiub" or (dtype.kind == "V" and dtype.itemsize == 2):
        return None
    return f"a dataset of type {dtype.str!r}"


def tensor_or_problem(owner: H5Owner, group: Any, name: str) -> H5Tensor | str:
    """A lazy tensor for the dataset group/name, or why there is none (absent, a group, not numbers)."""
    import h5py

    node = child(owner, group, name)
    if node is None:
        return f"{name!r}: no such dataset"
    if not isinstance(node, h5py.Dataset):
        return f"{node.name}: a group, not a dataset"
    if node.external:
        raise InputError(owner.path, f"{node.name} is an external dataset (data in another file): refused")
    if node.is_virtual:
        raise InputError(owner.path, f"{node.name} is a virtual dataset (data in other files): refused")
    problem = _dtype_problem(node.dtype)
    if problem is not None:
        return f"{node.name}: {problem}, not numbers"
    return H5Tensor(owner, node, str(node.name))


def dataset_ref(owner: H5Owner, group: Any, name: str) -> H5Tensor | None:
    """A lazy tensor for the dataset group/name; None if absent or not numeric data."""
    found = tensor_or_problem(owner, group, name)
    return found if isinstance(found, H5Tensor) else None


def read_text_attr(owner: H5Owner, obj: Any, name: str) -> str | None:
    """A string attribute (h5py gives str, bytes or a one-element array, depending on the writer)."""
    try:
        if name not in obj.attrs:
            return None
        attr_id = obj.attrs.get_id(name)
        _require_string_type(owner, attr_id, name)
        if attr_id.get_storage_size() > ATTR_LIMIT:
            raise InputError(owner.path, f"attribute {name} is larger than {ATTR_LIMIT} bytes")
        value = obj.attrs[name]
    except InputError:
        raise
    except H5_ERRORS as exc:
        raise InputError(owner.path, f"cannot read attribute {name}: {_one_line(exc)}") from None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(owner.path, f"attribute {name} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise InputError(owner.path, f"attribute {name} is not text")
    if len(value) > ATTR_LIMIT:
        raise InputError(owner.path, f"attribute {name} is larger than {ATTR_LIMIT} bytes")
    return value


def _require_string_type(owner: H5Owner, attr_id: Any, name: str) -> None:
    """Check an attribute's HDF5 type before h5py converts it: a corrupt file can declare a
    variable-length *sequence* where Keras wrote a string, and libhdf5 2.0 crashes the process
    converting it (found by fuzzing). Keras only ever writes strings, fixed or variable length."""
    import h5py

    kind = attr_id.get_type()
    if kind.get_class() != h5py.h5t.STRING or kind.get_cset() not in (h5py.h5t.CSET_ASCII, h5py.h5t.CSET_UTF8):
        raise InputError(owner.path, f"attribute {name} is not text")


def read_name_list(owner: H5Owner, obj: Any, name: str) -> list[str] | None:
    """`layer_names` / `weight_names`, joined from `name0`, `name1`, ... when Keras split them
    (legacy_h5_format.load_attributes_from_hdf5_group). None when the attribute is absent."""
    try:
        attrs = obj.attrs
        if name in attrs:
            keys = [name]
        elif f"{name}0" in attrs:
            keys = []
            while f"{name}{len(keys)}" in attrs and len(keys) < 10_000:
                keys.append(f"{name}{len(keys)}")
        else:
            return None
        chunks = []
        for key in keys:
            attr_id = attrs.get_id(key)
            if attr_id.shape is not None and 0 in attr_id.shape:
                continue  # Keras writes an empty list (as float64[0]) for a layer without weights
            _require_string_type(owner, attr_id, key)
            chunks.append(attrs[key])
    except H5_ERRORS as exc:
        raise InputError(owner.path, f"cannot read attribute {name}: {_one_line(exc)}") from None
    names: list[str] = []
    for chunk in chunks:
        for item in np.asarray(chunk).reshape(-1):
            if isinstance(item, (bytes, np.bytes_)):
                item = bytes(item).decode("utf-8", "replace")
            if not isinstance(item, str):
                raise InputError(owner.path, f"attribute {name} is not a list of names")
            names.append(item)
            if len(names) > MAX_NAMES:
                raise InputError(owner.path, f"attribute {name} lists more than {MAX_NAMES} names")
    return names


def v3_vars(owner: H5Owner, group_path: str) -> tuple[list[H5Tensor | str], str | None, bool] | None:
    """The variables saved for one Keras 3 saveable: (tensors in index order, or why one is not
    numbers; the `name` attribute of its vars group or None; whether the indices were exactly
    0..n-1). None when there is no `<group_path>/vars` group."""
    import h5py

    vars_group = child(owner, owner.file, f"{group_path}/vars" if group_path else "vars")
    if not isinstance(vars_group, h5py.Group):
        return None
    name = read_text_attr(owner, vars_group, "name") if "name" in vars_group.attrs else None
    keys = list(vars_group.keys())
    numeric = sorted(int(k) for k in keys if k.isdigit() and len(k) < 8)
    tensors = [tensor_or_problem(owner, vars_group, str(index)) for index in numeric]
    return tensors, name, numeric == list(range(len(keys)))


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)


def _natural(key: str) -> tuple[str, int]:
    """'batch_normalization_10' after '_9': (class part, per-class counter) as Keras numbered them."""
    base, _, number = key.rpartition("_")
    return (base, int(number)) if base and number.isdigit() else (key, 0)


# Root groups of a Keras 3 weights file that hold no layer (a compiled model's state).
_NOT_LAYERS = frozenset({"optimizer", "compile_metrics", "compile_loss", "loss_tracker", "metrics", "_tracker"})


def _saveable_children(owner: H5Owner, group_path: str) -> list[tuple[str, bool]]:
    """Child saveables of a Keras 3 group, as (path, whether Keras named it by class): a model's
    layers `<g>/layers/<snake_case class>[_N]` (tf.keras 2.13 wrote `_layer_checkpoint_dependencies`),
    and attribute-named children `<g>/<attribute>` (a wrapper's `layer`, a subclassed model's
    or custom layer's sublayers: saving_lib walks attributes by name)."""
    import h5py

    group = child(owner, owner.file, group_path) if group_path else owner.file
    if not isinstance(group, h5py.Group):
        return []
    paths: list[tuple[str, bool]] = []
    for key in sorted(group, key=_natural):
        if key == "vars" or (not group_path and key in _NOT_LAYERS):
            continue
        node = child(owner, group, key)
        if not isinstance(node, h5py.Group):
            continue
        if key in ("layers", "_layer_checkpoint_dependencies"):
            paths += [(_join(group_path, key, sub), True) for sub in sorted(node, key=_natural)]
        else:
            paths.append((_join(group_path, key), False))
    return paths


def v3_groups(owner: H5Owner, root: str = "", root_name: str = "",
              skip: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, str, str, str | None, bool]]:
    """Every saveable group under `root` (the whole model by default), depth first, as
    (h5 group path, name path, parent name path, the vars `name` attribute, whether the group
    key is a snake-case class name). Names come from the `name` attributes when the writer
    stored them, else from the group keys. Order: the file's group order (alphabetical, with
    Keras's per-class counters in numeric order), not execution order. Groups in `skip` are
    left out with everything under them."""
    import h5py

    found: list[tuple[str, str, str, str | None, bool]] = []
    stack = [(path, root_name, by_class) for path, by_class in reversed(_saveable_children(owner, root))]
    while stack:
        if len(found) + len(stack) > MAX_GROUPS:
            raise InputError(owner.path, f"more than {MAX_GROUPS} weight groups")
        group_path, parent, by_class = stack.pop()
        if group_path in skip:
            continue  # already accounted for (a layer of the config), with everything under it
        vars_group = child(owner, owner.file, _join(group_path, "vars"))
        name = None
        if isinstance(vars_group, h5py.Group) and "name" in vars_group.attrs:
            name = read_text_attr(owner, vars_group, "name")
        name_path = _join(parent, name or group_path.rsplit("/", 1)[-1])
        found.append((group_path, name_path, parent, name, by_class))
        stack.extend((path, name_path, cls) for path, cls in reversed(_saveable_children(owner, group_path)))
    return found


def legacy_groups(owner: H5Owner, root: Any) -> list[tuple[str, list[tuple[str, H5Tensor | str]]]]:
    """Legacy weights: [(top-level layer name, [(weight name, tensor or why not), ...]), ...] in
    `layer_names` order (model.layers order when saved), each layer's weights in `weight_names`
    order: the order Keras assigns them in (legacy_h5_format.load_weights_from_hdf5_group)."""
    import h5py

    layer_names = read_name_list(owner, root, "layer_names")
    if layer_names is None:
        raise InputError(owner.path, "legacy Keras weights without a layer_names attribute")
    result: list[tuple[str, list[tuple[str, H5Tensor | str]]]] = []
    for layer_name in layer_names:
        group = child(owner, root, layer_name)
        if not isinstance(group, h5py.Group):
            result.append((layer_name, []))
            continue
        names = read_name_list(owner, group, "weight_names") or []
        result.append((layer_name, [(name, tensor_or_problem(owner, group, name)) for name in names]))
    return result


class ZipWindow(io.RawIOBase):
    """A read-only, seekable view of `length` bytes at `offset` of an open file: an uncompressed
    zip member, handed to h5py without copying it (h5py reads through the file object)."""

    def __init__(self, handle: io.BufferedReader, offset: int, length: int) -> None:
        super().__init__()
        self._handle = handle
        self._offset = offset
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._pos))
        if count == 0:
            return 0
        self._handle.seek(self._offset + self._pos)
        got = self._handle.readinto(view[:count])
        got = got or 0
        self._pos += got
        return got

    def close(self) -> None:
        super().close()
        self._handle.close()
