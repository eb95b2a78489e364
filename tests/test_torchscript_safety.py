"""Running a TorchScript file for --data or bnlint fix is refused without --trust unless its code
uses only tensor computation: files, processes and printing are named in one line."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.loaders.torchscript_safety import torchscript_sources, unsafe_operations

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent

MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        {body}
        return self.bn(x)
'''
BODIES = {
    "save": ('torch.save(x, "{marker}")', "torch.save"),
    "from_file": ('x = x + torch.from_file("{marker}", size=1, dtype=torch.float32).sum()', "torch.from_file"),
    "print": ('print("hello")', "print"),
}


def _scripted(tmp_path: Path, body: str) -> Path:
    source = tmp_path / f"net_{abs(hash(body))}.py"
    source.write_text(MODULE.replace("{body}", body))
    spec = importlib.util.spec_from_file_location(source.stem, source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[source.stem] = module
    spec.loader.exec_module(module)
    path = tmp_path / "scripted.pt"
    torch.jit.script(module.Net().eval()).save(str(path))
    return path


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_file_and_print_ops_need_trust(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker.bin"
    body, op = BODIES[kind]
    path = _scripted(tmp_path, body.replace("{marker}", str(marker)))
    assert any(entry.startswith(op) for entry in unsafe_operations(torchscript_sources(path)))
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(main, [str(path), "--data", "fixtures/data/convnet_indomain.npz"])
    assert result.exit_code == 2 and op in result.output and "--trust" in result.output
    assert "Traceback" not in result.output and not marker.exists()


def test_setstate_and_aliases_and_foreign_ops_are_caught() -> None:
    code = {
        "code/__torch__.py": (
            "class M(Module):\n"
            "  def __setstate__(self, state: Tuple[Tensor]) -> NoneType:\n"
            "    return None\n"
            "  def forward(self, x: Tensor) -> Tensor:\n"
            "    _0 = torch.save\n"
            "    _1 = ops.myext.launch(x)\n"
            "    return torch.ops.custom.thing(x)\n"
        )
    }
    found = " ".join(unsafe_operations(code))
    assert "__setstate__" in found and "torch.save" in found and "ops.myext.launch" in found and "torch.ops.custom.thing" in found


def test_committed_torchscript_fixtures_are_pure_tensor_code() -> None:
    for name in ("convnet_scripted.pt", "convnet_traced.pt", "fault_traced_train.pt", "convnet_trs_false_scripted.pt"):
        assert unsafe_operations(torchscript_sources(ROOT / "fixtures" / name)) == []


def test_the_text_scan_is_conservative_about_spellings_it_cannot_read() -> None:
    code = {
        "code/__torch__.py": (
            "class M(Module):\n"
            "  def forward(self: __torch__.M, x: Tensor, name: str) -> Tensor:\n"
            "    _0 = __torch__.torch.nn.functional.relu\n"
            "    layer = getattr(self.layers, \"0\")\n"
            "    y = _0((layer).forward(x, ), False, )\n"
            "    a = getattr(torch, \"save\")\n"
            "    b = getattr(x, name)\n"
            "    t = torch\n"
            "    f = ops.aten\n"
            "    import os\n"
            "    c = __torch__.torch.classes.myext.Thing()\n"
            "    d = rpc_async(\"w\", x)\n"
            "    e = math.from_file(\"/etc/hostname\")\n"
            "    return torch.add(y, CONSTANTS.c0)\n"
        )
    }
    found = unsafe_operations(code)
    spelled = {entry.rsplit(" (", 1)[0] for entry in found}
    assert spelled == {"getattr(torch, ...)", "getattr with a computed attribute name", "torch used as a value",
                       "ops.aten used as a value", "import os", "__torch__.torch.classes.myext.Thing", "rpc_async",
                       "math.from_file"}
    assert "getattr(torch, ...) (code/__torch__.py:6)" in found and "import os (code/__torch__.py:10)" in found
