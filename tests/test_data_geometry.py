"""Geometry checked on load (orientation convention, data.check's per-case comparison) and every input read verified
(truncated / corrupt / non-NIfTI / non-image files give one DataError naming the file, and the file is untouched)."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from rich.console import Console

from liverfusion.data.check import inspect, render
from liverfusion.data.datamodule import ClassificationDataModule
from liverfusion.data.io import check_voxels, file_digest, load_volume, reorient, save_volume
from liverfusion.data.layouts import LLDMMRILayout
from liverfusion.data.preprocess import PreprocessConfig, Preprocessor
from liverfusion.errors import ConfigError, DataError
from tests.helpers import PHASES, data_module, write_lld_like

SPACING = (3.0, 1.5, 1.0)  # (sD, sH, sW)


def _image(shape=(6, 12, 10), seed=0) -> np.ndarray:
    """An image with no symmetry, so any flip or transpose shows."""
    rng = np.random.default_rng(seed)
    a = rng.normal(100, 10, size=shape).astype(np.float32)
    a += np.arange(shape[2], dtype=np.float32)[None, None, :] * 3  # brighter towards +W (+x)
    return a


def _write_las(path, a, spacing=SPACING) -> None:
    """``a`` (D, H, W in RAS) stored with its x axis reversed (LAS): same anatomy, same world box."""
    sd, sh, sw = spacing
    affine = np.diag([-sw, sh, sd, 1.0])
    affine[0, 3] = sw * (a.shape[2] - 1)  # voxel i' = n-1-i sits where RAS voxel i was
    save_volume(path, a[:, :, ::-1], spacing, affine=affine)


def test_mirrored_phase_is_reoriented_and_reported_by_name(tmp_path):
    root = write_lld_like(tmp_path / "lld", n_patients=4, n_classes=2, shape=(6, 12, 12))
    target = root / "images" / "P0001" / "DWI.nii.gz"
    ras = load_volume(target)
    _write_las(target, ras.array, ras.spacing)

    las = load_volume(target)
    assert las.stored_axcodes == "LAS"
    fixed = reorient(las, "RAS")
    np.testing.assert_array_equal(fixed.array, ras.array)
    np.testing.assert_allclose(fixed.affine, ras.affine)
    assert fixed.spacing == ras.spacing and fixed.stored_axcodes == "LAS"
    assert not np.array_equal(las.array, ras.array)  # as stored it is mirrored

    reports = {}
    for orientation in ("RAS", "none"):
        dm = data_module(
            ClassificationDataModule,
            LLDMMRILayout(root, modalities=PHASES, class_names=["a", "b"]),
            preprocess={"shape": [6, 12, 12], "normalize": "none", "orientation": orientation},
            cache_dir=tmp_path / "cache",
            split={"n_folds": 2, "test_fraction": 0.0, "save_to": None},
            progress=False,
        )
        reports[orientation] = inspect(dm)
        dwi = dm.entries["P0001"].load()[PHASES.index("DWI")].astype(np.float32)
        same = np.allclose(dwi, ras.array.astype(np.float16).astype(np.float32))
        assert same == (orientation == "RAS")  # corrected under RAS, fed mirrored under none
        assert reports[orientation]["modalities"]["DWI"]["orientations"] == {("RAS",): 4, ("LAS",): 1}
    for orientation, report in reports.items():
        geo = [p for p in report["problems"] if "stored" in p]
        assert len(geo) == 1, report["problems"]
        assert "case P0001" in geo[0] and "'DWI'" in geo[0] and str(target) in geo[0]
        assert "stored LAS" in geo[0] and "RAS" in geo[0]
        assert ("reoriented to RAS" in geo[0]) == (orientation == "RAS")
        assert not any("grid" in p or "field of view" in p for p in report["problems"])  # same grid and box
    console = Console(record=True, width=400)
    render(reports["RAS"], console)
    text = console.export_text()
    assert "RAS (4), LAS (1)" in text and "1 warning(s)" in text


def test_grid_and_field_of_view_disagreements_are_named(tmp_path):
    root = write_lld_like(tmp_path / "lld", n_patients=2, n_classes=2, shape=(6, 12, 12))
    case = root / "images" / "P0000"
    a = load_volume(case / "C+A.nii.gz").array
    save_volume(case / "C+A.nii.gz", a[:, :, :8], spacing=(3.0, 1.0, 1.0))  # smaller grid, same origin
    b = load_volume(case / "DWI.nii.gz").array
    shifted = np.diag([1.0, 1.0, 3.0, 1.0])
    shifted[2, 3] = 30.0  # same grid, 10 slices further up
    save_volume(case / "DWI.nii.gz", b, spacing=(3.0, 1.0, 1.0), affine=shifted)
    dm = data_module(
        ClassificationDataModule,
        LLDMMRILayout(root, modalities=PHASES, class_names=["a", "b"]),
        preprocess={"shape": [6, 12, 12]},
        cache_dir=tmp_path / "cache",
        split={"n_folds": 2, "test_fraction": 0.0, "save_to": None},
        progress=False,
    )
    problems = inspect(dm)["problems"]
    grid = [p for p in problems if " grid " in p]
    fov = [p for p in problems if "field of view" in p]
    assert any("'C+A'" in p and str(case / "C+A.nii.gz") in p and "8x12x6" in p for p in grid), problems
    assert any("'DWI'" in p and str(case / "DWI.nii.gz") in p and "30.0 mm" in p for p in fov), problems
    assert all("case P0000" in p for p in grid + fov)


def test_ras_files_are_untouched_byte_for_byte(tmp_path):
    """The phantom and every test fixture write with save_volume's diagonal affine: RAS already, so RAS
    reorientation is the identity and the cached arrays are the same as with orientation none."""
    a = _image()
    save_volume(tmp_path / "v.nii.gz", a, SPACING, dtype=np.int16)
    vol = load_volume(tmp_path / "v.nii.gz")
    assert vol.stored_axcodes == "RAS"
    assert reorient(vol, "RAS") is vol
    outs = [Preprocessor(PreprocessConfig(shape=(6, 8, 8), orientation=o))(vol) for o in ("RAS", "none")]
    assert outs[0].tobytes() == outs[1].tobytes()
    spaced = [
        Preprocessor(
            PreprocessConfig(shape=(6, 8, 8), mode="spacing", target_spacing=(2, 2, 2), orientation=o)
        )
        for o in ("RAS", "none")
    ]
    assert spaced[0](vol).tobytes() == spaced[1](vol).tobytes()


def test_permuted_axes_and_other_conventions(tmp_path):
    a = _image()
    sd, sh, sw = SPACING
    # stored with i = S, j = A, k = R (e.g. sagittal slices written in another axis order)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = sd, sh, sw, 1.0
    data_ijk = np.transpose(a, (0, 1, 2))  # (D, H, W) = (S, A, R) is NIfTI (i, j, k) here
    nib.save(nib.Nifti1Image(data_ijk, affine), str(tmp_path / "sar.nii.gz"))
    vol = load_volume(tmp_path / "sar.nii.gz", orientation="RAS")
    assert vol.stored_axcodes == "SAR"
    np.testing.assert_array_equal(vol.array, a)
    assert vol.spacing == SPACING
    lps = reorient(vol, "LPS")
    np.testing.assert_array_equal(lps.array, a[:, ::-1, ::-1])
    np.testing.assert_array_equal(reorient(lps, "RAS").array, a)


def test_file_without_orientation_is_read_as_stored(tmp_path):
    img = nib.Nifti1Image(np.transpose(_image(), (2, 1, 0)), np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)  # nibabel's affine is then the ANALYZE guess (x flipped: LAS)
    nib.save(img, str(tmp_path / "bare.nii.gz"))
    vol = load_volume(tmp_path / "bare.nii.gz", orientation="RAS")
    assert vol.stored_axcodes == ""
    np.testing.assert_array_equal(vol.array, _image())


def test_orientation_config_defaults_and_refusals():
    assert PreprocessConfig.from_dict({"shape": [4, 8, 8]}).orientation == "none"  # an old checkpoint's dict
    assert PreprocessConfig.from_dict({"orientation": "ras"}).orientation == "RAS"
    assert PreprocessConfig.from_dict({"orientation": None}).orientation == "none"
    for bad in ("RRS", "RA", "XYZ", 3):
        with pytest.raises(ConfigError, match="orientation"):
            PreprocessConfig(orientation=bad)
    with pytest.raises(ConfigError, match="orientatoin"):
        PreprocessConfig.from_dict({"orientatoin": "RAS"})


def _nii_bytes(a: np.ndarray) -> bytes:
    return nib.Nifti1Image(np.transpose(a, (2, 1, 0)), np.diag([1.0, 1.5, 3.0, 1.0])).to_bytes()


def _corrupt(kind: str, tmp_path):
    """Write a bad input of ``kind``; return its path and the words the error must contain."""
    a = _image()
    path = tmp_path / "bad.nii.gz"
    good = tmp_path / "good.nii.gz"
    save_volume(good, a, SPACING)
    gz = good.read_bytes()
    if kind == "gzip_cut_in_half":
        path.write_bytes(gz[: len(gz) // 2])
        return path, "truncated or corrupt gzip"
    if kind == "gzip_cut_in_trailer":  # nibabel alone decodes this one without complaint
        path.write_bytes(gz[:-4])
        return path, "truncated or corrupt gzip"
    if kind == "gzip_bit_flip":
        raw = bytearray(gz)
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
        return path, "corrupt gzip"
    if kind == "gzip_intact_data_short":
        raw = _nii_bytes(a)
        path.write_bytes(gzip.compress(raw[: 352 + a.nbytes // 2]))
        return path, "truncated or damaged"
    if kind == "nii_cut_in_half":
        path = tmp_path / "bad.nii"
        raw = _nii_bytes(a)
        path.write_bytes(raw[: len(raw) // 2])
        return path, "truncated or damaged"
    if kind == "text_named_nii_gz":
        path.write_text("patient_id,label\nP1,HCC\n")
        return path, "not gzip-compressed"
    if kind == "gzipped_text":
        path.write_bytes(gzip.compress(b"this is not nifti" * 40))
        return path, "without a NIfTI-1/2 header"
    if kind == "mask":
        save_volume(path, (a > 100).astype(np.uint8))
        return path, "only two values"
    if kind == "complex":
        save_volume(path, (a + 1j * a).astype(np.complex64))
        return path, "complex-valued"
    if kind == "all_nan":
        save_volume(path, np.full_like(a, np.nan))
        return path, "every voxel is NaN/inf"
    if kind == "some_inf":
        b = a.copy()
        b[0, 0, :3] = np.inf
        save_volume(path, b)
        return path, "contains 3 NaN/inf voxels"
    if kind == "constant":
        save_volume(path, np.full_like(a, 5.0))
        return path, "constant image"
    if kind == "zero_spacing":
        img = nib.load(str(good))
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
        img.header["pixdim"][3] = 0.0
        nib.save(img, str(path))
        return path, "voxel spacing"
    raise AssertionError(kind)


KINDS = [
    "gzip_cut_in_half",
    "gzip_cut_in_trailer",
    "gzip_bit_flip",
    "gzip_intact_data_short",
    "nii_cut_in_half",
    "text_named_nii_gz",
    "gzipped_text",
    "mask",
    "complex",
    "all_nan",
    "some_inf",
    "constant",
    "zero_spacing",
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_gives_one_error_naming_the_file_and_leaves_it_unchanged(kind, tmp_path):
    path, words = _corrupt(kind, tmp_path)
    before = file_digest(path)
    with pytest.raises(DataError) as info:
        load_volume(path)
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    assert words in err.reason, err.reason
    assert "\n" not in str(err)
    assert file_digest(path) == before


def test_boolean_voxels_are_refused_before_any_cast():
    with pytest.raises(DataError, match="boolean image"):
        check_voxels(np.zeros((2, 3, 4), bool), "m.nii.gz")
