"""Unit tests of the torch-side static rules on synthetic layers: each fires on its fault only."""

from __future__ import annotations

import numpy as np
import pytest

from bnlint.config import Config
from bnlint.model import ArrayTensor, ModelInfo
from tests.helpers import codes, findings, make_layer


def test_healthy_layer_has_no_findings() -> None:
    assert codes([make_layer()]) == []


def test_nonfinite_stats_counts_nan_and_inf() -> None:
    var = np.ones(8, np.float32)
    var[3] = np.nan
    mean = np.zeros(8, np.float32) + 0.1
    mean[5] = np.inf
    (finding,) = [f for f in findings([make_layer(running_var=var, running_mean=mean)]) if f.code == "BN101"]
    assert finding.values["tensors"]["running_var"] == {"nan": 1, "inf": 0, "channels": [3]}
    assert finding.values["tensors"]["running_mean"]["inf"] == 1
    assert "channels 3" in finding.message


def test_negative_variance() -> None:
    var = np.ones(8, np.float32)
    var[[1, 2]] = -0.5
    assert "BN102" in codes([make_layer(running_var=var)])


def test_near_zero_variance_uses_eps() -> None:
    var = np.ones(8, np.float32)
    var[0] = 0.0
    assert "BN103" not in codes([make_layer(running_var=var)])  # default eps 1e-5 keeps it finite
    assert "BN103" in codes([make_layer(running_var=var, known={"eps": 0.0})])
    assert "BN202" in codes([make_layer(running_var=var, known={"eps": 0.0})])


def test_never_updated_needs_exact_init_values_and_trained_weights() -> None:
    init = {"running_mean": np.zeros(8, np.float32), "running_var": np.ones(8, np.float32)}
    result = findings([make_layer(**init, known={"num_batches_tracked": 0})])
    assert [f.code for f in result] == ["BN104"] and result[0].severity.label == "error"
    untrained = findings([make_layer(weight=np.ones(8), bias=np.zeros(8), **init)])
    assert [(f.code, f.severity.label) for f in untrained] == [("BN104", "warning")]
    # Genuine statistics with a zero counter (converted checkpoints) are fine.
    assert codes([make_layer(known={"num_batches_tracked": 0})]) == []


def test_few_updates_reports_initial_weight() -> None:
    (finding,) = findings([make_layer(known={"num_batches_tracked": 3})])
    assert finding.code == "BN105"
    assert finding.values["initial_weight"] == pytest.approx(0.9**3)
    cumulative = findings([make_layer(known={"num_batches_tracked": 3, "momentum": None})])
    assert {f.code for f in cumulative} == {"BN105", "BN303"}


def test_variance_outlier_and_fp16_overflow() -> None:
    var = np.ones(8, np.float32)
    var[4] = 2e6
    assert codes([make_layer(running_var=var)]) == ["BN106", "BN107"]
    var = np.full(8, 1e5, np.float32)
    assert codes([make_layer(running_var=var)]) == ["BN107"]


def test_dead_channels_are_not_variance_outliers() -> None:
    weight = np.ones(8, np.float32)
    weight[:3] = 0
    var = np.ones(8, np.float32)
    var[:3] = 1e-12
    assert codes([make_layer(weight=weight, running_var=var)]) == ["BN108"]


def test_scale_overflow() -> None:
    weight = np.ones(8, np.float32)
    weight[2] = 50
    var = np.ones(8, np.float32)
    var[2] = 1e-9
    result = codes([make_layer(weight=weight, running_var=var, known={"eps": 1e-12})])
    assert "BN109" in result


def test_half_precision_buffers() -> None:
    layer = make_layer()
    layer.tensors["running_var"] = ArrayTensor(np.ones(8, np.float16))
    assert codes([layer]) == ["BN201"]


def test_tracking_flags() -> None:
    no_stats = make_layer(running_mean=None, running_var=None, known={"track_running_stats": False})
    assert codes([no_stats]) == ["BN301"]
    toggled = make_layer(known={"track_running_stats": False})
    assert codes([toggled]) == ["BN302"]


def test_momentum_conventions() -> None:
    assert codes([make_layer(known={"momentum": 0.99})]) == ["BN304"]
    (zero,) = findings([make_layer(known={"momentum": 0.0})])
    assert (zero.code, zero.severity.label) == ("BN304", "info")
    assert codes([make_layer(known={"momentum": 0.1})]) == []


def test_eps_nondefault_and_mixed() -> None:
    same = [make_layer(f"bn{i}", known={"eps": 1e-3}) for i in range(3)]
    assert codes(same) == ["BN305"]
    mixed = [make_layer("a", known={"eps": 1e-5}), make_layer("b", known={"eps": 1e-5}), make_layer("c", known={"eps": 1e-3})]
    result = findings(mixed)
    assert [(f.code, f.layer) for f in result] == [("BN306", "c")]


def test_mode_rules() -> None:
    train = [make_layer(f"bn{i}", known={"training": True}) for i in range(2)]
    assert codes(train) == ["BN401"]
    mixed = [make_layer("a", known={"training": False}), make_layer("b", known={"training": True})]
    assert codes(mixed) == ["BN402"]
    frozen = make_layer("bn", known={"training": True})
    frozen.requires_grad = {"weight": False, "bias": False}
    assert codes([frozen]) == ["BN401", "BN403"]
    trainable = make_layer("bn", known={"training": True})
    trainable.requires_grad = {"weight": True, "bias": True}
    assert codes([trainable]) == ["BN401"]


def test_stats_moved_while_frozen_against_reference() -> None:
    base = make_layer("module.bn")
    moved = make_layer("bn", running_mean=base.array("running_mean") + 0.5)
    reference = ModelInfo(path="base.pt", format="torch-state-dict", layers=[base])
    assert codes([moved], reference=reference) == ["BN407"]
    retrained = make_layer("bn", weight=base.array("weight") * 1.1, running_mean=base.array("running_mean") + 0.5)
    assert codes([retrained], reference=reference) == []


def test_model_level_rules() -> None:
    assert codes([], unsafe_globals=["posix.system"]) == ["BN001", "BN002"]
    assert codes([], folded_bn=True) == ["BN501"]  # folded BN is BN501's note, not "no BatchNorm" (BN002)
    assert codes([make_layer()], averaged_buffers=["n_averaged"]) == ["BN203"]
    assert codes([make_layer()], key_prefix="module.") == ["BN204"]


def test_select_ignore_and_per_layer_ignores() -> None:
    var = np.ones(8, np.float32)
    var[3] = np.nan
    layer = make_layer("backbone.bn", running_var=var)
    assert codes([layer], Config(ignore=("BN1",))) == []
    assert codes([layer], Config(select=("BN101",))) == ["BN101"]
    assert codes([layer], Config(per_layer_ignores={"backbone.*": ("BN101",)})) == []
    assert codes([layer], Config(per_layer_ignores={"head.*": ("BN101",)})) == ["BN101"]
