"""A user's split file and the data config are checked up front: a bad split file, one that leaves labelled
patients out, or a value out of range is one error naming the file or key, never a traceback or silent acceptance;
and pre-training never sees a held-out patient, with a generated split or a user's file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import open_dict

from liverfusion.data.datamodule import ClassificationDataModule
from liverfusion.data.layouts import LLDMMRILayout
from liverfusion.data.mda import MDADataModule
from liverfusion.data.splits import SPLIT_FORMAT, Splits, make_splits, splits_from_case_lists
from liverfusion.errors import ConfigError, DataError
from liverfusion.utils.hydra_utils import CONFIG_DIR
from tests.helpers import PHASES, data_module, tiny_phantom_overrides, write_lld_like


@pytest.fixture(scope="module")
def lld(tmp_path_factory) -> Path:
    return write_lld_like(tmp_path_factory.mktemp("checks") / "lld", n_patients=12, shape=(4, 8, 8))


def layout(root: Path) -> LLDMMRILayout:
    return LLDMMRILayout(root, modalities=PHASES, class_names=["a", "b", "c"])


@pytest.fixture(scope="module")
def saved(lld) -> dict:
    """A valid split file's payload for ``lld`` (2 folds and a test split)."""
    s = make_splits(layout(lld).scan(), n_folds=2, test_fraction=0.25, seed=0)
    return {"format": SPLIT_FORMAT, **s.__dict__}


def write(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload))
    return path


def datamodule(root: Path, tmp_path: Path, cls=ClassificationDataModule, **kw):
    args = {
        "preprocess": {"shape": [4, 8, 8]},
        "cache_dir": tmp_path / "cache",
        "progress": False,
        "num_workers": 0,
        "prep_workers": 0,
        "split": {"n_folds": 2, "test_fraction": 0.25, "save_to": None},
    }
    args.update(kw)
    return data_module(cls, layout(root), **args)


# ---- a malformed split file: one DataError naming the file and the key ----
def _unknown(p):
    p["foldz"] = []


def _folds_not_list(p):
    p["folds"] = "P0001"


def _folds_not_strings(p):
    p["folds"] = [[1, 2], [3]]


def _n_folds_mismatch(p):
    p["n_folds"] = 3


def _n_folds_too_few(p):
    p["n_folds"], p["folds"] = 1, [p["folds"][0] + p["folds"][1]]


def _seed_text(p):
    p["seed"] = "zero"


def _no_folds(p):
    del p["folds"]


def _test_not_list(p):
    p["test"] = "P0001"


def _two_splits(p):
    p["folds"][1].append(p["folds"][0][0])


def _test_and_unlabelled(p):  # pre-training would see a test patient
    p["unlabelled"] = [p["test"][0]]


def _twice_in_fold(p):
    p["folds"][0].append(p["folds"][0][0])


@pytest.mark.parametrize(
    "mutate, named",
    [
        (_unknown, "'foldz'"),
        (_folds_not_list, "'folds'"),
        (_folds_not_strings, "'folds'"),
        (_n_folds_mismatch, "'n_folds'"),
        (_n_folds_too_few, "'n_folds'"),
        (_seed_text, "'seed'"),
        (_no_folds, "'folds'"),
        (_test_not_list, "'test'"),
        (_two_splits, "in two splits: fold 0 and fold 1"),
        (_test_and_unlabelled, "in two splits: test and unlabelled"),
        (_twice_in_fold, "twice in fold 0"),
    ],
)
def test_malformed_split_file_is_one_error_naming_file_and_key(saved, tmp_path, mutate, named):
    payload = json.loads(json.dumps(saved))
    mutate(payload)
    path = write(tmp_path / "splits.json", payload)
    with pytest.raises(DataError) as info:
        Splits.load(path)
    msg = str(info.value)
    assert str(path) in msg and named in msg
    if mutate is _unknown:
        assert "known keys" in msg and "'folds'" in msg


@pytest.mark.parametrize("payload", [[1, 2], {"format": "other"}, "not json {"])
def test_not_a_split_file_names_the_file(tmp_path, payload):
    path = tmp_path / "splits.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    with pytest.raises(DataError, match="split file") as info:
        Splits.load(path)
    assert str(path) in str(info.value)


