"""The cross-validation contract the classifier relies on: folds partition the patients, nested CV tests on fold k
and validates on fold k+1, and pre-training for fold k never sees that fold's test (or validation) patients."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict

from liverfusion.utils.hydra_utils import CONFIG_DIR
from tests.helpers import tiny_phantom_overrides

N_FOLDS = 3


def datamodule(experiment: str, fold: int, test_fraction: float, tiny_phantom, tmp_path):
    GlobalHydra.instance().clear()
    overrides = [
        f"+experiment={experiment}",
        f"data.fold={fold}",
        f"data.split.n_folds={N_FOLDS}",
        f"data.split.test_fraction={test_fraction}",
        "data.split.save_to=null",
        *tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"),
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    dm = instantiate(cfg.data)
    dm.progress = False
    dm.setup("fit")
    return dm


def patients(dm, part: str) -> set[str]:
    return {e.patient_id for e in dm.part_entries(part, labelled_only=True)}


@pytest.mark.parametrize("test_fraction", [0.0, 0.25])
def test_folds_partition_patients_and_pretraining_never_sees_test(tiny_phantom, tmp_path, test_fraction):
    nested = test_fraction == 0.0
    tests, vals = [], []
    for k in range(N_FOLDS):
        dm = datamodule("cgc_finetune", k, test_fraction, tiny_phantom, tmp_path)
        train, val, test = patients(dm, "train"), patients(dm, "val"), patients(dm, "test")
        assert not (train & val) and not (train & test) and not (val & test)
        every = {e.patient_id for e in dm.entries.values() if e.label is not None}
        assert train | val | test == every
        tests.append(test)
        vals.append(val)
        pre = datamodule("simsiam_pretrain", k, test_fraction, tiny_phantom, tmp_path)
        seen = {e.patient_id for e in pre.pretrain_entries()}
        assert seen and not (seen & test) and not (seen & val), "pre-training saw held-out patients"
        assert seen <= train | {e.patient_id for e in pre.part_entries("unlabelled")}
    if nested:  # fold k tests, fold k+1 validates, and the test folds partition the patients
        for k in range(N_FOLDS):
            assert vals[k] == tests[(k + 1) % N_FOLDS]
        assert sum(len(t) for t in tests) == len(set().union(*tests))
    else:  # one fixed test split; the folds are the validation folds
        assert all(t == tests[0] for t in tests)
        assert sum(len(v) for v in vals) == len(set().union(*vals))
