"""Regions of interest: padded crops keep physical geometry, mask boxes (whole / per component), margins, centre +
size from a CSV, a box outside the image reported per case, one crop per lesion named <patient>, <patient>_1."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hydra import compose, initialize_config_dir

import liverfusion
from liverfusion.errors import DataError
from liverfusion.prepare.app import run_prepare
from liverfusion.prepare.roi import (
    IndexBox,
    box_in_grid,
    centre_box,
    crop_with_pad,
    margin_voxels,
    mask_boxes,
)
from liverfusion.prepare.synthetic import phantom, write_volume

CONF = str(Path(liverfusion.__file__).resolve().parent / "conf")


def prepare_cfg(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("prepare", overrides=overrides)


def image(shape_dhw=(6, 20, 30), spacing_xyz=(0.7, 0.9, 3.0), origin=(10.0, -5.0, 2.0)) -> sitk.Image:
    arr = np.arange(np.prod(shape_dhw), dtype=np.int32).reshape(shape_dhw) + 1
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    return img


def test_crop_with_padding_keeps_physical_positions():
    img = image()
    box = IndexBox((-3, 15, 4), (5, 24, 8))  # leaves the image in x, y and z
    crop = crop_with_pad(img, box, pad_value=-7)
    assert crop.GetSize() == (8, 9, 4)
    for idx in [(0, 0, 0), (3, 2, 1), (7, 8, 3)]:
        src_idx = tuple(i + lo for i, lo in zip(idx, box.lo))
        np.testing.assert_allclose(
            crop.TransformIndexToPhysicalPoint(idx),
            img.TransformContinuousIndexToPhysicalPoint(src_idx),
            atol=1e-6,
        )
        inside = all(0 <= v < s for v, s in zip(src_idx, img.GetSize()))
        expect = img.GetPixel(src_idx) if inside else -7
        assert crop.GetPixel(idx) == expect
    with pytest.raises(DataError, match="entirely outside"):
        crop_with_pad(img, IndexBox((40, 0, 0), (45, 5, 2)))


def test_mask_boxes_margins_and_centres():
    mask = sitk.Image(30, 20, 6, sitk.sitkUInt8)
    mask[2:5, 3:6, 1:3] = 1
    mask[20:26, 10:12, 4:5] = 2
    whole = mask_boxes(mask)
    assert whole == [IndexBox((2, 3, 1), (26, 12, 5))]
    assert mask_boxes(mask, labels=[2]) == [IndexBox((20, 10, 4), (26, 12, 5))]
    comps = mask_boxes(mask, components=True)
    assert comps == [IndexBox((2, 3, 1), (5, 6, 3)), IndexBox((20, 10, 4), (26, 12, 5))]  # largest first
    mask.SetSpacing((0.5, 0.5, 3.0))
    assert margin_voxels(mask, None, [3.0, 1.0, 1.0]) == [2, 2, 1]  # mm (D, H, W) -> voxels (x, y, z)
    assert margin_voxels(mask, [1, 2, 3], None) == [3, 2, 1]
    assert IndexBox((2, 3, 1), (5, 6, 3)).at_least([8, 3, 4]).size == (8, 3, 4)
    img = image()
    point = img.TransformIndexToPhysicalPoint((10, 10, 3))
    b = centre_box(img, point, (4, 4, 2))
    assert b == IndexBox((8, 8, 2), (12, 12, 4))
    assert box_in_grid(b, img, img) == b


@pytest.fixture()
def nifti_export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    for n, name in enumerate(("case_a", "case_b")):
        vol = phantom((8, 32, 32), seed=n)
        write_volume(root / name / "t2w_tra.nii.gz", vol, (3.0, 1.0, 1.0))
        write_volume(
            root / name / "adc.nii.gz", vol[:, ::2, ::2], (3.0, 2.0, 2.0), origin_xyz=(0.5, 0.5, 0.0)
        )
        mask = np.zeros((8, 32, 32), np.uint8)
        mask[2:4, 4:9, 4:10] = 1
        mask[5:7, 20:26, 18:25] = 1
        write_volume(root / name / "mask.nii.gz", mask, (3.0, 1.0, 1.0))
    return root


def test_one_crop_per_component_named_like_lldmmri(nifti_export: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = run_prepare(
        prepare_cfg(
            [
                f"input={nifti_export}",
                f"out={out}",
                "kind=nifti",
                "rules=prostatex",
                "rules.required=[t2w_tra]",
                "roi.mode=mask",
                "roi.components=true",
                "roi.min_component_voxels=5",
                "roi.margin=[1,2,2]",
                "privacy.ids=keep",
                "privacy.prefix=",
                "progress=false",
            ]
        )
    )
    assert result.exit_code == 0 and not result.failures
    assert sorted(c["case"] for c in result.cases) == ["case_a", "case_a_1", "case_b", "case_b_1"]
    with open(out / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["case"], r["patient"]) for r in rows} >= {("case_a_1", "case_a"), ("case_b", "case_b")}
    # component 1 (largest: 2 x 6 x 7 voxels) + margin (1, 2, 2)
    first = sitk.ReadImage(str(out / "subjects" / "case_a" / "t2w_tra.nii.gz"))
    assert first.GetSize() == (7 + 4, 6 + 4, 2 + 2)
    adc = sitk.ReadImage(str(out / "subjects" / "case_a" / "adc.nii.gz"))
    assert adc.GetSize() == first.GetSize()
    np.testing.assert_allclose(adc.GetOrigin(), first.GetOrigin(), atol=1e-5)
    m = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "subjects" / "case_a" / "mask.nii.gz")))
    assert m.sum() == 2 * 6 * 7


def test_centre_mode_and_a_box_outside_the_image(nifti_export: Path, tmp_path: Path):
    centres = tmp_path / "centres.csv"
    centres.write_text("key,x,y,z,grade\ncase_a,16,16,9,2\ncase_a,5,5,3,1\ncase_b,900,900,9,1\n")
    out = tmp_path / "out"
    result = run_prepare(
        prepare_cfg(
            [
                f"input={nifti_export}",
                f"out={out}",
                "kind=nifti",
                "rules=prostatex",
                "rules.required=[t2w_tra]",
                "roi.mode=centre",
                f"roi.centres_csv={centres}",
                "roi.size=[4,12,12]",
                "roi.centres_label_column=grade",
                "privacy.ids=keep",
                "privacy.prefix=",
                "progress=false",
                "strict=true",
            ]
        )
    )
    assert sorted(c["case"] for c in result.cases) == ["case_a", "case_a_1"]
    assert [(c["case"], c["label"]) for c in sorted(result.cases, key=lambda c: c["case"])] == [
        ("case_a", "2"),
        ("case_a_1", "1"),
    ]
    small = next(c for c in result.cases if c["case"] == "case_a_1")
    assert any(
        "padded" in w for w in small["warnings"]
    )  # centre (5, 5) with a 12-voxel box reaches the border
    assert result.exit_code == 1
    (fail,) = result.failures
    assert fail["patient"] == "case_b" and "outside" in fail["reason"]
    img = sitk.ReadImage(str(out / "subjects" / "case_a" / "t2w_tra.nii.gz"))
    assert img.GetSize() == (12, 12, 4)
