"""Real third-party model files (fixtures/third_party/, committed as shipped) through the CLI with
default settings: exactly the expected codes, nothing at warning or above, and the files unmodified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlint.cli import main

FOLDER = Path(__file__).resolve().parents[1] / "fixtures" / "third_party"
MANIFEST = json.loads((FOLDER / "manifest.json").read_text())


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_shipped_model_lints_quiet_with_default_settings(name: str) -> None:
    entry = MANIFEST[name]
    result = CliRunner().invoke(main, [str(FOLDER / name), "--format", "json"])
    (file,) = json.loads(result.stdout)["files"]
    assert file["error"] is None and file["format"] == entry["format"]
    assert sorted({f["code"] for f in file["findings"]}) == sorted(entry["expect"]), entry["intent"]
    assert all(f["severity"] == "info" for f in file["findings"]) and result.exit_code == 0


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_shipped_files_are_byte_for_byte_as_released(name: str) -> None:
    base = FOLDER / name if (FOLDER / name).is_dir() else FOLDER
    for relative, digest in MANIFEST[name]["sha256"].items():
        assert hashlib.sha256((base / relative).read_bytes()).hexdigest() == digest, relative


def test_every_file_in_the_folder_is_listed() -> None:
    own = {"manifest.json", "README.md", "LICENSE.fer", "LICENSE.basic-pitch", "NOTICE.basic-pitch"}
    assert {p.name for p in FOLDER.iterdir()} - own == set(MANIFEST)
