"""The phantom's unlabelled pre-training pool (issue 15): adding it leaves the labelled cases and their splits
unchanged, and pre-training on it alone never sees a labelled patient (so one encoder serves every fold)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from liverfusion.data.layouts import PhantomLayout
from liverfusion.data.mda import MDADataModule
from tests.helpers import data_module

SHAPE = [8, 16, 16]


def _dm(root: Path, cache: Path, n_unlabelled: int, parts=("train", "unlabelled")) -> MDADataModule:
    layout = PhantomLayout(
        root,
        seed=11,
        n_cases=24,
        n_unlabelled=n_unlabelled,
        shape=SHAPE,
        workers=1,
        name="phantom",
        modalities=["T2WI", "DWI", "In Phase", "Out Phase", "C-pre", "C+A", "C+V", "C+Delay"],
        class_names=["hemangioma", "ICC", "abscess", "metastasis", "cyst", "FNH", "HCC"],
    )
    dm = data_module(
        MDADataModule,
        layout,
        preprocess={"shape": SHAPE, "cache_dtype": "float32"},
        cache_dir=cache,
        batch_size=2,
        num_workers=0,
        progress=False,
        split={"n_folds": 3, "test_fraction": 0.2, "seed": 0},
        pretrain_parts=list(parts),
    )
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[MDADataModule, MDADataModule]:
    base = tmp_path_factory.mktemp("pool")
    return _dm(base / "without", base / "cache", 0), _dm(base / "with", base / "cache", 10)


def test_pool_leaves_labelled_cases_and_splits_unchanged(pair):
    without, with_pool = pair
    labelled = {c: e for c, e in without.entries.items()}
    assert labelled and all(not c.startswith("U") for c in labelled)
    for case, e in labelled.items():
        np.testing.assert_array_equal(e.load(), with_pool.entries[case].load())
        assert e.label == with_pool.entries[case].label
    for part in ("train", "val", "test"):
        assert without.partition[part] == with_pool.partition[part]
    pool = with_pool.partition["unlabelled"]
    assert len(pool) >= 9 and all(p.startswith("U") for p in pool)


def test_pretraining_on_the_pool_alone_sees_no_labelled_patient(tmp_path, pair):
    _, with_pool = pair
    root = with_pool.layout.root
    dm = _dm(root, tmp_path / "cache", 10, parts=("unlabelled",))
    seen = {e.patient_id for e in dm.pair_dataset().base.entries}
    assert seen == set(dm.partition["unlabelled"])
    labelled = {e.patient_id for e in dm.entries.values() if e.label is not None}
    assert (
        labelled and not seen & labelled
    )  # no fold's train, val or test patient: one encoder serves every fold
