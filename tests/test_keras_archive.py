"""read_keras: layer discovery, weight roles (bit for bit against h5py at known paths and against
Keras itself), Keras semantics the loader encodes, and hostile inputs.

The independent reader here shares no code with the loader: it opens the HDF5 with h5py and
reads datasets at paths written out by hand from what Keras 3.15 was observed to write.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from bnlint.errors import InputError, NotAModel
from bnlint.loaders.keras_archive import KerasFile, NotAKerasModel, read_keras
from bnlint.loaders.keras_config import effective_trainable

h5py = pytest.importorskip("h5py")
# Keras's torch backend calls np.array(tensor) in ways numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
KDIR = ROOT / "fixtures" / "keras"
MANIFEST: dict[str, Any] = json.loads((KDIR / "manifest.json").read_text())
MODELS = sorted(name for name, entry in MANIFEST.items() if name != "data" and "expect_error" not in entry)
UNREADABLE_FIXTURE = "keras_unreadable_stats.h5"  # bn2's moving_variance is a string dataset: no numbers to compare
READABLE = [name for name in MODELS if name != UNREADABLE_FIXTURE]
ROLES4 = ["gamma", "beta", "moving_mean", "moving_variance"]
FLAT_V3 = {"bn1": "layers/batch_normalization", "bn2": "layers/batch_normalization_1"}


def known_paths(name: str) -> dict[str, dict[str, str]]:
    """{layer path: {role: dataset path}} as Keras 3.15 wrote each fixture (checked with h5py)."""
    def v3(groups: dict[str, str], roles: dict[str, list[str]] | None = None) -> dict[str, dict[str, str]]:
        return {layer: {role: f"{group}/vars/{i}" for i, role in enumerate((roles or {}).get(layer, ROLES4))}
                for layer, group in groups.items()}

    if name == "keras_no_center.keras":
        return v3({**FLAT_V3, "bn_head": "layers/batch_normalization_2"},
                  {"bn1": ["gamma", "moving_mean", "moving_variance"], "bn2": ["beta", "moving_mean", "moving_variance"],
                   "bn_head": ["moving_mean", "moving_variance"]})
    if name in ("keras_nested_backbone_frozen.keras", "keras_frozen_bn_trainable.keras"):
        return v3({f"backbone/{k}": f"layers/functional/{v}" for k, v in FLAT_V3.items()})
    if name.endswith(".keras") or name == "keras_convnet.weights.h5":
        return v3(FLAT_V3)
    prefix, suffix = {"keras_convnet.h5": ("model_weights/", ""), "keras_tf2_style.h5": ("model_weights/", ":0"),
                      "keras_tf2_renorm.h5": ("model_weights/", ":0"), "keras_convnet_legacy_weights.h5": ("", "")}[name]
    return {bn: {role: f"{prefix}{bn}/{bn}/{role}{suffix}" for role in ROLES4} for bn in ("bn1", "bn2")}


@pytest.fixture(scope="module")
def files() -> Iterator[dict[str, KerasFile]]:
    opened = {name: read_keras(KDIR / name, isolate=False) for name in MODELS}  # isolation: tested below
    yield opened
    for kf in opened.values():
        kf.close()


def independent_h5(name: str) -> Any:
    """h5py on the weights: the zip member's bytes for .keras, the file itself for .h5."""
    if name.endswith(".keras"):
        with zipfile.ZipFile(KDIR / name) as archive:
            return h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    return h5py.File(KDIR / name, "r")


def by_path(kf: KerasFile) -> dict[str, Any]:
    return {layer.path: layer for layer in kf.layers}


# ----------------------------------------------------------------------------- discovery
@pytest.mark.parametrize("name", MODELS)
def test_layers_match_manifest(files: dict[str, KerasFile], name: str) -> None:
    kf, entry = files[name], MANIFEST[name]
    assert kf.kind == entry["kind"]
    assert [layer.path for layer in kf.batchnorm_layers] == entry["batchnorm"]
    assert kf.other_norms == entry.get("other_norms", [])
    layers = by_path(kf)
    for path, expected in entry.get("effective_trainable", {}).items():
        assert layers[path].effective_trainable is expected, path
    for path, roles in entry.get("roles", {}).items():
        assert list(layers[path].weights) == roles
    for path, shape in entry.get("shapes", {}).items():
        assert all(t.shape == tuple(shape) for t in layers[path].weights.values())
    if entry.get("keras_version"):
        assert kf.keras_version == entry["keras_version"]


