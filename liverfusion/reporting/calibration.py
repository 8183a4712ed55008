"""The temperature stored with an arm's models and what it does to the arm's pooled test predictions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from liverfusion.errors import CheckpointError
from liverfusion.evaluation import PredictionSet
from liverfusion.reporting.runs import Arm, file_slug

log = logging.getLogger(__name__)


def arm_calibration(arm: Arm, preds: PredictionSet, out: Path | None) -> dict[str, Any] | None:
    """The temperature stored with the arm's models (``evaluate calibrate=true``: ``calibration.json`` in the
    multirun or run folder, fitted for exactly these checkpoints) and what it does to the pooled test predictions:
    ECE, MCE, Brier and NLL before / after, and a reliability diagram (``reliability_<arm>.png``) when ``out``."""
    import os

    from liverfusion.evaluation.calibration import (
        calibration_scores,
        plot_reliability,
        stored_calibration,
    )
    from liverfusion.evaluation.loading import best_in_run

    try:
        members = [best_in_run(r.path) for r in arm.runs]
    except CheckpointError:
        return None
    if not members or any(m is None for m in members):
        return None
    paths = [r.path for r in arm.runs]
    root = paths[0] if len(paths) == 1 else Path(os.path.commonpath([str(p) for p in paths]))
    try:
        stored = stored_calibration(root, members)  # type: ignore[arg-type]
    except CheckpointError as err:
        log.warning("%s: calibration not shown: %s", arm.name, err)
        return None
    if stored is None:
        return None
    temperature = float(stored["temperature"])
    labelled = preds.subset(preds.labelled)
    if not labelled.case_ids:
        return None
    calibrated = labelled.with_temperature(temperature)
    result: dict[str, Any] = {
        "temperature": temperature,
        "file": stored.get("path"),
        "fitted_on": stored.get("fitted_on"),
        "n_fitted": stored.get("n_cases"),
        "before": calibration_scores(labelled),
        "after": calibration_scores(calibrated),
    }
    if out is not None:
        name = f"reliability_{file_slug(arm.name)}.png"
        plot_reliability(
            {"uncalibrated": labelled, f"calibrated (T = {temperature:.3f})": calibrated},
            out / name,
            title="Reliability",
        )
        result["figure"] = name
    return result
