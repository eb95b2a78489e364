"""Read Keras model files statically: no Keras, no TensorFlow, no layer deserialised.

`read_keras(path)` reads a Keras 3 `.keras` zip, a legacy full-model `.h5`/`.hdf5`, a legacy
weights-only `.h5`, or a Keras 3 `*.weights.h5`, and returns a `KerasFile`: the layers found in
the config (or, without one, in the weights), each with its config dict and lazy tensors.

Why static: `.keras` files are untrusted input, and a `Lambda` layer's config carries marshalled
Python bytecode that `keras.saving.load_model` would run (with safe mode off). Here the config
is only parsed by `json.loads` (size- and depth-bounded), zip members are checked (count, size,
compression ratio, encryption) before a byte is read, and HDF5 is opened read-only through
`keras_h5`, which refuses links and datasets pointing at other files. Every malformed input
raises `InputError`; a readable file that is not a Keras model raises `NotAKerasModel`.

libhdf5 itself is not hardened against hostile files: fuzzing our fixtures found one-byte
corruptions that make it loop forever (a global heap object's length) or segfault (a string
datatype turned into a sequence). The second is checked before h5py converts anything; the first
cannot be, so by default the file is first read in a child process (`preflight`) and a crash or
hang there becomes an InputError (about 0.3-0.6 s per file; `isolate=False` skips it).

Cost: importing this module imports neither h5py nor torch; tensors are read only on `numpy()`.
The weights member of a `.keras` zip is stored uncompressed by Keras (ZIP_STORED), so it is read
in place through a window on the zip file (`keras_zip`); a re-compressed member is inflated to a
temporary file first (bounded, ratio-checked).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bnlint.errors import InputError, NotAModel
from bnlint.loaders import keras_config as kc
from bnlint.loaders import keras_h5 as kh
from bnlint.loaders import keras_weights as kw
from bnlint.loaders import keras_zip as kz
from bnlint.loaders.zip_members import ZIP_ERRORS, describe
from bnlint.model import TensorRef

KerasKind = Literal["keras-v3", "keras-h5", "keras-h5-weights", "keras-v3-weights"]

# Seconds the isolated read may take, plus one per PREFLIGHT_BYTES_PER_SECOND of file: ResNet-50's
# 100 MB .h5 reads in ~0.2 s, and a file on which libhdf5 loops forever must not stall a lint for long.
PREFLIGHT_TIMEOUT = 5.0
PREFLIGHT_BYTES_PER_SECOND = 64 << 20
_ERRORS: tuple[type[BaseException], ...] = (zipfile.BadZipFile, zlib.error, EOFError, RecursionError, MemoryError, *kh.H5_ERRORS)


class NotAKerasModel(NotAModel):
    """A readable file that is not a Keras model (a plain HDF5 data file, a zip without
    config.json): the pre-commit hook skips it with a note instead of failing."""


@dataclass
class KerasLayer:
    """One layer: names from the config, its own config dict, and its saved variables.

    `weights` keys: for BatchNormalization the roles `gamma`, `beta`, `moving_mean`,
    `moving_variance` (+ `moving_stddev`, `renorm_mean`, `renorm_stddev` with renorm), present
    only when the file holds them (no gamma with scale=False, no beta with center=False);
    for other layers the variable name (legacy files) or the variable index "0", "1", ...
    (Keras 3 files, which do not store variable names).
    `effective_trainable`: whether fit() changes the layer, as the Keras version that wrote the
    file does it (see `keras_config.effective_trainable`): in Keras 3 the layer's own flag.
    """

    path: str  # layer names from the config joined with "/", e.g. "backbone/bn1"
    name: str
    class_name: str  # "" when a weights-only file does not say
    module: str | None
    config: dict[str, Any]
    trainable: bool | None  # the layer's own flag
    effective_trainable: bool | None
    parent: str  # path of the enclosing (sub)model, "" at the top level
    order: int  # position in a depth-first walk of the config (execution order as saved)
    weights: dict[str, TensorRef] = field(default_factory=dict)
    # Raw JSON from the layer's entry in its model's config, next to `config` (not inside it):
    # Functional `inbound_nodes` (Keras 3: [{"args": [...keras_history...]}], tf.keras 2:
    # [[[name, node, tensor, {}]]]) and Keras 3's `build_config` ({"input_shape": [...]}).
    inbound_nodes: list[Any] = field(default_factory=list)
    build_config: dict[str, Any] | None = None
    call_training: bool | None = None  # the `training` argument its calls record (keras_config.call_training)

    @property
    def is_batchnorm(self) -> bool:
        return kc.norm_kind(self.class_name) == "bn"


@dataclass
class KerasFile:
    """What a Keras file says, read as data. Close it (or use `with`) to release the HDF5 file
    that its lazy tensors read from; see `keras_h5.H5Owner`."""

    path: str
    kind: KerasKind
    keras_version: str | None
    backend: str | None
    layers: list[KerasLayer]
    inputs: list[tuple[str, tuple[int | None, ...] | None]]
    notes: list[str]
    other_norms: list[str] = field(default_factory=list)  # LayerNormalization, Normalization, ...: not BN
    model_class: str | None = None
    model_trainable: bool | None = None
    owner: kh.H5Owner | None = field(default=None, repr=False, compare=False)

    @property
    def batchnorm_layers(self) -> list[KerasLayer]:
        return [layer for layer in self.layers if layer.is_batchnorm]

    def close(self) -> None:
        if self.owner is not None:
            self.owner.close()

    def __enter__(self) -> KerasFile:  # noqa: PYI034 - a plain dataclass, not meant to be subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_keras(path: str | os.PathLike[str], *, isolate: bool = True, timeout: float = PREFLIGHT_TIMEOUT) -> KerasFile:
    """Read a Keras model or weights file as data. Raises InputError (one line) for anything
    unreadable, NotAKerasModel for a readable file that is not Keras.

    `isolate` (default): first read the file in a child process (`preflight`), because libhdf5
    can crash or loop forever on a corrupt file (found by fuzzing: a flipped byte in a global
    heap hangs it, one in a datatype message segfaults it), and neither can be caught in-process.
    Costs about 0.3 s per file (a Python start); pass isolate=False for files you trust."""
    name = os.fspath(path)
    if isolate:
        preflight(name, timeout)
    try:
        return _read(name)
    except InputError:
        raise
    except _ERRORS as exc:  # a corrupt file that slipped past the checks: still one InputError
        text = str(exc).strip().splitlines()
        raise InputError(name, f"cannot read as a Keras file ({type(exc).__name__}: {text[0][:160] if text else ''})") from None


def _read(path: str) -> KerasFile:
    file = Path(path)
    if not file.exists():
        raise InputError(path, "no such file")
    if file.is_dir():
        raise InputError(path, "is a directory")
    kind = _sniff(path)
    if kind == "zip":
        return _read_zip(path)
    if kind == "hdf5":
        return _read_h5(path)
    if kind == "empty":
        raise InputError(path, "empty file")
    raise NotAKerasModel(path, "neither a Keras .keras zip nor an HDF5 .h5 file")


def _sniff(path: str) -> str:
    """'zip', 'hdf5', 'empty' or 'other', from the first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if not head:
                return "empty"
            if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
                return "zip"
            return "hdf5" if head == kh.HDF5_SIGNATURE or _userblock_hdf5(handle) else "other"
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None


