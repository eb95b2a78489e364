"""The safe PyTorch/safetensors readers against torch itself: every tensor bit for bit, attributes,
formats, malicious pickles (never executed) and corrupt inputs (one-line InputError)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from bnlint.errors import InputError  # noqa: E402
from bnlint.loaders import load_model  # noqa: E402
from bnlint.loaders.lazy_tensor import ByteSource  # noqa: E402
from bnlint.loaders.torch_zip import TorchArchive  # noqa: E402
from bnlint.loaders.weights import extract, state_dict_arrays  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"


# ---------------------------------------------------------------------------------------------
# helpers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8, eps=1e-3, momentum=0.05)
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.gn = nn.GroupNorm(2, 4)
        self.bn1d = nn.BatchNorm1d(4, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gn(self.head(self.bn(self.conv(x))))
        return self.bn1d(x.mean((2, 3)))


def trained_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    net.train()
    for _ in range(3):
        net(torch.randn(4, 3, 10, 10))
    with torch.no_grad():
        net.bn.weight.mul_(1.5)
    return net


class Config:
    """A third-party config object (like omegaconf's): torch refuses it with weights_only=True."""

    def __init__(self) -> None:
        self.lr = 0.1
        self.layers = [1, 2]


class Evil:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Any:
        return (self.func, self.args)


def raw(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def assert_same(mine: np.ndarray, ref: Any, key: str) -> None:
    """Bit-for-bit equality (NaNs included); bfloat16 is read back as float32 holding the same bits."""
    assert tuple(mine.shape) == tuple(ref.shape), key
    if ref.dtype == torch.bfloat16:
        assert mine.dtype == np.float32, key
        bits = ref.contiguous().view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(mine.view(np.uint32) >> 16, bits.astype(np.uint32)), key
        assert not np.any(mine.view(np.uint32) & 0xFFFF), key
        return
    expected = ref.contiguous().numpy()
    assert mine.dtype == expected.dtype, key
    assert np.array_equal(raw(mine), raw(expected)), key


def assert_all_tensors(path: Path, reference: dict[str, Any]) -> None:
    arrays = state_dict_arrays(path)
    expected = {k: v for k, v in reference.items() if isinstance(v, torch.Tensor)}
    assert set(arrays) == set(expected)
    for key, tensor in expected.items():
        assert_same(arrays[key], tensor, key)


def marker_payloads(marker: Path) -> list[Evil]:
    return [
        Evil(os.system, f"touch {marker}"),
        Evil(eval, f"open({str(marker)!r}, 'w').close()"),
        Evil(subprocess.Popen, ["touch", str(marker)]),
    ]


# ---------------------------------------------------------------------------------------------
# bit-exact tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("legacy", [False, True])
def test_state_dict_tensors_bit_exact(tmp_path: Path, dtype: Any, legacy: bool) -> None:
    net = trained_net().to(dtype)
    state = net.state_dict()
    state["bn.running_var"][0] = float("nan")
    state["bn.running_var"][1] = float("inf")
    state["bn.running_mean"][2] = -0.0
    path = tmp_path / "sd.pt"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    assert_all_tensors(path, torch.load(path, weights_only=True))
    info = load_model(path)
    assert info.format == "torch-state-dict"
    assert [layer.name for layer in info.layers] == ["bn", "head.1", "bn1d"]
    bn = info.layer("bn")
    assert bn is not None and bn.certainty == "inferred" and bn.channels == 8
    assert bn.dtype("running_var") == str(dtype).replace("torch.", "")
    assert bn.num_batches_tracked == 3
    assert np.isnan(bn.array("running_var")[0]) and np.isinf(bn.array("running_var")[1])


def test_views_strides_and_shared_storages(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32)
    matrix = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    state = {
        "base": base, "slice": base[5:9], "strided": base[1::3], "t": matrix.t(), "empty": torch.empty(0, 3),
        "scalar": torch.tensor(7, dtype=torch.int32), "flags": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8), "reshaped": base.view(2, 3, 4)[:, 1:, ::2],
    }
    for legacy in (False, True):
        path = tmp_path / f"views{legacy}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        assert_all_tensors(path, torch.load(path, weights_only=True))


def test_big_endian_archive(tmp_path: Path) -> None:
    """A checkpoint written on a big-endian machine: byteorder 'big', every storage byte-swapped."""
    state = trained_net().state_dict()
    state["half"] = torch.randn(5).half()
    little = tmp_path / "little.pt"
    torch.save(state, little)
    archive = TorchArchive(little)
    archive.load_pickle("data.pkl")
    dtypes = {key: ref.dtype for key, ref in archive.storages.items()}
    archive.close()
    big = tmp_path / "big.pt"
    codes = {"float32": "<f4", "float16": "<f2", "int64": "<i8"}
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item)
            rel = item.filename.split("/", 1)[1]
            if rel == "byteorder":
                data = b"big"
            elif rel.startswith("data/") and rel[5:] in dtypes:
                data = np.frombuffer(data, dtype=codes[dtypes[rel[5:]]]).byteswap().tobytes()
            dst.writestr(item.filename, data)
    reference = torch.load(big, weights_only=True)  # torch swaps back on load
    for key in state:
        assert torch.equal(reference[key], state[key])
    assert_all_tensors(big, reference)
    assert load_model(big).metadata["byteorder"] == "big"


