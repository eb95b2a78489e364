"""Keras and Caffe files that lie to a reader: bnlint must judge what the framework itself loads.

Every hostile file is made here, in tmp_path, from the committed healthy fixtures (h5py, json,
zipfile, fixtures/caffe_writer.py). Where Keras is installed (torch backend), the crafted files
are also loaded by Keras itself (`load_model(safe_mode=True)`, in one child process for the whole
module) and the weights Keras ends up with are compared with what bnlint reported.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from bnlint.cli import main
from fixtures.caffe_writer import Blob, Layer, Net, write_caffemodel, write_prototxt

ROOT = Path(__file__).resolve().parent.parent
KERAS_DIR = ROOT / "fixtures" / "keras"
HEALTHY_H5 = KERAS_DIR / "keras_convnet.h5"
HEALTHY_KERAS = KERAS_DIR / "keras_convnet.keras"
HAS_KERAS = importlib.util.find_spec("keras") is not None and importlib.util.find_spec("torch") is not None
ROLES = ("gamma", "beta", "moving_mean", "moving_variance")


def lint(path: Path) -> tuple[int, list[dict[str, Any]], str | None]:
    result = CliRunner().invoke(main, ["--format", "json", str(path)], catch_exceptions=False)
    (file,) = json.loads(result.stdout)["files"]
    return result.exit_code, file["findings"], file["error"]


def codes(findings: list[dict[str, Any]], layer: str | None = None) -> set[str]:
    return {f["code"] for f in findings if layer is None or f.get("layer") == layer}


# ---------------------------------------------------------------- crafting
def legacy(tmp: Path, name: str, edit: Callable[[h5py.File], None]) -> Path:
    """The healthy legacy .h5 with one edit."""
    path = tmp / f"{name}.h5"
    shutil.copyfile(HEALTHY_H5, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def edit_config(f: h5py.File, layer: str, **settings: float) -> None:
    config = json.loads(f.attrs["model_config"])
    for entry in config["config"]["layers"]:
        if entry["config"].get("name") == layer:
            entry["config"].update(settings)
    f.attrs["model_config"] = json.dumps(config)  # allow_nan: NaN/Infinity, which json.loads accepts


def archive(tmp: Path, name: str, weights: Callable[[h5py.File], None] | None = None,
            config: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """The healthy .keras with its weights file and/or config.json edited (weights kept ZIP_STORED)."""
    path = tmp / f"{name}.keras"
    with zipfile.ZipFile(HEALTHY_KERAS) as src:
        members = {info.filename: src.read(info) for info in src.infolist()}
    if weights is not None:
        h5 = tmp / f"{name}.weights.h5"
        h5.write_bytes(members["model.weights.h5"])
        with h5py.File(h5, "r+") as f:
            weights(f)
        members["model.weights.h5"] = h5.read_bytes()
        h5.unlink()
    if config is not None:
        document = json.loads(members["config.json"])
        config(document)
        members["config.json"] = json.dumps(document).encode()
    with zipfile.ZipFile(path, "w") as out:
        for member, data in members.items():
            out.writestr(member, data, zipfile.ZIP_STORED)
    return path


def keras_bn_config(document: dict[str, Any], layer: str, **settings: float) -> None:
    for entry in document["config"]["layers"]:
        if entry["config"].get("name") == layer:
            entry["config"].update(settings)


def replace_dataset(group: h5py.Group, name: str, make: Callable[[h5py.Group, str, int], None]) -> None:
    count = int(group[name].shape[0])
    del group[name]
    make(group, name, count)


UNREADABLE: dict[str, Callable[[h5py.Group, str, int], None]] = {
    "string": lambda g, n, c: g.create_dataset(n, data=np.array([b"1.0"] * c)),
    "vlen": lambda g, n, c: g.create_dataset(n, (c,), dtype=h5py.vlen_dtype(np.float32)),
    "compound": lambda g, n, c: g.create_dataset(n, data=np.ones(c, dtype=[("a", "<f4"), ("b", "<f4")])),
    "complex": lambda g, n, c: g.create_dataset(n, data=np.ones(c, dtype=np.complex64)),
    "scalar": lambda g, n, c: g.create_dataset(n, data=np.float32(1.0)),
    "2d": lambda g, n, c: g.create_dataset(n, data=np.ones((1, c), dtype=np.float32)),
    "empty": lambda g, n, c: g.create_dataset(n, data=np.ones(0, dtype=np.float32)),
    "reference": lambda g, n, c: g.create_dataset(n, data=np.array([g.ref] * c, dtype=h5py.ref_dtype)),
}


def swapped(f: h5py.File) -> None:
    """weight_names lists moving_variance before moving_mean; a negative mean then lands in the variance."""
    group = f["model_weights/bn1"]
    group["bn1/moving_mean"][0] = -0.5
    group.attrs["weight_names"] = [b"bn1/gamma", b"bn1/beta", b"bn1/moving_variance", b"bn1/moving_mean"]


def nan_pointer(f: h5py.File) -> None:
    """weight_names points the variance slot at another dataset, one holding a NaN."""
    group = f["model_weights/bn1"]
    decoy = np.array(group["bn1/moving_variance"])
    decoy[2] = np.nan
    group.create_dataset("bn1/stale", data=decoy)
    group.attrs["weight_names"] = [b"bn1/gamma", b"bn1/beta", b"bn1/moving_mean", b"bn1/stale"]


def decoy_group(f: h5py.File) -> None:
    """The real bn1 group holds a negative variance and is labelled 'decoy'; a healthy copy labelled 'bn1' sits elsewhere."""
    real = f["layers/batch_normalization/vars"]
    f.copy(f["layers/batch_normalization"], "layers/zz_decoy")
    f["layers/zz_decoy/vars"].attrs["name"] = "bn1"
    real["3"][1] = -1.0
    real.attrs["name"] = "decoy"


CASES: dict[str, Callable[[Path], Path]] = {
    "h5_nan_eps": lambda t: legacy(t, "h5_nan_eps", lambda f: edit_config(f, "bn1", epsilon=float("nan"))),
    "h5_inf_eps": lambda t: legacy(t, "h5_inf_eps", lambda f: edit_config(f, "bn1", epsilon=float("inf"))),
    "h5_nan_momentum": lambda t: legacy(t, "h5_nan_momentum", lambda f: edit_config(f, "bn1", momentum=float("nan"))),
    "h5_swapped": lambda t: legacy(t, "h5_swapped", swapped),
    "h5_nan_pointer": lambda t: legacy(t, "h5_nan_pointer", nan_pointer),
    "keras_nan_eps": lambda t: archive(t, "keras_nan_eps", config=lambda d: keras_bn_config(d, "bn1", epsilon=float("nan"))),
    "keras_inf_momentum": lambda t: archive(t, "keras_inf_momentum",
                                            config=lambda d: keras_bn_config(d, "bn1", momentum=float("-inf"))),
    "keras_decoy": lambda t: archive(t, "keras_decoy", weights=decoy_group),
}


def _unreadable_case(kind: str) -> Callable[[Path], Path]:
    return lambda t: legacy(t, f"h5_{kind}", lambda f: replace_dataset(f["model_weights/bn2/bn2"], "moving_variance",
                                                                       UNREADABLE[kind]))


for _kind in UNREADABLE:
    CASES[f"h5_{_kind}"] = _unreadable_case(_kind)
CASES["h5_twice"] = lambda t: legacy(t, "h5_twice", lambda f: f["model_weights/bn2"].attrs.__setitem__(
    "weight_names", [b"bn2/gamma", b"bn2/beta", b"bn2/moving_mean", b"bn2/moving_mean"]))
CASES["keras_string_var"] = lambda t: archive(t, "keras_string_var", weights=lambda f: replace_dataset(
    f["layers/batch_normalization_1/vars"], "3", UNREADABLE["string"]))


def generated(tmp: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """One random legacy .h5: bn1's weight_names permuted (sometimes a name repeated or a decoy
    added), random NaN / negative values and random dataset kinds in its datasets."""
    rng = random.Random(seed)
    plan: dict[str, Any] = {"seed": seed}

    def edit(f: h5py.File) -> None:
        group = f["model_weights/bn1"]
        names = [f"bn1/{role}" for role in ROLES]
        for name in names:
            roll = rng.random()
            if roll < 0.15:
                data = np.array(group[name])
                data[rng.randrange(data.size)] = np.nan
                group[name][...] = data
            elif roll < 0.3:
                data = np.array(group[name])
                data[rng.randrange(data.size)] = -abs(float(data[0])) - 0.25
                group[name][...] = data
            elif roll < 0.4:
                replace_dataset(group, name, UNREADABLE[rng.choice(sorted(UNREADABLE))])
        order = names[:]
        rng.shuffle(order)
        if rng.random() < 0.15:
            order[rng.randrange(4)] = order[rng.randrange(4)]
        plan["weight_names"] = order
        group.attrs["weight_names"] = [n.encode() for n in order]

    return legacy(tmp, f"gen_{seed}", edit), plan


GENERATED_SEEDS = range(24)

ORACLE = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import keras
out = {}
for path in json.loads(sys.argv[1]):
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        out[path] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        continue
    layers = {}
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            values = {role: keras.ops.convert_to_numpy(getattr(layer, role)).astype(float).tolist()
                      for role in ("gamma", "beta", "moving_mean", "moving_variance")}
            values["epsilon"], values["momentum"] = float(layer.epsilon), float(layer.momentum)
            layers[layer.name] = values
    out[path] = {"layers": layers}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lies")
    files = {name: make(tmp) for name, make in CASES.items()}
    for seed in GENERATED_SEEDS:
        files[f"gen_{seed}"], _ = generated(tmp, seed)
    return files


@pytest.fixture(scope="module")
def keras_view(crafted: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """What Keras itself loads from every crafted Keras file (one child process for all of them)."""
    if not HAS_KERAS:
        pytest.skip("keras (torch backend) not installed")
    paths = [str(p) for p in crafted.values() if p.suffix in (".h5", ".keras")]
    env = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", ORACLE, json.dumps(paths)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    return {name: loaded[str(path)] for name, path in crafted.items() if str(path) in loaded}


# ---------------------------------------------------------------- non-finite settings
@pytest.mark.parametrize(("case", "code", "text"), [
    ("h5_nan_eps", "BN202", "eps is nan"), ("h5_inf_eps", "BN202", "eps is inf"),
    ("keras_nan_eps", "BN202", "eps is nan"),
    ("h5_nan_momentum", "BN304", "momentum is nan"), ("keras_inf_momentum", "BN304", "momentum is -inf"),
])
def test_nonfinite_setting_is_an_error(crafted: dict[str, Path], case: str, code: str, text: str) -> None:
    exit_code, findings, error = lint(crafted[case])
    assert error is None and exit_code == 1
    (hit,) = [f for f in findings if f["code"] == code]
    assert hit["severity"] == "error" and hit["layer"] == "bn1" and text in hit["message"]


def test_keras_loads_the_nonfinite_settings(keras_view: dict[str, dict[str, Any]]) -> None:
    assert np.isnan(keras_view["h5_nan_eps"]["layers"]["bn1"]["epsilon"])
    assert np.isnan(keras_view["keras_nan_eps"]["layers"]["bn1"]["epsilon"])
    assert np.isnan(keras_view["h5_nan_momentum"]["layers"]["bn1"]["momentum"])
    assert keras_view["keras_inf_momentum"]["layers"]["bn1"]["momentum"] == float("-inf")


# ---------------------------------------------------------------- read what Keras reads
def test_swapped_weight_names_are_read_by_position(crafted: dict[str, Path], keras_view: dict[str, dict[str, Any]]) -> None:
    exit_code, findings, _ = lint(crafted["h5_swapped"])
    assert exit_code == 1 and "BN102" in codes(findings, "bn1")
    assert min(keras_view["h5_swapped"]["layers"]["bn1"]["moving_variance"]) == -0.5  # what Keras runs with


def test_weight_names_pointing_at_a_nan_dataset(crafted: dict[str, Path], keras_view: dict[str, dict[str, Any]]) -> None:
    exit_code, findings, _ = lint(crafted["h5_nan_pointer"])
    assert exit_code == 1 and "BN101" in codes(findings, "bn1")
    assert np.isnan(keras_view["h5_nan_pointer"]["layers"]["bn1"]["moving_variance"][2])


def test_keras_archive_is_read_by_path_not_by_name_attribute(crafted: dict[str, Path],
                                                             keras_view: dict[str, dict[str, Any]]) -> None:
    exit_code, findings, _ = lint(crafted["keras_decoy"])
    assert exit_code == 1 and "BN102" in codes(findings, "bn1")
    assert keras_view["keras_decoy"]["layers"]["bn1"]["moving_variance"][1] == -1.0


# ---------------------------------------------------------------- unreadable statistics
@pytest.mark.parametrize("kind", [*UNREADABLE, "twice"])
def test_unreadable_statistic_is_a_warning(crafted: dict[str, Path], kind: str) -> None:
    exit_code, findings, error = lint(crafted[f"h5_{kind}"])
    assert error is None and exit_code == 1
    (hit,) = [f for f in findings if f["code"] == "BN110"]
    assert hit["severity"] == "warning" and hit["layer"] == "bn2"


def test_unreadable_statistic_in_a_keras_archive(crafted: dict[str, Path]) -> None:
    exit_code, findings, _ = lint(crafted["keras_string_var"])
    assert exit_code == 1 and "BN110" in codes(findings, "bn2")


# ---------------------------------------------------------------- generated weight lists vs Keras
def test_generated_weight_lists_match_what_keras_loads(crafted: dict[str, Path],
                                                       keras_view: dict[str, dict[str, Any]]) -> None:
    for seed in GENERATED_SEEDS:
        name = f"gen_{seed}"
        exit_code, findings, error = lint(crafted[name])
        found = codes(findings, "bn1")
        view = keras_view[name]
        if "error" in view:  # Keras refuses the file: bnlint must not call it clean
            assert error is not None or found & {"BN101", "BN102", "BN110"}, (name, view["error"], found)
            continue
        values = view["layers"]["bn1"]
        expect = set()
        if any(np.isnan(values[role]).any() for role in ROLES):
            expect.add("BN101")
        if (np.asarray(values["moving_variance"]) < 0).any():
            expect.add("BN102")
        assert error is None and found & {"BN101", "BN102"} == expect, (name, found, expect)
        if expect:
            assert exit_code == 1


# ---------------------------------------------------------------- Caffe
def _caffe_net(name: str) -> Net:
    """conv -> BatchNorm 'bn' -> conv -> BatchNorm 'bn' (one name twice), with trained statistics."""
    layers: list[Layer] = []
    for i in (1, 2):
        stats = [Blob(np.full(4, 0.2 * i, np.float32)), Blob(np.full(4, 1.5 * i, np.float32)), Blob(np.ones(1, np.float32))]
        layers.append(Layer(f"conv{i}", "Convolution", bottom=["data" if i == 1 else "c1"], top=[f"c{i}"],
                            blobs=[Blob(np.ones((4, 3 if i == 1 else 4, 1, 1), np.float32))],
                            params={"convolution_param": {"num_output": 4, "bias_term": False}}))
        layers.append(Layer("bn", "BatchNorm", bottom=[f"c{i}"], top=[f"c{i}"], blobs=stats))
    return Net(name=name, layers=layers, inputs=["data"], input_shapes=[(1, 3, 4, 4)])


def test_repeated_caffe_layer_name_leaves_the_second_at_zero(tmp_path: Path) -> None:
    net = _caffe_net("dup")
    model = write_caffemodel(tmp_path / "dup.caffemodel", net)
    deploy = write_prototxt(tmp_path / "dup.prototxt", Net(name="dup", inputs=net.inputs, input_shapes=net.input_shapes,
                                                           layers=[Layer(x.name, x.type, x.bottom, x.top, params=x.params)
                                                                   for x in net.layers]))
    for args in ([deploy, model], [model]):
        result = CliRunner().invoke(main, ["--format", "json", *map(str, args)], catch_exceptions=False)
        (file,) = json.loads(result.stdout)["files"]
        hits = [f for f in file["findings"] if f["code"] == "BN104"]
        assert result.exit_code == 1 and len(hits) == 1, file["findings"]
        assert "first layer of a name" in hits[0]["message"]


def test_caffemodels_lint_under_a_2_gib_address_space_limit() -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    models = sorted(str(p) for p in (ROOT / "fixtures" / "caffe").glob("*.caffemodel"))
    run = subprocess.run([sys.executable, "-m", "bnlint", "--format", "json", *models], capture_output=True, text=True,
                         timeout=120, preexec_fn=limit, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "MemoryError" not in run.stdout + run.stderr and "internal error" not in run.stdout + run.stderr
    files = json.loads(run.stdout)["files"]
    assert len(files) == len(models) and all(f["error"] is None for f in files)


def test_caffe_reader_reads_a_pipe(tmp_path: Path) -> None:
    """A file the OS gives no size for (a FIFO) is read in bounded chunks, to its end."""
    from bnlint.loaders.caffe_proto import read_caffemodel

    source = ROOT / "fixtures" / "caffe" / "caffe_convnet.caffemodel"
    fifo = tmp_path / "pipe.caffemodel"
    os.mkfifo(fifo)
    script = f"import pathlib; pathlib.Path({str(fifo)!r}).write_bytes(pathlib.Path({str(source)!r}).read_bytes())"
    writer = subprocess.Popen([sys.executable, "-c", script])
    try:
        net = read_caffemodel(fifo)
    finally:
        writer.wait(timeout=30)
    assert [layer.name for layer in net.layers] == [layer.name for layer in read_caffemodel(source).layers]


def test_buffer_is_sized_by_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader never asks for more than the file holds (+1 byte to see the end)."""
    from bnlint.loaders import caffe_proto

    asked: list[int] = []
    real_open = open

    class Spy(io.BufferedReader):
        def read(self, size: int | None = -1) -> bytes:  # type: ignore[override]
            asked.append(-1 if size is None else size)
            return super().read(size)

    def spying_open(name: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(name, mode, *args, **kwargs)
        return Spy(handle.detach()) if "b" in mode and str(name).endswith(".caffemodel") else handle

    monkeypatch.setattr("builtins.open", spying_open)
    source = ROOT / "fixtures" / "caffe" / "caffe_convnet.caffemodel"
    caffe_proto.read_caffemodel(source)
    assert asked and max(asked) <= source.stat().st_size + 1