def _userblock_hdf5(handle: Any) -> bool:
    """HDF5 may start after a user block of 512, 1024, 2048, ... bytes."""
    offset = 512
    while offset <= 1 << 20:
        handle.seek(offset)
        head = handle.read(8)
        if len(head) < 8:
            return False
        if head == kh.HDF5_SIGNATURE:
            return True
        offset *= 2
    return False


# ----------------------------------------------------------------------------- .keras zip
def _read_zip(path: str) -> KerasFile:
    try:
        archive = zipfile.ZipFile(path)
    except ZIP_ERRORS as exc:
        raise InputError(path, f"not a readable zip archive ({describe(exc)})") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > kz.MAX_MEMBERS:
            raise InputError(path, f"zip archive has {len(infos)} members (limit {kz.MAX_MEMBERS})")
        members = {info.filename: info for info in infos}
        if "config.json" not in members:
            raise NotAKerasModel(path, "a zip archive without config.json: not a Keras .keras file")
        notes: list[str] = []
        metadata: Any = {}
        if "metadata.json" in members:
            metadata = kc.parse_json(kz.member_bytes(path, archive, members["metadata.json"], kz.METADATA_LIMIT),
                                     path, "metadata.json", kz.METADATA_LIMIT)
        else:
            notes.append("no metadata.json: Keras version unknown")
        config = kc.parse_json(kz.member_bytes(path, archive, members["config.json"], kz.CONFIG_LIMIT),
                               path, "config.json", kz.CONFIG_LIMIT)
        version = metadata.get("keras_version") if isinstance(metadata, dict) else None
        version = version if isinstance(version, str) else None
        walk = kc.walk_config(config, path)
        notes += walk.notes
        if "model.weights.h5" in members:
            owner = kz.open_member_h5(path, archive, members["model.weights.h5"], notes)
        elif "model.weights.npz" in members:
            kz.npz_note(path, archive, members["model.weights.npz"], notes)
            return _assemble(path, "keras-v3", version, None, [(n, {}) for n in walk.layers], walk, notes, None)
        else:
            raise InputError(path, "no model.weights.h5 or model.weights.npz in the archive")
    try:
        pairs = kw.attach_v3(owner, walk.layers, notes) if walk.layers else kw.discover_v3(owner, notes)
        return _assemble(path, "keras-v3", version, None, pairs, walk, notes, owner)
    except BaseException:
        owner.close()
        raise


