"""`torchrun --nproc_per_node 2 -m bnlint fix ...` on the CPU (gloo): each process reads its shard of
the data, the per-layer moments are merged exactly, and the file written equals the one-process
result to 1e-12 relative (the README's command)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["fix", "fixtures/convnet_state_dict.pt", "--arch", "fixtures/models.py:convnet", "--data",
        "fixtures/data/convnet_shards", "--batch-size", "8"]


def test_two_processes_equal_one(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    one = subprocess.run([sys.executable, "-m", "bnlint", *ARGS, "-o", str(single)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "bnlint", *ARGS, "-o", str(double)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 reports, once
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    for key in a:
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(b[key].double().numpy(), a[key].double().numpy(), rtol=1e-12, atol=0)
        else:
            assert torch.equal(a[key], b[key]), key
