"""Speed of the ONNX side of `bnlint fix` on a ResNet-50, as ratios measured in one run.

    python bench/bench_fold.py [--images 256] [--size 224] [--batch-size 32] [--keep DIR]

Targets: fold + its numerical check <= 2x one onnxruntime inference of a batch of 32;
recalibration on the images <= 2x plain onnxruntime inference passes over the same data (both
read the data from the same .npz through bnlint's data reader). The ResNet-50 is bench/resnet.py
(torchvision's layout, seeded non-default BN statistics), exported with the legacy exporter and
`do_constant_folding=False` so every BatchNormalization stays in the graph. The images are seeded
smooth noise; their content does not change the cost.

Timings print, nothing asserts: tests never depend on them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from resnet import export_onnx  # noqa: E402

from bnlint.dynamic.data import Dataset  # noqa: E402
from bnlint.fix.onnx_fold import fold  # noqa: E402
from bnlint.fix.onnx_recalibrate import recalibrate_onnx  # noqa: E402


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process and its threads, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def images(path: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count, 3, size, size), dtype=np.float32)
    x = (x + np.roll(x, 1, axis=2) + np.roll(x, 1, axis=3)) / np.float32(3.0) + np.float32(0.2)  # a little spatial correlation
    np.savez(path, input=x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keep", type=Path, default=None, help="write the model, data and fixed models here instead of a temp folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder = args.keep or Path(temp)
        folder.mkdir(parents=True, exist_ok=True)
        model, data = folder / "resnet50.onnx", folder / "images.npz"
        seconds = _timed(lambda: export_onnx(model, args.size))[0]
        print(f"exported ResNet-50 ({model.stat().st_size / 1e6:.0f} MB, {args.size}x{args.size}) in {seconds:.1f} s")
        images(data, args.images, args.size)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sess = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        batch = np.load(data)["input"][: args.batch_size]
        sess.run(None, {"input": batch[:2]})  # warm-up
        one_batch = min((_timed(lambda: sess.run(None, {"input": batch}))[:2] for _ in range(3)), key=lambda t: t[0])
        source = Dataset(data).sources["input"]

        def plain_passes() -> None:
            for chunk in source.batches(args.batch_size):
                sess.run(None, {"input": chunk})

        # The floor of any exact recalibration run by onnxruntime: the same batch with every BN
        # input also an output (materialised, so Conv+BN+ReLU cannot fuse).
        exposed = onnx.load(str(model))
        exposed.graph.output.extend(onnx.ValueInfoProto(name=n.input[0]) for n in exposed.graph.node if n.op_type == "BatchNormalization")
        wide = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
        wide.run(None, {"input": batch[:2]})
        materialised = min((_timed(lambda: wide.run(None, {"input": batch}))[:2] for _ in range(3)), key=lambda t: t[0])
        plain_before = _timed(plain_passes)[:2]
        fold_wall, fold_cpu, folded = _timed(lambda: fold(model))
        write_time = _timed(lambda: folded.write(folder / "resnet50_folded.onnx"))[0]
        recal_wall, recal_cpu, fixed = _timed(lambda: recalibrate_onnx(model, data, batch_size=args.batch_size))
        recal_write = _timed(lambda: fixed.write(folder / "resnet50_recalibrated.onnx"))[0]
        plain_after = _timed(plain_passes)[:2]
        plain = min(plain_before, plain_after, key=lambda t: t[0])  # the machine may be shared: the quieter of two
        onnx.checker.check_model(str(folder / "resnet50_recalibrated.onnx"), full_check=True)

        m = folded.metrics
        print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, {args.images} images of {args.size}x{args.size}, "
              f"batch {args.batch_size}; seconds as wall / CPU (all threads of this process)")
        print(f"one inference of a batch of {args.batch_size}:  {one_batch[0]:7.2f} / {one_batch[1]:7.2f}")
        print(f"fold ({len(folded.folded)} BNs) + numerical check: {fold_wall:7.2f} / {fold_cpu:7.2f}   (fold {m['fold_seconds']:.2f} s, "
              f"check on {int(m['fold_check_samples'])} samples {m['fold_check_seconds']:.2f} s: max |diff| {m['fold_max_abs_diff']:.2e}, "
              f"relative {m['fold_max_rel_diff']:.2e}; writing + full checker {write_time:.2f} s more)")
        print(f"  ratio fold+check / one batch:    {fold_wall / one_batch[0]:5.2f}x wall, "
              f"{fold_cpu / one_batch[1]:5.2f}x CPU   (target <= 2x)")
        print(f"plain inference, {args.images} images:    {plain[0]:7.2f} / {plain[1]:7.2f}   "
              f"(before and after: {plain_before[0]:.2f}, {plain_after[0]:.2f} s wall)")
        print(f"recalibration ({len(fixed.layers)} BNs):         {recal_wall:7.2f} / {recal_cpu:7.2f}   "
              f"(peak cache {fixed.metrics['recalibrate_peak_cache_bytes'] / 2**30:.2f} GiB, "
              f"{int(fixed.metrics['recalibrate_segments'])} segments, "
              f"{int(fixed.metrics['recalibrate_truncated_passes'])} truncated passes; "
              f"writing + full checker {recal_write:.2f} s more)")
        print(f"  ratio recalibration / plain:     {recal_wall / plain[0]:5.2f}x wall, "
              f"{recal_cpu / plain[1]:5.2f}x CPU   (target <= 2x)")
        print(f"  floor: one batch with every BN input materialised: {materialised[0] / one_batch[0]:.2f}x wall, "
              f"{materialised[1] / one_batch[1]:.2f}x CPU of the fused batch")


if __name__ == "__main__":
    main()
