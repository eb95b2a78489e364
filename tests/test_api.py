"""The Python API agrees with the CLI; assert_bn_healthy; `import bnlint` and static linting stay torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import bnlint
from bnlint.cli import main
from bnlint.findings import Report
from bnlint.testing import assert_bn_healthy

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MANIFEST: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
# Every fixture bnlint can read (broken ones and the data folder are covered by test_cli_fixtures).
READABLE = sorted(n for n, e in MANIFEST.items() if isinstance(e, dict) and "expect" in e)


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def cli_json(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["--format", "json", *args], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    payload: dict[str, Any] = json.loads(result.stdout)
    return payload


def api_rows(report: Report) -> list[list[tuple[str, str, str | None, str]]]:
    return [[(f.code, f.severity.label, f.layer, f.message) for f in r.findings] for r in report.files]


def cli_rows(payload: dict[str, Any]) -> list[list[tuple[str, str, str | None, str]]]:
    return [[(f["code"], f["severity"], f["layer"], f["message"]) for f in r["findings"]] for r in payload["files"]]


# -- files: the API and the CLI give the same findings ------------------------------------------


def test_lint_on_every_fixture_matches_the_cli() -> None:
    paths = [f"fixtures/{n}" for n in READABLE]
    report = bnlint.lint(paths)
    payload = cli_json(*paths)
    assert [r.path for r in report.files] == [r["path"] for r in payload["files"]] == paths
    assert api_rows(report) == cli_rows(payload)
    assert report.errors == [] and report.findings  # the fixtures do find things


def test_lint_accepts_one_path_a_pathlike_and_a_folder() -> None:
    one = bnlint.lint("fixtures/fault_nan_stats.pt")
    assert {f.code for f in one.findings} == {"BN101"} and one.errors == []
    assert api_rows(bnlint.lint(FIXTURES / "fault_nan_stats.pt")) == api_rows(one)
    folder = bnlint.lint("fixtures")
    assert len(folder.files) >= len(READABLE)


def test_real_cli_process_matches_the_api(tmp_path: Path) -> None:
    paths = ["fixtures/fault_frozen_train_module.pt", "fixtures/convnet.onnx", "fixtures/convnet_state_dict.pt"]
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "bnlint", "--format", "json", "--output", str(out), *paths],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # BN403 is an error
    assert cli_rows(json.loads(out.read_text())) == api_rows(bnlint.lint(paths))


# -- live modules --------------------------------------------------------------------------------


def _trained_convnet(frozen_train: bool = False) -> Any:
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(30):  # past BN105's few-updates threshold
        loss = model(torch.randn(16, 3, 8, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if frozen_train:
        for p in model[:3].parameters():
            p.requires_grad = False
        model.train()  # the freeze undone: BN403 on the first BN layer
    return model


@pytest.mark.parametrize("frozen_train", [False, True], ids=["healthy", "frozen-train"])
def test_lint_on_a_live_module_matches_the_cli_on_its_saved_file(tmp_path: Path, frozen_train: bool) -> None:
    torch = pytest.importorskip("torch")
    model = _trained_convnet(frozen_train)
    path = tmp_path / "model.pt"
    torch.save(model, path)  # a pickled module keeps modes and requires_grad, like the live one
    live = bnlint.lint(model)
    assert [r.path for r in live.files] == ["<module>"]
    from_file = cli_json(str(path))
    # Same findings; only the wording differs ("are in train mode" vs "were saved in train mode").
    strip = lambda rows: [[row[:3] for row in file] for file in rows]  # noqa: E731
    assert strip(api_rows(live)) == strip(cli_rows(from_file))
    # Every BN layer is in train mode (BN401), the frozen one too (BN403).
    assert {f.code for f in live.findings} == ({"BN401", "BN403"} if frozen_train else set())


# -- assert_bn_healthy -----------------------------------------------------------------------------


def test_assert_bn_healthy_passes_and_returns_the_report() -> None:
    report = assert_bn_healthy(_trained_convnet())
    assert isinstance(report, Report) and report.findings == []
    assert_bn_healthy("fixtures/convnet_state_dict.pt")
    assert_bn_healthy("fixtures/convnet.onnx")  # BN505 is info: below the default fail-on


def test_assert_bn_healthy_lists_the_findings() -> None:
    with pytest.raises(AssertionError) as info:
        assert_bn_healthy(_trained_convnet(frozen_train=True))
    text = str(info.value)
    assert "BN403" in text and "<module>: 1:" in text  # path, layer, code
    with pytest.raises(AssertionError, match="BN101"):
        assert_bn_healthy("fixtures/fault_nan_stats.pt")


def test_assert_bn_healthy_fail_on_and_config() -> None:
    with pytest.raises(AssertionError, match="BN505"):
        assert_bn_healthy("fixtures/convnet.onnx", fail_on="info")
    assert_bn_healthy("fixtures/fault_nan_stats.pt", fail_on="never")
    assert_bn_healthy("fixtures/fault_nan_stats.pt", config=bnlint_config(ignore=("BN101",)))
    with pytest.raises(AssertionError, match="cannot lint"):
        assert_bn_healthy("fixtures/bad_truncated.pt", fail_on="never")  # unreadable always fails
    with pytest.raises(ValueError):
        assert_bn_healthy("fixtures/convnet.onnx", fail_on="sometimes")


def bnlint_config(**fields: Any) -> Any:
    from bnlint.config import Config

    return Config(**fields)


# -- no torch on the static path ---------------------------------------------------------------------


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_bnlint_does_not_import_torch() -> None:
    code = ("import sys, bnlint, bnlint.api, bnlint.cli, bnlint.testing, bnlint.training_guard, bnlint.report\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime')))")
    assert _python(code) == "[]"


def test_static_linting_of_every_fixture_works_without_torch() -> None:
    # sys.modules['torch'] = None makes any `import torch` fail, as if torch were not installed.
    code = ("import sys, json\nsys.modules['torch'] = None\nimport bnlint\n"
            f"report = bnlint.lint({[f'fixtures/{n}' for n in READABLE]!r})\n"
            "print(json.dumps([[f.code, f.layer, f.message] for f in report.findings] + [e.message for e in report.errors]))")
    without_torch = json.loads(_python(code))
    with_torch = bnlint.lint([f"fixtures/{n}" for n in READABLE])
    assert without_torch == [[f.code, f.layer, f.message] for f in with_torch.findings]


def test_live_module_with_data_matches_the_cli_with_arch() -> None:
    """bnlint.lint(module, data=...) runs the module where it is and measures what the CLI measures."""
    torch = pytest.importorskip("torch")
    from fixtures.models import convnet

    root = Path(__file__).resolve().parent.parent
    net = convnet()
    net.load_state_dict(torch.load(root / "fixtures/convnet_state_dict.pt", weights_only=True))
    net.eval()
    data = root / "fixtures/data/convnet_shifted.npz"
    (live,) = bnlint.lint(net, data=data).files
    assert live.error is None
    assert {f.code for f in live.findings} == {"BN601", "BN602"}
    assert any("live module" in note for note in live.notes)
    assert net.training is False and all(not m.training for m in net.modules())
    cli = subprocess.run([sys.executable, "-m", "bnlint", "fixtures/convnet_state_dict.pt", "--arch", "fixtures/models.py:convnet",
                           "--data", str(data), "--format", "json"], capture_output=True, text=True, cwd=root)
    from_cli = json.loads(cli.stdout)["files"][0]["layer_stats"]
    for left, right in zip(live.layer_stats, from_cli):
        assert left["layer"] == right["layer"]
        assert left["max_abs_smd"] == pytest.approx(right["max_abs_smd"], rel=1e-6)


def test_data_may_be_arrays_dicts_or_iterables_of_batches() -> None:
    import numpy as np

    from bnlint import lint

    x = np.load(ROOT / "fixtures" / "data" / "convnet_shifted.npz")["input"]
    by_path = lint(str(ROOT / "fixtures" / "convnet.onnx"), data=str(ROOT / "fixtures" / "data" / "convnet_shifted.npz"))
    expected = sorted((f.code, f.layer) for f in by_path.findings)
    for data in (x, {"input": x}, (x[i:i + 50] for i in range(0, len(x), 50))):
        report = lint(str(ROOT / "fixtures" / "convnet.onnx"), data=data)
        assert sorted((f.code, f.layer) for f in report.findings) == expected
        stats = report.files[0].layer_stats
        assert stats[0]["channel"]["mean"] == by_path.files[0].layer_stats[0]["channel"]["mean"]


def test_parallel_lint_spawns_instead_of_forking_beside_other_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forked workers inherit every lock another thread holds at the fork, and wait on it for ever
    (it happened to the report's figure workers in a pytest-xdist worker): with another thread
    alive, `lint_paths(jobs=2)` spawns its workers."""
    import multiprocessing
    import threading

    from bnlint.api import lint_paths

    asked: list[str | None] = []
    real = multiprocessing.get_context

    def spy(method: str | None = None) -> object:
        asked.append(method)
        return real(method)

    monkeypatch.setattr(multiprocessing, "get_context", spy)
    release = threading.Event()
    other = threading.Thread(target=release.wait, daemon=True)
    other.start()
    try:
        report = lint_paths(["fixtures/convnet_state_dict.pt", "fixtures/fault_nan_stats.pt"], jobs=2)
    finally:
        release.set()
        other.join()
    assert asked == ["spawn"] and len(report.files) == 2
    assert "BN101" in {f.code for f in report.files[1].findings}
