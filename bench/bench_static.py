"""Static lint speed and memory on a ResNet-50-sized model, as ratios against baselines run here.

Targets (issue 2): bnlint on the ~100 MB state_dict <= 0.25x of
`python -c "import torch; torch.load(p, weights_only=True)"`; bnlint on the ONNX file <= 1.5x of
`python -c "import onnx; onnx.load(p)"`; peak memory independent of the non-BN weights' size.
Each command runs as a fresh process (what a user or a pre-commit hook pays); the median of
--repeat runs is reported. Run: python bench/bench_static.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK = "import resource,subprocess,sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def wall(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_mib(cmd: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def build(folder: Path) -> dict[str, Path]:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from resnet import resnet50

    model = resnet50()
    paths = {"state_dict": folder / "resnet50.pt", "onnx": folder / "resnet50.onnx", "big": folder / "resnet50_big.pt"}
    torch.save(model.state_dict(), paths["state_dict"])
    big = dict(model.state_dict())
    big["extra.weight"] = torch.randn(100_000_000)  # +400 MB of non-BN weights: must not raise bnlint's peak memory
    torch.save(big, paths["big"])
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(paths["onnx"]), dynamo=False, do_constant_folding=False)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp))
        sd, onnx_path, big = (str(paths[k]) for k in ("state_dict", "onnx", "big"))
        size_mb = paths["state_dict"].stat().st_size / 1e6
        lint = [py, "-m", "bnlint", "--fail-on", "never"]
        numpy_floor = wall([py, "-c", "import numpy"], args.repeat)
        torch_load = wall([py, "-c", f"import torch; torch.load({sd!r}, weights_only=True)"], args.repeat)
        lint_sd = wall([*lint, sd], args.repeat)
        onnx_load = wall([py, "-c", f"import onnx; onnx.load({onnx_path!r})"], args.repeat)
        lint_onnx = wall([*lint, onnx_path], args.repeat)
        peak_small, peak_big = peak_mib([*lint, sd]), peak_mib([*lint, big])
    print(f"ResNet-50 state_dict {size_mb:.0f} MB; median of {args.repeat} fresh processes")
    print(f"  python -c 'import numpy'            {numpy_floor:6.3f} s  (floor)")
    print(f"  torch.load(weights_only=True)       {torch_load:6.3f} s  (baseline)")
    print(f"  bnlint resnet50.pt                  {lint_sd:6.3f} s  ratio {lint_sd / torch_load:.2f}x  (target <= 0.25x)")
    print(f"  onnx.load                           {onnx_load:6.3f} s  (baseline)")
    print(f"  bnlint resnet50.onnx                {lint_onnx:6.3f} s  ratio {lint_onnx / onnx_load:.2f}x  (target <= 1.5x)")
    print(f"  peak RSS bnlint: {peak_small:.0f} MiB (100 MB file) vs {peak_big:.0f} MiB (+400 MB non-BN weights): "
          f"ratio {peak_big / peak_small:.2f}x  (target ~1.0x)")


if __name__ == "__main__":
    main()
