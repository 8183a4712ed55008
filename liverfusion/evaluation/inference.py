"""Running a model or a fold ensemble over a loader: on the device asked for, optionally averaging flipped copies
(test-time augmentation), always averaging members in probability space (the log-probabilities follow as the log
of that mean, so a temperature applied later cannot change the ensemble's arg-max)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from liverfusion.errors import ConfigError
from liverfusion.evaluation.loading import LoadedClassifier, check_ensemble
from liverfusion.evaluation.predictions import PredictionSet, batch_predictions

log = logging.getLogger(__name__)

TTA_MODES = ("none", "flip")
SPATIAL_AXES = {"D": 0, "H": 1, "W": 2}


def resolve_device(device: Any) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; otherwise any torch device name that exists here."""
    name = str(device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"device={device!r}: not a device name", fix="use auto, cpu, cuda or cuda:<index>"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r}: no CUDA GPU is visible here", fix="use device=auto or device=cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r}: only {torch.cuda.device_count()} GPU(s) visible", fix="use device=cuda:0"
        )
    return dev


def flip_views(tta: str, axes: Sequence[str] = ("H", "W")) -> list[tuple[int, ...]]:
    """The flips of one test-time augmentation as tensor dims of an (N, M, D, H, W) batch: the identity first,
    then each named spatial axis flipped on its own."""
    if tta not in TTA_MODES:
        raise ConfigError(f"tta={tta!r}: choose one of {TTA_MODES}")
    views: list[tuple[int, ...]] = [()]
    if tta == "flip":
        for a in axes:
            key = str(a).upper()
            if key not in SPATIAL_AXES:
                raise ConfigError(f"tta_axes: unknown axis {a!r}", fix="use D, H and/or W")
            views.append((2 + SPATIAL_AXES[key],))
    return views


def mean_log_probs(parts: Sequence[np.ndarray]) -> np.ndarray:
    """log of the mean of the members' probabilities, computed stably from their log-probabilities."""
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in parts])
    top = stack.max(axis=0)
    return top + np.log(np.exp(stack - top).mean(axis=0))


@torch.no_grad()
def predict(
    models: Sequence[LoadedClassifier],
    loader: Any,
    robustness: bool = True,
    device: Any = "cpu",
    tta: str = "none",
    tta_axes: Sequence[str] = ("H", "W"),
) -> PredictionSet:
    """Mean probabilities of the models (one model = itself) and of the flipped views over a loader; features of
    the first model on the unflipped view."""
    meta = check_ensemble(models)
    dev = resolve_device(device)
    views = flip_views(tta, tta_axes)
    records: list[dict[str, Any]] = []
    for m in models:
        m.net.to(dev).eval()
    for batch in loader:
        image, present = batch["image"].to(dev), batch["present"].to(dev)
        recs = []
        for m in models:
            for dims in views:
                view = {**batch, "image": image.flip(dims) if dims else image, "present": present}
                recs.append(batch_predictions(m.net, view, robustness=robustness))
        rec = recs[0]
        if len(recs) > 1:
            rec["probs"] = np.mean([r["probs"] for r in recs], axis=0)
            rec["log_probs"] = mean_log_probs([r["log_probs"] for r in recs])
            for mod in rec["dropped"]:
                rec["dropped"][mod] = np.mean([r["dropped"][mod] for r in recs], axis=0)
        records.append(rec)
    return PredictionSet.from_records(records, meta["class_names"], meta["modalities"])
