"""`bnlint fix` for PyTorch: exact layer-by-layer recalibration and byte-patched outputs.

The oracle is computed independently here: a float64 copy of the model, one full forward pass
per BatchNorm layer in execution order, the layer's input captured by a hook and reduced with
numpy (mean, var ddof=1), the result written before the next layer is measured.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnlint.fix import BNStatistics, RecalibrationError  # noqa: E402
from bnlint.fix.torch_recalibrate import recalibrate_file, recalibrate_module  # noqa: E402
from bnlint.fix.torch_write import write_torch_fix  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
DATA = FIXTURES / "data" / "convnet_shifted.npz"
ARCH = str(FIXTURES / "models.py") + ":convnet"
STATS = ("running_mean", "running_var", "num_batches_tracked")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # jit.load / jit.script are what users have


# ---------------------------------------------------------------- models and the oracle
class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.down(x)  # runs before bn1: execution order differs from definition order
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place on bn2's output
        return self.relu(out)


class ResidualNet(nn.Module):
    """Stem, two residual blocks (one with a BN'd downsample), pooled head with a BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, 1, 1, bias=False), bn=nn.BatchNorm2d(8), relu=nn.ReLU(inplace=True)))
        self.block1 = Block(8, 8, 1)
        self.block2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, 12)
        self.bn_fc = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(torch.relu(self.bn_fc(self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))))


class UntraceableNet(ResidualNet):
    """The same network with data-dependent Python control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.mean()) > -1e9:  # always true, but a tracer cannot know
            x = self.stem(x)
        x = self.block2(self.block1(x))
        return self.head(torch.relu(self.bn_fc(self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights and BN statistics that do not fit the data (what a fix repairs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.5, generator=generator)
                module.running_var.uniform_(0.2, 3.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)
                module.num_batches_tracked.fill_(500)
    return model.eval()


def residual(seed: int = 0, cls: type[nn.Module] = ResidualNet) -> nn.Module:
    torch.manual_seed(seed)
    return seeded(cls(), seed)


def convnet(weights: Path = FIXTURES / "convnet_state_dict.pt") -> nn.Module:
    from fixtures.models import convnet as factory

    model = factory()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def data(n: int | None = None) -> np.ndarray:
    x = np.load(DATA, allow_pickle=False)["input"]
    return x if n is None else x[:n]


def sequential_reference(model: nn.Module, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The definition, computed naively: per layer in execution order, one full float64 pass."""
    m = copy.deepcopy(model).double().eval()
    layers = {name: mod for name, mod in m.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    order: list[str] = []
    hooks = [mod.register_forward_pre_hook(lambda mod, args, name=name: order.append(name) if name not in order else None)
             for name, mod in layers.items()]
    inputs = torch.from_numpy(x).double()
    with torch.no_grad():
        m(inputs)
    for hook in hooks:
        hook.remove()
    out = {}
    for name in order:
        seen: list[np.ndarray] = []
        hook = layers[name].register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(args[0].detach().numpy().copy()))
        with torch.no_grad():
            m(inputs)
        hook.remove()
        axes = (0, *range(2, seen[0].ndim))
        mean, var = seen[0].mean(axis=axes), seen[0].var(axis=axes, ddof=1)
        layers[name].running_mean.copy_(torch.from_numpy(mean))
        layers[name].running_var.copy_(torch.from_numpy(var))
        out[name] = (mean, var)
    return out


def batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def assert_matches(result: Any, reference: dict[str, tuple[np.ndarray, np.ndarray]], rtol: float) -> None:
    """Means to rtol in units of the channel's standard deviation, variances to rtol relative."""
    assert [layer.module for layer in result.layers] == list(reference)
    for layer in result.layers:
        mean, var = reference[layer.module]
        assert np.max(np.abs(layer.mean - mean) / np.sqrt(var)) < rtol, layer.name
        np.testing.assert_allclose(layer.var, var, rtol=rtol, err_msg=layer.name)


# ---------------------------------------------------------------- (a) exactness
MODELS = {"convnet": convnet, "residual": residual}


