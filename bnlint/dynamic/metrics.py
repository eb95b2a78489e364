"""Drift of a layer's target-data statistics from its stored running statistics, and its noise.

Per channel, with v = variance + the layer's eps (what BatchNorm divides by). The data's variance
is the biased population variance of every value the layer saw (n is large: samples times spatial
positions, so the n/(n-1) between it and PyTorch's unbiased running_var is negligible for drift);
the JSON output carries both estimates.

- SMD = (mean_t - running_mean) / sqrt(v_r): exactly the mean of the eval-mode normalised
  activation on the target data (0 when the stored statistics fit).
- LVR = ln(v_t / v_r): that activation's variance is e^LVR (0 when they fit).
- KL(N_t || N_r) = 0.5 * (e^LVR - LVR - 1 + SMD^2): the Gaussian KL divergence, a function of
  SMD and LVR only; about SMD^2/2 + LVR^2/4 for small drift.
- W2 / sqrt(v_r) = sqrt(SMD^2 + (e^(LVR/2) - 1)^2): the 2-Wasserstein distance in the same units.

Significance: the sample's own noise is measured with a delete-a-group jackknife over K
interleaved groups of whole samples (see stats.py), giving per-channel standard errors of SMD and
LVR. Their squares give the KL a finite sample shows with *no* drift at all (the noise floor,
about SMD_se^2/2 + LVR_se^2/4 per channel); a layer's drift counts only when its mean KL stands
well above that floor, so small samples do not raise false alarms. The effective sample size
n_eff = var_t / SE(mean_t)^2 says how many independent values the sample was worth.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from bnlint.dynamic.stats import LayerMoments
from bnlint.measurements import BatchNoise, ChannelMetrics, DriftSummary, LayerDrift, LayerStats
from bnlint.settings import DynamicThresholds

MIN_PSEUDO_BATCHES = 4  # below this, the spread of pseudo-batch statistics is too noisy to use


def drift(mean_t: np.ndarray, var_t: np.ndarray, mean_r: np.ndarray, var_r: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    """Per-channel SMD, LVR, KL and W2 of N(mean_t, var_t) against N(mean_r, var_r), eps added to both."""
    v_t, v_r = var_t + eps, np.maximum(var_r + eps, np.finfo(np.float64).tiny)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        smd = (mean_t - mean_r) / np.sqrt(v_r)
        lvr = np.log(np.maximum(v_t, np.finfo(np.float64).tiny) / v_r)
        kl = 0.5 * (np.expm1(lvr) - lvr + smd * smd)
        w2 = np.sqrt(smd * smd + np.expm1(lvr / 2) ** 2)
    return {"smd": smd, "lvr": lvr, "kl": kl, "w2": w2}


def _leave_one_out(moments: LayerMoments) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance per channel with each non-empty group left out in turn: (G, C) each."""
    count, mean, m2 = moments.group_count, moments.groups.mean, moments.groups.m2
    keep = count > 0
    count, mean, m2 = count[keep], mean[keep], m2[keep]
    total = count.sum()
    grand = (count[:, None] * mean).sum(0) / total
    m2_total = m2.sum(0) + (count[:, None] * (mean - grand) ** 2).sum(0)
    rest = (total - count)[:, None]
    rest_mean = (total * grand - count[:, None] * mean) / rest
    # Chan's update run backwards: M2 = M2_rest + M2_g + delta^2 * n_rest * n_g / n
    rest_m2 = m2_total - m2 - (mean - rest_mean) ** 2 * rest * count[:, None] / total
    return rest_mean, np.maximum(rest_m2, 0.0) / rest


def _jackknife_se(estimates: np.ndarray) -> np.ndarray:
    """Jackknife standard error from leave-one-group-out estimates along axis 0."""
    groups = estimates.shape[0]
    spread = estimates - estimates.mean(0)
    return np.sqrt((groups - 1) / groups * (spread * spread).sum(0))


