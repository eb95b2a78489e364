"""Static lint of a TensorFlow ResNet-50 SavedModel against TensorFlow loading it (issue 14).

The SavedModel is made here, in a temporary folder, by TensorFlow's own python (`--tf-python`, a
venv with tensorflow-cpu: `tf.keras.applications.ResNet50(weights=None)` then
`tf.saved_model.save`). Each measurement runs in a fresh process (what a user or a pre-commit hook
pays), median of --repeat, all in the same run:
- static:   `bnlint check DIR` with this python (bnlint's venv; TensorFlow never imported);
- tf load:  `tf.saved_model.load(DIR)` with the TF python (TensorFlow's import included, as users pay it);
- bn only:  bnlint.loaders.tf_bundle reading just the BatchNorm tensors from variables/ (the floor).
Peak memory is the child's max RSS; the non-BN weights' size is what a reader that loads
everything would hold.

Targets: static <= 0.1x tf load, within 2x of bn only, peak memory flat in the non-BN weights' size.
Measured (2 shared CPUs, TF 2.21, three runs of --repeat 3): static/tf load 0.088x, 0.090x, 0.100x;
static/bn only 1.23x, 1.51x, 1.98x (static ~0.5 s, most of it interpreter + CLI imports); peak RSS
59 MiB static vs 28 MiB bn only, for 97.5 MiB of non-BN weights: graph rules read only the kernels
no BatchNorm follows (the 8 MiB classifier here), one at a time.
Run: .venv/bin/python bench/bench_tf.py [--repeat 3] [--tf-python /tmp/tfenv/bin/python] [--keep DIR]
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
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", "CUDA_VISIBLE_DEVICES": ""}
MAKE = """
import sys, tensorflow as tf
tf.saved_model.save(tf.keras.applications.ResNet50(weights=None), sys.argv[1])
"""
TF_LOAD = "import sys, tensorflow as tf; tf.saved_model.load(sys.argv[1])"
BN_ONLY = """
import sys
from bnlint.loaders.tf_bundle import _role, read_bundle
bundle = read_bundle(sys.argv[1] + "/variables/variables.index")
for key in bundle.entries:
    if _role(key) is not None:
        bundle.tensor(key).numpy()
"""
SIZES = """
import sys
from bnlint.loaders.tf_bundle import _role, read_bundle
bundle = read_bundle(sys.argv[1] + "/variables/variables.index")
bn = sum(e.size for k, e in bundle.entries.items() if _role(k) is not None)
print(bn, sum(e.size for e in bundle.entries.values()) - bn)
"""
PEAK = ("import resource,subprocess,sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run(command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - start
    if done.returncode not in (0, 1):  # bnlint exits 1 when it finds something
        raise SystemExit(f"{command[:4]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return took


def peak_mib(command: list[str], env: dict[str, str] | None = None) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK, *command], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tf-python", default="/tmp/tfenv/bin/python")
    parser.add_argument("--keep", type=Path, help="make (or reuse) the SavedModel here instead of a temporary folder")
    args = parser.parse_args()
    tf_env = {**os.environ, **QUIET_TF}
    with tempfile.TemporaryDirectory() as scratch:
        model = args.keep or Path(scratch) / "resnet50"
        if not (model / "saved_model.pb").is_file():
            print(f"making {model} with {args.tf_python} ...", flush=True)
            run([args.tf_python, "-c", MAKE, str(model)], tf_env)
        commands = {
            "static": ([sys.executable, "-m", "bnlint", "check", str(model), "-q", "--color", "never"], None),
            "tf load": ([args.tf_python, "-c", TF_LOAD, str(model)], tf_env),
            "bn only": ([sys.executable, "-c", BN_ONLY, str(model)], None),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeat):  # interleaved, so load on a shared machine hits all three alike
            for name, (command, env) in commands.items():
                times[name].append(run(command, env))
        median = {name: statistics.median(values) for name, values in times.items()}
        for name, values in times.items():
            print(f"{name:8s} median {median[name]:6.2f} s   runs {', '.join(f'{v:.2f}' for v in values)}")
        print(f"static / tf load = {median['static'] / median['tf load']:.3f}x (target <= 0.1x)")
        print(f"static / bn only = {median['static'] / median['bn only']:.2f}x (target <= 2x)")
        bn_bytes, other_bytes = (int(v) for v in subprocess.run([sys.executable, "-c", SIZES, str(model)], cwd=ROOT,
                                                                capture_output=True, text=True, check=True).stdout.split())
        static_peak, bn_peak = peak_mib(commands["static"][0]), peak_mib(commands["bn only"][0])
        print(f"weights: BN {bn_bytes / 2**20:.1f} MiB, non-BN {other_bytes / 2**20:.1f} MiB")
        print(f"peak RSS: static {static_peak:.0f} MiB, bn only {bn_peak:.0f} MiB: static holds "
              f"{static_peak - bn_peak:.0f} MiB more = {(static_peak - bn_peak) * 2**20 / other_bytes:.2f}x the non-BN weights")


if __name__ == "__main__":
    main()