def test_safetensors_bit_exact(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = {k: v.contiguous() for k, v in trained_net().state_dict().items()}
    state["bf16"] = torch.randn(6).bfloat16()
    path = tmp_path / "m.safetensors"
    save_file(state, path, metadata={"format": "pt"})
    assert_all_tensors(path, load_file(path))
    info = load_model(path)
    assert info.format == "safetensors" and len(info.layers) == 3
    assert info.metadata["safetensors_metadata"] == {"format": "pt"}


def test_reads_only_the_bn_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = trained_net()
    path = tmp_path / "sd.pt"
    torch.save(net.state_dict(), path)
    reads: list[int] = []
    original = ByteSource.read

    def counting(self: ByteSource, start: int, count: int) -> bytes:
        reads.append(count)
        return original(self, start, count)

    monkeypatch.setattr(ByteSource, "read", counting)
    info = load_model(path)
    for layer in info.layers:
        for tensor in layer.tensors:
            layer.array(tensor)
    conv_bytes = net.conv.weight.numel() * 4
    assert reads and max(reads) < conv_bytes  # the conv weight storage was never read
    bn_bytes = sum(t.numel() * t.element_size() for n, t in net.state_dict().items() if "bn" in n or "head.1" in n)
    assert sum(reads) == bn_bytes


# ---------------------------------------------------------------------------------------------
# formats and attributes


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pickled_module(tmp_path: Path, mode: str, legacy: bool) -> None:
    net = trained_net()
    getattr(net, mode)()
    net.bn.weight.requires_grad_(False)
    path = tmp_path / "module.pt"
    torch.save(net, path, _use_new_zipfile_serialization=not legacy)
    assert_all_tensors(path, net.state_dict())
    info = load_model(path)
    assert info.format == "torch-module"
    bn = info.layer("bn")
    assert bn is not None and bn.kind == "BatchNorm2d" and bn.certainty == "known"
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-3, 0.05, True, True)
    assert bn.training is (mode == "train") and {"eps", "momentum", "training", "affine"} <= bn.known
    assert bn.requires_grad == {"weight": False, "bias": True}
    bn1d = info.layer("bn1d")
    assert bn1d is not None and bn1d.momentum is None and bn1d.is_known("momentum")
    assert info.other_norms == ["gn"]
    assert info.modules["head.1"].class_name == "torch.nn.modules.batchnorm.BatchNorm2d"
    assert info.modules[""].training is (mode == "train")


