"""Geometry steps: canonical reorientation, fixed-spacing grids, resampling, rigid registration, DICOM slice checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hydra import compose, initialize_config_dir

import liverfusion
from liverfusion.prepare import geometry as geo
from liverfusion.prepare.app import run_prepare
from liverfusion.prepare.dicom import check_slices
from liverfusion.prepare.synthetic import phantom, write_volume

CONF = str(Path(liverfusion.__file__).resolve().parent / "conf")
REG = {
    "initializer": "none",
    "histogram_bins": 32,
    "sampling_fraction": 0.5,
    "seed": 0,
    "learning_rate": 1.0,
    "min_step": 1e-4,
    "iterations": 200,
    "shrink_factors": [2, 1],
    "smoothing_mm": [1.0, 0.0],
}


def vol(shape=(16, 40, 48), spacing=(1.5, 1.2, 3.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(phantom(shape, seed=3).astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin((-20.0, 10.0, 5.0))
    return img


def test_reorient_is_lossless_and_physical():
    img = vol()
    ras = sitk.DICOMOrient(img, "RAS")
    back, step = geo.reorient(ras, "LPS")
    assert step == "reoriented RAS -> LPS"
    assert geo.orientation_code(back) == "LPS" and geo.same_grid(back, img)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img))
    same, step = geo.reorient(img, "LPS")
    assert step is None and same is img


def test_spacing_grid_keeps_the_field_of_view_and_resampling_keeps_dtype():
    img = vol()
    grid = geo.spacing_grid(img, [6.0, 2.4, 3.0])  # D, H, W
    assert grid.GetSpacing() == (3.0, 2.4, 6.0)
    assert grid.GetSize() == (24, 20, 8)
    ext = lambda im: np.array(im.GetSize()) * np.array(im.GetSpacing())  # noqa: E731
    np.testing.assert_allclose(ext(grid), ext(img))
    lo_edge = lambda im: np.array(im.GetOrigin()) - np.array(im.GetSpacing()) / 2  # noqa: E731
    np.testing.assert_allclose(lo_edge(grid), lo_edge(img))
    u16 = sitk.Cast(img, sitk.sitkUInt16)
    out = geo.resample_onto(u16, grid, "linear")
    assert out.GetPixelID() == sitk.sitkUInt16 and geo.same_grid(out, grid)
    assert geo.coverage(u16, grid) == pytest.approx(1.0)
    half = sitk.RegionOfInterest(u16, [24, 40, 16], [0, 0, 0])
    assert geo.coverage(half, grid) == pytest.approx(0.5, abs=0.05)


def test_rigid_registration_recovers_a_known_motion():
    fixed = vol()
    motion = sitk.Euler3DTransform()
    motion.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed.GetSize()]))
    motion.SetRotation(0.0, 0.0, np.deg2rad(4.0))
    motion.SetTranslation((3.0, -2.0, 1.5))
    moving = sitk.Resample(fixed, fixed, motion.GetInverse(), sitk.sitkLinear, 0.0)
    tx, info = geo.register_rigid(fixed, moving, REG)
    assert info["metric_after"] < info["metric_before"]
    np.testing.assert_allclose(info["translation_mm_xyz"], [3.0, -2.0, 1.5], atol=0.5)
    assert info["rotation_deg_xyz"][2] == pytest.approx(4.0, abs=0.5)
    inner = [[10, 12, 5], [30, 25, 10]]
    for idx in inner:
        p = fixed.TransformIndexToPhysicalPoint(idx)
        np.testing.assert_allclose(tx.TransformPoint(p), motion.TransformPoint(p), atol=0.6)


def test_registration_in_the_pipeline_and_its_record(tmp_path: Path):
    root = tmp_path / "export"
    base = phantom((12, 40, 40), seed=5)
    write_volume(root / "p1" / "t2w_tra.nii.gz", base, (3.0, 1.0, 1.0))
    write_volume(
        root / "p1" / "adc.nii.gz", base, (3.0, 1.0, 1.0), origin_xyz=(2.0, -1.5, 0.0)
    )  # the patient moved
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose(
            "prepare",
            overrides=[
                f"input={root}",
                f"out={tmp_path / 'out'}",
                "kind=nifti",
                "rules=prostatex",
                "rules.required=[t2w_tra]",
                "geometry.register=[adc]",
                "geometry.registration.shrink_factors=[2,1]",
                "geometry.registration.smoothing_mm=[1.0,0.0]",
                "progress=false",
            ],
        )
    result = run_prepare(cfg)
    assert result.exit_code == 0 and not result.failures
    rec = result.cases[0]["modalities"]["adc"]
    assert rec["registration"]["accepted"] is True
    np.testing.assert_allclose(rec["registration"]["translation_mm_xyz"][:2], [2.0, -1.5], atol=0.5)
    case = tmp_path / "out" / "subjects" / result.cases[0]["case"]
    t2 = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "t2w_tra.nii.gz"))).astype(float)
    adc = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "adc.nii.gz"))).astype(float)
    core = (slice(2, -2), slice(5, -5), slice(5, -5))
    assert np.corrcoef(t2[core].ravel(), adc[core].ravel())[0, 1] > 0.98


def test_slice_checks():
    iop = [1, 0, 0, 0, 1, 0]
    pos = lambda zs: [[0, 0, z] for z in zs]  # noqa: E731
    ok = check_slices(pos([6, 0, 3, 9]), iop)
    assert ok.order == [1, 2, 0, 3] and not ok.problems and ok.spacing == 3.0
    gap = check_slices(pos([0, 3, 9, 12]), iop)
    assert gap.problems and "1 missing slice(s)" in gap.problems[0]
    dup = check_slices(pos([0, 3, 3, 6]), iop)
    assert "duplicated slice" in dup.problems[0]
    dropped = check_slices(pos([0, 3, 3, 6]), iop, instance_numbers=[1, 2, 3, 4], duplicates="drop")
    assert not dropped.problems and len(dropped.order) == 3 and dropped.warnings
    uneven = check_slices(pos([0, 3, 6.8, 9]), iop)
    assert "inconsistent slice spacing" in uneven.problems[0]
    four_d = check_slices(pos([0, 0, 3, 3, 6, 6]), iop)
    assert "4D" in four_d.problems[0]
    oblique = check_slices([[0, 0, 0], [0, -1, 2.83], [0, -2, 5.66]], [1, 0, 0, 0, 0.94, 0.33])
    assert not oblique.problems and oblique.spacing == pytest.approx(3.0, abs=0.01)
