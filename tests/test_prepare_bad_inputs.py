"""prepare on bad inputs: each is one clear failure or warning naming the file (or key), never silent acceptance;
strict=true fails on warnings too; the final line counts them; the input tree is never modified."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import liverfusion
from liverfusion.errors import ConfigError, DataError
from liverfusion.prepare.app import run_prepare
from liverfusion.prepare.synthetic import phantom, write_dicom_series, write_lldmmri_release, write_volume

CONF = str(Path(liverfusion.__file__).resolve().parent / "conf")
SHAPE = (6, 24, 24)
SPACING = (3.0, 1.0, 1.0)


NIFTI = ["kind=nifti", "rules=prostatex", "rules.required=[t2w_tra]", "privacy.ids=keep", "privacy.prefix="]


def prepare_cfg(inp: Path, out: Path, extra: list[str] = (), base: list[str] = NIFTI):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("prepare", overrides=[f"input={inp}", f"out={out}", "progress=false", *base, *extra])


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under ``root`` with its mode and content hash: what 'nothing the user gave is modified' means."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[rel] = (p.stat().st_mode, digest)
    return out


def write_case(root: Path, name: str, seed: int) -> None:
    vol = phantom(SHAPE, seed=seed)
    write_volume(root / name / "t2w_tra.nii.gz", vol, SPACING)
    write_volume(root / name / "adc.nii.gz", phantom(SHAPE, seed=seed + 10), SPACING)


@pytest.fixture()
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    write_case(root, "case_a", 0)
    write_case(root, "case_b", 1)
    return root


# each writer breaks one file in place (it may change the name: a truncated plain .nii) and returns its path -----
def truncated_gzip(p: Path) -> Path:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def truncated_plain(p: Path) -> Path:
    raw = gzip.decompress(p.read_bytes())
    p.unlink()
    q = p.with_name(p.name[: -len(".gz")])
    q.write_bytes(raw[: len(raw) * 3 // 4])
    return q


def text_file(p: Path) -> Path:
    p.write_text("patient list, not an image\n")
    return p


def _nifti(p: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.transpose(data, (2, 1, 0)), np.diag([1.0, 1.0, 3.0, 1.0])), str(p))
    return p


def binary_mask(p: Path) -> Path:  # a 0/1 mask (how boolean data is stored: NIfTI has no bool voxels)
    m = np.zeros(SHAPE, np.uint8)
    m[2:4, 5:15, 5:15] = 1
    return _nifti(p, m)


def complex_data(p: Path) -> Path:
    rng = np.random.default_rng(0)
    return _nifti(p, (rng.normal(size=SHAPE) + 1j * rng.normal(size=SHAPE)).astype(np.complex64))


def all_nan(p: Path) -> Path:
    return _nifti(p, np.full(SHAPE, np.nan, np.float32))


def one_nan(p: Path) -> Path:  # SimpleITK alone reads NaN/inf in a NIfTI file as 0
    vol = phantom(SHAPE).astype(np.float32)
    vol[3, 10, 10] = np.nan
    return _nifti(p, vol)


def constant(p: Path) -> Path:
    return _nifti(p, np.full(SHAPE, 7, np.int16))


BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated_gzip": (truncated_gzip, "truncated or corrupt NIfTI file (EOFError"),
    "truncated_plain_nii": (truncated_plain, "truncated or corrupt NIfTI file (OSError: Expected 6912 bytes"),
    "text_named_nii_gz": (text_file, "not a readable NIfTI file"),
    "mask_as_phase": (binary_mask, "only two values"),
    "complex": (complex_data, "complex-valued"),
    "all_nan": (all_nan, "every voxel is NaN/inf"),
    "one_nan": (one_nan, "contains 1 NaN/inf voxels"),
    "constant": (constant, "constant image"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_required_volume_fails_its_case_naming_the_file(kind, export: Path, tmp_path: Path, caplog):
    breaker, problem = BAD[kind]
    bad = breaker(export / "case_b" / "t2w_tra.nii.gz")
    before = tree_digest(export)
    with caplog.at_level(logging.INFO, logger="liverfusion.prepare"):
        result = run_prepare(prepare_cfg(export, tmp_path / "out", ["strict=true"]))
    assert [c["case"] for c in result.cases] == ["case_a"]
    (fail,) = result.failures
    assert fail["patient"] == "case_b"
    assert str(bad) in fail["reason"] and problem in fail["reason"], fail["reason"]
    assert result.exit_code == 1
    assert not (tmp_path / "out" / "subjects" / "case_b").exists()
    assert caplog.records[-1].getMessage().startswith("prepared 1 case(s) of 1 patient(s) (1 failed, ")
    assert tree_digest(export) == before


@pytest.mark.parametrize("kind", ["truncated_gzip", "mask_as_phase", "all_nan"])
def test_a_bad_optional_volume_is_left_out_with_a_warning_that_strict_fails_on(
    kind, export: Path, tmp_path: Path, caplog
):
    breaker, problem = BAD[kind]
    bad = breaker(export / "case_b" / "adc.nii.gz")
    before = tree_digest(export)
    with caplog.at_level(logging.INFO, logger="liverfusion.prepare"):
        lenient = run_prepare(prepare_cfg(export, tmp_path / "lenient"))
    assert lenient.exit_code == 0 and not lenient.failures
    case_b = next(c for c in lenient.cases if c["case"] == "case_b")
    assert sorted(case_b["modalities"]) == ["t2w_tra"]
    (warning,) = [w for w in case_b["warnings"] if str(bad) in w]
    assert problem in warning and "left out" in warning
    assert lenient.n_warnings == 1
    assert "(0 failed, 1 warning(s)" in caplog.records[-1].getMessage()
    strict = run_prepare(prepare_cfg(export, tmp_path / "strict", ["strict=true"]))
    assert strict.exit_code == 1 and strict.n_warnings == 1
    assert tree_digest(export) == before


def test_every_case_failing_is_a_failing_exit_even_without_strict(tmp_path: Path):
    root = tmp_path / "export"
    write_case(root, "case_a", 0)
    truncated_gzip(root / "case_a" / "t2w_tra.nii.gz")
    result = run_prepare(prepare_cfg(root, tmp_path / "out"))
    assert result.exit_code == 1 and not result.cases and len(result.failures) == 1


def test_dicom_and_lldmmri_volumes_pass_the_same_checks(tmp_path: Path):
    """The other readers go through the same rule: a constant DICOM series fails its case naming its folder; a
    truncated LLD-MMRI phase is left out with a warning naming the file."""
    dicom = tmp_path / "dicom"
    const = dicom / "pat1" / "t2"
    write_dicom_series(const, np.full(SHAPE, 5, np.uint16), SPACING, tags={"PatientID": "pat1"})
    write_dicom_series(dicom / "pat2" / "t2", phantom(SHAPE), SPACING, tags={"PatientID": "pat2"})
    before = tree_digest(dicom)
    result = run_prepare(prepare_cfg(dicom, tmp_path / "out_dicom", ["kind=dicom", "rules=prostatex"]))
    (fail,) = result.failures
    assert fail["patient"] == "pat1" and f"file {const}: constant image" in fail["reason"], fail["reason"]
    assert [c["case"] for c in result.cases] == ["pat2"] and tree_digest(dicom) == before

    lld = tmp_path / "LLD-MMRI"
    lesion = {"0": {"category": 1, "box": (8, 8, 2, 14, 14, 4)}}
    series = [
        {"phase": ph, "volume": phantom(SHAPE, seed=k), "spacing_dhw": SPACING, "lesions": lesion}
        for k, ph in enumerate(["C-pre", "C+A"])
    ]
    write_lldmmri_release(lld, {"MR1": series})
    (bad,) = [q for q in (lld / "images").rglob("*.nii.gz") if q.name.endswith(".2.nii.gz")]  # the C+A phase
    truncated_gzip(bad)
    before = tree_digest(lld)
    res = run_prepare(prepare_cfg(lld, tmp_path / "out_lld", ["strict=true"], base=["preset=lldmmri"]))
    (case,) = res.cases
    assert sorted(case["modalities"]) == ["C-pre"]
    # the study/series UIDs in the file's path identify the scan: the path is named with them redacted
    named = f"C+A: file {lld}/images/MR1/<redacted>/<redacted>.nii.gz: truncated"
    assert any(w.startswith(named) and w.endswith("phase left out") for w in case["warnings"]), case[
        "warnings"
    ]
    assert res.exit_code == 1 and tree_digest(lld) == before


@pytest.mark.parametrize("content", ["nothing", "only_loose_files"])
def test_an_input_folder_without_cases_is_an_error_naming_it(content, tmp_path: Path):
    root = tmp_path / "export"
    root.mkdir()
    if content == "only_loose_files":
        (root / "notes.txt").write_text("x")
        write_volume(root / "t2w_tra.nii.gz", phantom(SHAPE), SPACING)  # not in a case folder
    before = tree_digest(root)
    with pytest.raises(DataError, match="no case to prepare") as err:
        run_prepare(prepare_cfg(root, tmp_path / "out"))
    assert err.value.path == str(root)
    assert not (tmp_path / "out").exists()
    assert tree_digest(root) == before


def test_roi_boxes_outside_the_image(tmp_path: Path):
    """A box outside the reference fails that box's case (the other boxes of the study are still prepared); a box
    outside an optional modality only leaves that modality out, with a warning that strict=true fails on."""
    root = tmp_path / "export"
    write_volume(root / "case_a" / "t2w_tra.nii.gz", phantom(SHAPE), SPACING)
    write_volume(root / "case_a" / "adc.nii.gz", phantom((6, 8, 8), seed=3), SPACING)  # x, y 0..7 mm only
    centres = tmp_path / "centres.csv"
    centres.write_text("key,x,y,z\ncase_a,18,18,9\ncase_a,900,900,9\n")
    before = tree_digest(root)
    roi = ["roi.mode=centre", f"roi.centres_csv={centres}", "roi.size=[2,4,4]", "geometry.resample=none"]
    result = run_prepare(prepare_cfg(root, tmp_path / "out", roi))
    assert [c["case"] for c in result.cases] == ["case_a"]
    assert sorted(result.cases[0]["modalities"]) == ["t2w_tra"]
    assert any("adc: the box lies entirely outside" in w for w in result.cases[0]["warnings"])
    (fail,) = result.failures
    assert fail["roi"] == "centre 2 of 2" and "entirely outside" in fail["reason"]
    assert result.exit_code == 0
    strict = run_prepare(prepare_cfg(root, tmp_path / "strict", [*roi, "strict=true"]))
    assert strict.exit_code == 1
    assert not (tmp_path / "out" / "subjects" / "case_a" / "adc.nii.gz").exists()
    assert tree_digest(root) == before


def _blocked_by_a_file(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file" / "out"


def _existing_file(tmp_path: Path) -> Path:
    (tmp_path / "out.txt").write_text("x")
    return tmp_path / "out.txt"


def _read_only(tmp_path: Path) -> Path:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    return tmp_path / "ro" / "out"


@pytest.mark.parametrize(
    "where",
    [
        _blocked_by_a_file,
        _existing_file,
        pytest.param(
            _read_only,
            marks=pytest.mark.skipif(
                hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to read-only folders"
            ),
        ),
    ],
)
def test_an_output_folder_that_cannot_be_made_is_one_error_naming_it(where, export: Path, tmp_path: Path):
    out = where(tmp_path)
    before = tree_digest(export)
    with pytest.raises(ConfigError, match="out=") as err:
        run_prepare(prepare_cfg(export, out))
    assert str(out) in str(err.value) and err.value.fix
    assert tree_digest(export) == before


def test_command_line_names_the_truncated_file_without_a_traceback(tmp_path: Path):
    root = tmp_path / "export"
    write_case(root, "case_a", 0)
    bad = truncated_gzip(root / "case_a" / "t2w_tra.nii.gz")
    before = tree_digest(root)
    cmd = [
        sys.executable,
        "-m",
        "liverfusion.prepare",
        f"input={root}",
        f"out={tmp_path / 'out'}",
        "kind=nifti",
        "rules=prostatex",
        "rules.required=[t2w_tra]",
        "privacy.ids=keep",
        "progress=false",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert str(bad) in run.stdout + run.stderr and "truncated" in run.stdout + run.stderr
    assert tree_digest(root) == before


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c["roi"].update(marign=[1, 1, 1]), r"roi: unknown key\(s\) \['marign'\]"),
        (
            lambda c: c["geometry"]["registration"].pop("iterations"),
            r"geometry.registration: missing key\(s\) \['iterations'\]",
        ),
        (lambda c: c.update(thread=2), r"prepare: unknown key\(s\) \['thread'\]"),
        (lambda c: c.update(nifti="folders"), r"nifti must be a mapping"),
    ],
)
def test_a_misspelt_or_missing_setting_is_refused_by_name(change, match, export: Path, tmp_path: Path):
    """A preset or own config that adds a misspelt key or drops one (Hydra's struct mode only guards the command
    line) is refused before anything is read: prepare holds no second copy of conf/prepare.yaml's defaults."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(prepare_cfg(export, tmp_path / "out"), resolve=True)
    change(cfg)
    with pytest.raises(ConfigError, match=match):
        run_prepare(cfg)
    assert not (tmp_path / "out").exists()
