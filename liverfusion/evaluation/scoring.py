"""Scores of a prediction set: every metric with a patient-level bootstrap CI, the robustness table (each modality
dropped in turn), per-patient aggregation and the paired comparison of two models."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from liverfusion.errors import ConfigError, DataError
from liverfusion.evaluation.predictions import PredictionSet, normalised
from liverfusion.metrics import (
    UndefinedMetricWarning,
    bootstrap_ci,
    classification_metrics,
    delong_ci,
    delong_test,
    paired_bootstrap,
)

log = logging.getLogger(__name__)

ROBUSTNESS_METRICS = ("macro_f1", "balanced_accuracy", "auroc", "lld_score")
HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "kappa", "lld_score", "auroc", "ece")
LLD_MMRI_CLASSES = ("hemangioma", "ICC", "abscess", "metastasis", "cyst", "FNH", "HCC")


def lldmmri_style(class_names: Sequence[str]) -> bool:
    """Data with the LLD-MMRI classes (the release or the phantom that mimics it): where ``lld_score``, the
    challenge's (macro-F1 + kappa) / 2, means something. Other data sets are not scored by it in what a person
    reads (it stays in the JSON files)."""
    return set(map(str, class_names)) == set(LLD_MMRI_CLASSES)


def shown_metrics(keys: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """The metric keys of a table a person reads, in their order: ``lld_score`` only for LLD-MMRI-style data; for a
    binary task one AUROC (``auroc``: ``binary/auroc`` and the per-class ``auroc/<c>`` are the same number, the
    DeLong CI is given beside it) and one sensitivity / specificity (``binary/*``, the positive class's)."""
    k = len(class_names)
    drop: set[str] = set()
    if not lldmmri_style(class_names):
        drop |= {"lld_score", "delta_lld_score"}
    if k == 2:
        drop |= {"binary/auroc", "binary/auroc_delong"}
        drop |= {f"{m}/{c}" for c in class_names for m in ("auroc", "sensitivity", "specificity")}
    return [key for key in keys if key not in drop]


def metrics_with_ci(
    preds: PredictionSet,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, dict[str, float]]:
    """Every metric of ``classification_metrics`` with a percentile bootstrap CI resampling whole patients.

    Binary tasks also get the DeLong CI of the AUROC (``binary/auroc_delong``).
    """
    sub = preds.subset(preds.labelled)
    if not sub.case_ids:
        raise DataError("no labelled cases: metrics need labels")
    probs = normalised(sub.probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        cis = bootstrap_ci(
            probs,
            sub.labels,
            n_boot=n_boot,
            alpha=alpha,
            seed=seed,
            groups=np.asarray(sub.patient_ids),
            class_names=sub.class_names,
            threshold=threshold,
        )
    out = {k: {"point": v.point, "low": v.low, "high": v.high} for k, v in cis.items()}
    if len(sub.class_names) == 2:
        try:
            d = delong_ci(probs[:, 1], sub.labels, alpha=alpha)
            out["binary/auroc_delong"] = {"point": d.auc, "low": d.low, "high": d.high}
        except DataError as err:  # too few positives or negatives
            log.warning("DeLong CI not computed: %s", err)
    out["n_cases"] = {"point": float(len(sub.case_ids)), "low": float("nan"), "high": float("nan")}
    out["n_patients"] = {"point": float(len(set(sub.patient_ids))), "low": float("nan"), "high": float("nan")}
    return out


def robustness_table(
    preds: PredictionSet, metrics: Sequence[str] = ROBUSTNESS_METRICS, threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One row per dropped modality (plus ``none``): metrics without it and the loss against all present."""
    sub = preds.subset(preds.labelled)
    if not sub.case_ids or not sub.dropped:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        base = classification_metrics(normalised(sub.probs), sub.labels, sub.class_names, threshold=threshold)
        first: dict[str, Any] = {"dropped": "none", "cases_affected": 0}
        for m in metrics:
            first[m] = base[m]
            first[f"delta_{m}"] = 0.0
        rows = [first]
        for i, modality in enumerate(sub.modalities):
            if modality not in sub.dropped:
                continue
            vals = classification_metrics(
                normalised(sub.dropped[modality]), sub.labels, sub.class_names, threshold=threshold
            )
            affected = int(sub.present[:, i].sum()) if sub.present is not None else len(sub.case_ids)
            row: dict[str, Any] = {"dropped": modality, "cases_affected": affected}
            for m in metrics:
                row[m] = vals[m]
                row[f"delta_{m}"] = vals[m] - base[m]
            rows.append(row)
    return rows


def aggregate_by_patient(preds: PredictionSet, how: str = "mean") -> tuple[PredictionSet, int]:
    """Per-patient predictions: mean (or max, renormalised) of the lesion probabilities.

    A patient's label is its most frequent lesion label (ties -> lowest class), as in the patient-level splits.
    Returns the set and the number of patients whose lesions disagree (their patient label is a simplification).
    """
    if how not in ("mean", "max"):
        raise ConfigError(f"aggregate={how!r}: choose mean or max (or null for per-lesion only)")
    order: dict[str, list[int]] = {}
    for i, p in enumerate(preds.patient_ids):
        order.setdefault(p, []).append(i)
    probs, labels, disagree = [], [], 0
    for idx in order.values():
        block = preds.probs[idx]
        agg = block.mean(axis=0) if how == "mean" else block.max(axis=0)
        probs.append(agg / agg.sum())
        known = [int(v) for v in preds.labels[idx] if v >= 0]
        if len(set(known)) > 1:
            disagree += 1
        labels.append(min(Counter(known).most_common(), key=lambda kv: (-kv[1], kv[0]))[0] if known else -1)
    patients = list(order)
    return (
        PredictionSet(
            case_ids=patients,
            patient_ids=patients,
            probs=np.asarray(probs),
            labels=np.asarray(labels, dtype=np.int64),
            class_names=preds.class_names,
            modalities=preds.modalities,
        ),
        disagree,
    )


def compare_predictions(
    a: PredictionSet,
    b: PredictionSet,
    metric: str = "lld_score",
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Paired comparison of two models on their common labelled cases (patient-level paired bootstrap; DeLong
    for the AUROC of binary tasks)."""
    if a.class_names != b.class_names:
        raise DataError(f"cannot compare models with different classes: {a.class_names} vs {b.class_names}")
    index_b = {c: i for i, c in enumerate(b.case_ids)}
    common = [i for i, c in enumerate(a.case_ids) if c in index_b and a.labels[i] >= 0]
    if len(common) < 2:
        raise DataError(f"only {len(common)} labelled cases in common: nothing to compare")
    ib = [index_b[a.case_ids[i]] for i in common]
    pa, pb = normalised(a.probs[common]), normalised(b.probs[ib])
    y = a.labels[common]
    groups = np.asarray([a.patient_ids[i] for i in common])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        out: dict[str, Any] = {
            "n_cases": len(common),
            "metric": metric,
            **paired_bootstrap(
                pa,
                pb,
                y,
                metric=metric,
                n_boot=n_boot,
                seed=seed,
                groups=groups,
                class_names=a.class_names,
                threshold=threshold,
            ),
        }
    if len(a.class_names) == 2:
        try:
            t = delong_test(pa[:, 1], pb[:, 1], y)
            out["delong"] = {"auc_a": t.auc_a, "auc_b": t.auc_b, "z": t.z, "p_value": t.p_value}
        except DataError as err:
            out["delong"] = {"error": str(err)}
    return out
