"""A long fuzz run of the bnlint CLI: every input in its own process, with a time and memory bound.

    python bench/fuzz.py --inputs 20000 --seconds 600 --jobs 2

Inputs come from tests/fuzz_inputs.py (mutated fixtures of every format; `--data` arrays run
against a healthy ONNX model and a state dict with --arch). The parent imports bnlint and its
heavy dependencies once, then forks one child per input, so a child costs milliseconds to
start; the child runs `bnlint.cli:main` in-process under an address-space limit. A child still
running after --timeout seconds is killed (a hang); one that dies by a signal (a segfault in a C
library, say) is a crash; output with "Traceback" or "internal error" is a traceback / internal
error; a file appearing in the payloads' marker folder (or /tmp/bnlint_pwned_marker, the
malicious fixtures' target) is an execution. Every failing input is saved with its command line
and output under bench/_out/fuzz/<category>/. The run ends after --inputs inputs or --seconds
seconds, whichever comes first, and prints the counts; the exit status is 1 if any failure
category is non-zero.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "_out" / "fuzz"
FIXTURE_MARKER = Path("/tmp/bnlint_pwned_marker")
FAILURES = ("traceback", "internal", "hang", "crash", "execution", "bad-exit")


@dataclass
class Job:
    pid: int
    seed: int
    role: str
    started: float
    slot: Path
    args: list[str]


def _preload() -> None:
    """Import what the CLI will import, once, so that each forked child starts warm."""
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    import bnlint.api  # noqa: F401
    import bnlint.cli  # noqa: F401
    import bnlint.dynamic.analysis  # noqa: F401
    import bnlint.dynamic.onnx_runner  # noqa: F401
    import bnlint.dynamic.torch_runner  # noqa: F401
    import bnlint.loaders.caffe_file  # noqa: F401
    import bnlint.loaders.keras_file  # noqa: F401
    import bnlint.loaders.onnx_file  # noqa: F401
    import bnlint.loaders.safetensors_file  # noqa: F401
    import bnlint.loaders.torch_legacy  # noqa: F401
    import bnlint.loaders.torch_zip  # noqa: F401
    import bnlint.rules  # noqa: F401


def _child(args: list[str], slot: Path, memory: int) -> None:
    """Runs in the forked process: never returns."""
    code = 70
    try:
        os.setpgid(0, 0)
        out = os.open(slot / "output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        if memory:
            used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (used + memory, used + memory))
        import torch

        torch.set_num_threads(1)
        from bnlint.cli import main

        try:
            main.main(args=args, prog_name="bnlint", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 71
    except BaseException:  # noqa: BLE001 - whatever escapes the CLI is what we are looking for
        traceback.print_exc()
        code = 70
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _executed(marker_dir: Path, fixture_marker_mtime: float | None) -> bool:
    if any(marker_dir.iterdir()):
        return True
    try:
        return FIXTURE_MARKER.stat().st_mtime != fixture_marker_mtime
    except FileNotFoundError:
        return False


def _save(category: str, job: Job, output: str, detail: str) -> None:
    target = OUT / category / f"{job.role}-{job.seed}"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(job.slot / "in", target / "in", symlinks=True)
    (target / "output.txt").write_text(output)
    (target / "info.txt").write_text(f"{detail}\nbnlint {' '.join(job.args)}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--role", choices=["lint", "data", "both"], default="both", help="both: every fifth input is --data")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per input before it counts as a hang")
    parser.add_argument("--memory-mb", type=int, default=4096, help="address space a child may add (0: no limit)")
    parser.add_argument("--verbose", action="store_true", help="print each failure as it happens")
    options = parser.parse_args()

    from tests.fuzz_inputs import data_args, generate

    _preload()
    os.environ.pop("BNLINT_DEBUG", None)
    work = Path(tempfile.mkdtemp(prefix="bnlint_fuzz_"))
    marker_dir = work / "markers"
    marker_dir.mkdir()
    fixture_mtime = FIXTURE_MARKER.stat().st_mtime if FIXTURE_MARKER.exists() else None
    counts: Counter[str] = Counter()
    slowest: list[tuple[float, str]] = []  # (seconds, input): the three slowest
    running: dict[int, Job] = {}
    free_slots = [work / f"slot{i}" for i in range(options.jobs)]
    start = time.monotonic()
    next_seed = options.start
    last_report = start

    def launch(seed: int, slot: Path) -> None:
        role = "data" if options.role == "data" or (options.role == "both" and seed % 5 == 4) else "lint"
        item = generate(seed, role, marker_dir)
        if slot.exists():
            shutil.rmtree(slot)
        (slot / "in").mkdir(parents=True)
        path = item.write(slot / "in")
        args = [str(path), "--color", "never"]
        if role == "data":
            model, *rest = data_args(seed)
            args = [str(ROOT / model), *[str(ROOT / a) if a.startswith("fixtures/") else a for a in rest], "--data", str(path),
                    "--color", "never", "--device", "cpu"]
        (slot / "describe.txt").write_text(item.describe())
        pid = os.fork()
        if pid == 0:
            _child(args, slot, options.memory_mb << 20)
        running[pid] = Job(pid, seed, role, time.monotonic(), slot, args)

    def finish(job: Job, status: int | None) -> None:
        free_slots.append(job.slot)
        counts["inputs"] += 1
        slowest.append((time.monotonic() - job.started, f"{job.role}-{job.seed}"))
        slowest.sort(reverse=True)
        del slowest[3:]
        output = (job.slot / "output.txt").read_text(errors="replace") if (job.slot / "output.txt").exists() else ""
        detail = (job.slot / "describe.txt").read_text()
        category = None
        if status is None:
            category = "hang"
        elif os.WIFSIGNALED(status):
            category = "crash"
            output += f"\n[killed by signal {os.WTERMSIG(status)}]"
        else:
            code = os.WEXITSTATUS(status)
            counts[f"exit {code}"] += 1
            if "Traceback" in output:
                category = "traceback"
            elif "internal error" in output or "isolated reader failed" in output:
                category = "internal"
            elif code not in (0, 1, 2):
                category = "bad-exit"
        if _executed(marker_dir, fixture_mtime):
            category = "execution"
            for leftover in marker_dir.iterdir():
                leftover.unlink()
        if "MemoryError" in output:
            counts["memory errors"] += 1
        if category:
            counts[category] += 1
            _save(category, job, output, detail)
            if options.verbose:
                print(f"{category}: {detail}\n    {output.strip().splitlines()[-1] if output.strip() else ''}", flush=True)

    try:
        while True:
            elapsed = time.monotonic() - start
            while free_slots and next_seed - options.start < options.inputs and elapsed < options.seconds:
                launch(next_seed, free_slots.pop())
                next_seed += 1
            if not running:
                break
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                finish(running.pop(pid), status)
                continue
            now = time.monotonic()
            for job in list(running.values()):
                if now - job.started > options.timeout:
                    os.killpg(job.pid, signal.SIGKILL)
                    os.waitpid(job.pid, 0)
                    finish(running.pop(job.pid), None)
            if now - last_report > 30:
                last_report = now
                print(f"  {now - start:5.0f} s: {counts['inputs']} inputs, " + ", ".join(f"{k} {counts[k]}" for k in FAILURES), flush=True)
            time.sleep(0.002)
    finally:
        for job in running.values():
            os.killpg(job.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)

    elapsed = time.monotonic() - start
    print(f"fuzz: {counts['inputs']} inputs in {elapsed:.0f} s (seeds {options.start}..{next_seed - 1}, jobs {options.jobs}, "
          f"timeout {options.timeout:g} s)")
    print("  exits: " + ", ".join(f"{code} {counts[f'exit {code}']}" for code in (0, 1, 2)))
    print("  slowest: " + ", ".join(f"{name} {seconds:.1f} s" for seconds, name in slowest))
    for category in ("traceback", "internal", "hang", "crash", "execution", "bad-exit", "memory errors"):
        print(f"  {category + ':':15} {counts[category]}")
    if any(counts[c] for c in FAILURES):
        print(f"  failing inputs saved under {OUT.relative_to(ROOT)}/")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
