"""Tiny synthetic exports for self-tests and demos: DICOM series written with pydicom (with whatever fake patient
data the caller puts in the tags) and LLD-MMRI raw releases in the real Annotation.json schema.

Real exports cannot be shipped; these let every input path of ``liverfusion.prepare`` be exercised, including the
broken ones (missing/duplicated slices, uneven spacing, unreadable files).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def phantom(shape_dhw: Sequence[int], seed: int = 0, peak: int = 900) -> np.ndarray:
    """A smooth blobby uint16 volume (values < 1000) with structure that registration and QA can latch on to."""
    rng = np.random.default_rng(seed)
    d, h, w = (int(s) for s in shape_dhw)
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    vol = np.zeros((d, h, w), np.float64)
    for _ in range(4):
        c = rng.uniform(0.25, 0.75, 3) * np.array([d, h, w])
        r = rng.uniform(0.12, 0.3, 3) * np.array([d, h, w]) + 1
        vol += rng.uniform(0.4, 1.0) * np.exp(
            -(((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2)
        )
    vol = vol / vol.max() * peak + rng.uniform(0, 20, vol.shape)
    return np.clip(vol, 0, 999).astype(np.uint16)


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    spacing_dhw: Sequence[float],
    origin_xyz: Sequence[float] = (0.0, 0.0, 0.0),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    description: str = "t2_tse_tra",
    tags: Mapping[str, Any] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    slice_positions: Sequence[float] | None = None,
    file_prefix: str = "IM",
) -> list[Path]:
    """One MR series, one file per slice; ``slice_positions`` (mm along the normal) overrides regular spacing.

    ``volume`` is (D, H, W) uint16; ``tags`` are put in every file (PatientName, PatientID, InstitutionName, ...).
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    sd, sh, sw = (float(s) for s in spacing_dhw)
    positions = (
        list(slice_positions) if slice_positions is not None else [k * sd for k in range(volume.shape[0])]
    )
    paths = []
    for k, pos in enumerate(positions):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.Modality = "MR"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = description
        for key, value in (tags or {}).items():
            setattr(ds, key, value)
        ipp = np.asarray(origin_xyz, float) + pos * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{sh:.6f}", f"{sw:.6f}"]
        ds.SliceThickness = f"{sd:.6f}"
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(volume[min(k, volume.shape[0] - 1)].astype("<u2")).tobytes()
        path = folder / f"{file_prefix}{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_volume(
    path: Path, volume: np.ndarray, spacing_dhw: Sequence[float], origin_xyz: Sequence[float] = (0, 0, 0)
) -> Path:
    """A (D, H, W) array as NIfTI with identity direction (LPS) via SimpleITK."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing([float(s) for s in spacing_dhw][::-1])
    img.SetOrigin([float(o) for o in origin_xyz])
    sitk.WriteImage(img, str(path))
    return path


def write_lldmmri_release(root: Path, patients: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    """A raw LLD-MMRI release: ``patients[pid]`` lists series specs ``{phase, volume (D,H,W), spacing_dhw,
    lesions: {key: {category, box: (x_min, y_min, z_min, x_max, y_max, z_max)}}}``; returns Annotation.json."""
    info: dict[str, list[dict[str, Any]]] = {}
    for pid, series in patients.items():
        study = f"1.2.840.99.{zlib.crc32(pid.encode()) % 10**8}"
        items = []
        for n, spec in enumerate(series):
            series_uid = f"{study}.{n + 1}"
            vol = np.asarray(spec["volume"])
            write_volume(root / "images" / pid / study / f"{series_uid}.nii.gz", vol, spec["spacing_dhw"])
            sd, sh, sw = spec["spacing_dhw"]
            lesions = {}
            for key, les in spec["lesions"].items():
                x0, y0, z0, x1, y1, z1 = les["box"]
                box = dict(x_min=x0, y_min=y0, z_min=z0, x_max=x1, y_max=y1, z_max=z1)
                lesions[str(key)] = {"category": les["category"], "bbox": {"3D_box": box}}
            items.append(
                {
                    "studyUID": study,
                    "seriesUID": series_uid,
                    "phase": spec["phase"],
                    "pixel_spacing": [sw, sh],
                    "slice_thickness": sd,
                    "annotation": {"num_targets": len(lesions), "lesion": lesions},
                }
            )
        info[pid] = items
    ann = root / "labels" / "Annotation.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"Annotation_info": info}, indent=1))
    return ann
