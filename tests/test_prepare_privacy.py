"""Pseudonyms (salted hash, user mapping, keep), scrubbing of logged text, and the output audit catching leaks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from liverfusion.errors import ConfigError, DataError
from liverfusion.prepare.privacy import Pseudonymizer, Scrubber, audit_outputs, nifti_text_fields


def test_hash_ids_are_salted_stable_and_kept_private(tmp_path: Path):
    key = tmp_path / "keys.json"
    a = Pseudonymizer("hash", key, prefix="P", length=10)
    pid = a.patient_id("DOE^JOHN-12345")
    assert pid.startswith("P") and len(pid) == 11 and "12345" not in pid
    a.save()
    again = Pseudonymizer("hash", key, prefix="P", length=10)  # the salt comes back from the key file
    assert again.patient_id("DOE^JOHN-12345") == pid
    other = Pseudonymizer("hash", tmp_path / "other.json", prefix="P", length=10)  # a new salt: another id
    assert other.patient_id("DOE^JOHN-12345") != pid
    assert json.loads(key.read_text())["patients"] == {"DOE^JOHN-12345": pid}
    with pytest.raises(ConfigError, match="made with privacy.ids=hash"):
        Pseudonymizer("keep", key)


def test_mapping_and_keep(tmp_path: Path):
    mapping = tmp_path / "map.csv"
    mapping.write_text("source,pseudonym\nSMITH_A,case001\n")
    p = Pseudonymizer("mapping", tmp_path / "k.json", mapping_csv=mapping)
    assert p.patient_id("SMITH_A") == "case001"
    with pytest.raises(DataError) as err:
        p.patient_id("JONES_B")
    assert "JONES_B" not in str(err.value)
    p.save()
    assert json.loads((tmp_path / "k.json").read_text())["unmapped"] == ["JONES_B"]
    bad = tmp_path / "bad.csv"
    bad.write_text("source,pseudonym\nX,../escape\n")
    with pytest.raises(DataError, match="safe file name"):
        Pseudonymizer("mapping", tmp_path / "k2.json", mapping_csv=bad)
    assert Pseudonymizer("keep", tmp_path / "k3.json").patient_id("MR 2076/02") == "MR_2076_02"


def test_scrubber():
    s = Scrubber({"DOE^JOHN", "DOE", "x"}, min_length=3)
    assert s("series of DOE^JOHN (DOE)") == "series of <redacted> (<redacted>)"
    assert s.deep({"a": ["DOE", 1], "DOE": "ok"}) == {"a": ["<redacted>", 1], "<redacted>": "ok"}
    assert s("x marks") == "x marks"  # too short to search for


def test_audit_finds_values_in_names_text_headers_and_png_chunks(tmp_path: Path):
    out = tmp_path / "out"
    (out / "subjects" / "c1").mkdir(parents=True)
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    nib.save(img, out / "subjects" / "c1" / "t2.nii.gz")
    assert audit_outputs(out, {"ROEWOOD"})["hits"] == []
    assert nifti_text_fields(out / "subjects" / "c1" / "t2.nii.gz")["descrip"] == ""
    img.header["descrip"] = b"patient ROEWOOD"
    nib.save(img, out / "subjects" / "c1" / "adc.nii.gz")
    (out / "labels.csv").write_text("case,patient,label,name\nc1,c1,0,FAKEID-9\n")
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "scanned at SAINT FICTIVE")
    Image.new("L", (4, 4)).save(out / "qa.png", pnginfo=info)
    (out / "subjects" / "ACC-77").mkdir()
    (out / "subjects" / "ACC-77" / "x.nii.gz").write_bytes(
        (out / "subjects" / "c1" / "t2.nii.gz").read_bytes()
    )
    result = audit_outputs(out, {"ROEWOOD", "FAKEID-9", "SAINT FICTIVE", "ACC-77"})
    assert sorted(result["hits"]) == [
        "labels.csv",
        "qa.png",
        "subjects/ACC-77/x.nii.gz",
        "subjects/c1/adc.nii.gz",
    ]
    assert result["values_checked"] == 4


def test_identifying_label_columns_are_redacted_and_the_audit_is_the_last_line(tmp_path: Path, monkeypatch):
    """A user copying an identifying column into labels.csv gets it redacted; were scrubbing to fail, the audit
    catches the leak and the run exits with status 3."""
    from hydra import compose, initialize_config_dir

    import liverfusion
    from liverfusion.prepare import app
    from liverfusion.prepare.synthetic import phantom, write_dicom_series

    root = tmp_path / "export"
    tags = {"PatientID": "FAKEID-4242", "PatientName": "ROEWOOD^JANETTE"}
    for n, desc in enumerate(("t2_tse_tra", "x_ADC", "y_CALC_BVAL")):
        write_dicom_series(
            root / "p" / desc,
            phantom((4, 16, 16), seed=n),
            (3, 1, 1),
            description=desc,
            tags=tags,
            study_uid="1.2.3.4",
            series_number=n + 1,
        )
    (tmp_path / "clinical.csv").write_text("PatientID,grade,name\nFAKEID-4242,1,ROEWOOD^JANETTE\n")
    conf = str(Path(liverfusion.__file__).resolve().parent / "conf")

    def run(out: str):
        with initialize_config_dir(version_base="1.3", config_dir=conf):
            cfg = compose(
                "prepare",
                overrides=[
                    f"input={root}",
                    f"out={tmp_path / out}",
                    "kind=dicom",
                    "rules=prostatex",
                    "progress=false",
                    f"labels.csv={tmp_path / 'clinical.csv'}",
                    "labels.key_column=PatientID",
                    "labels.label_column=grade",
                    "labels.keep_columns=[name]",
                ],
            )
        return app.run_prepare(cfg)

    safe = run("safe")
    assert safe.exit_code == 0
    assert "ROEWOOD" not in (tmp_path / "safe" / "labels.csv").read_text()
    assert any("identifying value: redacted" in w for w in safe.cases[0]["warnings"])

    monkeypatch.setattr(app.Scrubber, "__call__", lambda self, text: text)  # scrubbing broken
    leaky = run("leaky")
    assert leaky.exit_code == 3
    audit = json.loads((tmp_path / "leaky" / "prepare_log.json").read_text())["privacy"]["audit"]
    assert "labels.csv" in audit["hits"]