@pytest.mark.parametrize("method", ["layer-major", "truncated"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_sequential_reference(name: str, method: str) -> None:
    model, x = MODELS[name](), data()
    reference = sequential_reference(model, x)
    result = recalibrate_module(model, batches(x, 32), method=method)
    assert result.method == method and result.samples == 256 and result.batches == 8
    assert_matches(result, reference, 1e-6)
    for layer in result.layers:  # the module's buffers hold them, as float32, with the counter
        bn = model.get_submodule(layer.module)
        np.testing.assert_array_equal(bn.running_var.numpy(), layer.var.astype(np.float32))
        # the larger of the old counter and the samples averaged, never the 8 batches (BN105 would
        # read those as 8 EMA updates with 43% of the initial values left)
        assert int(bn.num_batches_tracked) == layer.calls == (500 if name == "residual" else 301)
        assert layer.old_num_batches_tracked == 500 or name != "residual"
    double = MODELS[name]().double()
    assert_matches(recalibrate_module(double, batches(x, 32), method=method), reference, 1e-10)


@pytest.mark.parametrize("kind", ["script", "trace", "fixture"])
def test_torchscript_matches_reference(kind: str) -> None:
    x = data()
    if kind == "fixture":
        model, scripted = convnet(), torch.jit.load(FIXTURES / "convnet_scripted.pt")
    else:
        model = residual()
        scripted = torch.jit.script(copy.deepcopy(model)) if kind == "script" else torch.jit.trace(copy.deepcopy(model), torch.zeros(2, 3, 16, 16))
    result = recalibrate_module(scripted, batches(x, 50))
    assert result.method == "torchscript" and result.passes == 1
    assert_matches(result, sequential_reference(model, x), 1e-6)
    state = dict(scripted.named_buffers())
    for layer in result.layers:  # the scripted forward reads what was written
        assert torch.equal(state[f"{layer.module}.running_mean"], torch.from_numpy(layer.mean).float())


def test_torchscript_truncated_passes_when_over_budget() -> None:
    model, x = residual(), data(64)
    result = recalibrate_module(torch.jit.script(copy.deepcopy(model)), batches(x, 16), memory_budget=1)
    assert result.method == "torchscript-truncated" and result.passes == len(result.layers)
    assert_matches(result, sequential_reference(model, x), 1e-6)


def test_untraceable_model_falls_back_to_truncated_passes() -> None:
    model, x = residual(cls=UntraceableNet), data(96)
    result = recalibrate_module(model, batches(x, 20))
    assert result.method == "truncated" and result.passes == 7
    assert_matches(result, sequential_reference(model, x), 1e-6)
    assert not any("forward" in vars(m) for m in model.modules()), "wrappers left behind"


def test_over_budget_layer_major_falls_back() -> None:
    model, x = residual(), data(64)
    result = recalibrate_module(model, batches(x, 16), memory_budget=1000)
    assert result.method == "truncated" and result.memory_estimate and result.memory_estimate > 1000
    assert any("budget" in note for note in result.notes)
    assert_matches(result, sequential_reference(residual(), x), 1e-6)
    with pytest.raises(RecalibrationError, match="cannot trace|memory_budget"):
        recalibrate_module(residual(cls=UntraceableNet), batches(x, 16), method="layer-major")


def test_only_statistics_change_and_modes_are_restored() -> None:
    model = residual()
    model.train()
    model.block1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    result = recalibrate_module(model, batches(data(64), 16), layers="block*")
    assert {layer.module for layer in result.layers} == {"block1.bn1", "block1.bn2", "block2.down.1", "block2.bn1", "block2.bn2"}
    for key, value in model.state_dict().items():
        # the counter stays: the old 500 is larger than the 64 samples averaged
        changed = key.rsplit(".", 1)[0] in {layer.module for layer in result.layers} and key.rsplit(".", 1)[1] in STATS[:2]
        assert torch.equal(value, before[key]) != changed, key
        if key.endswith("num_batches_tracked") and key.rsplit(".", 1)[0] in {layer.module for layer in result.layers}:
            assert int(value) == 500
    assert flags == {name: m.training for name, m in model.named_modules()}
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_shared_batchnorm_is_refused() -> None:
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn).eval()
    for method in ("layer-major", "truncated"):
        with pytest.raises(RecalibrationError, match="more than once"):
            recalibrate_module(model, batches(data(8), 4), method=method)


def test_train_mode_trace_is_refused() -> None:
    with pytest.raises(RecalibrationError, match="traced in train mode"):
        recalibrate_module(torch.jit.load(FIXTURES / "fault_traced_train.pt"), batches(data(8), 4))
    with pytest.raises(RecalibrationError, match="traced in train mode"):
        recalibrate_file(str(FIXTURES / "fault_traced_train.pt"), str(DATA))


# ---------------------------------------------------------------- (b) batch splits
@pytest.mark.parametrize("size", [1, 7, 100, 256])
def test_batch_split_does_not_matter(size: int) -> None:
    x = data()
    baseline = recalibrate_module(convnet(), batches(x, 32))
    other = recalibrate_module(convnet(), batches(x, size))
    assert other.batches == -(-256 // size)
    for left, right in zip(baseline.layers, other.layers):
        np.testing.assert_allclose(right.mean, left.mean, rtol=1e-6, atol=1e-6 * np.sqrt(left.var).max())
        np.testing.assert_allclose(right.var, left.var, rtol=1e-6)


# ---------------------------------------------------------------- (c) versus update_bn
@pytest.mark.parametrize("name", list(MODELS))
def test_closer_than_update_bn(name: str) -> None:
    from torch.optim.swa_utils import update_bn

    x = data()
    reference = sequential_reference(MODELS[name](), x)
    ours = {layer.module: layer for layer in recalibrate_module(MODELS[name](), batches(x, 32)).layers}
    swa = MODELS[name]()
    update_bn([torch.from_numpy(b) for b in batches(x, 32)], swa)  # momentum=None: a cumulative average over batches
    swa.eval()
    first = next(iter(reference))
    for module, (mean, var) in reference.items():
        bn = swa.get_submodule(module)
        theirs = np.abs(bn.running_var.double().numpy() / var - 1).max()
        mine = np.abs(ours[module].var / var - 1).max()
        theirs_mean = np.abs(bn.running_mean.double().numpy() - mean).max() / np.sqrt(var.max())
        mine_mean = np.abs(ours[module].mean - mean).max() / np.sqrt(var.max())
        if module != first:  # has upstream BatchNorms: train-mode normalisation upstream changes its input
            assert theirs > 1e-3, module
            assert mine < theirs / 100 and mine_mean < theirs_mean / 100, module


# ---------------------------------------------------------------- (d) byte-patched outputs
def _bytes_outside(path: Path, ranges: list[tuple[int, int]], crc_fields: list[int]) -> bytes:
    raw = bytearray(path.read_bytes())
    for start, end in ranges + [(f, f + 4) for f in crc_fields]:
        raw[start:end] = b"\0" * (end - start)
    return bytes(raw)


def _state(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        return dict(torch.jit.load(str(path)).state_dict())
    loaded = torch.load(path, weights_only=True)
    for key in ("state_dict", "model_state_dict"):
        if key in loaded:
            loaded = loaded[key]
    return dict(loaded)


@pytest.mark.parametrize("fixture", ["convnet_state_dict.pt", "convnet_checkpoint.pth", "convnet_lightning.ckpt", "convnet.safetensors",
                                     "convnet_scripted.pt", "convnet_legacy.pt"])
def test_patched_file(fixture: str, tmp_path: Path) -> None:
    source = FIXTURES / fixture
    before_bytes, before_mtime = source.read_bytes(), os.stat(source).st_mtime_ns
    arch = None if fixture.endswith("scripted.pt") else ARCH
    result = recalibrate_file(str(source), str(DATA), arch=arch, batch_size=64)
    prefix = "model." if "lightning" in fixture else ""
    assert [layer.name for layer in result.layers] == [f"{prefix}bn1", f"{prefix}bn2", f"{prefix}bn3"]
    output = tmp_path / f"fixed{source.suffix}"
    report = write_torch_fix(source, output, result.new_stats())
    assert source.read_bytes() == before_bytes and os.stat(source).st_mtime_ns == before_mtime
    assert len(report.tensors) == 9 and sum(end - start for start, end in report.ranges) == 2 * 4 * (8 + 16 + 32) + 3 * 8
    old, new = _state(source), _state(output)
    assert set(old) == set(new)
    for key, tensor in old.items():
        layer, _, buffer = key.rpartition(".")
        if buffer in STATS and layer in {item.name for item in result.layers}:
            stats = next(s for s in result.layers if s.name == layer)
            expected = {"running_mean": stats.mean, "running_var": stats.var, "num_batches_tracked": 301}[buffer]  # old counter > 256 samples
            assert torch.equal(new[key], torch.as_tensor(expected).to(tensor.dtype).reshape(tensor.shape)), key
        else:
            assert torch.equal(new[key], tensor) and new[key].dtype == tensor.dtype, key
    # every byte outside the new values and the CRC-32 fields of the patched members is unchanged
    assert _bytes_outside(output, report.ranges, report.crc_fields) == _bytes_outside(source, report.ranges, report.crc_fields)
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as a, zipfile.ZipFile(output) as b:
            assert a.namelist() == b.namelist() and b.testzip() is None
            untouched = [n for n in a.namelist() if n not in report.members]
            assert all(a.read(n) == b.read(n) for n in untouched)
            assert {n.rsplit("/", 2)[-2] for n in report.members} == {"data"}  # only storages; pickles untouched


def test_fixed_file_runs_with_the_new_statistics(tmp_path: Path) -> None:
    result = recalibrate_file(str(FIXTURES / "convnet_lightning.ckpt"), str(DATA), arch=ARCH, batch_size=100)
    output = tmp_path / "fixed.ckpt"
    write_torch_fix(FIXTURES / "convnet_lightning.ckpt", output, result.new_stats())
    model = convnet()
    model.load_state_dict({k.removeprefix("model."): v for k, v in _state(output).items()})
    again = recalibrate_module(model, batches(data(), 64))  # already at the fixed point: nothing moves
    for before, after in zip(result.layers, again.layers):
        np.testing.assert_allclose(after.var, before.var, rtol=1e-6)
        assert after.before["mean_kl"] is not None and after.before["mean_kl"] < 1e-6


def test_layer_globs_use_the_file_names() -> None:
    result = recalibrate_file(str(FIXTURES / "convnet_lightning.ckpt"), str(DATA), arch=ARCH, layers="model.bn[23]")
    assert [layer.name for layer in result.layers] == ["model.bn2", "model.bn3"]
    assert [layer.module for layer in result.layers] == ["bn2", "bn3"]
    assert set(result.new_stats()) == {"model.bn2", "model.bn3"}


def test_in_place_and_refusals(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    source.write_bytes((FIXTURES / "convnet_state_dict.pt").read_bytes())
    stats = {"bn1": BNStatistics(np.arange(8.0), np.full(8, 2.0), 3)}
    with pytest.raises(RecalibrationError, match="in_place"):
        write_torch_fix(source, source, stats)
    write_torch_fix(source, None, stats, in_place=True)
    assert torch.equal(torch.load(source, weights_only=True)["bn1.running_mean"], torch.arange(8.0))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left
    with pytest.raises(RecalibrationError, match="no tensor"):
        write_torch_fix(source, tmp_path / "out.pt", {"bn9": (np.zeros(8), np.ones(8))})
    with pytest.raises(RecalibrationError, match="holds 8 values"):
        write_torch_fix(source, tmp_path / "out.pt", {"bn1": (np.zeros(3), np.ones(3))})
    with pytest.raises(RecalibrationError, match="does not fit the stored float16"):
        write_torch_fix(FIXTURES / "fault_half_buffers.pt", tmp_path / "out.pt", {"bn1": (np.zeros(8), np.full(8, 1e6))})
    assert not (tmp_path / "out.pt").exists()


# ---------------------------------------------------------------- (e) two processes
def _worker(rank: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        x = data(150)
        mine = [b for i, b in enumerate(batches(x, 16)) if i % 3 != 0] if rank else [b for i, b in enumerate(batches(x, 16)) if i % 3 == 0]
        out = {}
        for method in ("layer-major", "truncated"):
            result = recalibrate_module(residual().double(), mine, method=method, process_group=dist.group.WORLD)
            assert result.world_size == 2 and result.samples == 150 and result.batches == 10
            out.update({f"{method}:{layer.module}:{part}": getattr(layer, part) for layer in result.layers for part in ("mean", "var")})
            out.update({f"{method}:{layer.module}:calls": np.array(layer.calls) for layer in result.layers})
        np.savez(os.path.join(folder, f"rank{rank}.npz"), **out)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers ran
    try:
        single = recalibrate_module(residual().double(), batches(data(150), 16))
    finally:
        torch.set_num_threads(threads)
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1)]
    for method in ("layer-major", "truncated"):
        for layer in single.layers:
            for part in ("mean", "var"):
                key = f"{method}:{layer.module}:{part}"
                np.testing.assert_array_equal(ranks[0][key], ranks[1][key])  # every process writes the same bits
                scale = np.sqrt(layer.var) if part == "mean" else layer.var
                assert np.max(np.abs(ranks[0][key] - getattr(layer, part)) / scale) < 1e-12, key
            assert int(ranks[0][f"{method}:{layer.module}:calls"]) == 500  # old counter > the 150 samples of both ranks


# ---------------------------------------------------------------- (f) broken statistics
@pytest.mark.parametrize("fixture", ["fault_nan_stats.pt", "fault_negative_var.pt"])
def test_broken_statistics_are_recalibrated_from_data(fixture: str) -> None:
    model, x = convnet(FIXTURES / fixture), data()
    assert not all(bool((b >= 0).all()) for n, b in model.named_buffers() if n.endswith("running_var"))  # NaN or negative
    reference = sequential_reference(model, x)
    result = recalibrate_module(model, batches(x, 64))
    assert_matches(result, reference, 1e-6)
    assert all(np.isfinite(layer.var).all() and (layer.var > 0).all() for layer in result.layers)
    assert all(bool((b >= 0).all()) for n, b in model.named_buffers() if n.endswith("running_var"))


def test_non_finite_input_statistics_are_refused() -> None:
    model = convnet(FIXTURES / "fault_nan_stats.pt")
    before = model.bn3.running_var.clone()
    with pytest.raises(RecalibrationError, match="non-finite"):
        recalibrate_module(model, batches(data(), 64), layers=["bn3"])  # bn2 keeps its NaN variance, so bn3's input is NaN
    assert torch.equal(model.bn3.running_var, before)  # nothing invented, nothing written


def test_import_stays_torch_free() -> None:
    code = "import sys, bnlint.fix, bnlint.fix.recalibrate, bnlint.fix.torch_write\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