# ----------------------------------------------------------------------------- .h5
def _read_h5(path: str) -> KerasFile:
    owner = kh.open_h5(path)
    try:
        return _classify_h5(path, owner)
    except BaseException:
        owner.close()
        raise


def _classify_h5(path: str, owner: kh.H5Owner) -> KerasFile:
    import h5py

    root = owner.file
    notes: list[str] = []
    weights_root = kh.child(owner, root, "model_weights")
    version = kh.read_text_attr(owner, root, "keras_version")
    backend = kh.read_text_attr(owner, root, "backend")
    if isinstance(weights_root, h5py.Group):
        version = version or kh.read_text_attr(owner, weights_root, "keras_version")
        backend = backend or kh.read_text_attr(owner, weights_root, "backend")
    model_config = kh.read_text_attr(owner, root, "model_config")
    if model_config is not None:
        walk = kc.walk_config(kc.parse_json(model_config, path, "model_config", kh.ATTR_LIMIT), path)
        notes += walk.notes
        if version is None:
            notes.append("no keras_version attribute: written by Keras 1 (Keras's own loader assumes so too)")
        if not isinstance(weights_root, h5py.Group):
            notes.append("no model_weights group: the file holds a config without weights")
            pairs: list[tuple[kc.ConfigLayer, kw.Weights]] = [(n, {}) for n in walk.layers]
        else:
            pairs = kw.attach_legacy(owner, weights_root, walk.layers, notes)
        return _assemble(path, "keras-h5", version, backend, pairs, walk, notes, owner)
    empty = kc.WalkResult([], None, None, None, [], [])
    if kh.read_name_list(owner, root, "layer_names") is not None:
        return _assemble(path, "keras-h5-weights", version, backend, kw.discover_legacy(owner, root, notes), empty, notes, owner)
    if isinstance(weights_root, h5py.Group) and kh.read_name_list(owner, weights_root, "layer_names") is not None:
        notes.append("model_weights without model_config: read as weights only")
        pairs = kw.discover_legacy(owner, weights_root, notes)
        return _assemble(path, "keras-h5-weights", version, backend, pairs, empty, notes, owner)
    if any(isinstance(kh.child(owner, root, key), h5py.Group) for key in ("layers", "vars", "_layer_checkpoint_dependencies")):
        return _assemble(path, "keras-v3-weights", version, backend, kw.discover_v3(owner, notes), empty, notes, owner)
    raise NotAKerasModel(path, "an HDF5 file that is not a Keras model (no model_config, layer_names or layers/ group)")


# ----------------------------------------------------------------------------- assembly
def _assemble(path: str, kind: KerasKind, version: str | None, backend: str | None,
              pairs: list[tuple[kc.ConfigLayer, kw.Weights]], walk: kc.WalkResult, notes: list[str],
              owner: kh.H5Owner | None) -> KerasFile:
    parsed = kc.version_tuple(version)
    if parsed is None and kind == "keras-h5":
        parsed = (1,)  # legacy files without keras_version: Keras's loader assumes Keras 1
    layers = []
    for node, weights in pairs:
        is_bn = kc.norm_kind(node.class_name) == "bn"
        effective = kc.effective_trainable(node.trainable, node.enclosing, is_bn, parsed)
        if node.trainable is True and any(flag is False for flag in node.enclosing):
            notes.append(f"{node.path}: trainable while an enclosing model is not; Keras 3 trains it fully, "
                         "tf.keras 2 freezes its weights but a BatchNormalization still updates its statistics")
        layers.append(KerasLayer(node.path, node.name, node.class_name, node.module, node.config, node.trainable,
                                 effective, node.parent, node.order, weights, node.inbound_nodes, node.build_config,
                                 node.call_training))
    other = [layer.path for layer in layers if kc.norm_kind(layer.class_name) == "other-norm"]
    return KerasFile(path, kind, version, backend, layers, walk.inputs, notes, other, walk.model_class,
                     walk.model_trainable, owner)


