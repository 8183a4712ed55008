"""prepare on a tiny synthetic LLD-MMRI raw release (Annotation.json in the real schema): per-phase boxes with the
official margins, a box touching the border, a box outside the image, lesion naming <patient>, <patient>_1."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hydra import compose, initialize_config_dir

import liverfusion
from liverfusion.prepare.app import run_prepare
from liverfusion.prepare.synthetic import write_lldmmri_release

CONF = str(Path(liverfusion.__file__).resolve().parent / "conf")


def coded_volume(d: int, h: int, w: int) -> np.ndarray:
    """Every voxel holds its own index (1 + x + w*y + w*h*z), so any misplaced crop shows."""
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    return (1 + x + w * y + w * h * z).astype(np.uint16)


def official_crop(arr: np.ndarray, box: tuple[int, ...], m: int = 16, mz: int = 2) -> np.ndarray:
    """The official crop_roi.py rule written independently: in-plane [min-16, max+16) zero-padded, z clamped."""
    x0, y0, z0, x1, y1, z1 = box
    d, h, w = arr.shape
    zlo, zhi = max(z0 - mz, 0), min(z1 + mz, d)
    roi = arr[zlo : zhi + 1, max(y0 - m, 0) : min(y1 + m, h), max(x0 - m, 0) : min(x1 + m, w)]
    pads = ((0, 0), (max(0, m - y0), max(0, y1 + m - h)), (max(0, m - x0), max(0, x1 + m - w)))
    return np.pad(roi, pads)


VOL = coded_volume(10, 40, 40)
DWI = coded_volume(8, 32, 32)
SPEC = {
    "MR100001": [
        {
            "phase": "C-pre",
            "volume": VOL,
            "spacing_dhw": (5.0, 0.8, 0.8),
            "lesions": {"0": {"category": 3, "box": (18, 17, 4, 24, 23, 6)}},
        },
        {
            "phase": "C+A",
            "volume": VOL,
            "spacing_dhw": (5.0, 0.8, 0.8),
            "lesions": {"0": {"category": 3, "box": (16, 19, 3, 22, 25, 5)}},
        },
        {
            "phase": "T2WI",
            "volume": VOL,
            "spacing_dhw": (5.0, 0.8, 0.8),
            "lesions": {"0": {"category": 3, "box": (19, 15, 4, 25, 21, 7)}},
        },
    ],
    "MR100002": [
        {
            "phase": "C-pre",
            "volume": VOL,
            "spacing_dhw": (5.0, 0.8, 0.8),
            "lesions": {
                "0": {"category": 6, "box": (0, 30, 0, 6, 39, 2)},
                "1": {"category": 4, "box": (20, 5, 7, 26, 10, 9)},
            },
        },
        {
            "phase": "C+V",
            "volume": VOL,
            "spacing_dhw": (5.0, 0.8, 0.8),
            "lesions": {
                "0": {"category": 6, "box": (2, 28, 0, 8, 36, 1)},
                "1": {"category": 4, "box": (21, 6, 6, 27, 11, 8)},
            },
        },
    ],
    "MR100003": [
        {
            "phase": "C-pre",
            "volume": VOL,
            "spacing_dhw": (5.0, 0.8, 0.8),
            "lesions": {"0": {"category": 0, "box": (10, 10, 2, 15, 15, 4)}},
        },
        {
            "phase": "DWI",
            "volume": DWI,
            "spacing_dhw": (6.0, 1.0, 1.0),
            "lesions": {"0": {"category": 0, "box": (10, 10, 12, 15, 15, 13)}},
        },
    ],
}


def prepare_cfg(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("prepare", overrides=overrides)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lld") / "LLD-MMRI"
    write_lldmmri_release(root, SPEC)
    return root


def test_crops_follow_the_official_rule_with_real_geometry(release: Path, tmp_path: Path):
    out = tmp_path / "crops"
    result = run_prepare(prepare_cfg(["preset=lldmmri", f"input={release}", f"out={out}", "progress=false"]))
    assert result.exit_code == 0 and not result.failures
    with open(out / "labels.csv") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    assert {k: (r["patient"], r["label"]) for k, r in rows.items()} == {
        "MR100001": ("MR100001", "3"),
        "MR100002": ("MR100002", "6"),
        "MR100002_1": ("MR100002", "4"),
        "MR100003": ("MR100003", "0"),
    }
    for pid, series in SPEC.items():
        for spec in series:
            for key, lesion in spec["lesions"].items():
                case = pid if key == "0" else f"{pid}_{key}"
                path = out / "subjects" / case / f"{spec['phase']}.nii.gz"
                if (
                    spec["phase"] == "DWI"
                ):  # its box lies past the last slice: left out, as the official script does
                    assert not path.exists()
                    continue
                img = sitk.ReadImage(str(path))
                expect = official_crop(np.asarray(spec["volume"]), lesion["box"])
                np.testing.assert_array_equal(sitk.GetArrayFromImage(img), expect)
                # real geometry: the crop's first voxel sits where that index lies in the source volume
                x0, y0, z0 = lesion["box"][:3]
                sd, sh, sw = spec["spacing_dhw"]
                lo = (x0 - 16, y0 - 16, max(z0 - 2, 0))
                np.testing.assert_allclose(img.GetOrigin(), [lo[0] * sw, lo[1] * sh, lo[2] * sd], atol=1e-4)
                np.testing.assert_allclose(img.GetSpacing(), [sw, sh, sd], atol=1e-5)
    c1 = next(c for c in result.cases if c["case"] == "MR100001")
    sizes = {m: r["output"]["shape_dhw"] for m, r in c1["modalities"].items()}
    assert sizes == {"C-pre": [7, 38, 38], "C+A": [7, 38, 38], "T2WI": [8, 38, 38]}
    border = next(c for c in result.cases if c["case"] == "MR100002")
    assert any("zero-padded" in w for w in border["warnings"])
    only_pre = next(c for c in result.cases if c["case"] == "MR100003")
    assert set(only_pre["modalities"]) == {"C-pre"}
    assert any("DWI" in w and "outside the image" in w for w in only_pre["warnings"])
    assert (out / "qa" / "MR100002_1.png").is_file()


def test_required_phase_and_alignment_options(release: Path, tmp_path: Path):
    strict = run_prepare(
        prepare_cfg(
            [
                "preset=lldmmri",
                f"input={release}",
                f"out={tmp_path / 'a'}",
                "rules.required=[DWI]",
                "strict=true",
                "progress=false",
            ]
        )
    )
    assert strict.exit_code == 1
    assert {f["patient"] for f in strict.failures} == {"MR100001", "MR100002", "MR100003"}
    assert all("required phase(s) ['DWI'] missing" in f["reason"] for f in strict.failures)

    aligned = run_prepare(
        prepare_cfg(
            [
                "preset=lldmmri",
                f"input={release}",
                f"out={tmp_path / 'b'}",
                "geometry.resample=reference",
                "progress=false",
            ]
        )
    )
    case = tmp_path / "b" / "subjects" / "MR100001"
    ref = sitk.ReadImage(str(case / "C-pre.nii.gz"))
    for phase in ("C+A", "T2WI"):
        img = sitk.ReadImage(str(case / f"{phase}.nii.gz"))
        assert img.GetSize() == ref.GetSize()
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    assert aligned.exit_code == 0


def test_malformed_annotation_is_a_clear_error(tmp_path: Path):
    root = tmp_path / "LLD"
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "Annotation.json").write_text('{"something_else": {}}')
    from liverfusion.errors import DataError

    with pytest.raises(DataError, match="Annotation_info"):
        run_prepare(
            prepare_cfg(["preset=lldmmri", f"input={root}", f"out={tmp_path / 'o'}", "progress=false"])
        )
