"""Publishing a fixed model: move what the isolated fixer wrote into place without ever leaving a
model next to the wrong data.

The fixer writes the fixed model, and any companion files it references by relative name (ONNX
external data), into a private staging folder. `publish` moves them beside the target:

    published = publish(stage / "fixed.onnx", Path("out/fixed.onnx"), source=Path("model.onnx"), in_place=False)

Crash consistency (a kill, a full disk or a read-only folder at any point):

1. Every companion is written beside its destination under a temporary name, flushed to disk, and
   renamed to a name that *nothing references yet*: a companion whose name is free keeps it; one
   whose name is taken (in place, the input's own `model.onnx.data`; or an earlier output's) gets
   a fresh name, and the staged ONNX model is rewritten to reference that fresh name. Until step 2
   every file an existing model references is untouched, so the old model and its data still
   load together.
2. The model is written beside the target under a temporary name, flushed, and renamed over the
   target: one `rename`, atomic on POSIX. Before it the old pair is what readers see; after it,
   the new model and the companions it names, all already on disk.
3. Only then are the old model's companions that nothing references any more removed (the
   input's data stays when the input is a different file), and a companion that had to take a
   fresh name gets its usual name back the same way: a hard link under the usual name, the model
   rewritten to reference it and renamed over the target (one rename again), then the fresh name
   unlinked. A crash in step 3 leaves a valid pair plus, at worst, a stray file.

Any failure before step 2 removes what this call created and raises OutputError (one line); the
target and its data are as they were. The output keeps the input's permission bits, and with
`in_place` on a symlink the link's target is rewritten and the link kept.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import onnx

from bnlint.errors import OutputError


def publish(staged: Path, target: Path, *, source: Path, in_place: bool) -> list[Path]:
    """Move `staged` (and every other file in its folder: its companions) to `target`; returns the
    published paths, model first. Raises OutputError for any OSError, leaving the target as it was."""
    staged, target, source = Path(staged), Path(target), Path(source)
    if staged.is_dir():  # a folder-format model (a SavedModel): swapped in as a whole
        from bnlint.fix.publish_folder import publish_folder

        return publish_folder(staged, target, source=source, in_place=in_place)
    dest = Path(os.path.realpath(target)) if in_place else target  # in place through a link: its target
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        mode = stat.S_IMODE(os.stat(source).st_mode)
    except OSError:
        mode = _default_mode()
    companions = sorted(p for p in staged.parent.iterdir() if p != staged and p.is_file())
    created: list[Path] = []
    try:
        if not folder.is_dir():
            raise OutputError(f"cannot write {target}: folder {folder} does not exist")
        renames, payload = _plan(staged, companions, folder)
        final_companions: list[Path] = []
        for companion in companions:  # step 1: new data under names nothing references yet
            final = folder / renames.get(companion.name, companion.name)
            temp = _stage_beside(companion, final, mode, created)
            os.replace(temp, final)
            created.remove(temp)
            created.append(final)
            final_companions.append(final)
        old_refs = _references(dest) if os.path.lexists(dest) else set()
        temp_model = _stage_beside(staged, dest, mode, created, payload)
        fsync_folder(folder)
        os.replace(temp_model, dest)  # step 2: the one switch
        created.clear()
    except OutputError:
        _remove(created)
        raise
    except OSError as exc:
        _remove(created)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    fsync_folder(folder)
    final_companions = _tidy(dest, folder, mode, old_refs, source, renames, final_companions)  # step 3: best effort
    return [target, *final_companions]


def _plan(staged: Path, companions: list[Path], folder: Path) -> tuple[dict[str, str], bytes | None]:
    """Fresh names for companions whose usual name is taken, and the staged ONNX model rewritten to
    reference them (None: the staged model is moved as it is)."""
    taken = [c.name for c in companions if os.path.lexists(folder / c.name)]
    if not taken:
        return {}, None
    if not _is_onnx(staged):
        raise OutputError(f"cannot write beside {folder / taken[0]}: it exists, and only an ONNX model's references can be renamed")
    renames = {name: _fresh(folder, name) for name in taken}
    return renames, _relocated(staged, renames)


def _is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def _fresh(folder: Path, name: str) -> str:
    base, dot, suffix = name.rpartition(".")
    while True:
        token = secrets.token_hex(4)
        candidate = f"{base}.{token}.{suffix}" if dot and base else f"{name}.{token}"
        if not os.path.lexists(folder / candidate):
            return candidate


def _relocated(model_path: Path, renames: dict[str, str]) -> bytes:
    """The ONNX model's bytes with every external-data location in `renames` replaced."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in _tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value in renames:
                entry.value = renames[entry.value]
    return bytes(model.SerializeToString())


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))


