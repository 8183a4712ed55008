"""Percentile bootstrap confidence intervals and paired model comparison, optionally resampling whole patients.

Lesions of one patient are not independent (LLD-MMRI: case MR207602_1 is the second lesion of patient MR207602), so
with ``groups`` the resampling unit is the group: each replicate draws patients with replacement and takes all of
their lesions.

A bootstrap replicate is a vector of case multiplicities (weights). The built-in metrics are computed for all
replicates at once from weighted confusion matrices, weighted Mann-Whitney AUROCs and weighted calibration bins,
because 1000 calls of the torchmetrics functions take minutes where this takes about a second (torchmetrics has
no weighted, batched form; its BootStrapper wrapper resamples per update step and cannot resample by group).
The point estimates are those of :func:`~liverfusion.metrics.classification.classification_metrics`; the
weighted implementation is tested to reproduce them exactly at unit weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from liverfusion.errors import DataError
from liverfusion.metrics.classification import (
    ArrayLike,
    UndefinedMetricWarning,
    classification_metrics,
    validate_probs_labels,
)

MetricFn = Callable[[np.ndarray, np.ndarray], float | dict[str, float]]


class ConfidenceInterval(NamedTuple):
    point: float
    low: float
    high: float


def _default_names(k: int) -> list[str]:
    return [str(i) for i in range(k)]


def weighted_metrics(
    probs: Tensor,
    labels: Tensor,
    weights: Tensor,
    class_names: Sequence[str],
    threshold: float = 0.5,
    n_bins: int = 15,
) -> dict[str, Tensor]:
    """The metrics of ``classification_metrics`` for B weightings of the same cases at once.

    probs (N, K) float64, labels (N,) int64 (both validated), weights (B, N) non-negative case multiplicities.
    Returns metric -> (B,) float64 tensor; NaN where a metric is undefined in a replicate.
    """
    n, k = probs.shape
    w = weights.to(torch.float64)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    total = w.sum(dim=1)

    conf, pred = probs.max(dim=1)
    # Weighted confusion matrices (B, K, K): rows true, columns predicted.
    cell = labels * k + pred
    onehot = torch.zeros(n, k * k, dtype=torch.float64)
    onehot[torch.arange(n), cell] = 1.0
    cm = (w @ onehot).view(-1, k, k)
    tp = torch.diagonal(cm, dim1=1, dim2=2)
    support = cm.sum(dim=2)
    predicted = cm.sum(dim=1)
    fn = support - tp
    fp = predicted - tp
    tn = total[:, None] - tp - fn - fp

    out: dict[str, Tensor] = {}
    out["accuracy"] = tp.sum(dim=1) / total
    present = support > 0
    recall = torch.where(present, tp / support.clamp_min(1e-300), nan)
    out["balanced_accuracy"] = torch.nanmean(recall, dim=1)
    f1_den = 2 * tp + fp + fn
    f1_def = f1_den > 0
    f1 = torch.where(f1_def, 2 * tp / f1_den.clamp_min(1e-300), 0.0)
    out["macro_f1"] = (f1 * f1_def).sum(dim=1) / f1_def.sum(dim=1).clamp_min(1)
    po = tp.sum(dim=1) / total
    pe = (support * predicted).sum(dim=1) / total**2
    out["kappa"] = torch.where(pe < 1, (po - pe) / (1 - pe).clamp_min(1e-300), nan)
    out["lld_score"] = (out["macro_f1"] + out["kappa"]) / 2

    auroc = torch.stack([_weighted_auroc(probs[:, c], labels == c, w) for c in range(k)], dim=1)
    out["auroc"] = torch.nanmean(auroc, dim=1)
    has_neg = tn + fp > 0
    specificity = torch.where(has_neg, tn / (tn + fp).clamp_min(1e-300), nan)
    for i, c in enumerate(class_names):
        out[f"auroc/{c}"] = auroc[:, i]
        out[f"sensitivity/{c}"] = recall[:, i]
        out[f"specificity/{c}"] = specificity[:, i]

    # Same binning as torchmetrics' calibration error: float32 confidences, right-closed bucketize.
    conf32 = conf.to(torch.float32)
    bounds = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    bins = torch.bucketize(conf32, bounds, right=True) - 1
    gap = (pred == labels).to(torch.float64) - conf32.to(torch.float64)
    bin_onehot = torch.zeros(n, n_bins + 1, dtype=torch.float64)
    bin_onehot[torch.arange(n), bins] = gap
    out["ece"] = (w @ bin_onehot).abs().sum(dim=1) / total

    if k == 2:
        out["binary/auroc"] = auroc[:, 1]
        pos_pred = probs[:, 1] > threshold
        pos = labels == 1
        tp_b = w @ (pos & pos_pred).to(torch.float64)
        p_b = w @ pos.to(torch.float64)
        tn_b = w @ (~pos & ~pos_pred).to(torch.float64)
        n_b = w @ (~pos).to(torch.float64)
        out["binary/sensitivity"] = torch.where(p_b > 0, tp_b / p_b.clamp_min(1e-300), nan)
        out["binary/specificity"] = torch.where(n_b > 0, tn_b / n_b.clamp_min(1e-300), nan)
    return out


def _weighted_auroc(scores: Tensor, positive: Tensor, w: Tensor) -> Tensor:
    """Mann-Whitney AUROC (ties count 1/2) of one score vector under B case weightings: (B,)."""
    uniq, inv = torch.unique(scores, sorted=True, return_inverse=True)
    neg_w = torch.zeros(w.shape[0], uniq.numel(), dtype=torch.float64)
    neg_w.index_add_(1, inv, w * (~positive).to(torch.float64))
    below = torch.cumsum(neg_w, dim=1) - neg_w  # negative weight with a strictly lower score
    credit = (below + 0.5 * neg_w)[:, inv]  # (B, N)
    pos_w = w * positive.to(torch.float64)
    w_pos = pos_w.sum(dim=1)
    w_neg = neg_w.sum(dim=1)
    auc = (pos_w * credit).sum(dim=1) / (w_pos * w_neg).clamp_min(1e-300)
    return torch.where((w_pos > 0) & (w_neg > 0), auc, torch.tensor(float("nan"), dtype=torch.float64))


def _resample_weights(n: int, n_boot: int, rng: np.random.Generator, groups: ArrayLike | None) -> np.ndarray:
    """(n_boot, n) case multiplicities; with ``groups`` whole groups are drawn with replacement."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise DataError(f"groups must have one entry per case ({n}), got shape {g.shape}")
    _, idx = np.unique(g, return_inverse=True)
    n_groups = int(idx.max()) + 1
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    return counts[:, idx].astype(np.float64)


