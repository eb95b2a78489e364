"""What a Keras config records about `base(x, training=...)` (issue 13), and BN408 on it.

The call arguments live in a Functional config's inbound nodes: Keras 3 `.keras` writes
`{"args": [...], "kwargs": {"training": false, "mask": null}}`, tf.keras 2 `.h5` writes
`[[["input", 0, 0, {"training": false}]]]` (both checked by saving `base(x, training=False)` with
Keras 3.15.1 and with tf_keras 2.21). What that value does in fit() is in
tests/test_keras_training_semantics.py: Keras 3 passes fit()'s training=True over it on every
backend; tf.keras 2 honours it.

Fixtures: fixtures/keras/call_args/ (`python fixtures/make_keras_fixtures.py --call-args`), with
their own manifest: `expect` is BN408's verdict per layer, `call_training` what the config records.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.config import Config
from bnlint.context import RuleContext
from bnlint.engine import run_rules
from bnlint.errors import InputError
from bnlint.loaders import keras_config as kc
from bnlint.loaders.keras_file import load_keras
from bnlint.model import BNLayer

h5py = pytest.importorskip("h5py")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CDIR = Path(__file__).resolve().parent.parent / "fixtures" / "keras" / "call_args"
MANIFEST: dict[str, Any] = json.loads((CDIR / "manifest.json").read_text())

def v3_node(source: str, kwargs: Any) -> dict[str, Any]:
    return {"args": [{"class_name": "__keras_tensor__", "config": {"shape": [None, 4], "keras_history": [source, 0, 0]}}],
            "kwargs": kwargs}


def legacy_node(source: str, kwargs: Any) -> list[Any]:
    return [[source, 0, 0, kwargs]]


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("make", [v3_node, legacy_node], ids=["keras3", "tf.keras2"])
def test_call_training_reads_both_node_formats(make: Any) -> None:
    assert kc.call_training([make("x", {"training": False})]) is False
    assert kc.call_training([make("x", {"training": True, "mask": None})]) is True
    assert kc.call_training([make("x", {})]) is None  # called with no training argument
    assert kc.call_training([make("x", {"training": None})]) is None
    # A shared layer called twice: only a value every call passes is proven.
    assert kc.call_training([make("x", {"training": False}), make("y", {"training": False})]) is False
    assert kc.call_training([make("x", {"training": False}), make("y", {"training": True})]) is None
    assert kc.call_training([make("x", {"training": False}), make("y", {})]) is None


@pytest.mark.parametrize("hostile", [
    "yes", 0, 1, [False], [[[[False]]]], {"training": False}, None,
])
@pytest.mark.parametrize("make", [v3_node, legacy_node], ids=["keras3", "tf.keras2"])
def test_call_training_hostile_values_prove_nothing(make: Any, hostile: Any) -> None:
    assert kc.call_training([make("x", {"training": hostile})]) is None


@pytest.mark.parametrize("nodes", [
    None, "training", 7, {"training": False}, [None], ["x"], [[]], [[[]]], [["x", 0, 0, {"training": False}]],
    [{"kwargs": ["training", False]}], [{"kwargs": "training=False"}], [[["x", 0, 0, ["training", False]]]],
])
def test_call_training_malformed_nodes_prove_nothing(nodes: Any) -> None:
    assert kc.call_training(nodes) is None


def test_call_training_reads_a_bounded_number_of_calls() -> None:
    many = [v3_node("x", {"training": False})] * (kc.MAX_CALLS * 50)
    assert kc.call_training(many) is False
    # What lies past the bound is not read (and so cannot make the answer disagree).
    assert kc.call_training(many[:kc.MAX_CALLS] + [v3_node("x", {"training": True})]) is False


def _bn(name: str, inbound: Any = None) -> dict[str, Any]:
    return {"class_name": "BatchNormalization", "config": {"name": name, "trainable": True},
            "inbound_nodes": inbound if inbound is not None else []}


def _functional(name: str, layers: list[Any], inbound: Any = None) -> dict[str, Any]:
    return {"class_name": "Functional", "config": {"name": name, "trainable": True, "layers": layers},
            "inbound_nodes": inbound if inbound is not None else []}


def test_walk_inherits_the_enclosing_call_and_an_own_value_wins() -> None:
    base = _functional("base", [_bn("bn1"), _bn("bn2", [v3_node("bn1", {"training": True})]),
                                _functional("block", [_bn("bn3")])],
                       [v3_node("input", {"training": False, "mask": None})])
    wrapped = {"class_name": "TimeDistributed", "config": {"name": "td", "layer": _bn("bn4")},
               "inbound_nodes": [legacy_node("input", {"training": False})]}
    walk = kc.walk_config(_functional("model", [base, _bn("top"), wrapped]), "m.keras")
    got = {layer.path: layer.call_training for layer in walk.layers}
    assert got == {"base": False, "base/bn1": False, "base/bn2": True, "base/block": False, "base/block/bn3": False,
                   "top": None, "td": False, "td/bn4": False}


def test_walk_with_hostile_call_arguments_does_not_crash() -> None:
    deep: Any = False
    for _ in range(200):
        deep = [deep]
    base = _functional("base", [_bn("bn1")], [{"args": "x", "kwargs": {"training": deep}}, 5, "x", None])
    walk = kc.walk_config(_functional("model", [base]), "m.keras")
    assert [layer.call_training for layer in walk.layers] == [None, None]


def test_walk_depth_limit_still_holds() -> None:
    model = _bn("bn")
    for depth in range(kc.MAX_MODEL_DEPTH + 2):
        model = _functional(f"m{depth}", [model], [v3_node("x", {"training": False})])
    with pytest.raises(InputError, match="nested more than"):
        kc.walk_config(model, "m.keras")


def test_json_nested_too_deeply_is_one_input_error() -> None:
    text = '{"class_name": "Functional", "config": {"layers": [{"inbound_nodes": ' + "[" * 100_000 + "]" * 100_000 + "}]}}"
    with pytest.raises(InputError):
        kc.parse_json(text, "m.keras", "config.json", 10_000_000)


# ----------------------------------------------------------------------------- fixtures
def config_of(name: str) -> Any:
    path = CDIR / name
    if name.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    with h5py.File(path, "r") as f:
        raw = f.attrs["model_config"]
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


FIXTURES = sorted(name for name in MANIFEST)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_configs_record_the_call(name: str) -> None:
    walk = kc.walk_config(config_of(name), name)
    got = {layer.path: layer.call_training for layer in walk.layers if layer.class_name == "BatchNormalization"}
    assert got == MANIFEST[name]["call_training"]


def bn408(name: str) -> dict[str, dict[str, Any]]:
    result = CliRunner().invoke(main, [str(CDIR / name), "--format", "json"])
    assert result.exit_code in (0, 1), result.output
    findings = json.loads(result.output)["files"][0]["findings"]
    return {f["layer"]: f for f in findings if f["code"] == "BN408"}


@pytest.mark.parametrize("name", [n for n in FIXTURES if n.endswith(".keras")])
def test_cli_verdicts_on_keras3_fixtures(name: str) -> None:
    found = bn408(name)
    assert {layer: f["severity"] for layer, f in found.items()} == MANIFEST[name]["expect"]
    for finding in found.values():  # never a claim that the call argument protects the statistics
        assert "moves its moving mean/variance" in finding["message"]


def test_cli_partial_unfreeze_names_the_frozen_layer() -> None:
    """The new case: bn2 follows a trainable dense2, so only the frozen part of 'base' shows the fine-tuning."""
    found = bn408("keras_call_partial_unfreeze.keras")
    assert found["base/bn2"]["values"]["frozen_in_base"] == "base/dense1"


def with_call_training(name: str) -> list[Any]:
    """BN408 on the fixture as it will run once the loader copies call_training (set here from the walk)."""
    model = load_keras(CDIR / name)
    recorded = MANIFEST[name]["call_training"]
    for layer in model.layers:
        layer.call_training = recorded[layer.name]
    return [f for f in run_rules(RuleContext(model=model, config=Config())) if f.code == "BN408"]


def test_keras3_training_false_is_called_no_protection() -> None:
    found = with_call_training("keras_call_training_false_unfrozen.keras")
    assert {f.layer: f.severity.name.lower() for f in found} == {"base/bn1": "error", "base/bn2": "warning"}
    for finding in found:
        assert "training=False its call records does not protect them" in finding.message
        assert "on every backend" in finding.message and finding.values["call_training"] is False


def test_tf_keras2_training_false_is_honoured_there_only() -> None:
    found = with_call_training("keras_call_training_false_tf2.h5")
    assert {f.layer: f.severity.name.lower() for f in found} == MANIFEST["keras_call_training_false_tf2.h5"]["expect"]
    for finding in found:
        assert "tf.keras 2, which wrote this file, honours the training=False" in finding.message
        assert "loaded into Keras 3 and fit" in finding.message


def test_no_recorded_argument_makes_no_claim_about_it() -> None:
    found = with_call_training("keras_call_partial_unfreeze.keras")
    assert [f.layer for f in found] == ["base/bn2"] and "training=" not in found[0].message


def test_cli_reports_the_recorded_training_false() -> None:
    found = bn408("keras_call_training_false_unfrozen.keras")
    assert all(f["values"]["call_training"] is False for f in found.values()) and found


def test_cli_tf_keras2_file_is_a_warning() -> None:
    found = bn408("keras_call_training_false_tf2.h5")
    assert {layer: f["severity"] for layer, f in found.items()} == MANIFEST["keras_call_training_false_tf2.h5"]["expect"]


def test_bnlayer_default_is_not_recorded() -> None:
    assert BNLayer(name="bn", kind="BatchNorm2d", framework="torch").call_training is None