def _references(model_path: Path) -> set[str]:
    """External-data locations an existing ONNX model names (empty for other files or on any error)."""
    if not _is_onnx(model_path):
        return set()
    try:
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)
        return {e.value for t in _tensors(model) for e in t.external_data if e.key == "location"}
    except Exception:  # noqa: BLE001 - an unreadable old target: nothing to tidy, never a failure
        return set()


def _stage_beside(source: Path, final: Path, mode: int, created: list[Path], payload: bytes | None = None) -> Path:
    """`source` (or `payload`) as a flushed temporary file in `final`'s folder, with `mode`."""
    handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    temp = Path(name)
    created.append(temp)
    if payload is None and _same_device(source, final.parent):
        os.close(handle)
        os.rename(source, temp)  # the staged file itself (a private copy nothing else uses): no second copy
        descriptor = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.chmod(temp, mode)
        return temp
    with os.fdopen(handle, "wb") as stream:
        if payload is None:
            with open(source, "rb") as reader:  # a copy: the staging folder is on another file system
                shutil.copyfileobj(reader, stream, 1 << 20)
        else:
            stream.write(payload)
        stream.flush()
        os.fsync(stream.fileno())
    os.chmod(temp, mode)
    return temp


def _same_device(path: Path, folder: Path) -> bool:
    try:
        return os.stat(path).st_dev == os.stat(folder).st_dev and os.path.isfile(path) and not os.path.islink(path)
    except OSError:
        return False


def _tidy(dest: Path, folder: Path, mode: int, old_refs: set[str], source: Path, renames: dict[str, str],
          companions: list[Path]) -> list[Path]:
    """Step 3: drop the old model's unreferenced companions, then give renamed companions their usual
    names back (hard link, model rewritten, one rename). Errors here leave a valid pair: ignored."""
    # The input's own data stays unless the input is what was replaced.
    keep = set() if _same_file(source, dest) else {os.path.realpath(source.parent / n) for n in _references(source)}
    for name in old_refs - _references(dest):
        path = folder / name
        if Path(name).name == name and os.path.realpath(path) not in keep and path.is_file():
            _remove([path])
    if not renames:
        return companions
    back = {fresh: usual for usual, fresh in renames.items() if not os.path.lexists(folder / usual)}
    if not back:
        return companions
    linked: list[Path] = []
    try:
        for fresh, usual in back.items():
            os.link(folder / fresh, folder / usual)
            linked.append(folder / usual)
        temp = _stage_beside(dest, dest, mode, [], _relocated(dest, back))
        try:
            os.replace(temp, dest)
        except OSError:
            _remove([temp])
            raise
    except OSError:  # no hard links here, a full disk...: the fresh names stay, and they are valid
        _remove(linked)
        return companions
    _remove([folder / fresh for fresh in back])
    fsync_folder(folder)
    return [folder / back.get(c.name, c.name) for c in companions]


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths are one file (in place); False when either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def fsync_folder(folder: Path) -> None:
    """Make the renames durable; some file systems cannot open a folder: then nothing more to do."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
