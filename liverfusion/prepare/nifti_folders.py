"""Loose volume files (NIfTI, also MHA/NRRD): one folder per case, or one flat folder with the case id in the name.

``folders``: ``<input>/<patient>/[<study>/]<name>.nii.gz``; the patient is the first folder, the study the folder
holding the files, and ``<name>`` is what the rules match. ``flat``: ``<input>/<name>.nii.gz`` with
``nifti.case_regex`` pulling the case id out of the name (CHAOS: ``image_1`` / ``label_1``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from liverfusion.data.io import check_voxels
from liverfusion.errors import ConfigError, DataError
from liverfusion.prepare.sources import Inventory, SeriesSource, StudySource, group_patients

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def nifti_voxels(path: Path) -> np.ndarray:
    """The voxels exactly as the NIfTI file stores them (nibabel, unscaled), or a DataError naming ``path``.

    SimpleITK cannot be trusted with this: it reads a truncated file (plain or gzip) as zeros and turns NaN/inf
    voxels into 0, all without a word. nibabel refuses a short file (``Expected N bytes``), a truncated or corrupt
    gzip stream and a file that is not NIfTI, and keeps NaN, inf and complex values for ``check_voxels``.
    Unscaled: ``scl_slope``/``scl_inter`` cannot make data constant, two-valued or non-finite, and the native
    type keeps memory at the file's own size.
    """
    try:
        img = nib.load(str(path))
    except Exception as exc:  # ImageFileError (not NIfTI, not gzip), HeaderDataError, EOFError (short)
        raise DataError(f"not a readable NIfTI file ({_one_line(exc)})", path=path) from None
    try:
        return np.asanyarray(img.dataobj.get_unscaled())
    except Exception as exc:  # OSError "Expected N bytes", EOFError (truncated gzip), BadGzipFile, zlib.error
        why = _one_line(exc).replace(f" from {path}", "")  # nibabel repeats the path
        raise DataError(
            f"truncated or corrupt NIfTI file ({why}): copy or export it again", path=path
        ) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_volume(path: Path, check: bool = False) -> sitk.Image:
    """Read one 3D volume with its geometry; header metadata (descrip, aux_file, ...) is dropped.

    ``check``: the voxels must look like an MR image (``liverfusion.data.io.check_voxels``; not for masks). A NIfTI
    file is always decoded by nibabel first (see ``nifti_voxels``), and that is what is checked. Every failure is a
    DataError naming ``path``.
    """
    path = Path(path)
    voxels = nifti_voxels(path) if path.name.lower().endswith(NIFTI_SUFFIXES) else None
    if check and voxels is not None:
        check_voxels(voxels, path)
    del voxels
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()
        raise DataError(f"unreadable image ({msg[-1] if msg else 'unknown error'})", path=path) from None
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise DataError(f"not a 3D image (size {img.GetSize()})", path=path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{img.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar image", path=path
        )
    if check and not path.name.lower().endswith(NIFTI_SUFFIXES):
        check_voxels(sitk.GetArrayViewFromImage(img), path)
    for key in img.GetMetaDataKeys():
        img.EraseMetaData(key)
    return img


def strip_extension(name: str, extensions: list[str]) -> str | None:
    low = name.lower()
    for ext in sorted(extensions, key=len, reverse=True):
        if low.endswith(ext):
            return name[: -len(ext)]
    return None


def scan_nifti_folders(root: Path, cfg: Mapping[str, Any], min_phi_length: int) -> Inventory:
    """List cases and their volume files; nothing is decoded here."""
    layout = str(cfg["layout"])
    extensions = [str(e).lower() for e in cfg["extensions"]]
    label_level = str(cfg["label_key"])
    if layout not in ("folders", "flat"):
        raise ConfigError(f"nifti.layout must be folders or flat, not {layout!r}")
    case_regex = None
    if layout == "flat":
        pattern = cfg.get("case_regex")
        if not pattern:
            raise ConfigError("nifti.layout=flat needs nifti.case_regex with a (?P<case>...) group")
        try:
            case_regex = re.compile(str(pattern))
        except re.error as exc:
            raise ConfigError(f"nifti.case_regex {pattern!r}: {exc}") from None
        if "case" not in case_regex.groupindex:
            raise ConfigError(f"nifti.case_regex {pattern!r} needs a named group (?P<case>...)")

    studies: dict[str, tuple[str, StudySource, set[str]]] = {}
    n_files = 0
    warnings: list[str] = []
    loose = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem = strip_extension(name, extensions)
            if stem is None or name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            n_files += 1
            if layout == "flat":
                m = case_regex.search(name) if case_regex else None
                if m is None:
                    loose += 1
                    continue
                pkey = skey = m.group("case")
                ident = {pkey} | {p for p in rel.parent.parts if len(p) >= min_phi_length}
            else:
                if len(rel.parts) < 2:
                    loose += 1
                    continue
                pkey = rel.parts[0]
                skey = rel.parent.as_posix()
                ident = {p for p in rel.parent.parts if len(p) >= min_phi_length}
            label_key = (
                pkey if label_level == "patient" else (Path(skey).name if layout == "folders" else skey)
            )
            sid = f"{pkey}\x00{skey}"
            if sid not in studies:
                studies[sid] = (
                    pkey,
                    StudySource(key=skey, series=[], label_key=label_key, order=skey),
                    set(),
                )
            studies[sid][1].series.append(
                SeriesSource(
                    text=stem,
                    load=lambda check=False, path=path: read_volume(path, check),
                    order=name,
                    info={"files": 1},
                    path=str(path),
                )
            )
            studies[sid][2].update(ident)
    if loose:
        what = "match nifti.case_regex" if layout == "flat" else "lie in a case folder"
        warnings.append(f"{loose} volume file(s) do not {what}: ignored")
    return Inventory(patients=group_patients(list(studies.values())), n_files=n_files, warnings=warnings)
