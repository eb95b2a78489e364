"""The measure -> judge contract (issue 14): typed measurements, their JSON form, and their trip
through the sandbox codec; plus framework-specific fix text in every output format (issue 13)."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from bnlint.cli import main
from bnlint.dynamic.metrics import analyse_layer, layer_record, layer_stats
from bnlint.dynamic.stats import Accumulator, NumpyOps, per_sample_moments_numpy
from bnlint.errors import UsageError
from bnlint.findings import FileResult, Finding, Report, Severity
from bnlint.measurements import (
    BatchDependence,
    BatchNoise,
    ChannelMetrics,
    DependentLayer,
    DriftSummary,
    LayerDrift,
    LayerStats,
    Measurements,
)
from bnlint.report import write_report
from bnlint.report.html import render as render_html
from bnlint.rules import all_rules
from bnlint.sandbox import codec
from bnlint.settings import DYNAMIC_DEFAULTS, DynamicThresholds, checked_dynamic, override

ROOT = Path(__file__).resolve().parent.parent
TORCH_WAY = "update_bn"  # PyTorch's own re-estimation: wrong advice for a Keras model


def _layer(channels: int = 6, *, stats: bool = True, weight: bool = True, batch: int | None = 4, nan: bool = False) -> LayerDrift:
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 2.0, (64, channels, 3))
    if nan:
        x[:, :] = np.nan
    acc = Accumulator(NumpyOps(), np.full(channels, 3), np.full(channels, 1e-5), batch_size=batch)
    acc.add(*per_sample_moments_numpy(x))
    mean, var = (np.zeros(channels), np.ones(channels)) if stats else (None, None)
    gamma = np.linspace(0.0, 1.0, channels) if weight else None
    return analyse_layer("block.bn", 0, acc.result(), 1e-5, mean, var, gamma)


# ---------------------------------------------------------------- the typed contract

def test_thresholds_have_one_typed_field_per_config_key_with_its_default() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(DynamicThresholds)}
    assert fields == DYNAMIC_DEFAULTS
    checked = checked_dynamic({"drift-kl": 1, "batch_size": 8}, "pyproject.toml")
    assert isinstance(checked, DynamicThresholds)
    assert checked.drift_kl == 1.0 and isinstance(checked.drift_kl, float) and checked.batch_size == 8
    assert not hasattr(checked, "__getitem__") and not hasattr(checked, "get")  # attributes only: no string keys
    with pytest.raises(UsageError, match="dynamic drift-kl: expected a number >= 0"):
        checked_dynamic({"drift_kl": -1}, None)
    with pytest.raises(UsageError, match="unknown"):
        checked_dynamic({"drift_kl2": 1}, None)
    # a command-line value gives a new object (frozen), checked like the config's
    assert override(checked, "batch_size", 2).batch_size == 2 and checked.batch_size == 8
    assert override(checked, "batch_size", None) is checked
    with pytest.raises(UsageError, match="--batch-size"):
        override(checked, "batch_size", 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.drift_kl = 0.0  # type: ignore[misc]


def test_analyse_layer_fills_the_typed_classes() -> None:
    layer = _layer()
    assert isinstance(layer.per_channel, ChannelMetrics) and isinstance(layer.summary, DriftSummary)
    assert isinstance(layer.batch_noise, BatchNoise) and layer.batch_noise.method == "pseudo-batches"
    assert layer.per_channel.kl.shape == (6,) and [name for name, _ in layer.per_channel.items()] == ["smd", "lvr", "kl", "w2", "se_smd", "se_lvr"]
    s = layer.summary
    assert s.groups == 8 and s.compared and s.weighted and isinstance(s.max_channel, int)
    assert s.mean_kl is not None and s.noise_kl is not None and s.kl_se is not None and s.gamma_weighted_kl is not None
    bare = _layer(stats=False, batch=None)
    assert bare.per_channel is None and bare.batch_noise is None and not bare.summary.compared and bare.summary.mean_kl is None


# Today's JSON keys per case (bnlint/schemas): a typed record must write exactly these.
BASE = ["layer", "order", "channels", "samples", "values_per_sample", "values_per_channel", "effective_n", "has_running_stats",
        "calls_per_forward", "groups"]
FINITE = ["mean_abs_smd", "max_abs_smd", "mean_abs_lvr", "max_abs_lvr", "mean_kl", "max_kl", "mean_w2", "max_channel", "nonfinite_channels"]
TAIL = ["noise_kl", "kl_se", "fraction_over_threshold", "significance", "channel"]
METRICS = ["mean", "var", "var_unbiased", "smd", "lvr", "kl", "w2", "se_smd", "se_lvr"]


@pytest.mark.parametrize("case, keys, channel", [
    ({}, BASE + FINITE + ["gamma_weighted_kl"] + TAIL + ["batch_noise"], METRICS),
    ({"weight": False, "batch": None}, BASE + FINITE + TAIL, METRICS),
    ({"nan": True, "batch": None}, BASE + ["mean_kl", "max_kl", "nonfinite_channels"] + TAIL, METRICS),
    ({"stats": False, "batch": None}, BASE + ["channel"], METRICS[:3]),
])
def test_layer_stats_record_is_the_json_layer_stats_entry(case: dict[str, Any], keys: list[str], channel: list[str]) -> None:
    layer = _layer(**case)
    stats = layer_stats(layer, DynamicThresholds())
    assert isinstance(stats, LayerStats)
    record = stats.record()
    assert list(record) == keys and list(record["channel"]) == channel
    assert record == layer_record(layer, DynamicThresholds())
    json.dumps(record, allow_nan=False)  # non-finite numbers are None, never NaN
    assert isinstance(record["groups"], float)  # counts were always written as floats
    if "batch_noise" in record:
        assert list(record["batch_noise"]) == ["batch_size", "values_per_batch", "pseudo_batches", "method", "rms_smd", "rms_lvr",
                                               "mean_rms_smd", "mean_rms_lvr"]
        assert len(record["batch_noise"]["rms_smd"]) == layer.channels


def test_reporters_read_only_keys_the_record_writes() -> None:
    from bnlint.report import html, text
    from bnlint.report._common import CHANNEL_KEYS, LAYER_STAT_KEYS

    record = layer_record(_layer(), DynamicThresholds())
    read = set(LAYER_STAT_KEYS) | {key for key, _, _ in text._COLUMNS} | {key for key, _, _ in html._LAYER_COLUMNS}
    assert read <= set(record)
    assert set(CHANNEL_KEYS) <= set(record["channel"])


def test_the_summary_is_what_fix_reports_as_before() -> None:
    summary = _layer().summary.record()
    assert summary["groups"] == 8.0 and "effective_n" in summary and "gamma_weighted_kl" in summary
    assert _layer(stats=False).summary.record() == {"groups": 8.0, "effective_n": summary["effective_n"]}


# ---------------------------------------------------------------- across the sandbox

def _measured() -> Measurements:
    layer = _layer()
    layer.calls_per_forward = 2
    dependence = BatchDependence(4, 0.5, 0.25, [DependentLayer("block.bn", None, None, "its stored form computes mean and variance from the batch"),
                                                DependentLayer("block.bn", 0.5, 0.25, "its input is the same in both batches, its output is not")])
    thresholds = DynamicThresholds(drift_kl=0.01, timeout=30.0)
    return Measurements([layer, _layer(stats=False, batch=None)], 64, thresholds, "numpy", 4, "--train-batch-size", dependence, [],
                        layer_stats=[layer_record(layer, thresholds)])


def test_codec_round_trips_every_nested_class(tmp_path: Path) -> None:
    measured = _measured()
    codec.encode(measured, tmp_path)
    back = codec.decode(tmp_path)
    assert isinstance(back, Measurements) and back.settings == measured.settings
    assert back.dependence is not None and back.dependence == measured.dependence
    assert isinstance(back.dependence.layers[0], DependentLayer)
    layer, old = back.layers[0], measured.layers[0]
    assert isinstance(layer.per_channel, ChannelMetrics) and isinstance(layer.batch_noise, BatchNoise)
    assert layer.summary == old.summary
    assert old.per_channel is not None and old.batch_noise is not None
    for (name, mine), (_, theirs) in zip(layer.per_channel.items(), old.per_channel.items()):
        np.testing.assert_array_equal(mine, theirs, err_msg=name)
    np.testing.assert_array_equal(layer.batch_noise.rms_smd, old.batch_noise.rms_smd)
    assert back.layer_stats == measured.records()  # every layer, rebuilt from the checked layers


def test_the_parent_rebuilds_layer_stats_rather_than_trusting_the_child(tmp_path: Path) -> None:
    measured = dataclasses.replace(_measured(), layer_stats=[{"layer": "<script>", "mean_kl": "forged"}])
    codec.encode(measured, tmp_path)
    back = codec.decode(tmp_path)
    assert back.layer_stats == measured.records() and "<script>" not in json.dumps(back.layer_stats)


def _forge(tmp_path: Path, change: Any) -> None:
    codec.encode(_measured(), tmp_path)
    raw = json.loads((tmp_path / "result.json").read_text())
    change(raw)
    (tmp_path / "result.json").write_text(json.dumps(raw))


def _put(path: list[Any], value: Any) -> Any:
    def change(raw: Any) -> None:
        for key in path[:-1]:
            raw = raw[key]
        raw[path[-1]] = value
    return change


FORGED = {
    "channel metrics as a plain list": _put(["layers", 0, "per_channel", "kl"], [0.1] * 6),
    "a summary count as text": _put(["layers", 0, "summary", "groups"], "8"),
    "a summary count as a boolean": _put(["layers", 0, "summary", "nonfinite_channels"], True),
    "a summary where channel metrics go": _put(["layers", 0, "per_channel"], {"__kind__": "DriftSummary", "groups": 8}),
    "a plain dict where a summary goes": _put(["layers", 0, "summary"], {"groups": 8}),
    "an unknown field of a nested class": _put(["layers", 0, "batch_noise", "shell"], "rm -rf"),
    "a missing field of a nested class": _put(["layers", 0, "batch_noise"], {"__kind__": "BatchNoise", "batch_size": 4}),
    "a dependent layer as a plain dict": _put(["dependence", "layers", 0], {"layer": "x", "max_abs_diff": None,
                                                                             "relative_diff": None, "evidence": "e"}),
    "a dependent layer's name as a number": _put(["dependence", "layers", 0, "layer"], 7),
    "a threshold as text": _put(["settings", "drift_kl"], "0.05"),
    "settings as a plain dict": _put(["settings"], {"drift_kl": 0.05}),
    "an unknown kind inside": _put(["layers", 0, "summary"], {"__kind__": "LayerStats", "layer": "x"}),
    "metrics of the wrong length": lambda raw: raw["layers"][0]["per_channel"].update(kl=raw["layers"][1]["mean_t"]),
}


@pytest.mark.parametrize("name", list(FORGED))
def test_codec_rejects_forged_nested_values(tmp_path: Path, name: str) -> None:
    if name == "metrics of the wrong length":  # an array of another layer, with 3 channels instead of 6
        codec.encode(dataclasses.replace(_measured(), layers=[_layer(), _layer(3, batch=None)]), tmp_path)
        raw = json.loads((tmp_path / "result.json").read_text())
        FORGED[name](raw)
        (tmp_path / "result.json").write_text(json.dumps(raw))
    else:
        _forge(tmp_path, FORGED[name])
    with pytest.raises(codec.ResultError):
        codec.decode(tmp_path)


def test_codec_rejects_a_two_dimensional_array_in_a_layer(tmp_path: Path) -> None:
    layer = _layer()
    layer.mean_t = np.zeros((6, 1))
    codec.encode(dataclasses.replace(_measured(), layers=[layer], layer_stats=[]), tmp_path)
    with pytest.raises(codec.ResultError, match="wrong shape"):
        codec.decode(tmp_path)


# ---------------------------------------------------------------- framework-specific fix text (issue 13)

def _render(report: Report, fmt: str) -> str:
    if fmt == "html":
        return render_html(report, all_rules(), tool_version="0")
    out = io.StringIO()
    write_report(report, all_rules(), fmt, out, tool_version="0")
    return out.getvalue()


def _keras_report() -> Report:
    finding = Finding("BN601", Severity.WARNING, "model.keras", "bn", "drift", {"mean_kl": 1.0})
    return Report([FileResult("model.keras", format="keras-v3", layer_count=1, findings=[finding], framework="keras")])


@pytest.mark.parametrize("fmt", ["text", "json", "sarif", "html", "github", "junit"])
def test_every_format_gives_a_keras_finding_the_keras_fix(fmt: str) -> None:
    text = _render(_keras_report(), fmt)
    if fmt == "sarif":  # other rules' descriptors document every framework; BN601's and the result's must not
        run = json.loads(text)["runs"][0]
        text = json.dumps([r for r in run["tool"]["driver"]["rules"] if r["id"] == "BN601"] + run["results"])
    assert TORCH_WAY not in text
    if fmt in ("text", "sarif", "html", "json"):
        assert "in Keras 3" in text


def test_a_torch_finding_keeps_the_pytorch_fix_in_sarif_and_html() -> None:
    report = _keras_report()
    report.files[0].framework = "torch"
    for fmt in ("sarif", "html"):
        assert TORCH_WAY in _render(report, fmt)


def test_keras_bn601_through_the_cli_never_recommends_update_bn(tmp_path: Path) -> None:
    if importlib.util.find_spec("keras") is None:  # importing it would pick a backend; the runner picks its own
        pytest.skip("keras is not installed")
    html = tmp_path / "report.html"
    args = ["--format", "sarif", str(ROOT / "fixtures/keras/keras_convnet.keras"), "--data", str(ROOT / "fixtures/data/keras_shifted.npz"),
            "--report", str(html)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    run = json.loads(result.output[result.output.index("{"):])["runs"][0]
    bn601 = [r for r in run["results"] if r["ruleId"] == "BN601"]
    assert bn601, result.output
    described = [r for r in run["tool"]["driver"]["rules"] if r["id"] == "BN601"]
    assert all(TORCH_WAY not in json.dumps(r) for r in bn601 + described)
    assert all("in Keras 3" in r["properties"]["fix"] for r in bn601) and "in Keras 3" in described[0]["help"]["text"]
    page = html.read_text(encoding="utf-8")
    assert "BN601" in page and "in Keras 3" in page and TORCH_WAY not in page
