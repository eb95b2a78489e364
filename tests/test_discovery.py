"""Folder search like a linter searches a repository: .gitignore, environments, --exclude, symlinks."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.discovery import discover

ROOT = Path(__file__).resolve().parent.parent
HEALTHY = ROOT / "fixtures" / "convnet_state_dict.pt"


def _tree(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    shutil.copy(HEALTHY, repo / "models" / "net.pt")
    venv = repo / ".venv" / "lib" / "site-packages" / "pkg"
    venv.mkdir(parents=True)
    (repo / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    shutil.copy(HEALTHY, venv / "theirs.pt")
    env = repo / "env2"
    env.mkdir()
    (env / "pyvenv.cfg").write_text("home = /usr\n")
    shutil.copy(HEALTHY, env / "theirs.pt")
    (repo / "build").mkdir()
    shutil.copy(HEALTHY, repo / "build" / "artefact.pt")
    (repo / "scratch").mkdir()
    shutil.copy(HEALTHY, repo / "scratch" / "tmp.pt")
    return repo


def test_environments_and_caches_are_never_searched(tmp_path: Path) -> None:
    repo = _tree(tmp_path)
    files, _ = discover([repo], respect_gitignore=False)
    names = sorted(p.relative_to(repo).as_posix() for p in files)
    assert names == ["build/artefact.pt", "models/net.pt", "scratch/tmp.pt"]


def test_gitignore_is_respected(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = _tree(tmp_path)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("build/\n")
    files, _ = discover([repo])
    assert sorted(p.relative_to(repo).as_posix() for p in files) == ["models/net.pt", "scratch/tmp.pt"]


def test_exclude_globs_from_the_cli_and_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _tree(tmp_path)
    monkeypatch.chdir(repo)
    (repo / "bnlint.toml").write_text('extend-exclude = ["build"]\n')
    result = CliRunner().invoke(main, [".", "--format", "json", "--exclude", "scratch/*"], catch_exceptions=False)
    assert [f["path"] for f in json.loads(result.stdout)["files"]] == ["models/net.pt"]


def test_a_symlinked_file_is_linted_once_and_a_dangling_one_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(HEALTHY, folder / "a.pt")
    (folder / "b.pt").symlink_to(folder / "a.pt")
    (folder / "gone.pt").symlink_to(folder / "missing.pt")
    monkeypatch.chdir(tmp_path)
    walked = CliRunner().invoke(main, ["m", "--format", "json"], catch_exceptions=False)
    named = CliRunner().invoke(main, ["m/gone.pt", "--format", "json"], catch_exceptions=False)
    files = json.loads(walked.stdout)["files"]
    assert sorted(f["path"] for f in files) == ["m/a.pt", "m/gone.pt"] and walked.exit_code == 2
    gone = next(f for f in files if f["path"] == "m/gone.pt")
    assert gone["error"] == json.loads(named.stdout)["files"][0]["error"] == "no such file"


def test_walk_is_iterative_and_skips_non_regular_files(tmp_path: Path) -> None:
    import inspect
    import os
    import sys

    from bnlint.discovery import search

    deep = tmp_path
    for _ in range(200):
        deep = deep / "d"
    deep.mkdir(parents=True)
    shutil.copy(HEALTHY, deep / "m.pt")
    notes: list[str] = []
    search(tmp_path, respect_gitignore=False)  # first-use imports and regex compiles run under the normal limit
    limit = sys.getrecursionlimit()
    depth = len(inspect.stack(0))
    sys.setrecursionlimit(depth + 50)  # a recursive walk could not go 200 folders deep under this limit
    try:
        found = search(tmp_path, respect_gitignore=False, notes=notes)
    finally:
        sys.setrecursionlimit(limit)
    assert found == [deep / "m.pt"]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.onnx")
        files, notes = discover([tmp_path], respect_gitignore=False)
        assert files == [deep / "m.pt"] and any("pipe.onnx: skipped: a named pipe" in n for n in notes)


def _onnx_zoo_folder(root: Path) -> Path:
    """An ONNX model zoo layout: model.onnx beside test_data_set_0/{input_0,output_0}.pb (TensorProto),
    plus a CoreML weight.bin found by its extension (both seen in shipped packages)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    values = {"scale": np.ones(4, np.float32), "B": np.zeros(4, np.float32), "mean": rng.normal(0, 0.1, 4).astype(np.float32),
              "var": rng.uniform(0.5, 2, 4).astype(np.float32)}
    graph = helper.make_graph([helper.make_node("BatchNormalization", ["x", "scale", "B", "mean", "var"], ["y"], name="bn")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in values.items()])
    folder = root / "zoo"
    (folder / "test_data_set_0").mkdir(parents=True)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), folder / "model.onnx")
    for name in ("input_0", "output_0"):
        tensor = numpy_helper.from_array(rng.normal(size=(1, 4, 2, 2)).astype(np.float32), name)
        (folder / "test_data_set_0" / f"{name}.pb").write_bytes(tensor.SerializeToString())
    (folder / "weights").mkdir()
    (folder / "weights" / "weight.bin").write_bytes(bytes(range(256)) * 4)
    return folder


