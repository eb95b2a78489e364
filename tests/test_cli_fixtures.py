"""The real CLI on every committed fixture: exact rule codes found (and so not found), exit codes.

Expected codes live in fixtures/manifest.json next to the files (golden data); a healthy model
of every format must produce no warning or error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.rules import all_rules

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text()) if (FIXTURES / "manifest.json").exists() else {}
MODELS = {name: entry for name, entry in MANIFEST.get("models", MANIFEST).items() if isinstance(entry, dict) and name != "data"}


def run_json(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["--format", "json", "--fail-on", "warning", *args], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("name", sorted(n for n, e in MODELS.items() if not e.get("expect_error")))
def test_fixture_gives_exactly_the_expected_codes(name: str) -> None:
    companion = [f"fixtures/{MODELS[name]['with']}"] if "with" in MODELS[name] else []  # e.g. a caffemodel's prototxt
    code, payload = run_json(f"fixtures/{name}", *companion)
    (file,) = payload["files"]
    assert file["error"] is None, file["error"]
    found = sorted({f["code"] for f in file["findings"]})
    assert found == sorted(set(MODELS[name]["expect"])), MODELS[name].get("intent")
    worst = {f["severity"] for f in file["findings"]}
    assert code == (1 if worst & {"error", "warning"} else 0)


@pytest.mark.parametrize("name", sorted(n for n, e in MODELS.items() if e.get("expect_error")))
def test_broken_fixture_is_one_line_exit_2(name: str) -> None:
    result = CliRunner().invoke(main, [f"fixtures/{name}"], catch_exceptions=False)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if ": error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"fixtures/{name}: error: ")
    assert "Traceback" not in result.output


def test_every_static_rule_is_triggered_by_some_fixture() -> None:
    triggered = {code for entry in MODELS.values() for code in entry.get("expect", [])}
    static = {code for code, spec in all_rules().items() if spec.scope != "dynamic" and code != "BN407"}
    assert static - triggered == set()


def test_broken_file_does_not_stop_the_others() -> None:
    code, payload = run_json("fixtures/bad_truncated.pt", "fixtures/fault_nan_stats.pt")
    assert code == 2
    by_path = {f["path"]: f for f in payload["files"]}
    assert by_path["fixtures/bad_truncated.pt"]["error"]
    assert "BN101" in {f["code"] for f in by_path["fixtures/fault_nan_stats.pt"]["findings"]}


def test_malicious_checkpoint_is_reported_and_never_run(tmp_path: Path) -> None:
    marker = Path("/tmp/bnlint_pwned_marker")
    marker.unlink(missing_ok=True)
    for name in ("fault_malicious.pt", "fault_malicious_legacy.pt"):
        code, payload = run_json(f"fixtures/{name}")
        assert "BN001" in {f["code"] for f in payload["files"][0]["findings"]}
        assert code == 1
    assert not marker.exists()


def test_folder_is_searched_and_fixtures_are_not_modified(tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in FIXTURES.glob("*.pt")}
    code, payload = run_json("fixtures")
    assert code == 2  # the folder holds broken files on purpose
    assert len(payload["files"]) >= len([n for n in MODELS if Path(n).suffix in (".pt", ".pth", ".ckpt", ".onnx", ".safetensors")])
    assert before == {p.name: p.read_bytes() for p in FIXTURES.glob("*.pt")}


def test_reference_finds_stats_moved_while_frozen() -> None:
    code, payload = run_json("fixtures/fault_frozen_finetuned.pt", "--reference", "fixtures/convnet_state_dict.pt")
    assert "BN407" in {f["code"] for f in payload["files"][0]["findings"]}
    code, payload = run_json("fixtures/convnet_state_dict.pt", "--reference", "fixtures/convnet_state_dict.pt")
    assert payload["files"][0]["findings"] == [] and code == 0


def test_the_committed_fixtures_folder_matches_its_manifest() -> None:
    """`python fixtures/make_fixtures.py` ends by checking the folder against the manifests; in place,
    that check stopped on tf_formats/ (written by make_tf_fixtures.py), so the README's regeneration
    command failed after rewriting every file."""
    pytest.importorskip("torch")
    from fixtures import make_fixtures

    make_fixtures.check_manifest()  # SystemExit on any difference
