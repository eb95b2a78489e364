"""Hostile TorchScript: whatever the spelling, nothing from the archive runs without --trust.

Archives are built here (torch.jit.script + save), and most are then edited by hand: TorchScript
recompiles the `code/` text on load, so an attacker writes `getattr(torch, "save")(...)` or
`x = torch` / `x.save(...)` there and the graph still holds `aten::save`. Each payload writes a
canary file (torch.save, or torch.from_file(shared=True), which creates its file). Checked through
the CLI (`bnlint M --data D`, `bnlint fix M --data D -o out`, a static lint) and on the graph
walk alone, with the text scan switched off, to show the compiled-graph gate stands on its own.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.loaders import torchscript_safety
from bnlint.loaders.torchscript_safety import load_time_hooks, torchscript_sources, unsafe_operations

torch = pytest.importorskip("torch")
from bnlint.dynamic.torchscript_ir import check_scripted_module  # noqa: E402  (imports torch when called only)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* is what users have
ROOT = Path(__file__).resolve().parent.parent
DATA = "fixtures/data/convnet_tiny.npz"

HEADER = '''
import torch
from torch import nn
from typing import List, Tuple


def helper(y: torch.Tensor, path: str) -> torch.Tensor:
    {helper}
    return y


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        {inner}
        return y

    @torch.jit.export
    def spare(self, y: torch.Tensor) -> torch.Tensor:
        {spare}
        return y


class Net(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.inner = Inner()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        {forward}
        return helper(self.inner.spare(y), self.path)
'''
SAVE = 'torch.save(y, {path})'
# Where a payload sits: forward itself, inside an if / a loop, a free function, a submodule's
# forward, another method of a submodule.
PLACES = {
    "forward": ("forward", "{call}"),
    "if": ("forward", "if bool(torch.sum(y) > -1.0e30):\n            {call}"),
    "loop": ("forward", "for _i in range(2):\n            {call}"),
    "function": ("helper", "{call}"),
    "submodule": ("inner", "{call}"),
    "method": ("spare", "{call}"),
}
# How the hand-edited text spells `torch.save(ARGS)` on a line of its own (indent kept).
SPELLINGS = {
    "plain": "{i}torch.save({a})",
    "getattr": '{i}getattr(torch, "save")({a})',
    "getattr-ops": '{i}getattr(ops.aten, "save")({a})',
    "ops": "{i}ops.aten.save({a})",
    "alias": "{i}_al = torch\n{i}_al.save({a})",
    "alias-fn": "{i}_fn = torch.save\n{i}_fn({a})",
    "alias-ops": "{i}_ns = ops.aten\n{i}_ns.save({a})",
    "alias-ops-root": "{i}_op = ops\n{i}_op.aten.save({a})",
}
SAVE_LINE = re.compile(r"^([ \t]*)torch\.save\((.*)\)$", re.M)


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _import(tmp_path: Path, source: str, stem: str) -> Any:
    file = tmp_path / f"{stem}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(stem, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module  # torch.jit.script reads the source through inspect
    spec.loader.exec_module(module)
    return module


def _build(tmp_path: Path, name: str, canary: Path, places: dict[str, str]) -> Path:
    """Script Net with `torch.save(y, canary)` at the given places ({slot: call}) and save it."""
    slots = {"helper": "pass", "inner": "pass", "spare": "pass", "forward": "pass", **places}
    source = HEADER
    for slot, text in slots.items():
        source = source.replace("{" + slot + "}", text)
    module = _import(tmp_path, source, f"attack_{name.replace('-', '_')}")
    path = tmp_path / f"{name}.pt"
    torch.jit.script(module.Net(str(canary)).eval()).save(str(path))
    return path


def _rewrite(path: Path, edit: Any) -> Path:
    """The archive again with edit(text) applied to every code/*.py member (what an attacker does)."""
    out = path.with_name(path.stem + "_edited.pt")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/code/" in info.filename and info.filename.endswith(".py"):
                data = edit(data.decode()).encode()
            dst.writestr(info, data)
    return out


def _respell(spelling: str) -> Any:
    def edit(text: str) -> str:
        return SAVE_LINE.sub(lambda m: SPELLINGS[spelling].format(i=m.group(1), a=m.group(2)), text)
    return edit


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _static_bn004(path: Path) -> None:
    result = _cli(str(path))
    assert result.exit_code == 1 and "BN004" in result.output, result.output


def _refusals(result: Any) -> dict[str, str]:
    """The one error line per file, by path: a file that was read but could not run says so as its
    dynamic part not run (its static findings, BN004 here, are still reported)."""
    found = {}
    for line in result.output.splitlines():
        for marker in (": error: ", ": dynamic analysis not run: "):
            if marker in line:
                found[line.split(marker)[0]] = line
    return found


def _graph_gate_alone(path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """open_torch's refusal with the text scan blinded: what the compiled-graph check alone says."""
    from bnlint.dynamic.loading import open_torch
    from bnlint.errors import TrustRequired
    from bnlint.loaders import load_model

    with monkeypatch.context() as patch:
        patch.setattr(torchscript_safety, "unsafe_operations", lambda sources: [])
        with pytest.raises(TrustRequired) as refused:
            open_torch(load_model(str(path)), None, {}, False, torch.device("cpu"), DATA)
    message = str(refused.value)
    assert "--trust" in message and len(message.splitlines()) == 1
    return message


@pytest.fixture(scope="module")
def attacks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (archive, canary): one of each kind of attack, built once for the module."""
    tmp = tmp_path_factory.mktemp("attacks")
    canary = tmp / "canary"
    base = _build(tmp, "base", canary, {"forward": SAVE.format(path="self.path")})
    built: dict[str, tuple[Path, Path]] = {}
    for name in SPELLINGS:
        copy = tmp / f"{name}.pt"
        copy.write_bytes(base.read_bytes())
        built[f"spelling-{name}"] = (_rewrite(copy, _respell(name)), canary)
    call = "y = torch.add(y, torch.sum(torch.from_file(self.path, True, 4, dtype=torch.uint8)))"
    from_file = _build(tmp, "from_file", tmp / "canary_from_file", {"forward": call})
    built["from_file"] = (_rewrite(from_file, lambda text: text.replace("torch.from_file(", 'getattr(ops.aten, "from_file")(')),
                          tmp / "canary_from_file")
    printing = _build(tmp, "print", tmp / "unused", {"forward": 'print("BNLINT-PWNED")'})
    built["print"] = (_rewrite(printing, lambda text: text.replace('print("BNLINT-PWNED")', 'ops.prim.Print("BNLINT-PWNED")')),
                      tmp / "unused")
    module = _import(tmp, SETSTATE, "attack_setstate")
    setstate = tmp / "setstate.pt"
    torch.jit.script(module.Net(str(tmp / "canary_setstate")).eval()).save(str(setstate))
    built["setstate"] = (setstate, tmp / "canary_setstate")
    return built


SETSTATE = '''
import torch
from torch import nn
from typing import Tuple


class Net(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        getattr(torch, "save")(torch.zeros(1), self.path)
'''


def test_attacks_are_refused_through_the_cli(attacks: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """Static BN004; --data and fix without --trust: exit 2, one line naming the op and --trust; nothing runs."""
    chosen = ["spelling-getattr", "spelling-alias", "from_file", "print", "setstate"]
    named = {"spelling-getattr": "getattr(torch", "spelling-alias": "torch used as a value", "from_file": "from_file",
             "print": "ops.prim.Print", "setstate": "__setstate__"}
    for name in chosen:
        _static_bn004(attacks[name][0])
    result = _cli(*(str(attacks[name][0]) for name in chosen), "--data", DATA)
    refusals = _refusals(result)
    assert result.exit_code == 2 and "Traceback" not in result.output and "BNLINT-PWNED" not in result.output
    for name in chosen:
        line = refusals[str(attacks[name][0])]
        assert named[name] in line and "--trust" in line, line
    out = tmp_path / "out.pt"
    fixed = _cli("fix", str(attacks["setstate"][0]), "--data", DATA, "-o", str(out))
    assert fixed.exit_code == 2 and "__setstate__" in fixed.output and "--trust" in fixed.output and not out.exists()
    assert not any(canary.exists() for _, canary in attacks.values())


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_compiles_to_aten_save_and_the_graph_gate_refuses_it(
        attacks: dict[str, tuple[Path, Path]], spelling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path, canary = attacks[f"spelling-{spelling}"]
    _static_bn004(path)  # the conservative text scan
    assert [entry.split(" ")[0] for entry in check_scripted_module(torch.jit.load(str(path)), str(path))] == ["aten::save"]
    assert "aten::save (forward)" in _graph_gate_alone(path, monkeypatch)
    assert not canary.exists()


def test_file_access_and_printing_are_refused_by_the_graph_gate(attacks: dict[str, tuple[Path, Path]],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert "aten::from_file (forward)" in _graph_gate_alone(attacks["from_file"][0], monkeypatch)
    assert "prim::Print (forward)" in _graph_gate_alone(attacks["print"][0], monkeypatch)
    assert not attacks["from_file"][1].exists()


def test_setstate_is_found_before_torch_jit_load(attacks: dict[str, tuple[Path, Path]]) -> None:
    path, canary = attacks["setstate"]
    assert any(hook.startswith("__setstate__") for hook in load_time_hooks(torchscript_sources(path)))
    assert any(hook.startswith("__getstate__") for hook in load_time_hooks(torchscript_sources(path)))
    assert not canary.exists()  # scripting and saving never ran it; loading would


def test_forward_hook_is_walked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = tmp_path / "canary"
    module = _import(tmp_path, HEADER.replace("{helper}", "pass").replace("{inner}", "pass").replace("{spare}", "pass")
                     .replace("{forward}", "pass") + '''

def hook(m: nn.Module, inputs: Tuple[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    torch.save(out, m.path)
    return out
''', "attack_hook")
    net = module.Net(str(canary)).eval()
    net.register_forward_hook(module.hook)  # a top-level hook: run by the module call, not by forward
    path = tmp_path / "hook.pt"
    torch.jit.script(net).save(str(path))
    _static_bn004(path)
    assert "aten::save (hook (hook))" in _graph_gate_alone(path, monkeypatch)
    assert not canary.exists()


def test_custom_operator_namespace_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = tmp_path / "canary"
    library = torch.library.Library("bnlint_attack", "DEF")  # the op exists in this process while `library` lives
    library.define("touch(Tensor x, str path) -> Tensor")

    def touch(x: Any, path: str) -> Any:
        Path(path).write_text("pwned")
        return x

    library.impl("touch", touch, "CompositeExplicitAutograd")
    path = _build(tmp_path, "custom_op", canary, {"forward": "y = torch.ops.bnlint_attack.touch(y, self.path)"})
    _static_bn004(path)
    assert "ops.bnlint_attack.touch" in " ".join(unsafe_operations(torchscript_sources(path)))
    assert "bnlint_attack::touch (forward)" in _graph_gate_alone(path, monkeypatch)
    assert not canary.exists()
    del library


def test_seeded_mix_of_spellings_and_places_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random archives: 1-3 payloads at random places, each respelled at random; all refused, none run."""
    rng = random.Random(20261207)
    cases = []
    for index in range(8):
        canary = tmp_path / f"canary{index}"
        chosen = rng.sample(sorted(PLACES), rng.randint(1, 3))
        slots: dict[str, str] = {}
        for place in chosen:
            slot, template = PLACES[place]
            target = "path" if slot == "helper" else f'"{canary}"'
            slots[slot] = template.format(call=SAVE.format(path=target))
        spelling = rng.choice(sorted(SPELLINGS))
        folder = tmp_path / f"g{index}"
        folder.mkdir()
        path = _rewrite(_build(folder, f"gen{index}", canary, slots), _respell(spelling))
        cases.append((path, canary, chosen, spelling))
    for path, canary, chosen, spelling in cases:
        _static_bn004(path)
        assert "aten::save" in _graph_gate_alone(path, monkeypatch), (chosen, spelling)
        assert not canary.exists(), (chosen, spelling)


RESNET = '''
import torch
from torch import nn
import torch.nn.functional as F
from typing import List, Optional


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        return F.relu(out + identity)


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layers = nn.ModuleList([Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        features: List[torch.Tensor] = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        if len(features) > 100:
            raise RuntimeError("too deep")
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = torch.flatten(self.pool(x), 1)
        return torch.softmax(self.fc(self.drop(x)), dim=-1)
'''


def test_healthy_torchscript_runs_without_trust_and_gives_the_trusted_results(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """No false alarm: the committed scripted/traced convnets and a ResNet-like model pass both checks,
    and --data without --trust reports exactly what the ungated --trust run reports."""
    from bnlint.dynamic.loading import open_torch
    from bnlint.loaders import load_model

    torch.manual_seed(0)
    net = _import(tmp_path, RESNET, "healthy_resnet").ResNetLike().eval()
    resnet = tmp_path / "resnet_scripted.pt"
    torch.jit.script(net).save(str(resnet))
    paths = [ROOT / "fixtures" / "convnet_scripted.pt", ROOT / "fixtures" / "convnet_traced.pt", resnet]
    for path in paths:
        assert unsafe_operations(torchscript_sources(path)) == []
        assert check_scripted_module(torch.jit.load(str(path)), str(path)) == []
        open_torch(load_model(str(path)), None, {}, False, torch.device("cpu"), DATA)  # the gate lets it through
    runs = {}
    for extra in ([], ["--trust"]):
        result = CliRunner().invoke(main, [*map(str, paths), "--data", DATA, "--format", "json", *extra], catch_exceptions=False)
        assert ": error: " not in result.output and "Traceback" not in result.output
        payload = json.loads(result.stdout)
        runs[bool(extra)] = [(f["path"], f["error"], sorted((g["code"], g["message"]) for g in f["findings"])) for f in payload["files"]]
    assert runs[False] == runs[True]
    assert all(error is None for _, error, _ in runs[False])


def test_with_no_grad_is_not_a_static_error_but_is_not_run_without_trust(tmp_path: Path) -> None:
    """`with torch.no_grad():` in a healthy scripted forward: its context manager's code is in the
    archive and scanned, so a static lint has no BN004; running it still needs --trust, because the
    graph gate cannot walk __enter__/__exit__ (prim::Enter is refused, named in one line)."""
    source = tmp_path / "nograd_model.py"
    source.write_text(
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n        self.c = nn.Conv2d(3, 8, 3, padding=1)\n        self.bn = nn.BatchNorm2d(8)\n"
        "    def forward(self, x):\n"
        "        with torch.no_grad():\n            y = self.c(x)\n"
        "        return self.bn(y)\n"
        "m = M().eval()\n"
        "with torch.no_grad():\n    m.bn.running_var.fill_(0.7)\n    m.bn.num_batches_tracked.fill_(500)\n"
        f"torch.jit.script(m).save({str(tmp_path / 'nograd.pt')!r})\n")
    subprocess.run([sys.executable, str(source)], check=True, timeout=120)
    model = str(tmp_path / "nograd.pt")
    static = _cli(model)
    assert "BN004" not in static.output, static.output
    ran = _cli(model, "--data", DATA)
    refusal = _refusals(ran)[model]
    assert ran.exit_code == 2 and "prim::Enter" in refusal and "--trust" in refusal
