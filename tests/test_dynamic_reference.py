"""Dynamic statistics against independent references, on the committed convnet fixture.

- a direct float64 numpy computation of the first BN layer's input over all the data;
- torch.optim.swa_utils.update_bn (momentum=None, the whole sample as one batch), which stores
  the unbiased variance: the first BN's input does not depend on any earlier BN, so the two agree;
- the same data split into different batch sizes (the streaming merge must not care);
- the drift metrics against their closed forms (BN_FACTS: SMD, LVR, KL, W2).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

import bnlint

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "fixtures" / "convnet_state_dict.pt"
DATA = ROOT / "fixtures" / "data" / "convnet_indomain.npz"
ARCH = str(ROOT / "fixtures" / "models.py") + ":convnet"


def channel_stats(batch_size: int, data: Path = DATA) -> list[dict]:
    report = bnlint.lint(MODEL, data=data, arch=ARCH, batch_size=batch_size)
    (result,) = report.files
    assert result.error is None, result.error
    return result.layer_stats


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    from fixtures.models import convnet

    net = convnet()
    net.load_state_dict(torch.load(MODEL, weights_only=True))
    return net.eval()


@pytest.fixture(scope="module")
def first_bn_input(model) -> np.ndarray:  # type: ignore[no-untyped-def]
    x = np.load(DATA, allow_pickle=False)["input"]
    conv = copy.deepcopy(model.conv1).double()
    with torch.no_grad():
        return conv(torch.from_numpy(x).double()).numpy()


def test_first_layer_matches_direct_numpy(first_bn_input: np.ndarray) -> None:
    stats = channel_stats(32)[0]
    assert stats["layer"] == "bn1"
    np.testing.assert_allclose(stats["channel"]["mean"], first_bn_input.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["channel"]["var"], first_bn_input.var(axis=(0, 2, 3)), rtol=1e-6)
    assert stats["values_per_channel"] == first_bn_input.size // first_bn_input.shape[1]


def test_first_layer_matches_update_bn(model, first_bn_input: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    from torch.optim.swa_utils import update_bn

    x = torch.from_numpy(np.load(DATA, allow_pickle=False)["input"])
    reference = copy.deepcopy(model).double()
    update_bn([x.double()], reference)  # momentum=None, one batch holding the whole sample
    stats = channel_stats(32)[0]
    n = first_bn_input.size // first_bn_input.shape[1]
    np.testing.assert_allclose(stats["channel"]["mean"], reference.bn1.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    # update_bn stores the unbiased variance; bnlint reports the population variance.
    np.testing.assert_allclose(np.array(stats["channel"]["var"]) * n / (n - 1), reference.bn1.running_var.numpy(), rtol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 7, 100, 256])
def test_statistics_do_not_depend_on_batch_split(batch_size: int) -> None:
    baseline = channel_stats(32)
    other = channel_stats(batch_size)
    for left, right in zip(baseline, other):
        np.testing.assert_allclose(left["channel"]["mean"], right["channel"]["mean"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(left["channel"]["var"], right["channel"]["var"], rtol=1e-6)


def test_drift_metrics_match_closed_forms(model) -> None:  # type: ignore[no-untyped-def]
    stats = channel_stats(32, ROOT / "fixtures" / "data" / "convnet_shifted.npz")
    for record in stats:
        bn = getattr(model, record["layer"])
        mean_r = bn.running_mean.double().numpy()
        var_r = bn.running_var.double().numpy() + bn.eps
        mean_t = np.array(record["channel"]["mean"])
        var_t = np.array(record["channel"]["var"]) + bn.eps
        smd = (mean_t - mean_r) / np.sqrt(var_r)
        lvr = np.log(var_t / var_r)
        np.testing.assert_allclose(record["channel"]["smd"], smd, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(record["channel"]["lvr"], lvr, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(record["channel"]["kl"], 0.5 * (np.exp(lvr) - lvr - 1 + smd**2), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(record["channel"]["w2"], np.sqrt(smd**2 + (np.exp(lvr / 2) - 1) ** 2), rtol=1e-9, atol=1e-12)
        assert record["max_abs_smd"] == pytest.approx(np.max(np.abs(smd)))
