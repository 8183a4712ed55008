"""Classification metrics for lesion diagnosis, built on torchmetrics.

Two entry points:

* :func:`classification_metrics` -- the full report on a finished prediction set (probabilities + labels): accuracy,
  balanced accuracy, macro-F1, Cohen's kappa, the LLD-MMRI challenge score (macro-F1 + kappa) / 2, macro AUROC
  (one-vs-rest), per-class AUROC / sensitivity / specificity and the expected calibration error.
  Metrics that are undefined on the given cases (e.g. AUROC of a class absent from the labels) are reported as NaN
  with an :class:`UndefinedMetricWarning` and left out of macro averages, instead of torchmetrics' silent 0.
* :func:`make_metric_collection` -- a :class:`torchmetrics.MetricCollection` for a LightningModule's validation /
  test loop, so that accumulation and DDP synchronisation are done by torchmetrics.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchmetrics.functional.classification as tmf
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassCohenKappa,
    MulticlassF1Score,
    MulticlassStatScores,
)
from torchmetrics.utilities.data import dim_zero_cat

from liverfusion.errors import DataError

# Probabilities are checked against these tolerances: rows of a softmax output sum to 1 up to float error.
_PROB_RANGE_TOL = 1e-6
_ROW_SUM_TOL = 1e-3

ArrayLike = Tensor | np.ndarray | Sequence


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined on the given cases (e.g. a class absent from the labels) and was reported as NaN."""


def _to_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} cannot be converted to a tensor: {exc}") from exc


def validate_probs_labels(
    probs: ArrayLike, labels: ArrayLike, num_classes: int | None = None
) -> tuple[Tensor, Tensor]:
    """Check and convert a prediction set: probs (N, K) float64 rows on the simplex, labels (N,) int64 in [0, K).

    Raises :class:`DataError` with the reason for an empty set, mismatched shapes, logits instead of
    probabilities, NaNs, or labels outside the class range (e.g. the -1 'unlabelled' code of LLD-MMRI).
    """
    p = _to_tensor(probs, "probs")
    y = _to_tensor(labels, "labels")
    if p.ndim != 2:
        raise DataError(f"probs must have shape (N, K), got shape {tuple(p.shape)}")
    if y.ndim != 1:
        raise DataError(f"labels must have shape (N,), got shape {tuple(y.shape)}")
    if p.shape[0] != y.shape[0]:
        raise DataError(f"probs has {p.shape[0]} rows but labels has {y.shape[0]} entries")
    if p.shape[0] == 0:
        raise DataError("no cases: probs and labels are empty, metrics are undefined")
    k = p.shape[1]
    if num_classes is not None and k != num_classes:
        raise DataError(f"probs has {k} columns but there are {num_classes} classes")
    if k < 2:
        raise DataError(f"need at least 2 classes (probability columns), got {k}")
    if not p.is_floating_point():
        raise DataError(f"probs must be floating point probabilities, got dtype {p.dtype}")
    p = p.to(torch.float64)
    if not torch.isfinite(p).all():
        raise DataError(f"probs contain {int((~torch.isfinite(p)).sum())} NaN/inf values")
    if (p < -_PROB_RANGE_TOL).any() or (p > 1 + _PROB_RANGE_TOL).any():
        raise DataError(
            f"probs must be probabilities in [0, 1] (apply softmax to logits first); got range "
            f"[{p.min().item():.4g}, {p.max().item():.4g}]"
        )
    row_sums = p.sum(dim=1)
    worst = (row_sums - 1).abs().max().item()
    if worst > _ROW_SUM_TOL:
        raise DataError(
            f"rows of probs must sum to 1 (softmax output); the worst row sums to "
            f"{row_sums[(row_sums - 1).abs().argmax()].item():.4g}"
        )
    p = p.clamp(0.0, 1.0)
    if y.is_floating_point():
        if not torch.isfinite(y).all() or (y != y.round()).any():
            raise DataError("labels must be integer class indices")
    elif y.dtype == torch.bool:
        raise DataError("labels must be integer class indices, got booleans")
    y = y.to(torch.int64)
    bad = (y < 0) | (y >= k)
    if bad.any():
        values = sorted({int(v) for v in y[bad].tolist()})
        raise DataError(
            f"labels must lie in [0, {k - 1}]; found {values[:10]} in {int(bad.sum())} cases "
            "(drop unlabelled cases, e.g. label -1, before computing metrics)"
        )
    return p, y


