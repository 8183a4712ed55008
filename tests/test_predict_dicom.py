"""``predict`` on a DICOM tree: series mapped to the model's modalities by ``prepare``'s rules, converted in a
temporary folder, the same probabilities as predicting on ``prepare``'s own output, each pseudonym linked to its
input folder, a missing series masked and named, nothing written under the input, and a tree whose series match no
rule one clear error naming it."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from liverfusion.errors import ConfigError, DataError
from liverfusion.models import FUSIONS, build_encoder, build_fusion_classifier
from liverfusion.predict import run_predict
from liverfusion.prepare.app import run_prepare
from liverfusion.prepare.synthetic import phantom, write_dicom_series
from liverfusion.utils.hydra_utils import CONFIG_DIR

T2, ADC, DWI = "t2_tse_tra", "ep2d_diff_tra_DYNDIST_ADC", "ep2d_diff_tra_DYNDISTCALC_BVAL"
MODALITIES = ["t2w", "adc", "dwi"]  # what conf/prepare/rules/generic.yaml calls these series
FOLDERS = {"alpha": "DOE_JOHN_FAKE-1", "beta": "Roe Jane 1977", "gamma": "SMITH_ANNA_FAKE-3"}


def write_patient(root: Path, who: str, series: list[str], seed: int) -> None:
    for n, desc in enumerate(series):
        shape, spacing, origin = ((8, 32, 32), (3.0, 1.0, 1.0), (-16.0, -16.0, 0.0))
        if desc != T2:
            shape, spacing, origin = ((6, 16, 16), (4.0, 2.0, 2.0), (-14.0, -15.0, 1.0))
        write_dicom_series(
            root / FOLDERS[who] / "study_1" / f"{n:02d}_{desc}",
            phantom(shape, seed=seed + n),
            spacing,
            origin_xyz=origin,
            description=desc,
            tags={"PatientID": f"ID-{who}", "PatientName": f"FAKE^{who.upper()}"},
            study_uid=f"1.2.826.0.1.3680043.99.{seed}",
            series_number=n + 1,
        )


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dicom") / "export"
    write_patient(root, "alpha", [T2, ADC, DWI], seed=1)
    write_patient(root, "beta", [T2, ADC, DWI], seed=5)
    write_patient(root, "gamma", [T2, ADC], seed=9)  # no diffusion-weighted series: masked, listed as missing
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A classifier checkpoint (random weights) whose modalities are the generic rule set's names."""
    torch.manual_seed(0)
    enc = functools.partial(
        build_encoder,
        name="resnet3d",
        arch="resnet10",
        widths=[4, 8, 8, 8],
        pool_stride=[1, 2, 2],
        stage_strides=[1, 2, 2, 1],
    )
    net = build_fusion_classifier(enc, functools.partial(FUSIONS["cgc"], width=4), MODALITIES, 2).eval()
    meta = {
        "format": "liverfusion-classifier/1",
        "encoder_config": net.encoder.config(),
        "fusion_config": net.fusion.config(),
        "mode": net.mode,
        "modalities": MODALITIES,
        "class_names": ["low", "high"],
        "preprocess": {
            "shape": [8, 32, 32],
            "mode": "resize",
            "normalize": "percentile",
            "orientation": "RAS",
        },
        "eval_crop": None,
    }
    path = tmp_path_factory.mktemp("model") / "model.ckpt"
    torch.save(
        {"liverfusion": meta, "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path
    )
    return path


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _overrides(ckpt, input_dir, out, *extra) -> list[str]:
    return [f"ckpt_path={ckpt}", f"input={input_dir}", f"out={out}", "progress=false", *extra]


def _predict(ckpt, input_dir, out, *extra):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="predict", overrides=_overrides(ckpt, input_dir, out, *extra))
    return run_predict(cfg)


