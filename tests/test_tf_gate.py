"""The TensorFlow op gate (bnlint.dynamic.tf_gate), attacked with structure-aware SavedModels.

Each attack takes a real SavedModel fixture and splices a node into it at the protobuf level:
into the serving function (the one holding the FusedBatchNorm), into a function the serving
signature never reaches, and into the top-level graph (where TF1 keeps its restore and init
ops, run at load time). A file-touching op anywhere needs --trust; checkpoint I/O is allowed off
the serving path only, where every SavedModel has it. None of this needs TensorFlow: the gate
runs from the file's bytes before TensorFlow is imported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.dynamic.tf_gate import CHECKPOINT_OPS, COMPUTE_OPS, vet_savedmodel
from bnlint.errors import InputError, TrustRequired
from bnlint.protowire import LEN, iter_fields
from tests.proto_bytes import field, varint

ROOT = Path(__file__).resolve().parents[1]
TF = ROOT / "fixtures" / "tf_formats"
DATA = ROOT / "fixtures" / "data" / "convnet_tiny.npz"

Chooser = Callable[[bytes], bool]


def node(name: str, op: str, *inputs: str) -> bytes:
    """A NodeDef: name 1, op 2, input 3."""
    return field(1, name.encode()) + field(2, op.encode()) + b"".join(field(3, i.encode()) for i in inputs)


def splice(buf: bytes, path: list[tuple[int, Chooser]], extra: bytes) -> bytes:
    """`buf` with `extra` appended inside the message reached by `path` (field number, which
    occurrence), every enclosing length rewritten."""
    if not path:
        return buf + extra
    (number, choose), rest = path[0], path[1:]
    out, pos, done = bytearray(), 0, False
    for f in iter_fields(buf):
        if done or f.number != number or f.wire_type != LEN or not choose(bytes(buf[f.start:f.end])):
            continue
        header = f.start - len(varint(f.value)) - f.key_len
        out += buf[pos:header] + field(number, splice(bytes(buf[f.start:f.end]), rest, extra))
        pos, done = f.end, True
    assert done, f"no field {number} to splice into"
    return bytes(out + buf[pos:])


def first(_: bytes) -> bool:
    return True


def holding(text: bytes) -> Chooser:
    return lambda payload: text in payload


# SavedModel.meta_graphs 2 -> MetaGraphDef.graph_def 2 -> GraphDef.library 2 -> FunctionDefLibrary.function 1
# The Keras-2 fixtures' serving signature calls `__inference__wrapped_model_N`; the per-layer
# `..._layer_call_and_return_conditional_losses_N` traces are kept for Keras but never run.
SERVING_FUNCTION = [(2, first), (2, first), (2, first), (1, holding(b"__inference__wrapped_model"))]
OTHER_FUNCTION = [(2, first), (2, first), (2, first), (1, holding(b"bn1_layer_call_and_return_conditional_losses"))]
TOP_GRAPH = [(2, first), (2, first)]
NODE_FIELD = {"function": 3, "graph": 1}  # FunctionDef.node_def 3, GraphDef.node 1


def planted(tmp_path: Path, where: list[tuple[int, Chooser]], op: str, fixture: str = "savedmodel_healthy") -> Path:
    folder = tmp_path / f"{fixture}_{op}"
    shutil.copytree(TF / fixture, folder)
    pb = folder / "saved_model.pb"
    number = NODE_FIELD["graph" if where is TOP_GRAPH else "function"]
    pb.write_bytes(splice(pb.read_bytes(), where, field(number, node("planted", op))))
    return folder


@pytest.mark.parametrize("fixture", sorted(p.name for p in TF.glob("savedmodel_*")))
def test_every_savedmodel_fixture_passes_the_gate(fixture: str) -> None:
    vet_savedmodel(str(TF / fixture), trust=False)


@pytest.mark.parametrize("where", [SERVING_FUNCTION, OTHER_FUNCTION, TOP_GRAPH], ids=["serving", "other-function", "graph"])
@pytest.mark.parametrize("op", ["WriteFile", "ReadFile", "ImmutableConst", "PyFunc", "EagerPyFunc", "MatchingFiles",
                                "InitializeTableFromTextFileV2", "DebugIdentityV2", "NotARealOp"])
def test_file_and_python_ops_anywhere_need_trust(tmp_path: Path, where: list[tuple[int, Chooser]], op: str) -> None:
    folder = planted(tmp_path, where, op)
    with pytest.raises(TrustRequired, match=rf"{op} \((function|graph node) '"):
        vet_savedmodel(str(folder), trust=False)
    vet_savedmodel(str(folder), trust=True)  # --trust: the user's call (the run is still isolated)


@pytest.mark.parametrize("op", sorted(CHECKPOINT_OPS))
def test_checkpoint_io_is_refused_on_the_serving_path_only(tmp_path: Path, op: str) -> None:
    with pytest.raises(TrustRequired, match=op):
        vet_savedmodel(str(planted(tmp_path, SERVING_FUNCTION, op)), trust=False)
    vet_savedmodel(str(planted(tmp_path / "a", OTHER_FUNCTION, op)), trust=False)


def test_a_tf1_init_op_that_writes_files_is_refused(tmp_path: Path) -> None:
    """TF1 SavedModels run their restore and init ops from the top-level graph at load time."""
    folder = planted(tmp_path, TOP_GRAPH, "WriteFile", fixture="savedmodel_tf1")
    with pytest.raises(TrustRequired, match="WriteFile"):
        vet_savedmodel(str(folder), trust=False)


def test_the_allowlists_hold_no_file_or_python_op() -> None:
    dangerous = {"WriteFile", "ReadFile", "ImmutableConst", "PyFunc", "EagerPyFunc", "PyFuncStateless", "MatchingFiles",
                 "Save", "SaveV2", "RestoreV2", "MergeV2Checkpoints", "PrintV2", "DebugIdentityV2", "LoadAndRemapMatrix",
                 "InitializeTableFromTextFileV2", "TFRecordDataset", "FixedLengthRecordDataset"}
    assert not COMPUTE_OPS & dangerous
    assert CHECKPOINT_OPS <= dangerous | {"SaveSlices", "Restore", "RestoreSlice"}


def test_a_malformed_saved_model_is_one_input_error(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(TF / "savedmodel_healthy", folder)
    (folder / "saved_model.pb").write_bytes(b"\x12\xff\xff\xff\xff\x0f")
    with pytest.raises(InputError) as caught:
        vet_savedmodel(str(folder), trust=False)
    assert not isinstance(caught.value, TrustRequired)


def test_cli_data_run_is_refused_before_tensorflow_with_the_static_findings_kept(tmp_path: Path) -> None:
    """Through the CLI: the refusal comes from the gate (TensorFlow is not needed to refuse), exit 2,
    the op named, and --trust named as the way."""
    folder = planted(tmp_path, SERVING_FUNCTION, "WriteFile")
    result = CliRunner().invoke(main, [str(folder), "--data", str(DATA), "--format", "json"])
    assert result.exit_code == 2, result.output
    (entry,) = json.loads(result.stdout)["files"]
    assert "WriteFile" in entry["dynamic_error"] and "--trust" in entry["dynamic_error"]
    static = CliRunner().invoke(main, [str(folder), "--format", "json"])
    assert static.exit_code == 0, static.output  # the planted node is not a BatchNorm finding


def test_cli_fix_is_refused_too(tmp_path: Path) -> None:
    folder = planted(tmp_path, SERVING_FUNCTION, "ReadFile")
    out = tmp_path / "fixed"
    result = CliRunner().invoke(main, ["fix", str(folder), "--data", str(DATA), "-o", str(out), "--min-samples", "1"])  # the gate, not the size
    assert result.exit_code == 2
    assert not out.exists()
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "ReadFile" in text or "needs TensorFlow" in text  # without TensorFlow the fix stops even earlier
