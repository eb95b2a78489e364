"""Numerics of bnlint.dynamic: streaming statistics, metrics and noise, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnlint.dynamic.hooks import per_sample_moments  # noqa: E402
from bnlint.dynamic.metrics import analyse_layer, drift  # noqa: E402
from bnlint.dynamic.stats import Accumulator, Collector, NumpyOps, TorchOps, per_sample_moments_numpy  # noqa: E402
from bnlint.dynamic.torch_runner import _ts_moments  # noqa: E402

SPLITS = [[40], [1] * 40, [7, 1, 19, 13], [16, 16, 8], [3, 37]]


def _data(seed: int = 0, shape: tuple[int, ...] = (40, 5, 6, 7)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    offsets = np.array([0.0, 3.0, -20.0, 1e3, 0.5])[: shape[1]].reshape(1, -1, *([1] * (len(shape) - 2)))
    scales = np.array([1.0, 0.1, 5.0, 2.0, 1e-3])[: shape[1]].reshape(offsets.shape)
    # a per-sample component makes values within a sample correlated, like real activations
    per_sample = rng.normal(0, 1, (shape[0], shape[1], *([1] * (len(shape) - 2))))
    return (offsets + scales * (rng.normal(0, 1, shape) + per_sample)).astype(np.float32)


def _accumulate(x: np.ndarray, splits: list[int], ops: object, batch_size: int | None = None) -> Accumulator:
    channels, size = x.shape[1], int(np.prod(x.shape[2:], dtype=np.int64))
    acc = Accumulator(ops, np.full(channels, size), np.full(channels, 1e-5), batch_size)  # type: ignore[arg-type]
    start = 0
    for count in splits:
        batch = x[start : start + count]
        start += count
        if isinstance(ops, TorchOps):
            var, mean = per_sample_moments(torch.from_numpy(batch))
        else:
            var, mean = per_sample_moments_numpy(batch)
        acc.add(var, mean)
    return acc


def _direct(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
    return values.mean(1), values.var(1)


@pytest.mark.parametrize("splits", SPLITS)
def test_stream_merge_matches_numpy_over_all_data(splits: list[int]) -> None:
    x = _data()
    mean, var = _direct(x)
    got_mean, got_var = _accumulate(x, splits, NumpyOps()).result().totals()
    np.testing.assert_allclose(got_mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_var, var, rtol=1e-10)
    # float32 per-sample reductions on the torch path: float32 accuracy, including the 1e3-offset channel
    t_mean, t_var = _accumulate(x, splits, TorchOps("cpu")).result().totals()
    np.testing.assert_allclose(t_mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t_var, var, rtol=1e-4)


def test_results_do_not_depend_on_batch_split() -> None:
    x = _data(1)
    results = [_accumulate(x, splits, NumpyOps(), batch_size=4).result() for splits in SPLITS]
    for other in results[1:]:
        for a, b in ((results[0].groups, other.groups), (results[0].sample_means, other.sample_means),
                     (results[0].batch_means, other.batch_means), (results[0].batch_logvars, other.batch_logvars)):
            assert a is not None and b is not None
            np.testing.assert_allclose(a.count, b.count)
            np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(a.m2, b.m2, rtol=1e-9, atol=1e-9)
        assert other.batches == results[0].batches == 10


def test_pseudo_batches_match_direct_batch_statistics() -> None:
    x = _data(2, (22, 3, 4, 4))
    moments = _accumulate(x, [5, 9, 8], NumpyOps(), batch_size=4).result()
    means, logvars = [], []
    for b in range(5):  # 22 samples: five full batches of 4, two samples left over
        mean, var = _direct(x[4 * b : 4 * b + 4])
        means.append(mean)
        logvars.append(np.log(var + 1e-5))
    assert moments.batches == 5
    assert moments.batch_means is not None and moments.batch_logvars is not None
    np.testing.assert_allclose(moments.batch_means.mean[0], np.mean(means, 0), rtol=1e-10)
    np.testing.assert_allclose(moments.batch_means.m2[0], np.var(means, 0) * 5, rtol=1e-8)
    np.testing.assert_allclose(moments.batch_logvars.mean[0], np.mean(logvars, 0), rtol=1e-10)


def test_collector_side_by_side_equals_separate_layers() -> None:
    a, b = _data(3, (12, 4, 5, 5)), _data(4, (12, 3, 2, 3))
    collector = Collector(NumpyOps(), {"a": 1e-5, "b": 1e-3})
    for start in (0, 5):
        stop = 5 if start == 0 else 12
        collector.add("a", *per_sample_moments_numpy(a[start:stop]), 25)
        collector.add("b", *per_sample_moments_numpy(b[start:stop]), 6)
        collector.end_batch()
    layers = collector.layers()
    assert list(layers) == ["a", "b"]
    for name, x in (("a", a), ("b", b)):
        mean, var = _direct(x)
        got_mean, got_var = layers[name].totals()
        np.testing.assert_allclose(got_mean, mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got_var, var, rtol=1e-10)
        assert layers[name].samples == 12


def test_first_bn_matches_update_bn_with_cumulative_average() -> None:
    """torch.optim.swa_utils.update_bn (momentum=None) as an independent reference for the first BN."""
    from torch.optim.swa_utils import update_bn

    from bnlint.dynamic.hooks import record_inputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 4, 3), torch.nn.BatchNorm2d(4))
    x = torch.from_numpy(_data(5, (48, 3, 9, 9))[:, :3])
    update_bn([x], model)  # one batch of everything: running_var = unbiased variance of all values
    bn = model[1]
    collector = Collector(TorchOps("cpu"), {"1": 1e-5, "4": 1e-5})
    model.eval()
    with torch.no_grad(), record_inputs({"1": model[1], "4": model[4]}, collector.add):
        start = 0
        for count in (7, 1, 29, 11):  # uneven batches on our side
            model(x[start : start + count])
            collector.end_batch()
            start += count
    assert not model[1]._forward_pre_hooks  # hooks removed
    mean, var = collector.layers()["1"].totals()
    n = 48 * 7 * 7
    np.testing.assert_allclose(mean, bn.running_mean.double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var * n / (n - 1), bn.running_var.double().numpy(), rtol=1e-5)
    # equal batches: the cumulative average of batch means is the overall mean as well
    update_bn([x[:16], x[16:32], x[32:]], model)
    np.testing.assert_allclose(mean, bn.running_mean.double().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset, scale", [(0.0, 1.0), (5.0, 1.0), (1e3, 1.0), (1e4, 1e-3), (0.0, 1e-20)])
def test_per_sample_moments_cpu_fast_path_is_accurate(offset: float, scale: float) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(offset, scale, (4, 6, 7, 9)).astype(np.float32)
    x[0, 0] = 3.0  # a constant channel: variance exactly 0
    want_var, want_mean = per_sample_moments_numpy(x)
    for var, mean in (per_sample_moments(torch.from_numpy(x)), _ts_moments(torch.from_numpy(x))[:2]):
        np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-6, atol=1e-6 * max(abs(offset), scale))
        np.testing.assert_allclose(var.numpy(), want_var, rtol=1e-4, atol=1e-30)
    x2 = rng.normal(0, 1, (5, 7)).astype(np.float32)  # BatchNorm1d input: one value per sample
    var, mean = per_sample_moments(torch.from_numpy(x2))
    np.testing.assert_array_equal(mean.numpy(), x2)
    assert float(var.abs().max()) == 0.0


def test_metrics_match_closed_forms() -> None:
    rng = np.random.default_rng(0)
    mu_t, mu_r = rng.normal(0, 1, 50), rng.normal(0, 1, 50)
    var_t, var_r = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    eps = 1e-3
    out = drift(mu_t, var_t, mu_r, var_r, eps)
    s_t, s_r = np.sqrt(var_t + eps), np.sqrt(var_r + eps)
    kl = np.log(s_r / s_t) + (s_t**2 + (mu_t - mu_r) ** 2) / (2 * s_r**2) - 0.5  # KL(N_t || N_r)
    np.testing.assert_allclose(out["kl"], kl, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["smd"], (mu_t - mu_r) / s_r, rtol=1e-12)
    np.testing.assert_allclose(out["lvr"], 2 * np.log(s_t / s_r), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["w2"], np.sqrt((mu_t - mu_r) ** 2 + (s_t - s_r) ** 2) / s_r, rtol=1e-10)
    same = drift(mu_r, var_r, mu_r, var_r, eps)
    assert np.all(same["kl"] == 0) and np.all(same["smd"] == 0)


def test_jackknife_noise_floor_and_standard_error() -> None:
    """No drift: mean KL stays near the noise floor; the SE of a mean of n i.i.d. values is sd/sqrt(n)."""
    rng = np.random.default_rng(7)
    channels, n = 64, 400
    mean_r, var_r = rng.normal(0, 1, channels), rng.uniform(0.5, 2, channels)
    x = (mean_r + np.sqrt(var_r) * rng.normal(0, 1, (n, channels))).astype(np.float32)
    acc = Accumulator(NumpyOps(), np.ones(channels, dtype=np.int64), np.full(channels, 1e-5))
    acc.add(*per_sample_moments_numpy(x[:, :, None]))
    layer = analyse_layer("bn", 0, acc.result(), 1e-5, mean_r, var_r)
    se_mean = layer.per_channel.se_smd * np.sqrt(var_r + 1e-5)
    ratio = np.mean(se_mean / (np.sqrt(var_r) / np.sqrt(n)))
    assert 0.8 < ratio < 1.2
    assert 0.3 < layer.summary.mean_kl / layer.summary.noise_kl < 3  # type: ignore[operator]
    assert 300 < (layer.summary.effective_n or 0) < 550
