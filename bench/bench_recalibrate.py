"""Cost of exact BatchNorm recalibration (`bnlint fix`) on a ResNet-50, as ratios measured in one run.

    python bench/bench_recalibrate.py [--images 256] [--size 224] [--batch-size 32] [--device cpu|cuda]

Targets: recalibrating a ResNet-50-sized model on 256 images costs <= 2x
`torch.optim.swa_utils.update_bn` on the same data and <= 2x plain inference passes. Timed here,
each in its own child process (same data file, same seeded weights, one warm-up batch first, so
each peak RSS is that method's own):

- plain: eval-mode forward passes over the data (the baseline of every ratio);
- update_bn: torch's train-mode approximation (momentum=None, batches of --batch-size);
- layer-major: bnlint's fx path (one pass, every batch's activations alive at the widest cut);
- truncated: the fallback for models fx cannot trace: truncated passes resumed from cached
  submodule outputs;
- torchscript: the same model scripted, run segment by segment (the TorchScript path);
- truncated, no cache: the plain ~K/2-pass fallback, on a --subset of the images (it is K/2 passes:
  at full size it would take half an hour on two cores), compared with plain passes on that subset.

The parent then compares the statistics the methods wrote (they must agree) and update_bn's with
them. The ResNet-50 comes from bench/resnet.py (torchvision's layout; torchvision is not a
dependency). Timings print, nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from peak import peak_rss_mb  # noqa: E402
from resnet import resnet50  # noqa: E402

METHODS = ("plain", "update_bn", "layer-major", "truncated", "torchscript")


def _rss_mb() -> float:
    return peak_rss_mb()


def _batches(data: np.ndarray, size: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(data[i : i + size])).to(device) for i in range(0, len(data), size)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def child(method: str, folder: str, images: int, batch: int, device_name: str) -> dict[str, Any]:
    """One method, timed in this process; statistics saved for the parent to compare."""
    from torch.optim.swa_utils import update_bn

    from bnlint.fix.torch_recalibrate import recalibrate_module

    device = torch.device(device_name)
    data = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")[:images]
    model: Any = resnet50().to(device)
    if method == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.script(model)
    loaded = _rss_mb()
    with torch.no_grad():  # warm-up: allocator, oneDNN kernels (a copy: a warm-up must not change the statistics)
        warm = resnet50().to(device).eval()
        warm(torch.from_numpy(np.ascontiguousarray(data[:batch])).to(device))
        del warm
    batches = _batches(data, batch, device)
    result = None
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if method == "plain":
        with torch.no_grad():
            for b in batches:
                model(b)
    elif method == "update_bn":
        update_bn(batches, model)
        model.eval()
    else:
        how = {"layer-major": "layer-major", "truncated": "truncated", "nocache": "truncated", "torchscript": "auto"}[method]
        result = recalibrate_module(model, batches, method=how, memory_budget=0 if method == "nocache" else None)
    _sync(device)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    stats: dict[str, Any] = {f"{name}:{key}": buffer.detach().double().cpu().numpy() for name, buffer in model.named_buffers()
             for key in ("running_var",) if name.endswith(key)}
    np.savez(os.path.join(folder, f"stats_{method}_{images}.npz"), **stats)
    out: dict[str, Any] = {"seconds": cpu if device.type == "cpu" else seconds, "wall": seconds, "peak_rss_mb": _rss_mb(), "loaded_rss_mb": loaded}
    if result is not None:
        out.update(passes=result.passes, method=result.method, estimate_mb=(result.memory_estimate or 0) / 2**20)
    return out


def run_child(method: str, folder: str, images: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", method, "--folder", folder, "--images", str(images),
               "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def compare(folder: str, images: int) -> dict[str, float]:
    """Max relative difference of running_var between methods, layer by layer (exact methods vs layer-major)."""
    load = {m: dict(np.load(os.path.join(folder, f"stats_{m}_{images}.npz"))) for m in ("layer-major", "truncated", "torchscript", "update_bn")}
    base = load["layer-major"]
    out = {}
    for method in ("truncated", "torchscript", "update_bn"):
        out[method] = max(float(np.max(np.abs(load[method][k] / base[k] - 1))) for k in base)
    upstream = [k for k in base if not k.startswith("bn1")]  # every layer after the stem has BatchNorms upstream
    out["update_bn_median"] = float(np.median([np.median(np.abs(load["update_bn"][k] / base[k] - 1)) for k in upstream]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224, help="image side (128 halves the time on a small CPU)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--subset", type=int, default=32, help="images for the uncached truncated passes (~K/2 passes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable timings on a shared small CPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.images, args.batch_size, args.device)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, ResNet-50 (53 BatchNorm layers), "
          f"{args.images} images 3x{args.size}x{args.size}, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        images = np.lib.format.open_memmap(os.path.join(folder, "images.npy"), mode="w+", dtype=np.float32,
                                           shape=(args.images, 3, args.size, args.size))
        for start in range(0, args.images, 32):  # shifted and scaled: target data that does not fit the stored statistics
            chunk = rng.standard_normal((min(32, args.images - start), 3, args.size, args.size), dtype=np.float32)
            images[start : start + 32] = 0.3 + 1.5 * chunk
        images.flush()
        del images
        results = {m: run_child(m, folder, args.images, args) for m in METHODS}
        plain = results["plain"]["seconds"]
        update = results["update_bn"]["seconds"]
        print("seconds are CPU time (user + sys) on CPU, wall time on CUDA: a shared machine's wall clock is mostly other people's load")
        for method, r in results.items():
            extra = f"  passes {r['passes']}" if "passes" in r else ""
            if r.get("estimate_mb"):
                extra += f"  (estimate {r['estimate_mb']:.0f} MB)"
            print(f"{method:<13} {r['seconds']:8.2f} s (wall {r['wall']:6.1f})  x{r['seconds'] / plain:5.2f} plain  x{r['seconds'] / update:5.2f} update_bn  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB (model + data loaded {r['loaded_rss_mb']:.0f} MB){extra}")
        small_plain = run_child("plain", folder, args.subset, args)
        nocache = run_child("nocache", folder, args.subset, args)
        print(f"truncated, no cache, {args.subset} images: {nocache['seconds']:.2f} s = x{nocache['seconds'] / small_plain['seconds']:.1f} "
              f"plain passes on the same images ({nocache['passes']} truncated passes)")
        agreement = compare(folder, args.images)
        print(f"running_var vs layer-major, max relative difference: truncated {agreement['truncated']:.1e}, "
              f"torchscript {agreement['torchscript']:.1e}; update_bn {agreement['update_bn']:.1e} "
              f"(median over layers with upstream BN {agreement['update_bn_median']:.1e})")
        summary = {f"{m}_s": r["seconds"] for m, r in results.items()} | {f"{m}_peak_mb": r["peak_rss_mb"] for m, r in results.items()}
        summary |= {"layer_major_vs_plain": results["layer-major"]["seconds"] / plain, "layer_major_vs_update_bn": results["layer-major"]["seconds"] / update,
                    "truncated_vs_plain": results["truncated"]["seconds"] / plain, "torchscript_vs_plain": results["torchscript"]["seconds"] / plain,
                    "nocache_vs_plain": nocache["seconds"] / small_plain["seconds"]}
        print(json.dumps({k: round(v, 4) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