def _percentile(values: np.ndarray, alpha: float) -> tuple[float, float, int]:
    """(low, high, number of undefined replicates) of the finite replicates."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan"), int(values.size)
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high), int(values.size - finite.size)


def _warn_undefined(undefined: dict[str, int], n_boot: int) -> None:
    if undefined:
        listing = ", ".join(f"{key} ({count})" for key, count in undefined.items())
        warnings.warn(
            f"undefined in some of the {n_boot} bootstrap resamples (e.g. a class missing from the resample), "
            f"intervals use the others: {listing}",
            UndefinedMetricWarning,
            stacklevel=3,
        )


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def _replicates_by_fn(
    metric_fn: MetricFn, p: np.ndarray, y: np.ndarray, weights: np.ndarray
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Run a user metric function on the full set and on each resample (slow path: one call per replicate)."""

    def as_dict(value: Any) -> dict[str, float]:
        if isinstance(value, dict):
            return {str(key): float(v) for key, v in value.items()}
        return {getattr(metric_fn, "__name__", "metric"): float(value)}

    point = as_dict(metric_fn(p, y))
    reps: dict[str, list[float]] = {key: [] for key in point}
    counts = weights.astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for row in counts:
            idx = np.repeat(np.arange(y.shape[0]), row)
            values = as_dict(metric_fn(p[idx], y[idx]))
            for key in reps:
                reps[key].append(values.get(key, float("nan")))
    return point, {key: np.asarray(v) for key, v in reps.items()}


def _select(keys: Sequence[str], metrics: str | Sequence[str] | None) -> list[str]:
    if metrics is None:
        return list(keys)
    wanted = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in wanted if m not in keys]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {sorted(keys)}")
    return wanted


