"""An outside attacker's pickles: attribute walks, computed names, EXT codes, odd BUILD targets,
persistent ids, memo DAGs that hash exponentially, laundering through `bnlint fix`, tar checkpoints.

Every file is written from raw opcodes (tests/hostile.py's assembler) into tmp_path and only ever
handed to bnlint; each payload would create the `marker` file if anything ran it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.errors import InputError
from bnlint.loaders import detect
from bnlint.loaders.pickle_allowlist import GENERATED_CLASSES
from bnlint.loaders.pickle_policy import judge_call
from bnlint.loaders.pickle_scan import scan_pickle
from tests import hostile as H

ROOT = Path(__file__).resolve().parent.parent
BNLINT = str(ROOT / ".venv" / "bin" / "bnlint")


@pytest.fixture
def marker(tmp_path: Path) -> Any:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a payload ran"


def run(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["--format", "json", "--fail-on", "warning", *args], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def codes(file: dict[str, Any]) -> set[str]:
    return {f["code"] for f in file["findings"]}


def names(file: dict[str, Any], code: str) -> set[str]:
    key = "globals" if code == "BN001" else "callables"
    return {n for f in file["findings"] if f["code"] == code for n in f["values"][key]}


def memo_put(index: int) -> bytes:
    return b"q" + bytes([index])


def memo_get(index: int) -> bytes:
    return b"h" + bytes([index])


# ---------------------------------------------------------------------------------------------
# 1. Attribute walks: a dotted name from an allow-listed module is never a layer class

# (module, dotted name, expected rule): every walk reaches a file/process/code primitive or at least
# names something outside the exact allowlist.
WALKS = [
    ("torch.nn.modules.module", "unittest.TestProgram", "BN001"),
    ("torch.nn.modules.module", "sys.modules", "BN001"),
    ("torch.nn.modules.conv", "multiprocessing.Process", "BN001"),
    ("torch.nn.modules.linear", "logging.FileHandler", "BN001"),
    ("torch.nn.modules.module", "io.FileIO", "BN001"),
    ("torch.nn.modules.container", "zipfile.ZipFile", "BN001"),
    ("torch.nn.modules.batchnorm", "threading.Thread", "BN001"),
    ("torch.nn.modules.activation", "logging.handlers.RotatingFileHandler", "BN001"),
    ("torch.nn.modules.module", "Module.__init__.__globals__", "BN001"),
    ("torch.nn", "modules.conv.Conv2d", "BN003"),  # joins to an allowed name: still a walk
    ("collections", "OrderedDict.fromkeys", "BN003"),
    ("torch.nn.modules.linear", "Linear.Foo", "BN003"),
]


def walk_call(module: str, name: str, marker: Path, stack: bool = False) -> bytes:
    callee = H.stack_glob(module, name) if stack else H.glob(module, name)
    return H.call(callee, H.text(f"touch {marker}"))


@pytest.mark.parametrize(("module", "name", "rule"), WALKS)
def test_walk_from_allowed_module_is_flagged_zip(tmp_path: Path, marker: Path, module: str, name: str, rule: str) -> None:
    evil = [(H.text("evil"), walk_call(module, name, marker, stack=True))]
    path = H.torch_zip(tmp_path / "m.pt", H.state_dict_pickle(evil, protocol=4))
    code, report = run(str(path))
    (file,) = report["files"]
    assert code == 1 and rule in codes(file)
    assert f"{module}.{name}" in names(file, rule)


@pytest.mark.parametrize(("module", "name", "rule"), WALKS[:4] + WALKS[-3:-2])
def test_walk_flagged_in_legacy_and_tar_files(tmp_path: Path, marker: Path, module: str, name: str, rule: str) -> None:
    payload = walk_call(module, name, marker)
    legacy = H.legacy_file(tmp_path / "legacy.pt", payload)
    tar = H.tar_checkpoint(tmp_path / "tar.pt", payload, "storages")
    code, report = run("--skip-unrecognised", str(legacy), str(tar))
    assert code in (1, 2)
    for file in report["files"]:
        assert rule in codes(file), file["path"]


def test_walk_only_named_not_called_is_still_flagged(tmp_path: Path) -> None:
    """A walk pushed as data (an argument, a dict value) still runs getattr chains on load."""
    data = H.state_dict_pickle([(H.text("x"), H.glob("torch.nn.modules.module", "io.FileIO"))], protocol=4)
    scan = scan_pickle(data)
    assert scan.unsafe == ["torch.nn.modules.module.io.FileIO"]


def test_exact_names_only() -> None:
    assert judge_call("torch.nn.modules.batchnorm.BatchNorm2d") == "allowed"
    assert judge_call("torch.nn.modules.batchnorm.NotALayer") == "unknown"  # the old pattern allowed it
    assert judge_call("torch.nn.modules.batchnorm.BatchNorm2d", walk="batchnorm.BatchNorm2d") == "unknown"
    assert judge_call("torch.nn.modules.module.unittest.TestProgram", walk="unittest.TestProgram") == "primitive"
    assert judge_call("somepkg.io_helpers.FileIO") == "primitive"  # re-exported file class


def test_allowlist_table_matches_installed_torch() -> None:
    """The committed table is what scripts/make_pickle_allowlist.py generates from this torch."""
    spec = importlib.util.spec_from_file_location("make_pickle_allowlist", ROOT / "scripts" / "make_pickle_allowlist.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.generate() == GENERATED_CLASSES, "run scripts/make_pickle_allowlist.py"
    assert "torch.nn.modules.batchnorm.BatchNorm2d" in GENERATED_CLASSES and "torch.FloatStorage" in GENERATED_CLASSES


# ---------------------------------------------------------------------------------------------
# 2. Names built on the stack, EXT codes, BUILD targets, persistent ids


def test_stack_global_from_memoised_strings(tmp_path: Path, marker: Path) -> None:
    body = (H.text("torch.nn.modules.module") + memo_put(1) + b"0" + H.text("io.FileIO") + memo_put(2) + b"0"
            + memo_get(1) + memo_get(2) + b"\x93" + H.tup(H.text(str(marker)), H.text("w")) + b"R")
    path = H.torch_zip(tmp_path / "m.pt", H.state_dict_pickle([(H.text("evil"), body)], protocol=4))
    code, report = run(str(path))
    assert code == 1 and "torch.nn.modules.module.io.FileIO" in names(report["files"][0], "BN001")


def test_stack_global_with_computed_or_long_names() -> None:
    computed = H.whole(H.call(H.glob("builtins", "str"), H.text("os")) + H.text("system") + b"\x93" + b"0" + H.NONE, 4)
    assert scan_pickle(computed).unsafe
    long_name = H.whole(H.text("a" * 2000) + H.text("b") + b"\x93" + b")R", 4)
    assert scan_pickle(long_name).unknown
    not_str = H.whole(b"C\x02os" + H.text("system") + b"\x93", 4)  # bytes: the C unpickler refuses too
    assert scan_pickle(not_str).error


@pytest.mark.parametrize("ext", [b"\x82\x01", b"\x83\x01\x02", b"\x84\x01\x00\x00\x00"])
def test_ext_codes_are_unknown_imports(tmp_path: Path, marker: Path, ext: bytes) -> None:
    path = H.torch_zip(tmp_path / "m.pt", H.state_dict_pickle([(H.text("evil"), ext + H.tup(H.text(str(marker))) + b"R")]))
    code, report = run(str(path))
    assert code in (1, 2) and "BN003" in codes(report["files"][0])


def test_build_on_allowed_class_object_is_bn001() -> None:
    """BUILD on a class (not an instance) sets attributes of a live class in the loading process."""
    data = H.whole(H.glob("collections", "OrderedDict") + H.tup(H.NONE, H.dict_of([(H.text("x"), H.NONE)])) + b"b")
    assert scan_pickle(data).unsafe == ["collections.OrderedDict [changed by BUILD]"]


def test_persistent_id_globals_are_judged(tmp_path: Path) -> None:
    """torch's persistent_load touches the id's storage type (`._dtype`, legacy `type(0)`)."""
    evil_pid = H.tup(H.text("storage"), H.glob("somepkg.evil", "Storage"), H.text("0"), H.text("cpu"), H.integer(3)) + b"Q"
    tensor = H.call(H.glob("torch._utils", "_rebuild_tensor_v2"), evil_pid, H.integer(0), H.tup(H.integer(3)),
                    H.tup(H.integer(1)), H.FALSE, H.call(H.glob("collections", "OrderedDict")))
    path = H.torch_zip(tmp_path / "m.pt", H.state_dict_pickle([(H.text("evil"), tensor)]))
    code, report = run(str(path))
    assert code in (1, 2) and "somepkg.evil.Storage" in names(report["files"][0], "BN003")
    clean = scan_pickle(H.state_dict_pickle())
    assert not clean.unsafe and not clean.unknown  # torch's own form passes


# ---------------------------------------------------------------------------------------------
# 3. Structure-aware generator: allowed prefixes x walks x dangerous targets x opcode variants

PREFIXES = ["torch.nn.modules.module", "torch.nn.modules.conv", "torch.nn", "torch", "collections", "torch._utils",
            "numpy", "numpy.core.multiarray", "__torch__.torch.nn.modules.conv", "builtins", "copyreg"]
TARGETS = ["unittest.TestProgram", "io.FileIO", "logging.FileHandler", "multiprocessing.Process", "threading.Thread",
           "zipfile.ZipFile", "os.system", "subprocess.Popen", "tarfile.open", "runpy.run_path", "pdb.run",
           "shutil.rmtree", "socket.socket", "ctypes.CDLL", "importlib.import_module", "code.interact",
           "webbrowser.open", "pty.spawn", "Foo", "Conv2d.__reduce__", "OrderedDict.__new__", "modules.conv.Conv2d"]
CALLS = ["reduce", "newobj", "newobj_ex", "obj", "build", "none"]


def _generated(rng: random.Random) -> bytes:
    prefix = rng.choice(PREFIXES)
    middle = ".".join(rng.choice(["utils", "modules", "functional", "_C", "nn"]) for _ in range(rng.randint(0, 2)))
    target = rng.choice(TARGETS)
    name = f"{middle}.{target}" if middle else target
    if "." not in name:
        name = f"x.{name}"
    how = rng.choice(["global", "stack", "memo"])
    if how == "global":
        callee = H.glob(prefix, name)
    elif how == "stack":
        callee = H.stack_glob(prefix, name)
    else:
        callee = H.text(prefix) + memo_put(7) + b"0" + H.text(name) + memo_put(8) + b"0" + memo_get(7) + memo_get(8) + b"\x93"
    arg = H.tup(H.text("touch /tmp/x"))
    value = {
        "reduce": callee + arg + b"R",
        "newobj": callee + arg + b"\x81",
        "newobj_ex": callee + arg + H.EMPTY_DICT + b"\x92",
        "obj": b"(" + callee + H.text("x") + b"o",
        "build": callee + H.dict_of([(H.text("a"), H.NONE)]) + b"b",
        "none": H.list_of(callee),
    }[rng.choice(CALLS)]
    return H.whole(H.dict_of([(H.text("k"), value)]), rng.choice([2, 3, 4, 5]))


def test_generated_walks_are_never_clean() -> None:
    rng = random.Random(20261207)
    for _ in range(400):
        data = _generated(rng)
        scan = scan_pickle(data)
        assert scan.error is None, data
        assert scan.unsafe or scan.unknown, data


def test_generated_walks_through_the_cli(tmp_path: Path, marker: Path) -> None:
    rng = random.Random(7)
    paths = [H.torch_zip(tmp_path / f"g{i}.pt", _generated(rng)) for i in range(12)]
    code, report = run(*map(str, paths))
    assert code in (1, 2)
    for file in report["files"]:
        assert codes(file) & {"BN001", "BN003"}, file["path"]


# ---------------------------------------------------------------------------------------------
# 4. No hangs: memo DAGs hashed as dict keys or set members


def _dag(depth: int, start: int = 0) -> bytes:
    """t0 = (1,), t(i+1) = (t(i), t(i)): a tree of 2**depth leaves in ~6*depth bytes (memo 0..depth)."""
    body = H.integer(1) + b"\x85" + b"r" + start.to_bytes(4, "little") + b"0"
    for i in range(depth):
        index = (start + i).to_bytes(4, "little")
        body += b"j" + index + b"j" + index + b"\x86" + b"r" + (start + i + 1).to_bytes(4, "little") + b"0"
    return body + b"j" + (start + depth).to_bytes(4, "little")


def _padded(value: bytes, size: int) -> bytes:
    """The value, then a padding string popped off the stack, so the pickle is about `size` bytes."""
    pad = max(0, size - len(value) - 16)
    return H.whole(value + b"X" + pad.to_bytes(4, "little") + b"a" * pad + b"0", 4)


HANG_SHAPES = {
    "dict_key": lambda: b"}" + _dag(40) + H.integer(1) + b"s",
    "dict_opcode": lambda: b"(" + _dag(40) + H.integer(1) + b"d",
    "set_additems": lambda: b"\x8f(" + _dag(40) + b"\x90",
    "frozenset": lambda: b"(" + _dag(40) + b"\x91",
    "set_builder": lambda: H.call(H.glob("builtins", "set"), H.list_of(_dag(40))),
    "ordered_dict_pairs": lambda: H.call(H.glob("collections", "OrderedDict"), H.list_of(H.tup(_dag(40), H.integer(1)))),
    "size_builder_key": lambda: b"}" + H.call(H.glob("torch", "Size"), H.list_of(_dag(40))) + H.integer(1) + b"s",
    "many_keys": lambda: b"}(" + b"".join(_dag(30, 40 * k) + H.integer(k) for k in range(6)) + b"u",
}


def test_memo_dags_never_hang(tmp_path: Path) -> None:
    paths = []
    for index, (name, shape) in enumerate(HANG_SHAPES.items()):
        size = (30_000, 300_000, 900_000)[index % 3]
        paths.append(H.torch_zip(tmp_path / f"{name}.pt", _padded(shape(), size)))
    start = time.perf_counter()
    result = subprocess.run([BNLINT, "--format", "json", *map(str, paths)], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    report = json.loads(result.stdout)
    assert result.returncode == 2 and elapsed < 20
    for file in report["files"]:
        if "size_builder" not in file["path"]:  # torch.Size keeps its ints only: that one loads
            assert file["error"], file["path"]  # refused with one line, never built


def test_shared_but_small_keys_still_load() -> None:
    """Tuple keys that are shared but small (hashing linear in the file) are not refused."""
    keys = b"".join(H.tup(H.integer(i), H.text("x")) + H.integer(i) for i in range(2000))
    assert scan_pickle(H.whole(b"}(" + keys + b"u")).error is None


# ---------------------------------------------------------------------------------------------
# 5. `bnlint fix` never copies an unvetted pickle


@pytest.mark.parametrize("where", ["data.pkl", "extra.pkl", "legacy", "unknown"])
def test_writer_refuses_to_launder(tmp_path: Path, marker: Path, where: str) -> None:
    from bnlint.fix.torch_write import write_torch_fix

    if where == "legacy":
        source = H.legacy_file(tmp_path / "in.pt", H.PAYLOADS["pydoc_pipepager"](marker))
    elif where == "unknown":
        source = H.hostile_zip(tmp_path / "in.pt", H.PAYLOADS["unknown_module_function"](marker))
    else:
        source = H.hostile_zip(tmp_path / "in.pt", H.PAYLOADS["pydoc_pipepager"](marker), where)
    output = tmp_path / "out.pt"
    with pytest.raises(InputError, match="refusing to copy"):
        write_torch_fix(source, output, {"bn": (np.zeros(3), np.ones(3))})
    assert not output.exists() and [p.name for p in tmp_path.iterdir()] == ["in.pt"]


def test_writer_still_patches_a_clean_file(tmp_path: Path) -> None:
    from bnlint.fix.torch_write import write_torch_fix

    source = H.torch_zip(tmp_path / "in.pt", H.state_dict_pickle())
    report = write_torch_fix(source, tmp_path / "out.pt", {"bn": (np.zeros(3), np.ones(3))})
    assert report.tensors == ["bn.running_mean", "bn.running_var"]


# ---------------------------------------------------------------------------------------------
# 6. Tar checkpoints: whatever torch.load opens as a tar is a model file


def _tar(path: Path, members: list[tuple[str, bytes]], link: tuple[str, str] | None = None,
         fmt: int = tarfile.USTAR_FORMAT) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.LNKTYPE, link[1]
            tar.addfile(info)
    path.write_bytes(buffer.getvalue())
    return path


def _v7(path: Path) -> Path:
    """Strip the ustar magic from every header (a v7 tar, which tarfile and torch still open)."""
    data = bytearray(path.read_bytes())
    position = 0
    while position + 512 <= len(data) and any(data[position:position + 512]):
        header = data[position:position + 512]
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        header[257:265] = bytes(8)
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
        data[position:position + 512] = header
        position += 512 + (size + 511) // 512 * 512
    path.write_bytes(bytes(data))
    return path


def _storages(payload: bytes) -> bytes:
    return H.proto(2) + H.integer(0) + payload + b"0" + H.STOP


def test_tar_variants_are_detected_and_scanned(tmp_path: Path, marker: Path) -> None:
    payload = H.PAYLOADS["osx_support_read_output"](marker)
    evil = _storages(payload)
    paths = [
        _tar(tmp_path / "extra_member_first.pt", [("README", b"hello\n")] + [(f"n{i}", b"") for i in range(20)]
             + [("storages", evil)]),
        _tar(tmp_path / "lfs_name.pt", [("version https://git-lfs.github.com/spec/v1", b"x"), ("storages", evil)]),
        _tar(tmp_path / "hdf5_name.pt", [("\x89HDF\r\n\x1a\n", b"x"), ("storages", evil)], fmt=tarfile.GNU_FORMAT),
        _v7(_tar(tmp_path / "v7.pt", [("sys_info", b"x"), ("storages", evil)])),
        _tar(tmp_path / "hardlink.pt", [("payload", evil)], link=("storages", "payload")),
        _tar(tmp_path / "duplicate.pt", [("storages", _storages(b"")), ("storages", evil)]),
    ]
    for path in paths:
        assert detect(path).kind == "torch-pickle", path.name
    code, report = run("--skip-unrecognised", *map(str, paths))
    assert code in (1, 2) and len(report["files"]) == len(paths)
    for file in report["files"]:
        assert "_osx_support._read_output" in names(file, "BN001"), file["path"]


def test_tar_checkpoint_with_payload_exit_1_under_skip_unrecognised(tmp_path: Path, marker: Path) -> None:
    evil = H.tar_checkpoint(tmp_path / "evil.pt", H.PAYLOADS["osx_support_read_output"](marker), "pickle")
    code, report = run("--skip-unrecognised", str(evil))
    (file,) = report["files"]
    assert code == 1 and file["error"] is None and "BN001" in codes(file)


def test_plain_tar_without_torch_members_is_not_a_model(tmp_path: Path) -> None:
    path = _tar(tmp_path / "notes.pt", [("notes.txt", b"hello\n")])
    result = CliRunner().invoke(main, ["--skip-unrecognised", "--format", "json", str(path)], catch_exceptions=False)
    assert result.exit_code == 0


# ---------------------------------------------------------------------------------------------
# 7. No false alarm on the healthy fixtures


def test_healthy_fixtures_have_no_bn001_or_bn003() -> None:
    fixtures = sorted(p for p in (ROOT / "fixtures").iterdir()
                      if p.suffix in (".pt", ".pth", ".ckpt") and "malicious" not in p.name and not p.name.startswith("bad_"))
    result = CliRunner().invoke(main, ["--format", "json", *map(str, fixtures)], catch_exceptions=False)
    report = json.loads(result.stdout)
    flagged = {Path(f["path"]).name: codes(f) & {"BN001", "BN003"} for f in report["files"] if codes(f) & {"BN001", "BN003"}}
    # a pickled module of a class defined in the user's own code is BN003 by design
    assert flagged == {"convnet_custom_module.pt": {"BN003"}}
