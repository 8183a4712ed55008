"""prepare on the real shared data (read-only, via LIVERFUSION_SHARED_DATA): ProstateX DICOM -> NIfTI matching the
shipped conversions, resampling onto the reference file's grid, the NIfTI folders of all three ProstateX patients,
LGG tumour-centred crops and CHAOS liver-centred crops (subsets here; the full cohorts under -m slow)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hydra import compose, initialize_config_dir

import liverfusion
from liverfusion.prepare.app import run_prepare
from tests.helpers import shared_subdir

CONF = str(Path(liverfusion.__file__).resolve().parent / "conf")
SEQS = ("t2w_tra", "adc", "hbv_calc")


def prepare_cfg(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("prepare", overrides=overrides)


def read_labels(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as fh:
        return {r["case"]: r for r in csv.DictReader(fh)}


def assert_same_geometry(a: sitk.Image, b: sitk.Image, origin_tol: float = 1e-3, tol: float = 1e-5) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol, atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=origin_tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)


@pytest.fixture(scope="module")
def prostatex(shared_data: Path) -> Path:
    return shared_subdir(shared_data, "prostatex_mpmri")


def test_prostatex_dicom_matches_shipped_nifti_and_reference_grid(prostatex: Path, tmp_path: Path):
    base = [
        f"input={prostatex / 'dicom'}",
        "preset=prostatex",
        "kind=dicom",
        "privacy.ids=keep",
        "privacy.prefix=",
        "progress=false",
    ]
    # 1) per-series conversion, nothing else: must equal the NIfTI files shipped beside the DICOMs
    raw = run_prepare(
        prepare_cfg(base + [f"out={tmp_path / 'raw'}", "geometry.orientation=null", "geometry.resample=none"])
    )
    assert raw.exit_code == 0 and [c["case"] for c in raw.cases] == ["ProstateX-0000"]
    for seq in SEQS:
        mine = sitk.ReadImage(str(tmp_path / "raw" / "subjects" / "ProstateX-0000" / f"{seq}.nii.gz"))
        shipped = sitk.ReadImage(str(prostatex / "nifti" / "ProstateX-0000" / f"{seq}.nii.gz"))
        assert_same_geometry(mine, shipped, origin_tol=1e-3, tol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(mine), sitk.GetArrayViewFromImage(shipped))
        assert mine.GetPixelID() == shipped.GetPixelID()

    # 2) onto the reference modality's grid: every modality has exactly the reference file's geometry
    res = run_prepare(prepare_cfg(base + [f"out={tmp_path / 'grid'}"]))
    assert res.exit_code == 0 and not res.failures
    ref = sitk.ReadImage(str(prostatex / "nifti" / "ProstateX-0000" / "t2w_tra.nii.gz"))
    for seq in SEQS:
        img = sitk.ReadImage(str(tmp_path / "grid" / "subjects" / "ProstateX-0000" / f"{seq}.nii.gz"))
        assert_same_geometry(img, ref, origin_tol=1e-4, tol=1e-6)
    rec = res.cases[0]["modalities"]["adc"]
    assert rec["source"]["geometry"]["shape_dhw"] == [19, 128, 84]
    assert 0.5 < rec["coverage_of_grid"] < 1.0  # ADC's field of view is smaller than T2's
    assert (tmp_path / "grid" / "qa" / "ProstateX-0000.png").stat().st_size > 10_000


def test_prostatex_nifti_folders_all_patients(prostatex: Path, tmp_path: Path):
    out = tmp_path / "px"
    result = run_prepare(
        prepare_cfg(
            [
                f"input={prostatex / 'nifti'}",
                f"out={out}",
                "preset=prostatex",
                "kind=nifti",
                "progress=false",
                f"labels.csv={prostatex / 'labels.csv'}",
                "labels.key_column=patient",
                "labels.label_column=csPCa_if_ISUP_convention",
            ]
        )
    )
    assert result.exit_code == 0 and not result.failures and len(result.cases) == 3
    key = {v: k for k, v in json.loads((tmp_path / "px.private_ids.json").read_text())["patients"].items()}
    labels = {key[c]: r["label"] for c, r in read_labels(out / "labels.csv").items()}
    assert labels == {"ProstateX-0000": "1", "ProstateX-0001": "0", "ProstateX-0218": ""}
    for case in result.cases:
        folder = out / "subjects" / case["case"]
        ref = sitk.ReadImage(str(folder / "t2w_tra.nii.gz"))
        files = sorted(p.name for p in folder.glob("*.nii.gz"))
        expected = 9 if key[case["case"]] == "ProstateX-0218" else 3
        assert len(files) == expected
        for f in files:
            assert_same_geometry(sitk.ReadImage(str(folder / f)), ref, origin_tol=1e-4)
    dce = next(c for c in result.cases if key[c["case"]] == "ProstateX-0218")
    assert sorted(m for m in dce["modalities"] if m.startswith("dce")) == [
        "dce_t008s",
        "dce_t021s",
        "dce_t033s",
        "dce_t063s",
        "dce_t105s",
        "dce_t299s",
    ]


def check_lgg(out: Path, lgg: Path, cases: list[dict]) -> None:
    with open(lgg / "labels.csv") as fh:
        by_patient = {r["patient"]: r for r in csv.DictReader(fh)}
    rows = read_labels(out / "labels.csv")
    assert list(next(iter(rows.values())).keys()) == [
        "case",
        "patient",
        "label",
        "has_t1_pre",
        "has_t1_post",
        "neoplasm_histologic_grade",
    ]
    for case, row in rows.items():
        s = by_patient[row["patient"]]
        grade = s["neoplasm_histologic_grade"].strip()
        assert row["label"] == {"1": "0", "2": "1", "": ""}[grade]
        assert (row["has_t1_pre"], row["has_t1_post"]) == (s["has_t1_pre"], s["has_t1_post"])
        folder = out / "subjects" / case
        crop_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "mask.nii.gz")))
        full_mask = sitk.GetArrayFromImage(
            sitk.ReadImage(str(lgg / "subjects" / s["case_folder"] / "mask.nii.gz"))
        )
        assert crop_mask.sum() == full_mask.sum() > 0, "the crop must hold the whole tumour mask"
        shapes = {
            sitk.ReadImage(str(folder / f"{m}.nii.gz")).GetSize()
            for m in ("t1_pre", "flair", "t1_post", "mask")
        }
        assert len(shapes) == 1
        d, h, w = next(iter(shapes))[::-1]
        assert d >= 8 and h >= 32 and w >= 32
    assert len(rows) == len(cases)


def test_lgg_tumour_crops_subset(shared_data: Path, tmp_path: Path):
    lgg = shared_subdir(shared_data, "lgg_tcga_3seq_dev")
    out = tmp_path / "lgg_crops"
    result = run_prepare(
        prepare_cfg(
            ["preset=lgg_crops", f"input={lgg / 'subjects'}", f"out={out}", "limit=5", "progress=false"]
        )
    )
    assert result.exit_code == 0 and not result.failures and len(result.cases) == 5
    check_lgg(out, lgg, result.cases)
    # the data layer reads the result as a generic layout (the output contract of prepare)
    generic = pytest.importorskip("liverfusion.data.layouts.generic")
    layout = generic.GenericLayout(
        root=out,
        modalities=["t1_pre", "flair", "t1_post"],
        class_names=["grade_1", "grade_2"],
        missing_flags={"t1_pre": "has_t1_pre", "t1_post": "has_t1_post"},
        mask_file="mask.nii.gz",
        on_missing_modality="mask",
    )
    cases = layout.scan()
    assert sorted(c.case_id for c in cases) == sorted(c["case"] for c in result.cases)
    assert all(c.mask is not None and c.patient_id for c in cases)


def test_chaos_liver_crops_subset(shared_data: Path, tmp_path: Path):
    chaos = shared_subdir(shared_data, "chaos_t2spir_liver")
    out = tmp_path / "chaos"
    result = run_prepare(
        prepare_cfg(["preset=chaos_liver", f"input={chaos}", f"out={out}", "limit=3", "progress=false"])
    )
    assert result.exit_code == 0 and not result.failures and len(result.cases) == 3
    for case in result.cases:
        cid = case["case"].removeprefix("chaos_")
        full = sitk.ReadImage(str(chaos / f"label_{cid}.nii.gz"))
        crop = sitk.ReadImage(str(out / "subjects" / case["case"] / "mask.nii.gz"))
        assert (sitk.GetArrayViewFromImage(crop) == 1).sum() == (sitk.GetArrayViewFromImage(full) == 1).sum()
        img = sitk.ReadImage(str(out / "subjects" / case["case"] / "t2spir.nii.gz"))
        assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection()) == "RAS"
        assert img.GetSize() == crop.GetSize() and img.GetSize()[0] < full.GetSize()[0]
        assert "reoriented LAS -> RAS" in case["modalities"]["t2spir"]["steps"]
    assert all(r["label"] == "" for r in read_labels(out / "labels.csv").values())


@pytest.mark.slow
def test_full_cohorts(shared_data: Path, tmp_path: Path):
    """Whole LGG (70) and CHAOS (20) runs; prints what was produced and how long it took."""
    lgg = shared_subdir(shared_data, "lgg_tcga_3seq_dev")
    t0 = time.time()
    res = run_prepare(
        prepare_cfg(
            ["preset=lgg_crops", f"input={lgg / 'subjects'}", f"out={tmp_path / 'lgg'}", "progress=false"]
        )
    )
    t_lgg = time.time() - t0
    assert res.exit_code == 0 and not res.failures and len(res.cases) == 70
    check_lgg(tmp_path / "lgg", lgg, res.cases)
    chaos = shared_subdir(shared_data, "chaos_t2spir_liver")
    t0 = time.time()
    res2 = run_prepare(
        prepare_cfg(["preset=chaos_liver", f"input={chaos}", f"out={tmp_path / 'chaos'}", "progress=false"])
    )
    t_chaos = time.time() - t0
    assert res2.exit_code == 0 and not res2.failures and len(res2.cases) == 20
    print(
        f"\nLGG: {len(res.cases)} cases in {t_lgg:.1f} s; CHAOS: {len(res2.cases)} cases in {t_chaos:.1f} s"
    )