def test_folder_search_skips_data_files_it_found_by_extension(tmp_path: Path) -> None:
    """`bnlint DIR` on a model zoo folder exited 2: every test input was 'not a valid ONNX file'. Files
    a folder search picked by extension that hold no model are notes; the model is linted."""
    from click.testing import CliRunner

    from bnlint.cli import main

    folder = _onnx_zoo_folder(tmp_path)
    result = CliRunner().invoke(main, [str(folder)])
    assert result.exit_code == 0, result.output
    assert "1 file" in result.output and "ONNX test data" in result.stderr and "weight.bin: skipped" in result.stderr
    # Named on the command line, the same data file is an error (the user asked for it), one line.
    named = CliRunner().invoke(main, [str(folder / "test_data_set_0" / "input_0.pb")])
    assert named.exit_code == 2 and "error: ONNX test data (a TensorProto" in named.output
    skipped = CliRunner().invoke(main, [str(folder / "test_data_set_0" / "input_0.pb"), "--skip-unrecognised"])
    assert skipped.exit_code == 0


def test_many_skipped_files_are_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bnlint.cli import main

    folder = _onnx_zoo_folder(tmp_path)
    data = (folder / "test_data_set_0" / "input_0.pb").read_bytes()
    for i in range(1, 6):
        (folder / f"test_data_set_{i}").mkdir()
        (folder / f"test_data_set_{i}" / "input_0.pb").write_bytes(data)
    result = CliRunner().invoke(main, [str(folder)])
    lines = [line for line in result.stderr.splitlines() if "ONNX test data" in line]
    assert result.exit_code == 0 and len(lines) == 1 and lines[0].startswith("bnlint: skipped 7 files: ONNX test data")


def test_a_git_lfs_pointer_found_by_a_folder_search_is_still_an_error(tmp_path: Path) -> None:
    """A pointer stands in for a model that was not checked (LFS not pulled in CI): unlike a data
    file, skipping it would turn an unchecked model into a clean exit."""
    from click.testing import CliRunner

    from bnlint.cli import main

    folder = _onnx_zoo_folder(tmp_path)
    (folder / "resnet.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    result = CliRunner().invoke(main, [str(folder)])
    assert result.exit_code == 2 and "resnet.pt: error: a Git LFS pointer" in result.output
    assert CliRunner().invoke(main, [str(folder), "--skip-unrecognised"]).exit_code == 0


def test_an_unrecognised_file_under_a_model_only_extension_stays_an_error(tmp_path: Path) -> None:
    """An attacker's model in a form the sniffers miss must not pass a folder lint as a note: only
    extensions data shares with models (.bin, .pb, .h5, .hdf5) are skipped when they hold no model."""
    from click.testing import CliRunner

    from bnlint.cli import main

    folder = _onnx_zoo_folder(tmp_path)  # its weight.bin and TensorProto .pb files are skipped
    (folder / "weights" / "model.pt").write_bytes(bytes(range(256)) * 4)
    result = CliRunner().invoke(main, [str(folder)])
    assert result.exit_code == 2 and "model.pt: error: not a recognised model file" in result.output
    assert "weight.bin: skipped" in result.stderr


@pytest.mark.parametrize("head", [b"\xff" * 512, b"\x08" + b"\xff" * 511, b"\x12\xff\xff\xff\xff\x0f", b"\x0b\x0c" * 256,
                                  b"\x10\x01" * 256, b"\x08\x01\x12\x7f" + b"\x00" * 20, b""])
def test_protobuf_sniffers_take_hostile_heads_in_stride(tmp_path: Path, head: bytes) -> None:
    """Overlong varints, groups, lengths past the window, a field repeated 256 times: the leading-field
    reader stops (at most 64 fields of a 512-byte head), and the sniffers answer or name the file as data."""
    from bnlint.errors import NotAModel
    from bnlint.formats import Sniff
    from bnlint.loaders.sniff import onnx_by_content, onnx_tensor
    from bnlint.protowire import leading_fields

    assert len(leading_fields(head, 64)) <= 64
    file = Sniff(tmp_path / "x.pb", head)
    assert onnx_by_content(file) in (True, False)
    try:
        assert onnx_tensor(file) is False
    except NotAModel:
        assert head.startswith(b"\x10")  # the data_type-first TensorProto shape
