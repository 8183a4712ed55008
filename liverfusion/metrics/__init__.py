"""Evaluation metrics (torchmetrics-based), bootstrap confidence intervals and DeLong's AUC test."""

from liverfusion.metrics.bootstrap import ConfidenceInterval, bootstrap_ci, paired_bootstrap, weighted_metrics
from liverfusion.metrics.classification import (
    MulticlassBalancedAccuracy,
    MulticlassDefinedAUROC,
    UndefinedMetricWarning,
    classification_metrics,
    confusion_matrix,
    make_metric_collection,
    validate_probs_labels,
)
from liverfusion.metrics.delong import DeLongCI, DeLongTest, delong_ci, delong_covariance, delong_test

__all__ = [
    "ConfidenceInterval",
    "DeLongCI",
    "DeLongTest",
    "MulticlassBalancedAccuracy",
    "MulticlassDefinedAUROC",
    "UndefinedMetricWarning",
    "bootstrap_ci",
    "classification_metrics",
    "confusion_matrix",
    "delong_ci",
    "delong_covariance",
    "delong_test",
    "make_metric_collection",
    "paired_bootstrap",
    "validate_probs_labels",
    "weighted_metrics",
]
