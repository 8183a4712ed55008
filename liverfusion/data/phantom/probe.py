"""The fusion probe: two simple features per phase measured from a written phantom's files, and how well a
linear model names the class from all phases together, from each phase alone, and from lesion size alone.

It reads what training reads (the NIfTI files) plus the sidecar masks, so it measures the data set as written,
not the spec: the gap between all phases and the best single phase is how much the phantom needs fusion.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from liverfusion.data.io import load_volume
from liverfusion.data.phantom.generate import pool_map, read_marker
from liverfusion.errors import DataError


@dataclass
class PhantomFeatures:
    """Per-case probe features of the labelled cases of a written phantom."""

    cases: list[str]
    patients: list[str]
    labels: np.ndarray
    phases: list[str]
    features: np.ndarray  # (n_cases, n_phases, 2): contrast, rim-minus-core
    lesion_voxels: np.ndarray  # (n_cases,)


def measure_lesion_features(
    image: np.ndarray, mask: np.ndarray, core_erosion_vox: int = 2, ring_vox: Sequence[int] = (2, 6)
) -> tuple[float, float]:
    """(lesion-to-liver contrast, rim-minus-core contrast), both divided by the liver signal.

    core = mask eroded in-plane ``core_erosion_vox`` times, rim = mask - core (core = whole mask when erosion empties
    it), liver = median of the in-plane ring between dilations ``ring_vox[0]`` and ``ring_vox[1]`` of the mask.
    """
    m = np.asarray(mask) > 0
    if not m.any():
        raise DataError("lesion mask is empty")
    st = np.zeros((3, 3, 3), dtype=bool)
    st[1] = ndimage.generate_binary_structure(2, 1)
    core = ndimage.binary_erosion(m, st, iterations=int(core_erosion_vox)) if core_erosion_vox > 0 else m
    if not core.any():
        core = m
    rim = m & ~core
    if not rim.any():
        rim = m
    inner = ndimage.binary_dilation(m, st, iterations=int(ring_vox[0]))
    outer = ndimage.binary_dilation(m, st, iterations=int(ring_vox[1]))
    ring = outer & ~inner
    if not ring.any():
        raise DataError("no liver ring around the lesion mask")
    img = np.asarray(image, dtype=np.float64)
    liver = float(np.median(img[ring]))
    if liver <= 0:
        raise DataError("liver ring has no signal")
    return (float(img[m].mean()) - liver) / liver, (float(img[rim].mean()) - float(img[core].mean())) / liver


def read_phantom_features(root: str | Path, workers: int = 1, progress: bool = False) -> PhantomFeatures:
    """Measure the probe features of every labelled case from the written NIfTI files and masks."""
    root = Path(root)
    info = _phantom_info(root)
    probe = info["spec"]["probe"]
    phases = list(info["phases"])
    with open(root / "cases.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["label"]) >= 0]
    args = [
        (str(root), r["case"], phases, int(probe["core_erosion_vox"]), list(probe["ring_vox"])) for r in rows
    ]
    out = pool_map(_measure_case, args, workers, progress, "features")
    return PhantomFeatures(
        cases=[r["case"] for r in rows],
        patients=[r["patient"] for r in rows],
        labels=np.array([int(r["label"]) for r in rows]),
        phases=phases,
        features=np.stack([o[0] for o in out]) if out else np.zeros((0, len(phases), 2)),
        lesion_voxels=np.array([o[1] for o in out]),
    )


def fusion_probe(root: str | Path, workers: int = 1, feats: PhantomFeatures | None = None) -> dict:
    """Patient-grouped cross-validated macro-F1 of a standardised logistic regression on the probe features:
    all phases together, each phase alone, and lesion size alone. Shows how much the phantom needs fusion."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = Path(root)
    probe = _phantom_info(root)["spec"]["probe"]
    feats = feats or read_phantom_features(root, workers=workers)
    y, groups = feats.labels, np.array(feats.patients)
    cv = StratifiedGroupKFold(n_splits=int(probe["folds"]), shuffle=True, random_state=0)

    def score(x: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=float(probe["C"]), max_iter=5000))
        with warnings.catch_warnings():  # tiny sets: sklearn warns once per call about sparse classes
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            pred = cross_val_predict(model, x, y, groups=groups, cv=cv)
        return float(f1_score(y, pred, average="macro"))

    n = len(y)
    per_phase = {p: score(feats.features[:, j, :]) for j, p in enumerate(feats.phases)}
    best = max(per_phase, key=per_phase.get)
    size = np.log(feats.lesion_voxels.reshape(n, 1).astype(float))
    return {
        "n_cases": n,
        "smallest_class": int(np.bincount(y).min()) if n else 0,  # below ~60 the figures are noisy
        "all_phases": score(feats.features.reshape(n, -1)),
        "per_phase": per_phase,
        "best_single_phase": best,
        "best_single_phase_f1": per_phase[best],
        "size_only": score(size),
        "best_phase_plus_size": score(
            np.concatenate([feats.features[:, feats.phases.index(best), :], size], 1)
        ),
    }


def _phantom_info(root: Path) -> dict:
    info = read_marker(root)
    if info is None:
        raise DataError("not a liverfusion phantom (phantom.json missing or foreign)", path=root)
    return info


def _measure_case(args: tuple[str, str, list[str], int, list[int]]) -> tuple[np.ndarray, int]:
    """(features (n_phases, 2), largest lesion mask in voxels) of one case (in a worker)."""
    root, case, phases, erosion, ring = args
    feats = np.zeros((len(phases), 2))
    size = 0
    for j, phase in enumerate(phases):
        img = load_volume(Path(root) / "images" / case / f"{phase}.nii.gz").array
        mask = load_volume(Path(root) / "masks" / case / f"{phase}.nii.gz", check=False).array
        try:
            feats[j] = measure_lesion_features(img, mask, erosion, ring)
        except DataError as exc:
            raise DataError(
                exc.reason, path=Path(root) / "masks" / case / f"{phase}.nii.gz", case=case
            ) from None
        size = max(size, int((mask > 0).sum()))
    return feats, size
