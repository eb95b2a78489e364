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
Measured (2 shared CPUs, TF 2.21, five runs of --repeat 3, some while other jobs ran): static/tf load
0.088x, 0.090x, 0.100x, 0.109x, 0.124x; static/bn only 1.23x-2.29x (static ~0.5 s: ~0.1 s interpreter
and imports, ~0.18 s parsing the MetaGraph and its 2426-object graph, ~0.08 s verifying the crc32c
of the tensors read); peak RSS 59 MiB static vs 28 MiB bn only, for 97.5 MiB of non-BN weights:
graph rules read only the kernels no BatchNorm follows (the 8 MiB classifier here), one at a time.
--flat: one 12-block graph at widths 256 and 512 (25 vs 99 MiB of non-BN weights, same nodes):
peak RSS 36 vs 36 MiB = 1.00x for 4.0x the weights.
Run: .venv/bin/python bench/bench_tf.py [--repeat 3] [--flat] [--tf-python /tmp/tfenv/bin/python] [--keep DIR]
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
def wide(width):  # the same graph at any width: only the size of the (BN-followed) conv kernels changes
    x = inputs = tf.keras.Input((32, 32, 3))
    for _ in range(12):
        x = tf.keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = tf.keras.layers.ReLU()(tf.keras.layers.BatchNormalization()(x))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(10)(tf.keras.layers.GlobalAveragePooling2D()(x)))
net = {"resnet50": lambda: tf.keras.applications.ResNet50(weights=None), "narrow": lambda: wide(256),
       "wide": lambda: wide(512)}[sys.argv[2]]
tf.saved_model.save(net(), sys.argv[1])
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
    parser.add_argument("--flat", action="store_true", help="also compare peak memory of one graph at two widths (4x the weights)")
    args = parser.parse_args()
    tf_env = {**os.environ, **QUIET_TF}
    with tempfile.TemporaryDirectory() as scratch:
        model = args.keep or Path(scratch) / "resnet50"
        if not (model / "saved_model.pb").is_file():
            print(f"making {model} with {args.tf_python} ...", flush=True)
            run([args.tf_python, "-c", MAKE, str(model), "resnet50"], tf_env)
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
        if args.flat:  # one graph at two widths: 4x the non-BN weights, the same nodes (and an 0.02 MiB classifier)
            sizes = {}
            for name in ("narrow", "wide"):
                folder = Path(scratch) / name
                print(f"making {folder} ...", flush=True)
                run([args.tf_python, "-c", MAKE, str(folder), name], tf_env)
                other = int(subprocess.run([sys.executable, "-c", SIZES, str(folder)], cwd=ROOT, capture_output=True, text=True,
                                           check=True).stdout.split()[1])
                peak = statistics.median(peak_mib([sys.executable, "-m", "bnlint", "check", str(folder), "-q", "--color", "never"])
                                         for _ in range(args.repeat))
                sizes[name] = (other, peak)
            (small, small_peak), (large, large_peak) = sizes["narrow"], sizes["wide"]
            print(f"peak RSS, static, same graph: {large / 2**20:.0f} MiB of non-BN weights {large_peak:.0f} MiB vs "
                  f"{small / 2**20:.0f} MiB {small_peak:.0f} MiB = {large_peak / small_peak:.2f}x for {large / small:.1f}x the "
                  "weights (target: flat, ~1.0x)")


if __name__ == "__main__":
    main()
