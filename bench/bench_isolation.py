"""What isolating the model run costs: `bnlint M --data D` (the model runs in the sandboxed child)
against the same lint done in one process (load, measure, judge, render: what bnlint did before
bnlint.sandbox), as ratios measured in one run.

    python bench/bench_isolation.py [--repeat 3] [--images 32] [--skip-resnet]

Issue 12's target: within 1.15x of the in-process wall time, on the fixture convnet and on a
ResNet-50 state dict. Both sides are fresh processes (interpreter start and imports included),
run alternately so a noisy machine slows both alike. Timings print, nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"

IN_PROCESS = """
import sys
from pathlib import Path
from bnlint.config import Config
from bnlint.context import RuleContext
from bnlint.dynamic import DynamicOptions, measure
from bnlint.engine import run_rules
from bnlint.findings import FileResult, Report
from bnlint.loaders import load_model
from bnlint.report import write_report
from bnlint.rules import all_rules

model_path, data, arch = sys.argv[1], sys.argv[2], sys.argv[3] or None
config = Config()
model = load_model(model_path)
model.path = model_path
measured = measure(model, DynamicOptions(data=data, arch=arch, quiet=True), config)
result = FileResult(path=model_path, format=model.format, layer_count=len(model.layers))
result.layer_stats.extend(measured.layer_stats)
result.findings.extend(run_rules(RuleContext(model=model, config=config, measurements=measured)))
write_report(Report(files=[result]), all_rules(), "text", sys.stdout, tool_version="bench")
sys.stdout.flush()
import os
os._exit(0)  # as the bnlint command ends (no interpreter teardown): the comparison is the run itself
"""


def _time(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1) or "Traceback" in done.stderr:  # a crash exits 1 too: never time one
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {(done.stderr or done.stdout)[-500:]}")
    return elapsed


def _compare(label: str, model: Path, data: Path, arch: str | None, repeat: int) -> None:
    isolated = [sys.executable, "-m", "bnlint", str(model), "--data", str(data), "--exit-zero", "-q"] + (["--arch", arch] if arch else [])
    in_process = [sys.executable, "-c", IN_PROCESS, str(model), str(data), arch or ""]
    _time(isolated)  # warm the page cache and bytecode
    _time(in_process)
    a, b = [], []
    for _ in range(repeat):
        a.append(_time(isolated))
        b.append(_time(in_process))
    best_a, best_b = min(a), min(b)
    print(f"{label:34s} isolated {best_a:7.2f} s   in-process {best_b:7.2f} s   ratio {best_a / best_b:5.2f}x  (best of {repeat})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    _compare("convnet TorchScript (256 samples)", FIXTURES / "convnet_scripted.pt", FIXTURES / "data" / "convnet_shifted.npz", None, args.repeat)
    _compare("convnet ONNX (256 samples)", FIXTURES / "convnet.onnx", FIXTURES / "data" / "convnet_shifted.npz", None, args.repeat)
    if args.skip_resnet:
        return
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from resnet import resnet50

    with tempfile.TemporaryDirectory() as folder:
        weights, data = Path(folder) / "resnet50.pt", Path(folder) / "images.npz"
        torch.save(resnet50().state_dict(), weights)
        rng = np.random.default_rng(0)
        np.savez(data, x=rng.normal(size=(args.images, 3, 224, 224)).astype(np.float32))
        _compare(f"ResNet-50 state dict ({args.images} images)", weights, data, str(ROOT / "bench" / "resnet.py") + ":resnet50", args.repeat)
    print(f"kernel Landlock ABI: {_abi()}; cores: {os.cpu_count()}")


def _abi() -> int:
    sys.path.insert(0, str(ROOT))
    from bnlint.sandbox.landlock import abi_version

    return abi_version()


if __name__ == "__main__":
    main()
