"""Peak memory of `bnlint MODEL.onnx --data` against plain onnxruntime inference over the same data.

    python bench/bench_onnx_memory.py [--images 128] [--batch-size 32]

Issue 9's target: an ONNX --data run within 1.3x the peak resident memory of plain onnxruntime
inference on the same model (the bench ResNet-50, exported like bench_dynamic.py) and data (a
.npy streamed batch by batch). Each side runs in a fresh process that reports its own VmHWM
(bench/peak.py), so neither inherits the other's or this parent's memory. A third process that
only imports onnxruntime and numpy gives the interpreter's share, printed for context.

bnlint's peak is about 1 GB at any batch size (the batch-dependence check holds every BN input and
output of 4 samples and a second session), so the ratio grows as --batch-size shrinks.

Nothing asserts: tests never depend on timings or memory figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

PLAIN = """
import sys
sys.path.insert(0, {bench!r})
import numpy as np, onnxruntime as ort
from peak import peak_rss_mb
data = np.load({data!r}, mmap_mode="r")
session = ort.InferenceSession({model!r}, providers=["CPUExecutionProvider"])
for start in range(0, len(data), {batch}):
    session.run(None, {{"input": np.ascontiguousarray(data[start:start + {batch}])}})
print(peak_rss_mb())
"""

BNLINT = """
import sys
sys.path.insert(0, {bench!r})
from peak import peak_rss_mb
from bnlint.cli import main
sys.argv = ["bnlint", {model!r}, "--data", {data!r}, "--batch-size", "{batch}", "--device", "cpu",
            "--onnx-engine", "onnxruntime", "--fail-on", "never", "-q"]
try:
    main()
except SystemExit:
    pass
print(peak_rss_mb())
"""

IMPORTS = """
import sys
sys.path.insert(0, {bench!r})
import numpy, onnxruntime
from peak import peak_rss_mb
print(peak_rss_mb())
"""


def _peak(template: str, **values: object) -> float:
    code = template.format(bench=str(BENCH), **values)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH))
    from resnet import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        model = os.path.join(folder, "resnet50.onnx")
        export_onnx(model)
        data = os.path.join(folder, "images.npy")
        np.save(data, np.random.default_rng(0).normal(size=(args.images, 3, 224, 224)).astype(np.float32))
        values = {"model": model, "data": data, "batch": args.batch_size}
        runs = {"imports": [], "plain": [], "bnlint": []}
        for _ in range(args.repeats):
            runs["imports"].append(_peak(IMPORTS))
            runs["plain"].append(_peak(PLAIN, **values))
            runs["bnlint"].append(_peak(BNLINT, **values))
    peak = {name: float(np.median(values_)) for name, values_ in runs.items()}
    ratio = peak["bnlint"] / peak["plain"]
    print(f"ResNet-50 ONNX, {args.images} images 3x224x224 from a .npy, batch {args.batch_size}; median of {args.repeats} fresh processes")
    print(f"  python + numpy + onnxruntime imported   {peak['imports']:6.0f} MiB")
    print(f"  plain onnxruntime inference             {peak['plain']:6.0f} MiB  (baseline)")
    print(f"  bnlint --data                           {peak['bnlint']:6.0f} MiB  ratio {ratio:.2f}x  (target <= 1.3x)")
    print(json.dumps({"peak_mb": peak, "ratio": ratio}))


if __name__ == "__main__":
    main()
