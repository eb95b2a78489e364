"""Readers never wait on a named pipe: through the Python API too (the CLI guards its own arguments)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnlint.fileio import NotRegularFile, open_regular

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")


def test_open_regular_refuses_pipes_and_folders(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.pt")
    with pytest.raises(NotRegularFile, match="named pipe"):
        open_regular(tmp_path / "pipe.pt")
    with pytest.raises(OSError):
        open_regular(tmp_path)
    (tmp_path / "file.pt").write_bytes(b"abc")
    with open_regular(tmp_path / "file.pt") as handle:
        assert handle.read() == b"abc"


def test_api_model_pipe_and_data_pipes_end_in_one_line_each(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.pt")
    os.mkfifo(tmp_path / "data.npz")
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(FIXTURES / "data" / "convnet_tiny.npz", shards / "a.npz")
    os.mkfifo(shards / "b.npz")  # a pipe among the shards is skipped, never opened
    code = textwrap.dedent(f"""
        from bnlint.api import lint_paths
        from bnlint.dynamic import DynamicOptions
        print(lint_paths([{str(tmp_path / 'model.pt')!r}]).errors[0].message)
        report = lint_paths([{str(FIXTURES / 'convnet.onnx')!r}], dynamic=DynamicOptions(data={str(tmp_path / 'data.npz')!r}))
        print(report.files[0].dynamic_error)
        report = lint_paths([{str(FIXTURES / 'convnet.onnx')!r}], dynamic=DynamicOptions(data={str(shards)!r}))
        print(report.files[0].dynamic_error, len(report.files[0].layer_stats))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "named pipe" in lines[0]
    assert "named pipe" in lines[1]
    assert lines[2] == "None 3"  # the regular shard was measured