def analyse_layer(
    name: str,
    order: int,
    moments: LayerMoments,
    eps: float,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None = None,
) -> LayerDrift:
    mean_t, var_t = moments.totals()
    channels = mean_t.size
    has_stats = running_mean is not None and running_var is not None and running_mean.size == channels and running_var.size == channels
    layer = LayerDrift(name=name, order=order, channels=channels, eps=eps, samples=moments.samples,
                       values_per_sample=moments.values_per_sample, mean_t=mean_t, var_t=var_t, has_running_stats=has_stats)
    groups = int((moments.group_count > 0).sum())
    effective_n: float | None = None
    if groups >= 2:
        rest_mean, rest_var = _leave_one_out(moments)
        se_mean = _jackknife_se(rest_mean)
        se_logvar = _jackknife_se(np.log(rest_var + eps))
        with np.errstate(divide="ignore", invalid="ignore"):
            n_eff = var_t / (se_mean * se_mean)
        effective_n = float(np.nanmedian(np.where(np.isfinite(n_eff), n_eff, np.nan))) if np.isfinite(n_eff).any() else None
    else:
        rest_mean = rest_var = None  # type: ignore[assignment]  # one group: no leave-one-out estimates
        se_mean = se_logvar = np.full(channels, np.nan)
    layer.summary = DriftSummary(groups=groups, effective_n=effective_n)
    if has_stats and running_mean is not None and running_var is not None:
        raw = drift(mean_t, var_t, running_mean, running_var, eps)
        v_r = np.maximum(running_var + eps, np.finfo(np.float64).tiny)
        metrics = ChannelMetrics(**raw, se_smd=se_mean / np.sqrt(v_r), se_lvr=se_logvar)
        layer.per_channel = metrics
        finite = np.isfinite(metrics.kl)
        floor = 0.5 * metrics.se_smd ** 2 + 0.25 * metrics.se_lvr ** 2
        noise_kl = float(np.mean(floor[finite])) if finite.any() and groups >= 2 else None
        kl_se = None
        if rest_mean is not None and rest_var is not None and finite.any():
            loo_kl = [float(np.mean(drift(rest_mean[g], rest_var[g], running_mean, running_var, eps)["kl"][finite])) for g in range(groups)]
            kl_se = float(_jackknife_se(np.asarray(loo_kl)[:, None])[0])
        layer.summary = _summary(layer.summary, metrics, finite, weight, noise_kl, kl_se)
    if moments.batch_size:
        layer.batch_size = moments.batch_size
        layer.batch_noise = _batch_noise(moments, mean_t, var_t, eps)
    return layer


def _summary(base: DriftSummary, metrics: ChannelMetrics, finite: np.ndarray, weight: np.ndarray | None,
             noise_kl: float | None, kl_se: float | None) -> DriftSummary:
    """`base` (groups, effective_n) with the layer's drift over its finite channels."""
    base = replace(base, nonfinite_channels=int((~finite).sum()), noise_kl=noise_kl, kl_se=kl_se)
    if not finite.any():
        return base
    smd, lvr, kl = np.abs(metrics.smd[finite]), np.abs(metrics.lvr[finite]), metrics.kl[finite]
    gamma_weighted_kl = None
    weighted = weight is not None and weight.size == finite.size
    if weight is not None and weighted:
        gamma = np.abs(weight[finite])
        # channels a dead (gamma ~ 0) unit makes irrelevant should not dominate the summary
        gamma_weighted_kl = float((gamma * kl).sum() / gamma.sum()) if gamma.sum() > 0 else None
    return replace(base, mean_abs_smd=float(smd.mean()), max_abs_smd=float(smd.max()), mean_abs_lvr=float(lvr.mean()),
                   max_abs_lvr=float(lvr.max()), mean_kl=float(kl.mean()), max_kl=float(kl.max()), mean_w2=float(metrics.w2[finite].mean()),
                   max_channel=int(np.flatnonzero(finite)[int(np.argmax(kl))]), weighted=weighted, gamma_weighted_kl=gamma_weighted_kl)