def bootstrap_ci(
    probs: ArrayLike,
    labels: ArrayLike,
    metrics: str | Sequence[str] | MetricFn | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: ArrayLike | None = None,
    class_names: Sequence[str] | None = None,
    threshold: float = 0.5,
    n_bins: int = 15,
) -> dict[str, ConfidenceInterval]:
    """Percentile bootstrap (1 - alpha) intervals: metric -> (point, low, high).

    ``metrics``: None (every key of ``classification_metrics``), a name or list of names from it, or a callable
    ``fn(probs, labels) -> float | dict`` evaluated on each resample (slower). ``groups`` (one id per case, e.g.
    patient id) switches to resampling whole groups. NaN point estimates (undefined metrics) get NaN intervals.
    """
    _check_alpha(alpha)
    p, y = validate_probs_labels(probs, labels)
    k = p.shape[1]
    names = list(class_names) if class_names is not None else _default_names(k)
    rng = np.random.default_rng(seed)
    weights = _resample_weights(y.shape[0], n_boot, rng, groups)

    if callable(metrics):
        point, reps = _replicates_by_fn(metrics, p.numpy(), y.numpy(), weights)
        keys = list(point)
    else:
        point = classification_metrics(p, y, names, threshold=threshold, n_bins=n_bins)
        keys = _select(list(point), metrics)
        batched = weighted_metrics(p, y, torch.from_numpy(weights), names, threshold=threshold, n_bins=n_bins)
        reps = {key: batched[key].numpy() for key in keys}

    result: dict[str, ConfidenceInterval] = {}
    undefined: dict[str, int] = {}
    for key in keys:
        if not np.isfinite(point[key]):
            result[key] = ConfidenceInterval(float("nan"), float("nan"), float("nan"))
            continue
        low, high, n_undefined = _percentile(reps[key], alpha)
        if n_undefined:
            undefined[key] = n_undefined
        result[key] = ConfidenceInterval(float(point[key]), low, high)
    _warn_undefined(undefined, n_boot)
    return result


def paired_bootstrap(
    probs_a: ArrayLike,
    probs_b: ArrayLike,
    labels: ArrayLike,
    metric: str | MetricFn = "lld_score",
    n_boot: int = 1000,
    seed: int = 0,
    groups: ArrayLike | None = None,
    alpha: float = 0.05,
    class_names: Sequence[str] | None = None,
    threshold: float = 0.5,
    n_bins: int = 15,
) -> dict[str, float]:
    """Compare two models on the same cases: delta = metric(a) - metric(b) with a paired percentile interval.

    Both models are scored on the same resamples, so case difficulty cancels. ``p_value`` is two-sided, from the
    resampled deltas shifted to the null (delta 0): (1 + #{|d* - d| >= |d|}) / (1 + B), never exactly 0.
    ``metric``: a name from ``classification_metrics`` or ``fn(probs, labels) -> float``.
    """
    _check_alpha(alpha)
    pa, y = validate_probs_labels(probs_a, labels)
    pb, _ = validate_probs_labels(probs_b, labels, num_classes=pa.shape[1])
    k = pa.shape[1]
    names = list(class_names) if class_names is not None else _default_names(k)
    rng = np.random.default_rng(seed)
    weights = _resample_weights(y.shape[0], n_boot, rng, groups)

    if callable(metric):
        pt_a, reps_a = _replicates_by_fn(metric, pa.numpy(), y.numpy(), weights)
        pt_b, reps_b = _replicates_by_fn(metric, pb.numpy(), y.numpy(), weights)
        if len(pt_a) != 1:
            raise ValueError("paired_bootstrap needs a metric function that returns one float")
        (key,) = pt_a
        point_a, point_b, rep_a, rep_b = pt_a[key], pt_b[key], reps_a[key], reps_b[key]
    else:
        key = metric
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            full_a = classification_metrics(pa, y, names, threshold=threshold, n_bins=n_bins)
            full_b = classification_metrics(pb, y, names, threshold=threshold, n_bins=n_bins)
        _select(list(full_a), key)
        point_a, point_b = full_a[key], full_b[key]
        w = torch.from_numpy(weights)
        rep_a = weighted_metrics(pa, y, w, names, threshold=threshold, n_bins=n_bins)[key].numpy()
        rep_b = weighted_metrics(pb, y, w, names, threshold=threshold, n_bins=n_bins)[key].numpy()
    if not (np.isfinite(point_a) and np.isfinite(point_b)):
        raise DataError(f"{key} is undefined on these cases (a = {point_a}, b = {point_b}); cannot compare")

    delta = float(point_a - point_b)
    deltas = rep_a - rep_b
    low, high, n_undefined = _percentile(deltas, alpha)
    _warn_undefined({f"delta {key}": n_undefined} if n_undefined else {}, n_boot)
    finite = deltas[np.isfinite(deltas)]
    extreme = np.abs(finite - delta) >= np.abs(delta) - 1e-12
    p_value = float((1 + extreme.sum()) / (1 + finite.size))
    return {
        "metric_a": float(point_a),
        "metric_b": float(point_b),
        "delta": delta,
        "low": low,
        "high": high,
        "p_value": p_value,
    }