# ----------------------------------------------------------------------------- isolation
_EXIT_INPUT, _EXIT_NOT_KERAS, _EXIT_TIMEOUT = 65, 66, 67
_CHILD = "from bnlint.loaders.keras_archive import _preflight_child; raise SystemExit(_preflight_child())"


def preflight(path: str, timeout: float = PREFLIGHT_TIMEOUT) -> None:
    """Read `path` (the config, every weight group, every BatchNorm tensor) in a child process,
    and turn the child's crash or hang into InputError. A file that passes is then read
    in-process: libhdf5 is deterministic, so what finished there finishes here.

    Where the OS can fork, the child is a fork of this process (a few milliseconds: numpy and
    h5py are already imported); elsewhere a fresh Python (about 0.3 s).
    """
    if not os.path.isfile(path) or _sniff(path) not in ("zip", "hdf5"):
        return  # nothing for libhdf5 to choke on (the in-process read reports it)
    timeout += os.path.getsize(path) / PREFLIGHT_BYTES_PER_SECOND
    if hasattr(os, "fork") and hasattr(os, "waitpid"):
        code, output = _forked(path, timeout)
    else:
        code, output = _spawned(path, timeout)
    if code == 0:
        return
    problem = output.strip().splitlines()[-1] if output.strip() else ""
    if code == _EXIT_NOT_KERAS:
        raise NotAKerasModel(path, problem)
    if code == _EXIT_INPUT:
        raise InputError(path, problem)
    if code == _EXIT_TIMEOUT:
        raise InputError(path, f"reading did not finish within {timeout:.1f} s in an isolated process "
                               "(libhdf5 loops forever on some corrupt files): refused")
    if code < 0:
        raise InputError(path, f"libhdf5 crashed (signal {-code}) reading this file in an isolated process: corrupt or hostile")
    raise InputError(path, f"the isolated reader failed (exit {code}): {problem[:200]}")


def _forked(path: str, timeout: float) -> tuple[int, str]:
    """(exit code or -signal, the child's message) of the check run in a forked child."""
    import select
    import signal
    import time

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns, never runs the parent's atexit handlers or buffers
        code = 1
        try:
            os.close(read_end)
            try:
                code, message = _check(path)
            except BaseException as exc:  # noqa: BLE001 - a bug the parent must name, not a bare exit code
                code, message = 1, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            os.write(write_end, message.encode("utf-8", "replace")[:4000])
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            ready, _, _ = select.select([read_end], [], [], 0)
            if ready:
                chunks.append(os.read(read_end, 4096))
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return _EXIT_TIMEOUT, ""
            time.sleep(0.002)
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
    finally:
        os.close(read_end)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, b"".join(chunks).decode("utf-8", "replace")


def _spawned(path: str, timeout: float) -> tuple[int, str]:
    """The same check in a fresh Python (no fork on this OS)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        run = subprocess.run([sys.executable, "-c", _CHILD, path], capture_output=True, timeout=timeout, env=env,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return _EXIT_TIMEOUT, ""
    except OSError as exc:
        raise InputError(path, f"cannot start the isolated reader: {exc}") from None
    return run.returncode, run.stdout.decode("utf-8", "replace") or run.stderr.decode("utf-8", "replace")


def _check(path: str) -> tuple[int, str]:
    """Read everything libhdf5 will be asked for; (exit code, one-line problem)."""
    try:
        with read_keras(path, isolate=False) as keras_file:
            for layer in keras_file.batchnorm_layers:
                for ref in layer.weights.values():
                    if not isinstance(ref, kh.UnreadableTensor):
                        ref.numpy()
    except NotAKerasModel as exc:
        return _EXIT_NOT_KERAS, exc.problem
    except InputError as exc:
        return _EXIT_INPUT, exc.problem
    return 0, ""


def _preflight_child() -> int:
    """The spawned child's entry point: exit with `_check`'s code, its message on stdout."""
    code, message = _check(sys.argv[-1])
    sys.stdout.write(message + "\n")
    return code
