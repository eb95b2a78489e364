"""How long a pre-commit run of bnlint takes on the healthy fixtures, and whether torch stays out.

    python bench/bench_hook.py               # bnlint vs `python -c "import numpy"`, median of 7 runs
    python bench/bench_hook.py --runs 15 --json bench/_out/hook.json

Measures, in fresh processes as pre-commit starts them:
- baseline: `python -c "import numpy"` (the floor: interpreter start plus bnlint's heaviest dependency);
- hook: `python -m bnlint --skip-unrecognised <healthy fixtures>` (what the hook's entry runs;
  --skip-unrecognised is dropped if this checkout's CLI does not have it yet);
and reports the ratio. Then re-runs the hook with `-X importtime` and lists which top-level
packages were imported: torch (and onnxruntime) must not be among them.
The "healthy fixtures" are the manifest entries whose expected codes are all info-level.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def healthy_fixtures() -> list[str]:
    from bnlint.findings import Severity
    from bnlint.rules import all_rules

    rules = all_rules()
    manifest = json.loads((ROOT / "fixtures" / "manifest.json").read_text())
    return [
        f"fixtures/{name}"
        for name, entry in manifest.items()
        if isinstance(entry, dict) and isinstance(entry.get("expect"), list)
        and all(rules[c].severity == Severity.INFO for c in entry["expect"])
    ]


def wall(cmd: list[str], runs: int) -> tuple[float, list[float], int]:
    times, code = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        code = proc.returncode
    return statistics.median(times), times, code


def hook_command(files: list[str]) -> list[str]:
    help_text = subprocess.run([sys.executable, "-m", "bnlint", "check", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    flag = ["--skip-unrecognised"] if "--skip-unrecognised" in help_text else []
    return [sys.executable, "-m", "bnlint", *flag, *files]


def imported_packages(cmd: list[str]) -> tuple[set[str], float]:
    """Top-level packages the command imports, and the cumulative import time of bnlint (s)."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    packages, bnlint_us = set(), 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if not cumulative.isdigit():
            continue  # the header line
        packages.add(name.split(".")[0])
        if name == "bnlint.cli":
            bnlint_us = max(bnlint_us, int(cumulative))
    return packages, bnlint_us / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args()

    files = healthy_fixtures()
    cmd = hook_command(files)
    baseline, baseline_runs, _ = wall([sys.executable, "-c", "import numpy"], args.runs)
    hook, hook_runs, code = wall(cmd, args.runs)
    packages, cli_import = imported_packages(cmd)
    heavy = sorted(packages & {"torch", "onnxruntime", "tensorflow", "jax"})

    print(f"python {sys.version.split()[0]} on {os.cpu_count()} CPUs, median of {args.runs} runs")
    print(f"  baseline  python -c 'import numpy'            {baseline * 1000:7.0f} ms")
    print(f"  hook      bnlint on {len(files)} healthy fixtures    {hook * 1000:7.0f} ms  (exit {code})")
    print(f"  ratio     hook / baseline                      {hook / baseline:7.1f}x")
    print(f"  import    bnlint.cli cumulative import time    {cli_import * 1000:7.0f} ms")
    print(f"  torch on the static path: {'YES: ' + ', '.join(heavy) if heavy else 'no'} "
          f"({len(packages)} top-level packages imported)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "files": files, "runs": args.runs, "baseline_s": baseline_runs, "hook_s": hook_runs,
            "median_baseline_s": baseline, "median_hook_s": hook, "ratio": hook / baseline,
            "exit_code": code, "heavy_imports": heavy, "packages": sorted(packages),
        }, indent=2) + "\n")
    return 1 if heavy or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
