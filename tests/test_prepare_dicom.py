"""prepare on synthetic DICOM exports: privacy (fake PHI in tags and folder names must not reach any output byte),
broken series reported per case while the run goes on, strict exit status, dry-run rule report, resume/atomicity,
and the input tree left untouched."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hydra import compose, initialize_config_dir

import liverfusion
from liverfusion.errors import ConfigError
from liverfusion.prepare.app import run_prepare
from liverfusion.prepare.privacy import nifti_text_fields
from liverfusion.prepare.synthetic import phantom, write_dicom_series

CONF = str(Path(liverfusion.__file__).resolve().parent / "conf")
T2, ADC, HBV = "t2_tse_tra", "ep2d_diff_tra_DYNDIST_ADC", "ep2d_diff_tra_DYNDISTCALC_BVAL"

PHI = {
    "alpha": {
        "PatientName": "DOE^JOHNATHAN",
        "PatientID": "FAKEID-771234",
        "PatientBirthDate": "19610407",
        "AccessionNumber": "ACC9988776",
        "InstitutionName": "SAINT FICTIVE HOSPITAL",
        "ReferringPhysicianName": "HOUSEMAN^GREGORIO",
        "StudyDate": "20190311",
    },
    "beta": {
        "PatientName": "ROEWOOD^JANETTE",
        "PatientID": "FAKEID-445566",
        "PatientBirthDate": "19770523",
        "AccessionNumber": "ACC1122334",
        "InstitutionName": "SAINT FICTIVE HOSPITAL",
        "StudyDate": "20200102",
    },
}
FOLDERS = {"alpha": "DOE_JOHNATHAN_FAKEID-771234", "beta": "Roewood Janette 1977"}


def prepare_cfg(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("prepare", overrides=overrides)


def write_study(root: Path, who: str, tags: dict, series: dict[str, dict], seed: int = 0) -> None:
    """series: description -> options (positions, shape, spacing, origin)."""
    study = f"1.2.826.0.1.3680043.99.{seed}"
    for n, (desc, opt) in enumerate(series.items()):
        shape = opt.get("shape", (8, 32, 32))
        write_dicom_series(
            root / FOLDERS.get(who, who) / f"study_{tags.get('StudyDate', 'x')}" / f"{n:02d}_{desc}",
            phantom(shape, seed=seed + n),
            opt.get("spacing", (3.0, 1.0, 1.0)),
            origin_xyz=opt.get("origin", (-16.0, -16.0, 0.0)),
            description=opt.get("description", desc),
            tags=tags,
            study_uid=study,
            series_number=n + 1,
            slice_positions=opt.get("positions"),
        )


def good_series() -> dict[str, dict]:
    return {
        T2: {"shape": (8, 32, 32), "spacing": (3.0, 1.0, 1.0)},
        ADC: {"shape": (6, 16, 16), "spacing": (4.0, 2.0, 2.0), "origin": (-14.0, -15.0, 1.0)},
        HBV: {"shape": (6, 16, 16), "spacing": (4.0, 2.0, 2.0), "origin": (-14.0, -15.0, 1.0)},
    }


def all_output_bytes(root: Path) -> list[tuple[str, bytes]]:
    """Every file under root with .gz members decompressed, plus the relative path itself."""
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name.endswith(".gz"):
            data = gzip.decompress(data)
        out.append((p.relative_to(root).as_posix(), data))
    return out


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def phi_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export") / "dicom_export"
    write_study(root, "alpha", PHI["alpha"], good_series(), seed=1)
    write_study(root, "beta", PHI["beta"], good_series(), seed=2)
    return root


def test_no_identifying_value_reaches_any_output_byte(phi_export: Path, tmp_path: Path):
    before = snapshot(phi_export)
    out = tmp_path / "prepared"
    result = run_prepare(
        prepare_cfg([f"input={phi_export}", f"out={out}", "kind=dicom", "rules=prostatex", "progress=false"])
    )
    assert result.exit_code == 0, result.failures
    assert len(result.cases) == 2 and not result.failures
    assert snapshot(phi_export) == before, "the input tree was modified"

    values = {v for tags in PHI.values() for v in tags.values()}
    values |= {part for tags in PHI.values() for part in tags["PatientName"].split("^")}
    values |= set(FOLDERS.values()) | {"Roewood", "Janette"}
    blobs = all_output_bytes(out)
    assert any(name.endswith(".nii.gz") for name, _ in blobs) and any(
        name.endswith(".png") for name, _ in blobs
    )
    for name, data in blobs:
        for v in values:
            assert v.encode() not in name.encode(), f"{v!r} in output file name {name}"
            assert v.encode() not in data, f"{v!r} found in {name}"
            if len(v) >= 6 and not name.endswith((".nii.gz", ".png")):
                assert v.upper().encode() not in data.upper(), f"{v!r} (any case) in {name}"
    for nii in out.rglob("*.nii.gz"):
        assert all(not t.strip() for t in nifti_text_fields(nii).values())

    # case ids are salted hashes; the linkage lives in the private key file next to (not inside) out
    cases = [c["case"] for c in result.cases]
    assert all(c.startswith("P") and len(c) == 11 for c in cases)
    key_file = out.parent / "prepared.private_ids.json"
    key = json.loads(key_file.read_text())
    assert set(key["patients"]) == {PHI["alpha"]["PatientID"], PHI["beta"]["PatientID"]}
    assert set(key["patients"].values()) == set(cases)
    log = json.loads((out / "prepare_log.json").read_text())
    assert log["privacy"]["audit"]["hits"] == [] and log["privacy"]["audit"]["values_checked"] >= 10

    # a second run with the same key file gives the same pseudonyms (stable ids across re-runs and exports)
    again = run_prepare(
        prepare_cfg(
            [
                f"input={phi_export}",
                f"out={tmp_path / 'again'}",
                "kind=dicom",
                "rules=prostatex",
                f"privacy.key_file={key_file}",
                "progress=false",
            ]
        )
    )
    assert sorted(c["case"] for c in again.cases) == sorted(cases)


def test_geometry_on_reference_grid_and_record(phi_export: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    result = run_prepare(
        prepare_cfg([f"input={phi_export}", f"out={out}", "kind=dicom", "rules=prostatex", "progress=false"])
    )
    case = result.cases[0]
    ref = sitk.ReadImage(str(out / "subjects" / case["case"] / "t2w_tra.nii.gz"))
    for mod in ("adc", "hbv_calc"):
        img = sitk.ReadImage(str(out / "subjects" / case["case"] / f"{mod}.nii.gz"))
        assert img.GetSize() == ref.GetSize() == (32, 32, 8)
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        rec = case["modalities"][mod]
        assert rec["source"]["geometry"]["shape_dhw"] == [6, 16, 16]
        assert rec["output"]["shape_dhw"] == [8, 32, 32]
        assert any("resampled onto the t2w_tra grid" in s for s in rec["steps"])
        assert 0 < rec["coverage_of_grid"] <= 1


def test_bad_inputs_are_reported_per_case_and_the_run_goes_on(tmp_path: Path):
    root = tmp_path / "export"
    ok = good_series()
    tags = lambda pid: {"PatientID": pid, "PatientName": f"FAKE^{pid}"}  # noqa: E731
    write_study(root, "P_ok", tags("P_ok"), ok, seed=1)
    gap = dict(ok)
    gap[T2] = {**ok[T2], "positions": [0, 3, 6, 12, 15, 18, 21]}  # one slice missing
    write_study(root, "P_gap", tags("P_gap"), gap, seed=2)
    dup = dict(ok)
    dup[ADC] = {**ok[ADC], "positions": [0, 4, 4, 8, 12, 16]}
    write_study(root, "P_dup", tags("P_dup"), dup, seed=3)
    uneven = dict(ok)
    uneven[HBV] = {**ok[HBV], "positions": [0, 4, 8.9, 12, 16, 20]}  # optional modality: case kept without it
    write_study(root, "P_uneven", tags("P_uneven"), uneven, seed=4)
    write_study(root, "P_noadc", tags("P_noadc"), {T2: ok[T2], HBV: ok[HBV]}, seed=5)
    write_study(root, "P_broken", tags("P_broken"), ok, seed=6)
    t2_dir = next((root / "P_broken").rglob(f"*{T2}"))
    victim = sorted(t2_dir.glob("*.dcm"))[3]
    victim.write_bytes(b"this is not a DICOM file at all")  # unreadable -> its slice is missing
    write_study(
        root, "P_twice", tags("P_twice"), {**ok, "t2_tse_tra_2": {**ok[T2], "description": T2}}, seed=7
    )

    out = tmp_path / "prepared"
    base = [
        f"input={root}",
        f"out={out}",
        "kind=dicom",
        "rules=prostatex",
        "rules.required=[t2w_tra,adc]",
        "privacy.ids=keep",
        "privacy.prefix=",
        "progress=false",
    ]
    result = run_prepare(prepare_cfg(base))
    assert result.exit_code == 0
    done = {c["case"] for c in result.cases}
    assert done == {"P_ok", "P_uneven"}
    reasons = {f["patient"]: f["reason"] for f in result.failures}
    assert set(reasons) == {"P_gap", "P_dup", "P_noadc", "P_broken", "P_twice"}
    assert "missing slice" in reasons["P_gap"] and "t2w_tra" in reasons["P_gap"]
    assert "duplicated slice" in reasons["P_dup"] and "adc" in reasons["P_dup"]
    assert "required modality ['adc'] missing" in reasons["P_noadc"]
    assert "missing slice" in reasons["P_broken"]
    assert "2 series match 't2w_tra'" in reasons["P_twice"]
    uneven_case = next(c for c in result.cases if c["case"] == "P_uneven")
    assert "hbv_calc" not in uneven_case["modalities"]
    assert any("inconsistent slice spacing" in w for w in uneven_case["warnings"])
    broken_warn = json.loads((out / "prepare_log.json").read_text())["failures"]
    assert broken_warn  # failures are in the log
    # the unreadable file is named as such in the failing case's rule report (dry run)
    dry = run_prepare(prepare_cfg(base + ["dry_run=true", f"out={tmp_path / 'dry'}"]))
    broken = next(s for s in dry.report["studies"] if s["case"] == "P_broken")
    t2_entry = next(e for e in broken["series"] if e["names"] == ["t2w_tra"])
    assert any("not readable DICOM" in w for w in t2_entry["warnings"])
    twice = next(s for s in dry.report["studies"] if s["case"] == "P_twice")
    assert twice["duplicates"] == {"t2w_tra": 2}

    # strict: same outcome, non-zero exit; finished patients are skipped, failed ones retried
    strict = run_prepare(prepare_cfg(base + ["strict=true"]))
    assert strict.exit_code == 1 and strict.skipped == 2 and len(strict.failures) == 5


def test_strict_exit_status_from_the_command_line(tmp_path: Path):
    root = tmp_path / "export"
    write_study(root, "P1", {"PatientID": "P1"}, good_series(), seed=1)
    write_study(root, "P2", {"PatientID": "P2"}, {T2: good_series()[T2]}, seed=2)  # lacks adc and hbv
    cmd = [
        sys.executable,
        "-m",
        "liverfusion.prepare",
        f"input={root}",
        f"out={tmp_path / 'o'}",
        "kind=dicom",
        "rules=prostatex",
        "progress=false",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    strict = subprocess.run(cmd + ["strict=true"], capture_output=True, text=True, env=env, timeout=120)
    assert strict.returncode == 1, strict.stderr[-2000:]
    assert "required modality" in strict.stdout + strict.stderr
    inside = subprocess.run(
        cmd[:4] + [f"out={root / 'inside'}"] + cmd[5:], capture_output=True, text=True, env=env, timeout=120
    )
    assert inside.returncode == 2 and "never written to" in inside.stdout + inside.stderr
    assert not (root / "inside").exists()


def test_dry_run_reports_matched_unmatched_ambiguous(tmp_path: Path):
    root = tmp_path / "export"
    series = {**good_series(), "localizer_3plane": {}, "t1_fl2d_sag": {}, "t2_tse_tra_ADC": {}}
    write_study(root, "P1", {"PatientID": "P1"}, series, seed=1)
    out = tmp_path / "dry"
    result = run_prepare(
        prepare_cfg([f"input={root}", f"out={out}", "kind=dicom", "rules=prostatex", "dry_run=true"])
    )
    s = result.report["summary"]
    assert s["studies_per_modality"] == {"adc": 1, "hbv_calc": 1, "t2w_tra": 1}
    assert s["unmatched_texts"] == {"t1_fl2d_sag": 1}
    assert s["ignored_texts"] == {"localizer_3plane": 1}
    assert s["ambiguous_texts"] == {"t2_tse_tra_ADC": ["t2w_tra", "adc"]}
    assert (out / "prepare_dry_run.json").is_file() and not (out / "subjects").exists()


def test_resume_skips_finished_and_interrupted_runs_leave_no_complete_looking_case(
    phi_export: Path, tmp_path: Path
):
    out = tmp_path / "prepared"
    args = [f"input={phi_export}", f"out={out}", "kind=dicom", "rules=prostatex", "progress=false"]
    first = run_prepare(prepare_cfg(args))
    case_dirs = sorted((out / "subjects").iterdir())
    assert len(case_dirs) == 2
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}

    # a killed run: a half-written hidden folder, and a finished case folder whose patient marker was never written
    (out / "subjects" / f".tmp-{case_dirs[0].name}-x1y2").mkdir()
    (out / "subjects" / f".tmp-{case_dirs[0].name}-x1y2" / "t2w_tra.nii.gz").write_bytes(b"\x1f\x8b partial")
    (out / ".prepare" / "patients" / f"{case_dirs[1].name}.json").unlink()
    second = run_prepare(prepare_cfg(args))
    assert second.skipped == 1
    assert any("half-written" in w for w in second.warnings)
    assert not any(p.name.startswith(".tmp-") for p in (out / "subjects").iterdir())
    assert sorted(c["case"] for c in second.cases) == sorted(c["case"] for c in first.cases)
    untouched = [p for p in stamp if case_dirs[0] in p.parents]
    assert all(p.stat().st_mtime_ns == stamp[p] for p in untouched)
    labels = (out / "labels.csv").read_text().splitlines()
    assert labels[0] == "case,patient,label" and len(labels) == 3

    with pytest.raises(ConfigError, match="other settings"):
        run_prepare(prepare_cfg(args + ["geometry.resample=none"]))
    redo = run_prepare(prepare_cfg(args + ["geometry.resample=none", "overwrite=true"]))
    assert redo.skipped == 0 and len(redo.cases) == 2
    adc = sitk.ReadImage(str(out / "subjects" / redo.cases[0]["case"] / "adc.nii.gz"))
    assert adc.GetSize() == (16, 16, 6)