def test_split_file_is_read_when_the_module_is_built(lld, tmp_path, saved):
    bad = write(tmp_path / "bad.json", {**saved, "extra": 1})
    with pytest.raises(DataError, match="'extra'"):
        datamodule(lld, tmp_path, split={"file": str(bad)})
    good = write(tmp_path / "good.json", saved)
    with pytest.raises(ConfigError, match=r"data\.fold=2: must be an integer in \[0, 1\]"):
        datamodule(lld, tmp_path, split={"file": str(good), "n_folds": 5}, fold=2)


# ---- a split file that leaves labelled patients out, or names unknown ones ----
def _leave_out_half(saved: dict) -> tuple[dict, list[str]]:
    payload = json.loads(json.dumps(saved))
    out = payload["folds"][0][1:] + payload["folds"][1][1:]
    payload["folds"] = [payload["folds"][0][:1], payload["folds"][1][:1]]
    return payload, sorted(out)


def test_split_file_leaving_patients_out_is_refused_or_warned(lld, tmp_path, saved, caplog):
    payload, out = _leave_out_half(saved)
    path = write(tmp_path / "partial.json", payload)
    dm = datamodule(lld, tmp_path, split={"file": str(path)})
    with pytest.raises(DataError) as info:
        dm.setup()
    msg = str(info.value)
    assert str(path) in msg and f"leaves {len(out)} of" in msg and out[0] in msg
    assert "data.split.allow_missing=true" in (info.value.fix or "")

    dm = datamodule(lld, tmp_path, split={"file": str(path), "allow_missing": True})
    with caplog.at_level(logging.WARNING, logger="liverfusion.data.splits"):
        dm.setup()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(path) in warned and f"leaves {len(out)} of" in warned and out[0] in warned
    used = {p for part in ("train", "val", "test") for p in dm.partition[part]}
    assert not used & set(out)
    assert dm.data_spec()["split"]["file"] == str(path.resolve())  # evaluation re-uses the same file


def test_split_file_naming_unknown_patients_names_the_file(lld, tmp_path, saved):
    payload = json.loads(json.dumps(saved))
    payload["test"].append("NOT_A_PATIENT")
    path = write(tmp_path / "foreign.json", payload)
    with pytest.raises(DataError, match="NOT_A_PATIENT") as info:
        datamodule(lld, tmp_path, split={"file": str(path)}).setup()
    assert str(path) in str(info.value) and "not in the data set" in str(info.value)


def test_release_fold_lists_sharing_a_patient_are_refused(lld):
    cases = [c.case_id for c in layout(lld).scan()]
    val = [cases[:4], cases[3:8]]  # the fourth case validates in both folds
    train = [cases[8:], cases[8:]]
    with pytest.raises(DataError, match="in two splits: fold 0 and fold 1"):
        splits_from_case_lists(layout(lld).scan(), train, val)


def test_test_fraction_leaving_too_few_patients_for_the_folds(lld):
    with pytest.raises(ConfigError, match="data.split.test_fraction=0.9 leaves 1 of 12"):
        make_splits(layout(lld).scan(), n_folds=2, test_fraction=0.9)


