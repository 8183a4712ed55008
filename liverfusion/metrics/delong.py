"""DeLong's nonparametric test for correlated ROC AUCs, in the fast O(N log N) form of Sun & Xu (2014).

DeLong, DeLong & Clarke-Pearson (Biometrics 1988) estimate the covariance of several AUCs measured on the same
cases from the structural components V10 (one per positive) and V01 (one per negative); Sun & Xu (IEEE SPL 21(11),
2014) obtain them from mid-ranks instead of the O(m n) pair comparisons. Binary only: for a multiclass model pass
the one-vs-rest score of the class of interest. For metrics other than AUROC use
:func:`liverfusion.metrics.bootstrap.paired_bootstrap`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats

from liverfusion.errors import DataError
from liverfusion.metrics.classification import ArrayLike


class DeLongTest(NamedTuple):
    auc_a: float
    auc_b: float
    z: float
    p_value: float


class DeLongCI(NamedTuple):
    auc: float
    low: float
    high: float
    se: float


def _binary_inputs(scores: np.ndarray, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """scores (k, N) float, labels (N,) -> (positives' scores (k, m), negatives' scores (k, n))."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != scores.shape[1]:
        raise DataError(f"labels must have shape ({scores.shape[1]},), got {y.shape}")
    if y.shape[0] == 0:
        raise DataError("no cases: scores and labels are empty")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:  # bools compare equal to 0 and 1
        raise DataError(f"DeLong needs binary labels 0/1, got values {sorted(values)[:10]}")
    if not np.isfinite(scores).all():
        raise DataError("scores contain NaN or inf")
    pos = y.astype(bool)
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        raise DataError(f"DeLong variance needs at least 2 positives and 2 negatives, got {m} and {n}")
    return scores[:, pos], scores[:, ~pos]


def delong_covariance(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their DeLong covariance matrix (k, k) for k score vectors ``scores`` (k, N) on the same cases."""
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    x, y = _binary_inputs(s, labels)
    m, n = x.shape[1], y.shape[1]
    tx = stats.rankdata(x, axis=1)  # mid-ranks within positives
    ty = stats.rankdata(y, axis=1)  # mid-ranks within negatives
    tz = stats.rankdata(np.concatenate([x, y], axis=1), axis=1)  # mid-ranks over all cases
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v01 = (tz[:, :m] - tx) / n  # per positive: fraction of negatives scored below it (ties 1/2)
    v10 = 1.0 - (tz[:, m:] - ty) / m  # per negative: fraction of positives scored above it
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return auc, cov


def delong_ci(scores: ArrayLike, labels: ArrayLike, alpha: float = 0.05) -> DeLongCI:
    """AUC with its DeLong standard error and normal (1 - alpha) interval, clipped to [0, 1]."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise DataError(f"scores must have shape (N,), got {s.shape}")
    auc, cov = delong_covariance(s[None, :], labels)
    se = float(np.sqrt(max(cov[0, 0], 0.0)))
    half = stats.norm.ppf(1 - alpha / 2) * se
    a = float(auc[0])
    return DeLongCI(a, max(0.0, a - half), min(1.0, a + half), se)


def delong_test(scores_a: ArrayLike, scores_b: ArrayLike, labels: ArrayLike) -> DeLongTest:
    """Two-sided DeLong test of AUC(a) == AUC(b) for two models scored on the same cases.

    When the difference has zero variance (e.g. identical or rank-equivalent scores) the AUCs are equal and the
    test returns z = 0, p = 1.
    """
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise DataError(f"scores_a and scores_b must be two (N,) vectors, got {a.shape} and {b.shape}")
    auc, cov = delong_covariance(np.stack([a, b]), labels)
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    # Rank-equivalent scores give a zero difference and a variance that is zero up to rounding.
    scale = max(float(cov[0, 0] + cov[1, 1]), np.finfo(float).tiny)
    if var <= 1e-12 * scale:
        if abs(diff) <= 1e-12:
            return DeLongTest(float(auc[0]), float(auc[1]), 0.0, 1.0)
        z = float(np.copysign(np.inf, diff))
        return DeLongTest(float(auc[0]), float(auc[1]), z, 0.0)
    z = diff / np.sqrt(var)
    p = float(2 * stats.norm.sf(abs(z)))
    return DeLongTest(float(auc[0]), float(auc[1]), float(z), p)