def test_module_without_running_stats_and_custom_classes(tmp_path: Path) -> None:
    model = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False), nn.InstanceNorm2d(4, track_running_stats=True))
    path = tmp_path / "m.pt"
    torch.save(model, path)
    info = load_model(path)
    assert [layer.name for layer in info.layers] == ["0"]
    assert info.layers[0].track_running_stats is False and set(info.layers[0].tensors) == {"weight", "bias"}
    assert info.other_norms == ["1"]
    # Without classes, an instance-norm name keeps running stats out of the BN list.
    state = {"inorm1.running_mean": torch.zeros(3), "inorm1.running_var": torch.ones(3),
             "bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)}
    torch.save(state, path)
    info = load_model(path)
    assert [layer.name for layer in info.layers] == ["bn"] and info.other_norms == ["inorm1"]


def test_training_checkpoint_with_optimizer(tmp_path: Path) -> None:
    net = trained_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 10, 10)).sum().backward()
    optimizer.step()
    checkpoint = {"epoch": 4, "model_state_dict": net.state_dict(), "optimizer_state_dict": optimizer.state_dict()}
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    assert_all_tensors(path, torch.load(path, weights_only=True)["model_state_dict"])
    info = load_model(path)
    assert info.format == "torch-checkpoint" and info.metadata["checkpoint_key"] == "model_state_dict"
    assert len(info.layers) == 3


def test_lightning_checkpoint_with_third_party_classes(tmp_path: Path) -> None:
    net = trained_net()
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    checkpoint = {
        "epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.2.0", "state_dict": state,
        "hyper_parameters": {"lr": 0.01, "cfg": Config(), "sizes": (1, 2)},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01}]}], "callbacks": {}, "loops": {},
    }
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # torch itself refuses the config class
    info = load_model(path)
    assert info.format == "lightning" and info.unsafe_globals == []
    assert info.hyper_parameters["lr"] == 0.01
    assert info.hyper_parameters["cfg"] == {"lr": 0.1, "layers": [1, 2]}
    assert info.key_prefix == "model."
    assert [layer.name for layer in info.layers] == ["model.bn", "model.head.1", "model.bn1d"]
    arrays = state_dict_arrays(path)
    assert set(arrays) == set(state)
    for key, tensor in state.items():
        assert_same(arrays[key], tensor, key)


def test_dataparallel_and_swa(tmp_path: Path) -> None:
    net = trained_net()
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(net).state_dict(), path)
    assert load_model(path).key_prefix == "module."
    swa = torch.optim.swa_utils.AveragedModel(net)
    torch.save(swa.state_dict(), path)
    assert load_model(path).averaged_buffers == ["n_averaged"]


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torchscript(tmp_path: Path, how: str, mode: str) -> None:
    net = trained_net()
    getattr(net, mode)()
    scripted = torch.jit.script(net) if how == "script" else torch.jit.trace(net, torch.randn(2, 3, 10, 10), check_trace=False)
    path = tmp_path / "ts.pt"
    scripted.save(str(path))
    assert_all_tensors(path, dict(torch.jit.load(str(path)).state_dict()))
    info = load_model(path)
    assert info.format == "torchscript" and info.unsafe_globals == []
    assert [layer.name for layer in info.layers] == ["bn", "head.1", "bn1d"]
    bn = info.layer("bn")
    assert bn is not None and bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.05)
    assert bn.training is (mode == "train")
    traced_train = {call.layer for call in info.traced_training}
    if how == "trace" and mode == "train":
        assert traced_train == {"bn", "head.1", "bn1d"}
        assert all("True" in call.code for call in info.traced_training)
    else:
        assert traced_train == set()
    if how == "script":
        bn1d = info.layer("bn1d")
        assert bn1d is not None and bn1d.is_known("momentum") and bn1d.momentum is None
    assert info.other_norms == ["gn"]