def test_dicom_tree_predicts_like_its_prepared_cases_and_links_each_pseudonym(export, model, tmp_path):
    before = _snapshot(export)
    key = tmp_path / "ids.json"
    # run inside an initialised Hydra, as the CLI does: prepare's config is composed beside predict's
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "predict",
            overrides=_overrides(model, export, tmp_path / "out", "rules=generic", f"key_file={key}"),
        )
        payload = run_predict(cfg)
    assert _snapshot(export) == before  # nothing under the input is written
    assert payload["input_kind"] == "dicom" and payload["dicom"]["rules"] == "generic"
    ids = json.loads(key.read_text())["patients"]
    by_case = {c["case_id"]: c for c in payload["cases"]}
    assert sorted(by_case) == sorted(ids.values())  # one row per patient, named by its pseudonym
    for who, folder in FOLDERS.items():
        case = by_case[ids[f"ID-{who}"]]
        assert case["folder"] == f"{folder}/study_1" == case["source"]  # the link back to the input
        assert case["files"]["t2w"] == f"{folder}/study_1/00_{T2}"
        assert case["missing"] == (["dwi"] if who == "gamma" else [])
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert {r["case_id"]: r["source"] for r in rows} == {c: by_case[c]["folder"] for c in by_case}
    assert (tmp_path / "out" / "prepare_log.json").is_file()
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "predictions.csv",
        "predictions.json",
        "prepare_log.json",
    }

    # prepare on its own (same rules, same key file: same pseudonyms), then predict on its case folders: the same
    with initialize_config_dir(config_dir=str(Path(CONFIG_DIR)), version_base="1.3"):
        pcfg = compose(
            "prepare",
            overrides=[
                f"input={export}",
                f"out={tmp_path / 'prepared'}",
                "kind=dicom",
                "rules=generic",
                f"privacy.key_file={key}",
                "progress=false",
            ],
        )
    GlobalHydra.instance().clear()
    assert run_prepare(pcfg).exit_code == 0
    direct = _predict(model, tmp_path / "prepared" / "subjects", tmp_path / "direct")
    theirs = {c["case_id"]: c["probabilities"] for c in direct["cases"]}
    for case_id, case in by_case.items():
        assert np.allclose(list(case["probabilities"].values()), list(theirs[case_id].values()), atol=1e-6)


def test_dicom_bad_inputs_are_one_clear_error_each(export, model, tmp_path):
    # no rules for a DICOM tree: detected, and the rule sets are offered
    with pytest.raises(ConfigError, match="is a DICOM tree") as err:
        _predict(model, export, tmp_path / "o1")
    assert "rules=<name>" in err.value.fix and "generic" in err.value.fix
    # a rule set whose names are none of the model's modalities
    with pytest.raises(ConfigError, match=r"rules=lgg: its modality names .* are none of the model's") as err:
        _predict(model, export, tmp_path / "o2", "rules=lgg")
    assert "aliases=" in err.value.fix
    # an unknown rule set
    with pytest.raises(ConfigError, match="rules='nope': no such rule set"):
        _predict(model, export, tmp_path / "o3", "rules=nope")
    # series that match no rule: one error naming the study folder and its series
    odd = tmp_path / "odd_export"
    for n, desc in enumerate(("foo_bar", "qux_seq")):
        write_dicom_series(
            odd / "PAT_X" / "exam" / f"s{n}",
            phantom((6, 16, 16), seed=n),
            (3.0, 1.0, 1.0),
            description=desc,
            study_uid="1.2.826.0.1.3680043.99.77",
            series_number=n + 1,
        )
    before = _snapshot(odd)
    with pytest.raises(
        DataError, match=r"match no rule of rules=generic: PAT_X/exam: series \['foo_bar', 'qux_seq'\]"
    ):
        _predict(model, odd, tmp_path / "o4", "rules=generic")
    assert _snapshot(odd) == before and not (tmp_path / "o4").exists()
    # the private key file must not lie inside the input tree (prepare's own check)
    with pytest.raises(ConfigError, match="key_file"):
        _predict(model, export, tmp_path / "o5", "rules=generic", f"key_file={export / 'ids.json'}")
    assert not (export / "ids.json").exists()