def test_convnet_structure(files: dict[str, KerasFile]) -> None:
    kf = files["keras_convnet.keras"]
    assert [(la.path, la.class_name, la.order) for la in kf.layers] == [
        ("image", "InputLayer", 0), ("conv1", "Conv2D", 1), ("bn1", "BatchNormalization", 2), ("relu1", "ReLU", 3),
        ("conv2", "Conv2D", 4), ("bn2", "BatchNormalization", 5), ("relu2", "ReLU", 6),
        ("pool", "GlobalAveragePooling2D", 7), ("fc", "Dense", 8)]
    assert kf.inputs == [("image", (None, 16, 16, 3))]
    assert kf.keras_version == "3.15.1" and kf.model_class == "Functional"
    bn1 = by_path(kf)["bn1"]
    assert bn1.config["epsilon"] == 0.001 and bn1.config["momentum"] == 0.99 and bn1.module == "keras.layers"
    assert bn1.build_config == {"input_shape": [None, 16, 16, 8]}
    assert bn1.inbound_nodes[0]["args"][0]["config"]["keras_history"][0] == "conv1"
    legacy = by_path(files["keras_tf2_style.h5"])["bn1"]
    assert legacy.config["axis"] == [3] and legacy.inbound_nodes[0][0][0] == "conv1"
    assert files["keras_convnet.h5"].backend == "torch"
    assert files["keras_tf2_style.h5"].backend == "tensorflow"
    assert files["keras_tf2_style.h5"].inputs == [("image", (None, 16, 16, 3))]


def test_nested_parents_and_trainable(files: dict[str, KerasFile]) -> None:
    frozen = by_path(files["keras_nested_backbone_frozen.keras"])
    assert frozen["backbone"].class_name == "Functional" and frozen["backbone"].trainable is False
    assert frozen["backbone/bn1"].parent == "backbone" and frozen["fc"].parent == ""
    assert [frozen[p].order for p in ("backbone", "backbone/conv1", "backbone/bn1", "pool")] == [1, 3, 4, 9]
    trap = by_path(files["keras_frozen_bn_trainable.keras"])
    assert trap["backbone"].trainable is True
    assert (trap["backbone/conv1"].trainable, trap["backbone/bn1"].trainable) == (False, True)
    assert (trap["backbone/conv1"].effective_trainable, trap["backbone/bn1"].effective_trainable) == (False, True)


def test_normalization_layer_is_not_batchnorm(files: dict[str, KerasFile]) -> None:
    kf = files["keras_normalization_layer.keras"]
    norm = by_path(kf)["normalize"]
    assert norm.class_name == "Normalization" and not norm.is_batchnorm
    assert kf.other_norms == ["normalize"] and "moving_mean" not in norm.weights
    assert [t.shape for t in norm.weights.values()] == [(3,), (3,), ()]  # mean, variance, count


def test_lambda_config_is_inert_text(files: dict[str, KerasFile]) -> None:
    scale = by_path(files["keras_lambda.keras"])["scale"]
    assert scale.class_name == "Lambda" and isinstance(scale.config["function"]["config"]["code"], str)


