"""bnlint.fix.publish: a fixed model and its companions moved into place, crash-consistent.

Each failure test makes one `os.replace` (or the copy beside the target) fail at a chosen step and
checks that the original model and its external data still load together with `onnx.load`, and
that nothing new is left in the folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnlint.errors import OutputError
from bnlint.fix import publish as publish_module
from bnlint.fix.publish import publish

SIZE = 512  # float32 values: 2 KiB, above onnx's 1 KiB external-data threshold


def _model(value: float) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.full(SIZE, value, dtype=np.float32), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SIZE])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(model: onnx.ModelProto, path: Path, location: str | None) -> None:
    if location is None:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)


def _value(path: Path) -> float:
    model = onnx.load(str(path))  # loads the external data it names: fails if the pair is broken
    return float(numpy_helper.to_array(model.graph.initializer[0])[0])


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """An input model.onnx + model.onnx.data (value 1.0, mode 0644) and a staged fix (value 2.0)
    whose companion has the SAME name as the input's data file: the in-place hard case."""
    out = tmp_path / "out"
    out.mkdir()
    model = out / "model.onnx"
    _save(_model(1.0), model, "model.onnx.data")
    os.chmod(model, 0o644)
    stage = tmp_path / "stage"
    stage.mkdir()
    staged = stage / "model.onnx"
    _save(_model(2.0), staged, "model.onnx.data")
    os.chmod(staged, 0o600)
    return model, staged


def test_in_place_with_external_data_of_the_same_name(pair: tuple[Path, Path]) -> None:
    model, staged = pair
    published = publish(staged, model, source=model, in_place=True)
    assert _value(model) == 2.0
    assert published[0] == model and all(p.exists() for p in published)
    # The usual name is back and the old data is gone: only the pair remains.
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert stat.S_IMODE(model.stat().st_mode) == 0o644  # the input's mode, not the staging file's 0600


def _fail_at(monkeypatch: pytest.MonkeyPatch, step: int) -> list[int]:
    calls = [0]
    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls[0] += 1
        if calls[0] == step:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(publish_module.os, "replace", replace)
    return calls


@pytest.mark.parametrize("step", [1, 2])
def test_a_failed_rename_leaves_the_original_pair_loadable(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Step 1: the new data's rename; step 2: the model's (the switch). Either way: old pair, no debris."""
    model, staged = pair
    before = sorted(p.name for p in model.parent.iterdir())
    _fail_at(monkeypatch, step)
    with pytest.raises(OutputError, match="No space left"):
        publish(staged, model, source=model, in_place=True)
    assert _value(model) == 1.0
    assert sorted(p.name for p in model.parent.iterdir()) == before


def test_a_failure_after_the_switch_leaves_the_new_pair_loadable(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 3 (the second switch, giving the data its usual name back) failing: still a valid pair."""
    model, staged = pair
    _fail_at(monkeypatch, 3)
    publish(staged, model, source=model, in_place=True)
    assert _value(model) == 2.0


def test_a_failed_copy_leaves_nothing(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model, staged = pair
    before = sorted(p.name for p in model.parent.iterdir())
    real = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 2:  # the model's temporary copy, after the data's
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(publish_module.os, "fsync", fsync)
    with pytest.raises(OutputError, match="Input/output error"):
        publish(staged, model, source=model, in_place=True)
    assert _value(model) == 1.0
    assert sorted(p.name for p in model.parent.iterdir()) == before


def test_new_output_beside_the_input_keeps_the_input_data(pair: tuple[Path, Path]) -> None:
    model, staged = pair
    stage = staged.parent
    fixed_stage = stage / "fixed.onnx"
    _save(_model(3.0), fixed_stage, "fixed.onnx.data")
    staged.unlink()
    (stage / "model.onnx.data").unlink()
    target = model.parent / "fixed.onnx"
    published = publish(fixed_stage, target, source=model, in_place=False)
    assert [p.name for p in published] == ["fixed.onnx", "fixed.onnx.data"]
    assert _value(target) == 3.0 and _value(model) == 1.0
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_in_place_through_a_symlink_fixes_the_target_and_keeps_the_link(pair: tuple[Path, Path], tmp_path: Path) -> None:
    model, staged = pair
    link = tmp_path / "link.onnx"
    link.symlink_to(model)
    publish(staged, link, source=link, in_place=True)
    assert link.is_symlink() and os.readlink(link) == str(model)
    assert _value(model) == 2.0


def test_plain_model_without_companions(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    _save(_model(1.0), source, None)
    os.chmod(source, 0o640)
    stage = tmp_path / "stage"
    stage.mkdir()
    _save(_model(5.0), stage / "m.onnx", None)
    assert publish(stage / "m.onnx", source, source=source, in_place=True) == [source]
    assert _value(source) == 5.0 and stat.S_IMODE(source.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "stage"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_an_output_error(pair: tuple[Path, Path]) -> None:
    model, staged = pair
    os.chmod(model.parent, 0o555)
    try:
        with pytest.raises(OutputError, match="cannot write"):
            publish(staged, model, source=model, in_place=True)
    finally:
        os.chmod(model.parent, 0o755)
    assert _value(model) == 1.0


def test_permission_error_is_an_output_error(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """As root the read-only test above cannot run: the same failure, simulated at mkstemp."""
    model, staged = pair

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(publish_module.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="Permission denied"):
        publish(staged, model, source=model, in_place=True)
    assert _value(model) == 1.0


def test_missing_output_folder(pair: tuple[Path, Path], tmp_path: Path) -> None:
    model, staged = pair
    with pytest.raises(OutputError, match="does not exist"):
        publish(staged, tmp_path / "nowhere" / "fixed.onnx", source=model, in_place=False)


def test_non_onnx_companion_over_an_existing_file_is_refused(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "m.pt").write_bytes(b"model")
    (stage / "side.bin").write_bytes(b"new")
    (tmp_path / "side.bin").write_bytes(b"old")
    with pytest.raises(OutputError, match="only an ONNX"):
        publish(stage / "m.pt", tmp_path / "m.pt", source=stage / "m.pt", in_place=False)
    assert (tmp_path / "side.bin").read_bytes() == b"old" and not (tmp_path / "m.pt").exists()


def _single(tmp_path: Path) -> tuple[Path, Path]:
    """An input model.onnx (value 1.0, mode 0644) and a staged fix (value 2.0), no external data."""
    (tmp_path / "out").mkdir()
    (tmp_path / "stage").mkdir()
    model, staged = tmp_path / "out" / "model.onnx", tmp_path / "stage" / "model.onnx"
    _save(_model(1.0), model, None)
    os.chmod(model, 0o644)
    _save(_model(2.0), staged, None)
    os.chmod(staged, 0o600)
    return model, staged


def test_a_staged_file_on_the_same_file_system_is_moved_not_copied(tmp_path: Path) -> None:
    model, staged = _single(tmp_path)
    inode = os.stat(staged).st_ino
    publish(staged, model, source=model, in_place=True)
    assert _value(model) == 2.0 and stat.S_IMODE(os.stat(model).st_mode) == 0o644
    assert os.stat(model).st_ino == inode and not staged.exists()  # renamed into place: no second copy of the bytes


def test_a_staged_file_on_another_file_system_is_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, staged = _single(tmp_path)
    monkeypatch.setattr(publish_module, "_same_device", lambda path, folder: False)
    inode = os.stat(staged).st_ino
    publish(staged, model, source=model, in_place=True)
    assert _value(model) == 2.0 and stat.S_IMODE(os.stat(model).st_mode) == 0o644
    assert os.stat(model).st_ino != inode and staged.exists()
