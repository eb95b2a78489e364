"""Caffe models through the loader and the real CLI: pairing, statistics, modes, the node list.

Statistics are checked against the protobuf library decoding the same committed files (the
reference classes of tests/test_caffe_proto.py share no code with bnlint's reader), divided in
float64 here: blob / scale factor, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.loaders import load_model
from tests.test_caffe_proto import REF, ref_blob_values

ROOT = Path(__file__).resolve().parent.parent
CAFFE = ROOT / "fixtures" / "caffe"


def lint_json(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["--format", "json", *args], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _reference_layers(path: Path) -> dict[str, list[np.ndarray]]:
    net = REF[True]["NetParameter"]()
    net.ParseFromString(path.read_bytes())
    return {layer.name: [ref_blob_values(b) for b in layer.blobs] for layer in net.layer}


@pytest.mark.parametrize("name", ["caffe_convnet.caffemodel", "caffe_convnet_double.caffemodel", "caffe_subnormal_var.caffemodel"])
def test_statistics_are_blob_over_factor_bit_for_bit(name: str) -> None:
    model = load_model(CAFFE / name)
    reference = _reference_layers(CAFFE / name)
    assert [layer.name for layer in model.layers] == ["bn1", "bn2", "bn3"]
    for layer in model.layers:
        mean_sum, var_sum, factor = (np.asarray(b, np.float64).reshape(-1) for b in reference[layer.name])
        assert layer.tensors["running_mean"].numpy().tobytes() == (mean_sum / factor[0]).tobytes()
        assert layer.tensors["running_var"].numpy().tobytes() == (var_sum / factor[0]).tobytes()
        gamma, beta = reference[layer.name.replace("bn", "scale")]
        assert layer.tensors["weight"].numpy().tobytes() == np.asarray(gamma).reshape(-1).tobytes()
        assert layer.tensors["bias"].numpy().tobytes() == np.asarray(beta).reshape(-1).tobytes()
        assert layer.framework == "caffe" and layer.eps == pytest.approx(1e-5) and layer.raw_momentum == pytest.approx(0.999)
        assert layer.training is False and layer.channels == mean_sum.size


def test_statistics_match_the_torch_weights_they_came_from() -> None:
    torch = pytest.importorskip("torch")
    state = torch.load(ROOT / "fixtures" / "convnet_state_dict.pt", weights_only=True)
    layer = load_model(CAFFE / "caffe_convnet_double.caffemodel").layers[1]  # double_data, factor 1.0: exact
    assert np.array_equal(layer.array("running_var"), state["bn2.running_var"].double().numpy())
    assert np.array_equal(layer.array("weight"), state["bn2.weight"].double().numpy())


def test_subnormal_variances_are_read_not_flushed() -> None:
    var = load_model(CAFFE / "caffe_subnormal_var.caffemodel").layers[2].array("running_var")
    assert var is not None and var[4] == var[9] == np.float64(np.float32(1e-40)) and var[4] > 0


def test_zero_scale_factor_is_never_updated() -> None:
    layer = load_model(CAFFE / "caffe_never_updated.caffemodel").layers[0]
    assert layer.stats_updated is False and not np.any(layer.array("running_var"))


@pytest.mark.parametrize("order", ["model-first", "prototxt-first"])
def test_pair_in_either_order_gives_one_result(order: str) -> None:
    files = ["fixtures/caffe/caffe_train_shipped.caffemodel", "fixtures/caffe/caffe_train_shipped.prototxt"]
    code, payload = lint_json(*(files if order == "model-first" else files[::-1]))
    (file,) = payload["files"]
    assert file["path"].endswith(".caffemodel") and file["format"] == "caffe" and file["layers"] == 3
    # the deploy prototxt governs (Caffe copies only blobs from the caffemodel): BN409 is info, once
    assert sorted({f["code"] for f in file["findings"]}) == ["BN409", "BN505"] and code == 0
    assert [f["severity"] for f in file["findings"] if f["code"] == "BN409"] == ["info"]


def test_folder_pairs_files_by_stem() -> None:
    code, payload = lint_json("fixtures/caffe")
    paths = sorted(f["path"] for f in payload["files"])
    assert "fixtures/caffe/caffe_convnet.prototxt" not in paths  # linted with its caffemodel
    assert "fixtures/caffe/caffe_bn_fork.prototxt" in paths  # no caffemodel of its own
    deploy = next(f for f in payload["files"] if f["path"].endswith("caffe_deploy_batch_stats.caffemodel"))
    assert "BN404" in {f["code"] for f in deploy["findings"]}


def test_caffemodel_alone_uses_its_own_definition() -> None:
    code, payload = lint_json("fixtures/caffe/caffe_train_shipped.caffemodel")
    (file,) = payload["files"]
    assert {f["code"] for f in file["findings"]} >= {"BN404"}  # deployed without a prototxt: batch statistics
    assert any("TRAIN phase" in note for note in file["notes"])


def test_prototxt_alone_lints_structure_and_says_where_the_statistics_are() -> None:
    code, payload = lint_json("fixtures/caffe/caffe_deploy_batch_stats.prototxt")
    (file,) = payload["files"]
    assert file["layers"] == 3 and {"BN404", "BN504"} <= {f["code"] for f in file["findings"]}
    assert any("statistics are in the .caffemodel" in note for note in file["notes"])


def test_in_place_blob_names_give_exact_producers_and_nodes() -> None:
    model = load_model(CAFFE / "caffe_convnet.caffemodel", CAFFE / "caffe_convnet.prototxt")
    producer = model.layers[0].producer
    assert producer is not None and (producer.op, producer.kind, producer.has_bias, producer.exclusive) == ("Convolution", "conv", False, True)
    nodes = model.nodes
    conv = next(n for n in nodes if n.name == "conv2")
    assert conv.followed_by_bn and conv.weight is not None and conv.weight.shape == (16, 8, 3, 3)
    names = [out for n in nodes for out in n.outputs]
    assert len(names) == len(set(names))  # in-place layers get renamed outputs


def test_fork_and_v1_are_recognised_with_a_note() -> None:
    fork = load_model(CAFFE / "caffe_bn_fork.prototxt")
    assert fork.layers == [] and any("'BN' layer" in note for note in fork.notes)
    v1 = load_model(CAFFE / "caffe_v1.caffemodel")
    assert v1.layers == [] and any("V1" in note for note in v1.notes)


def test_broken_caffe_files_are_one_line_exit_2(tmp_path: Path) -> None:
    truncated = tmp_path / "cut.caffemodel"
    truncated.write_bytes((CAFFE / "caffe_convnet.caffemodel").read_bytes()[:1000])
    garbage = tmp_path / "garbage.prototxt"
    garbage.write_text("layer { name: 'x' type: 'BatchNorm' \n")
    for path in (truncated, garbage):
        result = CliRunner().invoke(main, [str(path)], catch_exceptions=False)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert len([line for line in result.output.splitlines() if ": error:" in line]) == 1
