"""DICOM trees of any nesting: headers read with pydicom, series grouped by SeriesInstanceUID, slices sorted by
their position along the slice normal and checked (missing, duplicated, unevenly spaced), pixels read by SimpleITK.

Slice checks happen before any pixel is read, so a dry run reports broken series too. A problem found here makes the
series unusable; it only fails a case when the rules pick that series for a modality.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk

from liverfusion.data.io import check_voxels
from liverfusion.errors import DataError
from liverfusion.prepare.sources import Inventory, SeriesSource, StudySource, group_patients


@dataclass
class SliceCheck:
    order: list[int]
    problems: list[str]
    warnings: list[str]
    spacing: float | None


def check_slices(
    positions: Sequence[Sequence[float]],
    orientation: Sequence[float],
    instance_numbers: Sequence[int] | None = None,
    tolerance: float = 0.05,
    duplicates: str = "error",
) -> SliceCheck:
    """Sort slices along the normal of ``orientation`` (DICOM ImageOrientationPatient) and find gaps/duplicates.

    ``tolerance`` is a fraction of the median slice distance: a distance below it is a duplicate, one near a
    multiple k >= 2 of the median is k-1 missing slices, anything else off by more is uneven spacing.
    """
    pos = np.asarray(positions, dtype=float)
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    dist = pos @ normal
    numbers = list(instance_numbers) if instance_numbers is not None else list(range(len(pos)))
    order = sorted(range(len(pos)), key=lambda i: (dist[i], numbers[i]))
    problems: list[str] = []
    warnings: list[str] = []
    if len(order) < 2:
        return SliceCheck(order, problems, warnings, None)
    d = dist[order]
    diffs = np.diff(d)
    nonzero = diffs[diffs > 1e-6]
    if nonzero.size == 0:
        return SliceCheck(order, [f"all {len(order)} slices share one position"], warnings, None)
    step = float(np.median(nonzero))
    dup = np.flatnonzero(diffs < tolerance * step)
    if dup.size:
        counts = np.unique(np.round(d / (tolerance * step)), return_counts=True)[1]
        if counts.size and np.all(counts == counts[0]) and counts[0] > 1:
            problems.append(
                f"{counts[0]} images at each of {counts.size} slice positions (a 4D, multi-echo or multi-volume "
                "series): split it before preparing"
            )
            return SliceCheck(order, problems, warnings, step)
        if duplicates == "drop":
            keep = [order[0]] + [order[i + 1] for i in range(len(diffs)) if i not in set(dup.tolist())]
            warnings.append(
                f"dropped {dup.size} duplicated slice(s) (same position; kept the lower InstanceNumber)"
            )
            order = keep
            d = dist[order]
            diffs = np.diff(d)
        else:
            where = ", ".join(f"{d[i]:.2f}" for i in dup[:5])
            problems.append(
                f"{dup.size} duplicated slice(s) at position(s) {where} mm along the normal "
                "(set dicom.duplicate_slices=drop to keep one of each)"
            )
            return SliceCheck(order, problems, warnings, step)
    if diffs.size:
        ratio = diffs / step
        off = np.flatnonzero(np.abs(ratio - 1.0) > tolerance)
        if off.size:
            k = np.round(ratio[off])
            is_gap = (k >= 2) & (np.abs(ratio[off] - k) <= tolerance)
            if is_gap.all():
                n_missing = int((k - 1).sum())
                first = int(off[0])
                problems.append(
                    f"{n_missing} missing slice(s): gap of {diffs[first]:.2f} mm after slice {first + 1} of "
                    f"{len(order)} (regular spacing {step:.2f} mm)"
                )
            else:
                problems.append(
                    f"inconsistent slice spacing: distances from {diffs.min():.3f} to {diffs.max():.3f} mm "
                    f"(median {step:.3f} mm, tolerance {tolerance:.0%})"
                )
    return SliceCheck(order, problems, warnings, step)


def identifying_values(ds: pydicom.Dataset, tags: Iterable[str], min_length: int) -> set[str]:
    """String values of ``tags`` (person names also by component) long enough to search for without noise."""
    out: set[str] = set()
    for tag in tags:
        value = ds.get(tag)
        if value is None or value == "":
            continue
        values = list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]
        for v in values:
            text = str(v).strip()
            if len(text) >= min_length:
                out.add(text)
            if isinstance(v, pydicom.valuerep.PersonName) or "^" in text:
                for part in text.replace("^", " ").split():
                    if len(part) >= max(min_length, 3):
                        out.add(part)
    return out


def read_series(files: Sequence[Path], check: bool = False) -> sitk.Image:
    """Read slices in the given order (already sorted and checked) into one volume; header metadata is dropped.

    ``check``: the voxels must look like an MR image (``liverfusion.data.io.check_voxels``; not for masks)."""
    try:
        if len(files) == 1:
            img = sitk.ReadImage(str(files[0]))
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(f) for f in files])
            reader.MetaDataDictionaryArrayUpdateOff()
            reader.LoadPrivateTagsOff()
            img = reader.Execute()
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()
        raise DataError(
            f"SimpleITK cannot read the series pixels ({msg[-1] if msg else 'unknown error'})",
            path=Path(files[0]).parent if files else None,
        ) from None
    for key in img.GetMetaDataKeys():
        img.EraseMetaData(key)
    if img.GetDimension() != 3:
        raise DataError(f"series is {img.GetDimension()}D, expected 3D", path=Path(files[0]).parent)
    if check:
        check_voxels(sitk.GetArrayViewFromImage(img), Path(files[0]).parent)
    return img


def _series_text(ds: pydicom.Dataset, fields: Sequence[str]) -> str:
    for f in fields:
        v = str(ds.get(f, "") or "").strip()
        if v:
            return v
    return ""


def _walk(root: Path, skip_ext: set[str]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or any(name.lower().endswith(e) for e in skip_ext):
                continue
            files.append(Path(dirpath) / name)
    return files


def folder_values(rel: Path, min_length: int) -> set[str]:
    """Folder names above the series folder (patient/study folders often carry names, ids, dates)."""
    parts = rel.parent.parts
    keep = parts if len(parts) <= 1 else parts[:-1]
    return {p for p in keep if len(p) >= min_length}


def scan_dicom_tree(
    root: Path, cfg: Mapping[str, Any], phi_tags: Sequence[str], min_phi_length: int
) -> Inventory:
    """List every series under ``root``; no pixel data is read here."""
    skip_ext = {str(e).lower() for e in cfg["skip_extensions"]}
    text_fields = list(cfg["text_fields"])
    patient_key = str(cfg["patient_key"])
    tolerance = float(cfg["slice_spacing_tolerance"])
    dup_policy = str(cfg["duplicate_slices"])
    min_slices = int(cfg["min_slices"])

    files = _walk(root, skip_ext)
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    unreadable: dict[Path, list[str]] = defaultdict(list)
    inventory_warnings: list[str] = []
    non_image = 0
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:  # InvalidDicomError, EOF, struct errors on truncated headers
            unreadable[f.parent].append(type(exc).__name__)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid or "Rows" not in ds:
            non_image += 1
            continue
        series[uid].append((f, ds))
    if non_image:
        inventory_warnings.append(
            f"{non_image} DICOM file(s) without image data (DICOMDIR, reports, ...) ignored"
        )

    studies: dict[str, tuple[str, StudySource, set[str]]] = {}
    attributed: set[Path] = set()
    for _uid, items in series.items():
        items.sort(key=lambda t: str(t[0]))
        first = items[0][1]
        rel = items[0][0].relative_to(root)
        ident = identifying_values(first, phi_tags, min_phi_length) | folder_values(rel, min_phi_length)
        if patient_key == "folder":
            pkey = rel.parts[0] if len(rel.parts) > 1 else str(first.get("PatientID", "") or "unknown")
        else:
            pkey = str(first.get(patient_key, "") or "").strip()
            if not pkey:
                pkey = rel.parts[0] if len(rel.parts) > 1 else "unknown"
                inventory_warnings.append(f"a series has no {patient_key}: grouped by its top folder instead")
        skey = str(first.get("StudyInstanceUID", "") or pkey)
        source = _series_source(items, text_fields, tolerance, dup_policy, min_slices)
        for d in sorted({p.parent for p, _ in items}):
            if d in unreadable:
                source.warnings.append(
                    f"{len(unreadable[d])} file(s) in this series' folder are not readable DICOM "
                    f"({', '.join(sorted(set(unreadable[d])))})"
                )
                attributed.add(d)
        study_id = f"{pkey}\x00{skey}"
        if study_id not in studies:
            order = f"{first.get('StudyDate', '')}{first.get('StudyTime', '')}"
            studies[study_id] = (pkey, StudySource(key=skey, series=[], label_key=pkey, order=order), set())
        studies[study_id][1].series.append(source)
        studies[study_id][2].update(ident)
    lost = sum(len(v) for d, v in unreadable.items() if d not in attributed)
    if lost:
        inventory_warnings.append(f"{lost} file(s) are not readable DICOM and belong to no series")
    for _, study, _ in studies.values():
        study.series.sort(key=lambda s: (s.order, s.text))
    return Inventory(
        patients=group_patients(list(studies.values())), n_files=len(files), warnings=inventory_warnings
    )


def _series_source(
    items: list[tuple[Path, pydicom.Dataset]],
    text_fields: Sequence[str],
    tolerance: float,
    dup_policy: str,
    min_slices: int,
) -> SeriesSource:
    first = items[0][1]
    text = _series_text(first, text_fields)
    number = first.get("SeriesNumber")
    order = (int(number) if number not in (None, "") else 0, text)
    problems: list[str] = []
    warnings: list[str] = []
    info: dict[str, Any] = {"files": len(items)}
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if len(items) == 1 and frames > 1:
        info["frames"] = frames
        files = [items[0][0]]
    else:
        iops = [
            tuple(round(float(x), 4) for x in ds.get("ImageOrientationPatient", []) or []) for _, ds in items
        ]
        sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
        missing_geo = sum(
            1 for (_, ds), o in zip(items, iops) if len(o) != 6 or "ImagePositionPatient" not in ds
        )
        files = [p for p, _ in items]
        if missing_geo:
            problems.append(f"{missing_geo} slice(s) lack ImagePositionPatient/ImageOrientationPatient")
        elif len(set(iops)) > 1:
            problems.append(
                f"slices have {len(set(iops))} different orientations (a localizer or mixed series)"
            )
        elif len(sizes) > 1:
            problems.append(f"slices have different sizes {sorted(sizes)}")
        elif len(items) < min_slices:
            problems.append(f"only {len(items)} slice(s) (dicom.min_slices={min_slices})")
        else:
            check = check_slices(
                [[float(x) for x in ds.ImagePositionPatient] for _, ds in items],
                iops[0],
                [int(ds.get("InstanceNumber", 0) or 0) for _, ds in items],
                tolerance=tolerance,
                duplicates=dup_policy,
            )
            problems += check.problems
            warnings += check.warnings
            files = [items[i][0] for i in check.order]
            info["slice_spacing_mm"] = None if check.spacing is None else round(check.spacing, 4)
        info["slices"] = len(files)
    return SeriesSource(
        text=text,
        load=lambda check=False, files=tuple(files): read_series(files, check),
        path=str(files[0].parent) if files else None,
        order=order,
        info=info,
        problems=problems,
        warnings=warnings,
    )
