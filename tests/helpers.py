"""Tiny on-disk data sets for tests (written with the package's own writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from liverfusion.data.io import save_volume

PHASES = ["T2WI", "DWI", "C+A"]


def write_lld_like(
    root: Path,
    n_patients: int = 12,
    n_classes: int = 3,
    phases=PHASES,
    shape=(6, 16, 16),
    second_lesion_every: int = 4,
    seed: int = 0,
) -> Path:
    """An LLD-MMRI-layout data set whose class shows as a bright blob in one phase per class."""
    rng = np.random.default_rng(seed)
    lines = []
    for p in range(n_patients):
        label = p % n_classes
        lesions = [f"P{p:04d}"] + ([f"P{p:04d}_1"] if p % second_lesion_every == 0 else [])
        for case in lesions:
            for i, ph in enumerate(phases):
                a = rng.normal(100, 10, size=shape).astype(np.float32)
                if i == label % len(phases):
                    a[:, 4:10, 4:10] += 80
                save_volume(
                    root / "images" / case / f"{ph}.nii.gz", a, spacing=(3.0, 1.0, 1.0), dtype=np.int16
                )
            lines.append(f"{case} {label}")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return root