def test_weights_only_files(files: dict[str, KerasFile]) -> None:
    v3 = files["keras_convnet.weights.h5"]
    assert v3.keras_version is None and v3.inputs == [] and all(la.trainable is None for la in v3.layers)
    assert [la.path for la in v3.layers][:4] == ["bn1", "bn2", "conv1", "conv2"]  # file order, not execution order
    legacy = files["keras_convnet_legacy_weights.h5"]
    assert [la.path for la in legacy.layers] == ["conv1", "bn1", "conv2", "bn2", "fc"]  # layer_names order
    assert list(by_path(legacy)["conv1"].weights) == ["kernel"]


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("name", READABLE)
def test_weights_bit_for_bit_with_h5py(files: dict[str, KerasFile], name: str) -> None:
    layers = by_path(files[name])
    with independent_h5(name) as h5:
        for layer, roles in known_paths(name).items():
            assert set(layers[layer].weights) == set(roles), layer
            for role, dataset in roles.items():
                ref, expected = layers[layer].weights[role], h5[dataset][()]
                got = ref.numpy()
                assert ref.shape == expected.shape and ref.dtype == expected.dtype.name
                assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), (layer, role)


@pytest.fixture(scope="module")
def keras_mod() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    return pytest.importorskip("keras")


def keras_values(keras_mod: Any, name: str) -> dict[str, dict[str, np.ndarray]]:
    model = keras_mod.saving.load_model(KDIR / name, safe_mode=True, compile=False)
    found: dict[str, dict[str, np.ndarray]] = {}

    def walk(container: Any, prefix: str) -> None:
        for layer in container.layers:
            path = f"{prefix}{layer.name}"
            if hasattr(layer, "layers"):
                walk(layer, f"{path}/")
            elif isinstance(layer, keras_mod.layers.BatchNormalization):
                found[path] = {role: keras_mod.ops.convert_to_numpy(getattr(layer, role))
                               for role in ROLES4 if getattr(layer, role, None) is not None}
    walk(model, "")
    return found


@pytest.mark.parametrize("name", READABLE)
def test_weights_equal_what_keras_loads(files: dict[str, KerasFile], keras_mod: Any, name: str) -> None:
    # Keras cannot load weights-only files without the model and must not run the Lambda fixture: those were
    # written from the healthy convnet's weights, so compare with it.
    same_weights = name in ("keras_convnet.weights.h5", "keras_convnet_legacy_weights.h5", "keras_lambda.keras")
    # Keras 3 has no renorm/virtual_batch_size: the renorm file is the tf.keras-2-style file with its config edited.
    reference = "keras_convnet.keras" if same_weights else ("keras_tf2_style.h5" if name == "keras_tf2_renorm.h5" else name)
    expected = keras_values(keras_mod, reference)
    layers = by_path(files[name])
    for path, roles in expected.items():
        for role, value in roles.items():
            got = layers[path].weights[role].numpy()
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), (path, role)
    assert len(expected) == len(files[name].batchnorm_layers)


def test_unreadable_statistic_is_kept_with_its_reason(files: dict[str, KerasFile]) -> None:
    from bnlint.loaders.keras_h5 import UnreadableTensor

    layers = by_path(files[UNREADABLE_FIXTURE])
    variance = layers["bn2"].weights["moving_variance"]
    assert isinstance(variance, UnreadableTensor) and "string dataset" in variance.reason
    assert not any(isinstance(ref, UnreadableTensor) for ref in layers["bn1"].weights.values())


def test_fixture_faults_are_in_the_values(files: dict[str, KerasFile]) -> None:
    nan = by_path(files["keras_nan_var.keras"])
    assert np.isnan(nan["bn1"].weights["moving_variance"].numpy()[0])
    assert nan["bn2"].weights["moving_variance"].numpy()[3] == -0.5
    never = files["keras_never_updated.keras"].batchnorm_layers
    assert all(not la.weights["moving_mean"].numpy().any() and (la.weights["moving_variance"].numpy() == 1).all()
               and (la.weights["gamma"].numpy() != 1).any() for la in never)
    sub = by_path(files["keras_subnormal_var.keras"])["bn2"].weights["moving_variance"].numpy()
    assert 0 < sub[2] < np.finfo(np.float32).tiny and sub[9] == sub[2]
    assert all(la.config["momentum"] == 0.1 for la in files["keras_torch_momentum.keras"].batchnorm_layers)
    assert all(la.config["epsilon"] == 1e-5 for la in files["keras_eps_torch.keras"].batchnorm_layers)
    assert by_path(files["keras_axis1.keras"])["bn1"].config["axis"] == 1
    assert all(t.dtype == "float16" for la in files["keras_half_stats.keras"].batchnorm_layers for t in la.weights.values())
    base = by_path(files["keras_convnet.keras"])
    for fixture, equal in (("keras_nested_backbone_frozen.keras", True), ("keras_frozen_bn_trainable.keras", False)):
        moved = by_path(files[fixture])["backbone/bn1"].weights["moving_mean"].numpy()
        assert np.array_equal(moved, base["bn1"].weights["moving_mean"].numpy()) is equal, fixture


