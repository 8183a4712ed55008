"""The evaluation library behind ``evaluate``, ``predict``, ``calibrate``, the classifier's test step and ``report``.

One concept per module:

- :mod:`~liverfusion.evaluation.predictions`: :class:`PredictionSet` and the per-batch inference that fills it;
- :mod:`~liverfusion.evaluation.scoring`: metrics with patient-level CIs, robustness, aggregation, comparison;
- :mod:`~liverfusion.evaluation.writing`: ``predictions.csv`` (and its reader), submission, metrics files;
- :mod:`~liverfusion.evaluation.loading`: classifier checkpoints, run / multirun folders, ensembles;
- :mod:`~liverfusion.evaluation.inference`: a model or ensemble over a loader (device, flip TTA);
- :mod:`~liverfusion.evaluation.calibration`: temperature scaling, calibration and selective-prediction scores;
- :mod:`~liverfusion.evaluation.inputs` / :mod:`~liverfusion.evaluation.dicom_input`: ``predict``'s input (case
  folders, an LLD-MMRI release, a DICOM tree converted by ``prepare``);
- :mod:`~liverfusion.evaluation.explain`: Grad-CAM maps on the input grid, occlusion, the lesion-mass check.

Nothing here is an entry point, so ``liverfusion.modules`` may import it without importing a CLI.
"""

from liverfusion.evaluation.inference import predict, resolve_device
from liverfusion.evaluation.loading import (
    LoadedClassifier,
    best_in_run,
    check_ensemble,
    find_checkpoints,
    load_classifier,
    load_ensemble,
)
from liverfusion.evaluation.predictions import PredictionSet, batch_predictions, normalised
from liverfusion.evaluation.scoring import (
    HEADLINE_METRICS,
    ROBUSTNESS_METRICS,
    aggregate_by_patient,
    compare_predictions,
    lldmmri_style,
    metrics_with_ci,
    robustness_table,
    shown_metrics,
)
from liverfusion.evaluation.writing import (
    metrics_markdown,
    predictions_csv,
    read_predictions_csv,
    rows_csv,
    submission_json,
    table_markdown,
    write_evaluation,
    write_json,
)

__all__ = [
    "HEADLINE_METRICS",
    "ROBUSTNESS_METRICS",
    "LoadedClassifier",
    "PredictionSet",
    "aggregate_by_patient",
    "batch_predictions",
    "best_in_run",
    "check_ensemble",
    "compare_predictions",
    "find_checkpoints",
    "lldmmri_style",
    "load_classifier",
    "load_ensemble",
    "metrics_markdown",
    "metrics_with_ci",
    "normalised",
    "predict",
    "predictions_csv",
    "read_predictions_csv",
    "resolve_device",
    "robustness_table",
    "rows_csv",
    "shown_metrics",
    "submission_json",
    "table_markdown",
    "write_evaluation",
    "write_json",
]
