"""Plain helpers shared by test files (fixtures are in conftest.py): tiny on-disk data sets written with the
package's own writer, the Hydra overrides that point a run at the session's tiny phantom, the shared real data, a
data module built from the YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from liverfusion.data.io import save_volume

PHASES = ["T2WI", "DWI", "C+A"]
TINY_ENCODER = {
    "name": "resnet3d",
    "arch": "resnet10",
    "widths": [4, 8, 8, 8],
    "stem_kernel": 3,
    "pool_stride": [1, 2, 2],
    "stage_strides": [1, 2, 2, 1],
}
"""A ResNet-10 of widths 4-8-8-8 that keeps a spatial map for 6x16x16 to 8x16x16 inputs: the tests' encoder."""
TINY_PHANTOM = {"n_cases": 48, "seed": 11, "shape": [16, 32, 32]}
"""The request of conftest's session-wide ``tiny_phantom`` fixture."""


def tiny_phantom_overrides(root: Path, cache: Path) -> list[str]:
    """Hydra overrides that point data=phantom at the session's tiny phantom (``root``, the fixture's folder)."""
    return [
        f"paths.data_dir={root.parent}",
        f"paths.cache_dir={cache}",
        f"data.layout.n_cases={TINY_PHANTOM['n_cases']}",
        f"data.layout.seed={TINY_PHANTOM['seed']}",
        f"data.layout.shape=[{','.join(str(s) for s in TINY_PHANTOM['shape'])}]",
        "data.preprocess.shape=[16,32,32]",
        "data.num_workers=0",
        "data.prep_workers=0",
        "data.batch_size=4",
        "extras.print_config=false",
    ]


def data_module(cls: type, layout: Any, **kw: Any) -> Any:
    """``cls`` (a data module class) on ``layout`` with conf/data/_base.yaml's values (the code has none) and ``kw``
    merged per section. Loading and preprocessing run in the test's process (``num_workers``/``prep_workers`` 0)
    and evaluation batches are the training batch size, unless ``kw`` says otherwise."""
    args = {"num_workers": 0, "prep_workers": 0, "eval_batch_size": None, **kw}
    return cls.from_yaml("_base", layout=layout, **args)


def shared_subdir(root: Path, name: str) -> Path:
    """A data set of the shared real data (the ``shared_data`` fixture's folder); missing -> the test fails."""
    sub = root / name
    if not sub.is_dir():
        pytest.fail(f"LIVERFUSION_SHARED_DATA is set but {sub} is missing")
    return sub


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
