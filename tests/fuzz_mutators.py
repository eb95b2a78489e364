"""Format-aware mutators for tests/fuzz_inputs.py: each takes (rng, bytes, notes) and returns new bytes.

Every mutator appends a short description of what it did to `notes` (so a failing input says how
it was made) and falls back to byte-level edits when its input no longer parses as its format.
"""

from __future__ import annotations

import ast
import json
import pickletools
import random
import re
import struct
from typing import Any

from tests import hostile

# ---------------------------------------------------------------------------------------------- bytes

INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x01")
INTERESTING_WORDS = (b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\x00\x00\x00\x00",
                     b"\xff" * 8, b"\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x00\x00\x00\x00\x00\x00\x00\x40", b"\x00" * 8)


def mutate_bytes(rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    buf = bytearray(data)
    if not buf:
        notes.append("bytes: filled")
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    op = rng.randrange(7)
    pos = rng.randrange(len(buf))
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        notes.append("bytes: bit flips")
    elif op == 1:
        word = rng.choice(INTERESTING_WORDS + INTERESTING)
        buf[pos:pos + len(word)] = word
        notes.append(f"bytes: {word.hex()} at {pos}")
    elif op == 2:
        extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        buf[pos:pos] = extra
        notes.append(f"bytes: {len(extra)} inserted at {pos}")
    elif op == 3:
        end = min(len(buf), pos + rng.randint(1, 256))
        del buf[pos:end]
        notes.append(f"bytes: [{pos}:{end}] deleted")
    elif op == 4:
        buf = buf[:pos]
        notes.append(f"bytes: truncated at {pos}")
    elif op == 5:
        end = min(len(buf), pos + rng.randint(1, 512))
        chunk = buf[pos:end]
        at = rng.randrange(len(buf) + 1)
        buf[at:at] = chunk * rng.randint(1, 4)
        notes.append(f"bytes: [{pos}:{end}] duplicated at {at}")
    else:
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        notes.append("bytes: random bytes")
    return bytes(buf)


def mutate_text(rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    """Code and prototxt text: token-level edits, plus the byte edits."""
    text = data.decode("utf-8", "replace")
    lines = text.splitlines(keepends=True) or [""]
    op = rng.randrange(6)
    at = rng.randrange(len(lines))
    if op == 0:
        snippet = rng.choice(["torch.batch_norm(x, None, None, None, None, True, 0.1, 1e-05, True)\n", "training=True,\n",
                              "(" * 5000 + "\n", "{" * 5000 + "\n", "}" * 300 + "\n", "eps: 0\n", "momentum = -1\n",
                              "layer {\n", "  bottom: \"data\"\n  top: \"data\"\n", "\"" + "\\" * 99 + "\n", "\x00\xff\n",
                              "x" * 100_000 + "\n", "# " + "é" * 50 + "\n", "batch_norm_param { use_global_stats: false }\n"])
        lines.insert(at, snippet)
        notes.append(f"text: inserted {snippet[:24]!r} at line {at}")
    elif op == 1:
        del lines[at:at + rng.randint(1, 5)]
        notes.append(f"text: deleted lines from {at}")
    elif op == 2:
        lines.insert(rng.randrange(len(lines) + 1), lines[at] * rng.randint(2, 200))
        notes.append(f"text: repeated line {at}")
    elif op == 3:
        words = text.split(" ")
        if len(words) > 1:
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        lines = [" ".join(words)]
        notes.append("text: swapped words")
    elif op == 4:
        number = rng.choice(["-1", "0", "1e999", "nan", "99999999999999999999999", "0x7fffffffffffffff", "-0", "1e-45", "4294967296"])
        digits = list(re.finditer(r"\d+(\.\d+)?", text))
        if digits:
            hit = rng.choice(digits)
            text = text[: hit.start()] + number + text[hit.end():]
        lines = [text]
        notes.append(f"text: a number set to {number}")
    else:
        return mutate_bytes(rng, data, notes)
    return "".join(lines).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------------------------------- pickles

PICKLE_SNIPPETS: tuple[bytes, ...] = (
    b"(", b"}", b"]", b")", b"N", b"0", b"1", b"2", b"t", b"\x85", b"\x86", b"\x87", b"b", b"R", b"s", b"u", b"a", b"e",
    b"\x81", b"\x92", b"\x93", b"Q", b"P0\n", b"h\xff", b"j\xff\xff\xff\x7f", b"q\x00", b"r\xff\xff\xff\xff", b"\x94",
    b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n", b"ctorch\nFloatStorage\n", b"ctorch\nHalfStorage\n",
    b"cposix\nsystem\n", b"cbuiltins\neval\n", b"c__builtin__\ngetattr\n", b"ctorch.nn.modules.batchnorm\nBatchNorm2d\n",
    b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x8b\xff\xff\xff\x7fxx", b"\x8d\xff\xff\xff\xff\xff\xff\x00\x00ab",
    b"X\xff\xff\xff\x7fabc", b"B\xff\xff\xff\x7fabc", b"\x8e\xff\xff\xff\xff\xff\xff\xff\x00", b"\x95\xff\xff\xff\xff\xff\x00\x00\x00",
    b"\x96\xff\xff\xff\xff\x00\x00\x00\x00", b"\x97", b"\x98", b"\x82\x01", b"\x83\x01\x01", b"\x84\x01\x00\x00\x00",
    b"i__main__\nThing\n", b"o", b"\x80\x05", b"I01\n", b"I99999999999999999999999\n", b"F1e999\n", b"S'x'\n", b"V\\u0000\n",
    b"(" * 2000, b"]" + b"(" * 200 + b"e" * 200, b"}(" + b"K\x01K\x02" * 500 + b"u",
    hostile.storage_pid("0", 2**40), hostile.storage_pid("99", 3), hostile.storage_pid("0", -1),
    hostile.tensor("0", (2**31, 2**31), (2**31, 1)), hostile.tensor("0", (3,), (-1,)), hostile.tensor("0", (3,), (1,), offset=2**62),
    hostile.tensor("1", (0, 5), (5, 1)), hostile.tensor("2", (3,), (1,), storage="BFloat16Storage"),
)


# Globals a torch pickle may name (most on the allowlist), swapped in for the file's own.
PICKLE_GLOBALS: tuple[tuple[str, str], ...] = tuple(("torch", s) for s in (
    "FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "IntStorage", "BoolStorage", "ByteStorage",
    "CharStorage", "ComplexFloatStorage", "QInt8Storage", "UntypedStorage", "Size", "device", "float32", "bfloat16")) + (
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_qtensor"), ("torch._utils", "_rebuild_sparse_tensor"), ("torch._utils", "_rebuild_meta_tensor_no_storage"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("torch._tensor", "_rebuild_from_type_v2"), ("torch.nn.parameter", "Parameter"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("torch.nn.modules.batchnorm", "BatchNorm2d"), ("torch.nn.modules.batchnorm", "SyncBatchNorm"),
    ("torch.nn.modules.batchnorm", "BatchNorm1d"), ("torch.nn.modules.instancenorm", "InstanceNorm2d"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.container", "ModuleDict"), ("torch.nn.modules.conv", "Conv2d"),
    ("torch.optim.swa_utils", "AveragedModel"), ("torch.nn.parallel.data_parallel", "DataParallel"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("argparse", "Namespace"), ("pytorch_lightning.utilities.parsing", "AttributeDict"),
    ("__torch__.torch.nn.modules.batchnorm", "BatchNorm2d"), ("__builtin__", "set"), ("copy_reg", "_reconstructor"),
)


def _ops(data: bytes) -> list[tuple[Any, Any, bytes]] | None:
    """(opcode, argument, raw bytes) per opcode of one pickle, or None if it does not parse."""
    try:
        ops = list(pickletools.genops(data))
    except Exception:  # noqa: BLE001 - a malformed pickle: fall back to byte mutations
        return None
    out = []
    for index, (opcode, arg, pos) in enumerate(ops):
        end = ops[index + 1][2] if index + 1 < len(ops) else pos + 1
        out.append((opcode, arg, data[pos:end]))
    return out


def mutate_pickle(rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    ops = _ops(data)
    if not ops or len(ops) < 3:
        return mutate_bytes(rng, data, notes)
    raw = [op[2] for op in ops]
    i = rng.randrange(len(raw) - 1)  # never the final STOP
    op = rng.randrange(9)
    globals_at = [k for k, (code, _, _) in enumerate(ops) if code.name == "GLOBAL"]
    if op >= 7 and globals_at:  # keep the pickle well-formed, change what it builds
        k = rng.choice(globals_at)
        module, name = rng.choice(PICKLE_GLOBALS)
        raw[k] = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        notes.append(f"pickle: op {k} {ops[k][1]} -> {module}.{name}")
        return b"".join(raw)
    if op == 0:
        del raw[i]
        notes.append(f"pickle: deleted op {i} {ops[i][0].name}")
    elif op == 1:
        raw.insert(i, raw[i])
        notes.append(f"pickle: duplicated op {i} {ops[i][0].name}")
    elif op == 2:
        raw[i], raw[i + 1] = raw[i + 1], raw[i]
        notes.append(f"pickle: swapped ops {i}, {i + 1}")
    elif op == 3:
        ints = [k for k, (code, arg, _) in enumerate(ops) if isinstance(arg, int) and code.name not in ("PROTO", "FRAME")]
        if ints:
            k = rng.choice(ints)
            value = rng.choice([0, -1, 1, 2, 255, 2**31 - 1, 2**31, 2**40, 2**63 - 1, -(2**63), 10**30, ops[k][1] * 1000 + 7])
            if ops[k][0].name in ("BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT", "GET", "PUT"):
                raw[k] = (b"j" + struct.pack("<I", value % 2**32)) if "GET" in ops[k][0].name else (b"r" + struct.pack("<I", value % 2**32))
            else:
                raw[k] = hostile.integer(value)
            notes.append(f"pickle: op {k} {ops[k][0].name} -> {value}")
    elif op == 4:
        strs = [k for k, (_, arg, _) in enumerate(ops) if isinstance(arg, str)]
        if strs:
            k = rng.choice(strs)
            value = rng.choice(["", "running_var", "bn1.running_mean", "x" * 70_000, "storage", "cuda:0", "torch", "\udcff",
                                "FloatStorage", "../../etc/passwd", "num_batches_tracked", "training", "é" * 10])
            encoded = value.encode("utf-8", "surrogatepass")
            raw[k] = b"X" + struct.pack("<I", len(encoded)) + encoded
            notes.append(f"pickle: op {k} string -> {value[:20]!r}")
    elif op == 5:
        snippet = rng.choice(PICKLE_SNIPPETS)
        raw.insert(i, snippet)
        notes.append(f"pickle: inserted {snippet[:24]!r} at op {i}")
    else:
        j = rng.randrange(len(raw) - 1)
        lo, hi = sorted((i, j))
        raw[hi:hi] = raw[lo:hi]
        notes.append(f"pickle: ops {lo}..{hi} repeated")
    return b"".join(raw)


def mutate_legacy(rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    """A legacy torch file is several pickles back to back, then raw storages: mutate one pickle."""
    starts, pos = [], 0
    for _ in range(5):
        if data[pos:pos + 1] != b"\x80":
            break
        try:
            ops = list(pickletools.genops(data[pos:]))
        except Exception:  # noqa: BLE001
            break
        starts.append((pos, pos + ops[-1][2] + 1))
        pos = starts[-1][1]
    if not starts or rng.random() < 0.25:
        return mutate_bytes(rng, data, notes)
    lo, hi = rng.choice(starts)
    return data[:lo] + mutate_pickle(rng, data[lo:hi], notes) + data[hi:]


# ---------------------------------------------------------------------------------------------- protobuf


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def parse_message(buf: bytes) -> list[list[Any]] | None:
    """[number, wire type, value] per field (value: int for varints, bytes otherwise); None if not a message."""
    fields, pos = [], 0
    try:
        while pos < len(buf):
            key, pos = _read_varint(buf, pos)
            number, wire = key >> 3, key & 7
            if number == 0:
                return None
            if wire == 0:
                value, pos = _read_varint(buf, pos)
                fields.append([number, 0, value])
            elif wire == 2:
                length, pos = _read_varint(buf, pos)
                if pos + length > len(buf):
                    return None
                fields.append([number, 2, buf[pos:pos + length]])
                pos += length
            elif wire in (1, 5):
                width = 8 if wire == 1 else 4
                if pos + width > len(buf):
                    return None
                fields.append([number, wire, buf[pos:pos + width]])
                pos += width
            else:
                return None
    except ValueError:
        return None
    return fields


def encode_message(fields: list[list[Any]]) -> bytes:
    out = bytearray()
    for number, wire, value, *forced in fields:
        out += _varint((number << 3) | wire)
        if wire == 0:
            out += _varint(value) if isinstance(value, int) else value
        elif wire == 2 or forced:
            length = forced[0] if forced else len(value)
            out += _varint(length) + value
        else:
            out += value
    return bytes(out)


VARINTS = (0, 1, 2, 3, 7, 11, 16, 255, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1, 2**64 - 2**31)


def mutate_proto(rng: random.Random, data: bytes, notes: list[str], depth: int = 0) -> bytes:
    """Descend into a (size-weighted) random submessage, or mutate a field at this level; lengths above are re-encoded."""
    fields = parse_message(data)
    if not fields:
        return mutate_bytes(rng, data, notes)
    subs = [k for k, f in enumerate(fields) if f[1] == 2 and len(f[2]) > 1 and parse_message(f[2])]
    if subs and depth < 8 and rng.random() < 0.8:
        k = rng.choices(subs, weights=[len(fields[s][2]) ** 0.5 for s in subs])[0]
        fields[k][2] = mutate_proto(rng, fields[k][2], notes, depth + 1)
        return encode_message(fields)
    where = f"depth {depth}"
    k = rng.randrange(len(fields))
    number, wire, value = fields[k][:3]
    op = rng.randrange(9)
    if op == 0:
        varints = [j for j, f in enumerate(fields) if f[1] == 0] or [k]
        k = rng.choice(varints)
        fields[k] = [fields[k][0], 0, rng.choice(VARINTS)]
        notes.append(f"proto {where}: field {fields[k][0]} varint -> {fields[k][2]}")
    elif op == 1 and wire == 2:
        forced = rng.choice([len(value) + 1, max(len(value) - 1, 0), 0, 2**31, 2**62])
        fields[k] = [number, 2, value, forced]
        notes.append(f"proto {where}: field {number} length {len(value)} -> {forced}")
    elif op == 2:
        new_wire = rng.choice([0, 1, 2, 3, 4, 5, 6, 7])
        body = value if isinstance(value, bytes) else _varint(value)
        fields[k] = [number, 2, body, len(body)] if new_wire == 2 else [number, new_wire, body]
        if new_wire == 0:
            fields[k] = [number, 0, body[:10]]
        notes.append(f"proto {where}: field {number} wire type {wire} -> {new_wire}")
    elif op == 3:
        new_number = rng.choice([1, 2, 3, 4, 5, 7, 8, 10, 13, 14, 15, 100, 2**29 - 1, number + 1])
        fields[k][0] = new_number
        notes.append(f"proto {where}: field {number} renumbered {new_number}")
    elif op == 4:
        del fields[k]
        notes.append(f"proto {where}: field {number} deleted")
    elif op == 5:
        fields.insert(rng.randrange(len(fields) + 1), list(fields[k][:3]) * 1)
        notes.append(f"proto {where}: field {number} duplicated")
    elif op == 6 and wire == 2:
        cut = rng.randrange(len(value) + 1)
        fields[k][2] = value[:cut] if rng.random() < 0.5 else value + value[:cut]
        notes.append(f"proto {where}: field {number} payload resized")
    elif op == 7 and wire == 2 and len(value) >= 4:
        body = bytearray(value)
        special = rng.choice([struct.pack("<f", float("nan")), struct.pack("<f", float("inf")), struct.pack("<f", -1.0),
                              struct.pack("<f", 1e38), b"\x00\x00\x00\x00"])
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(0, len(body) - 3)
            body[at:at + 4] = special
        fields[k][2] = bytes(body)
        notes.append(f"proto {where}: field {number} payload words -> {special.hex()}")
    else:
        new = [rng.randint(1, 20), rng.choice([0, 2, 5, 1]), 0]
        new[2] = rng.choice(VARINTS) if new[1] == 0 else bytes(rng.randrange(256) for _ in range({2: rng.randint(0, 40), 5: 4, 1: 8}[new[1]]))
        fields.insert(rng.randrange(len(fields) + 1), new)
        notes.append(f"proto {where}: inserted field {new[0]} wire {new[1]}")
    return encode_message(fields)


def mutate_onnx(rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    """Half the time wire-level (mutate_proto); else semantic, through onnx's own classes: the file
    stays loadable, so the graph walk and the rules see shapes, types and wiring no exporter writes."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # noqa: BLE001 - not parseable any more: wire-level mutation
        return mutate_proto(rng, data, notes)
    graph = model.graph
    if rng.random() < 0.5 or not graph.node:
        return mutate_proto(rng, data, notes)
    op = rng.randrange(8)
    if op == 0 and graph.initializer:
        init = rng.choice(graph.initializer)
        count = 1
        for d in init.dims:
            count *= d
        dims = rng.choice([[count], [1, count], [count, 1], [], [0], [2**40], [-1], [count, 2**31], list(init.dims)[::-1]])
        del init.dims[:]
        init.dims.extend(dims)
        notes.append(f"onnx: initializer {init.name} dims -> {dims}")
    elif op == 1 and graph.initializer:
        init = rng.choice(graph.initializer)
        init.data_type = rng.choice([0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 17, 19, 21, 22, 99])
        notes.append(f"onnx: initializer {init.name} data_type -> {init.data_type}")
    elif op == 2:
        bns = [n for n in graph.node if n.op_type == "BatchNormalization"] or list(graph.node)
        node = rng.choice(bns)
        key = rng.choice(["epsilon", "momentum", "training_mode", "is_test", "spatial", "consumed_inputs"])
        value = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e-45, 0, 1, 2, -1, 2**62, "x", [1, 2], [0.5]])
        kept = [a for a in node.attribute if a.name != key]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(key, value)])
        notes.append(f"onnx: {node.op_type} {node.name} {key} -> {value!r}")
    elif op == 3:
        node = rng.choice(graph.node)
        names = [o for n in graph.node for o in n.output] + [i.name for i in graph.input] + ["", "nowhere"]
        if node.input:
            k = rng.randrange(len(node.input))
            node.input[k] = rng.choice(names + list(node.output))
            notes.append(f"onnx: {node.name} input {k} -> {node.input[k]!r}")
    elif op == 4:
        version = rng.choice([0, 1, 6, 7, 9, 13, 14, 15, 99, 2**40])
        for entry in model.opset_import:
            entry.version = version
        notes.append(f"onnx: opset -> {version}")
    elif op == 5 and graph.initializer:
        init = rng.choice(graph.initializer)
        init.data_location = onnx.TensorProto.EXTERNAL
        location = rng.choice(["../../etc/passwd", "/etc/passwd", "weights.bin", "", "C:\\x.bin", "a/../../b"])
        del init.external_data[:]
        for k, v in (("location", location), ("offset", rng.choice(["0", "-5", "x", "99999999999"])), ("length", "16")):
            entry = init.external_data.add()
            entry.key, entry.value = k, v
        notes.append(f"onnx: initializer {init.name} external at {location!r}")
    elif op == 6:
        graph.node.insert(rng.randrange(len(graph.node) + 1), rng.choice(graph.node))
        notes.append("onnx: a node duplicated")
    else:
        node = rng.choice(graph.node)
        node.op_type = rng.choice(["BatchNormalization", "Identity", "Cast", "Conv", "If", "Loop", "Constant", "Gemm"])
        notes.append(f"onnx: {node.name} op -> {node.op_type}")
    return model.SerializeToString()


# ---------------------------------------------------------------------------------------------- JSON

JSON_VALUES: tuple[Any, ...] = (None, True, False, -1, 0, 1, 2**31, 2**63, 2**64 + 1, -(2**63) - 1, 1e308, -1e308, 0.5,
                                float("nan"), float("inf"), "", "x" * 5000, "float16", "bfloat16", "F16", "BF16", "I64", "U8",
                                "BOOL", "F64", "BatchNormalization", "Functional", "Sequential", "../../etc/passwd", [], {},
                                [1, 2, 3], [-1], [2**40, 2**40], [[1, [2, [3]]]], {"class_name": "BatchNormalization", "config": {}},
                                {"class_name": "Lambda", "config": {"function": "x"}}, [0, 2**62], [5, 1], [0, 0])


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


def mutate_json_value(rng: random.Random, doc: Any, notes: list[str]) -> tuple[Any, str | None]:
    """(mutated document, optional text to splice in place of the marker string)."""
    paths = _paths(doc)
    path = rng.choice(paths[1:] or paths)
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    op = rng.randrange(6)
    if not path:
        return rng.choice(JSON_VALUES), None
    last = path[-1]
    if op <= 2:
        parent[last] = rng.choice(JSON_VALUES)
        notes.append(f"json: {'/'.join(map(str, path))[-60:]} -> {str(parent[last])[:30]}")
    elif op == 3 and isinstance(parent, dict):
        del parent[last]
        notes.append(f"json: deleted {'/'.join(map(str, path))[-60:]}")
    elif op == 4:
        parent[last] = "\x00SPLICE\x00"
        splice = rng.choice(["[" * 100_000 + "]" * 100_000, "{\"a\":" * 5000 + "1" + "}" * 5000, "1" * 5000, "1e999999",
                             "-0", "[" * 100_000, "\"\\ud800\""])
        notes.append(f"json: {'/'.join(map(str, path))[-60:]} -> {splice[:12]}... ({len(splice)} chars)")
        return doc, splice
    else:
        parent[last] = [parent[last]] * rng.randint(2, 50) if rng.random() < 0.5 else {"wrapped": parent[last]}
        notes.append(f"json: wrapped {'/'.join(map(str, path))[-60:]}")
    return doc, None


def mutate_json(rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return mutate_bytes(rng, data, notes)
    if rng.random() < 0.15:
        return mutate_bytes(rng, data, notes)
    doc, splice = mutate_json_value(rng, doc, notes)
    text = json.dumps(doc)
    if splice is not None:
        text = text.replace('"\\u0000SPLICE\\u0000"', splice)
    return text.encode()


def mutate_safetensors(rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    if len(data) < 8:
        return mutate_bytes(rng, data, notes)
    size = int.from_bytes(data[:8], "little")
    header, body = data[8:8 + size], data[8 + size:]
    op = rng.randrange(6)
    if op == 5:  # a dtype of the same width, or a shape of the same size: the file stays consistent
        try:
            doc = json.loads(header)
            name = rng.choice([k for k in doc if k != "__metadata__"])
            entry = doc[name]
            if rng.random() < 0.5:
                same = {"F32": "I32 U32", "I32": "F32 U32", "F16": "BF16 I16 U16", "BF16": "F16 I16", "I64": "F64 U64 C64",
                        "F64": "I64 C64"}.get(entry["dtype"], "U8 I8 BOOL F8_E4M3")
                entry["dtype"] = rng.choice(same.split())
            else:
                count = 1
                for d in entry["shape"]:
                    count *= d
                entry["shape"] = rng.choice([[count, 1], [1, count], [], [count, 1, 1, 1], list(entry["shape"])[::-1]])
            notes.append(f"safetensors: {name} -> {entry['dtype']} {entry['shape']}")
            header = json.dumps(doc).encode()
            size = len(header)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return mutate_bytes(rng, data, notes)
    elif op <= 2:
        header = mutate_json(rng, header, notes)
        size = len(header)
    elif op == 3:
        size = rng.choice([0, 1, size + 1, size - 1, 2**32, 2**63, 99_999_999, len(data)])
        notes.append(f"safetensors: header length -> {size}")
    else:
        body = body[: rng.randrange(len(body) + 1)]
        notes.append(f"safetensors: data cut to {len(body)} bytes")
    return struct.pack("<Q", size % 2**64) + header + body


# ---------------------------------------------------------------------------------------------- .npy and HDF5


def npy_bytes(header: str, body: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    raw = header.encode("utf-8" if version[0] >= 3 else "latin-1", "replace")
    prefix = 10 if version[0] == 1 else 12
    raw += b" " * (-(prefix + len(raw) + 1) % 64) + b"\n"
    size = struct.pack("<H", len(raw) % 65536) if version[0] == 1 else struct.pack("<I", len(raw))
    return b"\x93NUMPY" + bytes(version) + size + raw + body


def mutate_npy(rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    try:
        major = data[6]
        offset = 10 if major == 1 else 12
        size = int.from_bytes(data[8:offset], "little")
        header = ast.literal_eval(data[offset:offset + size].decode("latin-1"))
        body = data[offset + size:]
        assert isinstance(header, dict)
    except Exception:  # noqa: BLE001 - not a parseable .npy: byte mutations
        return mutate_bytes(rng, data, notes)
    version = (major, 0)
    descr, fortran, shape = header.get("descr", "<f4"), header.get("fortran_order", False), header.get("shape", (1,))
    text = None
    op = rng.randrange(10)
    if op == 0:
        shape = rng.choice([(-1, 3, 16, 16), (2**62, 3, 16, 16), (2**40,), (0, 3, 16, 16), (), (4, 0, 16, 16), (4, 3, 16, 16, 1),
                            (4, 3, 16), (1, 768), (2**31, 3, 16, 16), (4, 3, 16, 2**61), [4, 3, 16, 16], (4, True, 16, 16),
                            (4.0, 3, 16, 16), (4, (3,), 16, 16)])
    elif op == 1:
        fortran = rng.choice([True, 1, "yes", None])
    elif op == 2:
        descr = rng.choice([">f2", "<f2", ">f4", "<f8", ">f8", "|O", "<U4", "|b1", "<c8", "<M8[ns]", "|V16", "<i8", "|u1", "|S3",
                            "xyz", [("a", "<f4")], [("a", "<f4", (2,))], {"descr": "<f4"}, "<f16", ">i2", "<m8[s]", ""])
    elif op == 3:
        text = rng.choice(["{'descr': {'descr': {'descr': '<f4'}}, 'fortran_order': False, 'shape': (4,)}",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3, 16, 16), 'extra': 1}",
                           "{'descr': '<f4', 'shape': (4, 3, 16, 16)}", "__import__('os').system('true')",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * 3000 + ")" * 3000 + "}",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': (" + "1, " * 5000 + ")}",
                           "[1, 2, 3]", "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3, 16, 16)", "", "\x00" * 40,
                           "{'descr': '<f4', 'fortran_order': False, 'shape': (10**400,)}",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3, 16, 16)} # é"])
    elif op == 4:
        version = rng.choice([(2, 0), (3, 0), (4, 0), (0, 0), (1, 5)])
    elif op == 5:
        body = body[: rng.randrange(len(body) + 1)]
        notes.append(f"npy: data cut to {len(body)} bytes")
    elif op == 6:
        body = body + body[: rng.randrange(len(body) + 1)]
        notes.append("npy: data extended")
    elif op == 7:
        notes.append("npy: header length field")
        out = bytearray(npy_bytes(repr({"descr": descr, "fortran_order": fortran, "shape": shape}), body, version))
        field_end = 10 if version[0] == 1 else 12
        out[8:field_end] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x10\x00\x00\x00", b"\xa0\x86\x01\x00"])[: field_end - 8]
        return bytes(out)
    elif op == 8:
        spoiled = bytearray(body)
        for _ in range(rng.randint(1, 64) if spoiled else 0):
            spoiled[rng.randrange(len(spoiled))] = 0xFF  # 0xFF in a float's exponent bytes: NaN or Inf
        body = bytes(spoiled)
        notes.append("npy: NaN-ish bytes in the data")
    else:
        return mutate_bytes(rng, data, notes)
    if op <= 4:
        text = text if text is not None else repr({"descr": descr, "fortran_order": fortran, "shape": shape})
        notes.append(f"npy: header {text[:80]!r} v{version[0]}.{version[1]}")
    return npy_bytes(text if text is not None else repr({"descr": descr, "fortran_order": fortran, "shape": shape}), body, version)


HDF5_SIGNATURES = (b"OHDR", b"OCHK", b"TREE", b"HEAP", b"SNOD", b"GCOL", b"FRHP", b"FSHD", b"BTHD", b"BTLF", b"GHEAP")


def mutate_hdf5(rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    buf = bytearray(data)
    if not buf or rng.random() < 0.2:
        return mutate_bytes(rng, data, notes)
    spots = [i for sig in HDF5_SIGNATURES for i in find_all(data, sig)]
    count = rng.randint(1, 12)
    for _ in range(count):
        if spots and rng.random() < 0.5:
            at = min(len(buf) - 1, rng.choice(spots) + rng.randrange(64))
        elif rng.random() < 0.6:
            at = rng.randrange(min(len(buf), 4096))
        else:
            at = rng.randrange(len(buf))
        if rng.random() < 0.3:
            word = rng.choice(INTERESTING_WORDS)
            buf[at:at + len(word)] = word
        else:
            buf[at] = rng.randrange(256)
    notes.append(f"hdf5: {count} random bytes/words")
    return bytes(buf)


def find_all(data: bytes, needle: bytes) -> list[int]:
    out, at = [], data.find(needle)
    while at >= 0 and len(out) < 200:
        out.append(at)
        at = data.find(needle, at + 1)
    return out