def test_default_read_is_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    import bnlint.loaders.keras_archive as ka

    calls: list[str] = []
    real = ka.preflight
    monkeypatch.setattr(ka, "preflight", lambda path, timeout: (calls.append(path), real(path, timeout))[1])
    with ka.read_keras(KDIR / "keras_convnet.keras") as kf:
        assert [la.path for la in kf.batchnorm_layers] == ["bn1", "bn2"]
    assert calls == [str(KDIR / "keras_convnet.keras")]
    with pytest.raises(NotAKerasModel):  # the child's verdict comes back as the same exception class
        real(str(KDIR / "not_keras.h5"))


def test_close_releases_the_file() -> None:
    with read_keras(KDIR / "keras_convnet.keras") as kf:
        ref = kf.batchnorm_layers[0].weights["moving_variance"]
        assert ref.numpy().shape == (8,)
    with pytest.raises(InputError, match="closed"):
        ref.numpy()


# ----------------------------------------------------------------------------- Keras semantics, built live
def test_legacy_nested_weights_matched_by_name(tmp_path: Path, keras_mod: Any) -> None:
    """Keras's legacy writer lists a nested model's weights trainable-first across its layers, so
    a frozen conv's kernel sits between bn1's gamma/beta and its moving statistics."""
    layers = keras_mod.layers
    backbone = keras_mod.Sequential([layers.Input((8, 8, 3)), layers.Conv2D(4, 3, name="c1"),
                                     layers.BatchNormalization(name="bn1")], name="backbone")
    backbone.get_layer("c1").trainable = False
    inputs = keras_mod.Input((8, 8, 3))
    model = keras_mod.Model(inputs, layers.BatchNormalization(name="head", center=False)(backbone(inputs)))
    bn = backbone.get_layer("bn1")
    bn.moving_variance.assign(np.arange(1, 5, dtype="float32"))
    model.save(tmp_path / "nested.h5")
    with h5py.File(tmp_path / "nested.h5") as f:
        names = [str(n) for n in f["model_weights/backbone"].attrs["weight_names"]]
    assert names.index("backbone/c1/kernel") < names.index("backbone/bn1/moving_mean")
    with read_keras(tmp_path / "nested.h5", isolate=False) as kf:
        layers_by = by_path(kf)
        assert layers_by["backbone/bn1"].weights["moving_variance"].numpy().tolist() == [1, 2, 3, 4]
        assert set(layers_by["backbone/c1"].weights) == {"kernel", "bias"}
        assert list(layers_by["head"].weights) == ["gamma", "moving_mean", "moving_variance"]


def test_keras3_trains_a_trainable_bn_inside_a_frozen_model(tmp_path: Path, keras_mod: Any) -> None:
    """effective_trainable for Keras 3 is the layer's own flag: checked against fit()."""
    layers = keras_mod.layers
    keras_mod.utils.set_random_seed(0)
    inner = keras_mod.Input((8, 8, 3))
    backbone = keras_mod.Model(inner, layers.BatchNormalization(name="bn")(layers.Conv2D(4, 3, name="c")(inner)),
                               name="backbone")
    backbone.trainable = False
    backbone.get_layer("bn").trainable = True
    inputs = keras_mod.Input((8, 8, 3))
    model = keras_mod.Model(inputs, layers.Dense(1)(layers.GlobalAveragePooling2D()(backbone(inputs))))
    model.save(tmp_path / "m.keras")
    with read_keras(tmp_path / "m.keras", isolate=False) as kf:
        assert by_path(kf)["backbone/bn"].effective_trainable is True
        assert by_path(kf)["backbone/c"].effective_trainable is False
        assert any("enclosing model" in note for note in kf.notes)
    loaded = keras_mod.saving.load_model(tmp_path / "m.keras")
    bn = loaded.get_layer("backbone").get_layer("bn")
    before = keras_mod.ops.convert_to_numpy(bn.moving_mean).copy()
    loaded.compile("sgd", "mse")
    loaded.fit(np.random.default_rng(0).normal(3, 2, (16, 8, 8, 3)).astype("float32"), np.zeros((16, 1)), verbose=0)
    assert not np.array_equal(before, keras_mod.ops.convert_to_numpy(bn.moving_mean))