def _batch_noise(moments: LayerMoments, mean_t: np.ndarray, var_t: np.ndarray, eps: float) -> BatchNoise:
    """How far statistics of one training batch of B samples stray from the population's, per channel.

    RMS over pseudo-batches of (batch mean - population mean) / sqrt(population var + eps) and of
    ln((batch var + eps) / (population var + eps)): the shift and log-scale error of the
    normalisation in training relative to inference. With fewer than MIN_PSEUDO_BATCHES full
    pseudo-batches, the mean part falls back to sqrt(var across samples of sample means / B).
    """
    size = int(moments.batch_size or 0)
    scale = np.sqrt(var_t + eps)
    rms_lvr: np.ndarray | None = None
    if moments.batches >= MIN_PSEUDO_BATCHES and moments.batch_means is not None and moments.batch_logvars is not None:
        means, logvars = moments.batch_means, moments.batch_logvars
        rms_smd = np.sqrt(means.m2[0] / means.count[0] + (means.mean[0] - mean_t) ** 2) / scale
        rms_lvr = np.sqrt(logvars.m2[0] / logvars.count[0] + (logvars.mean[0] - np.log(var_t + eps)) ** 2)
        method = "pseudo-batches"
    else:
        rms_smd = np.sqrt(moments.sample_mean_var / max(size, 1)) / scale
        method = "analytic-mean"
    return BatchNoise(batch_size=size, values_per_batch=size * moments.values_per_sample, pseudo_batches=moments.batches,
                      method=method, rms_smd=rms_smd, rms_lvr=rms_lvr, mean_rms_smd=float(np.mean(rms_smd)),
                      mean_rms_lvr=None if rms_lvr is None else float(np.mean(rms_lvr)))


def layer_stats(layer: LayerDrift, thresholds: DynamicThresholds) -> LayerStats:
    """What is reported about one layer: its summaries plus the full per-channel arrays."""
    summary, metrics = layer.summary, layer.per_channel
    fraction = significance = None
    if metrics is not None:
        finite = np.isfinite(metrics.kl)
        fraction = float((metrics.kl[finite] > thresholds.drift_kl).mean()) if finite.any() else None
        noise = summary.noise_kl
        significance = None if not noise or summary.mean_kl is None else float(summary.mean_kl or 0.0) / noise
    # "var" is the population (biased) variance of every value seen, which the drift metrics use;
    # "var_unbiased" applies Bessel's correction n/(n-1), the estimate PyTorch's running_var holds
    # (and Caffe's); Keras' moving_variance averages biased batch variances.
    count = layer.samples * layer.values_per_sample
    unbiased = layer.var_t * (count / (count - 1)) if count > 1 else np.full_like(layer.var_t, np.nan)
    noise_record = None
    if layer.batch_noise is not None:
        noise_record = {k: (_list(v) if isinstance(v, np.ndarray) else _clean(v)) for k, v in layer.batch_noise.record().items()}
    return LayerStats(
        layer=layer.name, order=layer.order, channels=layer.channels, samples=layer.samples,
        values_per_sample=layer.values_per_sample, values_per_channel=count, has_running_stats=layer.has_running_stats,
        calls_per_forward=layer.calls_per_forward, summary=summary, fraction_over_threshold=fraction, significance=significance,
        mean=_list(layer.mean_t), var=_list(layer.var_t), var_unbiased=_list(unbiased),
        metrics=None if metrics is None else {k: _list(v) for k, v in metrics.items()}, batch_noise=noise_record,
    )


def layer_record(layer: LayerDrift, thresholds: DynamicThresholds) -> dict[str, Any]:
    """The JSON-able statistics of one layer (`layer_stats(...).record()`)."""
    return layer_stats(layer, thresholds).record()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


def _list(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]