def _check_names(class_names: Sequence[str], k: int) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise DataError(f"{len(names)} class names given for {k} probability columns")
    if len(set(names)) != len(names):
        raise DataError(f"class names must be unique, got {names}")
    return names


def confusion_matrix(
    probs: ArrayLike, labels: ArrayLike, num_classes: int | None = None, normalize: str | None = None
) -> np.ndarray:
    """Confusion matrix (rows = true class, columns = predicted arg-max class).

    ``normalize``: None (counts), "true" (rows sum to 1: per-class recall on the diagonal), "pred" (columns sum to
    1) or "all". Rows/columns without cases are 0 after normalisation (torchmetrics' convention).
    """
    if normalize not in (None, "true", "pred", "all"):
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', got {normalize!r}")
    p, y = validate_probs_labels(probs, labels, num_classes)
    cm = tmf.multiclass_confusion_matrix(p, y, num_classes=p.shape[1], normalize=normalize or "none")
    return cm.numpy()


def classification_metrics(
    probs: ArrayLike,
    labels: ArrayLike,
    class_names: Sequence[str],
    threshold: float = 0.5,
    n_bins: int = 15,
) -> dict[str, float]:
    """All reported metrics of one prediction set; keys are stable names usable as logger keys.

    Multiclass (arg-max) keys: ``accuracy``, ``balanced_accuracy`` (mean recall over classes present in the labels,
    as sklearn), ``macro_f1``, ``kappa`` (Cohen, unweighted), ``lld_score`` = (macro_f1 + kappa) / 2 (LLD-MMRI
    official), ``auroc`` (macro one-vs-rest over classes with both positives and negatives), ``ece`` (top-label,
    ``n_bins`` equal-width bins, L1), and per class ``auroc/<c>``, ``sensitivity/<c>``, ``specificity/<c>``.
    Binary tasks (K == 2, positive class = column 1) add ``binary/auroc`` and ``binary/sensitivity``,
    ``binary/specificity`` at ``p1 > threshold``.
    Undefined values are NaN (with an :class:`UndefinedMetricWarning`), never a silent 0 or 0.5.
    """
    p, y = validate_probs_labels(probs, labels)
    k = p.shape[1]
    names = _check_names(class_names, k)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")

    support = torch.bincount(y, minlength=k)
    n = y.shape[0]
    present = support > 0  # class has positives: sensitivity and recall defined
    has_negatives = support < n  # class has negatives: specificity defined
    auroc_defined = present & has_negatives
    undefined: list[str] = []

    out: dict[str, float] = {}
    out["accuracy"] = tmf.multiclass_accuracy(p, y, num_classes=k, average="micro").item()
    recall = tmf.multiclass_recall(p, y, num_classes=k, average=None).to(torch.float64)
    # torchmetrics' macro recall counts a class that is predicted but absent from the labels as 0; balanced
    # accuracy is defined over the true classes only.
    out["balanced_accuracy"] = recall[present].mean().item()
    out["macro_f1"] = tmf.multiclass_f1_score(p, y, num_classes=k, average="macro").item()
    kappa = tmf.multiclass_cohen_kappa(p, y, num_classes=k).item()
    if not np.isfinite(kappa):
        undefined.append("kappa (labels and predictions are all one class)")
        kappa = float("nan")
    out["kappa"] = kappa
    out["lld_score"] = (out["macro_f1"] + kappa) / 2

    with warnings.catch_warnings():
        # torchmetrics warns and returns 0 for a class without positives; those classes are masked below.
        warnings.filterwarnings("ignore", message=".*samples in targets.*")
        auroc_per_class = tmf.multiclass_auroc(p, y, num_classes=k, average=None).to(torch.float64)
    auroc_per_class[~auroc_defined] = float("nan")
    if auroc_defined.any():
        out["auroc"] = auroc_per_class[auroc_defined].mean().item()
    else:
        out["auroc"] = float("nan")
    missing = [names[i] for i in range(k) if not auroc_defined[i]]
    if missing:
        undefined.append(
            f"AUROC of {missing} (class absent from labels or the only class); macro AUROC averages the "
            f"{int(auroc_defined.sum())} defined classes"
        )

    specificity = tmf.multiclass_specificity(p, y, num_classes=k, average=None).to(torch.float64)
    recall[~present] = float("nan")
    specificity[~has_negatives] = float("nan")
    if (~present).any():
        undefined.append(f"sensitivity of {[names[i] for i in range(k) if not present[i]]} (no positives)")
    if (~has_negatives).any():
        undefined.append(
            f"specificity of {[names[i] for i in range(k) if not has_negatives[i]]} (no negatives)"
        )
    for i, c in enumerate(names):
        out[f"auroc/{c}"] = auroc_per_class[i].item()
        out[f"sensitivity/{c}"] = recall[i].item()
        out[f"specificity/{c}"] = specificity[i].item()

    out["ece"] = tmf.multiclass_calibration_error(p, y, num_classes=k, n_bins=n_bins, norm="l1").item()

    if k == 2:
        pos_prob = p[:, 1]
        out["binary/auroc"] = out[f"auroc/{names[1]}"]
        sens = tmf.binary_recall(pos_prob, y, threshold=threshold).item()
        spec = tmf.binary_specificity(pos_prob, y, threshold=threshold).item()
        out["binary/sensitivity"] = sens if present[1] else float("nan")
        out["binary/specificity"] = spec if present[0] else float("nan")

    if undefined:
        warnings.warn(
            "undefined metrics reported as NaN: " + "; ".join(undefined), UndefinedMetricWarning, stacklevel=2
        )
    return out


