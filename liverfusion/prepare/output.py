"""The output data set: ``subjects/<case>/<modality>.nii.gz``, ``labels.csv``, ``prepare_log.json``, ``qa/``.

A case folder appears only complete: its files are written into a hidden temporary folder that is then renamed
onto ``subjects/<case>`` (one atomic rename). Per-patient markers in ``.prepare/patients/`` record what a finished
patient produced, so a re-run skips it; a killed run leaves at most hidden ``.tmp-*`` folders, removed on the next run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from liverfusion.errors import DataError
from liverfusion.prepare.privacy import nifti_text_fields
from liverfusion.utils.atomic import atomic_write_text

STATE_DIR = ".prepare"


def write_nifti(img: sitk.Image, path: Path) -> None:
    """Write with SimpleITK keeping origin/spacing/direction; no header text (descrip, aux_file, ...) survives."""
    img = sitk.Image(img)
    for key in img.GetMetaDataKeys():
        img.EraseMetaData(key)
    sitk.WriteImage(img, str(path), useCompression=True)
    fields = nifti_text_fields(path)
    leftover = {k: v for k, v in fields.items() if v.strip()}
    if leftover:
        raise DataError(
            f"NIfTI header text fields are not empty after writing: {sorted(leftover)}", path=path.name
        )


def _read_state(path: Path) -> dict[str, Any] | None:
    """A state file of a run (marker, settings) or None when it is absent or unreadable (a killed write: that part
    is simply done again)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class OutputTree:
    def __init__(self, root: Path, subjects: str = "subjects", qa_dir: str = "qa"):
        self.root = root
        self.subjects = root / subjects
        self.qa = root / qa_dir
        self.state = root / STATE_DIR
        self.markers = self.state / "patients"

    def prepare(self) -> int:
        """Create folders and remove what a killed run left behind; returns the number of leftovers removed."""
        for d in (self.subjects, self.markers):
            d.mkdir(parents=True, exist_ok=True)
        removed = 0
        for d in self.subjects.iterdir():
            if d.is_dir() and (d.name.startswith(".tmp-") or d.name.startswith(".old-")):
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed

    def write_case(self, case: str, volumes: Mapping[str, sitk.Image]) -> list[str]:
        """All volumes of one case, atomically as a folder; replaces an older folder of the same name."""
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{case}-", dir=self.subjects))
        try:
            names = []
            for name, img in volumes.items():
                write_nifti(img, tmp / f"{name}.nii.gz")
                names.append(f"{name}.nii.gz")
            final = self.subjects / case
            old = None
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".old-{case}-", dir=self.subjects))
                os.replace(final, old / "case")
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return sorted(names)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove_stale(self, patient: str, keep: Sequence[str]) -> list[str]:
        """Case folders of ``patient`` from an earlier attempt that this attempt did not produce."""
        rx = re.compile(rf"^{re.escape(patient)}(_\d+)?$")
        gone = []
        for d in self.subjects.iterdir():
            if d.is_dir() and rx.match(d.name) and d.name not in keep:
                shutil.rmtree(d)
                gone.append(d.name)
                with contextlib.suppress(FileNotFoundError):
                    (self.qa / f"{d.name}.png").unlink()
        return gone

    # per-patient markers -------------------------------------------------------------------------------------
    def marker_path(self, patient: str) -> Path:
        return self.markers / f"{patient}.json"

    def read_marker(self, patient: str) -> dict[str, Any] | None:
        return _read_state(self.marker_path(patient))

    def finished(self, patient: str) -> dict[str, Any] | None:
        """The marker of a patient whose every case folder exists and who had no failure, else None."""
        marker = self.read_marker(patient)
        if not marker or marker.get("failures"):
            return None
        if all((self.subjects / c["case"]).is_dir() for c in marker.get("cases", [])):
            return marker
        return None

    def write_marker(self, patient: str, record: Mapping[str, Any]) -> None:
        atomic_write_text(self.marker_path(patient), json.dumps(record, indent=1, default=str))

    # settings of the data set --------------------------------------------------------------------------------
    def read_settings(self) -> dict[str, Any] | None:
        return _read_state(self.state / "settings.json")

    def write_settings(self, settings: Mapping[str, Any]) -> None:
        atomic_write_text(
            self.state / "settings.json", json.dumps(settings, indent=1, sort_keys=True, default=str)
        )

    def clear(self) -> None:
        """overwrite=true: forget finished patients (their folders are replaced as they are redone)."""
        for p in self.markers.glob("*.json"):
            p.unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.state / "settings.json").unlink()


def write_labels_csv(path: Path, rows: Sequence[Mapping[str, Any]], extra_columns: Sequence[str]) -> Path:
    columns = [
        "case",
        "patient",
        "label",
        *[c for c in extra_columns if c not in ("case", "patient", "label")],
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return atomic_write_text(path, buf.getvalue())


def diff_settings(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested settings mappings."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff_settings(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out
