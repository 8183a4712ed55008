"""The LLD-MMRI raw release: ``images/<patient>/<studyUID>/<seriesUID>.nii.gz`` + ``labels/Annotation.json``.

Annotation schema (official ``main/preprocess/crop_roi.py``): ``data["Annotation_info"][patient]`` is a list of series
items ``{studyUID, seriesUID, phase, pixel_spacing, slice_thickness, annotation: {lesion: {"<k>": {category,
bbox: {3D_box: {x_min, y_min, z_min, x_max, y_max, z_max}}}}}}`` in voxel indices. Each phase has its own box.

The official crop, reproduced here: x/y range ``[min - 16, max + 16)``, z range ``[z_min - 2, z_max + 2]`` clamped to
the volume, zero padding in-plane, a box whose z reaches past the last slice is skipped; lesion ``k`` of patient P is
case ``P`` (k = 0) or ``P_k``. Unlike the official script the crop keeps origin, spacing and direction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from liverfusion.errors import DataError
from liverfusion.prepare.nifti_folders import read_volume
from liverfusion.prepare.roi import IndexBox
from liverfusion.prepare.sources import Inventory, LesionBox, PatientSource, SeriesSource, StudySource

BOX_KEYS = ("x_min", "y_min", "z_min", "x_max", "y_max", "z_max")


def load_annotation(path: Path) -> dict[str, list[dict[str, Any]]]:
    if not path.is_file():
        raise DataError("Annotation.json is missing (set lldmmri.annotation)", path=path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"unreadable JSON ({exc})", path=path) from None
    info = data.get("Annotation_info") if isinstance(data, dict) else None
    if not isinstance(info, dict):
        raise DataError('no "Annotation_info" mapping of patient -> series items', path=path)
    return info


def parse_box(raw: Mapping[str, Any]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Inclusive (x, y, z) bounds of a ``3D_box``; raises DataError on missing keys or min > max."""
    try:
        v = {k: int(round(float(raw[k]))) for k in BOX_KEYS}
    except KeyError as exc:
        raise DataError(f"3D_box lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError):
        raise DataError(f"3D_box has a non-numeric bound ({dict(raw)})") from None
    lo = (v["x_min"], v["y_min"], v["z_min"])
    hi = (v["x_max"], v["y_max"], v["z_max"])
    if any(a > b for a, b in zip(lo, hi)):
        raise DataError(f"3D_box has min > max ({v})")
    return lo, hi


def official_crop_box(
    box: LesionBox, size_xyz: Sequence[int], margin_dhw: Sequence[int], pad_slices: bool = False
) -> tuple[IndexBox, list[str]]:
    """The crop region of one phase's box, as the official script cuts it; warnings name padding at the border."""
    nx, ny, nz = (int(s) for s in size_xyz)
    mz, my, mx = (int(m) for m in margin_dhw)
    (x0, y0, z0), (x1, y1, z1) = box.lo, box.hi
    if z0 >= nz or z1 >= nz or z1 < 0:
        raise DataError(f"box outside the image: slices {z0}..{z1} but the series has {nz} slices")
    if x0 >= nx or y0 >= ny or x1 < 0 or y1 < 0:
        raise DataError(f"box outside the image: x {x0}..{x1}, y {y0}..{y1} in a {nx} x {ny} slice")
    crop = IndexBox((x0 - mx, y0 - my, z0 - mz), (x1 + mx, y1 + my, z1 + mz + 1))
    if not pad_slices:
        crop = crop.clamped((nx, ny, nz), axes=[2])
    warnings = []
    if crop.leaves((nx, ny, nz)):
        warnings.append(f"crop {crop.to_dict()} reaches past the image border: zero-padded")
    return crop, warnings


def scan_lldmmri(root: Path, cfg: Mapping[str, Any]) -> Inventory:
    """One study per patient holding every annotated phase; each phase keeps its own boxes."""
    ann_path = root / str(cfg["annotation"])
    images = root / str(cfg["images"])
    info = load_annotation(ann_path)
    patients = []
    n_files = 0
    for pid, items in info.items():
        pid = str(pid)
        study = StudySource(key=pid, series=[], label_key=pid, order=pid)
        ident = {pid}
        if not isinstance(items, list):
            study.warnings.append("Annotation_info entry is not a list of series items")
            items = []
        for n, item in enumerate(items):
            study.series.append(_series(images, pid, n, item, ident))
            n_files += 1
        patients.append(PatientSource(key=pid, studies=[study], identifying=ident))
    return Inventory(patients=patients, n_files=n_files)


def _series(images: Path, pid: str, n: int, item: Any, ident: set[str]) -> SeriesSource:
    problems: list[str] = []
    if not isinstance(item, dict):
        return SeriesSource(text=f"item {n}", load=_missing, problems=["series item is not a JSON object"])
    phase = str(item.get("phase", "") or "")
    study_uid, series_uid = str(item.get("studyUID", "")), str(item.get("seriesUID", ""))
    ident.update(v for v in (study_uid, series_uid) if len(v) >= 3)
    if not phase:
        problems.append("series item has no phase")
    if not study_uid or not series_uid:
        problems.append("series item lacks studyUID or seriesUID")
    path = images / pid / study_uid / f"{series_uid}.nii.gz"
    if not problems and not path.is_file():
        problems.append("image file images/<patient>/<studyUID>/<seriesUID>.nii.gz is missing")
    boxes: dict[str, LesionBox] = {}
    lesions = (
        ((item.get("annotation") or {}).get("lesion") or {})
        if isinstance(item.get("annotation"), dict)
        else {}
    )
    for key, lesion in dict(lesions).items():
        category = lesion.get("category") if isinstance(lesion, dict) else None
        try:
            lo, hi = parse_box(lesion["bbox"]["3D_box"])
        except (KeyError, TypeError):
            boxes[str(key)] = LesionBox(
                (0, 0, 0), (0, 0, 0), category, error="no bbox.3D_box in the annotation"
            )
            continue
        except DataError as exc:
            boxes[str(key)] = LesionBox((0, 0, 0), (0, 0, 0), category, error=exc.reason)
            continue
        boxes[str(key)] = LesionBox(lo, hi, category)
    if not boxes and not problems:
        problems.append("series item has no annotated lesion")
    info = {"pixel_spacing": item.get("pixel_spacing"), "slice_thickness": item.get("slice_thickness")}
    return SeriesSource(
        text=phase,
        load=lambda check=False, path=path: read_volume(path, check),
        path=str(path),
        order=n,
        info=info,
        problems=problems,
        boxes=boxes,
    )


def _missing(check: bool = False) -> Any:
    raise DataError("series item is unusable")


def lesion_case_suffix(key: str) -> str:
    """Official naming: lesion "0" -> "", lesion "k" -> "_k"."""
    return "" if str(key) in ("0", "") else f"_{key}"