def test_effective_trainable_by_version() -> None:
    assert effective_trainable(True, [False], is_bn=False, version=(3, 15)) is True  # Keras 3: own flag
    assert effective_trainable(True, [True, False], is_bn=False, version=(2, 15)) is False  # tf.keras 2: gated
    assert effective_trainable(True, [False], is_bn=True, version=(2, 15)) is True  # BN mode: own flag
    assert effective_trainable(False, [], is_bn=True, version=(2, 1, 2)) is True  # stats moved anyway
    assert effective_trainable(False, [], is_bn=True, version=(2, 1, 3)) is False
    assert effective_trainable(None, [], is_bn=True, version=(3,)) is None


def test_renorm_wrapper_and_bfloat16(tmp_path: Path, keras_mod: Any) -> None:
    layers = keras_mod.layers
    inputs = keras_mod.Input((4, 6, 3))
    x = layers.TimeDistributed(layers.BatchNormalization(name="tdbn"), name="td")(inputs)
    x = layers.BatchNormalization(renorm=True, name="rn")(x)
    x = layers.BatchNormalization(dtype="bfloat16", name="bf")(x)
    model = keras_mod.Model(inputs, x)
    rn, bf = model.get_layer("rn"), model.get_layer("bf")
    rn.moving_stddev.assign(np.full(3, 2.5, "float32"))
    bf.moving_variance.assign(np.array([0.5, 1.5, 3.0]))
    model.save(tmp_path / "m.keras")
    with read_keras(tmp_path / "m.keras", isolate=False) as kf:
        layers_by = by_path(kf)
        assert layers_by["td/tdbn"].parent == "td" and list(layers_by["td/tdbn"].weights) == ROLES4
        assert list(layers_by["rn"].weights) == ROLES4 + ["moving_stddev", "renorm_mean", "renorm_stddev"]
        assert layers_by["rn"].weights["moving_stddev"].numpy().tolist() == [2.5] * 3
        ref = layers_by["bf"].weights["moving_variance"]
        assert ref.dtype == "bfloat16" and ref.numpy().tolist() == [0.5, 1.5, 3.0]


