"""Regenerating the fixtures from fixtures/make_fixtures.py gives identical findings.

Guards the committed files against drifting from the script that documents them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnlint.api import lint_paths

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = json.loads((ROOT / "fixtures" / "manifest.json").read_text())
MODELS = sorted(name for name, entry in MANIFEST.items() if name != "data" and not entry.get("expect_error"))


def _findings(folder: Path) -> dict[str, list[tuple]]:
    """Findings per manifest entry, linted one model (with its companion file) at a time."""
    findings = {}
    for name in MODELS:
        companion = [folder / MANIFEST[name]["with"]] if "with" in MANIFEST[name] else []
        (result,) = lint_paths([folder / name, *companion]).files
        findings[name] = [(f.code, f.layer, f.message, json.dumps(dict(f.values), sort_keys=True, default=str)) for f in result.findings]
    return findings


@pytest.mark.skipif(os.environ.get("BNLINT_SKIP_REGENERATE") == "1", reason="BNLINT_SKIP_REGENERATE=1")
def test_regenerated_fixtures_give_identical_findings(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    out = tmp_path / "fixtures"
    run = subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_fixtures.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert _findings(out) == _findings(ROOT / "fixtures")