def _torch_reference(path: Path) -> Any:
    """What torch reads from a file (weights_only=True; TorchScript via torch.jit.load), or None if it refuses."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception:  # noqa: BLE001 - deliberately broken fixture
            return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled module, custom class or a broken file
        pass
    try:
        with zipfile.ZipFile(path) as archive:
            scripted = any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return None
    return dict(torch.jit.load(str(path)).state_dict()) if scripted else None


def test_fixtures_match_torch() -> None:
    """Every torch/safetensors fixture torch can read: the safe reader returns the same tensors."""
    compared = 0
    for path in sorted(FIXTURES.glob("*")):
        if path.suffix not in (".pt", ".pth", ".ckpt", ".bin", ".safetensors") or not path.is_file():
            continue
        reference = _torch_reference(path)
        if reference is None:
            try:
                load_model(path)  # torch refuses it: we may read it (stubs) or raise InputError, nothing else
            except InputError:
                pass
            continue
        extracted = extract(path)
        if isinstance(reference, dict) and extracted.format == "lightning":
            reference = reference["state_dict"]
        elif isinstance(reference, dict) and "checkpoint_key" in extracted.metadata:
            reference = reference[extracted.metadata["checkpoint_key"]]
        assert_all_tensors(path, reference)
        compared += 1
    if compared == 0:
        pytest.skip("no fixtures generated yet")


# ---------------------------------------------------------------------------------------------
# malicious pickles: reported, never executed


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_checkpoint_is_never_executed(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    payloads = marker_payloads(marker)
    state = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3), "evil": payloads,
             "nested": {"x": Evil(os.system, f"touch {marker}")}}
    path = tmp_path / "evil.pt"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    info = load_model(path)
    arrays = state_dict_arrays(path)
    assert not marker.exists()
    assert {"posix.system", "builtins.eval", "subprocess.Popen"} <= set(info.unsafe_globals) or \
        {"nt.system", "builtins.eval", "subprocess.Popen"} <= set(info.unsafe_globals)
    assert [layer.name for layer in info.layers] == ["bn"] and set(arrays) == {"bn.running_mean", "bn.running_var"}


def test_malicious_module_and_plain_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    net = trained_net()
    net.hook = Evil(os.system, f"touch {marker}")  # an attribute of a pickled module
    path = tmp_path / "module.pt"
    torch.save(net, path)
    info = load_model(path)
    assert info.format == "torch-module" and any(name.endswith(".system") for name in info.unsafe_globals)
    plain = tmp_path / "plain.pkl.pt"
    plain.write_bytes(pickle.dumps(marker_payloads(marker), protocol=2))
    info = load_model(plain)
    assert "builtins.eval" in info.unsafe_globals and not info.layers
    assert not marker.exists()
    harmless = tmp_path / "harmless.pt"
    harmless.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(InputError, match="plain Python pickle"):
        load_model(harmless)


# ---------------------------------------------------------------------------------------------
# corrupt inputs


def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save(trained_net().state_dict(), good)
    data = good.read_bytes()
    legacy = tmp_path / "legacy.pt"
    torch.save(trained_net().state_dict(), legacy, _use_new_zipfile_serialization=False)
    files = {
        "truncated_zip": data[: len(data) // 2],
        "garbage": b"this is not a model at all" * 10,
        "empty": b"",
        "truncated_safetensors": (200).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [2]',
        "bad_safetensors_offsets": (len(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}')).to_bytes(8, "little")
        + b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}' + b"\0" * 8,
        "truncated_legacy": legacy.read_bytes()[:300],
        "legacy_missing_data": legacy.read_bytes()[:-20],
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/version", "3")
    files["zip_without_data_pkl"] = buffer.getvalue()
    buffer = io.BytesIO()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(buffer, "w") as dst:
        for item in src.infolist():
            if "/data/" not in item.filename:  # storages removed
                dst.writestr(item.filename, src.read(item))
    files["zip_without_storages"] = buffer.getvalue()
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        paths[name].write_bytes(content)
    return paths


def test_corrupt_inputs_raise_one_line_input_error(tmp_path: Path) -> None:
    for name, path in _corrupt_files(tmp_path).items():
        with pytest.raises(InputError) as caught:
            info = load_model(path)
            for layer in info.layers:  # errors may surface only when the data is read
                for tensor in layer.tensors:
                    layer.array(tensor)
        message = str(caught.value)
        assert "\n" not in message and str(path) in message, name
    with pytest.raises(InputError, match="no such file"):
        load_model(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------
# torch is never imported by the loaders


def test_loaders_do_not_import_torch(tmp_path: Path) -> None:
    net = trained_net()
    paths = [tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt", tmp_path / "d.pt"]
    torch.save(net.state_dict(), paths[0])
    torch.save(net.state_dict(), paths[1], _use_new_zipfile_serialization=False)
    torch.save(net, paths[2])
    torch.jit.script(net).save(str(paths[3]))
    code = (
        "import sys, bnlint.loaders as L\n"
        "from bnlint.loaders.weights import state_dict_arrays\n"
        f"for p in {[str(p) for p in paths]!r}:\n"
        "    info = L.load_model(p)\n"
        "    [l.array(t) for l in info.layers for t in l.tensors]\n"
        "    state_dict_arrays(p)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