# ---- config values out of range: ConfigError naming key, value and range, when the module is built ----
@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"batch_size": 0}, "data.batch_size=0: must be an integer in [1, inf)"),
        ({"batch_size": 2.5}, "data.batch_size=2.5"),
        ({"batch_size": "8"}, "data.batch_size='8'"),
        ({"eval_batch_size": 0}, "data.eval_batch_size=0: must be an integer in [1, inf) or null"),
        ({"num_workers": -1}, "data.num_workers=-1: must be an integer in [0, inf)"),
        ({"prep_workers": -2}, "data.prep_workers=-2"),
        ({"fold": -1}, "data.fold=-1: must be an integer in [0, 1]"),
        ({"fold": 2}, "data.fold=2: must be an integer in [0, 1]"),
        ({"label_fraction": 0.0}, "data.label_fraction=0.0: must be a number in (0, 1]"),
        ({"label_fraction": 1.5}, "data.label_fraction=1.5"),
        ({"pin_memory": "no"}, "data.pin_memory='no': must be true or false"),
        ({"balanced_sampler": 1}, "data.balanced_sampler=1"),
        ({"split": {"n_folds": 1}}, "data.split.n_folds=1: must be an integer in [2, inf)"),
        ({"split": {"test_fraction": 1.0}}, "data.split.test_fraction=1.0: must be a number in [0, 1)"),
        ({"split": {"test_fraction": -0.1}}, "data.split.test_fraction=-0.1"),
        ({"split": {"seed": -1}}, "data.split.seed=-1"),
        ({"split": {"stratify": "yes"}}, "data.split.stratify='yes'"),
        ({"split": {"allow_missing": None}}, "data.split.allow_missing=None"),
        ({"split": {"n_fold": 3}}, "data.split: unknown key(s) ['n_fold']"),
        ({"split": {"file": "x.json", "release_folds": True}}, "choose one source of folds"),
    ],
)
def test_config_value_out_of_range_fails_at_construction(tmp_path, kwargs, named):
    split = {"n_folds": 2, "test_fraction": 0.25, "save_to": None, **kwargs.pop("split", {})}
    # no data exists at this root: the error must come from the constructor, before anything is read
    with pytest.raises(ConfigError) as info:
        datamodule(tmp_path / "absent", tmp_path, split=split, **kwargs)
    assert named in str(info.value)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (
            {"pairs": {"policy": "mixed", "p_cross": 1.5}},
            "data.pairs.p_cross=1.5: must be a number in [0, 1]",
        ),
        ({"pairs": {"weights": {"DWI": -1}}}, "data.pairs.weights.DWI=-1.0"),
        ({"pairs": {"weights": {"DWI": float("inf")}}}, "data.pairs.weights.DWI=inf"),
        ({"pairs": {"fallback_same": "true"}}, "data.pairs.fallback_same='true'"),
        ({"pairs": {"polcy": "same"}}, "data.pairs: unknown key(s) ['polcy']"),
        ({"drop_last": "no"}, "data.drop_last='no'"),
        ({"pretrain_parts": []}, "pretrain_parts"),
        ({"batch_size": 0}, "data.batch_size=0"),
    ],
)
def test_mda_config_value_out_of_range_fails_at_construction(tmp_path, kwargs, named):
    with pytest.raises(ConfigError) as info:
        datamodule(tmp_path / "absent", tmp_path, cls=MDADataModule, **kwargs)
    assert named in str(info.value)


def test_valid_values_pass_and_are_typed(tmp_path):
    dm = datamodule(tmp_path / "absent", tmp_path, batch_size=4.0, eval_batch_size=None, fold=1)
    assert (dm.batch_size, dm.eval_batch_size, dm.fold) == (4, 4, 1) and isinstance(dm.batch_size, int)


# ---- pre-training never sees a held-out patient (tiny phantom, MDA module from the YAML) ----
def _phantom_mda(tiny_phantom, tmp_path, fold: int, *overrides: str):
    GlobalHydra.instance().clear()
    args = [
        "+experiment=simsiam_pretrain",
        f"data.fold={fold}",
        "data.split.n_folds=3",
        "data.split.test_fraction=0.25",
        "data.split.save_to=null",
        *tiny_phantom_overrides(tiny_phantom, tmp_path / "cache"),
        *overrides,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=args)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    try:
        dm = instantiate(cfg.data)
    except InstantiationException as exc:  # Hydra wraps the constructor's own error
        raise exc.__cause__ from None
    dm.progress = False
    return dm


def test_mda_pretraining_never_sees_test_patients_with_a_user_split_file(tiny_phantom, tmp_path):
    dm = _phantom_mda(tiny_phantom, tmp_path, 0)
    assert isinstance(dm, MDADataModule)
    dm.setup("fit")
    path = dm.splits.save(tmp_path / "user_splits.json")
    for fold in range(3):
        dm = _phantom_mda(tiny_phantom, tmp_path, fold, f"data.split.file={path}")
        dm.setup("fit")
        seen = {e.patient_id for e in dm.pretrain_entries()}
        held_out = set(dm.partition["test"]) | set(dm.partition["val"])
        assert seen and held_out and not seen & held_out, "pre-training saw a held-out patient"
        assert set(dm.partition["test"]) == set(dm.splits.test)
    # a hand-edited file that also lists a test patient for pre-training (as unlabelled) is refused
    payload = json.loads(path.read_text())
    payload["unlabelled"] = [payload["test"][0]]
    leaky = write(tmp_path / "leaky.json", payload)
    with pytest.raises(DataError, match="in two splits: test and unlabelled") as info:
        _phantom_mda(tiny_phantom, tmp_path, 0, f"data.split.file={leaky}")
    assert str(leaky) in str(info.value)
