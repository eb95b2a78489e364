"""Static lint speed and memory on ResNet-50 / EfficientNet-B0-sized models, as ratios against
baselines run here, in fresh processes (what a user or a pre-commit hook pays), median of --repeat.

Targets (issues 2 and 7):
- bnlint on the ~100 MB state dict <= 0.25x `torch.load(p, weights_only=True)`, and within 1.5x of
  `python -c "import numpy"` (the floor any Python tool pays);
- bnlint on an ONNX EfficientNet-B0 with BN kept < 1.5x `onnx.load` (1.0x is the goal);
- bnlint on a Keras ResNet-50 `.keras` <= 0.25x `keras.saving.load_model` (Keras imported in the
  baseline process, as users pay it) and within 2x of reading just the BN datasets with h5py;
- peak memory independent of the size of non-BN weights (state dict and .keras).
Run: python bench/bench_static.py [--repeat 5] [--skip-keras]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK = "import resource,subprocess,sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
H5_BN_ONLY = """
import sys, zipfile, h5py, io
path = sys.argv[1]
with zipfile.ZipFile(path) as z, z.open("model.weights.h5") as member:
    data = member.read()
with h5py.File(io.BytesIO(data), "r") as f:
    def visit(name, obj):
        if isinstance(obj, h5py.Group) and name.rsplit("/", 1)[-1].startswith("batch_normalization") and "vars" in obj:
            for key in obj["vars"]:
                obj["vars"][key][()]
    f.visititems(visit)
"""


# Users' Pythons cache bytecode; a PYTHONDONTWRITEBYTECODE environment would charge bnlint's (and
# everyone's) compile time to every run, so it is removed, and each command runs once to warm up.
CACHED = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def wall(cmd: list[str], repeat: int, env: dict[str, str] | None = None) -> float:
    env = {**CACHED, **(env or {})}
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_mib(cmd: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, cwd=ROOT, env=CACHED)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def build_torch(folder: Path) -> dict[str, Path]:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from efficientnet import efficientnet_b0
    from resnet import resnet50

    model = resnet50()
    paths = {"state_dict": folder / "resnet50.pt", "onnx": folder / "effb0.onnx", "big": folder / "resnet50_big.pt"}
    torch.save(model.state_dict(), paths["state_dict"])
    big = dict(model.state_dict())
    big["extra.weight"] = torch.randn(100_000_000)  # +400 MB of non-BN weights: must not raise bnlint's peak memory
    torch.save(big, paths["big"])
    torch.onnx.export(efficientnet_b0().eval(), (torch.randn(1, 3, 224, 224),), str(paths["onnx"]), dynamo=False,
                      do_constant_folding=False)
    return paths


def build_keras(folder: Path) -> dict[str, Path]:
    code = (f"import keras; m = keras.applications.ResNet50(weights=None); m.save({str(folder / 'resnet50.keras')!r})\n"
            f"inp = keras.Input((224, 224, 3)); x = m(inp); x = keras.layers.Dense(25000, name='big')(x)\n"
            f"keras.Model(inp, x).save({str(folder / 'resnet50_big.keras')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "KERAS_BACKEND": "torch"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"keras": folder / "resnet50.keras", "keras_big": folder / "resnet50_big.keras"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-keras", action="store_true")
    args = parser.parse_args()
    py = sys.executable
    lint = [py, "-m", "bnlint", "--fail-on", "never", "-q"]
    keras_env = {**os.environ, "KERAS_BACKEND": "torch"}
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_torch(Path(tmp))
        if not args.skip_keras:
            paths.update(build_keras(Path(tmp)))
        sd, onnx_path, big = (str(paths[k]) for k in ("state_dict", "onnx", "big"))
        size_mb = paths["state_dict"].stat().st_size / 1e6
        numpy_floor = wall([py, "-c", "import numpy"], args.repeat)
        torch_load = wall([py, "-c", f"import torch; torch.load({sd!r}, weights_only=True)"], args.repeat)
        lint_sd = wall([*lint, sd], args.repeat)
        onnx_load = wall([py, "-c", f"import onnx; onnx.load({onnx_path!r})"], args.repeat)
        lint_onnx = wall([*lint, onnx_path], args.repeat)
        peak_small, peak_big = peak_mib([*lint, sd]), peak_mib([*lint, big])
        keras_rows = []
        if not args.skip_keras:
            kp, kbig = str(paths["keras"]), str(paths["keras_big"])
            load = wall([py, "-c", f"import keras; keras.saving.load_model({kp!r})"], max(1, args.repeat // 2), keras_env)
            h5_only = wall([py, "-c", H5_BN_ONLY, kp], args.repeat)
            lint_keras = wall([*lint, kp], args.repeat)
            kpeak_small, kpeak_big = peak_mib([*lint, kp]), peak_mib([*lint, kbig])
            keras_rows = [
                f"  Keras ResNet-50 .keras ({paths['keras'].stat().st_size / 1e6:.0f} MB)",
                f"  keras.saving.load_model             {load:6.3f} s  (baseline)",
                f"  h5py, BN datasets only               {h5_only:6.3f} s  (floor)",
                f"  bnlint resnet50.keras               {lint_keras:6.3f} s  ratio {lint_keras / load:.2f}x load_model (target <= 0.25x), "
                f"{lint_keras / h5_only:.2f}x h5py (target <= 2x)",
                f"  peak RSS bnlint: {kpeak_small:.0f} MiB vs {kpeak_big:.0f} MiB with +{(paths['keras_big'].stat().st_size - paths['keras'].stat().st_size) / 1e6:.0f} MB "
                f"of non-BN weights: ratio {kpeak_big / kpeak_small:.2f}x (target ~1.0x)",
            ]
    print(f"ResNet-50 state_dict {size_mb:.0f} MB; median of {args.repeat} fresh processes")
    print(f"  python -c 'import numpy'            {numpy_floor:6.3f} s  (floor)")
    print(f"  torch.load(weights_only=True)       {torch_load:6.3f} s  (baseline)")
    print(f"  bnlint resnet50.pt                  {lint_sd:6.3f} s  ratio {lint_sd / torch_load:.2f}x torch.load (target <= 0.25x), "
          f"{lint_sd / numpy_floor:.2f}x import numpy (target <= 1.5x)")
    print(f"  onnx.load (EfficientNet-B0, BN kept) {onnx_load:6.3f} s  (baseline)")
    print(f"  bnlint effb0.onnx                   {lint_onnx:6.3f} s  ratio {lint_onnx / onnx_load:.2f}x (target < 1.5x, goal 1.0x)")
    print(f"  peak RSS bnlint: {peak_small:.0f} MiB (100 MB file) vs {peak_big:.0f} MiB (+400 MB non-BN weights): "
          f"ratio {peak_big / peak_small:.2f}x  (target ~1.0x)")
    for row in keras_rows:
        print(row)


if __name__ == "__main__":
    main()