class MulticlassBalancedAccuracy(MulticlassStatScores):
    """Mean recall over the classes present in the targets (sklearn's balanced accuracy), DDP-synced.

    torchmetrics' macro recall also averages in classes that are only predicted (as 0), which differs from the
    usual definition on small validation sets.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, average=None, **kwargs)

    def compute(self) -> Tensor:  # type: ignore[override]
        tp, _fp, _tn, fn = self._final_state()
        support = tp + fn
        present = support > 0
        if not present.any():
            return torch.tensor(float("nan"), device=tp.device)
        return (tp[present].float() / support[present].float()).mean()


class MulticlassDefinedAUROC(MulticlassAUROC):
    """Macro one-vs-rest AUROC over the classes that have positives and negatives in the accumulated targets.

    torchmetrics counts an absent class as AUROC 0, which pulls the macro value down whenever a small validation
    split lacks a class; here such classes are left out of the mean.
    """

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, average=None, thresholds=None, **kwargs)

    def compute(self) -> Tensor:  # type: ignore[override]
        preds = dim_zero_cat(self.preds)
        target = dim_zero_cat(self.target)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*samples in targets.*")
            per_class = super().compute()
        counts = torch.bincount(target.long().flatten(), minlength=self.num_classes)[: self.num_classes]
        defined = (counts > 0) & (counts < target.numel())
        if preds.numel() == 0 or not defined.any():
            return torch.tensor(float("nan"), device=per_class.device)
        return per_class[defined].mean()


def make_metric_collection(num_classes: int, prefix: str = "val/", n_bins: int = 15) -> MetricCollection:
    """Metrics for a LightningModule loop: update with (softmax probabilities (N, K), labels (N,)), log the collection.

    Pass probabilities: torchmetrics softmaxes logits only when some value lies outside [0, 1].

    Keys (after ``prefix``): accuracy, balanced_accuracy, macro_f1, kappa, lld_score, auroc, ece. Accumulation and
    DDP reduction are torchmetrics'; call ``.clone(prefix="test/")`` for another stage.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    f1 = MulticlassF1Score(num_classes=num_classes, average="macro")
    kappa = MulticlassCohenKappa(num_classes=num_classes)
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "balanced_accuracy": MulticlassBalancedAccuracy(num_classes=num_classes),
            "macro_f1": f1,
            "kappa": kappa,
            # CompositionalMetric: keeps its own copies of the two operands, synced like any metric.
            "lld_score": (
                MulticlassF1Score(num_classes=num_classes, average="macro")
                + MulticlassCohenKappa(num_classes)
            )
            / 2,
            "auroc": MulticlassDefinedAUROC(num_classes=num_classes),
            "ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=n_bins, norm="l1"),
        },
        prefix=prefix,
    )
