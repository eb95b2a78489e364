"""Many files: wall time of `bnlint FOLDER` on a generated folder of model files with -j 1, 2 and one
job per CPU, and peak memory against the number of files (it must stay flat).

Ratios are against -j 1 measured in the same run. Run: python bench/bench_jobs.py [--files 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ["convnet_state_dict.pt", "convnet.onnx", "convnet.safetensors", "fault_nan_stats.pt", "convnet_scripted.pt",
         "caffe/caffe_convnet_double.caffemodel", "mlp_state_dict.pt", "fault_training_mode.onnx"]
PEAK = ("import resource,subprocess,sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def make_folder(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        seed = ROOT / "fixtures" / SEEDS[index % len(SEEDS)]
        shutil.copyfile(seed, folder / f"m{index:05d}{seed.suffix}")


CACHED = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # users cache bytecode


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=CACHED)
    return time.perf_counter() - start


def peak_mib(cmd: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, cwd=ROOT, env=CACHED)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    lint = [sys.executable, "-m", "bnlint", "--fail-on", "never", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        many, few = Path(tmp) / "many", Path(tmp) / "few"
        make_folder(many, args.files)
        make_folder(few, max(args.files // 10, 1))
        times = {jobs: wall([*lint, "-j", str(jobs), str(many)]) for jobs in sorted({1, 2, cpus})}
        peak_few, peak_many = peak_mib([*lint, str(few)]), peak_mib([*lint, str(many)])
    base = times[1]
    print(f"{args.files} model files ({len(SEEDS)} kinds: torch zip, TorchScript, safetensors, ONNX, Caffe); {cpus} CPUs")
    for jobs, seconds in times.items():
        print(f"  -j {jobs:<3}  {seconds:7.2f} s   {seconds / base:5.2f}x of -j 1   {args.files / seconds:6.1f} files/s")
    print(f"  peak RSS -j 1: {peak_few:.0f} MiB for {max(args.files // 10, 1)} files, {peak_many:.0f} MiB for {args.files}: "
          f"ratio {peak_many / peak_few:.2f}x (target ~1.0x)")


if __name__ == "__main__":
    main()
