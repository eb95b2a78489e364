"""`bnlint fix` output lints clean: without --data and with the --data it was fixed on.

The fix sets the statistics exactly (a cumulative average over the data); a num_batches_tracked
equal to the fix's batch count read as a short EMA history (BN105: "initial values still make up
43%"). Each format `bnlint fix` writes is fixed once and linted twice through the real CLI
(subprocesses: fix and --data run the model in an isolated child, 3-5 s a call), so the number
of runs is kept small: the fixes run concurrently and the lints take every output at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BNLINT = [sys.executable, "-m", "bnlint"]
ARCH = ["--arch", "fixtures/models.py:convnet"]
TORCH_DATA, KERAS_DATA = "fixtures/data/convnet_shifted.npz", "fixtures/data/keras_shifted.npz"

# format -> (fixture, the data it is fixed on, extra arguments). A pickled nn.Module is not in the
# list: running it needs --trust (or --arch, which makes it the state-dict case).
CASES: dict[str, tuple[str, str, list[str]]] = {
    "torchscript": ("fixtures/convnet_scripted.pt", TORCH_DATA, []),
    "state-dict": ("fixtures/convnet_state_dict.pt", TORCH_DATA, ARCH),
    "onnx": ("fixtures/convnet.onnx", TORCH_DATA, []),
    "keras": ("fixtures/keras/keras_convnet.keras", KERAS_DATA, []),
}


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BNLINT, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _lint(paths: list[str], *extra: str) -> tuple[int, dict[str, list[dict[str, Any]]], str]:
    done = _run(["--format", "json", "--fail-on", "warning", *paths, *extra])
    files = json.loads(done.stdout)["files"] if done.stdout.strip() else []
    assert all(f["error"] is None for f in files), done.stdout + done.stderr
    return done.returncode, {f["path"]: f["findings"] for f in files}, done.stderr


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("fixed")
    targets = {name: str(out / f"fixed_{name.replace('-', '_')}{Path(src).suffix}") for name, (src, _, _) in CASES.items()}
    running = {name: subprocess.Popen([*BNLINT, "fix", src, "--data", data, *extra, "-o", targets[name]], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, (src, data, extra) in CASES.items()}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0 and Path(targets[name]).is_file(), f"{name}: {stdout}{stderr}"
    return targets


@pytest.fixture(scope="module")
def linted(fixed: dict[str, str]) -> dict[str, tuple[int, dict[str, list[dict[str, Any]]], str]]:
    """Four CLI runs: every output without --data, then each group with the data it was fixed on
    (--arch only with the state dict: given with other files it would replace their own graphs)."""
    return {"static": _lint(list(fixed.values())),
            **{group: _lint([fixed[n] for n in CASES if _group(n) == group], "--data", CASES[names[0]][1], *CASES[names[0]][2])
               for group, names in _groups().items()}}


def _group(name: str) -> str:
    return f"{CASES[name][1]} {' '.join(CASES[name][2])}"


def _groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in CASES:
        groups.setdefault(_group(name), []).append(name)
    return groups


@pytest.mark.parametrize("name", list(CASES))
def test_fixed_model_lints_clean(name: str, fixed: dict[str, str], linted: dict[str, Any]) -> None:
    for run in ("static", _group(name)):
        code, findings, stderr = linted[run]
        bad = [f"{f['code']} [{f['severity']}] {f['layer']}: {f['message']}" for f in findings[fixed[name]]
               if f["severity"] in ("warning", "error")]
        assert bad == [], f"{name}, {run} run:\n" + "\n".join(bad)
        assert code == 0, f"{run}: exit {code}\n{stderr}"  # no other output of the run failed either


def test_fixed_counter_is_not_a_short_batch_count(fixed: dict[str, str]) -> None:
    """The input's larger counter is kept (301 > 256 samples > 8 batches)."""
    import torch

    scripted = torch.jit.load(fixed["torchscript"])
    state = torch.load(fixed["state-dict"], weights_only=True)
    for name in ("bn1", "bn2", "bn3"):
        assert int(getattr(scripted, name).num_batches_tracked) == 301
        assert int(state[f"{name}.num_batches_tracked"]) == 301


def test_recalibration_counter_with_a_short_history_is_the_sample_count() -> None:
    """An input counter below the data's size becomes the number of samples averaged, never the batch count."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT))
    from bnlint.fix import recalibrate_module
    from fixtures.models import convnet

    model = convnet().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.num_batches_tracked.fill_(3)
    x = np.load(ROOT / TORCH_DATA, allow_pickle=False)["input"][:96]
    result = recalibrate_module(model, [x[i:i + 32] for i in range(0, 96, 32)])
    assert result.batches == 3 and result.samples == 96
    for layer in result.layers:
        assert int(model.get_submodule(layer.module).num_batches_tracked) == layer.calls == 96
        assert layer.old_num_batches_tracked == 3