def test_sublayers_outside_the_config(tmp_path: Path, keras_mod: Any) -> None:
    """A custom layer's own BatchNormalization and a subclassed model's layers exist only in the
    weights file, under attribute-named groups; Keras's auto-generated names identify the class."""
    layers = keras_mod.layers

    @keras_mod.saving.register_keras_serializable(package="bnlint_test")
    class Block(layers.Layer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.conv = layers.Conv2D(4, 3)
            self.bn = layers.BatchNormalization()
            self.named = layers.BatchNormalization(name="custom_name")

        def call(self, x: Any) -> Any:
            return self.named(self.bn(self.conv(x)))

    inputs = keras_mod.Input((8, 8, 3))
    model = keras_mod.Model(inputs, Block(name="block")(inputs))
    block = model.get_layer("block")
    block.bn.moving_variance.assign(np.full(4, 7.0, "float32"))
    model.save(tmp_path / "custom.keras")
    with read_keras(tmp_path / "custom.keras", isolate=False) as kf:
        found = by_path(kf)
        inner = f"block/{block.bn.name}"
        assert found[inner].parent == "block" and found[inner].is_batchnorm
        assert found[inner].weights["moving_variance"].numpy().tolist() == [7.0] * 4
        assert not found["block/custom_name"].is_batchnorm
        assert any("block/custom_name" in note and "not treated as BatchNorm" in note for note in kf.notes)
        assert [la.order for la in kf.layers] == list(range(len(kf.layers)))


def test_keras3_weights_only_without_center(tmp_path: Path, keras_mod: Any) -> None:
    model = keras_mod.saving.load_model(KDIR / "keras_no_center.keras")
    model.save_weights(tmp_path / "w.weights.h5")
    with read_keras(tmp_path / "w.weights.h5", isolate=False) as kf:
        layers_by = by_path(kf)
        assert list(layers_by["bn1"].weights) == ["0", "moving_mean", "moving_variance"]  # gamma or beta: unknowable
        assert list(layers_by["bn_head"].weights) == ["moving_mean", "moving_variance"]
        assert any("may be gamma or beta" in note for note in kf.notes)


def test_npz_weights_are_not_unpickled(tmp_path: Path, keras_mod: Any) -> None:
    from keras.src.saving import saving_lib

    model = keras_mod.saving.load_model(KDIR / "keras_convnet.keras")
    saving_lib.save_model(model, str(tmp_path / "n.keras"), weights_format="npz")
    with read_keras(tmp_path / "n.keras", isolate=False) as kf:
        assert [la.path for la in kf.batchnorm_layers] == ["bn1", "bn2"]
        assert all(not la.weights for la in kf.layers) and any("pickled" in note for note in kf.notes)


# ----------------------------------------------------------------------------- other legacy shapes (h5py-made)
def test_keras1_names_and_conv1_bn_weights_only(tmp_path: Path) -> None:
    stats = {"gamma": [1.0, 2.0], "beta": [0.0, 0.1], "running_mean": [0.5, 0.6], "running_std": [4.0, 5.0]}
    config = {"class_name": "Sequential", "config": [
        {"class_name": "BatchNormalization", "config": {"name": "bn1", "trainable": False, "mode": 0, "epsilon": 1e-3}}]}
    with h5py.File(tmp_path / "k1.h5", "w") as f:
        f.attrs["model_config"] = json.dumps(config).encode()
        weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = [b"bn1"]
        group = weights.create_group("bn1")
        group.attrs["weight_names"] = [f"bn1_{k}".encode() for k in stats]
        for key, value in stats.items():
            group[f"bn1_{key}"] = np.array(value, "float32")
    with read_keras(tmp_path / "k1.h5", isolate=False) as kf:
        bn = kf.layers[0]
        assert kf.keras_version is None and any("Keras 1" in note for note in kf.notes)
        assert bn.weights["moving_variance"].numpy().tolist() == [4.0, 5.0]  # Keras 1.1+ stored the variance here
        assert bn.trainable is False and bn.effective_trainable is True  # Keras 1 updated frozen BN statistics
    with h5py.File(tmp_path / "w.h5", "w") as f:
        f.attrs["layer_names"] = [b"conv1-BN", b"conv1"]
        group = f.create_group("conv1-BN")
        group.attrs["weight_names"] = [f"conv1-BN/{k}:0".encode() for k in ROLES4]
        for i, key in enumerate(ROLES4):
            group[f"conv1-BN/{key}:0"] = np.full(3, i, "float32")
        f.create_group("conv1").attrs["weight_names"] = [b"conv1/kernel:0"]
        f["conv1/conv1/kernel:0"] = np.ones((1, 1, 3, 3), "float32")
    with read_keras(tmp_path / "w.h5", isolate=False) as kf:
        assert kf.kind == "keras-h5-weights" and [la.path for la in kf.batchnorm_layers] == ["conv1-BN"]
        assert kf.batchnorm_layers[0].weights["moving_variance"].numpy().tolist() == [3, 3, 3]
        assert by_path(kf)["conv1"].class_name == "" and list(by_path(kf)["conv1"].weights) == ["kernel"]


def test_recompressed_weights_member(tmp_path: Path) -> None:
    target = tmp_path / "deflated.keras"
    with zipfile.ZipFile(KDIR / "keras_convnet.keras") as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with read_keras(target, isolate=False) as kf, read_keras(KDIR / "keras_convnet.keras", isolate=False) as original:
        assert any("compressed" in note for note in kf.notes)
        for a, b in zip(kf.batchnorm_layers, original.batchnorm_layers):
            assert a.weights["moving_variance"].numpy().tobytes() == b.weights["moving_variance"].numpy().tobytes()


# ----------------------------------------------------------------------------- hostile and wrong inputs
def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _convnet_members() -> dict[str, bytes]:
    with zipfile.ZipFile(KDIR / "keras_convnet.keras") as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _claim_size(path: Path, member: str, size: int) -> Path:
    """Rewrite the central directory so `member` claims `size` uncompressed bytes."""
    data = bytearray(path.read_bytes())
    offset, found = data.find(b"PK\x01\x02"), False
    while offset >= 0:
        name_length = struct.unpack_from("<H", data, offset + 28)[0]
        if data[offset + 46:offset + 46 + name_length] == member.encode():
            struct.pack_into("<I", data, offset + 24, size)
            found = True
        offset = data.find(b"PK\x01\x02", offset + 4)
    assert found
    path.write_bytes(bytes(data))
    return path


def _h5_with_config(path: Path, config: bytes) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = np.bytes_(config)
        f.attrs["keras_version"] = "2.15.0"
    return path


def hostile_cases(tmp: Path) -> dict[str, tuple[Path, type[InputError]]]:
    members = _convnet_members()
    raw = (KDIR / "keras_convnet.keras").read_bytes()
    (tmp / "truncated.keras").write_bytes(raw[: len(raw) // 2])
    (tmp / "empty.keras").write_bytes(b"")
    (tmp / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    cut = dict(members, **{"model.weights.h5": members["model.weights.h5"][:5000]})
    with h5py.File(tmp / "soft.h5", "w") as f:
        f.attrs["layer_names"] = [b"bn"]
        f["real/bn/gamma"] = np.ones(2, "float32")
        f.create_group("bn").attrs["weight_names"] = [b"bn/gamma"]
        f["bn/bn"] = h5py.SoftLink("/real/bn")
    with h5py.File(tmp / "external.h5", "w") as f:
        f.attrs["layer_names"] = [b"bn"]
        f.create_group("bn").attrs["weight_names"] = [b"bn/gamma"]
        f["bn/bn"] = h5py.ExternalLink("/etc/passwd", "/x")
    return {
        "truncated zip": (tmp / "truncated.keras", InputError),
        "empty file": (tmp / "empty.keras", InputError),
        "random bytes": (tmp / "random.bin", NotAKerasModel),
        "config not JSON": (_zip(tmp / "notjson.keras", dict(members, **{"config.json": b"{not json"})), InputError),
        "JSON nested 1e5 deep": (_zip(tmp / "deep.keras", dict(members, **{"config.json": b"[" * 100_000 + b"]" * 100_000}),
                                      zipfile.ZIP_DEFLATED), InputError),
        "config a list": (_zip(tmp / "list.keras", dict(members, **{"config.json": b"[1, 2]"})), InputError),
        "zip bomb config": (_claim_size(_zip(tmp / "bomb.keras", members, zipfile.ZIP_DEFLATED), "config.json", 3 << 30),
                            InputError),
        "zip bomb weights": (_claim_size(_zip(tmp / "bomb2.keras", members, zipfile.ZIP_DEFLATED), "model.weights.h5",
                                         4_000_000_000), InputError),
        "no weights file": (_zip(tmp / "noweights.keras", {k: v for k, v in members.items() if k != "model.weights.h5"}),
                            InputError),
        "truncated weights member": (_zip(tmp / "cut.keras", cut), InputError),
        "zip without config.json": (_zip(tmp / "other.zip", {"data.pkl": b"x"}), NotAKerasModel),
        "garbage model_config": (_h5_with_config(tmp / "garbage.h5", b"\x00\xffgarbage{"), InputError),
        "model_config not a model": (_h5_with_config(tmp / "notmodel.h5", b'{"a": 1}'), InputError),
        "soft link in weights": (tmp / "soft.h5", InputError),
        "external link in weights": (tmp / "external.h5", InputError),
        "truncated h5": (_truncate_copy(KDIR / "keras_convnet.h5", tmp / "cut.h5"), InputError),
    }


def _truncate_copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    dst.write_bytes(dst.read_bytes()[:3000])
    return dst


@pytest.mark.parametrize("isolate", [False, True])
def test_hostile_inputs_raise_input_error_quickly(tmp_path: Path, isolate: bool) -> None:
    for label, (path, error) in hostile_cases(tmp_path).items():
        start = time.perf_counter()
        with pytest.raises(error) as caught:
            read_keras(path, isolate=isolate).close()
        assert time.perf_counter() - start < 3.0, label
        assert "\n" not in str(caught.value) and str(path) in str(caught.value), label
        if error is InputError:
            assert not isinstance(caught.value, NotAModel), label


def _stored_member_offset(path: Path, member: str) -> tuple[int, int]:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    header = path.read_bytes()[info.header_offset:info.header_offset + 30]
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def test_libhdf5_hang_is_contained(tmp_path: Path) -> None:
    """One corrupt length in a global heap collection (where h5py keeps variable-length strings)
    makes libhdf5 2.0 loop forever reading the attribute (found by fuzzing): isolation turns it
    into an InputError after the timeout."""
    path = tmp_path / "hang.keras"
    shutil.copy(KDIR / "keras_convnet.keras", path)
    data = bytearray(path.read_bytes())
    start, size = _stored_member_offset(path, "model.weights.h5")
    heap = data.find(b"GCOL", start, start + size)
    position = heap + 16  # heap objects: index u16, refcount u16, reserved u32, size u64, data padded to 8
    while struct.unpack_from("<H", data, position)[0] != 2:
        position += 16 + -(-struct.unpack_from("<Q", data, position + 8)[0] // 8) * 8
    struct.pack_into("<Q", data, position + 8, 250)
    path.write_bytes(bytes(data))
    begin = time.perf_counter()
    with pytest.raises(InputError, match="did not finish"):
        read_keras(path, timeout=3)
    assert time.perf_counter() - begin < 10


def test_corrupt_string_type_is_refused_in_process(tmp_path: Path) -> None:
    """A flipped bit turns keras_version's string type into a variable-length sequence, which
    libhdf5 2.0 segfaults converting: the type is checked first (child process: a crash must
    not take the test run down)."""
    data = (KDIR / "keras_convnet.h5").read_bytes()
    marker = b"keras_version\x00\x00\x00\x19\x01"
    assert data.count(marker) >= 1
    path = tmp_path / "type.h5"
    path.write_bytes(data.replace(marker, marker[:-1] + b"\x52"))
    code = f"from bnlint.loaders.keras_archive import read_keras; read_keras({str(path)!r}, isolate=False)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 1 and "InputError" in run.stderr and "is not text" in run.stderr, run.stderr[-500:]


def test_not_keras_h5_is_a_distinct_not_a_model() -> None:
    with pytest.raises(NotAKerasModel) as caught:
        read_keras(KDIR / "not_keras.h5")
    assert isinstance(caught.value, NotAModel) and isinstance(caught.value, InputError)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_keras(tmp_path / "absent.keras")
    with pytest.raises(InputError, match="directory"):
        read_keras(tmp_path)


# ----------------------------------------------------------------------------- cost
def test_reading_never_imports_keras_torch_or_tensorflow() -> None:
    code = f"""
import sys
from pathlib import Path
import bnlint.loaders.keras_archive as ka
assert "h5py" not in sys.modules, "h5py imported at module import"
for path in sorted(Path({str(KDIR)!r}).iterdir()):
    if path.suffix in (".keras", ".h5") and path.name != "not_keras.h5":
        with ka.read_keras(path, isolate=False) as kf:
            for layer in kf.layers:
                for ref in layer.weights.values():
                    if not isinstance(ref, ka.kh.UnreadableTensor):
                        ref.numpy()
loaded = [m for m in ("keras", "tensorflow", "torch", "tf_keras") if m in sys.modules]
assert not loaded, loaded
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
